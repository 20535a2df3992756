"""A corpus of broken and odd image files, generated at test time (no file of it is stored in the repo).

``build(folder)`` writes every entry of ``ENTRIES`` into ``folder`` and returns ``{name: path}``; the
session fixtures ``odd_corpus`` / ``odd_images`` of ``conftest.py`` call it once per test session. Each
entry names what the header check (``pillsnap_dali.imageio.check_header``) says about it: ``None`` for a
file the header accepts, else the start of the reason. Whether a file then decodes (in PIL, in DALI) is
left to the tests to find at run time, as with the shared corpus.

What it covers (the behaviours the shared Pillow images of ``shared/testdata/real_images`` exercise):
valid RGB/grey/alpha/palette/1-bit/16-bit PNG, baseline/progressive/grey/CMYK JPEG, BMP, WebP; EXIF
orientations 1-8 in JPEG, PNG and WebP, a WebP EXIF chunk with the JPEG-style ``Exif\\0\\0`` prefix (the
DALI decoder ignores it), an orientation given only in XMP (ignored too), a PNG eXIf chunk after the image
data; wrong extensions; trailing junk; zero bytes; files truncated at several points; corrupted headers
(bad CRC, bad marker) and corrupted pixel data; headers declaring a huge size (PNG, BMP, JPEG) or an
extreme aspect ratio; formats the loaders do not take (GIF, TIFF); text. The shared images remain an extra
corpus (``_paths.REAL_IMAGES``), added by ``odd_images`` when present.
"""
from __future__ import annotations

import io
import struct
import zlib
from pathlib import Path
from typing import Callable, Optional

import numpy as np
from PIL import Image

W, H = 40, 64           # not square, so a wrong rotation changes the shape
TEXT_NAME = "notes.txt"  # the one non-image file (scanners count it as an "other file")


def picture(w: int = W, h: int = H) -> Image.Image:
    """An asymmetric gradient: any flip or rotation changes the pixels."""
    yy, xx = np.mgrid[0:h, 0:w]
    a = np.stack([xx * 255 // max(1, w - 1), yy * 255 // max(1, h - 1), (xx + 2 * yy) % 256], -1)
    a[: h // 4, : w // 4] = (250, 250, 250)  # a bright top-left corner
    return Image.fromarray(a.astype(np.uint8))


def _save(im: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    im.save(buf, fmt, **kw)
    return buf.getvalue()


def _exif(orientation: int) -> bytes:
    exif = Image.Exif()
    exif[0x0112] = orientation
    return exif.tobytes()  # starts with b"Exif\0\0"


def _chunk(tag: bytes, data: bytes, crc: Optional[int] = None) -> bytes:
    crc = zlib.crc32(tag + data) if crc is None else crc
    return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", crc)


def png_claiming(w: int, h: int) -> bytes:
    """A PNG whose header claims w x h while its pixel data is a few bytes (a decompression-bomb shape)."""
    return (b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0))
            + _chunk(b"IDAT", zlib.compress(b"\x00" * 10)) + _chunk(b"IEND", b""))


def _png_chunks(data: bytes) -> list:
    chunks, pos = [], 8
    while pos < len(data):
        n = struct.unpack(">I", data[pos:pos + 4])[0]
        chunks.append(data[pos:pos + 12 + n])
        pos += 12 + n
    return chunks


def _png_late_exif() -> bytes:
    """A PNG with orientation 6 whose eXIf chunk comes after the image data (PIL sees it only on decode)."""
    chunks = _png_chunks(_save(picture(), "PNG", exif=_exif(6)))
    rest = [c for c in chunks if c[4:8] != b"eXIf"]
    return b"\x89PNG\r\n\x1a\n" + b"".join(rest[:-1]) + b"".join(c for c in chunks if c[4:8] == b"eXIf") + rest[-1]


def _webp_exif_prefixed() -> bytes:
    """A WebP whose EXIF chunk (orientation 6) starts with ``Exif\\0\\0`` as in JPEG (Pillow strips it on save,
    some tools write it): the DALI decoder ignores such a block, so every path must."""
    data = _save(picture(), "WEBP", lossless=True, exif=_exif(6))
    i = data.index(b"EXIF")
    n = struct.unpack("<I", data[i + 4:i + 8])[0]
    block = b"Exif\x00\x00" + data[i + 8:i + 8 + n]
    chunk = b"EXIF" + struct.pack("<I", len(block)) + block + b"\x00" * (len(block) % 2)
    body = data[12:i] + chunk + data[i + 8 + n + n % 2:]
    return b"RIFF" + struct.pack("<I", len(body) + 4) + b"WEBP" + body


def _png_bad(part: str) -> bytes:
    data = bytearray(_save(picture(), "PNG"))
    if part == "ihdr_crc":
        data[29:33] = b"\x00\x00\x00\x00"          # IHDR's CRC
    elif part == "idat":
        i = data.index(b"IDAT") + 8                # the compressed pixels; IEND kept: only a decode sees it
        data[i:i + 16] = b"\xff" * 16
    return bytes(data)


def _jpeg_xmp_orientation() -> bytes:
    """A JPEG whose only orientation (6) is in XMP: PIL's exif_transpose would turn it, the decoders do not."""
    xmp = (b'<x:xmpmeta xmlns:x="adobe:ns:meta/"><rdf:RDF xmlns:rdf="http://www.w3.org/1999/02/22-rdf-syntax-ns#">'
           b'<rdf:Description xmlns:tiff="http://ns.adobe.com/tiff/1.0/" tiff:Orientation="6"/></rdf:RDF>'
           b'</x:xmpmeta>')
    return _save(picture(), "JPEG", quality=95, xmp=xmp)


def _jpeg_bad(part: str) -> bytes:
    data = bytearray(_save(picture(), "JPEG", quality=95))
    if part == "marker":
        data[2:4] = b"\xff\x01"                    # the first segment's marker: junk
        data[4:40] = b"\x13" * 36
    elif part == "sof":
        i = data.index(b"\xff\xc0") + 5            # SOF0 height and width: zero
        data[i:i + 4] = b"\x00\x00\x00\x00"
    elif part == "scan":
        i = data.index(b"\xff\xda") + 40           # inside the entropy-coded data: FF D9 = an early EOI
        data[i:i + 24] = b"\xff\xd9" * 12
    return bytes(data)


def _jpeg_claiming(w: int, h: int) -> bytes:
    data = bytearray(_save(picture(), "JPEG", quality=90))
    i = data.index(b"\xff\xc0") + 5
    data[i:i + 4] = struct.pack(">HH", h, w)
    return bytes(data)


def _bmp_claiming(w: int, h: int) -> bytes:
    data = bytearray(_save(picture(8, 8), "BMP"))
    data[18:26] = struct.pack("<ii", w, h)
    return bytes(data)


def _cut(make: Callable[[], bytes], at) -> Callable[[], bytes]:
    """``make``'s bytes cut at a byte count (int) or a fraction of the length (float)."""
    def cut() -> bytes:
        data = make()
        return data[: at if isinstance(at, int) else int(len(data) * at)]
    return cut


def _png() -> bytes:
    return _save(picture(), "PNG")


def _jpeg() -> bytes:
    return _save(picture(), "JPEG", quality=95)


def _valid() -> dict:
    pic = picture()
    rgba = pic.convert("RGBA")
    rgba.putalpha(Image.fromarray(np.tile(np.arange(W, dtype=np.uint8) * 6, (H, 1))))
    pal = pic.convert("P", palette=Image.Palette.ADAPTIVE, colors=16)
    return {
        "rgb.png": (lambda: _save(pic, "PNG"), None),
        "rgb.jpg": (lambda: _save(pic, "JPEG", quality=95), None),
        "progressive.jpg": (lambda: _save(pic, "JPEG", quality=95, progressive=True), None),
        "cmyk.jpg": (lambda: _save(pic.convert("CMYK"), "JPEG", quality=95), None),
        "grey.jpg": (lambda: _save(pic.convert("L"), "JPEG", quality=95), None),
        "grey.png": (lambda: _save(pic.convert("L"), "PNG"), None),
        "grey_alpha.png": (lambda: _save(rgba.convert("LA"), "PNG"), None),
        "rgba.png": (lambda: _save(rgba, "PNG"), None),
        "palette.png": (lambda: _save(pal, "PNG"), None),
        "palette_transparency.png": (lambda: _save(pal, "PNG", transparency=0), None),
        "bilevel.png": (lambda: _save(pic.convert("1"), "PNG"), None),
        "sixteen_bit.png": (lambda: _save(Image.fromarray(np.asarray(pic.convert("L"), np.uint16) * 257), "PNG"),
                            None),
        "sixteen_bit_transparency.png": (lambda: _save(Image.fromarray(np.asarray(pic.convert("L"), np.uint16) * 257),
                                                       "PNG", transparency=0), None),
        "rgb.bmp": (lambda: _save(pic, "BMP"), None),
        "lossy.webp": (lambda: _save(pic, "WEBP", quality=90), None),
        "lossless_alpha.webp": (lambda: _save(rgba, "WEBP", lossless=True), None),
        "jpeg_named.png": (lambda: _save(pic, "JPEG", quality=95), None),   # wrong extensions
        "png_named.jpg": (lambda: _save(pic, "PNG"), None),
        "trailing_junk.jpg": (lambda: _save(pic, "JPEG", quality=95) + b"junk" * 64, None),
        "trailing_junk.png": (lambda: _save(pic, "PNG") + b"\x00junk" * 8, None),
    }


def _oriented() -> dict:
    """EXIF orientations 1-8 in JPEG and PNG, 2-8 in WebP (raw TIFF block), and the cases the decoders ignore."""
    pic = picture()
    out = {}
    for o in range(1, 9):
        out[f"orientation_{o}.jpg"] = (lambda o=o: _save(pic, "JPEG", quality=95, exif=_exif(o)), None)
        out[f"orientation_{o}.png"] = (lambda o=o: _save(pic, "PNG", exif=_exif(o)), None)
    for o in range(2, 9):
        out[f"orientation_{o}.webp"] = (lambda o=o: _save(pic, "WEBP", lossless=True, exif=_exif(o)[6:]), None)
    out["orientation_6_exif_prefix.webp"] = (_webp_exif_prefixed, None)
    out["orientation_xmp_only.jpg"] = (_jpeg_xmp_orientation, None)
    out["orientation_6_late_exif.png"] = (_png_late_exif, None)
    return out


def _broken() -> dict:
    gif = lambda: _save(picture(), "GIF")  # noqa: E731
    return {
        "zero.png": (lambda: b"", "empty file"),
        "zero.jpg": (lambda: b"", "empty file"),
        "text.png": (lambda: "not an image at all\n".encode(), "not an image"),
        "random.jpg": (lambda: np.random.default_rng(0).integers(0, 256, 4000, np.uint8).tobytes(), "not an image"),
        "gif_named.png": (gif, "unsupported format: GIF"),
        "tiff_named.jpg": (lambda: _save(picture(), "TIFF"), "unsupported format: TIFF"),
        "png_signature_only.png": (_cut(_png, 8), "truncated png"),
        "png_cut_in_ihdr.png": (_cut(_png, 20), "truncated png"),
        "png_cut_half.png": (_cut(_png, 0.5), "truncated png"),
        "png_cut_before_iend.png": (_cut(_png, -12), "truncated png"),
        "jpeg_cut_in_header.jpg": (_cut(_jpeg, 60), "bad header"),
        "jpeg_cut_in_scan.jpg": (_cut(_jpeg, 0.85), None),      # the header is whole: only a decode sees it
        "jpeg_cut_before_eoi.jpg": (_cut(_jpeg, -2), None),
        "png_bad_ihdr_crc.png": (lambda: _png_bad("ihdr_crc"), "bad header"),
        "png_bad_pixel_data.png": (lambda: _png_bad("idat"), None),
        "jpeg_bad_marker.jpg": (lambda: _jpeg_bad("marker"), "bad header"),
        "jpeg_zero_size.jpg": (lambda: _jpeg_bad("sof"), "bad header"),
        "jpeg_bad_scan.jpg": (lambda: _jpeg_bad("scan"), None),
        "huge.png": (lambda: png_claiming(20000, 20000), "too many pixels"),
        "huge.bmp": (lambda: _bmp_claiming(60000, 60000), "too many pixels"),
        "huge.jpg": (lambda: _jpeg_claiming(65000, 65000), "too many pixels"),
        "sliver.png": (lambda: _save(picture(1300, 4), "PNG"), "extreme aspect ratio"),
        TEXT_NAME: (lambda: "a text file among the images\n".encode(), "not an image"),
    }


ENTRIES: dict = {**_valid(), **_oriented(), **_broken()}


def header_verdicts() -> dict:
    """{name: start of the header check's reason, or None}."""
    return {name: verdict for name, (_, verdict) in ENTRIES.items()}


def build(folder: Path) -> dict:
    """Write every entry into ``folder`` (created); {name: path}."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    out = {}
    for name, (make, _) in ENTRIES.items():
        out[name] = folder / name
        out[name].write_bytes(make())
    return out
