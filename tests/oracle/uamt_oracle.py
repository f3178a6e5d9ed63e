"""PyTorch oracle for uamt's golden tests.

Our own Python, written from shared/docs/uamt-recipe.md: a V-Net built per the recipe with
torch.nn, the UA-MT losses and one full training step with torch.optim.SGD. It writes fixtures
(inputs, weights, the randomness used, and PyTorch's results) as .npz files that the Rust tests
load, run through uamt, and compare.

Usage: uamt_oracle.py OUT_DIR
"""
import math
import os
import sys

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

torch.backends.cudnn.deterministic = True


# ---------------------------------------------------------------- network (per the recipe)
def conv_bn_relu(n, cin, cout):
    layers = []
    for i in range(n):
        layers += [nn.Conv3d(cin if i == 0 else cout, cout, 3, padding=1), nn.BatchNorm3d(cout), nn.ReLU(inplace=True)]
    return layers


class Seq(nn.Module):
    """Holds its layers under `.conv`, as the reference blocks do."""

    def __init__(self, layers):
        super().__init__()
        self.conv = nn.Sequential(*layers)

    def forward(self, x):
        return self.conv(x)


def down(cin, cout):
    return Seq([nn.Conv3d(cin, cout, 2, stride=2, padding=0), nn.BatchNorm3d(cout), nn.ReLU(inplace=True)])


def up(cin, cout):
    return Seq([nn.ConvTranspose3d(cin, cout, 2, stride=2, padding=0), nn.BatchNorm3d(cout), nn.ReLU(inplace=True)])


class VNet(nn.Module):
    def __init__(self, n_channels=1, n_classes=2, nf=16, has_dropout=True):
        super().__init__()
        self.has_dropout = has_dropout
        self.block_one = Seq(conv_bn_relu(1, n_channels, nf))
        self.block_one_dw = down(nf, 2 * nf)
        self.block_two = Seq(conv_bn_relu(2, 2 * nf, 2 * nf))
        self.block_two_dw = down(2 * nf, 4 * nf)
        self.block_three = Seq(conv_bn_relu(3, 4 * nf, 4 * nf))
        self.block_three_dw = down(4 * nf, 8 * nf)
        self.block_four = Seq(conv_bn_relu(3, 8 * nf, 8 * nf))
        self.block_four_dw = down(8 * nf, 16 * nf)
        self.block_five = Seq(conv_bn_relu(3, 16 * nf, 16 * nf))
        self.block_five_up = up(16 * nf, 8 * nf)
        self.block_six = Seq(conv_bn_relu(3, 8 * nf, 8 * nf))
        self.block_six_up = up(8 * nf, 4 * nf)
        self.block_seven = Seq(conv_bn_relu(3, 4 * nf, 4 * nf))
        self.block_seven_up = up(4 * nf, 2 * nf)
        self.block_eight = Seq(conv_bn_relu(2, 2 * nf, 2 * nf))
        self.block_eight_up = up(2 * nf, nf)
        self.block_nine = Seq(conv_bn_relu(1, nf, nf))
        self.out_conv = nn.Conv3d(nf, n_classes, 1, padding=0)
        self.dropout = nn.Dropout3d(p=0.5, inplace=False)

    def drop(self, x, mask):
        if not (self.has_dropout and self.training):
            return x
        return x * mask if mask is not None else self.dropout(x)

    def forward(self, x, masks=None):
        m5, m9 = masks if masks is not None else (None, None)
        x1 = self.block_one(x)
        x2 = self.block_two(self.block_one_dw(x1))
        x3 = self.block_three(self.block_two_dw(x2))
        x4 = self.block_four(self.block_three_dw(x3))
        x5 = self.drop(self.block_five(self.block_four_dw(x4)), m5)
        x6 = self.block_six(self.block_five_up(x5) + x4)
        x7 = self.block_seven(self.block_six_up(x6) + x3)
        x8 = self.block_eight(self.block_seven_up(x7) + x2)
        x9 = self.drop(self.block_nine(self.block_eight_up(x8) + x1), m9)
        return self.out_conv(x9)


# ---------------------------------------------------------------- the method (per the recipe)
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


def uncertainty(logits, passes):
    p = F.softmax(logits, dim=1)
    p = p.reshape(passes, logits.shape[0] // passes, *logits.shape[1:]).mean(dim=0)
    return -1.0 * torch.sum(p * torch.log(p + 1e-6), dim=1, keepdim=True)


def supervised_terms(outputs, labels, lbs):
    """Cross-entropy, Dice and their mean on the labelled head of a batch's logits."""
    ce = F.cross_entropy(outputs[:lbs], labels)
    soft = F.softmax(outputs, dim=1)
    dice = dice_loss(soft[:lbs, 1], labels == 1)
    return ce, dice, 0.5 * (ce + dice)


def uamt_mask(preds, passes, it, max_iter):
    """The mask of voxels whose Monte-Carlo uncertainty is under the ramped threshold."""
    u = uncertainty(torch.cat(preds), passes)
    thr = (0.75 + 0.25 * sigmoid_rampup(it, max_iter)) * np.log(2)
    return (u < thr).float(), thr


def masked_consistency(student_unl, target, mask):
    """Mean squared softmax difference over the masked voxels (both classes)."""
    dist = (F.softmax(student_unl, dim=1) - F.softmax(target, dim=1)) ** 2
    return torch.sum(mask * dist) / (2 * torch.sum(mask) + 1e-16)


def ema_update(teacher, student, decay, step):
    alpha = min(1 - 1 / (step + 1), decay)
    for t, s in zip(teacher.parameters(), student.parameters()):
        t.data.mul_(alpha).add_(s.data, alpha=1 - alpha)


def perturb(net, gen):
    """Non-trivial BatchNorm affine and running statistics, so eval mode is tested for real."""
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, nn.BatchNorm3d):
                m.weight.copy_(1 + 0.2 * torch.randn(m.weight.shape, generator=gen))
                m.bias.copy_(0.1 * torch.randn(m.bias.shape, generator=gen))
                m.running_mean.copy_(0.1 * torch.randn(m.running_mean.shape, generator=gen))
                m.running_var.copy_(1 + 0.5 * torch.rand(m.running_var.shape, generator=gen))


def state(prefix, net):
    return {f"{prefix}.{k}": v.detach().clone().numpy() for k, v in net.state_dict().items()}


def masks(nf, n, gen):
    keep = 0.5
    m5 = (torch.rand(n, 16 * nf, 1, 1, 1, generator=gen) < keep).float() / keep
    m9 = (torch.rand(n, nf, 1, 1, 1, generator=gen) < keep).float() / keep
    return m5, m9


def noise(shape, gen, std=0.1, clip=0.2):
    return torch.clamp(torch.randn(shape, generator=gen) * std, -clip, clip)


def blob_batch(b, shape, gen):
    """Images with a bright ellipsoid in noise, and its labels."""
    axes = [torch.linspace(-1, 1, s) for s in shape]
    x, y, z = torch.meshgrid(*axes, indexing="ij")
    imgs, labs = [], []
    for i in range(b):
        c = 0.2 * torch.randn(3, generator=gen)
        r2 = (x - c[0]) ** 2 / 0.4 + (y - c[1]) ** 2 / 0.3 + (z - c[2]) ** 2 / 0.5
        lab = (r2 < 1).long()
        imgs.append((lab.float() * 2 - 1 + 0.5 * torch.randn(shape, generator=gen)).unsqueeze(0))
        labs.append(lab)
    return torch.stack(imgs), torch.stack(labs)


# ---------------------------------------------------------------- fixtures
def fixture_vnet_forward(out):
    torch.manual_seed(1)
    gen = torch.Generator().manual_seed(2)
    nf = 4
    net = VNet(nf=nf)
    perturb(net, gen)
    x = torch.randn(1, 1, 32, 32, 16, generator=gen)
    d = state("init", net)
    net.eval()
    with torch.no_grad():
        d["logits_eval"] = net(x).numpy()
    net.train()
    m5, m9 = masks(nf, 2, gen)
    x2 = torch.cat([x, torch.randn(1, 1, 32, 32, 16, generator=gen)])
    with torch.no_grad():
        d["logits_train"] = net(x2, (m5, m9)).numpy()
    d.update(state("after_train", net))
    d.update(x=x.numpy(), x2=x2.numpy(), m5=m5.numpy(), m9=m9.numpy())
    np.savez(os.path.join(out, "vnet_forward.npz"), **d)


def fixture_losses(out):
    gen = torch.Generator().manual_seed(3)
    shape = (32, 32, 16)
    logits = 2 * torch.randn(2, 2, *shape, generator=gen)
    _, labels = blob_batch(2, shape, gen)
    teacher = 2 * torch.randn(2, 2, *shape, generator=gen)
    mc = 2 * torch.randn(8 * 2, 2, *shape, generator=gen)
    ce = F.cross_entropy(logits, labels)
    soft = F.softmax(logits, dim=1)
    dice = dice_loss(soft[:, 1], labels == 1)
    dist = (F.softmax(logits, dim=1) - F.softmax(teacher, dim=1)) ** 2
    u = uncertainty(mc, 8)
    thr = 0.85 * math.log(2)
    mask = (u < thr).float()
    cons = torch.sum(mask * dist) / (2 * torch.sum(mask) + 1e-16)
    iters = np.array([0, 1, 149, 150, 2499, 2500, 3000, 5999, 6000, 7000])
    d = dict(
        logits=logits.numpy(), labels=labels.numpy(), teacher=teacher.numpy(), mc=mc.numpy(),
        ce=np.array([ce.item()]), dice=np.array([dice.item()]), supervised=np.array([0.5 * (ce + dice).item()]),
        dist=dist.numpy(), uncertainty=u.numpy(), threshold=np.array([thr]), consistency=np.array([cons.item()]),
        iters=iters,
        ramp_weight=np.array([0.1 * sigmoid_rampup(i // 150, 40.0) for i in iters]),
        ramp_threshold=np.array([(0.75 + 0.25 * sigmoid_rampup(i, 6000)) * np.log(2) for i in iters]),
        ramp_lr=np.array([lr_at(i) for i in iters]),
        ema_alpha=np.array([min(1 - 1 / (i + 1), 0.99) for i in iters]),
    )
    np.savez(os.path.join(out, "losses.npz"), **d)


def lr_at(it, base=0.01, step=2500):
    """The reference's schedule, simulated: the counter is incremented after each step and the
    rate set to base * 0.1 ** (counter // step) whenever counter % step == 0."""
    lr = base
    for counter in range(1, it + 1):
        if counter % step == 0:
            lr = base * 0.1 ** (counter // step)
    return lr


def fixture_sgd_ema(out):
    gen = torch.Generator().manual_seed(4)
    p = torch.randn(5, 7, generator=gen).requires_grad_(True)
    q = torch.randn(3, generator=gen).requires_grad_(True)
    opt = torch.optim.SGD([p, q], lr=0.01, momentum=0.9, weight_decay=1e-4)
    d = {"p0": p.detach().clone().numpy(), "q0": q.detach().clone().numpy()}
    for s, lr in enumerate([0.01, 0.01, 0.001]):
        wp = torch.randn(5, 7, generator=gen)
        wq = torch.randn(3, generator=gen)
        for g in opt.param_groups:
            g["lr"] = lr
        opt.zero_grad()
        loss = (p * wp).sum() + (q * q * wq).sum()
        loss.backward()
        opt.step()
        d[f"wp{s}"], d[f"wq{s}"], d[f"lr{s}"] = wp.numpy(), wq.numpy(), np.array([lr])
        d[f"p{s + 1}"], d[f"q{s + 1}"] = p.detach().clone().numpy(), q.detach().clone().numpy()
    d["buf_p"] = opt.state[p]["momentum_buffer"].numpy()
    d["buf_q"] = opt.state[q]["momentum_buffer"].numpy()
    np.savez(os.path.join(out, "sgd.npz"), **d)


def fixture_step(out, method, steps):
    """`steps` full training steps of `method` from fresh weights at iteration 0, with a
    compressed schedule so that the weight, threshold, learning rate and EMA alpha all move."""
    torch.manual_seed(10)
    gen = torch.Generator().manual_seed(11)
    nf, shape, lbs, T, reps = 4, (32, 32, 16), 2, 8, 2
    cfg = dict(max_iter=4, lr_step=2, consistency_interval=1, consistency_rampup=2.0, consistency=0.1,
               ema_decay=0.99, base_lr=0.01, lr_gamma=0.1)
    student, teacher = VNet(nf=nf), VNet(nf=nf)
    for prm in teacher.parameters():
        prm.detach_()
    student.train()
    teacher.train()
    opt = torch.optim.SGD(student.parameters(), lr=cfg["base_lr"], momentum=0.9, weight_decay=1e-4)
    b = 4 if method != "supervised" else 2
    images, labels_all = blob_batch(b, shape, gen)
    labels = labels_all[:lbs]
    d = {**state("student.init", student), **state("teacher.init", teacher)}
    d.update(images=images.numpy(), labels=labels.numpy())
    d.update({f"cfg.{k}": np.array([float(v)]) for k, v in cfg.items()})
    lr = cfg["base_lr"]
    for it in range(steps):
        r = f"rnd.{it}"
        sm5, sm9 = masks(nf, b, gen)
        d[f"{r}.student.x5"], d[f"{r}.student.x9"] = sm5.numpy(), sm9.numpy()
        outputs = student(images, (sm5, sm9))
        ce, dice, sup = supervised_terms(outputs, labels, lbs)
        weight = cfg["consistency"] * sigmoid_rampup(it // cfg["consistency_interval"], cfg["consistency_rampup"])
        thr = float("inf")
        if method == "supervised":
            loss, cons, frac, weight = sup, torch.zeros(()), torch.zeros(()), 0.0
        else:
            unl = images[lbs:]
            n = noise(unl.shape, gen)
            tm5, tm9 = masks(nf, unl.shape[0], gen)
            d[f"{r}.teacher.noise"], d[f"{r}.teacher.x5"], d[f"{r}.teacher.x9"] = n.numpy(), tm5.numpy(), tm9.numpy()
            with torch.no_grad():
                target = teacher(unl + n, (tm5, tm9))
            if method == "uamt":
                rep = unl.repeat(reps, 1, 1, 1, 1)
                preds = []
                for k in range(T // reps):
                    n = noise(rep.shape, gen)
                    m5, m9 = masks(nf, rep.shape[0], gen)
                    d[f"{r}.mc.{k}.noise"], d[f"{r}.mc.{k}.x5"], d[f"{r}.mc.{k}.x9"] = n.numpy(), m5.numpy(), m9.numpy()
                    with torch.no_grad():
                        preds.append(teacher(rep + n, (m5, m9)))
                mask, thr = uamt_mask(preds, T, it, cfg["max_iter"])
            else:
                mask = torch.ones_like(target[:, :1])
            cons = masked_consistency(outputs[lbs:], target, mask)
            frac = mask.mean()
            loss = sup + weight * cons
        opt.zero_grad()
        loss.backward()
        opt.step()
        if it == 0:
            for name, prm in student.named_parameters():
                d[f"momentum0.{name}"] = opt.state[prm]["momentum_buffer"].clone().numpy()
        if method != "supervised":
            ema_update(teacher, student, cfg["ema_decay"], it)
        o = f"out.{it}"
        for k, v in dict(loss=loss, supervised=sup, ce=ce, dice=dice, consistency=cons, mask_fraction=frac).items():
            d[f"{o}.{k}"] = np.array([float(v.detach())])
        d[f"{o}.weight"], d[f"{o}.threshold"], d[f"{o}.lr"] = np.array([weight]), np.array([thr]), np.array([lr])
        # The reference's schedule: counter incremented after the step, rate dropped on multiples.
        if (it + 1) % cfg["lr_step"] == 0:
            lr = cfg["base_lr"] * cfg["lr_gamma"] ** ((it + 1) // cfg["lr_step"])
            for g in opt.param_groups:
                g["lr"] = lr
    d.update(state("student.final", student))
    d.update(state("teacher.final", teacher))
    names = [k for k, _ in student.named_parameters()]
    for name, prm in zip(names, student.parameters()):
        d[f"momentum.{name}"] = opt.state[prm]["momentum_buffer"].numpy()
    np.savez(os.path.join(out, f"step_{method}.npz"), **d)


def main():
    out = sys.argv[1]
    os.makedirs(out, exist_ok=True)
    torch.set_num_threads(2)
    fixture_vnet_forward(out)
    fixture_losses(out)
    fixture_sgd_ema(out)
    fixture_step(out, "uamt", 3)
    fixture_step(out, "mean_teacher", 2)
    fixture_step(out, "supervised", 2)
    print(f"fixtures written to {out}")


if __name__ == "__main__":
    main()
