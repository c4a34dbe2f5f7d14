#!/usr/bin/env python3
"""Optimizer conformance fixtures: three training steps of a dense classifier head with
torch.optim, for the head `xception train` trains (crates/xception/src/train.rs).

The head: one nn.Linear(6, 4) with fixed weights, a batch of 5 feature vectors (a new one each
step), cross-entropy with label smoothing 0.1 (mean over the batch). For each optimizer setting
the script records the loss of every step and the weights after it. The Rust test runs the same
steps through burn's autodiff and optimizers as our training loop configures them and must
match within 1e-5.

Usage: tools/make_optim_fixtures.py [--out fixtures/optim]
"""
import argparse
import json
import os

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.numpy import save_file

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# (name, torch optimizer factory, our settings); "clip" clips the global gradient norm first;
# "ema" also records a moving average of the weights (ema = d * ema + (1 - d) * w after each step).
SETTINGS = [
    ("sgd_ema", lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9, dampening=0.0, weight_decay=0.0),
     {"optimizer": "sgd", "lr": 0.05, "momentum": 0.9, "nesterov": False, "weight_decay": 0.0, "ema": 0.8}),
    ("sgd_clipped", lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9, dampening=0.0, weight_decay=0.0),
     {"optimizer": "sgd", "lr": 0.05, "momentum": 0.9, "nesterov": False, "weight_decay": 0.0, "clip": 0.05}),
    ("adamw", lambda p: torch.optim.AdamW(p, lr=0.01, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.05),
     {"optimizer": "adamw", "lr": 0.01, "weight_decay": 0.05}),
    ("sgd_momentum", lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9, dampening=0.0, nesterov=False, weight_decay=0.01),
     {"optimizer": "sgd", "lr": 0.05, "momentum": 0.9, "nesterov": False, "weight_decay": 0.01}),
    ("sgd_nesterov", lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9, dampening=0.0, nesterov=True, weight_decay=0.0),
     {"optimizer": "sgd", "lr": 0.05, "momentum": 0.9, "nesterov": True, "weight_decay": 0.0}),
    ("rmsprop", lambda p: torch.optim.RMSprop(p, lr=0.01, alpha=0.9, eps=1e-3, momentum=0.9, weight_decay=1e-4),
     {"optimizer": "rmsprop", "lr": 0.01, "alpha": 0.9, "eps": 1e-3, "momentum": 0.9, "weight_decay": 1e-4}),
]
# Learning-rate schedules over 12 epochs of one step each, from torch's schedulers.
SCHEDULE_EPOCHS = 12
STEPS = 3
SMOOTHING = 0.1


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=os.path.join(ROOT, "fixtures/optim"))
    args = ap.parse_args()
    os.makedirs(args.out, exist_ok=True)
    rng = np.random.default_rng(5)
    w0 = rng.uniform(-0.4, 0.4, (4, 6)).astype(np.float32)
    b0 = rng.uniform(-0.1, 0.1, 4).astype(np.float32)
    xs = [rng.normal(0, 1, (5, 6)).astype(np.float32) for _ in range(STEPS)]
    y = np.array([0, 3, 1, 2, 3], dtype=np.int64)
    tensors = {"w0": w0, "b0": b0, "y": y.astype(np.float32)}
    for t, x in enumerate(xs):
        tensors[f"x{t}"] = x
    for name, make, ours in SETTINGS:
        layer = nn.Linear(6, 4)
        with torch.no_grad():
            layer.weight.copy_(torch.from_numpy(w0))
            layer.bias.copy_(torch.from_numpy(b0))
        opt = make(layer.parameters())
        ema = {k: v.detach().clone() for k, v in layer.state_dict().items()}
        losses = []
        for t in range(STEPS):
            opt.zero_grad()
            loss = F.cross_entropy(layer(torch.from_numpy(xs[t])), torch.from_numpy(y), label_smoothing=SMOOTHING)
            loss.backward()
            if "clip" in ours:
                torch.nn.utils.clip_grad_norm_(layer.parameters(), max_norm=ours["clip"])
            opt.step()
            losses.append(loss.item())
            if "ema" in ours:
                d = ours["ema"]
                with torch.no_grad():
                    for k, v in layer.state_dict().items():
                        ema[k].mul_(d).add_(v, alpha=1.0 - d)
                tensors[f"{name}.ema_w{t + 1}"] = ema["weight"].numpy().copy()
                tensors[f"{name}.ema_b{t + 1}"] = ema["bias"].numpy().copy()
            tensors[f"{name}.w{t + 1}"] = layer.weight.detach().numpy().copy()
            tensors[f"{name}.b{t + 1}"] = layer.bias.detach().numpy().copy()
        tensors[f"{name}.loss"] = np.array(losses, dtype=np.float32)
        print(f"{name}: losses {losses}")
    schedules = {}
    for name, make in [
        ("step_exp", lambda o: torch.optim.lr_scheduler.StepLR(o, step_size=2, gamma=0.94)),
        ("poly", lambda o: torch.optim.lr_scheduler.PolynomialLR(o, total_iters=SCHEDULE_EPOCHS, power=0.9)),
        ("cosine", lambda o: torch.optim.lr_scheduler.CosineAnnealingLR(o, T_max=SCHEDULE_EPOCHS, eta_min=0.0)),
    ]:
        opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.045)
        sched = make(opt)
        lrs = []
        for _ in range(SCHEDULE_EPOCHS):
            lrs.append(opt.param_groups[0]["lr"])
            opt.step()
            sched.step()
        schedules[name] = lrs
    meta = {"steps": STEPS, "label_smoothing": SMOOTHING, "settings": [{"name": n, **s} for n, _, s in SETTINGS],
            "schedules": schedules, "schedule_lr": 0.045, "torch": torch.__version__}
    save_file(tensors, os.path.join(args.out, "head_steps.safetensors"), metadata={"case": json.dumps(meta)})


if __name__ == "__main__":
    main()
