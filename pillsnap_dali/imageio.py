"""Opening images safely, without torch (the JPEG-cache workers use it too, and must stay light).

Also the one home of what every image reader shares: the image suffixes, the default pixel limit
(``data.max_pixels``) and the reason strings of the header size check (``pixel_problem``, ``bomb_problem``),
used by ``verify``, ``loaders.common.read_encoded`` and ``open_rgb`` alike. PIL and numpy are imported where
an image is opened, so ``config``, ``scan`` and ``verify`` can import the constants without them.
"""
from __future__ import annotations

import re
from typing import TYPE_CHECKING, Optional

if TYPE_CHECKING:
    from PIL import Image

DEFAULT_MAX_PIXELS = 40_000_000   # the decompression-bomb guard's default (config data.max_pixels)
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp")   # what both DALI's decoder and PIL read
_SIXTEEN_BIT = ("I", "I;16", "I;16L", "I;16B", "I;16N")


def pixel_problem(width: int, height: int, max_pixels: int) -> Optional[str]:
    """Reason a header size is unusable (zero or negative side, more than ``max_pixels``); None when fine."""
    if width < 1 or height < 1:
        return f"invalid size {width}x{height}"
    if width * height > max_pixels:
        return f"too many pixels: {width}x{height} = {width * height} > max_pixels {max_pixels}"
    return None


def bomb_problem(err: BaseException, max_pixels: int) -> str:
    """Reason for PIL's ``DecompressionBombError``: ``Image.open`` refuses more than twice
    ``Image.MAX_IMAGE_PIXELS`` before the size can be read, and its message gives the pixel count only."""
    counts = [int(t) for t in re.findall(r"\d+", str(err))]  # "Image size (N pixels) exceeds limit of L pixels"
    if not counts:
        return f"too many pixels: {err}"
    if counts[0] > max_pixels or len(counts) < 2:
        return f"too many pixels: {counts[0]} > max_pixels {max_pixels}"
    return f"too many pixels: {counts[0]} > PIL's decompression-bomb limit {counts[1]}"


def open_rgb(path: str, max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
    """Open an image as 8-bit RGB, safely. Raises (ValueError, OSError...) on anything unusable.

    The pixel count is checked from the header before decoding (decompression-bomb guard). Truncated files
    raise (never padded with black). EXIF orientation is applied. Grayscale, palette (with transparency),
    alpha (dropped, as the DALI decoder does), 16-bit (scaled to 8 bits), float and CMYK become RGB.
    """
    import numpy as np
    from PIL import Image, ImageOps

    try:
        im = Image.open(path)
    except Image.DecompressionBombError as e:
        raise ValueError(bomb_problem(e, max_pixels)) from e
    with im:
        if reason := pixel_problem(im.width, im.height, max_pixels):
            raise ValueError(reason)
        im.load()
        im = ImageOps.exif_transpose(im)
    if im.mode in _SIXTEEN_BIT or im.mode == "F":
        arr = np.asarray(im, dtype=np.float32)
        arr = arr / 257.0 if im.mode != "F" else arr
        im = Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8), "L")
    elif im.mode in ("P", "PA"):
        im = im.convert("RGBA")
    return im if im.mode == "RGB" else im.convert("RGB")
