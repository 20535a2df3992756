"""Opening images safely, without torch (the JPEG-cache workers use it too, and must stay light)."""
from __future__ import annotations

import numpy as np
from PIL import Image, ImageOps

DEFAULT_MAX_PIXELS = 40_000_000
_SIXTEEN_BIT = ("I", "I;16", "I;16L", "I;16B", "I;16N")


def open_rgb(path: str, max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
    """Open an image as 8-bit RGB, safely. Raises (ValueError, OSError...) on anything unusable.

    The pixel count is checked from the header before decoding (decompression-bomb guard). Truncated files
    raise (never padded with black). EXIF orientation is applied. Grayscale, palette (with transparency),
    alpha (dropped, as the DALI decoder does), 16-bit (scaled to 8 bits), float and CMYK become RGB.
    """
    with Image.open(path) as im:
        if im.width * im.height > max_pixels:
            raise ValueError(f"{im.width}x{im.height} pixels exceed max_pixels={max_pixels}")
        im.load()
        im = ImageOps.exif_transpose(im)
    if im.mode in _SIXTEEN_BIT or im.mode == "F":
        arr = np.asarray(im, dtype=np.float32)
        arr = arr / 257.0 if im.mode != "F" else arr
        im = Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8), "L")
    elif im.mode in ("P", "PA"):
        im = im.convert("RGBA")
    return im if im.mode == "RGB" else im.convert("RGB")
