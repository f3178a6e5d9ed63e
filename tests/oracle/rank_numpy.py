"""Oracle for uamt's ranking scores (src/eval/rank.rs), computed independently with numpy and
scipy from the definitions:

- per voxel, over T Monte-Carlo passes p_t (classes on axis 1): mu = mean_t p_t, the predictive
  entropy H(mu) = -sum_c mu_c ln(mu_c + 1e-6), the mean of the passes' entropies
  mean_t H(p_t), and BALD = max(H(mu) - mean_t H(p_t), 0);
- the region: voxels whose Euclidean distance (in voxels) to the nearest predicted foreground
  voxel (label != 0) is at most `band`, by scipy.ndimage.distance_transform_edt; empty when
  nothing is predicted;
- the scores: the means of H(mu) and BALD over the whole volume and over the region (NaN when
  the region is empty).

Generated cases: smooth random passes with a blob prediction; passes that all agree (BALD 0);
one-hot passes that disagree (probabilities exactly 0 and 1); an empty prediction; a volume one
voxel thick; two passes of four classes; a band of 0.

Usage: rank_numpy.py OUT_DIR   (writes OUT_DIR/rank.npz and OUT_DIR/names.txt)
"""
import os
import sys

import numpy as np
from scipy import ndimage

rng = np.random.RandomState(20241202)


def entropy(p, axis):
    p = p.astype(np.float64)
    return -(p * np.log(p + 1e-6)).sum(axis=axis)


def softmax(x, axis):
    e = np.exp(x - x.max(axis=axis, keepdims=True))
    return e / e.sum(axis=axis, keepdims=True)


def oracle(probs, labels, band):
    mu = probs.astype(np.float64).mean(axis=0)
    h = entropy(mu, 0)
    mean_h = entropy(probs, 1).mean(axis=0)
    bald = np.maximum(h - mean_h, 0.0)
    fg = labels != 0
    if fg.any():
        region = ndimage.distance_transform_edt(~fg) <= band
    else:
        region = np.zeros(labels.shape, dtype=bool)
    scores = [h.mean(), bald.mean()]
    if region.any():
        scores += [h[region].mean(), bald[region].mean()]
    else:
        scores += [np.nan, np.nan]
    return h, bald, region, np.array(scores)


def smooth_logits(t, c, dims, scale):
    x = rng.randn(t, c, *dims)
    x = ndimage.uniform_filter(x, size=(1, 1, 3, 3, 3), mode="nearest")
    return (x * scale).astype(np.float32)


def blob(dims, centre, radius):
    g = np.indices(dims).astype(np.float64)
    d = sum((g[i] - centre[i]) ** 2 for i in range(3))
    return (d <= radius * radius).astype(np.uint8)


cases = []
# 1. Smooth random passes, two classes, a blob prediction, band 2.
dims = (14, 12, 9)
cases.append(("smooth", softmax(smooth_logits(8, 2, dims, 6.0), 1), blob(dims, (6, 5, 4), 3.2), 2.0))
# 2. Every pass the same: BALD 0 everywhere; three classes with labels 1 and 2.
one = softmax(smooth_logits(1, 3, dims, 4.0), 1)
labels = blob(dims, (4, 4, 4), 2.5) + 2 * blob(dims, (10, 8, 5), 2.0)
cases.append(("agreeing passes", np.repeat(one, 6, axis=0), np.minimum(labels, 2).astype(np.uint8), 3.0))
# 3. One-hot passes that disagree: probabilities exactly 0 and 1 (ties everywhere).
dims3 = (8, 7, 6)
hot = rng.randint(0, 2, size=(4,) + dims3)
p = np.stack([1 - hot, hot], axis=1).astype(np.float32)
cases.append(("one-hot passes", p, blob(dims3, (3, 3, 3), 2.0), 1.5))
# 4. Nothing predicted: the foreground scores are undefined.
cases.append(("empty prediction", softmax(smooth_logits(5, 2, dims3, 3.0), 1), np.zeros(dims3, np.uint8), 3.0))
# 5. One voxel thick along y, a single predicted voxel.
dims5 = (9, 1, 7)
lab = np.zeros(dims5, np.uint8)
lab[4, 0, 3] = 1
cases.append(("one voxel thick", softmax(smooth_logits(3, 2, dims5, 5.0), 1), lab, 1.5))
# 6. Two passes of four classes, a band of 0 (the foreground alone).
cases.append(("four classes", softmax(smooth_logits(2, 4, dims, 5.0), 1), blob(dims, (7, 6, 4), 3.0) * 3, 0.0))

out = sys.argv[1]
os.makedirs(out, exist_ok=True)
arrays = {"count": np.array([len(cases)], dtype=np.float64)}
for i, (name, probs, labels, band) in enumerate(cases):
    probs = probs.astype(np.float32)
    h, bald, region, scores = oracle(probs, labels, band)
    arrays[f"c{i}.probs"] = probs
    arrays[f"c{i}.labels"] = labels.astype(np.uint8)
    arrays[f"c{i}.band"] = np.array([band], dtype=np.float64)
    arrays[f"c{i}.entropy"] = h.astype(np.float64)
    arrays[f"c{i}.bald"] = bald.astype(np.float64)
    arrays[f"c{i}.region"] = region.astype(np.uint8)
    arrays[f"c{i}.scores"] = scores.astype(np.float64)
np.savez(os.path.join(out, "rank.npz"), **arrays)
with open(os.path.join(out, "names.txt"), "w") as f:
    f.write("\n".join(c[0] for c in cases) + "\n")
