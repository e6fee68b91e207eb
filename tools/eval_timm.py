#!/usr/bin/env python3
"""Measure the bundled model's accuracy with timm/PyTorch (the Python reference figure).

    .venv/bin/python tools/export_fashion_mnist.py --out .data/fashion-mnist-test
    .venv/bin/python tools/eval_timm.py --weights weights --data .data/fashion-mnist-test

Loads WEIGHTS/model.safetensors into timm.create_model(config['architecture'],
num_classes=config['num_classes']), builds the eval transform from WEIGHTS/config.json's
pretrained_cfg (timm.data.resolve_data_config + create_transform), reads DATA as an ImageFolder
(one sub-folder per class, sorted folder names = class index; PIL open + convert('RGB')) and
prints top-1 / top-5 accuracy and a per-class table. CPU, 2 threads, batches of 256.
"""
import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import timm
import timm.data
import torch
from safetensors.torch import load_file
from torchvision.datasets import ImageFolder


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--weights", default="weights", help="folder with model.safetensors + config.json")
    ap.add_argument("--data", required=True, help="ImageFolder root (one sub-folder per class)")
    ap.add_argument("--batch-size", type=int, default=256)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--workers", type=int, default=0, help="DataLoader worker processes")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    t0 = time.time()

    with open(os.path.join(args.weights, "config.json")) as f:
        config = json.load(f)
    model = timm.create_model(config["architecture"], pretrained=False,
                              num_classes=config["num_classes"])
    state = load_file(os.path.join(args.weights, "model.safetensors"))
    model.load_state_dict(state, strict=True)
    model.eval()

    data_config = timm.data.resolve_data_config({}, pretrained_cfg=config["pretrained_cfg"])
    transform = timm.data.create_transform(**data_config, is_training=False)
    dataset = ImageFolder(args.data, transform=transform,
                          loader=_pil_rgb)
    num_classes = len(dataset.classes)
    assert num_classes == config["num_classes"], (dataset.classes, config["num_classes"])
    loader = torch.utils.data.DataLoader(dataset, batch_size=args.batch_size, shuffle=False,
                                         num_workers=args.workers)
    print(f"model {config['architecture']} ({sum(p.numel() for p in model.parameters())} params), "
          f"{len(dataset)} images in {num_classes} classes")
    print(f"data config: {data_config}")
    print(f"transform: {transform}")

    correct1 = torch.zeros(num_classes, dtype=torch.long)
    correct5 = 0
    count = torch.zeros(num_classes, dtype=torch.long)
    k = min(5, num_classes)
    with torch.inference_mode():
        for x, y in loader:
            logits = model(x)
            top = logits.topk(k, dim=1).indices
            hit1 = top[:, 0] == y
            correct5 += (top == y[:, None]).any(dim=1).sum().item()
            count += torch.bincount(y, minlength=num_classes)
            correct1 += torch.bincount(y[hit1], minlength=num_classes)
    n = count.sum().item()
    wall = time.time() - t0

    names = config.get("label_names") or dataset.classes
    print()
    print(f"{'class':<24} {'images':>7} {'top-1':>8}")
    for c in range(num_classes):
        acc = 100.0 * correct1[c].item() / max(count[c].item(), 1)
        print(f"{c:>2} {names[c]:<21} {count[c].item():>7} {acc:>7.2f}%")
    print()
    print(f"top-1 {100.0 * correct1.sum().item() / n:.2f}%  top-5 {100.0 * correct5 / n:.2f}%  "
          f"({n} images, wall {wall:.1f} s, {args.threads} threads)")


def _pil_rgb(path):
    from PIL import Image
    with open(path, "rb") as f:
        return Image.open(f).convert("RGB")


if __name__ == "__main__":
    main()
