"""Oracle for the raw MSD import, `uamt predict` and `uamt export`, with nibabel and PyTorch.

usage:
  raw_import.py make SRC [VARIANT]   writes an MSD-style raw folder with nibabel; VARIANT breaks it:
                                     missing_label, mismatch (label affine shifted), nnunet,
                                     bad_suffix (nnU-Net layout with a `_abc` name); anisotropic
                                     changes it: thick slices (3.5-5 mm under 0.7-0.8 mm in plane)
  raw_import.py dump OUT FILE...     OUT/<i>.json: shape, affine, mean and std of each FILE
                                     (nibabel), and OUT/<i>.f32 its data (x fastest)
  raw_import.py logits WEIGHTS NF X.f32 SHAPE OUT.f32
                                     the reference V-Net (uamt_oracle.py) with the safetensors
                                     WEIGHTS loaded by load_state_dict(strict=True), eval mode,
                                     on X (C-order float32 of SHAPE = "1,1,X,Y,Z"): logits to OUT
"""
import json
import os
import struct
import sys

import nibabel as nib
import numpy as np


def affine(zooms, origin, angle=0.0, lps=False):
    c, s = np.cos(angle), np.sin(angle)
    r = np.array([[c, -s, 0], [s, c, 0], [0, 0, 1.0]])
    if lps:
        r = np.diag([-1.0, -1.0, 1.0]) @ r
    a = np.eye(4)
    a[:3, :3] = r @ np.diag(zooms)
    a[:3, 3] = origin
    return a


def case(rng, shape, centre, radius):
    idx = np.indices(shape).astype(np.float64)
    d2 = sum((idx[i] - centre[i]) ** 2 for i in range(3))
    label = (d2 <= radius**2).astype(np.uint8)
    image = 300.0 + 80.0 * label + rng.normal(0, 20.0, shape)
    return image.astype(np.float32), label


def make(src, variant):
    rng = np.random.default_rng(11)
    for d in ["imagesTr", "labelsTr", "imagesTs"]:
        os.makedirs(os.path.join(src, d), exist_ok=True)
    nnunet = variant in ("nnunet", "bad_suffix")
    geoms = [
        ((1.0, 1.0, 1.0), (0, 0, 0), 0.0, False),
        ((1.25, 1.25, 2.5), (-10, 5, 3), 0.0, False),
        ((0.8, 1.1, 1.7), (3, -2, 7), 0.4, False),
        ((1.0, 1.5, 2.0), (20, 30, -5), 0.0, True),
        ((1.0, 1.0, 1.5), (1, 2, 3), -0.3, True),
        ((1.2, 1.2, 1.2), (0, 0, 0), 0.0, False),
    ]
    if variant == "anisotropic":
        geoms = [
            ((0.75, 0.75, 4.5), (0, 0, 0), 0.0, False),
            ((0.8, 0.8, 5.0), (-10, 5, 3), 0.3, True),
            ((0.7, 0.7, 4.0), (3, -2, 7), -0.4, False),
            ((0.75, 0.75, 5.0), (20, 30, -5), 0.0, True),
            ((0.8, 0.8, 3.5), (1, 2, 3), 0.2, True),
            ((0.75, 0.75, 4.5), (0, 0, 0), 0.0, False),
        ]
    training = []
    for i, (z, o, ang, lps) in enumerate(geoms):
        cid = f"la_{i:03d}"
        shape = (24 + 2 * i, 20, 14)
        img, lab = case(rng, shape, (12 + i, 10, 7), 4.0)
        a = affine(z, o, ang, lps)
        ext = ".nii.gz" if i % 2 == 0 else ".nii"
        name = f"{cid}_0000{ext}" if nnunet else f"{cid}{ext}"
        if variant == "bad_suffix" and i == 2:
            name = f"{cid}_abc{ext}"
        nib.save(nib.Nifti1Image(img, a), os.path.join(src, "imagesTr", name))
        la = a.copy()
        if variant == "mismatch" and i == 1:
            la[0, 3] += 5.0
        if not (variant == "missing_label" and i == 3):
            nib.save(nib.Nifti1Image(lab, la), os.path.join(src, "labelsTr", f"{cid}{ext}"))
        training.append({"image": f"./imagesTr/{cid}{ext}", "label": f"./labelsTr/{cid}{ext}"})
    tests = [
        ((1.0, 1.0, 2.0), (5, 5, 5), 0.5, False, ".nii.gz"),
        ((1.3, 0.9, 1.6), (-4, 2, 0), 0.0, True, ".nii"),
        ((0.7, 0.7, 3.0), (0, 0, 0), -0.7, True, ".nii.gz"),
    ]
    for i, (z, o, ang, lps, ext) in enumerate(tests):
        img, _ = case(rng, (26 - 2 * i, 22, 10 + i), (13, 11, 5), 4.0)
        name = f"t_{i:03d}_0000{ext}" if nnunet else f"t_{i:03d}{ext}"
        nib.save(nib.Nifti1Image(img, affine(z, o, ang, lps)), os.path.join(src, "imagesTs", name))
    meta = {"name": "TinyHeart", "modality": {"0": "MRI"}, "labels": {"0": "background", "1": "left atrium"}}
    if nnunet:
        meta = {"name": "TinyHeart", "channel_names": {"0": "MRI"}, "labels": {"background": 0, "left atrium": 1},
                "file_ending": ".nii.gz"}
    else:
        meta["training"] = training
        meta["test"] = [f"./imagesTs/t_{i:03d}{e[4]}" for i, e in enumerate(tests)]
    with open(os.path.join(src, "dataset.json"), "w") as f:
        json.dump(meta, f)


def dump(out, files):
    os.makedirs(out, exist_ok=True)
    for i, p in enumerate(files):
        img = nib.load(p)
        data = np.asarray(img.get_fdata(), dtype=np.float64)
        meta = {"shape": list(data.shape), "affine": img.affine.tolist(), "mean": float(data.mean()),
                "std": float(data.std()), "axcodes": "".join(nib.aff2axcodes(img.affine))}
        with open(os.path.join(out, f"{i}.json"), "w") as f:
            json.dump(meta, f)
        with open(os.path.join(out, f"{i}.f32"), "wb") as f:
            f.write(data.astype("<f4").tobytes(order="F"))


def read_safetensors(path):
    import torch
    with open(path, "rb") as f:
        n = struct.unpack("<Q", f.read(8))[0]
        header = json.loads(f.read(n))
        body = f.read()
    kinds = {"F32": np.float32, "F64": np.float64, "I64": np.int64}
    out = {}
    for k, v in header.items():
        if k == "__metadata__":
            continue
        a, b = v["data_offsets"]
        arr = np.frombuffer(body[a:b], dtype=kinds[v["dtype"]]).reshape(v["shape"])
        out[k] = torch.from_numpy(arr.copy())
    return out


def readme_vnet(n_channels=1, n_classes=2, n_filters=16, normalization="batchnorm", has_dropout=False):
    """The reference V-Net under UA-MT's networks/vnet.py signature, as README's snippets call it."""
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from uamt_oracle import VNet
    assert normalization == "batchnorm"
    return VNet(n_channels=n_channels, n_classes=n_classes, nf=n_filters, has_dropout=has_dropout)


def readme_snippets(readme):
    """The ```python blocks of README.md that load exported weights."""
    text = open(readme).read()
    blocks = text.split("```python\n")[1:]
    return [b.split("```")[0] for b in blocks if "load_state_dict" in b]


def logits(weights, nf, x_path, shape, out, readme=None):
    """Logits of the reference V-Net loaded with WEIGHTS: by this module's own reader, or (README
    given) by running README's snippet for that file type verbatim in WEIGHTS' folder."""
    import torch
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from uamt_oracle import VNet
    if readme:
        ext = os.path.splitext(weights)[1]
        snippets = [s for s in readme_snippets(readme) if ext in s]
        assert len(snippets) == 1, f"README has {len(snippets)} snippets loading a {ext} file"
        scope = {"VNet": readme_vnet}
        cwd = os.getcwd()
        os.chdir(os.path.dirname(os.path.abspath(weights)))
        try:
            exec(snippets[0], scope)
        finally:
            os.chdir(cwd)
        net = scope["net"]
    else:
        net = VNet(nf=int(nf))
        net.load_state_dict(read_safetensors(weights), strict=True)
    net.eval()
    shape = [int(s) for s in shape.split(",")]
    x = torch.from_numpy(np.fromfile(x_path, dtype="<f4").reshape(shape))
    with torch.no_grad():
        y = net(x).numpy()
    y.astype("<f4").tofile(out)


if __name__ == "__main__":
    cmd = sys.argv[1]
    if cmd == "make":
        make(sys.argv[2], sys.argv[3] if len(sys.argv) > 3 else "")
    elif cmd == "dump":
        dump(sys.argv[2], sys.argv[3:])
    elif cmd == "logits":
        logits(*sys.argv[2:8])
    else:
        sys.exit(f"unknown command {cmd}")
