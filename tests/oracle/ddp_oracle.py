"""PyTorch DistributedDataParallel oracle for uamt's data-parallel training (tests/dist.rs).

Two processes with the Gloo backend on loopback train the V-Net of uamt_oracle.py with UA-MT,
then with Mean Teacher (the same without the Monte-Carlo passes and the mask), for 3 steps, the student wrapped in torch.nn.parallel.DistributedDataParallel (its defaults:
gradients averaged over the ranks, BatchNorm buffers broadcast from rank 0 before each forward
pass), the EMA teacher updated from the student on each rank. Each rank has its own batch and
its own randomness (noise, dropout masks), drawn here beforehand so the Rust test can feed the
same. Writes ddp_uamt.npz and ddp_mean_teacher.npz: the initial weights, each rank's inputs and randomness (r0., r1.),
each rank's losses per step, momentum buffers after the first step (its averaged gradients plus
weight decay) and final student and teacher.

Usage: ddp_oracle.py OUT_DIR
"""
import os
import socket
import sys

import numpy as np
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from uamt_oracle import (VNet, blob_batch, ema_update, masked_consistency, masks, noise,  # noqa: E402
                         sigmoid_rampup, state, supervised_terms, uamt_mask)

WORLD, STEPS = 2, 3
NF, SHAPE, LBS, B, T, REPS = 4, (32, 32, 16), 2, 4, 8, 2
CFG = dict(max_iter=4, lr_step=2, consistency_interval=1, consistency_rampup=2.0, consistency=0.1,
           ema_decay=0.99, base_lr=0.01, lr_gamma=0.1)


def draw(rank):
    """Rank `rank`'s batch and the randomness of its steps."""
    gen = torch.Generator().manual_seed(30 + rank)
    images, labels_all = blob_batch(B, SHAPE, gen)
    d = {"images": images, "labels": labels_all[:LBS]}
    for it in range(STEPS):
        r = f"rnd.{it}"
        d[f"{r}.student.x5"], d[f"{r}.student.x9"] = masks(NF, B, gen)
        unl = B - LBS
        d[f"{r}.teacher.noise"] = noise((unl, 1, *SHAPE), gen)
        d[f"{r}.teacher.x5"], d[f"{r}.teacher.x9"] = masks(NF, unl, gen)
        for k in range(T // REPS):
            d[f"{r}.mc.{k}.noise"] = noise((unl * REPS, 1, *SHAPE), gen)
            d[f"{r}.mc.{k}.x5"], d[f"{r}.mc.{k}.x9"] = masks(NF, unl * REPS, gen)
    return d


def worker(rank, port, init, inputs, out, method):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD)
    student, teacher = VNet(nf=NF), VNet(nf=NF)
    student.load_state_dict(init["student"])
    teacher.load_state_dict(init["teacher"])
    for prm in teacher.parameters():
        prm.detach_()
    student.train()
    teacher.train()
    ddp = torch.nn.parallel.DistributedDataParallel(student)
    opt = torch.optim.SGD(ddp.parameters(), lr=CFG["base_lr"], momentum=0.9, weight_decay=1e-4)
    d = inputs[rank]
    images, labels = d["images"], d["labels"]
    res = {}
    lr = CFG["base_lr"]
    for it in range(STEPS):
        r = f"rnd.{it}"
        outputs = ddp(images, (d[f"{r}.student.x5"], d[f"{r}.student.x9"]))
        ce, dice, sup = supervised_terms(outputs, labels, LBS)
        weight = CFG["consistency"] * sigmoid_rampup(it // CFG["consistency_interval"], CFG["consistency_rampup"])
        unl = images[LBS:]
        with torch.no_grad():
            target = teacher(unl + d[f"{r}.teacher.noise"], (d[f"{r}.teacher.x5"], d[f"{r}.teacher.x9"]))
            if method == "uamt":
                rep = unl.repeat(REPS, 1, 1, 1, 1)
                preds = [teacher(rep + d[f"{r}.mc.{k}.noise"], (d[f"{r}.mc.{k}.x5"], d[f"{r}.mc.{k}.x9"]))
                         for k in range(T // REPS)]
        if method == "uamt":
            mask, _ = uamt_mask(preds, T, it, CFG["max_iter"])
        else:
            mask = torch.ones_like(target[:, :1])
        cons = masked_consistency(outputs[LBS:], target, mask)
        loss = sup + weight * cons
        opt.zero_grad()
        loss.backward()
        opt.step()
        if it == 0:
            # After one step each momentum buffer is that step's averaged gradient (+ decay).
            for name, prm in student.named_parameters():
                res[f"momentum0.{name}"] = opt.state[prm]["momentum_buffer"].clone().numpy()
        ema_update(teacher, student, CFG["ema_decay"], it)
        o = f"out.{it}"
        for k, v in dict(loss=loss, supervised=sup, ce=ce, dice=dice, consistency=cons, mask_fraction=mask.mean()).items():
            res[f"{o}.{k}"] = np.array([float(v.detach())])
        res[f"{o}.lr"] = np.array([lr])
        if (it + 1) % CFG["lr_step"] == 0:
            lr = CFG["base_lr"] * CFG["lr_gamma"] ** ((it + 1) // CFG["lr_step"])
            for g in opt.param_groups:
                g["lr"] = lr
    res.update(state("student.final", student))
    res.update(state("teacher.final", teacher))
    np.savez(os.path.join(out, f"{method}_rank{rank}.npz"), **res)
    dist.destroy_process_group()


def main():
    out = sys.argv[1]
    os.makedirs(out, exist_ok=True)
    torch.manual_seed(20)
    student, teacher = VNet(nf=NF), VNet(nf=NF)
    init = {"student": student.state_dict(), "teacher": teacher.state_dict()}
    inputs = [draw(r) for r in range(WORLD)]
    for method in ("uamt", "mean_teacher"):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        mp.spawn(worker, args=(port, init, inputs, out, method), nprocs=WORLD, join=True)
        d = {**state("student.init", student), **state("teacher.init", teacher)}
        d.update({f"cfg.{k}": np.array([float(v)]) for k, v in CFG.items()})
        for r in range(WORLD):
            d.update({f"r{r}.{k}": v.numpy() for k, v in inputs[r].items()})
            with np.load(os.path.join(out, f"{method}_rank{r}.npz")) as f:
                d.update({f"r{r}.{k}": f[k] for k in f.files})
        np.savez(os.path.join(out, f"ddp_{method}.npz"), **d)
    print(f"fixture written to {out}")


if __name__ == "__main__":
    main()
