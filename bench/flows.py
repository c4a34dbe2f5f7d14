#!/usr/bin/env python3
"""Where the time goes, in the network: ONNX Runtime's per-node profile and our engine's
per-step profile (XCEPTION_ENGINE_PROFILE=1), summed per flow (stem convs, entry blocks 1-3,
middle blocks 4-11, exit), interleaved round by round so a slow patch of the machine hits both.
Xception (timm `legacy_xception`) at 299, batch 1, or with `--model xception65` the aligned
Xception-65 (timm `xception65`; flows: entry blocks 0-2, middle 3-18, exit 19-20).

The per-op figures of peers.py time each kernel alone; this shows what the layers cost inside a
pass (caches holding other layers' data, the two cores sharing work), which is where the
whole-network gap is.

With `--by block` the same per block: the stem convs, blocks 1-12 (timm's numbering; ours split
where each block's residual add ends it) and the tail (conv3, conv4, pooling, classifier); for
xception65 blocks 0-19 and the tail (block 20, which has no shortcut, pooling, classifier).

Usage: bench/flows.py [--model xception|xception65] [--threads 2] [--rounds 8] [--by flow|block]
Needs the built `xception` binary and the Python tools of peers.py (torch, timm, onnxruntime).
"""
import argparse
import collections
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from peers import BIN, ort_int8_session, ort_session  # noqa: E402
FLOWS = ["stem", "entry", "middle", "exit"]


# Per model (our name): timm's name, the first block's number, and how many blocks end in a
# residual add (the blocks after them, with the pooling and classifier, are the tail).
MODELS = {
    "xception": ("legacy_xception", 1, 12),
    "xception65": ("xception65", 0, 20),
}


def ort_block(node, model):
    """The block of an ONNX Runtime node, from the timm module path in its name (None: unnamed,
    e.g. a layout reorder, which belongs with the node before it)."""
    if model == "xception65":
        _, first, count = MODELS[model]
        m = re.search(r"/blocks/blocks\.(\d+)/", node)
        if m:
            b = int(m.group(1))
            return "tail" if b >= first + count else f"block{b}"
        if node.startswith("/stem/"):
            return "stem"
        if node.startswith(("/act/", "/head/")):
            return "tail"
        return None
    m = re.search(r"/block(\d+)/", node)
    if m:
        return f"block{int(m.group(1))}"
    if node.startswith(("/act1/", "/act2/", "/conv1/", "/conv2/")):
        return "stem"
    if node.startswith(("/conv3/", "/act3/", "/conv4/", "/act4/", "/global_pool/", "/fc/")):
        return "tail"
    return None


def our_blocks(stderr, model):
    """Per pass (the warm-up dropped): {block: ms} from the engine's step profile. A block ends
    with the step that adds its shortcut (the only steps whose names say "residual", or "shortcut"
    where the step makes the projection too); the stem is the two dense 3x3 convs."""
    _, first, count = MODELS[model]
    passes = []
    for line in stderr.splitlines():
        if not line.startswith("engine step"):
            continue
        parts = line.split()
        ms, what = float(parts[2]), " ".join(parts[4:])
        if what.startswith("dense 3x3 3->"):
            passes.append((collections.defaultdict(float), [0]))
        blocks, at = passes[-1]
        name = "stem" if at[0] == 0 and what.startswith("dense 3x3") else (f"block{at[0] + first}" if at[0] < count else "tail")
        blocks[name] += ms
        if "residual" in what or "shortcut" in what:
            at[0] += 1
    return [b for b, _ in passes[1:]]


def flow_of(block, model):
    """The flow a block belongs to: xception's blocks 1-3 entry, 4-11 middle, 12 and the tail
    exit; xception65's 0-2, 3-18, 19 and the tail."""
    if block == "stem":
        return "stem"
    if block == "tail":
        return "exit"
    b = int(block[len("block"):])
    entry, middle = (3, 11) if model == "xception" else (2, 18)
    return "entry" if b <= entry else ("middle" if b <= middle else "exit")


def by_flow(blocks, model):
    """{block: ms} summed per flow."""
    flows = collections.defaultdict(float)
    for block, ms in blocks.items():
        flows[flow_of(block, model)] += ms
    return flows


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", choices=sorted(MODELS), default="xception")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=8)
    ap.add_argument("--by", choices=["flow", "block"], default="flow")
    ap.add_argument("--precision", default="f32", help="our engine's (int8: against ONNX Runtime's static int8)")
    args = ap.parse_args()
    timm_name, first, count = MODELS[args.model]
    keys = ["stem", *(f"block{i}" for i in range(first, first + count)), "tail"] if args.by == "block" else FLOWS
    group = (lambda blocks: blocks) if args.by == "block" else (lambda blocks: by_flow(blocks, args.model))
    import onnxruntime as ort
    import timm
    import torch

    model = timm.create_model(timm_name, pretrained=False).eval()
    x = torch.randn(1, 3, 299, 299)
    with tempfile.TemporaryDirectory() as tmp:
        make = ort_int8_session if args.precision == "int8" else ort_session
        sess = make(model, x, args.threads, profile_dir=tmp)
        xn = x.numpy()
        warm = 3
        for _ in range(warm):
            sess.run(None, {"x": xn})
        ours = []
        env = dict(os.environ, XCEPTION_ENGINE_PROFILE="1")
        for _ in range(args.rounds):
            for _ in range(3):
                sess.run(None, {"x": xn})
            p = subprocess.run([BIN, "bench", "--model", args.model, "--batch", "1", "--threads", str(args.threads), "--runs", "3", "--precision", args.precision],
                               capture_output=True, text=True, env=env, check=True)
            ours += [group(b) for b in our_blocks(p.stderr, args.model)]
        events = json.load(open(sess.end_profiling()))
    runs = [e for e in events if e.get("name") == "model_run"][warm:]
    nodes = [e for e in events if e.get("cat") == "Node" and e["name"].endswith("_kernel_time")]
    theirs = []
    for run in runs:
        blocks, last = collections.defaultdict(float), "stem"
        for e in nodes:
            if run["ts"] <= e["ts"] <= run["ts"] + run["dur"]:
                last = ort_block(e["name"], args.model) or last
                blocks[last] += e["dur"] / 1e3
        theirs.append(group(blocks))
    print(f"{args.model} (timm {timm_name}) 299, batch 1, {args.threads} threads, {args.rounds} interleaved rounds, ours in {args.precision}"
          f"{', ONNX Runtime in static int8' if args.precision == 'int8' else ''}; medians of the per-pass sums")
    print(f"(ONNX Runtime {ort.__version__}: node times from its profiler; ours: engine steps)\n")
    print(f"| {args.by} | ONNX Runtime ms | ours ms | speed ratio (ORT time / ours) |")
    print("|---|---|---|---|")
    for flow in keys + ["total"]:
        pick = (lambda f: sum(f.values())) if flow == "total" else (lambda f, flow=flow: f[flow])
        t, o = statistics.median(map(pick, theirs)), statistics.median(map(pick, ours))
        print(f"| {flow} | {t:.2f} | {o:.2f} | {t / o:.2f}x |")


if __name__ == "__main__":
    sys.exit(main())
