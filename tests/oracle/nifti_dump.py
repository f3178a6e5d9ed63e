"""Oracle: dumps what nibabel (for .nii/.nii.gz) or h5py (for FILE.h5:DATASET) reads.

usage: nifti_dump.py OUTDIR SOURCE...

For the i-th SOURCE, OUTDIR/<i>.f32 holds the array as little-endian float32 in Fortran order
(x fastest: element [x][y][z] of the numpy array is at x + X*(y + Y*z)), and OUTDIR/<i>.json
its shape, dtype and, for NIfTI, zooms, affine, sform/qform codes.
"""
import json
import os
import sys

import numpy as np


def main(out, sources):
    for i, src in enumerate(sources):
        meta = {"source": src}
        if ".h5:" in src:
            import h5py
            path, name = src.rsplit(":", 1)
            with h5py.File(path, "r") as f:
                data = f[name][...]
            meta["dtype"] = str(data.dtype)
        else:
            import nibabel as nib
            img = nib.load(src)
            data = np.asarray(img.get_fdata(), dtype=np.float64)
            meta["dtype"] = str(img.get_data_dtype().newbyteorder("="))
            meta["zooms"] = [float(z) for z in img.header.get_zooms()]
            meta["affine"] = img.affine.tolist()
            meta["sform_code"] = int(img.header["sform_code"])
            meta["qform_code"] = int(img.header["qform_code"])
        meta["shape"] = list(data.shape)
        with open(os.path.join(out, f"{i}.f32"), "wb") as f:
            f.write(np.asarray(data).astype("<f4").tobytes(order="F"))
        with open(os.path.join(out, f"{i}.json"), "w") as f:
            json.dump(meta, f)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2:])
