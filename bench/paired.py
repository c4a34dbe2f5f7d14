#!/usr/bin/env python3
"""Our engine against ONNX Runtime alone, whole passes at batch 1, alternated: each alternation
runs `xception bench --runs N` (its median) and then N passes of an ONNX Runtime session (their
median) on the same model, so a slow minute of the VM hits both sides of a pair. Prints every
pair and the median of the per-pair ratios (ONNX Runtime time / ours: above 1, we are faster).

peers.py times every contender once per round; this spends the whole budget on the one peer the
fp32 bar is about, which is what it takes to read a 5-10% difference on this VM. With `--ort
int8` ONNX Runtime runs the model as its own static int8 quantization makes it (peers.py's
`ort_int8_session`), the peer for our `--precision int8`.

Usage: bench/paired.py [--models xception,xception65] [--alternations 6] [--passes 20] [--threads 2]
                       [--precision f32|bf16x3|bf16|int8] [--ort fp32|int8]
Needs the built `xception` binary and the Python tools of peers.py (torch, timm, onnxruntime).
For the AVX2 comparison run it as `XCEPTION_ENGINE_NO_AVX512=1 LD_PRELOAD=<libcpuid_avx2.so>
python bench/paired.py` (see bench/cpuid_avx2.c; peers.py --isa avx2 builds the library).
"""
import argparse
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from peers import TIMM_NAME, commit, ort_int8_session, ort_session, ours  # noqa: E402


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="xception,xception65")
    ap.add_argument("--alternations", type=int, default=6)
    ap.add_argument("--passes", type=int, default=20)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--precision", default="f32", help="our engine's: f32, bf16x3, bf16 or int8")
    ap.add_argument("--ort", choices=["fp32", "int8"], default="fp32", help="ONNX Runtime's: fp32, or its static int8 quantization")
    args = ap.parse_args()

    import timm
    import torch
    torch.set_num_threads(args.threads)
    print(f"commit {commit()}, {time.strftime('%Y-%m-%d %H:%M')}, {args.threads} threads, batch 1, 299x299, "
          f"{args.alternations} alternations of {args.passes} passes each, ours in {args.precision}, ONNX Runtime in {args.ort}")
    for model in args.models.split(","):
        m = timm.create_model(TIMM_NAME[model], pretrained=False).eval()
        x = torch.randn(1, 3, 299, 299)
        sess = (ort_int8_session if args.ort == "int8" else ort_session)(m, x, args.threads)
        xn = x.numpy()
        sess.run(None, {"x": xn})
        ratios = []
        for i in range(args.alternations):
            t_ours = ours(model, 1, args.threads, 299, args.precision, runs=args.passes) * 1e3
            times = []
            for _ in range(args.passes):
                t = time.perf_counter()
                sess.run(None, {"x": xn})
                times.append((time.perf_counter() - t) * 1e3)
            t_ort = statistics.median(times)
            ratios.append(t_ort / t_ours)
            print(f"{model} alternation {i + 1}: ours {t_ours:.1f} ms, ONNX Runtime {t_ort:.1f} ms, ratio {ratios[-1]:.2f}x", flush=True)
        print(f"{model}: median ratio {statistics.median(ratios):.2f}x (range {min(ratios):.2f}-{max(ratios):.2f}x)", flush=True)


if __name__ == "__main__":
    main()
