#!/usr/bin/env python3
"""Generate preprocessing fixtures: timm's eval transform applied to a small set of images.

    .venv/bin/python tools/gen_preprocess_fixtures.py

Writes tests/fixtures/preprocess/inputs/ (source images, copied from scikit-image and foolbox or
derived from them), tests/fixtures/preprocess/expected/ (the transform output as 8-bit RGB PNG)
and tests/fixtures/preprocess/manifest.json.

Reference: `PIL.Image.open(path).convert('RGB')` followed by
`timm.data.create_transform(**timm.data.resolve_data_config({}, pretrained_cfg=cfg))`
(eval mode: Resize (bicubic) -> CenterCrop -> ToTensor -> Normalize). The normalised tensor is
mapped back with x*std+mean, *255; it is checked to be within 1e-3 of an integer everywhere and
stored rounded as a lossless PNG, so the fixture is exact, independent of mean/std.

Resize rules, as timm 1.0.31 / torchvision 0.29 compute them (recorded per case as resize_to):
  scale = floor(s / crop_pct) for each target side s.
  square input_size: torchvision Resize(int): shorter side -> scale,
      longer side -> int(scale * long / short) (truncation).
  non-square input_size: timm ResizeKeepRatio(longest=0): r = min(H/scale_h, W/scale_w),
      size = (round(H / r), round(W / r)) with Python round (half to even).
  CenterCrop: top = int(round((h - crop_h) / 2)), left likewise (Python round, half to even).
"""
import argparse
import json
import math
import os
import shutil
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import numpy as np
import timm
import timm.data
from PIL import Image
from torchvision import transforms as T

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OUT = os.path.join(REPO_ROOT, "tests", "fixtures", "preprocess")
SKIMAGE_DATA = os.path.join(os.path.dirname(__import__("skimage").__file__), "data")
FOOLBOX_DATA = os.path.join(os.path.dirname(__import__("foolbox").__file__), "data")
BUNDLED_CONFIG = os.path.join(REPO_ROOT, "weights", "config.json")

FOOLBOX_PICKS = ["imagenet_14_129.jpg", "imagenet_11_630.jpg", "imagenet_10_541.jpg"]


def make_inputs(dst):
    """Copy / derive the source images into dst. Returns {file name: description}."""
    os.makedirs(dst, exist_ok=True)
    desc = {}

    def copy(src_dir, name, out_name=None, note=""):
        out_name = out_name or name
        shutil.copyfile(os.path.join(src_dir, name), os.path.join(dst, out_name))
        desc[out_name] = note

    copy(SKIMAGE_DATA, "chelsea.png", note="scikit-image chelsea.png, as is")
    copy(SKIMAGE_DATA, "rocket.jpg", note="scikit-image rocket.jpg, as is")

    coffee = Image.open(os.path.join(SKIMAGE_DATA, "coffee.png")).convert("RGB")
    coffee.save(os.path.join(dst, "coffee.jpg"), quality=90)
    desc["coffee.jpg"] = "scikit-image coffee.png re-encoded as JPEG q90"

    astronaut = Image.open(os.path.join(SKIMAGE_DATA, "astronaut.png")).convert("RGB")
    astronaut.save(os.path.join(dst, "astronaut.jpg"), quality=90)
    desc["astronaut.jpg"] = "scikit-image astronaut.png re-encoded as JPEG q90"

    camera = Image.open(os.path.join(SKIMAGE_DATA, "camera.png"))
    assert camera.mode == "L"
    camera.save(os.path.join(dst, "camera.jpg"), quality=90)
    desc["camera.jpg"] = "scikit-image camera.png re-encoded as greyscale (1-channel) JPEG q90"

    for name in FOOLBOX_PICKS:
        copy(FOOLBOX_DATA, name, note=f"foolbox data/{name}, as is (progressive JPEG)")

    # RGBA: a 225x151 crop of chelsea with a radial alpha gradient; alpha is 0 outside a radius
    # while RGB stays the photo's (PIL convert('RGB') drops alpha without compositing).
    chelsea = Image.open(os.path.join(SKIMAGE_DATA, "chelsea.png")).convert("RGB")
    crop = np.asarray(chelsea.crop((113, 40, 113 + 225, 40 + 151)))
    h, w = crop.shape[:2]
    yy, xx = np.mgrid[0:h, 0:w]
    r = np.hypot((yy - h / 2) / (h / 2), (xx - w / 2) / (w / 2))
    alpha = np.clip((1.1 - r) / 0.8, 0, 1) * 255
    rgba = np.dstack([crop, alpha.round().astype(np.uint8)])
    assert (rgba[..., 3] == 0).any() and (rgba[rgba[..., 3] == 0][:, :3] != 0).any()
    Image.fromarray(rgba, "RGBA").save(os.path.join(dst, "chelsea_rgba.png"), optimize=True)
    desc["chelsea_rgba.png"] = ("225x151 crop of scikit-image chelsea.png with a radial alpha "
                                "gradient (corners alpha 0, RGB kept)")

    # Palette ('P'): coffee downscaled to 300x200, median-cut quantised to 256 colours.
    small = coffee.resize((300, 200), Image.LANCZOS)
    pal = small.quantize(colors=256, method=Image.Quantize.MEDIANCUT, dither=Image.Dither.NONE)
    assert pal.mode == "P"
    pal.save(os.path.join(dst, "coffee_palette.png"), optimize=True)
    desc["coffee_palette.png"] = ("scikit-image coffee.png downscaled to 300x200 and quantised to a "
                                  "256-colour palette (PNG colour type 3)")

    # Greyscale + alpha ('LA'): portrait 150x231 crop of camera, alpha ramp from 0 (top rows) to 255.
    cam = np.asarray(camera.crop((180, 40, 180 + 150, 40 + 231)))
    a = np.clip(np.linspace(-40, 300, cam.shape[0]), 0, 255).round().astype(np.uint8)
    la = np.dstack([cam, np.repeat(a[:, None], cam.shape[1], axis=1)])
    Image.fromarray(la, "LA").save(os.path.join(dst, "camera_la.png"), optimize=True)
    desc["camera_la.png"] = ("portrait 150x231 crop of scikit-image camera.png with a vertical alpha "
                             "ramp (top rows alpha 0), PNG colour type 4")
    return desc


def imagenet_cfg():
    return timm.models.get_pretrained_cfg("fasternet_t0.in1k").to_dict()


def bundled_cfg():
    with open(BUNDLED_CONFIG) as f:
        return json.load(f)["pretrained_cfg"]


# (input file, config label) ; config labels resolve to a timm data config below.
CASES = [
    # ImageNet evaluation: fasternet_t0.in1k test config (224, test_crop_pct 0.9 -> 248 -> 224)
    ("chelsea.png", "imagenet_test"),
    ("rocket.jpg", "imagenet_test"),
    ("imagenet_10_541.jpg", "imagenet_test"),
    ("chelsea_rgba.png", "imagenet_test"),
    ("camera_la.png", "imagenet_test"),
    # fasternet_t0.in1k default (non-test) config: 224, crop_pct 1.0
    ("imagenet_14_129.jpg", "imagenet_crop1"),
    ("coffee_palette.png", "imagenet_crop1"),
    # bundled model: weights/config.json (64, crop_pct 1.0, Fashion-MNIST mean/std)
    ("coffee.jpg", "bundled"),
    ("astronaut.jpg", "bundled"),
    ("camera.jpg", "bundled"),
    ("imagenet_11_630.jpg", "bundled"),
    ("rocket.jpg", "bundled"),
    ("chelsea_rgba.png", "bundled"),
    # non-square input_size (3, 160, 256), crop_pct 0.9
    ("rocket.jpg", "nonsquare"),
    ("camera_la.png", "nonsquare"),
]


def data_config(label):
    if label == "imagenet_test":
        return timm.data.resolve_data_config({}, pretrained_cfg=imagenet_cfg(), use_test_size=True)
    if label == "imagenet_crop1":
        return timm.data.resolve_data_config({}, pretrained_cfg=imagenet_cfg())
    if label == "bundled":
        return timm.data.resolve_data_config({}, pretrained_cfg=bundled_cfg())
    if label == "nonsquare":
        cfg = dict(imagenet_cfg(), input_size=(3, 160, 256), crop_pct=0.9)
        return timm.data.resolve_data_config({}, pretrained_cfg=cfg)
    raise ValueError(label)


def run_case(input_name, label, inputs_dir, expected_dir):
    dc = data_config(label)
    tf = timm.data.create_transform(
        input_size=dc["input_size"], crop_pct=dc["crop_pct"], crop_mode=dc.get("crop_mode"),
        interpolation=dc["interpolation"], mean=dc["mean"], std=dc["std"], is_training=False)
    steps = tf.transforms
    crop_idx = next(i for i, t in enumerate(steps) if isinstance(t, T.CenterCrop))
    assert isinstance(steps[-1], T.Normalize) and isinstance(steps[-2], T.ToTensor), tf

    src = Image.open(os.path.join(inputs_dir, input_name))
    mode = src.mode
    img = src.convert("RGB")
    resized = img
    for t in steps[:crop_idx]:
        resized = t(resized)
    rw, rh = resized.size
    _, ch, cw = dc["input_size"]
    top, left = int(round((rh - ch) / 2.0)), int(round((rw - cw) / 2.0))
    assert rh >= ch and rw >= cw

    x = tf(img).numpy().astype(np.float64)  # [3, H, W]
    mean = np.asarray(dc["mean"], dtype=np.float64)[:, None, None]
    std = np.asarray(dc["std"], dtype=np.float64)[:, None, None]
    v = (x * std + mean) * 255.0
    dev = np.abs(v - np.round(v)).max()
    assert dev < 1e-3, (input_name, label, dev)
    out = np.clip(np.round(v), 0, 255).astype(np.uint8).transpose(1, 2, 0)
    # Sanity: identical to resize + crop done by hand on the PIL image.
    assert np.array_equal(out, np.asarray(resized.crop((left, top, left + cw, top + ch))))

    scale = [math.floor(s / dc["crop_pct"]) for s in (ch, cw)]
    if scale[0] == scale[1]:
        rule = (f"torchvision Resize({scale[0]}): shorter side -> {scale[0]}, "
                f"longer side -> int({scale[0]} * long / short)")
    else:
        rule = (f"timm ResizeKeepRatio({scale}, longest=0): r = min(H / {scale[0]}, W / {scale[1]}), "
                f"size = (round(H / r), round(W / r)), Python round (half to even)")
    stem = os.path.splitext(input_name)[0]
    size_tag = f"{ch}" if ch == cw else f"{ch}x{cw}"
    exp_name = f"{stem}_{size_tag}_{dc['crop_pct']}.png"
    Image.fromarray(out, "RGB").save(os.path.join(expected_dir, exp_name), optimize=True)
    return {
        "input": f"inputs/{input_name}",
        "expected": f"expected/{exp_name}",
        "input_size": [ch, cw],
        "crop_pct": dc["crop_pct"],
        "interpolation": dc["interpolation"],
        "scale_size": scale,
        "resize_rule": rule,
        "resize_to": [rh, rw],
        "crop_top_left": [top, left],
        "mode": mode,
        "source_size": [src.size[1], src.size[0]],
        "config": label,
        "mean": [float(m) for m in dc["mean"]],
        "std": [float(s) for s in dc["std"]],
        "max_dev": float(dev),
    }


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=OUT)
    args = ap.parse_args()
    inputs_dir = os.path.join(args.out, "inputs")
    expected_dir = os.path.join(args.out, "expected")
    for d in (inputs_dir, expected_dir):
        if os.path.isdir(d):
            shutil.rmtree(d)
    os.makedirs(expected_dir)
    desc = make_inputs(inputs_dir)
    used = {c[0] for c in CASES}
    assert used == set(desc), set(desc) ^ used

    manifest = []
    for input_name, label in CASES:
        entry = run_case(input_name, label, inputs_dir, expected_dir)
        print(f"{entry['input']:32s} {entry['mode']:4s} {str(entry['source_size']):12s} -> "
              f"resize {str(entry['resize_to']):12s} crop {str(entry['input_size']):12s} "
              f"at {entry['crop_top_left']}  dev {entry['max_dev']:.1e}  ({label})")
        del entry["max_dev"]
        manifest.append(entry)
    with open(os.path.join(args.out, "manifest.json"), "w") as f:
        f.write("[\n" + ",\n".join(" " + json.dumps(e) for e in manifest) + "\n]\n")
    for name in sorted(desc):
        print(f"  inputs/{name}: {desc[name]}")


if __name__ == "__main__":
    main()
