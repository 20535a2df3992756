"""Rendering: pill sprites, posed and lit on the background the file name says, with jitter and sensor noise;
the worker entry (``init_worker`` / ``render_and_write``) that writes each PNG or its defect.
"""
from __future__ import annotations

import io
import math
from pathlib import Path
from typing import Optional

import numpy as np
from PIL import Image, ImageChops, ImageDraw, ImageFilter, ImageFont

from pillsnap_dali.data.synth.spec import BACK_COLORS, LIGHTS
from pillsnap_dali.data.synth.looks import COLOURS, PillLook
from pillsnap_dali.data.synth.plan import Job


def _shade(rgb: tuple, f: float) -> tuple:
    return tuple(int(max(0, min(255, round(c * f)))) for c in rgb)


def _font(px: int):
    try:
        return ImageFont.load_default(size=max(6, px))
    except (TypeError, OSError):   # Pillow without FreeType: the fixed bitmap font
        return ImageFont.load_default()


def _polygon(box: tuple, sides: int, turn: float) -> list:
    x0, y0, x1, y1 = box
    cx, cy, rx, ry = (x0 + x1) / 2, (y0 + y1) / 2, (x1 - x0) / 2, (y1 - y0) / 2
    return [(cx + rx * math.cos(turn + 2 * math.pi * k / sides), cy + ry * math.sin(turn + 2 * math.pi * k / sides))
            for k in range(sides)]


def _draw_body(d: ImageDraw.ImageDraw, look: PillLook, box: tuple, width: int) -> None:
    fill = COLOURS[look.colour1]
    edge = _shade(fill, 0.62) if sum(fill) > 240 else _shade((90, 90, 90), 1.0)
    x0, y0, x1, y1 = box
    r = (y1 - y0) // 2
    if look.capsule:   # two halves; the partial-corner call needs an integer radius under half the height
        d.rounded_rectangle(box, radius=r, fill=COLOURS[look.colour2], outline=edge, width=width)
        d.rounded_rectangle((x0, y0, (x0 + x1) // 2, y1), radius=max(1, r - 1), corners=(True, False, False, True),
                            fill=fill, outline=edge, width=width)
    elif look.shape in ("원형", "타원형"):
        d.ellipse(box, fill=fill, outline=edge, width=width)
    elif look.shape in ("장방형", "사각형"):
        d.rounded_rectangle(box, radius=r if look.shape == "장방형" else r * 0.3, fill=fill, outline=edge, width=width)
    else:
        sides, turn = {"삼각형": (3, -math.pi / 2), "오각형": (5, -math.pi / 2), "육각형": (6, 0.0),
                       "팔각형": (8, math.pi / 8), "마름모형": (4, 0.0)}[look.shape]
        d.polygon(_polygon(box, sides, turn), fill=fill, outline=edge, width=width)


def _draw_marks(d: ImageDraw.ImageDraw, look: PillLook, box: tuple, side: int) -> None:
    """Score line and imprint of one side (capsules print on both halves alike)."""
    x0, y0, x1, y1 = box
    w, h = x1 - x0, y1 - y0
    cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
    ink = _shade(COLOURS[look.colour1], 0.45) if sum(COLOURS[look.colour1]) > 240 else (225, 225, 225)
    line = look.line_front if side == 0 else look.line_back
    lw = max(1, int(h * 0.05))
    if line:
        d.line((cx - w * 0.32, cy + h * 0.22, cx + w * 0.32, cy + h * 0.22), fill=ink, width=lw)
    if line == "+":
        d.line((cx, cy + h * 0.08, cx, cy + h * 0.36), fill=ink, width=lw)
    text = look.print_front if side == 0 else look.print_back
    if text:
        room = w * {"삼각형": 0.42, "마름모형": 0.45}.get(look.shape, 0.78)   # narrow shapes: smaller text
        font = _font(int(h * 0.26))
        width = d.textlength(text, font=font)
        if width > room:
            font = _font(int(h * 0.26 * room / width))
        d.text((cx, cy - h * (0.08 if line else 0.0)), text, fill=ink, font=font, anchor="mm")


def render_sprite(look: PillLook, side: int, px_per_mm: float) -> Image.Image:
    """One pill, long side horizontal, RGBA with a soft shadow (alpha <= 115, the pill itself is opaque)."""
    ss = 2  # drawn at twice the size, then reduced: smooth edges
    long_px, short_px = max(8, round(look.long_mm * px_per_mm * ss)), max(6, round(look.short_mm * px_per_mm * ss))
    pad = max(4, short_px // 6)
    canvas = (long_px + 2 * pad, short_px + 2 * pad)
    pill = Image.new("RGBA", canvas, (0, 0, 0, 0))
    d = ImageDraw.Draw(pill)
    box = (pad, pad, pad + long_px - 1, pad + short_px - 1)
    _draw_body(d, look, box, width=max(1, short_px // 40))
    _draw_marks(d, look, box, side)
    alpha = pill.getchannel("A")
    gloss = Image.new("L", canvas, 0)
    ImageDraw.Draw(gloss).ellipse((pad + long_px * 0.15, pad + short_px * 0.1, pad + long_px * 0.55,
                                   pad + short_px * 0.4), fill=70)
    gloss = ImageChops.multiply(gloss.filter(ImageFilter.GaussianBlur(short_px / 14)), alpha)
    pill = Image.composite(Image.new("RGBA", canvas, (255, 255, 255, 255)), pill, gloss)
    shadow = alpha.point(lambda a: a * 115 // 255).filter(ImageFilter.GaussianBlur(max(1, pad // 3)))
    shadow = shadow.point(lambda a: a if a >= 4 else 0)   # no faint blur tail cut square by the canvas edge
    out = Image.new("RGBA", canvas, (0, 0, 0, 0))
    out.putalpha(ImageChops.offset(shadow, pad // 3, pad // 2))
    out.alpha_composite(pill)
    return out.resize((canvas[0] // ss, canvas[1] // ss), Image.Resampling.LANCZOS)


class RenderContext:
    """Per-process render state: pill sprites (drawn once per code and side) and a fixed noise field."""

    def __init__(self, looks: dict, size: tuple, seed: int):
        self.looks, self.size, self.seed = looks, size, seed
        self.px_per_mm = 25.0 * min(size[0] / 976, size[1] / 1280)
        self._sprites: dict = {}
        self._noise: Optional[np.ndarray] = None
        self._gradient = Image.linear_gradient("L").resize(size, Image.Resampling.BILINEAR)

    def sprite(self, code: str, side: int) -> Image.Image:
        key = (code, side)
        if key not in self._sprites:
            self._sprites[key] = render_sprite(self.looks[code], side, self.px_per_mm)
        return self._sprites[key]

    def noise(self) -> np.ndarray:
        """Sensor-like noise (sigma ~3) in 4x4 blocks, 64+ pixels larger than the image each way. Blocks,
        because per-pixel noise doubles the PNG encoding time; at the 1/4 training scale they are pixels."""
        if self._noise is None:
            w, h = self.size
            rng = np.random.default_rng([self.seed, 0x0015E])
            small = rng.normal(0, 3.0, size=(h // 4 + 17, w // 4 + 17, 3)).round().clip(-9, 9).astype(np.int16)
            self._noise = small.repeat(4, axis=0).repeat(4, axis=1)
        return self._noise

    def background(self, rgb: tuple, tint: np.ndarray, rng: np.random.Generator) -> Image.Image:
        base = np.array(rgb, dtype=float) * tint + rng.uniform(-8, 8, size=3)
        lo, hi = _shade(tuple(base), 0.9), _shade(tuple(base), 1.07)
        grad = self._gradient if rng.random() < 0.5 else self._gradient.transpose(Image.Transpose.ROTATE_180)
        return Image.composite(Image.new("RGB", self.size, hi), Image.new("RGB", self.size, lo), grad)

    def add_noise(self, img: Image.Image, rng: np.random.Generator) -> Image.Image:
        w, h = self.size
        dy, dx = (int(v) * 4 for v in rng.integers(0, 16, size=2))
        arr = np.asarray(img, dtype=np.int16) + self.noise()[dy:dy + h, dx:dx + w]
        return Image.fromarray(arr.clip(0, 255).astype(np.uint8))


def _tint_lut(tint: np.ndarray) -> list:
    lut = []
    for f in list(tint) + [1.0]:
        lut.extend(min(255, int(v * f)) for v in range(256))
    return lut


def _pose(sprite: Image.Image, angle: float, squash: float, scale: float, tint: np.ndarray) -> Image.Image:
    """Rotate the pill in its plane, foreshorten it for the camera elevation, scale and light it."""
    im = sprite.rotate(angle, resample=Image.Resampling.BILINEAR, expand=True)
    size = (max(4, round(im.width * scale)), max(4, round(im.height * scale * squash)))
    return im.resize(size, Image.Resampling.BILINEAR).point(_tint_lut(tint))


def _paste(canvas: Image.Image, pill: Image.Image, cx: float, cy: float) -> list:
    """Paste centred at (cx, cy), kept inside the canvas; returns the pill's COCO box [x, y, w, h]."""
    x = int(round(min(max(cx - pill.width / 2, 0), canvas.width - pill.width)))
    y = int(round(min(max(cy - pill.height / 2, 0), canvas.height - pill.height)))
    canvas.paste(pill, (x, y), pill)
    solid = pill.getchannel("A").point(lambda a: 255 if a > 127 else 0).getbbox()
    if solid is None:
        return [x, y, pill.width, pill.height]
    return [x + solid[0], y + solid[1], solid[2] - solid[0], solid[3] - solid[1]]


def _light(job: Job, rng: np.random.Generator) -> np.ndarray:
    return np.array(LIGHTS[job.fields[3]][1]) * float(rng.uniform(0.9, 1.08))


def _render_single(job: Job, ctx: RenderContext, rng: np.random.Generator) -> tuple:
    _, back, side, _, la, lo = job.fields
    tint = _light(job, rng)
    img = ctx.background(BACK_COLORS[back][1], tint, rng)
    pill = _pose(ctx.sprite(job.codes[0], side), angle=lo + float(rng.uniform(-6, 6)),
                 squash=math.sin(math.radians(la)), scale=float(rng.uniform(0.94, 1.06)), tint=tint)
    w, h = ctx.size
    box = _paste(img, pill, w * (0.5 + rng.uniform(-0.08, 0.08)), h * (0.5 + rng.uniform(-0.08, 0.08)))
    return ctx.add_noise(img, rng), [box]


def _render_combo(job: Job, ctx: RenderContext, rng: np.random.Generator) -> tuple:
    """3-4 pills roughly 2x2; the arrangement is shared by the combination's shots, the elevation is not."""
    lay = np.random.default_rng([ctx.seed, 0xC0B0, job.arrangement])
    cells = lay.permutation(4)[:len(job.codes)]
    w, h = ctx.size
    squash = math.sin(math.radians(job.fields[4]))
    tint = _light(job, rng)
    img = ctx.background(BACK_COLORS[job.fields[1]][1], tint, rng)
    boxes = []
    for code, cell in zip(job.codes, cells):
        sprite = ctx.sprite(code, 0)
        fit = min(1.0, 0.44 * w / sprite.width, 0.44 * w / sprite.height) * float(lay.uniform(0.94, 1.04))
        pill = _pose(sprite, float(lay.uniform(0, 360)), squash, fit, tint)
        cx = w * (0.27 + 0.46 * (cell % 2) + lay.uniform(-0.03, 0.03))
        cy = h / 2 + (h * (0.3 + 0.4 * (cell // 2) + lay.uniform(-0.03, 0.03)) - h / 2) * squash
        boxes.append(_paste(img, pill, cx + rng.uniform(-4, 4), cy + rng.uniform(-4, 4)))
    return ctx.add_noise(img, rng), boxes


def _render_index(job: Job, ctx: RenderContext) -> Image.Image:
    """The unlabeled layout picture of a combination folder: its pills in a row, each with its code."""
    w, h = ctx.size
    img = Image.new("RGB", ctx.size, (250, 250, 250))
    d = ImageDraw.Draw(img)
    slot = w / len(job.codes)
    for i, code in enumerate(job.codes):
        sprite = ctx.sprite(code, 0)
        fit = min(0.8 * slot / sprite.width, 0.3 * h / sprite.height)
        pill = sprite.resize((max(4, int(sprite.width * fit)), max(4, int(sprite.height * fit))))
        _paste(img, pill, slot * (i + 0.5), h * 0.4)
        d.text((slot * (i + 0.5), h * 0.62), code, fill=(20, 20, 20), font=_font(int(slot * 0.1)), anchor="mm")
    return img


def render_job(job: Job, ctx: RenderContext) -> tuple:
    """(image, boxes) of one job, drawn only from (seed, job.index): the same in any process."""
    rng = np.random.default_rng([ctx.seed, job.index])
    if job.kind == "index":
        return _render_index(job, ctx), []
    if job.kind == "combo":
        return _render_combo(job, ctx, rng)
    return _render_single(job, ctx, rng)


def _write_png(path: Path, img: Image.Image, defect: str) -> None:
    if defect == "orphan_label":
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    if defect == "empty_file":
        path.write_bytes(b"")
        return
    buf = io.BytesIO()
    img.save(buf, format="PNG", compress_level=1)
    data = buf.getvalue()
    path.write_bytes(data[: len(data) // 2] if defect == "truncated_png" else data)


_CTX: Optional[RenderContext] = None
_ROOT: Optional[Path] = None


def init_worker(looks: Optional[dict], size: tuple, seed: int, root: str) -> None:
    """Set (or, with ``looks=None``, clear) this process's render state."""
    global _CTX, _ROOT
    _CTX, _ROOT = (RenderContext(looks, size, seed), Path(root)) if looks is not None else (None, None)


def render_and_write(job: Job) -> tuple:
    """Worker entry: render, write the PNG (or its defect), hand back the boxes for the labels."""
    img, boxes = render_job(job, _CTX)
    _write_png(_ROOT / job.image, img, job.png_defect)
    return job.index, boxes
