#!/usr/bin/env python3
"""Train the bundled model: timm FasterNet-T0, 10 classes, on Fashion-MNIST at 64x64.

    python3 tools/train_bundled.py --out weights            # GPU if present, else CPU

Reproducible: fixed seed, deterministic data order and augmentation draws. Every image is
upsampled 28 -> 64 with PIL bicubic once, exactly what the service's eval transform does
(crop_pct 1.0: resize shorter side to 64, center crop 64), replicated to 3 channels and
normalised with the Fashion-MNIST mean/std written to config.json. Training augmentation
(random shifts of up to 4 px and horizontal flips) runs on the tensors.

Writes OUT/model.safetensors (timm naming, fp32), OUT/config.json (timm hub layout plus label
names) and OUT/train_log.json (per-epoch loss and test accuracy, wall time, device).
"""
import argparse
import json
import math
import os
import platform
import random
import time

import numpy as np
import timm
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import save_file

import fashion_mnist

SIZE = 64
MEAN = 0.2860  # Fashion-MNIST train-set pixel mean / std in 0..1 units
STD = 0.3530


def upsample(images):
    out = np.empty((len(images), SIZE, SIZE), dtype=np.uint8)
    for i, a in enumerate(images):
        out[i] = np.asarray(Image.fromarray(a, mode="L").resize((SIZE, SIZE), Image.BICUBIC))
    return out


def normalise(x_uint8):
    x = x_uint8.float().div_(255.0).sub_(MEAN).div_(STD)
    return x.unsqueeze(1).expand(-1, 3, -1, -1)


def augment(x, gen):
    """Random translation (+-4 px) and horizontal flip on a [B,H,W] float batch in 0..1."""
    b = x.shape[0]
    shift = (torch.randint(-4, 5, (b, 2), generator=gen, device="cpu").float() * 2 / SIZE).to(x.device)
    flip = (torch.rand(b, generator=gen, device="cpu") < 0.5).float().mul(-2).add(1).to(x.device)
    theta = torch.zeros(b, 2, 3, device=x.device)
    theta[:, 0, 0] = flip
    theta[:, 1, 1] = 1
    theta[:, :, 2] = shift
    grid = F.affine_grid(theta, (b, 1, SIZE, SIZE), align_corners=False)
    return F.grid_sample(x.unsqueeze(1), grid, mode="nearest", padding_mode="zeros",
                         align_corners=False).squeeze(1)


@torch.no_grad()
def evaluate(model, x_test, y_test, device, batch=1000):
    model.eval()
    correct = 0
    for i in range(0, len(x_test), batch):
        xb = normalise(x_test[i:i + batch].to(device))
        correct += (model(xb).argmax(1).cpu() == y_test[i:i + batch]).sum().item()
    return correct / len(x_test)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data-dir", default=fashion_mnist.DEFAULT_DIR)
    ap.add_argument("--out", default="weights")
    ap.add_argument("--epochs", type=int, default=40)
    ap.add_argument("--batch-size", type=int, default=256)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--weight-decay", type=float, default=0.05)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--limit", type=int, default=0, help="use only N training images (smoke test)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = ap.parse_args()

    random.seed(args.seed)
    np.random.seed(args.seed)
    torch.manual_seed(args.seed)
    torch.backends.cudnn.benchmark = False
    device = torch.device(args.device)
    t_start = time.time()

    x_train, y_train = fashion_mnist.load("train", args.data_dir)
    x_test, y_test = fashion_mnist.load("t10k", args.data_dir)
    if args.limit:
        x_train, y_train = x_train[:args.limit], y_train[:args.limit]
        x_test, y_test = x_test[:args.limit], y_test[:args.limit]
    x_train = torch.from_numpy(upsample(x_train)).to(device)
    y_train = torch.from_numpy(y_train.astype(np.int64)).to(device)
    x_test = torch.from_numpy(upsample(x_test))
    y_test = torch.from_numpy(y_test.astype(np.int64))

    model = timm.create_model("fasternet_t0", pretrained=False, num_classes=10).to(device)
    model = model.to(memory_format=torch.channels_last)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=args.weight_decay)
    steps_per_epoch = math.ceil(len(x_train) / args.batch_size)
    total = steps_per_epoch * args.epochs
    warmup = steps_per_epoch * min(2, args.epochs)

    def lr_at(step):
        if step < warmup:
            return args.lr * (step + 1) / warmup
        t = (step - warmup) / max(1, total - warmup)
        return 1e-5 + (args.lr - 1e-5) * 0.5 * (1 + math.cos(math.pi * t))

    gen = torch.Generator().manual_seed(args.seed)
    use_amp = device.type == "cuda"
    log = []
    step = 0
    for epoch in range(args.epochs):
        model.train()
        perm = torch.randperm(len(x_train), generator=gen).to(device)
        loss_sum, t_epoch = 0.0, time.time()
        for i in range(steps_per_epoch):
            idx = perm[i * args.batch_size:(i + 1) * args.batch_size]
            xb = augment(x_train[idx].float().div_(255.0), gen)
            xb = ((xb - MEAN) / STD).unsqueeze(1).expand(-1, 3, -1, -1)
            xb = xb.contiguous(memory_format=torch.channels_last)
            for g in opt.param_groups:
                g["lr"] = lr_at(step)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_amp):
                loss = F.cross_entropy(model(xb), y_train[idx], label_smoothing=0.1)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            loss_sum += loss.item()
            step += 1
        acc = evaluate(model, x_test, y_test, device)
        log.append({"epoch": epoch + 1, "loss": loss_sum / steps_per_epoch, "test_top1": acc,
                    "seconds": time.time() - t_epoch})
        print(f"epoch {epoch + 1}/{args.epochs} loss {loss_sum / steps_per_epoch:.4f} "
              f"test top-1 {acc * 100:.2f}% ({time.time() - t_epoch:.1f} s)", flush=True)

    model = model.to("cpu", memory_format=torch.contiguous_format).eval()
    os.makedirs(args.out, exist_ok=True)
    state = {k: v.detach().contiguous().float() if v.is_floating_point() else v.detach().contiguous()
             for k, v in model.state_dict().items()}
    save_file(state, os.path.join(args.out, "model.safetensors"), metadata={"format": "pt"})
    config = {
        "architecture": "fasternet_t0",
        "num_classes": 10,
        "num_features": 1280,
        "label_names": fashion_mnist.LABELS,
        "pretrained_cfg": {
            "tag": "fashion_mnist",
            "input_size": [3, SIZE, SIZE],
            "interpolation": "bicubic",
            "crop_pct": 1.0,
            "crop_mode": "center",
            "mean": [MEAN] * 3,
            "std": [STD] * 3,
            "num_classes": 10,
            "first_conv": "patch_embed.proj",
            "classifier": "classifier",
            "license": "mit",
        },
    }
    with open(os.path.join(args.out, "config.json"), "w") as f:
        json.dump(config, f, indent=2)
        f.write("\n")
    with open(os.path.join(args.out, "train_log.json"), "w") as f:
        json.dump({"args": vars(args), "torch": torch.__version__, "timm": timm.__version__,
                   "device": torch.cuda.get_device_name() if use_amp else platform.processor(),
                   "wall_seconds": time.time() - t_start, "epochs": log}, f, indent=2)
        f.write("\n")
    print(f"final test top-1 {log[-1]['test_top1'] * 100:.2f}%  wall {time.time() - t_start:.0f} s")


if __name__ == "__main__":
    main()
