#!/usr/bin/env python3
"""Whole-network inference, ours against PyTorch (timm: eager, channels-last, torch.compile),
ONNX Runtime (all graph optimisations) and TensorFlow/Keras (compiled tf.function), on this
machine, same thread count, fp32, and per-op figures for the depthwise and pointwise convs.

Where our engine runs bf16 (AMX tiles, or VDPBF16PS on AVX512-BF16 CPUs such as AMD Zen 4), also
our `--precision bf16` (and `bf16x3`, AMX only) against PyTorch in bf16 (channels-last; oneDNN runs
its convs on the same instructions) and Keras' mixed_bfloat16 policy (TensorFlow's oneDNN,
xception only); where it runs int8 (AVX-512 VNNI or AVX-VNNI), our `--precision int8`
against ONNX Runtime's static int8 quantization of the same model. fp32 rows are compared with the
fastest fp32 peer, bf16 and int8 rows with the fastest peer of any precision.

Rounds are interleaved: every round times one forward of each contender in turn, each right
after an untimed forward of its own (as our binary times a pass after its warm-up pass), so a
slow patch of the machine hits all of them; the median over rounds is reported. TensorFlow runs in
its own process (its thread pool cannot share one with torch) and is interleaved per round too.

With `--isa avx2` every contender is held to AVX2+FMA (what a CPU without AVX-512 runs): our
engine by XCEPTION_ENGINE_NO_AVX512=1, PyTorch by ATEN_CPU_CAPABILITY=avx2 and
ONEDNN_MAX_CPU_ISA=AVX2, TensorFlow by ONEDNN_MAX_CPU_ISA=AVX2, and the whole process tree by
bench/cpuid_avx2.c: the script builds it with `cc` and runs itself again under it (LD_PRELOAD),
so that CPUID reports no AVX-512, AVX-VNNI or AMX to anyone. That is what holds ONNX Runtime,
whose MLAS reads CPUID and has no switch. Where the shim cannot be built or armed (no C
compiler, no CPUID faulting), ONNX Runtime runs AVX-512 and is listed, marked, and left out of
the fastest-peer comparison. The table then goes to bench/RESULTS_AVX2.md.

Usage: bench/peers.py [--models xception,xception65] [--batches 1,8] [--threads 2] [--rounds 7]
                      [--isa native|avx2] [--out bench/RESULTS.md]
Needs the built `xception` binary and tools/setup_python.sh + `pip install onnxruntime onnx
onnxscript tensorflow-cpu` (see bench/README.md).
"""
import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BIN = os.environ.get("XCEPTION_BIN") or os.path.join(
    os.environ.get("CARGO_TARGET_DIR", os.path.expanduser("~/.cache/xception/target")), "release/xception")
TIMM_NAME = {"xception": "legacy_xception", "xception65": "xception65", "xception41": "xception41", "xception71": "xception71"}

TF_WORKER = r'''
import os, sys, time, json
os.environ["KERAS_BACKEND"] = "tensorflow"
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
import tensorflow as tf
threads, batch, size, policy = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
tf.config.threading.set_intra_op_parallelism_threads(threads)
tf.config.threading.set_inter_op_parallelism_threads(1)
import keras
keras.mixed_precision.set_global_policy(policy)  # mixed_bfloat16: oneDNN bf16 (AMX where present)
model = keras.applications.Xception(weights=None, input_shape=(size, size, 3))
f = tf.function(lambda x: model(x, training=False))
x = tf.random.uniform((batch, size, size, 3))
f(x); f(x)
print("ready", flush=True)
for line in sys.stdin:
    t = time.perf_counter(); f(x).numpy(); dt = time.perf_counter() - t
    print(json.dumps(dt), flush=True)
'''


# fp32 peaks our binary measured (FMA chains on every thread) after each of its runs.
MEASURED_PEAKS = []


def ours(model, batch, threads, size, precision="f32", runs=1):
    """Our binary's median seconds per pass over `runs` timed passes (after its warm-up one)."""
    out = subprocess.check_output([BIN, "bench", "--model", model, "--batch", str(batch), "--threads", str(threads),
                                   "--input-size", str(size), "--runs", str(runs), "--precision", precision, "--json"], text=True)
    r = json.loads(out)
    MEASURED_PEAKS.append(r["peak_gflops"])
    return r["median_ms"] / 1e3


def probe(precision):
    """Our engine's `bench --json` on a tiny pass in `precision`, or None where it refuses (exit 1,
    where the CPU lacks it)."""
    cmd = [BIN, "bench", "--model", "xception41", "--input-size", "71", "--runs", "1", "--precision", precision, "--json"]
    out = subprocess.run(cmd, capture_output=True, text=True)
    return json.loads(out.stdout) if out.returncode == 0 else None


def runs_precision(precision):
    """Whether our engine runs `precision` here."""
    return probe(precision) is not None


def our_kernels(args):
    """The kernels our engine runs in each precision here, as `bench --json` names them."""
    names = [(p, probe(p)) for p in ["f32", "bf16", "bf16x3", "int8"]]
    return ", ".join(f"{p} {j['kernels']}" for p, j in names if j)


# The environment that holds each contender to AVX2+FMA (`--isa avx2`).
AVX2_ENV = {"XCEPTION_ENGINE_NO_AVX512": "1", "ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2"}
# ONNX Runtime's name under `--isa avx2` where the CPUID shim could not hold it.
ORT_UNHELD = "ONNX Runtime (AVX-512: cannot be held to AVX2)"
# Set in the environment of the script's second run, under the shim: the library's path.
SHIM_VAR = "PEERS_CPUID_AVX2"


def ort_name(args):
    return ORT_UNHELD if args.isa == "avx2" and not args.cpuid_held else "ONNX Runtime"


def run_under_cpuid_shim():
    """Builds bench/cpuid_avx2.c (once, into the user's cache) and runs this script again with
    it preloaded; returns (without re-running) where it cannot, after saying why."""
    src = os.path.join(ROOT, "bench", "cpuid_avx2.c")
    cache = os.path.join(os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "xception")
    lib = os.path.join(cache, "libcpuid_avx2.so")
    try:
        if not os.path.exists(lib) or os.path.getmtime(lib) < os.path.getmtime(src):
            os.makedirs(cache, exist_ok=True)
            subprocess.run(["cc", "-O2", "-shared", "-fPIC", "-o", lib, src, "-ldl"], check=True)
    except (OSError, subprocess.CalledProcessError) as e:
        print(f"cannot build {src} ({e}): ONNX Runtime stays on AVX-512", file=sys.stderr, flush=True)
        return
    preload = ":".join(p for p in [lib, os.environ.get("LD_PRELOAD", "")] if p)
    env = dict(os.environ, LD_PRELOAD=preload, **{SHIM_VAR: lib})
    os.execve(sys.executable, [sys.executable, *sys.argv], env)


def cpu_reports_avx512():
    """Whether CPUID, as this process sees it, reports AVX-512 (NumPy's dispatcher reads it)."""
    import numpy as np
    return bool(np._core._multiarray_umath.__cpu_features__.get("AVX512F"))


def is_reduced(name):
    """A contender whose products are not fp32 (bf16 or int8)."""
    return "bf16" in name or "int8" in name


def ort_session(module, x, threads, profile_dir=None, transform=None):
    """`module` exported to ONNX (opset 17) and loaded in ONNX Runtime with every graph
    optimisation, `threads` intra-op threads; with `profile_dir`, node profiling written there;
    with `transform(path, tmp)`, the model it returns the path of is loaded instead."""
    import onnxruntime as ort
    import torch
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "m.onnx")
        torch.onnx.export(module, (x,), path, opset_version=17, dynamo=False, input_names=["x"])
        if transform:
            path = transform(path, tmp)
        so = ort.SessionOptions()
        so.intra_op_num_threads = threads
        so.inter_op_num_threads = 1
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        if profile_dir:
            so.enable_profiling = True
            so.profile_file_prefix = os.path.join(profile_dir, "ort_profile")
        return ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])


def ort_int8_session(module, x, threads, calibration=4, method="MinMax", profile_dir=None, reduce_range=False):
    """`ort_session` of `module` quantized by ONNX Runtime's own static quantization (QDQ format,
    per-channel int8 weights, uint8 activations) after its recommended pre-processing; every graph
    optimisation then fuses the QDQ pairs into its int8 kernels (QLinearConv, MLAS, VNNI where
    the CPU has it). Calibrated on `calibration` random inputs of x's shape (the values do not
    change the speed), or on the inputs `calibration` lists, for accuracy (int8_accuracy.py);
    `method`: its calibration method, MinMax (its default), Entropy or Percentile; `reduce_range`:
    7-bit weights, its advice for CPUs without VNNI (whose VPMADDUBSW saturates 16-bit sums)."""
    import numpy as np
    from onnxruntime.quantization import CalibrationDataReader, CalibrationMethod, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    class Inputs(CalibrationDataReader):
        def __init__(self):
            rng = np.random.default_rng(0)
            inputs = calibration if isinstance(calibration, list) else [rng.standard_normal(x.shape).astype(np.float32) for _ in range(calibration)]
            self.batches = iter([{"x": v} for v in inputs])

        def get_next(self):
            return next(self.batches, None)

    def quantize(path, tmp):
        pre, q = os.path.join(tmp, "m_pre.onnx"), os.path.join(tmp, "m_int8.onnx")
        # ONNX Runtime's recommended pre-processing (shapes, BatchNorm folded into the convs).
        quant_pre_process(path, pre)
        quantize_static(pre, q, Inputs(), quant_format=QuantFormat.QDQ, per_channel=True,
                        weight_type=QuantType.QInt8, activation_type=QuantType.QUInt8, calibrate_method=CalibrationMethod[method],
                        reduce_range=reduce_range)
        return q

    return ort_session(module, x, threads, profile_dir=profile_dir, transform=quantize)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="xception,xception65")
    ap.add_argument("--batches", default="1,8")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--size", type=int, default=299)
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--no-compile", action="store_true", help="skip torch.compile (slow to compile)")
    ap.add_argument("--isa", choices=["native", "avx2"], default="native",
                    help="avx2: hold every contender that allows it to AVX2+FMA (see above)")
    ap.add_argument("--out", help="default bench/RESULTS.md (bench/RESULTS_AVX2.md with --isa avx2)")
    args = ap.parse_args()
    args.out = args.out or os.path.join(ROOT, "bench/RESULTS_AVX2.md" if args.isa == "avx2" else "bench/RESULTS.md")
    args.cpuid_held = False
    if args.isa == "avx2":
        if SHIM_VAR not in os.environ:
            run_under_cpuid_shim()
        args.cpuid_held = SHIM_VAR in os.environ and not cpu_reports_avx512()
        if SHIM_VAR in os.environ and not args.cpuid_held:
            print("the CPUID shim is loaded but CPUID still reports AVX-512: ONNX Runtime stays on AVX-512", file=sys.stderr, flush=True)
        # Before torch is imported and before any child process starts.
        os.environ.update(AVX2_ENV)
        # torch.compile's kernels built for AVX2 must not be found by a later native run (its
        # cache key does not tell the two apart: the native run then crashed in them).
        os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", os.path.join(tempfile.gettempdir(), f"torchinductor_avx2_{os.getuid()}"))

    import numpy as np
    import onnxruntime as ort
    import timm
    import torch
    torch.set_num_threads(args.threads)
    torch.set_num_interop_threads(1)

    macs = {}
    rows = []
    args.bf16 = runs_precision("bf16")
    args.bf16x3 = args.bf16 and runs_precision("bf16x3")
    if not args.bf16:
        print("our engine has no bf16 here (no AMX or AVX512-BF16)", flush=True)
    elif not args.bf16x3:
        print("our engine has no bf16x3 here (no AMX)", flush=True)
    args.int8 = runs_precision("int8")
    if not args.int8:
        print("our engine has no int8 here (no AVX-512 VNNI or AVX-VNNI)", flush=True)
    for model_name in args.models.split(","):
        info = json.loads(subprocess.check_output([BIN, "info", "--model", model_name, "--input-size", str(args.size), "--json"], text=True))
        macs[model_name] = info["macs"]
        for batch in [int(b) for b in args.batches.split(",")]:
            m = timm.create_model(TIMM_NAME[model_name], pretrained=False).eval()
            x = torch.randn(batch, 3, args.size, args.size)
            contenders = {}
            with torch.inference_mode():
                contenders["PyTorch eager"] = lambda m=m, x=x: m(x)
                m_cl = timm.create_model(TIMM_NAME[model_name], pretrained=False).eval().to(memory_format=torch.channels_last)
                x_cl = x.contiguous(memory_format=torch.channels_last)
                contenders["PyTorch channels-last"] = lambda m=m_cl, x=x_cl: m(x)
                if args.bf16:
                    m16 = timm.create_model(TIMM_NAME[model_name], pretrained=False).eval().to(memory_format=torch.channels_last).to(torch.bfloat16)
                    contenders["PyTorch bf16 channels-last"] = lambda m=m16, x=x_cl.to(torch.bfloat16): m(x)
                if not args.no_compile:
                    compiled = torch.compile(m)
                    compiled(x)
                    contenders["torch.compile"] = lambda c=compiled, x=x: c(x)
            sess = ort_session(m, x, args.threads)
            xn = x.numpy()
            contenders[ort_name(args)] = lambda s=sess, xn=xn: s.run(None, {"x": xn})
            if args.int8:
                sess8 = ort_int8_session(m, x, args.threads)
                contenders[ort_name(args).replace("ONNX Runtime", "ONNX Runtime int8 (static, QDQ)")] = lambda s=sess8, xn=xn: s.run(None, {"x": xn})
            tf_procs = {}
            if model_name == "xception":  # Keras ships only the original Xception
                policies = {"TensorFlow tf.function": "float32"}
                if args.bf16:
                    policies["TensorFlow bf16 tf.function (mixed_bfloat16)"] = "mixed_bfloat16"
                for name, policy in policies.items():
                    tf_procs[name] = subprocess.Popen([sys.executable, "-c", TF_WORKER, str(args.threads), str(batch), str(args.size), policy],
                                                      stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
                    assert tf_procs[name].stdout.readline().strip() == "ready"
            for f in contenders.values():  # warm-up
                with torch.inference_mode():
                    f()
            ours_bf16 = {"ours (engine, bf16)": "bf16"} if args.bf16 else {}
            if args.bf16x3:
                ours_bf16["ours (engine, bf16x3)"] = "bf16x3"
            if args.int8:
                ours_bf16["ours (engine, int8)"] = "int8"
            times = {k: [] for k in ["ours (engine)", *ours_bf16, *contenders, *tf_procs]}
            for _ in range(args.rounds):
                times["ours (engine)"].append(ours(model_name, batch, args.threads, args.size))
                for name, precision in ours_bf16.items():
                    times[name].append(ours(model_name, batch, args.threads, args.size, precision))
                # Each contender's timed pass follows an untimed one of its own, as ours does (our
                # binary times a pass after its warm-up pass): without it every peer's pass met
                # caches and thread pools the other contenders had just used, ours did not.
                # Measured on AMD Zen 4 (2026-12-07): ONNX Runtime int8 at batch 1 54-68 ms
                # interleaved that way against 27.5 ms in blocks of passes (paired.py).
                for name, f in contenders.items():
                    with torch.inference_mode():
                        f()
                        t = time.perf_counter()
                        f()
                        times[name].append(time.perf_counter() - t)
                for name, proc in tf_procs.items():
                    for _ in range(2):
                        proc.stdin.write("go\n")
                        proc.stdin.flush()
                        dt = json.loads(proc.stdout.readline())
                    times[name].append(dt)
            for proc in tf_procs.values():
                proc.stdin.close()
                proc.wait()
            for name, ts in times.items():
                if ts:
                    med = statistics.median(ts)
                    rows.append((model_name, batch, name, med, 2 * macs[model_name] * batch / med / 1e9))
                    print(f"{model_name} b{batch} {name}: {med * 1e3:.0f} ms", flush=True)

    op_rows = per_op(args)
    write(args, rows, op_rows)


OP_SHAPES = [("entry", 147, 147, 128, 128), ("entry 74", 74, 74, 256, 256), ("entry 37", 37, 37, 728, 728),
             ("middle", 19, 19, 728, 728), ("exit", 10, 10, 1536, 2048)]


def per_op(args):
    """Depthwise 3x3 and pointwise 1x1 alone at the entry/middle/exit shapes, batch 1."""
    import onnxruntime as ort
    import torch
    ours = json.loads(subprocess.check_output([BIN, "bench", "--ops", "--threads", str(args.threads), "--runs", "21", "--json"], text=True))
    rows = [(r["op"], r["flow"], "ours (engine)", r["ms"] / 1e3, r["gflops"]) for r in ours]
    if args.bf16:
        ours16 = json.loads(subprocess.check_output([BIN, "bench", "--ops", "--threads", str(args.threads), "--runs", "21",
                                                     "--precision", "bf16", "--json"], text=True))
        rows += [(r["op"], r["flow"], "ours (engine, bf16)", r["ms"] / 1e3, r["gflops"]) for r in ours16]
    if args.int8:
        ours8 = json.loads(subprocess.check_output([BIN, "bench", "--ops", "--threads", str(args.threads), "--runs", "21",
                                                    "--precision", "int8", "--json"], text=True))
        rows += [(r["op"], r["flow"], "ours (engine, int8)", r["ms"] / 1e3, r["gflops"]) for r in ours8 if r["op"] != "depthwise 3x3"]

    def timed(f, runs=21):
        f()
        ts = []
        for _ in range(runs):
            t = time.perf_counter()
            f()
            ts.append(time.perf_counter() - t)
        return statistics.median(ts)

    for flow, h, w, c, cout in OP_SHAPES:
        for op, conv, flops in [
            ("depthwise 3x3", torch.nn.Conv2d(c, c, 3, padding=1, groups=c, bias=False), 2 * h * w * c * 9),
            ("pointwise 1x1", torch.nn.Conv2d(c, cout, 1, bias=False), 2 * h * w * c * cout),
        ]:
            conv = conv.eval()
            x = torch.randn(1, c, h, w)
            with torch.inference_mode():
                t = timed(lambda: conv(x))
                rows.append((op, flow, "PyTorch eager", t, flops / t / 1e9))
                conv_cl = conv.to(memory_format=torch.channels_last)
                x_cl = x.contiguous(memory_format=torch.channels_last)
                t = timed(lambda: conv_cl(x_cl))
                rows.append((op, flow, "PyTorch channels-last", t, flops / t / 1e9))
                if args.bf16:
                    conv16, x16 = conv_cl.to(torch.bfloat16), x_cl.to(torch.bfloat16)
                    t = timed(lambda: conv16(x16))
                    rows.append((op, flow, "PyTorch bf16 channels-last", t, flops / t / 1e9))
                    conv_cl = conv_cl.float()
            sess = ort_session(conv.to(memory_format=torch.contiguous_format), x, args.threads)
            xn = x.numpy()
            t = timed(lambda: sess.run(None, {"x": xn}))
            rows.append((op, flow, ort_name(args), t, flops / t / 1e9))
    return rows


KEEP_MARKER = "<!-- peers.py keeps what follows -->"


def commit():
    """The checked-out commit, marked dirty when the tree has changes."""
    try:
        rev = subprocess.check_output(["git", "-C", ROOT, "rev-parse", "--short", "HEAD"], text=True).strip()
        dirty = subprocess.run(["git", "-C", ROOT, "diff", "--quiet", "HEAD", "--", "crates"]).returncode != 0
        return rev + (" + uncommitted changes under crates/" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def flops_per_cycle(isa):
    flags = next((l for l in open("/proc/cpuinfo") if l.startswith("flags")), "")
    return 64 if " avx512f" in flags and isa != "avx2" else 32  # 2 FMA units x 16 or 8 fp32 lanes x 2


def write(args, rows, op_rows):
    cpu = next((l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name")), platform.processor())
    mhz = [float(l.split(":")[1]) for l in open("/proc/cpuinfo") if l.startswith("cpu MHz")]
    nominal = sum(mhz) / len(mhz) / 1000 if mhz else float("nan")
    peak = statistics.median(MEASURED_PEAKS)
    ghz = peak / (flops_per_cycle(args.isa) * args.threads)
    import onnxruntime, timm, torch
    lines = [
        "# Inference benchmark: ours against PyTorch, ONNX Runtime and TensorFlow",
        "",
        f"Machine: {cpu}, {os.cpu_count()} cores, {nominal:.2f} GHz nominal (/proc/cpuinfo), "
        f"{'AVX-512' if flops_per_cycle(args.isa) == 64 else 'AVX2'}; fp32 peak with {args.threads} threads, measured "
        f"(FMA chains on every thread, median of {len(MEASURED_PEAKS)} measurements) = {peak:.1f} GFLOP/s, "
        f"i.e. {args.threads} x {ghz:.2f} GHz effective x 2 FMA x {flops_per_cycle(args.isa) // 4} lanes x 2"
        + (" (AMD Zen 4 runs one 512-bit FMA a cycle, at twice that clock)." if "AMD" in cpu and flops_per_cycle(args.isa) == 64 else ".")
        + f" Our kernels: {our_kernels(args)}.",
        f"Input {args.size}x{args.size}, {args.threads} threads each, median of {args.rounds} interleaved rounds. "
        f"torch {torch.__version__}, timm {timm.__version__}, onnxruntime {onnxruntime.__version__}.",
        *([f"Held to AVX2+FMA: {', '.join(f'{k}={v}' for k, v in AVX2_ENV.items())} (PyTorch reports CPU capability "
           f"{torch.backends.cpu.get_cpu_capability()}); "
           + ("every process also runs under bench/cpuid_avx2.c (CPUID faulting: CPUID reports no AVX-512, AVX-VNNI "
              "or AMX), which is what holds ONNX Runtime." if args.cpuid_held else
              "ONNX Runtime cannot be held here (no CPUID shim) and runs AVX-512: it is listed but is not a peer in the ratios.")
           + " The peak below is the AVX2 FMA peak."] if args.isa == "avx2" else []),
        f"Code: commit {commit()} ({time.strftime('%Y-%m-%d')}). "
        f"Command: `python bench/peers.py --models {args.models} --batches {args.batches} --threads {args.threads} --rounds {args.rounds}"
        f"{' --isa avx2' if args.isa == 'avx2' else ''}`",
        "",
        "| model | batch | contender | precision | median ms | images/s | GFLOP/s | % of fp32 peak | ratio to fastest peer |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for model in dict.fromkeys(r[0] for r in rows):
        for batch in dict.fromkeys(r[1] for r in rows if r[0] == model):
            group = [r for r in rows if r[0] == model and r[1] == batch]
            peers = [r for r in group if not r[2].startswith("ours") and "cannot be held" not in r[2]]
            fastest_fp32 = min(r[3] for r in peers if not is_reduced(r[2]))
            fastest_any = min(r[3] for r in peers)
            for _, _, name, med, gf in group:
                fastest = fastest_any if is_reduced(name) else fastest_fp32
                label = "bf16x3" if "bf16x3" in name else "bf16" if "bf16" in name else "int8" if "int8" in name else "fp32"
                lines.append(f"| {model} | {batch} | {name} | {label} | {med * 1e3:.0f} | "
                             f"{batch / med:.2f} | {gf:.1f} | {100 * gf / peak:.0f}% | {fastest / med:.2f}x |")
    lines.append("")
    lines.append("Ratio: the fastest peer's median time divided by this contender's (above 1: faster than every peer); "
                 "for fp32 rows the fastest fp32 peer, for bf16 rows the fastest peer of either precision. "
                 "bf16 rows run the convs' products with bf16 operands and fp32 sums (AMX tiles, or VDPBF16PS where the "
                 "CPU has AVX512-BF16 and no AMX: ours then keeps the stem in fp32): "
                 "not comparable to fp32 in accuracy (see the README), and their % of the fp32 peak can pass 100%. "
                 "The bf16x3 row splits each fp32 operand into two bf16 values and runs three tile products "
                 "(16 significant bits: within 3e-5 of Keras on the real model, where bf16 is 1e-2 off; see the README); "
                 "it too is compared with the fastest peer of either precision. "
                 "int8 rows: ours multiplies the 1x1 convs' operands in 8 bits (each weight column and each activation row "
                 "scaled on its own as it runs, no calibration; depthwise and stem convs fp32); ONNX Runtime's static "
                 "quantization (QDQ, per-channel weights, activation scales calibrated beforehand on random inputs, "
                 "which does not change its speed) runs every conv in int8. Compared with the fastest peer of any precision.")
    lines += ["", "## Per op (batch 1, median of 21)", "",
              "| op | flow | shape (HxWxCin->Cout) | contender | ms | GFLOP/s | % of peak |", "|---|---|---|---|---|---|---|"]
    shapes = {f: f"{h}x{w}x{c}->{co}" for f, h, w, c, co in OP_SHAPES}
    for op, flow, name, t, gf in op_rows:
        lines.append(f"| {op} | {flow} | {shapes[flow]} | {name} | {t * 1e3:.3f} | {gf:.1f} | {100 * gf / peak:.0f}% |")
    # Sections written by hand or by other scripts (flows.py's table, notes on the machine) follow
    # a marker and survive a rerun.
    kept = ""
    if os.path.exists(args.out):
        old = open(args.out).read()
        if KEEP_MARKER in old:
            kept = "\n" + old[old.index(KEEP_MARKER):]
    with open(args.out, "w") as f:
        f.write("\n".join(lines) + "\n" + kept)
    print("\n".join(lines))


if __name__ == "__main__":
    main()
