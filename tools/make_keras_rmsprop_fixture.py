#!/usr/bin/env python3
"""Keras' RMSprop (TensorFlow's form: epsilon inside the square root, decoupled weight decay) on
the head of fixtures/optim/head_steps.safetensors: the same weights, batches and labels, three
steps, cross-entropy from logits with label smoothing 0.1. The Rust test runs our TF-style
RMSprop (crates/xception/src/rmsprop_tf.rs) through the training loop's step and must match.

Keras 3 on TensorFlow, in its own process (TensorFlow and torch do not share one here).
Usage: tools/make_keras_rmsprop_fixture.py [--out fixtures/optim/keras_rmsprop.safetensors]
"""
import argparse
import json
import os

os.environ["KERAS_BACKEND"] = "tensorflow"
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
import numpy as np  # noqa: E402
from safetensors.numpy import load_file, save_file  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# (name, Keras RMSprop arguments)
SETTINGS = [
    ("keras_rmsprop", dict(learning_rate=0.01, rho=0.9, momentum=0.0, epsilon=1e-7, weight_decay=None)),
    ("keras_rmsprop_momentum_wd", dict(learning_rate=0.01, rho=0.9, momentum=0.9, epsilon=1e-3, weight_decay=0.05)),
]


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=os.path.join(ROOT, "fixtures/optim/keras_rmsprop.safetensors"))
    args = ap.parse_args()
    import keras
    import tensorflow as tf
    src = load_file(os.path.join(ROOT, "fixtures/optim/head_steps.safetensors"))
    w0, b0, y = src["w0"], src["b0"], src["y"].astype(np.int64)
    xs = [src[f"x{t}"] for t in range(3)]
    classes = w0.shape[0]
    onehot = np.eye(classes, dtype=np.float32)[y]
    out = {}
    for name, kw in SETTINGS:
        layer = keras.layers.Dense(classes)
        layer.build((None, w0.shape[1]))
        layer.kernel.assign(w0.T)  # Keras keeps (in, out)
        layer.bias.assign(b0)
        opt = keras.optimizers.RMSprop(**kw)
        loss_fn = keras.losses.CategoricalCrossentropy(from_logits=True, label_smoothing=0.1)
        losses = []
        for t, x in enumerate(xs):
            with tf.GradientTape() as tape:
                loss = loss_fn(onehot, layer(x))
            grads = tape.gradient(loss, layer.trainable_variables)
            opt.apply_gradients(zip(grads, layer.trainable_variables))
            losses.append(float(loss))
            out[f"{name}.w{t + 1}"] = np.ascontiguousarray(layer.kernel.numpy().T)
            out[f"{name}.b{t + 1}"] = layer.bias.numpy().copy()
        out[f"{name}.loss"] = np.array(losses, dtype=np.float32)
        print(f"{name}: losses {losses}")
    meta = {"settings": [{"name": n, **{k: v for k, v in kw.items()}} for n, kw in SETTINGS], "keras": keras.__version__, "tensorflow": tf.__version__}
    save_file(out, args.out, metadata={"case": json.dumps(meta)})


if __name__ == "__main__":
    main()
