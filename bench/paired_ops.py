#!/usr/bin/env python3
"""The 3x3 depthwise conv alone, ours against the peers' kernels, alternated: each alternation
runs `xception bench --ops` (the median of `--runs` calls of our kernel at each flow shape) and
then, at each shape, the same number of calls of PyTorch's depthwise conv (NCHW and
channels-last, fp32) and of an ONNX Runtime session of it (their medians), so a slow minute of
the VM hits both sides. Prints every alternation and, per shape, the median and range of the
ratio (the fastest peer's time / ours: above 1, ours is faster); `--markdown` adds a table.

peers.py's per-op table times each contender once, in different minutes of the run, and this
VM's speed drifts (a kernel's median moves 2x between runs); the criterion of issue 4 (our
depthwise at least twice the fastest peer's on the same shapes) needs the ratio itself.

Usage: bench/paired_ops.py [--alternations 5] [--runs 21] [--threads 2] [--markdown]
Needs the built `xception` binary and the Python tools of peers.py (torch, onnxruntime).
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from peers import BIN, OP_SHAPES, commit, ort_session  # noqa: E402


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--alternations", type=int, default=5)
    ap.add_argument("--runs", type=int, default=21)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--markdown", action="store_true", help="also print a markdown table")
    args = ap.parse_args()

    import torch
    torch.set_num_threads(args.threads)

    def timed(f):
        f()
        ts = []
        for _ in range(args.runs):
            t = time.perf_counter()
            f()
            ts.append(time.perf_counter() - t)
        return statistics.median(ts)

    # Each shape's peers: (name, call), with their inputs and sessions made once.
    peers = {}
    for flow, h, w, c, _ in OP_SHAPES:
        conv = torch.nn.Conv2d(c, c, 3, padding=1, groups=c, bias=False).eval()
        x = torch.randn(1, c, h, w)
        conv_cl = torch.nn.Conv2d(c, c, 3, padding=1, groups=c, bias=False).eval()
        conv_cl.load_state_dict(conv.state_dict())
        conv_cl = conv_cl.to(memory_format=torch.channels_last)
        x_cl = x.contiguous(memory_format=torch.channels_last)
        sess, xn = ort_session(conv, x, args.threads), x.numpy()
        peers[flow] = [("PyTorch eager", lambda conv=conv, x=x: conv(x)),
                       ("PyTorch channels-last", lambda conv=conv_cl, x=x_cl: conv(x)),
                       ("ONNX Runtime", lambda sess=sess, xn=xn: sess.run(None, {"x": xn}))]

    print(f"commit {commit()}, {time.strftime('%Y-%m-%d %H:%M')}, {args.threads} threads, batch 1, fp32, "
          f"{args.alternations} alternations, medians of {args.runs} calls")
    ratios = {flow: [] for flow, *_ in OP_SHAPES}
    times = {flow: {"ours": []} for flow, *_ in OP_SHAPES}
    for i in range(args.alternations):
        out = subprocess.check_output([BIN, "bench", "--ops", "--threads", str(args.threads), "--runs", str(args.runs), "--json"], text=True)
        mine = {r["flow"]: r["ms"] for r in json.loads(out) if r["op"] == "depthwise 3x3"}
        with torch.inference_mode():
            for flow, *_ in OP_SHAPES:
                got = {name: timed(call) * 1e3 for name, call in peers[flow]}
                best = min(got, key=got.get)
                ratios[flow].append(got[best] / mine[flow])
                times[flow]["ours"].append(mine[flow])
                for name, t in got.items():
                    times[flow].setdefault(name, []).append(t)
                print(f"alternation {i + 1}, {flow}: ours {mine[flow]:.3f} ms, fastest peer {best} {got[best]:.3f} ms, "
                      f"ratio {ratios[flow][-1]:.2f}x", flush=True)
    for flow, h, w, c, _ in OP_SHAPES:
        r = ratios[flow]
        print(f"{flow} {h}x{w}x{c}: median ratio {statistics.median(r):.2f}x (range {min(r):.2f}-{max(r):.2f}x)")
    if args.markdown:
        names = list(times[OP_SHAPES[0][0]])
        print("\n| flow | shape | " + " | ".join(f"{n} ms" for n in names) + " | ratio (range) |")
        print("|---|---|" + "---|" * len(names) + "---|")
        for flow, h, w, c, _ in OP_SHAPES:
            r = ratios[flow]
            cells = " | ".join(f"{statistics.median(times[flow][n]):.3f}" for n in names)
            print(f"| {flow} | {h}x{w}x{c} | {cells} | {statistics.median(r):.2f}x ({min(r):.2f}-{max(r):.2f}) |")


if __name__ == "__main__":
    main()
