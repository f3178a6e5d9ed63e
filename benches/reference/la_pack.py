"""Moves a few LA cases to a machine without ../shared, and makes UA-MT HDF5 folders there.

  la_pack.py pack   --src ../shared/data/la2018 --out .gpu-data --cases 10
  la_pack.py unpack --src .gpu-data --out /tmp/la-h5 [--labelled 16 --unlabelled 64]
  la_pack.py synth  --out /tmp/synth-h5 [--cases 8 --size 176,144,88]

pack: the first --cases IDs of train.list, each as `<ID>.npz` holding the image as uint8 codes
into its table of distinct values (an LA image has at most 256 distinct float32 values, 245 at
most on the 100 cases, so this is EXACT, not the 8-bit scale/offset approximation), the label,
and the HDF5 chunk shapes and gzip level of the original; ~1.6 MB a case with zlib.

unpack: writes `h5/<ID>.h5` exactly as the originals are stored (image float32 and label uint8,
gzip at the original level, the original chunks), so the reference loader decompresses the same
bytes per sample, plus `train.list` (labelled IDs first) and an empty `test.list`. Asked for more
cases than were packed, it cycles through them under new IDs (`<ID>r<k>`, hard links to the same
file): per-sample cost and the epoch structure (16 labelled -> a DataLoader epoch of 8
iterations) stay as on the full data set.

synth: LA-sized synthetic cases (a bright ellipsoid in noise, z-scored) in the same layout, for a
machine without any packed data.
"""
import argparse
import json
import os
import sys

import h5py
import numpy as np


def ids_of(path):
    with open(path) as f:
        return [l.strip() for l in f if l.strip()]


def find_h5(root, case_id):
    for p in (os.path.join(root, "h5", case_id + ".h5"), os.path.join(root, case_id + ".h5"), os.path.join(root, case_id, "mri_norm2.h5")):
        if os.path.exists(p):
            return p
    raise FileNotFoundError(f"no HDF5 file for {case_id} under {root}")


def pack(args):
    ids = ids_of(os.path.join(args.src, "train.list"))[: args.cases]
    os.makedirs(args.out, exist_ok=True)
    total = 0
    for case_id in ids:
        with h5py.File(find_h5(args.src, case_id), "r") as f:
            image, label = f["image"][:], f["label"][:]
            meta = {k: (list(f[k].chunks) if f[k].chunks else [], f[k].compression_opts or 0) for k in ("image", "label")}
        table, codes = np.unique(image, return_inverse=True)
        if len(table) > 256:
            sys.exit(f"{case_id}: {len(table)} distinct values, more than 8-bit codes hold")
        codes = codes.reshape(image.shape).astype(np.uint8)
        assert np.array_equal(table[codes], image)
        p = os.path.join(args.out, case_id + ".npz")
        np.savez_compressed(p, codes=codes, table=table.astype(np.float32), label=label,
                            image_chunks=np.array(meta["image"][0], dtype=np.int64), image_gzip=np.array(meta["image"][1]),
                            label_chunks=np.array(meta["label"][0], dtype=np.int64), label_gzip=np.array(meta["label"][1]))
        total += os.path.getsize(p)
    with open(os.path.join(args.out, "cases.list"), "w") as f:
        f.write("\n".join(ids) + "\n")
    print(f"packed {len(ids)} cases into {args.out}: {total / 1e6:.1f} MB")


def write_h5(path, image, label, image_chunks=True, label_chunks=True, image_gzip=4, label_gzip=4):
    with h5py.File(path, "w") as f:
        f.create_dataset("image", data=image.astype(np.float32), compression="gzip", compression_opts=image_gzip, chunks=image_chunks)
        f.create_dataset("label", data=label.astype(np.uint8), compression="gzip", compression_opts=label_gzip, chunks=label_chunks)


def write_lists(out, ids):
    with open(os.path.join(out, "train.list"), "w") as f:
        f.write("\n".join(ids) + "\n")
    open(os.path.join(out, "test.list"), "w").close()


def unpack(args):
    packed = ids_of(os.path.join(args.src, "cases.list"))
    h5dir = os.path.join(args.out, "h5")
    os.makedirs(h5dir, exist_ok=True)
    for case_id in packed:
        z = np.load(os.path.join(args.src, case_id + ".npz"))
        chunks = lambda k: tuple(int(c) for c in z[k]) or None
        write_h5(os.path.join(h5dir, case_id + ".h5"), z["table"][z["codes"]], z["label"],
                 chunks("image_chunks"), chunks("label_chunks"), int(z["image_gzip"]) or None, int(z["label_gzip"]) or None)
    n = args.labelled + args.unlabelled if args.labelled + args.unlabelled > 0 else len(packed)
    ids = []
    for i in range(n):
        base, k = packed[i % len(packed)], i // len(packed)
        if k == 0:
            ids.append(base)
        else:
            ids.append(f"{base}r{k}")
            dst = os.path.join(h5dir, ids[-1] + ".h5")
            if not os.path.exists(dst):
                os.link(os.path.join(h5dir, base + ".h5"), dst)
    write_lists(args.out, ids)
    print(f"unpacked {len(packed)} cases into {args.out} as {len(ids)} training IDs")


def synth(args):
    rng = np.random.default_rng(args.seed)
    h5dir = os.path.join(args.out, "h5")
    os.makedirs(h5dir, exist_ok=True)
    X, Y, Z = args.size
    g = np.meshgrid(*[np.linspace(-1, 1, s, dtype=np.float32) for s in (X, Y, Z)], indexing="ij")
    ids = []
    for i in range(args.cases):
        c = 0.2 * rng.standard_normal(3)
        r2 = (g[0] - c[0]) ** 2 / 0.3 + (g[1] - c[1]) ** 2 / 0.25 + (g[2] - c[2]) ** 2 / 0.4
        label = (r2 < 1).astype(np.uint8)
        image = label * 2.0 - 1.0 + 0.7 * rng.standard_normal((X, Y, Z)).astype(np.float32)
        image = ((image - image.mean()) / image.std()).astype(np.float32)
        ids.append(f"synth_{i:03d}")
        write_h5(os.path.join(h5dir, ids[-1] + ".h5"), image, label)
    write_lists(args.out, ids)
    print(f"wrote {len(ids)} synthetic cases of {args.size} into {args.out}")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("pack")
    p.add_argument("--src", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--cases", type=int, default=10)
    p = sub.add_parser("unpack")
    p.add_argument("--src", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--labelled", type=int, default=16)
    p.add_argument("--unlabelled", type=int, default=64)
    p = sub.add_parser("synth")
    p.add_argument("--out", required=True)
    p.add_argument("--cases", type=int, default=8)
    p.add_argument("--size", type=lambda s: [int(x) for x in s.split(",")], default=[176, 144, 88])
    p.add_argument("--seed", type=int, default=7)
    args = ap.parse_args(argv)
    {"pack": pack, "unpack": unpack, "synth": synth}[args.cmd](args)


if __name__ == "__main__":
    main()
