"""Peer of benches/dist_allreduce.rs: what PyTorch's own data-parallel step spends on gradients,
torch.distributed with the Gloo backend, 2 processes on loopback.

For each parameter tensor of the full V-Net (16 filters, 9,448,866 parameters) a gradient-sized
tensor; per round the gradients are packed into buckets of at most BUCKET_MB (as
DistributedDataParallel packs them), each bucket divided by the world size, all-reduced and
unpacked. Prints one JSON line: the median seconds per round over ROUNDS after WARMUP.

Usage: allreduce_peer.py ROUNDS WARMUP BUCKET_MB SHAPES_JSON
"""
import json
import os
import socket
import statistics
import sys
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def worker(rank, port, rounds, warmup, bucket_bytes, shapes, out):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    grads = [torch.randn(s) for s in shapes]
    buckets, cur, size = [], [], 0
    for i, g in enumerate(grads):
        b = g.numel() * 4
        if cur and size + b > bucket_bytes:
            buckets.append(cur)
            cur, size = [], 0
        cur.append(i)
        size += b
    buckets.append(cur)
    times = []
    for r in range(rounds + warmup):
        dist.barrier()
        t = time.perf_counter()
        for bucket in buckets:
            parts = [grads[i] for i in bucket]
            flat = torch.cat([p.reshape(-1) for p in parts])
            flat.div_(2)
            dist.all_reduce(flat)
            at = 0
            for p in parts:
                n = p.numel()
                p.copy_(flat[at:at + n].view_as(p))
                at += n
        if r >= warmup:
            times.append(time.perf_counter() - t)
    if rank == 0:
        with open(out, "w") as f:
            json.dump({"median_s": statistics.median(times), "rounds": rounds}, f)
    dist.destroy_process_group()


def main():
    rounds, warmup, bucket_mb = int(sys.argv[1]), int(sys.argv[2]), float(sys.argv[3])
    shapes = json.loads(sys.argv[4])
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = os.path.join(os.environ.get("TMPDIR", "/tmp"), f"allreduce_peer_{os.getpid()}.json")
    mp.spawn(worker, args=(port, rounds, warmup, int(bucket_mb * 1024 * 1024), shapes, out), nprocs=2, join=True)
    with open(out) as f:
        print(f.read())
    os.remove(out)


if __name__ == "__main__":
    main()
