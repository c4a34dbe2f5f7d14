#!/usr/bin/env python3
"""Peak memory at batch 1, ours against ONNX Runtime (the issue's memory bar: ours no higher).

Each side runs in a fresh process of its own and reports its peak resident set (getrusage's
ru_maxrss) after a few passes at 299x299, two threads:
- ours: `xception bench --model M --batch 1 --threads T --json` (`peak_rss_mb`; the weights are
  generated in the process, as a weights file's tensors would be read into it);
- ONNX Runtime: timm's model exported to ONNX in a first process (torch is not loaded in the
  measured one), then a second process that imports only numpy and onnxruntime, loads it with
  every graph optimisation and runs it. Its figure includes the Python interpreter (about 45 MB
  here, printed apart).

Usage: bench/peak_memory.py [--models xception,xception65] [--threads 2]
Needs the built `xception` binary and the Python tools of peers.py (torch, timm, onnxruntime).
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from peers import BIN, TIMM_NAME  # noqa: E402

EXPORT = r'''
import sys, torch, timm
m = timm.create_model(sys.argv[1], pretrained=False).eval()
torch.onnx.export(m, (torch.randn(1, 3, 299, 299),), sys.argv[2], opset_version=17, dynamo=False, input_names=["x"])
'''

RUN = r'''
import json, resource, sys
import numpy as np, onnxruntime as ort
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
so = ort.SessionOptions()
so.intra_op_num_threads = int(sys.argv[2])
so.inter_op_num_threads = 1
so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
s = ort.InferenceSession(sys.argv[1], so, providers=["CPUExecutionProvider"])
x = np.random.default_rng(0).standard_normal((1, 3, 299, 299)).astype(np.float32)
for _ in range(5):
    s.run(None, {"x": x})
print(json.dumps({"peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "before_session_mb": before}))
'''


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="xception,xception65")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    print("| model | ours peak RSS MB | ONNX Runtime peak RSS MB (of which Python before the session) | ours / ONNX Runtime |")
    print("|---|---|---|---|")
    for model in args.models.split(","):
        out = subprocess.run([BIN, "bench", "--model", model, "--batch", "1", "--threads", str(args.threads), "--runs", "3", "--json"],
                             capture_output=True, text=True, check=True).stdout
        ours = json.loads(out.strip().splitlines()[-1])["peak_rss_mb"]
        with tempfile.TemporaryDirectory() as tmp:
            path = os.path.join(tmp, "m.onnx")
            subprocess.run([sys.executable, "-c", EXPORT, TIMM_NAME[model], path], check=True, capture_output=True)
            theirs = json.loads(subprocess.run([sys.executable, "-c", RUN, path, str(args.threads)], capture_output=True, text=True, check=True).stdout)
        print(f"| {model} | {ours:.0f} | {theirs['peak_rss_mb']:.0f} ({theirs['before_session_mb']:.0f}) | {ours / theirs['peak_rss_mb']:.2f} |", flush=True)


if __name__ == "__main__":
    main()
