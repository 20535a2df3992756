"""Images on disk: is a file usable, and opening it safely, without torch (the JPEG-cache workers use it too,
and must stay light).

The one home of what every image reader shares: the image suffixes and formats, the default pixel limit
(``data.max_pixels``) and the "is this file usable" checks with their reason strings:

- ``format_problem``: the one image-format policy (the first bytes, never the name: ``SUPPORTED`` or a reason),
  asked by ``check_header``, ``read_encoded``/``read_encoded_upright`` and ``open_rgb`` alike;
- ``check_header`` (verify's ``header`` mode): magic bytes, the formats the loaders take, a PNG's IEND
  (truncation), the size from the header (``pixel_problem``: zero sides, more than ``max_pixels``, an
  aspect ratio beyond ``MAX_ASPECT``:1; ``bomb_problem`` past PIL's own limit); ``check_full`` adds a decode;
- ``read_encoded`` / ``read_encoded_upright`` (the DALI loaders, the detection loader): the file's bytes
  with the same size check from one header parse (and the upright size for the letterbox);
- ``open_rgb`` (the ``pil`` backend, prediction, the JPEG cache): the same size check, then a decode.

Every one of them opens the path with ``open_regular``: a FIFO, a device, a socket or a directory is a reason
(``not a regular file (a FIFO)``), never a read that blocks for ever or never ends; ``regular_file`` is the same
check from one ``stat``, for callers that only list paths (``manifest --legacy``).
What a bad file then becomes (skipped, logged, the skip limit) and which errors count as the file's fault is
``pillsnap_dali.badfiles``'s policy.
"""
from __future__ import annotations

import io
import os
import re
import stat
import struct
import warnings
from typing import Optional

import numpy as np
from PIL import Image

DEFAULT_MAX_PIXELS = 40_000_000   # the decompression-bomb guard's default (config data.max_pixels)
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp")   # what both DALI's decoder and PIL read
_SIXTEEN_BIT = ("I", "I;16", "I;16L", "I;16B", "I;16N")


# ---------------------------------------------------------------------- is this a file at all?
_KINDS = ((stat.S_ISFIFO, "a FIFO"), (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"),
          (stat.S_ISSOCK, "a socket"), (stat.S_ISDIR, "a directory"))


class NotRegularFile(OSError):
    """A path that names no regular file (a FIFO, a device, a socket, a directory): never read, since a read
    from a FIFO without a writer blocks for ever and one from ``/dev/zero`` never ends."""

    def __str__(self) -> str:
        return str(self.strerror)


def not_regular(mode: int) -> Optional[str]:
    """``"not a regular file (a FIFO)"`` for an ``st_mode`` that is no regular file; None for a regular one."""
    if stat.S_ISREG(mode):
        return None
    kind = next((name for test, name in _KINDS if test(mode)), "a special file")
    return f"not a regular file ({kind})"


def regular_file(path) -> Optional[str]:
    """Reason ``path`` is not a regular file (``not_regular``'s, "missing file", "unreadable: ..."), from one
    ``os.stat`` (links followed) and no open; None for a regular file. Callers that then open the file use
    ``open_regular``, which checks the opened descriptor again (the path may be swapped in between)."""
    try:
        return not_regular(os.stat(path).st_mode)
    except FileNotFoundError:
        return "missing file"
    except OSError as e:
        return f"unreadable: {e.strerror or e}"


def open_regular(path):
    """``open(path, "rb")`` for a regular file only: opened with ``O_NONBLOCK`` (opening a FIFO never waits
    for a writer), then the descriptor's own ``fstat`` decides; anything else raises ``NotRegularFile`` before a
    byte is read. (``O_NONBLOCK`` changes nothing for a regular file's reads.)"""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    except OSError:  # a socket cannot be opened (ENXIO): say what it is
        if (reason := regular_file(path)) and reason.startswith("not a regular"):
            raise NotRegularFile(0, reason, os.fspath(path)) from None
        raise
    try:
        reason = not_regular(os.fstat(fd).st_mode)
        if reason is not None:
            raise NotRegularFile(0, reason, os.fspath(path))
        os.set_blocking(fd, True)
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


def _reason(err: OSError) -> str:
    """A skip reason for an ``OSError`` of ``open_regular`` or a read."""
    if isinstance(err, FileNotFoundError):
        return "missing file"
    if isinstance(err, NotRegularFile):
        return err.strerror
    return f"unreadable: {err.strerror or err}"


# ---------------------------------------------------------------------- is this file usable?
SUPPORTED = ("PNG", "JPEG", "BMP", "WEBP")   # the formats of IMAGE_SUFFIXES, as sniff_format names them
_MAGIC = ((b"\x89PNG\r\n\x1a\n", "PNG"), (b"\xff\xd8\xff", "JPEG"), (b"BM", "BMP"), (b"GIF8", "GIF"),
          (b"II*\x00", "TIFF"), (b"MM\x00*", "TIFF"), (b"\x00\x00\x00\x0cjP  ", "JPEG2000"),
          (b"\xff\x4f\xff\x51", "JPEG2000"), (b"DDS ", "DDS"), (b"8BPS", "PSD"), (b"\x00\x00\x01\x00", "ICO"),
          (b"P1", "PNM"), (b"P2", "PNM"), (b"P3", "PNM"), (b"P4", "PNM"), (b"P5", "PNM"), (b"P6", "PNM"))
_TAIL = 4096   # a truncated PNG has no IEND chunk in its last bytes (a valid one may have trailing junk)


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


def sniff_format(head: bytes) -> str | None:
    """The image format from the first bytes, or None when they are no image we know."""
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return "WEBP"
    for magic, fmt in _MAGIC:
        if head.startswith(magic):
            return fmt
    return None


_HEAD = 64  # bytes format_problem looks at


def format_problem(head: bytes) -> str | None:
    """The project's one image-format policy, from a file's first bytes (never its name): None for a format of
    ``SUPPORTED`` (what both DALI's decoder and PIL read), else the reason every reader gives. ``check_header``
    (verify), ``read_encoded``/``read_encoded_upright`` (the DALI loaders, detection) and ``open_rgb`` (the
    ``pil`` backend, prediction, the JPEG cache) all ask it, so a GIF or a TIFF under a ``.png`` name is refused
    the same way everywhere (PIL alone would decode it; DALI would decode a TIFF and refuse a GIF)."""
    if not head:
        return "empty file"
    fmt = sniff_format(head)
    if fmt is None:
        return "not an image"
    return None if fmt in SUPPORTED else f"unsupported format: {fmt}"


def check_header(path: str, max_pixels: int) -> str | None:
    """Reason the file is unusable, judged without decoding pixels; None when it looks fine."""
    try:
        with open_regular(path) as fh:
            size = os.fstat(fh.fileno()).st_size
            if size == 0:
                return "empty file"
            head = fh.read(_HEAD)
            if reason := format_problem(head):
                return reason
            if sniff_format(head) == "PNG":
                fh.seek(max(0, size - _TAIL))
                if b"IEND" not in fh.read():
                    return "truncated png"
            fh.seek(0)
            return _check_size(fh, max_pixels)
    except OSError as e:
        return _reason(e)


def _check_size(fh, max_pixels: int) -> str | None:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # DecompressionBombWarning: we apply our own limit
            with Image.open(fh) as img:
                w, h = img.size
    except Image.DecompressionBombError as e:
        return bomb_problem(e, max_pixels)
    except Exception as e:  # noqa: BLE001 - PIL alone runs here: any header parse error is the file's (badfiles.py)
        return f"bad header: {type(e).__name__}: {str(e)[:60]}"
    return pixel_problem(w, h, max_pixels)


def check_full(path: str, max_pixels: int) -> str | None:
    """The header check, then a full decode; reason or None."""
    reason = check_header(path, max_pixels)
    if reason:
        return reason
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with open_regular(path) as fh, Image.open(fh) as img:
                img.load()
    except Exception as e:  # noqa: BLE001 - PIL alone runs here: every decoder error is the file's (badfiles.py)
        return f"decode failed: {type(e).__name__}: {str(e)[:80]}"
    return None


def read_encoded(path: str, max_pixels: int) -> tuple[Optional[np.ndarray], Optional[str]]:
    """The file's bytes, or ``(None, reason)`` when it is missing, empty, or claims too many pixels.

    The size check reads the header only (PIL), so a file claiming an absurd size never reaches a
    decoder. A header PIL does not understand is passed on: the decoder decides.
    """
    buf, reason = _read_bytes(path)
    if reason is not None:
        return None, reason
    return (None, reason) if (reason := header_problem(buf, max_pixels)) else (buf, None)


def read_encoded_upright(path: str, max_pixels: int
                         ) -> tuple[Optional[np.ndarray], Optional[str], Optional[tuple[int, int]]]:
    """``read_encoded`` plus the upright ``(h, w)`` of the image as DALI decodes it (EXIF orientation 5-8
    swaps the sides), from the same one header parse: ``(buf, None, (h, w))`` or ``(None, reason, None)``.

    No pixel is decoded (the EXIF block is the one PIL reads with the header). Unlike ``read_encoded``, a
    header PIL cannot parse is a reason, ``"unreadable header: ..."``: the caller needs the size.
    """
    buf, reason = _read_bytes(path)
    if reason is not None:
        return None, reason, None
    reason, size = _check_header(buf, max_pixels, upright_size=True)
    return (None, reason, None) if reason else (buf, None, size[::-1])


def _read_bytes(path: str) -> tuple[Optional[np.ndarray], Optional[str]]:
    """The file's bytes, or (None, reason) when it cannot be read or is no image of a supported format."""
    try:
        with open_regular(path) as fh:
            buf = np.fromfile(fh, dtype=np.uint8)
    except OSError as e:
        return None, _reason(e)
    return (None, reason) if (reason := format_problem(buf[:_HEAD].tobytes())) else (buf, None)


def header_problem(buf: np.ndarray, max_pixels: int) -> Optional[str]:
    """``imageio.pixel_problem``'s reason for the header's size (``bomb_problem``'s past PIL's own limit); None
    when it is fine or when PIL cannot parse the header (the decoder decides)."""
    return _check_header(buf, max_pixels, upright_size=False)[0]


def _check_header(buf: np.ndarray, max_pixels: int, *, upright_size: bool
                  ) -> tuple[Optional[str], Optional[tuple[int, int]]]:
    """(reason or None, (width, height)) from one header parse. ``upright_size``: the size as the decoder
    delivers it (EXIF orientation read, even from a PNG's late eXIf chunk), and a header PIL cannot parse is a
    reason; otherwise such a header passes (the decoder decides) and the orientation is not looked for."""
    try:
        w, h, exif = header_info(io.BytesIO(buf.data), orientation=upright_size)
    except Image.DecompressionBombError as e:
        return bomb_problem(e, max_pixels), None
    except Exception as e:  # any header PIL cannot read (or a third-party Image.open patch failing)
        text = re.sub(r"\s*<[^<>]* at 0x[0-9a-fA-F]+>", "", str(e))  # "cannot identify image file <BytesIO at 0x..>"
        return (f"unreadable header: {type(e).__name__}: {text}" if upright_size else None), None
    if reason := pixel_problem(w, h, max_pixels):
        return reason, None
    return None, upright(w, h, exif) if upright_size else (w, h)


# ---------------------------------------------------------------------- orientation and opening
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
    raises what ``Image.open`` raises (``NotRegularFile`` for a path that is no regular file). The EXIF block is
    the one PIL reads with the header (``im.getexif()`` would decode a whole PNG to look further)."""
    if isinstance(source, (str, bytes)) or hasattr(source, "__fspath__"):
        with open_regular(source) as fh:
            return header_info(fh, orientation)
    with Image.open(source) as im:
        w, h, exif, fmt = im.size[0], im.size[1], decoder_exif(im), im.format
    if exif is None and fmt == "PNG" and orientation:  # an eXIf chunk after the image data (PIL sees it only
        # after decoding): found by walking the chunk headers; ``orientation=False`` skips it (size checks)
        exif = _png_late_exif(source)
    return w, h, exif


def _png_late_exif(source) -> Optional[bytes]:
    """The eXIf chunk of a PNG found by walking its chunk headers (no pixel is decoded), or None."""
    fh = open_regular(source) if isinstance(source, (str, bytes)) or hasattr(source, "__fspath__") else source
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
    """Open an image as 8-bit RGB, safely. Raises one of ``badfiles.IMAGE_ERRORS`` on anything unusable.

    The pixel count is checked from the header before decoding (decompression-bomb guard). Truncated files
    raise (never padded with black). EXIF orientation is applied as the DALI decoder applies it
    (``decoder_exif``). Grayscale, palette (with transparency),
    alpha (dropped, as the DALI decoder does), 16-bit (scaled to 8 bits), float and CMYK become RGB.
    """
    with open_regular(path) as fh:   # NotRegularFile (an OSError) for a FIFO, a device, a directory
        if reason := format_problem(fh.read(_HEAD)):  # the one format policy, before PIL (which reads GIF, TIFF)
            raise ValueError(reason)
        fh.seek(0)
        try:
            im = Image.open(fh)
        except Image.DecompressionBombError as e:
            raise ValueError(bomb_problem(e, max_pixels)) from e
        with im:
            if reason := pixel_problem(im.width, im.height, max_pixels):
                raise ValueError(reason)
            im.load()
            t = Image.Transpose  # EXIF orientation -> transpose, as ImageOps.exif_transpose maps them
            method = {2: t.FLIP_LEFT_RIGHT, 3: t.ROTATE_180, 4: t.FLIP_TOP_BOTTOM, 5: t.TRANSPOSE,
                      6: t.ROTATE_270, 7: t.TRANSVERSE, 8: t.ROTATE_90}.get(exif_orientation(decoder_exif(im)))
            if method is not None:
                im = im.transpose(method)
    if im.mode in _SIXTEEN_BIT or im.mode == "F":
        arr = np.asarray(im, dtype=np.float32)
        arr = arr / 257.0 if im.mode != "F" else arr
        im = Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8), "L")
    elif im.mode in ("P", "PA"):
        im = im.convert("RGBA")
    return im if im.mode == "RGB" else im.convert("RGB")
