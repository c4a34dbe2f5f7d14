#!/usr/bin/env python3
"""Training throughput, ours against PyTorch (timm), same machine, same thread count, fp32.

One step = forward in training mode (BatchNorm on batch statistics), cross-entropy, backward,
SGD momentum update. Ours: `xception bench --train` (burn autodiff, the NHWC matrix-product
training layout). PyTorch: the same timm network (legacy_xception for `xception`), eager NCHW and
channels-last. Rounds are interleaved (each round times one step of every contender in turn) and
the median over rounds is reported, as images/s and GFLOP/s (3 x forward multiply-adds x 2).

Usage: bench/train_peers.py [--models xception,xception_tiny] [--sizes 299,96] [--batch 16]
                            [--threads 2] [--rounds 5] [--out bench/TRAIN.md]
Needs the built `xception` binary and tools/setup_python.sh (torch, timm).
"""
import argparse
import json
import os
import platform
import statistics
import subprocess
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BIN = os.environ.get("XCEPTION_BIN") or os.path.join(
    os.environ.get("CARGO_TARGET_DIR", os.path.expanduser("~/.cache/xception/target")), "release/xception")
TIMM_NAME = {"xception": "legacy_xception", "xception41": "xception41", "xception65": "xception65"}


def ours(model, batch, threads, size):
    out = subprocess.check_output([BIN, "bench", "--train", "--model", model, "--batch", str(batch), "--threads", str(threads),
                                   "--input-size", str(size), "--runs", "1", "--json"], text=True)
    r = json.loads(out)
    return r["median_ms"] / 1e3, r["macs_per_image"]


def torch_step(model_name, batch, size, channels_last):
    import timm
    import torch
    model = timm.create_model(TIMM_NAME[model_name], pretrained=False, num_classes=1000)
    model.train()
    opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
    x = torch.full((batch, 3, size, size), 0.1)
    y = torch.arange(batch) % 1000
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
        x = x.to(memory_format=torch.channels_last)
    loss_fn = torch.nn.CrossEntropyLoss()

    def step():
        t = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        loss_fn(model(x), y).backward()
        opt.step()
        return time.perf_counter() - t

    step()  # warm-up
    return step


def flops_per_cycle():
    flags = next((l for l in open("/proc/cpuinfo") if l.startswith("flags")), "")
    return 64 if " avx512f" in flags else 32


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="xception")
    ap.add_argument("--sizes", default="299,96")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--out", default=os.path.join(ROOT, "bench/TRAIN.md"))
    args = ap.parse_args()
    import torch
    torch.set_num_threads(args.threads)
    rows = []
    for model in args.models.split(","):
        for size in [int(s) for s in args.sizes.split(",")]:
            contenders = {"ours (burn, NHWC)": None}
            if model in TIMM_NAME:
                contenders["PyTorch eager"] = torch_step(model, args.batch, size, False)
                contenders["PyTorch channels-last"] = torch_step(model, args.batch, size, True)
            times = {k: [] for k in contenders}
            macs = None
            for _ in range(args.rounds):
                for name, f in contenders.items():
                    if f is None:
                        dt, macs = ours(model, args.batch, args.threads, size)
                    else:
                        dt = f()
                    times[name].append(dt)
            for name, ts in times.items():
                med = statistics.median(ts)
                rows.append({"model": model, "size": size, "who": name, "seconds": med, "images_per_s": args.batch / med,
                             "gflops": 3 * 2 * macs * args.batch / med / 1e9})
                print(json.dumps(rows[-1]), flush=True)
    write(args, rows)


def write(args, rows):
    import timm
    import torch
    cpu = next((l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name")), platform.processor())
    mhz = [float(l.split(":")[1]) for l in open("/proc/cpuinfo") if l.startswith("cpu MHz")]
    ghz = sum(mhz) / len(mhz) / 1000 if mhz else float("nan")
    peak = ghz * flops_per_cycle() * args.threads
    lines = [
        "# Training benchmark: ours against PyTorch (timm)",
        "",
        f"Machine: {cpu}, {os.cpu_count()} cores, {ghz:.2f} GHz; fp32 peak with {args.threads} threads {peak:.1f} GFLOP/s.",
        f"Batch {args.batch}, {args.threads} threads each, median of {args.rounds} interleaved rounds; torch {torch.__version__}, "
        f"timm {timm.__version__}. One step: train-mode forward, cross-entropy, backward, SGD momentum update.",
        f"Measured {time.strftime('%Y-%m-%d')}. Command: `bench/train_peers.py --models {args.models} --sizes {args.sizes} --batch {args.batch} --threads {args.threads} --rounds {args.rounds}`",
        "",
        "| model | input | contender | step (s) | images/s | GFLOP/s | % of peak | their step / ours |",
        "|---|---|---|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        mine = next(o for o in rows if o["model"] == r["model"] and o["size"] == r["size"] and o["who"].startswith("ours"))
        lines.append(f"| {r['model']} | {r['size']} | {r['who']} | {r['seconds']:.3f} | {r['images_per_s']:.1f} | {r['gflops']:.1f} | "
                     f"{100 * r['gflops'] / peak:.1f}% | {r['seconds'] / mine['seconds']:.2f}x |")
    lines.append("")
    with open(args.out, "w") as f:
        f.write("\n".join(lines))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
