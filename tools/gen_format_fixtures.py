#!/usr/bin/env python3
"""Writes tests/fixtures/formats/: one real photo in every encoding the decoders must handle
within their memory estimates (tests/hostile_inputs.rs): CMYK and 4:4:4 JPEG, lossy and
lossless WebP, LZW and deflate TIFF, Adam7-interlaced and 16-bit grey PNG, palette PNG with
transparency, grey+alpha PNG. The progressive and greyscale JPEGs already sit in
tests/fixtures/preprocess/inputs/.

    .venv/bin/python tools/gen_format_fixtures.py      # needs Pillow (tools/requirements.txt)
"""
import io
import os
import struct
import zlib

from PIL import Image

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
SOURCE = os.path.join(ROOT, "tests/fixtures/preprocess/inputs/astronaut.jpg")
OUT = os.path.join(ROOT, "tests/fixtures/formats")


def png_chunk(kind, data):
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def adam7_png(image):
    """An RGB image as an Adam7-interlaced PNG (Pillow writes only non-interlaced ones)."""
    width, height = image.size
    pixels = image.tobytes()
    passes = [(0, 0, 8, 8), (4, 0, 8, 8), (0, 4, 4, 8), (2, 0, 4, 4), (0, 2, 2, 4), (1, 0, 2, 2), (0, 1, 1, 2)]
    raw = bytearray()
    for x0, y0, dx, dy in passes:
        xs = range(x0, width, dx)
        if not xs:
            continue
        for y in range(y0, height, dy):
            raw.append(0)
            for x in xs:
                i = (y * width + x) * 3
                raw += pixels[i:i + 3]
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 1)
    return b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", ihdr) + png_chunk(b"IDAT", zlib.compress(bytes(raw), 9)) + png_chunk(b"IEND", b"")


def main():
    os.makedirs(OUT, exist_ok=True)
    photo = Image.open(SOURCE).convert("RGB")
    large = photo.resize((768, 576), Image.BICUBIC)
    small = photo.resize((384, 288), Image.BICUBIC)
    tiny = photo.resize((256, 192), Image.BICUBIC)

    def save(name, image, **options):
        buffer = io.BytesIO()
        image.save(buffer, **options)
        with open(os.path.join(OUT, name), "wb") as f:
            f.write(buffer.getvalue())
        print(f"{name}: {image.mode} {image.size[0]}x{image.size[1]}, {len(buffer.getvalue())} bytes")

    save("cmyk.jpg", large.convert("CMYK"), format="JPEG", quality=85)
    save("subsampling_444.jpg", large, format="JPEG", quality=90, subsampling=0)
    save("progressive_444.jpg", large, format="JPEG", quality=90, subsampling=0, progressive=True)
    save("lossy.webp", large, format="WEBP", quality=80)
    save("lossless.webp", small, format="WEBP", lossless=True)
    save("lzw.tiff", tiny, format="TIFF", compression="tiff_lzw")
    save("deflate.tiff", tiny.convert("RGBA"), format="TIFF", compression="tiff_adobe_deflate")
    save("grey16.png", small.convert("I;16"), format="PNG")
    save("grey_alpha.png", small.convert("LA"), format="PNG")
    palette = small.convert("P", palette=Image.ADAPTIVE, colors=64)
    save("palette_transparent.png", palette, format="PNG", transparency=0)
    interlaced = adam7_png(tiny)
    with open(os.path.join(OUT, "interlaced.png"), "wb") as f:
        f.write(interlaced)
    print(f"interlaced.png: RGB 256x192, {len(interlaced)} bytes")


if __name__ == "__main__":
    main()
