"""The peer: the reference UA-MT training loop, reimplemented in PyTorch for timing.

Our own Python, written from shared/docs/uamt-recipe.md (no code copied from the published
repository). It keeps the reference's settings, since it stands for what a user would otherwise
run, not for the fastest PyTorch loop:

- fp32 with PyTorch's defaults (no autocast, no channels-last), `cudnn.deterministic = True`,
  `cudnn.benchmark = False`;
- a torch DataLoader over a Dataset that opens the case's HDF5 file and decompresses the whole
  image and label for EVERY sample, then RandomRotFlip and RandomCrop (with the reference's
  padding rule) in numpy; a batch sampler with TwoStreamBatchSampler's semantics (labelled
  indices first, one permutation of the labelled cases per epoch, an endless reshuffled stream of
  unlabelled ones, a remainder dropped); `num_workers` 4, `pin_memory` on CUDA, and the loader
  re-iterated (its workers respawned) every epoch, as the reference's epoch loop does;
- batch 2 labelled + 2 unlabelled, student forward on all 4, one noisy teacher pass on the 2
  unlabelled patches, T = 8 more as 4 passes of the 2 patches repeated twice written into a
  preallocated `preds` buffer (allocated on the host, then moved, every iteration), entropy of
  the mean softmax, CE + Dice, masked softmax-MSE consistency, SGD, EMA of the parameters;
- every iteration: the scalars the reference hands its SummaryWriter read back with `.item()`,
  and one `logging.info` line; the learning-rate drop every 2500 iterations.

Left out because they do not fall in a short timed window: the checkpoint every 1000 iterations
and the image grid written every 50 iterations (its scalars are kept).

Data: a folder in UA-MT's layout, `h5/<ID>.h5`, `<ID>.h5` or `<ID>/mri_norm2.h5`, with
`train.list`; the first `--labelled` IDs are labelled, the rest unlabelled.

Usage:
  uamt_reference.py --data ../shared/data/la2018 --patch 48,48,32 --n-filters 8 \
      --iterations 10 --warmup 3 [--device cpu|cuda] [--json]

Prints one line per timed run: median and mean ms per iteration after the warm-up (the wall
time of each iteration, the wait for the DataLoader included; `.item()` synchronises the GPU
every iteration, as in the reference, so wall time is device time). With --json, one JSON
object instead. `--print-losses` adds each iteration's losses (for the tests). `--preload`
(not the reference's behaviour) decompresses each case once up front, to separate the loader's
cost from the rest of the loop.
"""
import argparse
import importlib.util
import itertools
import json
import logging
import math
import os
import random
import statistics
import sys
import time

import h5py
import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset, Sampler

HERE = os.path.dirname(os.path.abspath(__file__))
ORACLE = os.path.join(HERE, "..", "..", "tests", "oracle", "uamt_oracle.py")


def load_vnet():
    """The V-Net of tests/oracle/uamt_oracle.py (built per the recipe with torch.nn; the golden
    tests hold the daemon's V-Net equal to it). Without masks it applies nn.Dropout3d, as the
    reference does."""
    spec = importlib.util.spec_from_file_location("uamt_oracle", ORACLE)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.VNet


# ---------------------------------------------------------------- data, as the reference loads it
def case_path(root, case_id):
    for p in (os.path.join(root, "h5", case_id + ".h5"), os.path.join(root, case_id + ".h5"),
              os.path.join(root, case_id, "mri_norm2.h5")):
        if os.path.exists(p):
            return p
    raise FileNotFoundError(f"no HDF5 file for case {case_id} under {root}")


class RandomRotFlip:
    """rot90 by k in 0..3 in the (x, y) plane, then a flip along x or y."""

    def __call__(self, sample):
        image, label = sample["image"], sample["label"]
        k = np.random.randint(0, 4)
        image, label = np.rot90(image, k), np.rot90(label, k)
        axis = np.random.randint(0, 2)
        image, label = np.flip(image, axis=axis).copy(), np.flip(label, axis=axis).copy()
        return {"image": image, "label": label}


class RandomCrop:
    """A random patch; if ANY axis is <= the patch, every axis is zero-padded first by
    max((patch - size) // 2 + 3, 0) per side."""

    def __init__(self, size):
        self.size = size

    def __call__(self, sample):
        image, label = sample["image"], sample["label"]
        if any(s <= p for s, p in zip(label.shape, self.size)):
            pads = [(max((p - s) // 2 + 3, 0),) * 2 for s, p in zip(label.shape, self.size)]
            image = np.pad(image, pads, mode="constant", constant_values=0)
            label = np.pad(label, pads, mode="constant", constant_values=0)
        starts = [np.random.randint(0, s - p) for s, p in zip(label.shape, self.size)]
        sl = tuple(slice(a, a + p) for a, p in zip(starts, self.size))
        return {"image": image[sl], "label": label[sl]}


class ToTensor:
    def __call__(self, sample):
        image = sample["image"].reshape(1, *sample["image"].shape).astype(np.float32)
        return {"image": torch.from_numpy(image), "label": torch.from_numpy(sample["label"]).long()}


class LAHeart(Dataset):
    """One training case per index; every __getitem__ opens and decompresses the case's file."""

    def __init__(self, root, ids, transforms, preload=False):
        self.root, self.ids, self.transforms = root, ids, transforms
        self.cache = [self.read(i) for i in range(len(ids))] if preload else None

    def __len__(self):
        return len(self.ids)

    def read(self, idx):
        with h5py.File(case_path(self.root, self.ids[idx]), "r") as f:
            return {"image": f["image"][:], "label": f["label"][:]}

    def __getitem__(self, idx):
        sample = self.cache[idx] if self.cache is not None else self.read(idx)
        for t in self.transforms:
            sample = t(sample)
        return sample


def grouper(iterable, n):
    """Full groups of n; a remainder is dropped."""
    args = [iter(iterable)] * n
    return zip(*args)


class TwoStreamBatchSampler(Sampler):
    """Batches of `primary_bs` labelled indices (one permutation per epoch) followed by
    `secondary_bs` unlabelled ones (an endless stream of permutations, restarted per epoch)."""

    def __init__(self, primary, secondary, batch_size, secondary_bs):
        self.primary, self.secondary = primary, secondary
        self.secondary_bs = secondary_bs
        self.primary_bs = batch_size - secondary_bs

    def __iter__(self):
        primary_iter = np.random.permutation(self.primary)
        secondary_iter = itertools.chain.from_iterable(np.random.permutation(self.secondary) for _ in itertools.count())
        return (list(p) + list(s) for p, s in zip(grouper(primary_iter, self.primary_bs), grouper(secondary_iter, self.secondary_bs)))

    def __len__(self):
        return len(self.primary) // self.primary_bs


# ---------------------------------------------------------------- the method
def sigmoid_rampup(current, length):
    if length == 0:
        return 1.0
    phase = 1.0 - np.clip(current, 0.0, length) / length
    return float(np.exp(-5.0 * phase * phase))


def dice_loss(score, target):
    target = target.float()
    smooth = 1e-5
    intersect = torch.sum(score * target)
    y_sum = torch.sum(target * target)
    z_sum = torch.sum(score * score)
    return 1 - (2 * intersect + smooth) / (z_sum + y_sum + smooth)


def softmax_mse(student_logits, teacher_logits):
    return (F.softmax(student_logits, dim=1) - F.softmax(teacher_logits, dim=1)) ** 2


def update_ema(student, teacher, decay, step):
    alpha = min(1 - 1 / (step + 1), decay)
    for t, s in zip(teacher.parameters(), student.parameters()):
        t.data.mul_(alpha).add_(s.data, alpha=1 - alpha)


class Scalars:
    """Stands in for the reference's SummaryWriter: what it is handed is read back to the host
    (add_scalar calls .item() on a tensor)."""

    def __init__(self):
        self.last = {}

    def add_scalar(self, tag, value, step):
        self.last[tag] = value.item() if torch.is_tensor(value) else float(value)


def parse_triple(s):
    v = [int(x) for x in s.split(",")]
    if len(v) != 3:
        raise argparse.ArgumentTypeError(f"expected X,Y,Z, got {s}")
    return v


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data", required=True, help="UA-MT HDF5 folder with train.list")
    ap.add_argument("--labelled", type=int, default=16, help="the first N training IDs are labelled")
    ap.add_argument("--patch", type=parse_triple, default=[112, 112, 80])
    ap.add_argument("--n-filters", type=int, default=16)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--labelled-bs", type=int, default=2)
    ap.add_argument("--T", type=int, default=8, help="Monte-Carlo passes (in T/2 forwards of the unlabelled patches repeated twice)")
    ap.add_argument("--iterations", type=int, default=20, help="timed iterations")
    ap.add_argument("--warmup", type=int, default=3, help="untimed iterations first")
    ap.add_argument("--max-iterations", type=int, default=6000, help="for the threshold ramp")
    ap.add_argument("--base-lr", type=float, default=0.01)
    ap.add_argument("--seed", type=int, default=1337)
    ap.add_argument("--workers", type=int, default=4, help="DataLoader workers (the reference: 4)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0: PyTorch's default)")
    ap.add_argument("--preload", action="store_true", help="NOT the reference: decompress every case once up front (augmentation "
                    "and crop still per sample), to tell the loader's cost from the rest")
    ap.add_argument("--log", default=os.devnull, help="the logging file (the reference logs to a file)")
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--print-losses", action="store_true")
    args = ap.parse_args(argv)

    if args.threads > 0:
        torch.set_num_threads(args.threads)
    # The reference's settings.
    torch.backends.cudnn.benchmark = False
    torch.backends.cudnn.deterministic = True
    random.seed(args.seed)
    np.random.seed(args.seed)
    torch.manual_seed(args.seed)
    if torch.cuda.is_available():
        torch.cuda.manual_seed(args.seed)
    logging.basicConfig(filename=args.log, level=logging.INFO, format="[%(asctime)s.%(msecs)03d] %(message)s")
    device = torch.device(args.device)
    patch, lbs, T = args.patch, args.labelled_bs, args.T
    n_classes = 2

    with open(os.path.join(args.data, "train.list")) as f:
        ids = [l.strip() for l in f if l.strip()]
    if args.labelled >= len(ids) or args.labelled < lbs:
        sys.exit(f"need more than --labelled {args.labelled} >= --labelled-bs {lbs} training cases, {len(ids)} listed")
    db = LAHeart(args.data, ids, [RandomRotFlip(), RandomCrop(patch), ToTensor()], preload=args.preload)
    sampler = TwoStreamBatchSampler(list(range(args.labelled)), list(range(args.labelled, len(ids))), args.batch_size, args.batch_size - lbs)

    def worker_init_fn(worker_id):
        random.seed(args.seed + worker_id)

    loader = DataLoader(db, batch_sampler=sampler, num_workers=args.workers, pin_memory=device.type == "cuda", worker_init_fn=worker_init_fn)

    VNet = load_vnet()
    student = VNet(n_channels=1, n_classes=n_classes, nf=args.n_filters, has_dropout=True).to(device)
    teacher = VNet(n_channels=1, n_classes=n_classes, nf=args.n_filters, has_dropout=True).to(device)
    for p in teacher.parameters():
        p.detach_()
    student.train()
    teacher.train()
    optimizer = torch.optim.SGD(student.parameters(), lr=args.base_lr, momentum=0.9, weight_decay=0.0001)
    writer = Scalars()

    total = args.warmup + args.iterations
    times, losses = [], []
    iter_num, lr = 0, args.base_lr
    t_prev = time.perf_counter()
    done = False
    while not done:
        for batch in loader:  # a new iterator (fresh workers) every epoch
            volume_batch, label_batch = batch["image"].to(device), batch["label"].to(device)
            unlabelled = volume_batch[lbs:]
            noise = torch.clamp(torch.randn_like(unlabelled) * 0.1, -0.2, 0.2)
            outputs = student(volume_batch)
            with torch.no_grad():
                ema_output = teacher(unlabelled + noise)
            repeated = unlabelled.repeat(2, 1, 1, 1, 1)
            stride = repeated.shape[0] // 2
            preds = torch.zeros([stride * T, n_classes, *patch]).to(device)
            for i in range(T // 2):
                inputs = repeated + torch.clamp(torch.randn_like(repeated) * 0.1, -0.2, 0.2)
                with torch.no_grad():
                    preds[2 * stride * i:2 * stride * (i + 1)] = teacher(inputs)
            preds = F.softmax(preds, dim=1).reshape(T, stride, n_classes, *patch).mean(dim=0)
            uncertainty = -1.0 * torch.sum(preds * torch.log(preds + 1e-6), dim=1, keepdim=True)

            loss_ce = F.cross_entropy(outputs[:lbs], label_batch[:lbs])
            outputs_soft = F.softmax(outputs, dim=1)
            loss_dice = dice_loss(outputs_soft[:lbs, 1], label_batch[:lbs] == 1)
            supervised = 0.5 * (loss_ce + loss_dice)
            weight = 0.1 * sigmoid_rampup(iter_num // 150, 40.0)
            dist = softmax_mse(outputs[lbs:], ema_output)
            threshold = (0.75 + 0.25 * sigmoid_rampup(iter_num, args.max_iterations)) * np.log(2)
            mask = (uncertainty < threshold).float()
            consistency_dist = torch.sum(mask * dist) / (2 * torch.sum(mask) + 1e-16)
            loss = supervised + weight * consistency_dist

            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            update_ema(student, teacher, 0.99, iter_num)
            iter_num += 1

            writer.add_scalar("uncertainty/mean", uncertainty[0, 0].mean(), iter_num)
            writer.add_scalar("uncertainty/max", uncertainty[0, 0].max(), iter_num)
            writer.add_scalar("uncertainty/min", uncertainty[0, 0].min(), iter_num)
            writer.add_scalar("uncertainty/mask_per", torch.sum(mask) / mask.numel(), iter_num)
            writer.add_scalar("uncertainty/threshold", threshold, iter_num)
            writer.add_scalar("lr", lr, iter_num)
            writer.add_scalar("loss/loss", loss, iter_num)
            writer.add_scalar("loss/loss_seg", loss_ce, iter_num)
            writer.add_scalar("loss/loss_seg_dice", loss_dice, iter_num)
            writer.add_scalar("train/consistency_loss", weight * consistency_dist, iter_num)
            writer.add_scalar("train/consistency_weight", weight, iter_num)
            writer.add_scalar("train/consistency_dist", consistency_dist, iter_num)
            logging.info("iteration %d : loss : %f cons_dist: %f, loss_weight: %f" % (iter_num, loss.item(), consistency_dist.item(), weight))
            if iter_num % 2500 == 0:
                lr = args.base_lr * 0.1 ** (iter_num // 2500)
                for g in optimizer.param_groups:
                    g["lr"] = lr

            t = time.perf_counter()
            times.append(t - t_prev)
            t_prev = t
            s = writer.last
            losses.append({"iteration": iter_num, "loss": s["loss/loss"], "ce": s["loss/loss_seg"], "dice": s["loss/loss_seg_dice"],
                           "supervised": 0.5 * (s["loss/loss_seg"] + s["loss/loss_seg_dice"]), "consistency": s["train/consistency_dist"],
                           "mask_fraction": s["uncertainty/mask_per"]})
            if args.print_losses:
                print(json.dumps(losses[-1]), flush=True)
            if iter_num >= total:
                done = True
                break

    timed = [1e3 * t for t in times[args.warmup:]]
    finite = all(math.isfinite(v) for l in losses for v in l.values())
    result = {
        "setting": "reference (PyTorch)" + (", cases preloaded" if args.preload else ""),
        "ms_per_iteration_median": statistics.median(timed),
        "ms_per_iteration_mean": statistics.fmean(timed),
        "ms_per_iteration_min": min(timed),
        "ms_per_iteration_max": max(timed),
        "iterations": args.iterations, "warmup": args.warmup,
        "device": str(device), "threads": torch.get_num_threads(), "workers": args.workers,
        "patch": patch, "n_filters": args.n_filters, "T": T, "batch": [lbs, args.batch_size - lbs],
        "torch": torch.__version__, "finite": finite, "first": losses[0], "last": losses[-1],
    }
    if args.json:
        print(json.dumps(result), flush=True)
    else:
        print(f"reference loop: patch {patch}, n_filters {args.n_filters}, batch {lbs}+{args.batch_size - lbs}, T {T}, "
              f"device {device}, {torch.get_num_threads()} threads, {args.workers} loader workers: "
              f"{result['ms_per_iteration_median']:.1f} ms/iteration median ({result['ms_per_iteration_mean']:.1f} mean) "
              f"over {args.iterations} after {args.warmup} warm-up; losses finite: {finite}")
    return 0 if finite else 1


if __name__ == "__main__":
    sys.exit(main())
