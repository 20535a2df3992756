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


# no photo of a pill is this elongated; past it, the evaluation graph's "shorter side to S / crop_pct" resize
# of a sliver (e.g. 20000x2 -> 4.4 M x 439) would allocate gigabytes from a file of a few kilobytes
MAX_ASPECT = 64


def pixel_problem(width: int, height: int, max_pixels: int) -> Optional[str]:
    """Reason a header size is unusable (zero or negative side, more than ``max_pixels``, an aspect ratio
    beyond ``MAX_ASPECT``:1); None when fine."""
    if width < 1 or height < 1:
        return f"invalid size {width}x{height}"
    if width * height > max_pixels:
        return f"too many pixels: {width}x{height} = {width * height} > max_pixels {max_pixels}"
    if max(width, height) > MAX_ASPECT * min(width, height):
        return f"extreme aspect ratio: {width}x{height} (more than {MAX_ASPECT}:1)"
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


_EXIF_ORIENTATION = 0x0112


def decoder_exif(im) -> Optional[bytes]:
    """The EXIF block whose orientation the DALI decoder applies, for an open PIL image; None when it applies
    none. Every path (the ``pil`` backend, prediction, the detection geometry) follows DALI's rule, so an
    image is turned the same way whichever backend trained on it: a WebP EXIF chunk carrying the JPEG-style
    ``Exif\0\0`` prefix is ignored by DALI, and so is an orientation given only in XMP (which PIL's
    ``exif_transpose`` would apply). Measured on shared/testdata/real_images (tests/test_loaders.py)."""
    raw = im.info.get("exif")
    if not raw or (im.format == "WEBP" and raw.startswith(b"Exif\x00\x00")):
        return None
    return raw


def header_info(source, orientation: bool = True) -> tuple[int, int, Optional[bytes]]:
    """(width, height, EXIF block the decoder honours or None) of a path or file object, from the header alone;
    raises what ``Image.open`` raises. The EXIF block is the one PIL reads with the header (``im.getexif()``
    would decode a whole PNG to look further)."""
    from PIL import Image

    with Image.open(source) as im:
        w, h, exif, fmt = im.size[0], im.size[1], decoder_exif(im), im.format
    if exif is None and fmt == "PNG" and orientation:  # an eXIf chunk after the image data (PIL sees it only
        # after decoding): found by walking the chunk headers; ``orientation=False`` skips it (size checks)
        exif = _png_late_exif(source)
    return w, h, exif


def _png_late_exif(source) -> Optional[bytes]:
    """The eXIf chunk of a PNG found by walking its chunk headers (no pixel is decoded), or None."""
    import struct

    fh = open(source, "rb") if isinstance(source, (str, bytes)) or hasattr(source, "__fspath__") else source
    try:
        fh.seek(8)  # the PNG signature
        for _ in range(1_000_000):
            head = fh.read(8)
            if len(head) < 8:
                return None
            length, kind = struct.unpack(">I4s", head)
            if kind == b"eXIf":
                return fh.read(length) or None
            if kind == b"IEND":
                return None
            fh.seek(length + 4, 1)  # data and CRC
        return None
    except (OSError, struct.error):
        return None
    finally:
        if fh is not source:
            fh.close()


def exif_orientation(raw: Optional[bytes]) -> int:
    """The EXIF orientation tag (1-8) of a raw EXIF block; 1 when there is none or the block is broken."""
    if not raw:
        return 1
    from PIL import Image

    try:
        exif = Image.Exif()
        exif.load(raw)
        return int(exif.get(_EXIF_ORIENTATION, 1))
    except Exception:  # a broken EXIF block: the decoders ignore it too
        return 1


def upright(width: int, height: int, exif: Optional[bytes]) -> tuple[int, int]:
    """(width, height) as the decoders deliver the image: EXIF orientation 5-8 swaps the sides."""
    return (height, width) if exif_orientation(exif) in (5, 6, 7, 8) else (width, height)


def upright_size(source) -> tuple[int, int]:
    """(width, height) of the image as the decoders deliver it, from the header alone: the frame the labels
    and boxes refer to."""
    return upright(*header_info(source))


def open_rgb(path: str, max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
    """Open an image as 8-bit RGB, safely. Raises (ValueError, OSError...) on anything unusable.

    The pixel count is checked from the header before decoding (decompression-bomb guard). Truncated files
    raise (never padded with black). EXIF orientation is applied as the DALI decoder applies it
    (``decoder_exif``). Grayscale, palette (with transparency),
    alpha (dropped, as the DALI decoder does), 16-bit (scaled to 8 bits), float and CMYK become RGB.
    """
    import numpy as np
    from PIL import Image

    try:
        im = Image.open(path)
    except Image.DecompressionBombError as e:
        raise ValueError(bomb_problem(e, max_pixels)) from e
    with im:
        if reason := pixel_problem(im.width, im.height, max_pixels):
            raise ValueError(reason)
        im.load()
        t = Image.Transpose  # EXIF orientation -> transpose, as ImageOps.exif_transpose maps them
        method = {2: t.FLIP_LEFT_RIGHT, 3: t.ROTATE_180, 4: t.FLIP_TOP_BOTTOM, 5: t.TRANSPOSE, 6: t.ROTATE_270,
                  7: t.TRANSVERSE, 8: t.ROTATE_90}.get(exif_orientation(decoder_exif(im)))
        if method is not None:
            im = im.transpose(method)
    if im.mode in _SIXTEEN_BIT or im.mode == "F":
        arr = np.asarray(im, dtype=np.float32)
        arr = arr / 257.0 if im.mode != "F" else arr
        im = Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8), "L")
    elif im.mode in ("P", "PA"):
        im = im.convert("RGBA")
    return im if im.mode == "RGB" else im.convert("RGB")
