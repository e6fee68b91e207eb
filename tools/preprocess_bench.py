#!/usr/bin/env python3
"""Preprocessing time per image, by size and format: fasternet-serve's fast and exact paths
against PIL, interleaved in one run.

For each image it times, one thread each:
  - `fasternet-serve bench --images F --decode fast` and `--decode exact`: encoded bytes to
    the normalised 224x224 tensor (resize to 248, center crop, normalise);
  - PIL full decode alone (`Image.open(...).load()`);
  - PIL's TorchServe-style pipeline: full decode, bicubic resize, crop, normalise (numpy);
  - for JPEGs, PIL with `Image.draft` (DCT-domain scaling to at least the resize target),
    then the same resize.
and the resident memory one preparation adds in each mode (VmHWM, as `fasternet-serve bench
--images` reports it).

    .venv/bin/python tools/preprocess_bench.py [--rounds 3] [--seconds 2] [--bin PATH]

The images are made offline (tools/make_photos.py's camera-like noise on scikit-image
photos) into .data/preprocess-bench/. Prints a Markdown table of medians over the rounds.
"""

import argparse
import io
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))
from make_photos import camera_like  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / ".data" / "preprocess-bench"
MEAN = np.array([0.485, 0.456, 0.406], dtype=np.float32)
STD = np.array([0.229, 0.224, 0.225], dtype=np.float32)


def make_images() -> list[Path]:
    OUT.mkdir(parents=True, exist_ok=True)
    specs = [
        ("jpeg_12mp_q92.jpg", (4032, 3024), dict(format="JPEG", quality=92)),
        ("jpeg_12mp_q92_progressive.jpg", (4032, 3024), dict(format="JPEG", quality=92, progressive=True)),
        ("jpeg_3mp_q90.jpg", (2016, 1512), dict(format="JPEG", quality=90)),
        ("jpeg_small_372x248.jpg", (372, 248), dict(format="JPEG", quality=90)),
        ("png_3mp.png", (2016, 1512), dict(format="PNG")),
        ("webp_12mp_q90.webp", (4032, 3024), dict(format="WEBP", quality=90)),
    ]
    paths = []
    for name, size, options in specs:
        path = OUT / name
        if not path.exists():
            camera_like("coffee", size, 0, luma=5.0).save(path, **options)
        paths.append(path)
    return paths


def mean_ms(seconds: float, f) -> float:
    """Mean milliseconds per call over `seconds` (at least 3 calls)."""
    f()
    start, runs = time.perf_counter(), 0
    while runs < 3 or time.perf_counter() - start < seconds:
        f()
        runs += 1
    return (time.perf_counter() - start) * 1e3 / runs


def pil_pipeline(data: bytes, draft: bool) -> np.ndarray:
    image = Image.open(io.BytesIO(data))
    if draft and image.format == "JPEG":
        w, h = image.size
        short = 248
        image.draft("RGB", (max(1, short * w // min(w, h)), max(1, short * h // min(w, h))))
    image = image.convert("RGB")
    w, h = image.size
    scale = 248 / min(w, h)
    size = (max(248, int(w * scale)), max(248, int(h * scale)))
    image = image.resize(size, Image.BICUBIC)
    left, top = round((size[0] - 224) / 2), round((size[1] - 224) / 2)
    pixels = np.asarray(image.crop((left, top, left + 224, top + 224)), dtype=np.float32) / 255.0
    return ((pixels - MEAN) / STD).transpose(2, 0, 1)


def ours(binary: str, path: Path, decode: str, seconds: float) -> float:
    out = subprocess.run(
        [binary, "bench", "--threads", "1", "--images", str(path), "--decode", decode, "--seconds", str(seconds)],
        check=True, capture_output=True, text=True, timeout=600,
    ).stdout
    return float(re.search(r": ([0-9.]+) ms/image", out).group(1))


def peak_mib(binary: str, path: Path, decode: str) -> float:
    """Resident memory one preparation adds (VmHWM after it, less VmRSS before), as
    `fasternet-serve bench --images` reports it."""
    out = subprocess.run(
        [binary, "bench", "--threads", "1", "--images", str(path), "--decode", decode, "--seconds", "0"],
        check=True, capture_output=True, text=True, timeout=600,
    ).stdout
    return float(re.search(r"peak memory ([0-9.]+) MiB", out).group(1))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=2.0)
    parser.add_argument("--bin", default=str(ROOT / "target" / "release" / "fasternet-serve"))
    args = parser.parse_args()
    images = make_images()
    columns = ["fast", "exact", "pil_decode", "pil_pipeline", "pil_draft"]
    times = {(p.name, c): [] for p in images for c in columns}
    for round_ in range(args.rounds):
        print(f"round {round_ + 1}/{args.rounds}", file=sys.stderr)
        for path in images:
            data = path.read_bytes()
            times[path.name, "fast"].append(ours(args.bin, path, "fast", args.seconds))
            times[path.name, "pil_decode"].append(
                mean_ms(args.seconds, lambda: Image.open(io.BytesIO(data)).load())
            )
            times[path.name, "exact"].append(ours(args.bin, path, "exact", args.seconds))
            times[path.name, "pil_pipeline"].append(mean_ms(args.seconds, lambda: pil_pipeline(data, False)))
            if path.suffix == ".jpg":
                times[path.name, "pil_draft"].append(mean_ms(args.seconds, lambda: pil_pipeline(data, True)))
    cpu = next((l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name")), "?")
    print(f"\nCPU: {cpu}; {args.rounds} interleaved rounds, medians, one thread; ms per image\n")
    print("| image | size | fast | exact | PIL decode | PIL pipeline | PIL draft pipeline | fast / PIL decode "
          "| fast / exact | peak memory fast / exact (MiB) |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for path in images:
        m = {c: statistics.median(times[path.name, c]) if times[path.name, c] else None for c in columns}
        rss = {mode: peak_mib(args.bin, path, mode) for mode in ("fast", "exact")}
        with Image.open(path) as image:
            size = f"{image.width}x{image.height}, {path.stat().st_size / 1e6:.2f} MB"
        draft = f"{m['pil_draft']:.1f}" if m["pil_draft"] else "-"
        print(
            f"| {path.name} | {size} | {m['fast']:.1f} | {m['exact']:.1f} | {m['pil_decode']:.1f} "
            f"| {m['pil_pipeline']:.1f} | {draft} | {m['fast'] / m['pil_decode']:.2f} "
            f"| {m['fast'] / m['exact']:.2f} | {rss['fast']:.0f} / {rss['exact']:.0f} |"
        )


if __name__ == "__main__":
    main()
