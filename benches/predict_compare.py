#!/usr/bin/env python3
"""`uamt predict` against PyTorch's best CPU setting, on the same weights, windows and threads.

  benches/predict_compare.py --data ../shared/data/la2018 [--uamt target/release/uamt] \
      [--cases UPT6DX9IQY9JAZ7HJKA7,VIXBEFTNVHZWKAKURJBN] [--strides 18,18,4 56,56,40] \
      [--rounds 3] [--threads 2] [--batch 4] [--weights W.safetensors] [--json-out F]

The peer is the reference V-Net (tests/oracle/uamt_oracle.py, the network the golden tests hold
the daemon's equal to) run as MONAI's `sliding_window_inference` runs a model: windows of the
evaluation patch (112x112x80) at the given stride, batched (--batch, MONAI's `sw_batch_size`),
the softmax of every window added into a score volume and divided by the count of windows
covering each voxel, then the argmax. It uses PyTorch's fastest CPU setting for this network:
`torch.inference_mode()`, the model and every batch in `channels_last_3d`, and
`torch.set_num_threads(--threads)`. The window starts are the reference's (UA-MT's
`test_single_case`: `ceil((size - patch) / stride) + 1` starts per axis, the last one clamped
to the border; a side below the patch is padded symmetrically), the ones `uamt predict` uses.

1. The inputs: the chosen LA cases (the published test split's; by default the two volumes of
   issue 26, 175x132x88 and 168x136x88) written as float32 NIfTI at 0.625 mm, exactly the HDF5
   arrays (already normalised by UA-MT's preprocessing; both sides segment them as they are:
   `uamt predict --normalize none`).
2. The weights: --weights, or a 16-filter V-Net drawn by PyTorch's default initialisation with
   its BatchNorm statistics then measured on windows of the inputs (so that activations have
   realistic scales and the label map is not trivial), saved as safetensors under the reference
   names; `uamt predict --weights` reads the same file.
3. --rounds rounds, alternating which side goes first; in each, per stride: `uamt predict` (the
   whole command, wall time: process start, reading, inference, writing the label maps) and the
   peer's inference of the same cases in one warm Python process (the time from the image array
   to the label array per case; Python's and PyTorch's start-up and the file I/O not counted).
   uamt's per-case inference time (`inference_seconds` of `--json`) is reported too.
4. The label maps are compared voxel for voxel (first round). An untimed `uamt predict --maps`
   gives uamt's foreground probabilities, and `max |p_uamt - p_peer|` over all voxels is the
   measured numeric difference of the two implementations. A voxel whose labels differ is a tie
   that rounding broke either way when the peer's two class probabilities there are within twice
   that difference of each other; any other differing voxel is a mismatch, and the script exits
   non-zero. With a trained model such ties are rare; with the drawn weights a few occur.

--patch and --n-filters change the window and the network (the test suite runs a tiny case).

The table: per stride, the median over rounds of each side's seconds for all cases, the spread
(min-max), and the speed-up (peer / uamt) for the whole command and for inference alone. Both
sides get OMP_NUM_THREADS / MKL_NUM_THREADS = --threads.
"""
import argparse
import importlib.util
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

import h5py
import nibabel as nib
import numpy as np
import torch
import torch.nn.functional as F

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
ORACLE = os.path.join(ROOT, "tests", "oracle", "uamt_oracle.py")
DEFAULT_CASES = "UPT6DX9IQY9JAZ7HJKA7,VIXBEFTNVHZWKAKURJBN"
PATCH = [112, 112, 80]


def vnet_class():
    spec = importlib.util.spec_from_file_location("uamt_oracle", ORACLE)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.VNet


def starts(size, patch, stride):
    last = max(size, patch) - patch
    n = -(-last // stride) + 1
    return [min(stride * i, last) for i in range(n)]


def pad_amounts(size, patch):
    if size >= patch:
        return (0, 0)
    total = patch - size
    return (total // 2, total - total // 2)


def peer_segment(model, image, stride, batch):
    """MONAI-style sliding windows: softmax per window, summed, divided by the coverage count."""
    pads = [pad_amounts(s, p) for s, p in zip(image.shape, PATCH)]
    x = torch.from_numpy(np.pad(image, pads))
    dims = x.shape
    grid = [(a, b, c) for a in starts(dims[0], PATCH[0], stride[0]) for b in starts(dims[1], PATCH[1], stride[1])
            for c in starts(dims[2], PATCH[2], stride[2])]
    score = torch.zeros((2,) + tuple(dims))
    count = torch.zeros(tuple(dims))
    for i in range(0, len(grid), batch):
        chunk = grid[i:i + batch]
        win = torch.stack([x[a:a + PATCH[0], b:b + PATCH[1], c:c + PATCH[2]] for a, b, c in chunk])
        win = win.unsqueeze(1).contiguous(memory_format=torch.channels_last_3d)
        prob = F.softmax(model(win), dim=1)
        for k, (a, b, c) in enumerate(chunk):
            score[:, a:a + PATCH[0], b:b + PATCH[1], c:c + PATCH[2]] += prob[k]
            count[a:a + PATCH[0], b:b + PATCH[1], c:c + PATCH[2]] += 1
    prob = score / count
    (x0, _), (y0, _), (z0, _) = pads
    sx, sy, sz = image.shape
    prob = prob[:, x0:x0 + sx, y0:y0 + sy, z0:z0 + sz]
    return prob.argmax(0).numpy().astype(np.uint8), prob.numpy()


def make_inputs(args, work):
    ids = [c for c in args.cases.split(",") if c]
    folder = os.path.join(work, "in")
    os.makedirs(folder, exist_ok=True)
    images = {}
    for cid in ids:
        with h5py.File(os.path.join(args.data, "h5", cid + ".h5"), "r") as f:
            img = np.asarray(f["image"][:], dtype=np.float32)
        nib.save(nib.Nifti1Image(img, np.diag([0.625, 0.625, 0.625, 1.0])), os.path.join(folder, cid + ".nii"))
        images[cid] = img
    return folder, images


def make_weights(VNet, images, work, nf):
    """PyTorch's default initialisation, BatchNorm statistics measured on windows of the inputs."""
    from safetensors.torch import save_file

    torch.manual_seed(0)
    model = VNet(nf=nf, has_dropout=False)
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm3d):
            m.momentum = None  # a cumulative average over the calibration batches
    model.train()
    with torch.no_grad():
        for img in images.values():
            pads = [pad_amounts(s, p) for s, p in zip(img.shape, PATCH)]
            x = torch.from_numpy(np.pad(img, pads))
            c = [(s - p) // 2 for s, p in zip(x.shape, PATCH)]
            win = x[c[0]:c[0] + PATCH[0], c[1]:c[1] + PATCH[1], c[2]:c[2] + PATCH[2]]
            model(win[None, None].contiguous())
    path = os.path.join(work, f"w{nf}.safetensors")
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, path)
    return path


def load_peer(VNet, weights, threads, nf):
    from safetensors.torch import load_file

    torch.set_num_threads(threads)
    model = VNet(nf=nf, has_dropout=False)
    model.load_state_dict(load_file(weights))
    model.eval()
    return model.to(memory_format=torch.channels_last_3d)


def run_uamt(args, inputs, weights, stride, out, env, extra=()):
    cmd = [args.uamt, "predict", "--weights", weights, "--input", inputs, "--out", out, "--force",
           "--normalize", "none", "--stride", ",".join(map(str, stride)), "--batch", str(args.batch), "--json",
           "--patch", ",".join(map(str, PATCH)), "--n-filters", str(args.n_filters), *extra]
    t0 = time.perf_counter()
    r = subprocess.run(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    wall = time.perf_counter() - t0
    if r.returncode != 0:
        sys.exit(f"uamt predict failed ({r.returncode}):\n{r.stderr}")
    cases = json.loads(r.stdout)
    return wall, sum(c["inference_seconds"] for c in cases)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default=os.path.join(ROOT, "..", "shared", "data", "la2018"))
    ap.add_argument("--uamt", default=os.path.join(ROOT, "target", "release", "uamt"))
    ap.add_argument("--cases", default=DEFAULT_CASES)
    ap.add_argument("--strides", nargs="+", default=["18,18,4", "56,56,40"])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--weights")
    ap.add_argument("--patch", default="112,112,80")
    ap.add_argument("--n-filters", type=int, default=16)
    ap.add_argument("--workdir")
    ap.add_argument("--json-out")
    args = ap.parse_args()
    strides = [tuple(int(v) for v in s.split(",")) for s in args.strides]
    PATCH[:] = [int(v) for v in args.patch.split(",")]

    work = args.workdir or tempfile.mkdtemp(prefix="uamt-predict-bench-")
    os.makedirs(work, exist_ok=True)
    VNet = vnet_class()
    inputs, images = make_inputs(args, work)
    weights = args.weights or make_weights(VNet, images, work, args.n_filters)
    model = load_peer(VNet, weights, args.threads, args.n_filters)
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), MKL_NUM_THREADS=str(args.threads))

    results = {s: {"uamt_wall": [], "uamt_infer": [], "peer": []} for s in strides}
    compared = {}
    for r in range(args.rounds):
        for s in strides:
            out = os.path.join(work, "out-" + "x".join(map(str, s)))

            def ours():
                wall, infer = run_uamt(args, inputs, weights, s, out, env)
                results[s]["uamt_wall"].append(wall)
                results[s]["uamt_infer"].append(infer)

            def peer():
                total = 0.0
                for cid, img in images.items():
                    with torch.inference_mode():
                        t0 = time.perf_counter()
                        labels, prob = peer_segment(model, img, s, args.batch)
                        total += time.perf_counter() - t0
                    if r == 0:
                        compared.setdefault(s, {})[cid] = (labels, prob)
                results[s]["peer"].append(total)

            for f in ((ours, peer) if r % 2 == 0 else (peer, ours)):
                f()
            print(f"round {r + 1}/{args.rounds} stride {s}: uamt {results[s]['uamt_wall'][-1]:.2f} s "
                  f"(inference {results[s]['uamt_infer'][-1]:.2f} s), peer {results[s]['peer'][-1]:.2f} s",
                  file=sys.stderr, flush=True)
            if r == 0:
                maps = os.path.join(work, "maps-" + "x".join(map(str, s)))
                run_uamt(args, inputs, weights, s, maps, env, ("--maps", "--no-gzip"))
                for cid, (labels, prob) in compared[s].items():
                    ours_l = np.asarray(nib.load(os.path.join(out, cid + ".label.nii.gz")).dataobj).astype(np.uint8)
                    ours_p = np.asarray(nib.load(os.path.join(maps, cid + ".prob.nii")).dataobj).astype(np.float32)
                    maxdiff = float(np.abs(ours_p - prob[1]).max())
                    diff = ours_l != labels
                    tie = np.abs(prob[1] - prob[0]) <= 2 * maxdiff
                    compared[s][cid] = {
                        "voxels": int(labels.size),
                        "foreground": int(labels.sum()),
                        "max_probability_difference": maxdiff,
                        "mismatched": int((diff & ~tie).sum()),
                        "ties_differing": int((diff & tie).sum()),
                    }

    summary = []
    for s in strides:
        med = {k: statistics.median(v) for k, v in results[s].items()}
        spread = {k: (min(v), max(v)) for k, v in results[s].items()}
        summary.append({
            "stride": list(s),
            "uamt_wall_s": med["uamt_wall"],
            "uamt_inference_s": med["uamt_infer"],
            "peer_s": med["peer"],
            "speedup_command": med["peer"] / med["uamt_wall"],
            "speedup_inference": med["peer"] / med["uamt_infer"],
            "spread": spread,
            "labels": compared[s],
        })
    print(f"\n{platform.machine()}, {os.cpu_count()} cpus, threads {args.threads}, batch {args.batch}, "
          f"patch {args.patch}, {args.n_filters} filters, {args.rounds} rounds, cases {args.cases}, "
          f"torch {torch.__version__}")
    print("| stride | uamt predict (whole command) | uamt inference | PyTorch channels_last_3d | speed-up (command) "
          "| speed-up (inference) | label voxels differing | max probability difference |")
    print("|---|---|---|---|---|---|---|---|")
    for row in summary:
        mism = sum(c["mismatched"] for c in row["labels"].values())
        ties = sum(c["ties_differing"] for c in row["labels"].values())
        maxdiff = max(c["max_probability_difference"] for c in row["labels"].values())
        sp = row["spread"]
        print(f"| {'/'.join(map(str, row['stride']))} | {row['uamt_wall_s']:.2f} s ({sp['uamt_wall'][0]:.2f}-"
              f"{sp['uamt_wall'][1]:.2f}) | {row['uamt_inference_s']:.2f} s | {row['peer_s']:.2f} s "
              f"({sp['peer'][0]:.2f}-{sp['peer'][1]:.2f}) | {row['speedup_command']:.2f}x | "
              f"{row['speedup_inference']:.2f}x | {mism} (+{ties} ties) | {maxdiff:.1e} |")
    if args.json_out:
        with open(args.json_out, "w") as f:
            json.dump({"rounds": {"/".join(map(str, s)): v for s, v in results.items()}, "summary": summary}, f, indent=1)
    if not args.workdir:
        shutil.rmtree(work, ignore_errors=True)
    if any(c["mismatched"] for row in summary for c in row["labels"].values()):
        sys.exit("label maps differ (see the table)")


if __name__ == "__main__":
    main()
