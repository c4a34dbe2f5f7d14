#!/usr/bin/env python3
"""Conformance fixtures produced by the real timm (and PyTorch) code.

For every case (variant, input size, output stride, pooling) this builds the timm model, fills it
with deterministic non-trivial weights, runs a real photo and a synthetic pattern through it and
writes what timm computes: logits, pooled embedding, final feature map and (for small inputs) the
multi-level feature taps of timm's `feature_info`.

The weights are split in two so that CI needs neither torch nor 100 MB weight files:
  * conv and linear weights, BN gamma/beta follow a formula both sides implement
    (`deterministic_uniform` here, `xception::testing::deterministic_uniform` in Rust);
  * BN running statistics are *calibrated* (one train-mode pass over a calibration batch, so every
    conv output has roughly unit spread, then randomly perturbed) and stored in
    `fixtures/timm/<variant>_norms.safetensors`.

`xception` (the Keras graph) has no timm model: it is timm's `legacy_xception` with Keras' BN
epsilon 1e-3 and TF 'same' max pools (pad 0 before / 1 after on even sizes), built here from
PyTorch ops. Keras itself is checked in the Keras-import fixtures.

Each case also records how far a deliberate mistake moves the logits (other BN epsilon, input
shifted by one pixel, the other padding rule), and this script fails if any of those is not far
beyond the Rust tests' tolerance.

Usage: tools/make_fixtures.py [--out fixtures/timm] [--only VARIANT]
Environment: tools/setup_python.sh (torch, timm pinned in tools/requirements.txt).
"""
import argparse
import json
import math
import os
import sys

import numpy as np
import timm
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image
from safetensors.numpy import save_file

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOLERANCE = 1e-4  # the Rust tests' relative tolerance
CALIBRATION_SIZE = 128
# Large outputs are stored as a seeded random sample of this many elements (indices + values) to
# keep the committed fixtures small; an error anywhere in a feature map moves many of them.
MAX_STORED_VALUES = 8192

# (variant, input size, output stride, global pool, store taps)
CASES = [
    ("legacy_xception", 299, 32, "avg", False),
    ("legacy_xception", 224, 32, "avg", False),
    ("legacy_xception", 80, 32, "avg", True),
    ("xception", 299, 32, "avg", False),
    ("xception", 224, 32, "avg", False),
    ("xception", 74, 32, "max", True),
    ("xception41", 192, 32, "avg", False),
    ("xception41", 96, 16, "max", False),
    ("xception41", 65, 8, "avg", True),
    ("xception65", 299, 32, "avg", False),
    ("xception65", 128, 16, "avg", False),
    ("xception65", 80, 16, "avg", True),
    ("xception65", 97, 8, "avg", False),
    ("xception71", 224, 32, "avg", False),
    ("xception71", 131, 16, "avg", False),
    ("xception71", 64, 8, "avg", True),
    ("xception41p", 160, 32, "avg", False),
    ("xception41p", 77, 8, "avg", True),
    ("xception65p", 256, 32, "avg", False),
    ("xception65p", 96, 16, "avg", True),
]

MASK64 = (1 << 64) - 1


def fnv1a64(text):
    h = 0xCBF29CE484222325
    for b in text.encode():
        h = ((h ^ b) * 0x100000001B3) & MASK64
    return h


def deterministic_uniform(name, n):
    """n values in [-1, 1), a splitmix64 stream keyed by the tensor name. Exact in float64."""
    seed = np.uint64(fnv1a64(name))
    i = np.arange(1, n + 1, dtype=np.uint64)
    with np.errstate(over="ignore"):
        z = seed + i * np.uint64(0x9E3779B97F4A7C15)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        z = z ^ (z >> np.uint64(31))
    return (z >> np.uint64(40)).astype(np.float64) / float(1 << 24) * 2.0 - 1.0


def formula_weight(name, shape, kind):
    """The weights both sides derive. kind: conv | linear_weight | linear_bias | norm_weight | norm_bias."""
    n = int(np.prod(shape))
    u = deterministic_uniform(name, n)
    if kind in ("conv", "linear_weight"):
        fan_in = n // shape[0]
        v = u * math.sqrt(3.0 / fan_in)  # unit output variance for unit input variance
    elif kind == "linear_bias":
        v = 0.1 * u
    elif kind == "norm_weight":
        v = 1.0 + 0.25 * u
    elif kind == "norm_bias":
        v = 0.25 * u
    else:
        raise ValueError(kind)
    return v.astype(np.float32).reshape(shape)


class TfSameMaxPool(nn.Module):
    """3x3 stride-2 max pool with TensorFlow 'same' padding: the odd pixel of padding goes after."""

    def __init__(self, kernel, stride):
        super().__init__()
        self.kernel, self.stride = kernel, stride

    def forward(self, x):
        pads = []
        for n in (x.shape[3], x.shape[2]):  # F.pad order: last dim first
            out = -(-n // self.stride)
            total = max((out - 1) * self.stride + self.kernel - n, 0)
            pads += [total // 2, total - total // 2]
        return F.max_pool2d(F.pad(x, pads, value=float("-inf")), self.kernel, self.stride)


def build_model(variant, output_stride, pool):
    if variant in ("xception", "legacy_xception"):
        model = timm.create_model("legacy_xception", pretrained=False, global_pool=pool)
        if variant == "xception":
            for m in model.modules():
                if isinstance(m, nn.BatchNorm2d):
                    m.eps = 1e-3
                if isinstance(m, nn.Sequential):
                    for i, child in enumerate(m):
                        if isinstance(child, nn.MaxPool2d):
                            m[i] = TfSameMaxPool(3, child.stride)
    else:
        model = timm.create_model(variant, pretrained=False, output_stride=output_stride, global_pool=pool)
    return model


def fill_formula_weights(model):
    with torch.no_grad():
        for mname, m in model.named_modules():
            if isinstance(m, nn.Conv2d):
                m.weight.copy_(torch.from_numpy(formula_weight(f"{mname}.weight", tuple(m.weight.shape), "conv")))
                if m.bias is not None:  # the DeepLab logits conv; timm's backbones have none
                    m.bias.copy_(torch.from_numpy(formula_weight(f"{mname}.bias", tuple(m.bias.shape), "linear_bias")))
            elif isinstance(m, nn.BatchNorm2d):
                m.weight.copy_(torch.from_numpy(formula_weight(f"{mname}.weight", tuple(m.weight.shape), "norm_weight")))
                m.bias.copy_(torch.from_numpy(formula_weight(f"{mname}.bias", tuple(m.bias.shape), "norm_bias")))
            elif isinstance(m, nn.Linear):
                m.weight.copy_(torch.from_numpy(formula_weight(f"{mname}.weight", tuple(m.weight.shape), "linear_weight")))
                m.bias.copy_(torch.from_numpy(formula_weight(f"{mname}.bias", tuple(m.bias.shape), "linear_bias")))


def calibrate_norms(model, batch):
    """Running statistics from one train-mode pass, then perturbed so they are not exact batch stats."""
    norms = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.BatchNorm2d)]
    for _, m in norms:
        m.reset_running_stats()
        m.momentum = None  # cumulative average: after one batch, exactly that batch's statistics
    model.train()
    with torch.no_grad():
        model(batch)
    model.eval()
    with torch.no_grad():
        for name, m in norms:
            c = m.running_mean.numel()
            std = m.running_var.sqrt()
            m.running_mean += 0.1 * std * torch.from_numpy(deterministic_uniform(name + "#mean", c).astype(np.float32))
            m.running_var *= torch.from_numpy((2.0 ** (0.5 * deterministic_uniform(name + "#var", c))).astype(np.float32))
            m.momentum = 0.1


def norm_state(model):
    """The calibrated running statistics (gamma and beta follow the shared formula)."""
    out = {}
    for name, m in model.named_modules():
        if isinstance(m, nn.BatchNorm2d):
            for k in ("running_mean", "running_var"):
                out[f"{name}.{k}"] = getattr(m, k).detach().numpy().copy()
    return out


def load_norm_state(model, state):
    with torch.no_grad():
        for name, m in model.named_modules():
            if isinstance(m, nn.BatchNorm2d):
                for k in ("running_mean", "running_var"):
                    key = f"{name}.{k}"
                    if key in state:
                        getattr(m, k).copy_(torch.from_numpy(state[key]))


def photo(size):
    img = Image.open(os.path.join(ROOT, "fixtures/images/chelsea.png")).convert("RGB")
    return np.asarray(img.resize((size, size), Image.BICUBIC), dtype=np.uint8)


def pattern(size):
    y, x = np.mgrid[0:size, 0:size]
    chans = [((x * 7 + y * 13 + c * 50) ^ (x * y // 3)) & 255 for c in range(3)]
    return np.stack(chans, axis=-1).astype(np.uint8)


def to_input(u8):
    """uint8 NHWC -> float32 NCHW in [-1, 1]; the same float32 ops as the Rust side."""
    x = torch.from_numpy(u8).float() / 127.5 - 1.0
    return x.permute(0, 3, 1, 2).contiguous()


def run(model, x, with_taps):
    taps, hooks = [], []
    if with_taps:
        for info in model.feature_info:
            mod = model.get_submodule(info["module"])
            hooks.append(mod.register_forward_hook(lambda _m, _i, out: taps.append(out.detach().clone())))
    with torch.no_grad():
        feats = model.forward_features(x)
        pooled = model.forward_head(feats, pre_logits=True)
        logits = model.forward_head(feats)
    for h in hooks:
        h.remove()
    return feats, pooled, logits, taps


def store(tensors, name, arr, whole_up_to=MAX_STORED_VALUES, sample=MAX_STORED_VALUES):
    """The whole array if small, else a seeded sample: NAME.index (flat, int64), NAME.values, NAME.shape."""
    arr = np.ascontiguousarray(arr)
    if arr.size <= whole_up_to:
        tensors[name] = arr
        return
    rng = np.random.default_rng(fnv1a64(name))
    idx = np.sort(rng.choice(arr.size, sample, replace=False)).astype(np.int64)
    tensors[name + ".index"] = idx
    tensors[name + ".values"] = arr.reshape(-1)[idx]
    tensors[name + ".shape"] = np.array(arr.shape, dtype=np.int64)


def relative_deviation(a, b):
    return float((a - b).abs().max() / b.abs().max())


def sensitivity(variant, size, os_, pool, model, x, logits):
    """How far deliberate mistakes move the logits, relative to their scale."""
    out = {}
    norms = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    right = norms[0].eps
    for m in norms:
        m.eps = 1e-5 if right == 1e-3 else 1e-3
    with torch.no_grad():
        out["other_bn_eps"] = relative_deviation(model(x), logits)
    for m in norms:
        m.eps = right
    with torch.no_grad():
        out["input_shifted_one_pixel"] = relative_deviation(model(torch.roll(x, 1, dims=3)), logits)
    if variant in ("xception", "legacy_xception"):
        other = build_model("legacy_xception" if variant == "xception" else "xception", os_, pool)
        other.load_state_dict(model.state_dict())
        for m in other.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.eps = right
        other.eval()
        with torch.no_grad():
            out["other_max_pool_padding"] = relative_deviation(other(x), logits)
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=os.path.join(ROOT, "fixtures/timm"))
    ap.add_argument("--only", help="one variant")
    args = ap.parse_args()
    os.makedirs(args.out, exist_ok=True)
    torch.manual_seed(0)
    torch.set_num_threads(max(1, os.cpu_count() or 1))

    calibration = to_input(np.stack([photo(CALIBRATION_SIZE), pattern(CALIBRATION_SIZE)]))
    norms_by_variant = {}
    manifest = []
    for variant, size, os_, pool, with_taps in CASES:
        if args.only and variant != args.only:
            continue
        if variant not in norms_by_variant:
            model = build_model(variant, 32, "avg")
            fill_formula_weights(model)
            calibrate_norms(model, calibration)
            norms_by_variant[variant] = norm_state(model)
            save_file(norms_by_variant[variant], os.path.join(args.out, f"{variant}_norms.safetensors"),
                      metadata={"variant": variant, "calibration": f"photo+pattern at {CALIBRATION_SIZE}"})
        model = build_model(variant, os_, pool)
        fill_formula_weights(model)
        load_norm_state(model, norms_by_variant[variant])
        model.eval()

        images = [photo(size)] if with_taps else [photo(size), pattern(size)]
        u8 = np.stack(images)
        x = to_input(u8)
        feats, pooled, logits, taps = run(model, x, with_taps)
        sens = sensitivity(variant, size, os_, pool, model, x, logits)
        for what, dev in sens.items():
            if dev < 100 * TOLERANCE:
                sys.exit(f"{variant} {size} os{os_}: a deliberate mistake ({what}) moves logits only {dev:.2e}")
        tensors = {"input_u8": u8}
        store(tensors, "logits", logits.numpy())
        store(tensors, "pooled", pooled.numpy())
        store(tensors, "features", feats.numpy())
        tap_meta = []
        for i, (t, info) in enumerate(zip(taps, model.feature_info)):
            store(tensors, f"tap{i}", t.numpy())
            tap_meta.append({"module": info["module"], "reduction": info["reduction"], "shape": list(t.shape)})
        name = f"{variant}_s{size}_os{os_}_{pool}"
        meta = {
            "variant": variant, "size": size, "output_stride": os_, "pool": pool,
            "taps": tap_meta, "sensitivity": sens,
            "timm": timm.__version__, "torch": torch.__version__,
        }
        save_file(tensors,
                  os.path.join(args.out, f"{name}.safetensors"), metadata={"case": json.dumps(meta)})
        manifest.append({"file": f"{name}.safetensors", **meta})
        print(f"{name}: logits scale {logits.abs().max():.3f} sensitivity "
              + ", ".join(f"{k} {v:.2e}" for k, v in sens.items()), flush=True)
    if not args.only:
        with open(os.path.join(args.out, "manifest.json"), "w") as f:
            json.dump(manifest, f, indent=1)


if __name__ == "__main__":
    main()
