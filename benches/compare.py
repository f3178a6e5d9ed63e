#!/usr/bin/env python3
"""The daemon against the reference PyTorch loop: same HDF5 cases, shapes and device, one run.

  benches/compare.py --data ../shared/data/la2018 --patch 32,32,16 --n-filters 4 \
      --iterations 10 --warmup 3 --rounds 3 [--device cpu] [--uamt target/release/uamt]

1. A working folder (a temporary one, or --workdir) gets a source folder of the chosen cases:
   the first --labelled IDs of the data's train.list and the next --unlabelled, linked to the
   original HDF5 files. The reference (benches/reference/uamt_reference.py) reads exactly those
   files, per sample, as the reference loader does; `uamt import h5` turns the same files into
   the daemon's dataset folder.
2. A config for the daemon with the same patch, n_filters, batch (2 + 2), T (8 as 4 x 2), seed
   and device; everything else is the recipe's default.
3. --rounds rounds, each running the reference and then `uamt bench pipeline --json` (the
   sequential Rust loop and every pipeline setting asked for) one after the other, so that slow
   drifts of a shared machine hit both sides alike.
4. A table: ms per iteration for each side (the median over rounds of each round's figure; the
   spread over rounds next to it), iterations per second and the speed-up over the reference.

What the figures are: `uamt bench` reports the wall time of its timed iterations divided by
their number (warm-up excluded); for the reference the same figure ("mean") is used for the
ratios, and the median iteration of each round is shown too. The reference's mean includes its
DataLoader respawning its workers every epoch (every 8 iterations with 16 labelled cases), a
cost the reference pays; its median does not.

Options for the daemon's side: --depths, --loader-workers, --lags (passed to `uamt bench`;
lag 0 is exactly the reference's order; lag 1 uses a teacher one step older), --threads
(libtorch threads per stage, also given to the reference as torch.set_num_threads).
--json-out F writes every measurement and the summary as JSON.
"""
import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
REFERENCE = os.path.join(HERE, "reference", "uamt_reference.py")


def ids_of(path):
    with open(path) as f:
        return [l.strip() for l in f if l.strip()]


def find_h5(root, case_id):
    for p in (os.path.join(root, "h5", case_id + ".h5"), os.path.join(root, case_id + ".h5"), os.path.join(root, case_id, "mri_norm2.h5")):
        if os.path.exists(p):
            return p
    raise FileNotFoundError(f"no HDF5 file for {case_id} under {root}")


def make_source(data, out, labelled, unlabelled):
    """The chosen cases, linked into `out/h5/`, with their train.list and an empty test.list."""
    ids = ids_of(os.path.join(data, "train.list"))
    if labelled + unlabelled > len(ids):
        sys.exit(f"{data}/train.list has {len(ids)} IDs, fewer than --labelled {labelled} + --unlabelled {unlabelled}")
    ids = ids[: labelled + unlabelled]
    os.makedirs(os.path.join(out, "h5"))
    for i in ids:
        os.symlink(os.path.abspath(find_h5(data, i)), os.path.join(out, "h5", i + ".h5"))
    with open(os.path.join(out, "train.list"), "w") as f:
        f.write("\n".join(ids) + "\n")
    open(os.path.join(out, "test.list"), "w").close()
    return ids


def daemon_config(path, dataset, workdir, a, precision):
    p = ", ".join(str(x) for x in a.patch)
    text = f"""# written by benches/compare.py
[data]
dataset = "{dataset}"
patch = [{p}]
labelled_bs = 2
unlabelled_bs = 2

[model]
n_filters = {a.n_filters}

[method]
kind = "uamt"
mc_passes = 8
mc_repeats = 2

[optim]
iterations = 6000
seed = {a.seed}

[device]
device = "{a.device}"
precision = "{precision}"
threads = {a.threads}
streams = {"true" if a.streams == "on" else "false"}

[checkpoint]
dir = "{workdir}/checkpoints"

[eval]
report_dir = "{workdir}/eval"
patch = [{p}]

[telemetry]
listen = ""
"""
    with open(path, "w") as f:
        f.write(text)


def run(cmd, env=None, may_fail=False):
    t0 = time.perf_counter()
    r = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    if r.returncode != 0:
        if may_fail:
            return None, r.stderr
        sys.stderr.write(r.stderr[-4000:])
        sys.exit(f"failed ({r.returncode}): {' '.join(cmd)}")
    return r.stdout, time.perf_counter() - t0


def json_lines(text):
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line.startswith("{"):
            out.append(json.loads(line))
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data", default=os.path.join(ROOT, "..", "shared", "data", "la2018"), help="UA-MT HDF5 folder with train.list")
    ap.add_argument("--labelled", type=int, default=16)
    ap.add_argument("--unlabelled", type=int, default=16)
    ap.add_argument("--patch", type=lambda s: [int(x) for x in s.split(",")], default=[32, 32, 16])
    ap.add_argument("--n-filters", type=int, default=4)
    ap.add_argument("--iterations", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--precision", default="fp32", help="the daemon's device.precision, or several (fp32,bf16): each is benched; "
                    "one the binary refuses is reported and skipped (the reference is always fp32)")
    ap.add_argument("--streams", choices=["on", "off"], default="on", help="the daemon's device.streams (a CUDA stream per stage)")
    ap.add_argument("--threads", type=int, default=0, help="torch threads for both sides (0: their defaults)")
    ap.add_argument("--seed", type=int, default=1337)
    ap.add_argument("--ref-workers", type=int, default=4, help="the reference's DataLoader workers (the reference: 4)")
    ap.add_argument("--depths", default="1,2")
    ap.add_argument("--loader-workers", default="1,2")
    ap.add_argument("--lags", default="0,1")
    ap.add_argument("--uamt", default=os.path.join(ROOT, "target", "release", "uamt"))
    ap.add_argument("--python", default=sys.executable, help="the Python that runs the reference")
    ap.add_argument("--workdir", help="keep the source, dataset and config here (default: a temporary folder, removed)")
    ap.add_argument("--skip-reference", action="store_true", help="time the daemon only")
    ap.add_argument("--ref-preload", action="store_true", help="also time the reference with its cases decompressed once up front "
                    "(not the reference's loader: tells the cost of its per-sample HDF5 reads from the rest)")
    ap.add_argument("--json-out")
    a = ap.parse_args(argv)

    work = a.workdir or tempfile.mkdtemp(prefix="uamt-compare-")
    os.makedirs(work, exist_ok=True)
    try:
        src, dataset = os.path.join(work, "src"), os.path.join(work, "dataset")
        for p in (src, dataset):
            shutil.rmtree(p, ignore_errors=True)
        make_source(a.data, src, a.labelled, a.unlabelled)
        _, t_import = run([a.uamt, "import", "h5", "--src", src, "--out", dataset, "--labelled", str(a.labelled)])
        precisions = a.precision.split(",")
        cfgs = {}
        for prec in precisions:
            cfgs[prec] = os.path.join(work, f"bench-{prec}.toml")
            daemon_config(cfgs[prec], dataset, work, a, prec)
        print(f"cases: {a.labelled} labelled + {a.unlabelled} unlabelled from {a.data} (import for the daemon: {t_import:.1f} s)")
        print(f"shapes: patch {a.patch}, n_filters {a.n_filters}, batch 2+2, T 8; device {a.device}; "
              f"{a.iterations} timed iterations after {a.warmup} warm-up, {a.rounds} rounds", flush=True)

        ref_cmd = [a.python, REFERENCE, "--data", src, "--labelled", str(a.labelled), "--patch", ",".join(map(str, a.patch)),
                   "--n-filters", str(a.n_filters), "--iterations", str(a.iterations), "--warmup", str(a.warmup),
                   "--device", a.device, "--workers", str(a.ref_workers), "--seed", str(a.seed), "--threads", str(a.threads), "--json"]
        bench_args = ["--iterations", str(a.iterations), "--warmup", str(a.warmup), "--depths", a.depths, "--workers", a.loader_workers, "--lags", a.lags, "--json"]
        refused = {}
        env = dict(os.environ, PYTHONWARNINGS="ignore")
        samples = {}  # setting -> [ms per round]
        ref_medians = []
        ref_runs = [] if a.skip_reference else [ref_cmd] + ([ref_cmd + ["--preload"]] if a.ref_preload else [])
        loads = []
        for r in range(a.rounds):
            loads.append(os.getloadavg()[0])
            print(f"  round {r + 1}: load average {loads[-1]:.1f} on {os.cpu_count()} CPUs", flush=True)
            for cmd in ref_runs:
                out, wall = run(cmd, env=env)
                res = json_lines(out)[-1]
                if not res["finite"]:
                    sys.exit(f"the reference produced non-finite losses: {res}")
                samples.setdefault(res["setting"], []).append(res["ms_per_iteration_mean"])
                if "--preload" not in cmd:
                    ref_medians.append(res["ms_per_iteration_median"])
                print(f"  round {r + 1}: {res['setting']} {res['ms_per_iteration_mean']:.1f} ms/it (median iteration {res['ms_per_iteration_median']:.1f}; run {wall:.0f} s)", flush=True)
            for prec in precisions:
                if prec in refused:
                    continue
                tag = "" if prec == "fp32" else f" [{prec}]"
                out, wall = run([a.uamt, "bench", "pipeline", "--config", cfgs[prec]] + bench_args, may_fail=prec != "fp32")
                if out is None:
                    errs = [l.strip() for l in wall.splitlines() if l.startswith("Error:") or "invalid setting" in l]
                    refused[prec] = errs[0] if errs else "failed (exit status non-zero)"
                    print(f"  round {r + 1}: daemon at {prec} refused or failed: {refused[prec]}", flush=True)
                    continue
                for line in json_lines(out):
                    samples.setdefault(line["setting"] + tag, []).append(line["ms_per_iteration"])
                seq = samples.get("sequential loop" + tag, [float("nan")])[-1]
                best = min((v[-1], k) for k, v in samples.items() if k.startswith("pipeline") and k.endswith(tag))
                print(f"  round {r + 1}: daemon{tag} sequential {seq:.1f} ms/it, best pipeline {best[0]:.1f} ({best[1]}; run {wall:.0f} s)", flush=True)

        med = {k: statistics.median(v) for k, v in samples.items()}
        ref = med.get("reference (PyTorch)")
        rows, best = [], {}
        if ref is not None:
            rows.append(("reference (PyTorch)", "reference (PyTorch)"))
        if "reference (PyTorch), cases preloaded" in med:
            rows.append(("reference, cases preloaded (not the reference)", "reference (PyTorch), cases preloaded"))
        for prec in precisions:
            tag = "" if prec == "fp32" else f" [{prec}]"
            if "sequential loop" + tag not in med:
                continue
            pipes = {k: v for k, v in med.items() if k.startswith("pipeline") and k.endswith(tag) and (tag or "[" not in k)}
            best_any = min(pipes, key=pipes.get) if pipes else None
            lag0 = {k: v for k, v in pipes.items() if k.startswith("pipeline lag 0")}
            best_lag0 = min(lag0, key=lag0.get) if lag0 else None
            best[prec] = {"best": best_any, "best_exact": best_lag0}
            rows.append((f"uamt sequential loop{tag}", "sequential loop" + tag))
            if best_lag0:
                rows.append((f"uamt best exact ({best_lag0[9:]})", best_lag0))
            if best_any and best_any != best_lag0:
                rows.append((f"uamt best ({best_any[9:]})", best_any))

        print()
        print(f"{'setting':<52} {'ms/it':>9} {'spread':>17} {'it/s':>7} {'vs reference':>13}")
        for name, key in rows:
            v = samples[key]
            ratio = f"{ref / med[key]:.2f}x" if ref else "-"
            print(f"{name:<52} {med[key]:>9.1f} {min(v):>8.1f}-{max(v):<8.1f} {1e3 / med[key]:>7.2f} {ratio:>13}")
        if ref_medians:
            print(f"{'(reference, median iteration)':<52} {statistics.median(ref_medians):>9.1f} {min(ref_medians):>8.1f}-{max(ref_medians):<8.1f}")
        for prec, why in refused.items():
            print(f"(daemon at {prec}: not measured: {why})")
        print("ms/it: median over rounds of each round's wall time per timed iteration; spread: min-max over rounds;"
              " vs reference: reference ms/it / this ms/it (> 1: faster than the reference)")
        if a.json_out:
            with open(a.json_out, "w") as f:
                json.dump({"args": vars(a), "samples_ms": samples, "reference_median_iteration_ms": ref_medians,
                           "median_ms": med, "best": best, "refused": refused,
                           "load_average_at_round_start": loads, "cpus": os.cpu_count()}, f, indent=1)
    finally:
        if not a.workdir:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
