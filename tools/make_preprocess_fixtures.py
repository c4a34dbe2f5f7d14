#!/usr/bin/env python3
"""Preprocessing fixtures from the real Pillow / torchvision / timm code.

Keras' `load_img(path, target_size, interpolation)` is Pillow's `Image.resize` on the RGB image
(keras/src/utils/image_utils.py), followed by `x / 127.5 - 1` ('tf' mode); timm's eval transform is
torchvision's Resize (shorter side, Pillow underneath) + CenterCrop + ToTensor + Normalize. This
writes the uint8 results of those resizes as PNG (lossless) and a few whole float32 outputs of
timm's transform, plus JPEG and WebP encodings of the test photo with Pillow's decode of them.

Usage: tools/make_preprocess_fixtures.py [--out fixtures/preprocess]
"""
import argparse
import json
import os

import numpy as np
import timm
import torchvision
from PIL import Image
from safetensors.numpy import save_file
from timm.data.transforms_factory import transforms_imagenet_eval

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FILTERS = {"nearest": Image.NEAREST, "bilinear": Image.BILINEAR, "bicubic": Image.BICUBIC}

# (source image, width, height, filter): downscales of both axes, odd sizes, an upscale.
RESIZES = [
    ("chelsea.png", 150, 150, "nearest"),
    ("chelsea.png", 299, 299, "nearest"),
    ("chelsea.png", 97, 97, "nearest"),
    ("chelsea.png", 600, 401, "nearest"),
    ("chelsea.png", 299, 299, "bilinear"),
    ("chelsea.png", 150, 150, "bilinear"),
    ("chelsea.png", 299, 299, "bicubic"),
    ("chelsea.png", 97, 97, "bicubic"),
    ("coffee.png", 480, 480, "bicubic"),
    ("coffee.png", 224, 150, "bilinear"),
]

# timm eval transforms: (source, img_size, crop_pct, interpolation)
TIMM = [
    ("chelsea.png", 299, 0.8975, "bicubic"),
    ("coffee.png", 299, 0.903, "bicubic"),
    ("chelsea.png", 64, 0.94, "bilinear"),
    ("coffee.png", 33, 0.875, "bicubic"),
]


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=os.path.join(ROOT, "fixtures/preprocess"))
    args = ap.parse_args()
    os.makedirs(args.out, exist_ok=True)
    images = os.path.join(ROOT, "fixtures/images")
    manifest = {"pillow": Image.__version__, "torchvision": torchvision.__version__, "timm": timm.__version__,
                "resize": [], "timm_eval": []}

    for src, w, h, filt in RESIZES:
        img = Image.open(os.path.join(images, src)).convert("RGB")
        out = img.resize((w, h), FILTERS[filt])
        name = f"resize_{os.path.splitext(src)[0]}_{w}x{h}_{filt}.png"
        out.save(os.path.join(args.out, name))
        manifest["resize"].append({"source": src, "width": w, "height": h, "filter": filt, "expected": name})

    tensors = {}
    for i, (src, size, crop_pct, interp) in enumerate(TIMM):
        img = Image.open(os.path.join(images, src)).convert("RGB")
        t = transforms_imagenet_eval(img_size=size, crop_pct=crop_pct, interpolation=interp,
                                     mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))
        x = t(img).numpy()  # CHW float32
        key = f"timm{i}" if size <= 64 else None  # whole float outputs only where small
        if key:
            tensors[key] = np.ascontiguousarray(x.transpose(1, 2, 0))  # HWC like ours
        # The uint8 image after Resize + CenterCrop, before ToTensor/Normalize.
        u8 = img
        for step in t.transforms[:-2]:
            u8 = step(u8)
        name = f"timm_{i}_{os.path.splitext(src)[0]}_{size}.png"
        u8.save(os.path.join(args.out, name))
        manifest["timm_eval"].append({"source": src, "size": size, "crop_pct": crop_pct, "interpolation": interp,
                                      "tensor": key, "expected_u8": name,
                                      "transform": [repr(s) for s in t.transforms]})

    # Encodings of the photo and what Pillow's `open(...).convert("RGB")` makes of them (what Keras
    # and timm would see). Lossless ones must decode to the source pixels; the JPEG's Pillow
    # decode is stored as PNG.
    img = Image.open(os.path.join(images, "chelsea.png")).convert("RGB")
    small = img.crop((150, 60, 310, 180))
    img.save(os.path.join(images, "chelsea.jpg"), quality=90)
    img.save(os.path.join(images, "chelsea_lossless.webp"), lossless=True)
    small.convert("L").save(os.path.join(images, "chelsea_grey.png"))
    rgba = small.convert("RGBA")
    rgba.putalpha(128)
    rgba.save(os.path.join(images, "chelsea_rgba.png"))
    small.save(os.path.join(args.out, "chelsea_crop.png"))
    Image.open(os.path.join(images, "chelsea.jpg")).convert("RGB").save(os.path.join(args.out, "decoded_chelsea_jpg.png"))
    webp = np.asarray(Image.open(os.path.join(images, "chelsea_lossless.webp")).convert("RGB"))
    assert (webp == np.asarray(img)).all(), "lossless WebP should decode to the source"
    assert (np.asarray(Image.open(os.path.join(images, "chelsea_rgba.png")).convert("RGB")) == np.asarray(small)).all()
    grey = np.asarray(Image.open(os.path.join(images, "chelsea_grey.png")).convert("RGB"))
    assert (grey[..., 0] == grey[..., 1]).all() and (grey[..., 1] == grey[..., 2]).all()
    manifest["decode"] = [
        {"file": "chelsea.jpg", "expected": "decoded_chelsea_jpg.png"},
        {"file": "chelsea_lossless.webp", "expected": "../images/chelsea.png"},
        {"file": "chelsea_rgba.png", "expected": "chelsea_crop.png"},
    ]

    save_file(tensors, os.path.join(args.out, "arrays.safetensors"))
    with open(os.path.join(args.out, "manifest.json"), "w") as f:
        json.dump(manifest, f, indent=1)
    print(f"wrote {len(manifest['resize'])} resizes, {len(TIMM)} timm transforms, {len(manifest['decode'])} decodes")


if __name__ == "__main__":
    main()
