"""Oracle for uamt's evaluation metrics: medpy.metric.binary and scipy's exact EDT.

Generates masks (random blobs, anisotropic spacing, masks touching the volume border, single
voxels, thin sheets, salt noise, multi-label predictions, a one-slice volume, empty masks) and
writes them with what medpy computes: dc, jc, hd95 and asd in voxels (no spacing, as the UA-MT
reference evaluates) and in millimetres (voxelspacing). An empty prediction is scored as the
UA-MT reference does (all zeros); where medpy raises (empty reference), NaN.
Also random feature masks with scipy.ndimage.distance_transform_edt(~mask, sampling).

Usage: eval_medpy.py OUT_DIR   (writes OUT_DIR/metrics.npz and OUT_DIR/edt.npz)
"""
import os
import sys

import numpy as np
from medpy.metric import binary
from scipy.ndimage import distance_transform_edt

rng = np.random.RandomState(20190613)


def grid(shape):
    return np.meshgrid(*[np.arange(s, dtype=np.float64) for s in shape], indexing="ij")


def ellipsoid(shape, centre, radii):
    x, y, z = grid(shape)
    return ((x - centre[0]) / radii[0]) ** 2 + ((y - centre[1]) / radii[1]) ** 2 + ((z - centre[2]) / radii[2]) ** 2 <= 1.0


def blobs(shape, n, scale=0.25):
    m = np.zeros(shape, bool)
    for _ in range(n):
        c = [rng.uniform(0.25 * s, 0.75 * s) for s in shape]
        r = [rng.uniform(0.1, scale) * s + 1.0 for s in shape]
        m |= ellipsoid(shape, c, r)
    return m


def perturb(m):
    """A plausible prediction: the reference shifted by a voxel, a lump added, a bite removed."""
    p = np.roll(m, shift=(1, -1, 0), axis=(0, 1, 2))
    shape = m.shape
    p |= ellipsoid(shape, [rng.uniform(0, s) for s in shape], [0.15 * s + 1 for s in shape])
    p &= ~ellipsoid(shape, [rng.uniform(0, s) for s in shape], [0.12 * s + 1 for s in shape])
    return p


def cases():
    out = []
    s = (48, 40, 32)
    r = blobs(s, 3)
    out.append(("blobs_anisotropic", perturb(r), r, (0.625, 0.625, 1.25)))
    s = (36, 44, 28)
    r = blobs(s, 2)
    out.append(("blobs_other_spacing", perturb(r), r, (1.0, 0.8, 2.5)))
    s = (30, 26, 20)
    r = ellipsoid(s, (2, 3, 1), (12, 9, 7))
    p = np.zeros(s, bool)
    p[:, 5:15, 0:8] = True
    out.append(("touching_borders", p, r, (0.7, 0.7, 1.0)))
    r = blobs(s, 2)
    out.append(("whole_volume_prediction", np.ones(s, bool), r, (0.9, 1.1, 1.3)))
    p = np.zeros(s, bool)
    p[3, 20, 15] = True
    out.append(("single_voxel_prediction", p, r, (0.625, 0.625, 1.25)))
    q = np.zeros(s, bool)
    q[25, 2, 4] = True
    out.append(("single_voxels", p, q, (0.5, 1.5, 2.5)))
    out.append(("identical", r.copy(), r, (0.625, 0.625, 1.25)))
    t = np.zeros(s, bool)
    t[:, :, 10] = True
    slab = np.zeros(s, bool)
    slab[4:26, 3:20, 6:13] = True
    out.append(("thin_sheet", t, slab, (1.0, 1.0, 3.0)))
    out.append(("salt_noise", rng.uniform(size=s) < 0.05, r, (0.625, 0.625, 1.25)))
    out.append(("empty_prediction", np.zeros(s, bool), r, (1.0, 1.0, 1.0)))
    out.append(("empty_reference", r.copy(), np.zeros(s, bool), (1.0, 1.0, 1.0)))
    out.append(("both_empty", np.zeros(s, bool), np.zeros(s, bool), (1.0, 1.0, 1.0)))
    lab = perturb(r).astype(np.uint8)
    lab[lab > 0] = rng.randint(1, 3, size=int(lab.sum()))
    out.append(("multi_label_prediction", lab, r, (0.625, 0.625, 1.25)))
    s1 = (30, 25, 1)
    r1 = ellipsoid(s1, (15, 12, 0), (9, 7, 2))
    out.append(("one_slice_volume", perturb(r1), r1, (0.8, 0.8, 2.0)))
    s = (96, 96, 64)
    r = blobs(s, 4, scale=0.2)
    out.append(("larger", perturb(r), r, (0.625, 0.625, 1.25)))
    return out


def reference_scores(pred, ref, spacing):
    """[dc, jc, hd95, asd, hd95_mm, asd_mm] as the UA-MT reference scores (empty prediction:
    zeros), NaN where medpy raises."""
    if np.sum(pred) == 0:
        return [0.0] * 6
    dc, jc = binary.dc(pred, ref), binary.jc(pred, ref)
    try:
        d = [binary.hd95(pred, ref), binary.asd(pred, ref), binary.hd95(pred, ref, voxelspacing=spacing), binary.asd(pred, ref, voxelspacing=spacing)]
    except RuntimeError:
        d = [np.nan] * 4
    return [dc, jc] + d


def edt_cases():
    out = []
    for density in [0.001, 0.02, 0.3]:
        out.append((rng.uniform(size=(31, 27, 19)) < density, (0.7, 1.3, 2.1)))
    m = rng.uniform(size=(40, 1, 30)) < 0.01
    out.append((m, (1.0, 1.0, 1.0)))
    m = np.zeros((20, 20, 20), bool)
    m[19, 0, 19] = True
    out.append((m, (0.625, 0.625, 1.25)))
    out.append((rng.uniform(size=(80, 70, 50)) < 0.0005, (0.625, 0.625, 1.25)))
    return out


def main():
    out = sys.argv[1]
    os.makedirs(out, exist_ok=True)
    d = {}
    names = []
    for i, (name, pred, ref, spacing) in enumerate(cases()):
        names.append(name)
        d[f"c{i}.pred"] = pred.astype(np.uint8)
        d[f"c{i}.ref"] = ref.astype(np.uint8)
        d[f"c{i}.spacing"] = np.array(spacing, np.float64)
        d[f"c{i}.expect"] = np.array(reference_scores(pred, ref, spacing), np.float64)
        # medpy's own dc / jc, also on empty masks (1.0 when both are empty).
        d[f"c{i}.dc_jc"] = np.array([binary.dc(pred, ref), binary.jc(pred, ref)], np.float64)
    d["count"] = np.array([len(names)], np.int64)
    np.savez(os.path.join(out, "metrics.npz"), **d)
    with open(os.path.join(out, "names.txt"), "w") as f:
        f.write("\n".join(names) + "\n")
    e = {}
    ec = edt_cases()
    for i, (mask, sampling) in enumerate(ec):
        e[f"e{i}.feature"] = mask.astype(np.uint8)
        e[f"e{i}.sampling"] = np.array(sampling, np.float64)
        e[f"e{i}.distance"] = distance_transform_edt(~mask, sampling=sampling)
    e["count"] = np.array([len(ec)], np.int64)
    np.savez(os.path.join(out, "edt.npz"), **e)
    print(f"metric fixtures written to {out}")


if __name__ == "__main__":
    main()
