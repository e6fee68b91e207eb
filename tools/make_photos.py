#!/usr/bin/env python3
"""Camera-sized JPEGs made offline from scikit-image's CC0 photos.

The photos are upscaled with PIL's bicubic filter, given camera-like noise (luminance and a
little chroma, fixed seed) and saved as JPEG the way phones and cameras write them.

    .venv/bin/python tools/make_photos.py fixtures   # tests/fixtures/photos/ (committed)
    .venv/bin/python tools/make_photos.py 12mp OUT   # one 4032x3024 photo, quality 92 (~3.3 MB)

`fixtures` writes the set that tests/photo_fidelity.rs compares the fast and the exact JPEG
paths on: shorter sides from 496 to 1984 pixels (2x to 16x the resize targets that test uses),
landscape and portrait, baseline 4:2:0 and 4:4:4, progressive, restart intervals, an EXIF
rotation, CMYK and greyscale. Their bytes depend on Pillow's libjpeg-turbo build; the test
reads them, it does not regenerate them.
"""

import io
import sys
from pathlib import Path

import numpy as np
import skimage.data
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent


def camera_like(scene: str, size: tuple[int, int], seed: int, luma: float = 3.0) -> Image.Image:
    """The scene resized to `size` (width, height) with sensor-like noise."""
    source = Image.fromarray(getattr(skimage.data, scene)()).convert("RGB")
    image = source.resize(size, Image.BICUBIC)
    pixels = np.asarray(image).astype(np.float32)
    rng = np.random.default_rng(seed)
    noise = rng.normal(0.0, luma, pixels.shape[:2])[..., None]  # luminance: every channel
    noise = noise + rng.normal(0.0, luma / 3, pixels.shape)  # chroma: a little per channel
    return Image.fromarray(np.clip(pixels + noise, 0, 255).astype(np.uint8))


def with_exif_orientation(image: Image.Image, orientation: int, **save) -> bytes:
    exif = Image.Exif()
    exif[0x0112] = orientation
    out = io.BytesIO()
    image.save(out, format="JPEG", exif=exif.tobytes(), **save)
    return out.getvalue()


def fixtures(out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    for old in out.glob("*.jpg"):
        old.unlink()

    def save(name: str, image: Image.Image, **options) -> None:
        image.save(out / name, format="JPEG", **options)

    save("coffee_744x496.jpg", camera_like("coffee", (744, 496), 1), quality=90)
    save("rocket_992x1488.jpg", camera_like("rocket", (992, 1488), 2), quality=90)
    save(
        "chelsea_1488x992_444_progressive.jpg",
        camera_like("chelsea", (1488, 992), 3),
        quality=90,
        subsampling=0,
        progressive=True,
    )
    save(
        "astronaut_1984x1984_restarts.jpg",
        camera_like("astronaut", (1984, 1984), 4, luma=2.0),
        quality=85,
        restart_marker_rows=1,
    )
    # Stored landscape, shown portrait (EXIF 6: rotate 90 clockwise), with a width that is not
    # a multiple of 8, so that the padded block column lands at the bottom once rotated.
    (out / "coffee_1501x1003_exif6.jpg").write_bytes(
        with_exif_orientation(camera_like("coffee", (1501, 1003), 5), 6, quality=88)
    )
    save("chelsea_997x663_cmyk.jpg", camera_like("chelsea", (997, 663), 6).convert("CMYK"), quality=90)
    save("camera_1240x1240_grey.jpg", camera_like("camera", (1240, 1240), 7).convert("L"), quality=90)


def twelve_megapixels(path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    camera_like("coffee", (4032, 3024), 0, luma=5.0).save(path, format="JPEG", quality=92)


def main() -> None:
    if sys.argv[1:2] == ["fixtures"]:
        fixtures(ROOT / "tests" / "fixtures" / "photos")
    elif sys.argv[1:2] == ["12mp"] and len(sys.argv) == 3:
        twelve_megapixels(Path(sys.argv[2]))
    else:
        sys.exit(__doc__)


if __name__ == "__main__":
    main()
