#!/usr/bin/env python3
"""Export the Fashion-MNIST test split as an ImageFolder tree of 28x28 greyscale PNGs.

    python3 tools/export_fashion_mnist.py --out .data/fashion-mnist-test

One sub-folder per class (`0_t-shirt-top`, ..., `9_ankle_boot`), files `NNNNN.png` numbered by
their index in the IDX file, so `fasternet-serve eval --data DIR` and tools/eval_timm.py see the
same 10,000 images.
"""
import argparse
import os

from PIL import Image

import fashion_mnist


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data-dir", default=fashion_mnist.DEFAULT_DIR)
    ap.add_argument("--split", default="t10k", choices=["t10k", "train"])
    ap.add_argument("--out", required=True)
    ap.add_argument("--limit", type=int, default=0, help="export only the first N images (0: all)")
    args = ap.parse_args()
    images, labels = fashion_mnist.load(args.split, args.data_dir)
    n = args.limit or len(images)
    for folder in fashion_mnist.FOLDERS:
        os.makedirs(os.path.join(args.out, folder), exist_ok=True)
    for i in range(n):
        path = os.path.join(args.out, fashion_mnist.FOLDERS[labels[i]], f"{i:05d}.png")
        Image.fromarray(images[i], mode="L").save(path, optimize=False)
    print(f"wrote {n} images to {args.out}")


if __name__ == "__main__":
    main()
