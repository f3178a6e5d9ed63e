"""Oracle for the dataset fingerprint (`uamt plan`): writes a dataset folder with nibabel and
computes, with nibabel and numpy alone, every figure the fingerprint holds.

usage: fingerprint_numpy.py DIR
  DIR/dataset/        a dataset folder (dataset.json with ids and the labelled flag, imagesTr,
                      labelsTr, imagesTs, labelsTs): anisotropic, rotated and LPS affines, float32,
                      float64 and scaled int16 images, .nii and .nii.gz, three classes, a labelled
                      case without foreground, a foreground over 100,000 voxels (so the pooled
                      percentiles take every second voxel of it), unlabelled cases with and without
                      a label file, test cases with and without a label
  DIR/expected.json   what the fingerprint must say
"""
import json
import math
import os
import sys

import nibabel as nib
import numpy as np

POOL_SAMPLE = 100_000


def affine(zooms, origin, angle=0.0, lps=False):
    c, s = np.cos(angle), np.sin(angle)
    r = np.array([[c, -s, 0], [s, c, 0], [0, 0, 1.0]])
    if lps:
        r = np.diag([-1.0, -1.0, 1.0]) @ r
    a = np.eye(4)
    a[:3, :3] = r @ np.diag(zooms)
    a[:3, 3] = origin
    return a


def blob(shape, centre, radius, value=1):
    idx = np.indices(shape).astype(np.float64)
    d2 = sum((idx[i] - centre[i]) ** 2 for i in range(3))
    return np.where(d2 <= radius**2, value, 0).astype(np.uint8)


def main(out):
    root = os.path.join(out, "dataset")
    for d in ["imagesTr", "labelsTr", "imagesTs", "labelsTs"]:
        os.makedirs(os.path.join(root, d), exist_ok=True)
    rng = np.random.default_rng(7)
    # (id, split, shape, zooms, origin, angle, lps, ext, dtype, label kind)
    specs = [
        ("tr_000", "labelled", (80, 70, 48), (1.0, 1.0, 2.0), (0, 0, 0), 0.0, False, ".nii", "f4", "big"),
        ("tr_001", "labelled", (30, 26, 14), (0.8, 1.1, 1.7), (3, -2, 7), 0.4, False, ".nii.gz", "i2", "two"),
        ("tr_002", "labelled", (20, 22, 12), (1.0, 1.5, 3.0), (20, 30, -5), 0.0, True, ".nii", "f8", "empty"),
        ("tr_003", "unlabelled", (28, 24, 16), (1.0, 1.0, 2.0), (1, 2, 3), -0.3, True, ".nii.gz", "f4", "two"),
        ("tr_004", "unlabelled", (26, 26, 10), (1.2, 1.2, 4.0), (0, 0, 0), 0.0, False, ".nii", "f4", None),
        ("ts_000", "test", (24, 20, 10), (1.0, 1.0, 2.0), (5, 5, 5), 0.5, False, ".nii.gz", "f4", "two"),
        ("ts_001", "test", (22, 18, 11), (1.3, 0.9, 1.6), (-4, 2, 0), 0.0, True, ".nii", "f4", None),
    ]
    training, test = [], []
    expected = {"cases": [], "classes": {}, "pool": []}
    labelled_fg = []
    class_counts = np.zeros(256, dtype=np.int64)
    class_cases = np.zeros(256, dtype=np.int64)
    moments = []
    for cid, split, shape, zooms, origin, angle, lps, ext, dtype, kind in specs:
        a = affine(zooms, origin, angle, lps)
        if kind == "big":
            # A large ellipsoid (over 100,000 voxels) of class 1 with a class 2 core.
            idx = np.indices(shape).astype(np.float64)
            d2 = ((idx[0] - 40) / 38) ** 2 + ((idx[1] - 35) / 33) ** 2 + ((idx[2] - 24) / 23) ** 2
            lab = np.where(d2 <= 1.0, 1, 0).astype(np.uint8)
            lab[blob(shape, (38, 35, 24), 6) == 1] = 2
        elif kind == "two":
            lab = blob(shape, (shape[0] // 2, shape[1] // 2, shape[2] // 2), 4)
            lab[blob(shape, (shape[0] // 2 + 3, shape[1] // 2, shape[2] // 2), 1.5) == 1] = 2
        else:
            lab = np.zeros(shape, dtype=np.uint8)
        base = 300.0 + 80.0 * (lab > 0) + 20.0 * (lab == 2) + rng.normal(0, 20.0, shape)
        if dtype == "i2":
            # Float data stored as int16: nibabel picks scl_slope / scl_inter itself.
            img = nib.Nifti1Image(base, a, dtype=np.int16)
        else:
            img = nib.Nifti1Image(base.astype(dtype), a)
        folder = "Ts" if split == "test" else "Tr"
        img_rel = f"./images{folder}/{cid}{ext}"
        nib.save(img, os.path.join(root, img_rel))
        entry = {"id": cid, "image": img_rel}
        has_label = kind is not None
        if has_label:
            lab_rel = f"./labels{folder}/{cid}{ext}"
            nib.save(nib.Nifti1Image(lab, a), os.path.join(root, lab_rel))
            entry["label"] = lab_rel
        if split == "test":
            test.append(entry if has_label else img_rel)
        else:
            entry["labelled"] = split == "labelled"
            training.append(entry)
        # What nibabel and numpy say about the written files.
        back = nib.load(os.path.join(root, img_rel))
        data = back.get_fdata(dtype=np.float64)
        aff = back.affine
        spacing = np.sqrt((aff[:3, :3] ** 2).sum(axis=0))
        case = {
            "id": cid,
            "split": split,
            "shape": list(data.shape),
            "spacing": spacing.tolist(),
            "orientation": "".join(nib.aff2axcodes(aff)),
            "extent_mm": (np.array(data.shape) * spacing).tolist(),
            "has_label": has_label,
            "foreground": None,
        }
        if split == "labelled":
            labels = np.asarray(nib.load(os.path.join(root, entry["label"])).dataobj).astype(np.int64)
            counts = np.bincount(labels.ravel(), minlength=256)
            class_counts += counts
            class_cases += counts > 0
            fg = labels != 0
            if fg.any():
                # x fastest, as the volumes are stored
                values = data.ravel(order="F")[fg.ravel(order="F")]
                nz = np.nonzero(fg)
                start = [int(v.min()) for v in nz]
                end = [int(v.max()) + 1 for v in nz]
                case["foreground"] = {
                    "voxels": int(fg.sum()),
                    "volume_ml": float(fg.sum() * np.prod(spacing) / 1000.0),
                    "bbox_start": start,
                    "bbox_end": end,
                    "bbox_mm": [(end[i] - start[i]) * float(spacing[i]) for i in range(3)],
                    "mean": float(values.mean()),
                    "std": float(values.std()),
                    "min": float(values.min()),
                    "max": float(values.max()),
                    "median": float(np.percentile(values, 50)),
                    "p00_5": float(np.percentile(values, 0.5)),
                    "p99_5": float(np.percentile(values, 99.5)),
                }
                every = math.ceil(values.size / POOL_SAMPLE)
                expected["pool"].extend(values[::every].tolist())
                labelled_fg.append(values)
                expected.setdefault("pool_every", []).append(every)
        expected["cases"].append(case)
    manifest = {
        "name": "fingerprint-oracle",
        "description": "written by tests/oracle/fingerprint_numpy.py",
        "tensorImageSize": "3D",
        "modality": {"0": "MRI"},
        "labels": {"0": "background", "1": "outer", "2": "core"},
        "numTraining": len(training),
        "numLabelled": sum(1 for t in training if t["labelled"]),
        "numTest": len(test),
        "training": training,
        "test": test,
    }
    with open(os.path.join(root, "dataset.json"), "w") as f:
        json.dump(manifest, f, indent=2)
    allfg = np.concatenate(labelled_fg)
    pool = np.sort(np.array(expected.pop("pool")))
    total = int(class_counts.sum())
    names = manifest["labels"]
    expected["classes"] = [
        {
            "value": c,
            "name": names.get(str(c), ""),
            "voxels": int(class_counts[c]),
            "fraction": float(class_counts[c] / total),
            "cases": int(class_cases[c]),
        }
        for c in range(256)
        if class_counts[c] > 0 or str(c) in names
    ]
    expected["pooled"] = {
        "mean": float(allfg.mean()),
        "std": float(allfg.std()),
        "min": float(allfg.min()),
        "max": float(allfg.max()),
        "median": float(np.percentile(pool, 50)),
        "p00_5": float(np.percentile(pool, 0.5)),
        "p99_5": float(np.percentile(pool, 99.5)),
        "sampled_every": max(expected.pop("pool_every")),
    }
    expected["counts"] = {
        "labelled": sum(1 for s in specs if s[1] == "labelled"),
        "unlabelled": sum(1 for s in specs if s[1] == "unlabelled"),
        "test": sum(1 for s in specs if s[1] == "test"),
        "test_labelled": sum(1 for s in specs if s[1] == "test" and s[9] is not None),
    }
    with open(os.path.join(out, "expected.json"), "w") as f:
        json.dump(expected, f, indent=1)


if __name__ == "__main__":
    main(sys.argv[1])
