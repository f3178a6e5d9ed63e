"""Oracle: the reference's augmentation in numpy (UA-MT's RandomRotFlip then RandomCrop).

usage: nifti_augment.py VOLUME.nii OUTDIR PATCH_X,PATCH_Y,PATCH_Z SPEC...

Each SPEC is `k,axis,ox,oy,oz`: np.rot90(v, k), np.flip(v, axis), then the reference's padding
(if any axis <= patch, every axis padded by max((patch - size) // 2 + 3, 0) per side), then the
crop v[ox:ox+px, oy:oy+py, oz:oz+pz]. OUTDIR/<i>.f32 holds the patch as little-endian float32
in C order; OUTDIR/<i>.json the padding used and the exclusive upper bound of each crop start.
"""
import json
import os
import sys

import nibabel as nib
import numpy as np


def main(volume, out, patch, specs):
    data = np.asarray(nib.load(volume).get_fdata(), dtype=np.float32)
    px, py, pz = (int(v) for v in patch.split(","))
    for i, spec in enumerate(specs):
        k, axis, ox, oy, oz = (int(v) for v in spec.split(","))
        image = np.rot90(data, k)
        image = np.flip(image, axis=axis).copy()
        pads = [0, 0, 0]
        if image.shape[0] <= px or image.shape[1] <= py or image.shape[2] <= pz:
            pads = [max((p - s) // 2 + 3, 0) for p, s in zip((px, py, pz), image.shape)]
            image = np.pad(image, [(p, p) for p in pads], mode="constant", constant_values=0)
        w, h, d = image.shape
        bounds = [w - px, h - py, d - pz]  # np.random.randint(0, bound) draws below it
        crop = image[ox:ox + px, oy:oy + py, oz:oz + pz]
        assert crop.shape == (px, py, pz), (crop.shape, spec)
        with open(os.path.join(out, f"{i}.f32"), "wb") as f:
            f.write(np.ascontiguousarray(crop).astype("<f4").tobytes(order="C"))
        with open(os.path.join(out, f"{i}.json"), "w") as f:
            json.dump({"pad": pads, "bounds": bounds}, f)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4:])
