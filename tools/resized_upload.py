"""Writes what a client that resizes before uploading sends: an RGB JPEG (quality 90) whose
shorter side is the model's resize target, floor(224 / 0.9) = 248 for the ImageNet default.

    .venv/bin/python tools/resized_upload.py SRC DST [--short-side 248]

Used for the "pre-sized JPEG" rows of the load-test table in docs/performance.md, e.g. with
skimage's chelsea.png as SRC and `tools/loadtest.sh --models t0 --image DST`.
"""
import argparse

from PIL import Image


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("src")
    ap.add_argument("dst")
    ap.add_argument("--short-side", type=int, default=248)
    args = ap.parse_args()
    image = Image.open(args.src).convert("RGB")
    w, h = image.size
    scale = args.short_side / min(w, h)
    image = image.resize((round(w * scale), round(h * scale)), Image.BICUBIC)
    image.save(args.dst, quality=90)
    print(f"{args.dst}: {image.size[0]}x{image.size[1]}")


if __name__ == "__main__":
    main()
