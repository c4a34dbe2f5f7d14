#!/usr/bin/env python3
"""TensorFlow checkpoints written by TensorFlow itself, for the Rust tensor-bundle reader.

1. fixtures/tf/format/ (committed, small): `tf.raw_ops.SaveV2` of tensors of every dtype we read
   (float32/64, float16, bfloat16, int32/64, uint8, bool) and a string tensor we must skip, with
   scalar, empty and 4-D shapes and enough long, similar names to span several SSTable blocks
   with prefix-compressed keys. `expected.safetensors` holds what TF's own reader
   (`tf.train.load_checkpoint(...).get_tensor`) returns, as float32.
2. With --deeplab DIR: a full DeepLabv3+ checkpoint under the TF DeepLab variable names of
   shared/spec/deeplabv3plus.md section 6 and aligned_xception.md section 8.3, in TF layouts,
   holding exactly the weights of the fixtures/deeplab case (formula weights + its calibrated
   BN statistics), plus the extras real checkpoints carry (global_step, Momentum slots). 100+ MB,
   so it goes to the cache, not the repository; the Rust test that reads it compares our logits
   with the PyTorch reference's.

Usage: tools/make_tf_checkpoint_fixtures.py [--out fixtures/tf] [--deeplab ~/.cache/xception/tf]

TensorFlow and torch each bundle LLVM and cannot share a process, so everything TensorFlow does
runs in a child process of this script (`--tf-format`, `--tf-write`) that never imports torch.
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile

import numpy as np
from safetensors.numpy import load_file, save_file

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)


def save_v2(prefix, tensors):
    import tensorflow as tf
    names = list(tensors)
    tf.raw_ops.SaveV2(prefix=prefix, tensor_names=names, shape_and_slices=[""] * len(names),
                      tensors=[tensors[n] for n in names])


def format_fixture(out):
    import tensorflow as tf
    os.makedirs(out, exist_ok=True)
    rng = np.random.default_rng(20171128)
    u = lambda _name, n: rng.uniform(-1, 1, n)  # noqa: E731
    t = {
        "scalar_f32": tf.constant(3.25, tf.float32),
        "empty_f32": tf.zeros([0, 4], tf.float32),
        "conv/weights": tf.constant(u("conv", 3 * 3 * 5 * 7).reshape(3, 3, 5, 7), tf.float32),
        "f64": tf.constant(u("f64", 6).reshape(2, 3), tf.float64),
        "f16": tf.constant(u("f16", 9), tf.float16),
        "bf16": tf.constant(u("bf16", 9), tf.bfloat16),
        "i32": tf.constant(np.arange(-5, 5, dtype=np.int32)),
        "global_step": tf.constant(123456789012, tf.int64),
        "u8": tf.constant(np.arange(250, 256, dtype=np.uint8)),
        "flag": tf.constant([True, False, True]),
        "a_string": tf.constant(["not", "numbers"]),
    }
    # Many long names sharing prefixes: several index blocks, restarts, prefix compression.
    for i in range(400):
        t[f"xception_65/middle_flow/block1/unit_{i}/xception_module/separable_conv1_depthwise/BatchNorm/moving_variance"] = \
            tf.constant(u(f"mv{i}", 17), tf.float32)
    prefix = os.path.join(out, "model.ckpt")
    save_v2(prefix, t)
    reader = tf.train.load_checkpoint(prefix)
    expected = {}
    for name, dtype in reader.get_variable_to_dtype_map().items():
        if dtype == tf.string:
            continue
        expected[name] = np.asarray(reader.get_tensor(name)).astype(np.float32)
    save_file(expected, os.path.join(out, "expected.safetensors"), metadata={"tensorflow": tf.__version__})
    print(f"{prefix}: {len(t)} tensors; index {os.path.getsize(prefix + '.index')} bytes")


# ---- DeepLab names (spec) -------------------------------------------------------------------

def tf_name(key, net, blocks_tf):
    """TF DeepLab variable name of a PyTorch key (aligned_xception.md 8.3, deeplabv3plus.md 6)."""
    bn = {"weight": "gamma", "bias": "beta", "running_mean": "moving_mean", "running_var": "moving_variance"}
    parts = key.split(".")
    leaf = parts[-1]

    def norm_or_weights(scope, kind):
        if kind in ("conv", "conv_pw"):
            return f"{scope}/weights"
        if kind == "conv_dw":
            return f"{scope}/depthwise_weights"
        return f"{scope}/BatchNorm/{bn[leaf]}"

    if parts[0] == "stem":
        return norm_or_weights(f"{net}/entry_flow/conv1_{int(parts[1]) + 1}", parts[2])
    if parts[0] == "blocks":
        unit = f"{net}/{blocks_tf[int(parts[1])]}/xception_module"
        if parts[2] == "shortcut":
            return norm_or_weights(f"{unit}/shortcut", parts[3])
        j = parts[3][-1]
        kind = parts[4]
        half = "depthwise" if kind in ("conv_dw", "bn_dw") else "pointwise"
        return norm_or_weights(f"{unit}/separable_conv{j}_{half}", kind)
    if parts[0] == "logits":
        return "logits/semantic/" + ("weights" if leaf == "weight" else "biases")
    scope = {"aspp": "", "decoder": "decoder/"}[parts[0]]
    module = parts[1]
    if module == "project":
        module = "concat_projection"
    elif module.startswith("conv"):
        module = f"decoder_{module}"
    if parts[2] in ("conv_dw", "bn_dw"):
        return norm_or_weights(f"{scope}{module}_depthwise", parts[2])
    if parts[2] in ("conv_pw", "bn_pw"):
        return norm_or_weights(f"{scope}{module}_pointwise", parts[2])
    return norm_or_weights(f"{scope}{module}", parts[2])


def tf_layout(key, value):
    if value.ndim == 4:
        if key.endswith("conv_dw.weight"):  # (C,1,kh,kw) -> (kh,kw,C,1)
            return value.transpose(2, 3, 0, 1)
        return value.transpose(2, 3, 1, 0)  # (O,I,kh,kw) -> (kh,kw,I,O)
    return value


def timm_blocks_to_tf(backbone):
    """timm block index -> `<flow>/block<k>/unit_<u>` (aligned_xception.md 3.1)."""
    entry = {"xception41": 3, "xception65": 3, "xception71": 5}[backbone]
    middle = {"xception41": 8, "xception65": 16, "xception71": 16}[backbone]
    names = [f"entry_flow/block{i + 1}/unit_1" for i in range(entry)]
    names += [f"middle_flow/block1/unit_{i + 1}" for i in range(middle)]
    names += ["exit_flow/block1/unit_1", "exit_flow/block2/unit_1"]
    return names


def deeplab_checkpoint(out, case):
    sys.path.insert(0, HERE)
    import torch  # noqa: F401  (never in the same process as TensorFlow)
    from make_deeplab_fixtures import build
    from make_fixtures import fill_formula_weights, load_norm_state
    manifest = {c["file"]: c for c in json.load(open(os.path.join(ROOT, "fixtures/deeplab/manifest.json")))}
    c = manifest[f"{case}.safetensors"]
    model = build(c["backbone"], c["output_stride"], c["classes"])
    fill_formula_weights(model)
    load_norm_state(model, load_file(os.path.join(ROOT, "fixtures/deeplab", c["norms"])))
    net = {"xception41": "xception_41", "xception65": "xception_65", "xception71": "xception_71"}[c["backbone"]]
    blocks_tf = timm_blocks_to_tf(c["backbone"])
    tensors = {"global_step": np.array(30000, np.int64)}
    for key, value in model.state_dict().items():
        if key.endswith("num_batches_tracked"):
            continue
        name = tf_name(key, net, blocks_tf)
        assert name not in tensors, name
        tensors[name] = np.ascontiguousarray(tf_layout(key, value.numpy()))
        if "BatchNorm" not in name:
            tensors[name + "/Momentum"] = np.zeros_like(tensors[name])  # optimizer slots real checkpoints carry
    os.makedirs(out, exist_ok=True)
    prefix = os.path.join(out, f"{case}.ckpt")
    with tempfile.TemporaryDirectory() as tmp:
        staged = os.path.join(tmp, "tensors.safetensors")
        save_file(tensors, staged)
        subprocess.run([sys.executable, __file__, "--tf-write", staged, prefix], check=True)
    # Its index (names, dtypes, shapes; 40 kB) is committed: CI checks our name mapping against it.
    import shutil
    shutil.copyfile(prefix + ".index", os.path.join(ROOT, "fixtures/tf/deeplabv3plus_xception65_k21.ckpt.index"))
    print(f"{prefix}: {len(tensors)} tensors, data {os.path.getsize(prefix + '.data-00000-of-00001') / 1e6:.0f} MB")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=os.path.join(ROOT, "fixtures/tf"))
    ap.add_argument("--deeplab", help="also write the full DeepLab checkpoint into this directory")
    ap.add_argument("--tf-format", help=argparse.SUPPRESS)
    ap.add_argument("--tf-write", nargs=2, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.tf_format:
        return format_fixture(args.tf_format)
    if args.tf_write:
        import tensorflow as tf
        staged, prefix = args.tf_write
        return save_v2(prefix, {k: tf.constant(v) for k, v in load_file(staged).items()})
    subprocess.run([sys.executable, __file__, "--tf-format", os.path.join(args.out, "format")], check=True)
    if args.deeplab:
        deeplab_checkpoint(os.path.expanduser(args.deeplab), "deeplabv3plus_xception65_s129_os16_k21")


if __name__ == "__main__":
    main()
