"""Oracle for uamt's calibration metrics (src/eval/calibration.rs), computed independently:

- ECE from its definition: 15 equal-width bins over [0, 1] (bin k: k/15 <= p < (k+1)/15, the
  last one closed), sum over the non-empty bins of n_k / N * |mean p - foreground share|;
- Brier score: mean (p - y)^2 with numpy;
- uncertainty AUROC: scikit-learn's roc_auc_score(wrong, uncertainty), wrong = predicted label
  != reference label; NaN where it raises (a case without wrong voxels, or without right ones).

Generated cases: a smooth miscalibrated map, probabilities and uncertainties on a coarse grid
(many ties, probabilities exactly 0, 1 and on bin edges), uncertainties around zero (-0.0, +0.0
and tiny negatives, as the entropy's 1e-6 makes them), a case with no wrong voxel, a case with
no right voxel, an empty reference label, a multi-label reference, a single voxel.

Usage: calibration_sklearn.py OUT_DIR   (writes OUT_DIR/calibration.npz and OUT_DIR/names.txt)
"""
import os
import sys

import numpy as np
from sklearn.metrics import roc_auc_score

BINS = 15
rng = np.random.RandomState(20240523)


def ece(p, y):
    p = p.astype(np.float64)
    y = (y != 0).astype(np.float64)
    n = p.size
    edges = np.linspace(0.0, 1.0, BINS + 1)
    total = 0.0
    counts, sums, fg = [], [], []
    for k in range(BINS):
        lo, hi = edges[k], edges[k + 1]
        if k == BINS - 1:
            inside = (p >= lo) & (p <= hi)
        else:
            inside = (p >= lo) & (p < hi)
        nk = int(inside.sum())
        counts.append(nk)
        sums.append(float(p[inside].sum()))
        fg.append(int(y[inside].sum()))
        if nk == 0:
            continue
        total += nk / n * abs(p[inside].mean() - y[inside].mean())
    return total, counts, sums, fg


def brier(p, y):
    return float(np.mean((p.astype(np.float64) - (y != 0).astype(np.float64)) ** 2))


def auroc(unc, pred, ref):
    wrong = (pred != ref).astype(np.int64).ravel()
    if wrong.min() == wrong.max():  # roc_auc_score refuses: only one class present
        return float("nan")
    return float(roc_auc_score(wrong, unc.astype(np.float64).ravel()))


def entropy(p):
    p = p.astype(np.float32)
    q = 1.0 - p
    return (-(p * np.log(p + 1e-6) + q * np.log(q + 1e-6))).astype(np.float32)


def cases():
    out = []
    shape = (24, 20, 16)
    # Smooth, overconfident: the truth is drawn from a flatter probability than predicted.
    logit = rng.normal(0.0, 2.5, shape)
    p = (1.0 / (1.0 + np.exp(-logit))).astype(np.float32)
    truth = rng.uniform(size=shape) < 1.0 / (1.0 + np.exp(-0.6 * logit))
    ref = truth.astype(np.uint8)
    pred = (p > 0.5).astype(np.uint8)
    out.append(("overconfident", p, pred, ref, entropy(p)))

    # Coarse grid: ties everywhere, probabilities 0, 1 and exactly on bin edges (k/15 in float32).
    shape = (18, 14, 10)
    levels = np.concatenate([np.arange(0, 21) / 20.0, np.arange(0, 16) / 15.0]).astype(np.float32)
    p = rng.choice(levels, size=shape).astype(np.float32)
    ref = (rng.uniform(size=shape) < p).astype(np.uint8)
    pred = (p >= 0.5).astype(np.uint8)
    unc = rng.choice(np.array([0.0, 0.1, 0.25, 0.5, 0.69], np.float32), size=shape)
    out.append(("ties", p, pred, ref, unc))

    # Uncertainties around zero: -0.0 ties +0.0, tiny negatives order below.
    shape = (10, 10, 6)
    p = rng.uniform(size=shape).astype(np.float32)
    ref = (rng.uniform(size=shape) < 0.4).astype(np.uint8)
    pred = (p > 0.5).astype(np.uint8)
    unc = rng.choice(np.array([-0.0, 0.0, -1e-6, -9.9e-7, 1e-3], np.float32), size=shape)
    out.append(("signed_zeros", p, pred, ref, unc))

    # No wrong voxel: AUROC undefined, ECE and Brier defined.
    shape = (12, 12, 8)
    p = rng.uniform(size=shape).astype(np.float32)
    pred = (p > 0.5).astype(np.uint8)
    out.append(("no_wrong_voxel", p, pred, pred.copy(), entropy(p)))

    # No right voxel: AUROC undefined too.
    ref = (1 - pred).astype(np.uint8)
    out.append(("no_right_voxel", p, pred, ref, entropy(p)))

    # Empty reference label: every predicted foreground voxel is wrong.
    shape = (16, 12, 8)
    p = (rng.beta(0.5, 3.0, size=shape)).astype(np.float32)
    pred = (p > 0.5).astype(np.uint8)
    ref = np.zeros(shape, np.uint8)
    out.append(("empty_label", p, pred, ref, entropy(p)))

    # Multi-label reference: label 2 is foreground for ECE and Brier, and wrong where 1 is predicted.
    shape = (14, 10, 6)
    p = rng.uniform(size=shape).astype(np.float32)
    ref = rng.choice(np.array([0, 1, 2], np.uint8), size=shape)
    pred = (p > 0.5).astype(np.uint8)
    out.append(("multi_label", p, pred, ref, entropy(p)))

    # One voxel.
    out.append(("one_voxel", np.array([[[0.3]]], np.float32), np.zeros((1, 1, 1), np.uint8),
                np.ones((1, 1, 1), np.uint8), np.array([[[0.6]]], np.float32)))
    return out


def main(out):
    os.makedirs(out, exist_ok=True)
    d = {}
    names = []
    pooled = np.zeros((3, BINS), np.float64)
    for i, (name, p, pred, ref, unc) in enumerate(cases()):
        names.append(name)
        e, counts, sums, fg = ece(p, ref)
        pooled += np.array([counts, sums, fg], np.float64)
        d[f"c{i}.prob"] = p.astype(np.float32)
        d[f"c{i}.pred"] = pred.astype(np.uint8)
        d[f"c{i}.ref"] = ref.astype(np.uint8)
        d[f"c{i}.unc"] = unc.astype(np.float32)
        # ece, brier, auroc (NaN: undefined)
        d[f"c{i}.expect"] = np.array([e, brier(p, ref), auroc(unc, pred, ref)], np.float64)
    d["pooled"] = pooled
    d["count"] = np.array([len(names)], np.int64)
    np.savez(os.path.join(out, "calibration.npz"), **d)
    with open(os.path.join(out, "names.txt"), "w") as f:
        f.write("\n".join(names) + "\n")


if __name__ == "__main__":
    main(sys.argv[1])
