"""Oracle for uamt's sliding-window inference: the UA-MT reference's `test_single_case`
procedure, written from its description in shared/docs/uamt-recipe.md and the issue (pad axes
smaller than the patch, ceil((size - patch) / stride) + 1 windows per axis starting at
min(stride * i, size - patch), softmax summed and divided by the window count, crop, argmax),
run with the oracle V-Net of uamt_oracle.py (4 filters, perturbed BatchNorm, eval mode).
Also the same with nnU-Net's Gaussian importance weighting of the windows (`--blend gaussian`):
the map is computed as nnU-Net computes it (a unit impulse at patch // 2 blurred by
scipy.ndimage.gaussian_filter with sigma = patch / 8, divided by its maximum, zeros raised to the
smallest non-zero value), each window's softmax multiplied by it, divided by the summed weights.

Usage: eval_sliding.py OUT_DIR   (writes OUT_DIR/sliding.npz)
"""
import math
import os
import sys

import numpy as np
import torch
from scipy.ndimage import gaussian_filter
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from uamt_oracle import VNet, perturb, state  # noqa: E402


def importance_map(patch):
    """nnU-Net's Gaussian importance map of a window of `patch` voxels (float32)."""
    tmp = np.zeros(patch)
    tmp[tuple(p // 2 for p in patch)] = 1
    g = gaussian_filter(tmp, [p / 8 for p in patch], 0, mode="constant", cval=0)
    g = (g / np.max(g)).astype(np.float32)
    g[g == 0] = np.min(g[g != 0])
    return g


def single_case(net, image, stride_xy, stride_z, patch, num_classes, gaussian=False):
    """Returns (label_map, score_map, starts per axis, padding before per axis)."""
    size = image.shape
    pads = [max(p - s, 0) for s, p in zip(size, patch)]
    before = [p // 2 for p in pads]
    if any(pads):
        image = np.pad(image, [(b, p - b) for b, p in zip(before, pads)], mode="constant", constant_values=0)
    ww, hh, dd = image.shape
    strides = (stride_xy, stride_xy, stride_z)
    starts = []
    for n, p, st in zip((ww, hh, dd), patch, strides):
        k = math.ceil((n - p) / st) + 1
        starts.append([min(st * i, n - p) for i in range(k)])
    score = np.zeros((num_classes,) + image.shape, np.float32)
    cnt = np.zeros(image.shape, np.float32)
    weight = importance_map(patch) if gaussian else np.ones(patch, np.float32)
    for xs in starts[0]:
        for ys in starts[1]:
            for zs in starts[2]:
                win = (slice(xs, xs + patch[0]), slice(ys, ys + patch[1]), slice(zs, zs + patch[2]))
                x = torch.from_numpy(image[win][None, None].astype(np.float32))
                with torch.no_grad():
                    y = F.softmax(net(x), dim=1)[0].numpy()
                score[(slice(None),) + win] += y * weight[None]
                cnt[win] += weight
    score = score / cnt[None]
    label = np.argmax(score, axis=0)
    crop = tuple(slice(b, b + s) for b, s in zip(before, size))
    return label[crop], score[(slice(None),) + crop], starts, before


def main():
    out = sys.argv[1]
    os.makedirs(out, exist_ok=True)
    torch.set_num_threads(2)
    torch.manual_seed(5)
    gen = torch.Generator().manual_seed(6)
    net = VNet(nf=4)
    perturb(net, gen)
    net.eval()
    d = state("w", net)
    patch = (32, 32, 16)
    # One volume larger than the patch on every axis, one smaller on x and z (padded).
    for name, shape, sxy, sz in [("large", (45, 38, 23), 6, 4), ("small", (21, 40, 11), 5, 3)]:
        image = torch.randn(shape, generator=gen).numpy()
        label, score, starts, before = single_case(net, image, sxy, sz, patch, 2)
        glabel, gscore, _, _ = single_case(net, image, sxy, sz, patch, 2, gaussian=True)
        d[f"{name}.label_gaussian"] = glabel.astype(np.int64)
        d[f"{name}.score_gaussian"] = gscore
        d[f"{name}.image"] = image
        d[f"{name}.label"] = label.astype(np.int64)
        d[f"{name}.score"] = score
        d[f"{name}.stride"] = np.array([sxy, sxy, sz], np.int64)
        d[f"{name}.before"] = np.array(before, np.int64)
        for a, s in zip("xyz", starts):
            d[f"{name}.starts_{a}"] = np.array(s, np.int64)
    d["importance"] = importance_map(patch)
    np.savez(os.path.join(out, "sliding.npz"), **d)
    print(f"sliding-window fixtures written to {out}")


if __name__ == "__main__":
    main()
