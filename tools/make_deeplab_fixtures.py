#!/usr/bin/env python3
"""DeepLabv3+ conformance fixtures: a PyTorch reference written from shared/spec/deeplabv3plus.md
on top of timm's aligned Xception backbone.

The reference: timm's xception41/65/71 (output stride 16 or 8) as the encoder; the low-level
feature is the pre-ReLU output of the stride-4 block's second separable conv (a forward hook on
`blocks.<i>.stack.conv2`, cloned because the next ReLU runs in place); ASPP = [image pooling
(global mean, 1x1 conv+BN+ReLU, bilinear align_corners=True back to the feature size), 1x1
conv+BN+ReLU, three split separable convs with BN+ReLU after depthwise and pointwise at rates
6/12/18 (OS 16) or 12/24/36 (OS 8)], concatenated, 1x1 projection to 256 + BN + ReLU; decoder =
1x1 projection of the low-level feature to 48 + BN + ReLU, ASPP output resized (align corners)
to its size, concat [ASPP, low-level], two separable convs to 256; logits = 1x1 conv with bias;
final bilinear align-corners resize to the input. Head BatchNorm epsilon 1e-5.

Weights follow the shared formula (see make_fixtures.py) and the BatchNorm running statistics are
calibrated in train mode and stored in fixtures/deeplab/<case>_norms.safetensors. Each case also
records how far deliberate mistakes move the logits (align_corners=False, the post-ReLU low-level
feature, head BN epsilon 1e-3), and fails if any stays within 100x the Rust tests' tolerance.

Usage: tools/make_deeplab_fixtures.py [--out fixtures/deeplab]
"""
import argparse
import json
import os
import sys
import types

import numpy as np
import timm
import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.numpy import save_file

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from make_fixtures import (ROOT, TOLERANCE, calibrate_norms, fill_formula_weights, norm_state,  # noqa: E402
                           pattern, photo, store, to_input)

# (backbone, input size, output stride, classes): 16k+1 sizes as DeepLab crops, and others.
CASES = [
    ("xception65", 129, 16, 21),
    ("xception65", 97, 8, 21),
    ("xception71", 113, 16, 5),
    ("xception41", 100, 8, 3),
]
HEAD_EPS = 1e-5


class ConvBnRelu(nn.Module):
    def __init__(self, cin, cout):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, 1, bias=False)
        self.bn = nn.BatchNorm2d(cout, eps=HEAD_EPS)

    def forward(self, x):
        return F.relu(self.bn(self.conv(x)))


class SepConvBnRelu(nn.Module):
    """TF DeepLab's split_separable_conv2d: BN + ReLU after the depthwise and the pointwise conv."""

    def __init__(self, cin, cout, rate):
        super().__init__()
        self.conv_dw = nn.Conv2d(cin, cin, 3, padding=rate, dilation=rate, groups=cin, bias=False)
        self.bn_dw = nn.BatchNorm2d(cin, eps=HEAD_EPS)
        self.conv_pw = nn.Conv2d(cin, cout, 1, bias=False)
        self.bn_pw = nn.BatchNorm2d(cout, eps=HEAD_EPS)

    def forward(self, x):
        return F.relu(self.bn_pw(self.conv_pw(F.relu(self.bn_dw(self.conv_dw(x))))))


class Aspp(nn.Module):
    def __init__(self, cin, rates, align_corners):
        super().__init__()
        self.image_pooling = ConvBnRelu(cin, 256)
        self.aspp0 = ConvBnRelu(cin, 256)
        self.aspp1, self.aspp2, self.aspp3 = (SepConvBnRelu(cin, 256, r) for r in rates)
        self.project = ConvBnRelu(5 * 256, 256)
        self.align_corners = align_corners

    def forward(self, x):
        pooled = self.image_pooling(x.mean((2, 3), keepdim=True))
        pooled = F.interpolate(pooled, size=x.shape[-2:], mode="bilinear", align_corners=self.align_corners)
        branches = [pooled, self.aspp0(x), self.aspp1(x), self.aspp2(x), self.aspp3(x)]
        return self.project(torch.cat(branches, 1))  # dropout 0.1 in training only


class Decoder(nn.Module):
    def __init__(self, align_corners):
        super().__init__()
        self.feature_projection0 = ConvBnRelu(256, 48)
        self.conv0 = SepConvBnRelu(256 + 48, 256, 1)
        self.conv1 = SepConvBnRelu(256, 256, 1)
        self.align_corners = align_corners

    def forward(self, aspp, low):
        low = self.feature_projection0(low)
        aspp = F.interpolate(aspp, size=low.shape[-2:], mode="bilinear", align_corners=self.align_corners)
        return self.conv1(self.conv0(torch.cat([aspp, low], 1)))


def low_level_block(model):
    """Index of the block whose strided conv takes the net from stride 4 to 8 (timm feature_info)."""
    for info in model.feature_info:
        if info["reduction"] == 4:
            return int(info["module"].split(".")[1])
    raise ValueError("no stride-4 feature")


def build(backbone, os_, classes, align_corners=True, post_relu_low_level=False):
    model = timm.create_model(backbone, pretrained=False, output_stride=os_, num_classes=0, global_pool="")
    k = 16 // os_
    rates = (6 * k, 12 * k, 18 * k)
    # Head modules live beside the backbone's, so the state_dict keys are timm's + the head's.
    model.aspp = Aspp(2048, rates, align_corners)
    model.decoder = Decoder(align_corners)
    model.logits = nn.Conv2d(256, classes, 1, bias=True)
    block = low_level_block(model)
    tap_module = model.blocks[block].stack.act3 if post_relu_low_level else model.blocks[block].stack.conv2

    def forward(self, x):
        captured = {}
        hook = tap_module.register_forward_hook(lambda _m, _i, out: captured.__setitem__("low", out.clone()))
        try:
            feats = self.forward_features(x)
        finally:
            hook.remove()
        logits = self.logits(self.decoder(self.aspp(feats), captured["low"]))
        return F.interpolate(logits, size=x.shape[-2:], mode="bilinear", align_corners=align_corners)

    model.forward = types.MethodType(forward, model)
    return model


def relative_deviation(a, b):
    return float((a - b).abs().max() / b.abs().max())


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=os.path.join(ROOT, "fixtures/deeplab"))
    args = ap.parse_args()
    os.makedirs(args.out, exist_ok=True)
    torch.manual_seed(0)
    torch.set_num_threads(max(1, os.cpu_count() or 1))
    manifest = []
    for backbone, size, os_, classes in CASES:
        name = f"deeplabv3plus_{backbone}_s{size}_os{os_}_k{classes}"
        model = build(backbone, os_, classes)
        fill_formula_weights(model)
        calibration = to_input(np.stack([photo(size), pattern(size)]))
        calibrate_norms(model, calibration)
        norms = norm_state(model)
        model.eval()
        u8 = np.stack([photo(size), pattern(size)])
        x = to_input(u8)
        with torch.no_grad():
            logits = model(x)
        sens = {}
        for what, kwargs in [("align_corners_false", {"align_corners": False}), ("post_relu_low_level", {"post_relu_low_level": True})]:
            other = build(backbone, os_, classes, **kwargs)
            other.load_state_dict(model.state_dict())
            other.eval()
            with torch.no_grad():
                sens[what] = relative_deviation(other(x), logits)
        for mod in list(model.aspp.modules()) + list(model.decoder.modules()):
            if isinstance(mod, nn.BatchNorm2d):
                mod.eps = 1e-3
        with torch.no_grad():
            sens["head_bn_eps_1e-3"] = relative_deviation(model(x), logits)
        for what, dev in sens.items():
            if dev < 100 * TOLERANCE:
                sys.exit(f"{name}: a deliberate mistake ({what}) moves logits only {dev:.2e}")
        # The class map too (small, stored whole): what `xception segment` writes for these pixels.
        tensors = {"input_u8": u8, "mask": logits.argmax(1).numpy().astype(np.uint8)}
        store(tensors, "logits", logits.numpy())
        meta = {"backbone": backbone, "size": size, "output_stride": os_, "classes": classes, "sensitivity": sens,
                "timm": timm.__version__, "torch": torch.__version__}
        save_file(tensors, os.path.join(args.out, f"{name}.safetensors"), metadata={"case": json.dumps(meta)})
        save_file(norms, os.path.join(args.out, f"{name}_norms.safetensors"), metadata={"case": name})
        manifest.append({"file": f"{name}.safetensors", "norms": f"{name}_norms.safetensors", **meta})
        print(f"{name}: logits scale {logits.abs().max():.3f}; sensitivity "
              + ", ".join(f"{k} {v:.2e}" for k, v in sens.items()), flush=True)
    with open(os.path.join(args.out, "manifest.json"), "w") as f:
        json.dump(manifest, f, indent=1)


if __name__ == "__main__":
    main()
