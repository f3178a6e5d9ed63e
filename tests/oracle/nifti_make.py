"""Oracle: writes NIfTI files with nibabel and dumps what nibabel reads back from them.

usage: nifti_make.py OUTDIR

For every file NAME written, OUTDIR/NAME.f32 holds nibabel's get_fdata() as little-endian
float32 in Fortran order (x fastest, the Rust side's memory order), and OUTDIR/manifest.json
lists each file's shape, stored dtype, zooms, affine (nibabel's img.affine) and scaling.
"""
import json
import os
import sys

import nibabel as nib
import numpy as np


def rot_affine(zooms, origin, angle):
    c, s = np.cos(angle), np.sin(angle)
    r = np.array([[c, -s, 0], [s, c, 0], [0, 0, 1.0]])
    a = np.eye(4)
    a[:3, :3] = r @ np.diag(zooms)
    a[:3, 3] = origin
    return a


def main(out):
    rng = np.random.default_rng(7)
    shape = (7, 5, 4)
    cases = []

    def save(name, img):
        path = os.path.join(out, name)
        nib.save(img, path)
        back = nib.load(path)
        data = np.asarray(back.get_fdata(), dtype=np.float64)
        with open(path + ".f32", "wb") as f:
            f.write(data.astype("<f4").tobytes(order="F"))
        # On load nibabel moves the scaling into the array proxy.
        slope, inter = float(back.dataobj.slope), float(back.dataobj.inter)
        cases.append({
            "file": name,
            "shape": list(back.shape),
            "dtype": str(back.get_data_dtype().newbyteorder("=")),
            "zooms": [float(z) for z in back.header.get_zooms()],
            "affine": back.affine.tolist(),
            "slope": slope,
            "inter": inter,
            "big_endian": back.header.endianness == ">",
        })

    aff = rot_affine([0.8, 0.9, 2.5], [10.0, -20.0, 5.5], 0.3)
    save("u8.nii", nib.Nifti1Image(rng.integers(0, 256, shape).astype(np.uint8), aff))
    save("u16.nii", nib.Nifti1Image(rng.integers(0, 65536, shape).astype(np.uint16), aff))
    save("i32.nii", nib.Nifti1Image(rng.integers(-2**31, 2**31 - 1, shape).astype(np.int32), aff))
    save("f64.nii.gz", nib.Nifti1Image(rng.normal(size=shape), aff))

    # Float data stored as int16: nibabel picks scl_slope / scl_inter itself.
    scaled = rng.uniform(-1000.5, 3000.25, shape)
    img = nib.Nifti1Image(scaled, aff, dtype=np.int16)
    save("i16_scaled.nii", img)
    img = nib.Nifti1Image(scaled, aff, dtype=np.int16)
    save("i16_scaled.nii.gz", img)

    # qform only (no sform), with a reflection (qfac = -1).
    img = nib.Nifti1Image(rng.normal(size=shape).astype(np.float32), None)
    qaff = rot_affine([1.0, 1.5, 2.0], [3.0, 4.0, -5.0], -0.7)
    qaff[:3, 2] *= -1
    img.set_qform(qaff, code=1)
    img.set_sform(None, code=0)
    save("f32_qform.nii", img)

    # Big-endian int16, unscaled.
    hdr = nib.Nifti1Header(endianness=">")
    img = nib.Nifti1Image(rng.integers(-30000, 30000, shape).astype(np.int16), aff, header=hdr)
    img.set_data_dtype(np.int16)
    save("i16_be.nii", img)

    for c in cases:
        if c["file"].startswith("i16_scaled"):
            assert c["slope"] != 1.0 and c["inter"] != 0.0, c
    with open(os.path.join(out, "manifest.json"), "w") as f:
        json.dump(cases, f)


if __name__ == "__main__":
    main(sys.argv[1])
