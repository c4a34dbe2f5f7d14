#!/usr/bin/env python3
"""Small PyTorch checkpoints written by the real torch.save, for the `.pth` reader's tests.

Writes fixtures/pth/{plain,nested,legacy}.pth and expected.json (the values as float64 lists).
"""
import json
import os

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def main():
    out = os.path.join(ROOT, "fixtures/pth")
    os.makedirs(out, exist_ok=True)
    sd = {
        "conv1.weight": (torch.arange(54, dtype=torch.float32).reshape(2, 3, 3, 3) - 20) / 7,
        "bn1.weight": torch.tensor([1.5, -0.25], dtype=torch.float32),
        "bn1.running_var": torch.tensor([0.5, 2.0], dtype=torch.float64),
        "bn1.num_batches_tracked": torch.tensor(5, dtype=torch.int64),
        "half": torch.tensor([1.0, -2.5, 65504.0, 1e-4], dtype=torch.float16),
        "bf16": torch.tensor([3.0, -0.15625], dtype=torch.bfloat16),
        # a non-contiguous view: stored with strides
        "transposed": torch.arange(6, dtype=torch.float32).reshape(2, 3).t(),
    }
    torch.save(sd, os.path.join(out, "plain.pth"))
    torch.save({"state_dict": sd, "epoch": 3, "arch": "test"}, os.path.join(out, "nested.pth"))
    torch.save(sd, os.path.join(out, "legacy.pth"), _use_new_zipfile_serialization=False)
    expected = {k: {"shape": list(v.shape), "values": v.double().flatten().tolist()}
                for k, v in sd.items() if not k.endswith("num_batches_tracked")}
    with open(os.path.join(out, "expected.json"), "w") as f:
        json.dump({"torch": torch.__version__, "tensors": expected}, f, indent=1)
    print("wrote", sorted(os.listdir(out)))


if __name__ == "__main__":
    main()
