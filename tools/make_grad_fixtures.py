#!/usr/bin/env python3
"""Training-step conformance fixtures: one forward and backward pass of the real timm model in
training mode (BatchNorm on batch statistics), with the formula weights and calibrated running
statistics of the timm fixtures (make_fixtures.py), on a photo and a pattern.

Recorded per case: the cross-entropy loss, the gradient of every parameter (whole when small, else
a seeded sample of 256 values, indices included), and every BatchNorm's running statistics after
the step (PyTorch momentum 0.1 for timm's nets; 0.01, Keras' 0.99 decay, for the Keras graph).

Usage: tools/make_grad_fixtures.py [--out fixtures/grad]
"""
import argparse
import json
import os
import sys

import numpy as np
import timm
import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.numpy import load_file, save_file

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from make_fixtures import ROOT, build_model, fill_formula_weights, load_norm_state, pattern, photo, store, to_input  # noqa: E402

# (variant, input size, classes, BN momentum in PyTorch's convention, shift added to every BN bias)
# The shifted case keeps every ReLU input far from 0: implementations whose rounding differs can
# then not disagree on which units are active, and gradients must agree to rounding.
CASES = [("xception41", 128, 5, 0.1, 0.0), ("legacy_xception", 128, 4, 0.1, 0.0), ("xception", 131, 3, 0.01, 0.0),
         ("xception41", 96, 5, 0.1, 4.0), ("xception", 99, 3, 0.01, 4.0)]
SAMPLE = 256


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=os.path.join(ROOT, "fixtures/grad"))
    args = ap.parse_args()
    os.makedirs(args.out, exist_ok=True)
    torch.set_num_threads(max(1, os.cpu_count() or 1))
    manifest = []
    for variant, size, classes, momentum, shift in CASES:
        model = build_model(variant, 32, "avg")
        model.reset_classifier(classes)
        fill_formula_weights(model)
        load_norm_state(model, load_file(os.path.join(ROOT, f"fixtures/timm/{variant}_norms.safetensors")))
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.momentum = momentum
                with torch.no_grad():
                    m.bias += shift
        model.train()
        u8 = np.stack([photo(size), pattern(size)])
        x = to_input(u8)
        y = torch.tensor([1, classes - 1])
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        tensors = {"input_u8": u8, "y": y.numpy().astype(np.float32), "loss": np.array([loss.item()], np.float32)}
        for name, p in model.named_parameters():
            store(tensors, f"grad.{name}", p.grad.numpy().astype(np.float32), whole_up_to=4 * SAMPLE, sample=SAMPLE)
        for name, m in model.named_modules():
            if isinstance(m, nn.BatchNorm2d):
                tensors[f"after.{name}.running_mean"] = m.running_mean.numpy().copy()
                tensors[f"after.{name}.running_var"] = m.running_var.numpy().copy()
        meta = {"variant": variant, "size": size, "classes": classes, "bn_momentum": momentum, "bias_shift": shift, "timm": timm.__version__, "torch": torch.__version__}
        file = f"{variant}_s{size}_k{classes}" + (f"_shift{shift:g}" if shift else "") + ".safetensors"
        save_file(tensors, os.path.join(args.out, file), metadata={"case": json.dumps(meta)})
        manifest.append({"file": file, **meta})
        print(f"{file}: loss {loss.item():.6f}, {sum(1 for _ in model.parameters())} parameter tensors", flush=True)
    with open(os.path.join(args.out, "manifest.json"), "w") as f:
        json.dump(manifest, f, indent=1)


if __name__ == "__main__":
    main()
