"""A synthetic AI Hub oral-drug tree, in the real on-disk layout (see docs/aihub_format.md).

``generate(out_dir, ...)`` writes TS/TL (images/labels) folder pairs for singles and combinations, in a
Training and a Validation part, in one of three layouts:

- ``raw``: ``DIR/166.약품식별 인공지능 개발을 위한 경구약제 이미지 데이터/01.데이터/1.Training/원천데이터/
  단일경구약제 5000종/TS_1_단일/K-000114/K-000114_0_2_0_0_75_260_200.png`` and
  ``.../라벨링데이터/단일경구약제 5000종/TL_1_단일/K-000114_json/<stem>.json``; combinations under
  ``경구약제조합 5000종/TS_1_조합/K-a-b-c/`` with one JSON per pill in ``TL_1_조합/K-a-b-c_json/K-a/``;
  ``2.Validation`` holds ``VS_n``/``VL_n``.
- ``raw_underscore``: the same with every space replaced by ``_`` (``단일경구약제_5000종``).
- ``english``: the existing project's rename, ``DIR/data/train/images/single/TS_1_single/...``,
  ``DIR/data/train/labels/combination/TL_1_combo/...``, ``DIR/data/val/images/single/VS_1_single/...``.

Each K-code has its own pill look (shape, one or two colours, imprint text, score line) and drug metadata,
drawn once; each image varies it as its file name says (background colour, front/back, light, elevation,
rotation) plus jitter and sensor noise. Clean labels always fill ``drug_N``, ``dl_name``, ``drug_shape``,
``color_class1`` and ``dl_company`` and have non-zero sizes, and no two K-codes share a look (shape,
colours, form, sizes) unless the ``near_identical_pair`` defect made them so.

``defects=True`` injects every defect of aihub_format.md into the Training part only, keeping >= 4 clean
single images per class; ``DIR/defects.json`` lists counts and affected files (relative paths)::

    {"counts": {"bbox_outside": 2, ...}, "files": {"bbox_outside": ["166.../x.json", ...], ...},
     "pairs": [["K-000123", "K-004567"]]}

Determinism: every image is drawn from a generator seeded by (seed, image index), so the same seed gives
the same bytes whatever the number of worker processes. ``DIR/synth_summary.json`` records what was made.
"""
from __future__ import annotations

import argparse
import dataclasses
import hashlib
import io
import json
import logging
import math
import multiprocessing
import os
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np
from PIL import Image, ImageChops, ImageDraw, ImageFilter, ImageFont

from pillsnap_dali.cli import add_shared_flags, config_from_args, key_help, run_main, setup_logging
from pillsnap_dali.config import CUSTOM
from pillsnap_dali.errors import PillsnapError

_logger = logging.getLogger(__name__)

GENERATOR_VERSION = 3          # bump when the output of a given seed changes (invalidates demo caches)
LAYOUTS = ("raw", "raw_underscore", "english")
DL_IDX_MODES = ("raw", "k")    # raw: dl_idx = str(K - 1), as released; k: str(K), a derived copy's convention
SUMMARY_FILE = "synth_summary.json"
DEFECTS_FILE = "defects.json"
COMPLETE_MARKER = ".synth_complete"
MIN_CLEAN_PER_CLASS = 4
CLASSES_PER_FOLDER = 10        # K-codes per TS_n/TL_n folder pair (fewer in small trees: always >= 2 pairs)
COMBOS_PER_FOLDER = 5          # combination folders per TS_n_조합 (idem)

# file-name field value sets (aihub_format.md "File names"); the name of light 0 is unknown: a guess
BACK_COLORS = {0: ("검은색 배경", (22, 22, 26)), 1: ("파란색 배경", (36, 74, 150)), 2: ("연회색 배경", (196, 198, 202))}
DRUG_DIRS = {0: "앞면", 1: "뒷면"}
LIGHTS = {0: ("전구색", (1.06, 0.98, 0.86)), 1: ("주광색", (0.95, 0.99, 1.07)), 2: ("주백색", (1.0, 1.0, 1.0))}
ELEVATIONS = (60, 70, 75, 90)
ROTATIONS = tuple(range(0, 360, 20))
COMBO_ELEVATIONS = (70, 75, 90)
SIZE_FIELD = 200
SHOT_GRID = (len(BACK_COLORS), len(DRUG_DIRS), len(LIGHTS), len(ELEVATIONS), len(ROTATIONS))  # 1296 shots

DEFECT_KINDS = ("combo_missing_pill_json", "bbox_outside", "double_label", "unparsable_json", "bbox_bad_len",
                "bbox_nonpositive", "null_metadata", "zero_dimension", "orphan_image", "orphan_label",
                "truncated_png", "empty_file", "near_identical_pair")
SINGLE_LABEL_DEFECTS = ("bbox_outside", "unparsable_json", "bbox_bad_len", "bbox_nonpositive", "null_metadata",
                        "zero_dimension", "orphan_image")
SINGLE_PNG_DEFECTS = ("orphan_label", "truncated_png", "empty_file")
COMBO_DEFECTS = ("combo_missing_pill_json", "double_label")

COLOURS = {"하양": (236, 236, 230), "노랑": (238, 212, 64), "주황": (243, 138, 42), "분홍": (238, 158, 184),
           "빨강": (196, 38, 42), "갈색": (136, 84, 44), "연두": (168, 214, 92), "초록": (38, 136, 62),
           "청록": (36, 158, 160), "파랑": (52, 92, 204), "남색": (32, 42, 112), "자주": (150, 40, 110),
           "보라": (128, 88, 190), "회색": (140, 140, 142), "검정": (38, 38, 40)}
TABLET_SHAPES = ("원형", "타원형", "장방형", "삼각형", "사각형", "오각형", "육각형", "팔각형", "마름모형")
ROUND_SHAPES = ("원형", "사각형", "삼각형", "오각형", "육각형", "팔각형")   # long side == short side
_SYLLABLES = (("타", "ta"), ("록", "rok"), ("세", "se"), ("린", "rin"), ("프", "peu"), ("로", "ro"), ("졸", "jol"),
              ("민", "min"), ("아", "a"), ("스", "seu"), ("피", "pi"), ("렌", "ren"), ("카", "ka"), ("텔", "tel"),
              ("모", "mo"), ("사", "sa"), ("탄", "tan"), ("메", "me"), ("트", "teu"), ("포", "po"), ("글", "geul"),
              ("리", "ri"), ("디", "di"), ("핀", "pin"), ("코", "ko"), ("날", "nal"))
_COMPANIES = (("(주)종근당", "Chong Kun Dang"), ("한미약품(주)", "Hanmi Pharm. Co., Ltd."), ("(주)유한양행", "Yuhan"),
              ("대웅제약(주)", "Daewoong Pharmaceutical"), ("동아에스티(주)", "Dong-A ST"), ("일동제약(주)", "Ildong"),
              ("보령제약(주)", "Boryung"), ("(주)녹십자", "GC Biopharma"), ("한국화이자제약(주)", ""))
_CLASS_NOS = ("[01130]항전간제", "[02140]혈압강하제", "[01140]해열.진통.소염제", "[03960]당뇨병용제",
              "[02180]동맥경화용제", "[02320]소화성궤양용제", "[04490]기타의 알레르기용약", "[01190]기타의 중추신경용약")
_MATERIALS = (("아세트아미노펜", "Acetaminophen"), ("메트포르민염산염", "Metformin Hydrochloride"),
              ("암로디핀베실산염", "Amlodipine Besylate"), ("아토르바스타틴칼슘", "Atorvastatin Calcium"),
              ("테트라사이클린염산염", "Tetracycline Hydrochloride"), ("레보티록신나트륨", "Levothyroxine Sodium"),
              ("세티리진염산염", "Cetirizine Hydrochloride"), ("라니티딘염산염", "Ranitidine Hydrochloride"))
_TABLET_FORMS = (("정제", "나정"), ("필름코팅정", "필름코팅정"), ("정제, 저작정", "저작정"), ("서방성필름코팅정", "서방성필름코팅정"))
_PRINT_PREFIXES = ("CKD", "YH", "DW", "HM", "GC", "BR", "IL", "DA", "ST", "PF", "TY", "JW", "KP", "SK", "LG")
_DOSES = (5, 10, 20, 25, 40, 50, 100, 200, 250, 500)


class SynthError(PillsnapError, ValueError):
    """Settings the generator cannot honour (too few images for the defects, too many classes...)."""


@dataclass(frozen=True)
class SynthSpec:
    """What to generate (the ``generate`` keyword arguments, validated)."""
    classes: int = 20
    images_per_class: int = 40
    combos: int = 12
    size: tuple = (976, 1280)
    defects: bool = False
    seed: int = 0
    layout: str = "raw"
    dl_idx: str = "raw"

    @property
    def val_per_class(self) -> int:
        return max(2, self.images_per_class // 4)

    @property
    def val_combos(self) -> int:
        return max(1, self.combos // 4) if self.combos > 0 else 0

    def check(self) -> None:
        if self.layout not in LAYOUTS:
            raise SynthError(f"layout must be one of {list(LAYOUTS)}, got {self.layout!r}")
        if self.dl_idx not in DL_IDX_MODES:
            raise SynthError(f"dl_idx must be one of {list(DL_IDX_MODES)}, got {self.dl_idx!r}")
        if not 1 <= self.classes <= 30000:
            raise SynthError(f"classes must be in 1..30000, got {self.classes}")
        if self.images_per_class < 1 or self.combos < 0:
            raise SynthError("images_per_class must be >= 1 and combos >= 0")
        if self.images_per_class + self.val_per_class > math.prod(SHOT_GRID):
            raise SynthError(f"at most {math.prod(SHOT_GRID)} distinct shots per K-code (train + val)")
        if min(self.size) < 64:
            raise SynthError(f"size must be at least 64x64, got {self.size}")
        possible = math.comb(self.classes, 3) + math.comb(self.classes, 4)
        if self.combos + self.val_combos > possible:
            raise SynthError(f"{self.combos} + {self.val_combos} (validation) combinations need more classes: "
                             f"{self.classes} classes give {possible} distinct 3-4 pill combinations")
        if self.defects and (self.classes < 5 or self.combos < 1):
            raise SynthError("defects need >= 5 classes and >= 1 combination (double_label labels a pill with "
                             "a K-code outside its combination)")


@dataclass
class SynthSummary:
    """What ``generate`` wrote. ``root`` is the folder a scanner is pointed at (``DIR``)."""
    root: Path
    layout: str
    size: tuple
    seed: int
    dl_idx: str
    codes: list                                     # single-pill K-codes, ascending (the classes)
    combos: dict                                    # part ("train" | "val") -> combination folder names
    counts: dict                                    # part -> {single_images, single_labels, combo_images, ...}
    defects: dict                                   # defect name -> count (all zero without defects)
    meta: dict = field(default_factory=dict)        # K-code -> drug metadata (classmap.META_KEYS and more)
    seconds: float = 0.0                            # generation time (not stored in the summary file)

    def to_dict(self) -> dict:
        """What ``synth_summary.json`` holds: not ``root`` (the tree may move), not ``seconds`` (same seed,
        same bytes)."""
        d = dataclasses.asdict(self)
        d.pop("root")
        d.pop("seconds")
        return d

    @classmethod
    def load(cls, root: str | Path) -> "SynthSummary":
        """Read ``root/synth_summary.json`` back (``root`` is not stored: the tree may have moved)."""
        with open(Path(root) / SUMMARY_FILE, encoding="utf-8") as fh:
            d = json.load(fh)
        d["size"] = tuple(d["size"])
        return cls(root=Path(root), **d)


# ---------------------------------------------------------------------------------------------- layout
@dataclass(frozen=True)
class TreeLayout:
    """Relative folder names of the three layouts. ``part``: train | val; ``kind``: single | combo;
    ``role``: images | labels."""
    layout: str

    def folder(self, part: str, kind: str, role: str, n: int) -> str:
        letter = ("T" if part == "train" else "V") + ("S" if role == "images" else "L")
        if self.layout == "english":
            sub = "single" if kind == "single" else "combination"
            tag = "single" if kind == "single" else "combo"
            return f"data/{part}/{role}/{sub}/{letter}_{n}_{tag}"
        sep = " " if self.layout == "raw" else "_"
        top = sep.join(("166.약품식별", "인공지능", "개발을", "위한", "경구약제", "이미지", "데이터"))
        split = "1.Training" if part == "train" else "2.Validation"
        source = "원천데이터" if role == "images" else "라벨링데이터"
        group = f"단일경구약제{sep}5000종" if kind == "single" else f"경구약제조합{sep}5000종"
        tag = "단일" if kind == "single" else "조합"
        return f"{top}/01.데이터/{split}/{source}/{group}/{letter}_{n}_{tag}"


def parse_size(text: str) -> tuple:
    """``"976x1280"`` -> ``(976, 1280)`` (width, height)."""
    try:
        w, h = (int(v) for v in str(text).lower().split("x"))
    except ValueError:
        raise SynthError(f"size must look like 976x1280 (WIDTHxHEIGHT), got {text!r}") from None
    return (w, h)


# --------------------------------------------------------------------------------------------- catalog
@dataclass(frozen=True)
class PillLook:
    """How the pills of one K-code look (drawn once per code, shared by all its images)."""
    shape: str
    colour1: str
    colour2: str          # "" for one-colour tablets; capsules have two
    capsule: bool
    print_front: str
    print_back: str
    line_front: str       # "" | "-" | "+"
    line_back: str
    long_mm: float
    short_mm: float


def _pick(rng: np.random.Generator, seq):
    return seq[int(rng.integers(len(seq)))]


def _mm(value: float):
    """Millimetres as the real labels write them: an int when whole."""
    value = round(float(value), 1)
    return int(value) if value == int(value) else value


def _look_candidates() -> list:
    """(shape, colour1, colour2) triples, ordered so that the first ones differ most (colour first)."""
    colours = list(COLOURS)
    out = []
    for i in range(len(colours) * len(TABLET_SHAPES)):
        out.append((TABLET_SHAPES[(i + i // len(colours)) % len(TABLET_SHAPES)], colours[i % len(colours)], ""))
        if i % 4 == 3:   # a capsule every fourth look
            j = i // 4
            c1, c2 = colours[j % len(colours)], colours[(j * 7 + 3) % len(colours)]
            if c1 != c2:
                out.append(("장방형", c1, c2))
    return list(dict.fromkeys(out))


def _imprint(rng: np.random.Generator) -> str:
    text = _pick(rng, _PRINT_PREFIXES)
    return f"{text} {_pick(rng, _DOSES)}" if rng.random() < 0.6 else text


def _draw_look(rng: np.random.Generator, triple: tuple) -> PillLook:
    shape, c1, c2 = triple
    capsule = bool(c2)
    long_mm = float(rng.uniform(14, 19.5) if capsule else rng.uniform(10, 17.5))
    short_mm = long_mm if shape in ROUND_SHAPES else long_mm * float(rng.uniform(0.45, 0.62))
    back = _imprint(rng) if rng.random() < 0.5 else ""
    return PillLook(shape=shape, colour1=c1, colour2=c2, capsule=capsule, print_front=_imprint(rng),
                    print_back=back, line_front=_pick(rng, ("", "", "-", "+")) if not capsule else "",
                    line_back=_pick(rng, ("", "-")) if not capsule else "",
                    long_mm=round(long_mm, 1), short_mm=round(short_mm, 1))


def _drug_name(rng: np.random.Generator, capsule: bool) -> tuple:
    sylls = [_pick(rng, _SYLLABLES) for _ in range(int(rng.integers(2, 5)))]
    dose = _pick(rng, _DOSES)
    ko = "".join(s[0] for s in sylls) + ("캡슐" if capsule else _pick(rng, ("정", "정", "필름코팅정", "서방정")))
    en = "".join(s[1] for s in sylls).capitalize() + (" Cap." if capsule else " Tab.")
    return f"{ko} {dose}mg", (f"{en} {dose}mg" if rng.random() < 0.7 else "")


def _date(rng: np.random.Generator, first_year: int, last_year: int) -> str:
    return f"{int(rng.integers(first_year, last_year + 1))}{int(rng.integers(1, 13)):02d}{int(rng.integers(1, 29)):02d}"


def _drug_meta(rng: np.random.Generator, look: PillLook) -> dict:
    """The per-K-code metadata of images[0] (dl_name .. change_date, minus per-image fields)."""
    name, name_en = _drug_name(rng, look.capsule)
    company, company_en = _pick(rng, _COMPANIES)
    material, material_en = _pick(rng, _MATERIALS)
    custom, form = ("경질캡슐제", "경질캡슐제") if look.capsule else _pick(rng, _TABLET_FORMS)
    item_seq = int(rng.integers(195_900_000, 202_300_000))
    edi = str(int(rng.integers(600_000_000, 699_999_999)))
    edi = _pick(rng, (edi, edi, f"{edi},A{int(rng.integers(10_000_000, 99_999_999))}", ""))
    colour_text = look.colour1 + (f"/{look.colour2}" if look.colour2 else "")
    return {
        "dl_name": name, "dl_name_en": name_en,
        "img_key": f"http://connectdi.com/design/img/drug/{item_seq:09d}.jpg",
        "dl_material": material, "dl_material_en": material_en, "dl_custom_shape": custom,
        "dl_company": company, "dl_company_en": company_en, "di_company_mf": company,
        "di_company_mf_en": company_en, "item_seq": item_seq,
        "di_item_permit_date": _date(rng, 1990, 2020),
        "di_class_no": _pick(rng, _CLASS_NOS), "di_etc_otc_code": _pick(rng, ("전문의약품", "전문의약품", "일반의약품")),
        "di_edi_code": edi, "chart": f"{colour_text}의 {look.shape} {custom}",
        "drug_shape": look.shape, "thick": _mm(rng.uniform(2.5, 7.0)), "leng_long": _mm(look.long_mm),
        "leng_short": _mm(look.short_mm), "print_front": look.print_front, "print_back": look.print_back,
        "color_class1": look.colour1, "color_class2": look.colour2, "line_front": look.line_front,
        "line_back": look.line_back, "img_regist_ts": _date(rng, 2020, 2020),
        "form_code_name": form, "mark_code_front_anal": "", "mark_code_back_anal": "", "mark_code_front_img": "",
        "mark_code_back_img": "", "mark_code_front": "", "mark_code_back": "",
        "change_date": _date(rng, 2021, 2021),
    }


@dataclass
class Catalog:
    codes: list                 # K-codes ascending
    looks: dict                 # code -> PillLook
    meta: dict                  # code -> metadata dict
    pairs: list                 # near-identical K-code pairs (defect)


def _make_looks_unique(codes: list, triples: dict, looks: dict, meta: dict, rng: np.random.Generator) -> None:
    """Redraw the size (and metadata) of a code whose description equals an earlier code's, so that only the
    injected ``near_identical_pair`` defect has a twin (thousands of classes reuse shape/colour triples)."""
    from pillsnap_dali.data.scan import LOOK_KEYS

    taken = set()
    for code in codes:
        key = tuple(str(meta[code].get(k)) for k in LOOK_KEYS)
        for _ in range(1000):
            if key not in taken:
                break
            looks[code] = _draw_look(rng, triples[code])
            meta[code] = _drug_meta(rng, looks[code])
            key = tuple(str(meta[code].get(k)) for k in LOOK_KEYS)
        else:
            raise RuntimeError(f"no unique look left for {code}")  # not reachable with the candidate triples
        taken.add(key)


def _make_catalog(spec: SynthSpec, rng: np.random.Generator) -> Catalog:
    numbers = sorted(int(n) for n in rng.choice(np.arange(1, 30001), size=spec.classes, replace=False))
    codes = [f"K-{n:06d}" for n in numbers]
    candidates = _look_candidates()
    order = rng.permutation(len(codes))   # which K-code gets which look
    looks, meta, triples = {}, {}, {}
    for rank, ci in enumerate(order):
        triple = candidates[rank % len(candidates)]   # beyond len(candidates): same triple, other sizes
        triples[codes[ci]] = triple
        looks[codes[ci]] = _draw_look(rng, triple)
    for code in codes:
        meta[code] = _drug_meta(rng, looks[code])
    _make_looks_unique(codes, triples, looks, meta, rng)
    pairs = []
    if spec.defects:
        a, b = (codes[int(i)] for i in rng.choice(len(codes), size=2, replace=False))
        looks[b] = dataclasses.replace(looks[a], print_front=_imprint(rng) + "N", print_back=looks[b].print_back)
        for key in ("dl_custom_shape", "form_code_name", "chart", "drug_shape", "thick", "leng_long", "leng_short",
                    "color_class1", "color_class2", "line_front", "line_back"):
            meta[b][key] = meta[a][key]
        meta[b]["print_front"], meta[b]["print_back"] = looks[b].print_front, looks[b].print_back
        pairs.append(sorted((a, b)))
    return Catalog(codes=codes, looks=looks, meta=meta, pairs=pairs)


# ------------------------------------------------------------------------------------------------ plan
@dataclass
class Job:
    """One PNG to render and its label files to write."""
    index: int
    part: str                   # train | val
    kind: str                   # single | combo | index
    codes: tuple                # the pills (single: one code; combo: ascending codes)
    image: str                  # relative path of the PNG
    label_dir: str              # single: folder of the JSON; combo: folder holding one folder per code
    fields: tuple = ()          # (drug_S, back_color, drug_dir, light_color, camera_la, camera_lo)
    arrangement: int = 0        # combos: the 3 shots of one combination share this layout seed
    png_defect: str = ""        # "" | orphan_label (not written) | truncated_png | empty_file
    label_defect: str = ""      # "" | SINGLE_LABEL_DEFECTS | COMBO_DEFECTS
    extra_code: str = ""        # double_label: the second K-code labelled on the first pill

    @property
    def stem(self) -> str:
        return Path(self.image).stem

    def label_paths(self) -> list:
        if self.kind == "single":
            return [f"{self.label_dir}/{self.stem}.json"]
        return [f"{self.label_dir}/{c}/{self.stem}.json" for c in self.codes]


def _stem(codes: tuple, fields: tuple) -> str:
    head = "K-" + "-".join(c[2:] for c in codes)
    s, back, side, light, la, lo = fields
    return f"{head}_{s}_{back}_{side}_{light}_{la}_{lo:03d}_{SIZE_FIELD}"


def _shot_fields(flat: int) -> tuple:
    """Decode one of the 1296 distinct single shots into its file-name fields."""
    back, rest = flat % SHOT_GRID[0], flat // SHOT_GRID[0]
    side, rest = rest % SHOT_GRID[1], rest // SHOT_GRID[1]
    light, rest = rest % SHOT_GRID[2], rest // SHOT_GRID[2]
    la, lo = ELEVATIONS[rest % SHOT_GRID[3]], ROTATIONS[rest // SHOT_GRID[3]]
    return (0, back, side, light, la, lo)


def folder_number(i: int, total: int, per_folder: int) -> int:
    """The n of TS_n for the i-th of ``total`` items: ``per_folder`` a folder, but >= 2 folders when total >= 2."""
    per = max(1, min(per_folder, math.ceil(total / 2)))
    return i // per + 1


def _plan_singles(spec: SynthSpec, tree: TreeLayout, codes: list, rng: np.random.Generator) -> list:
    jobs = []
    for ci, code in enumerate(codes):
        shots = rng.choice(math.prod(SHOT_GRID), size=spec.images_per_class + spec.val_per_class, replace=False)
        n = folder_number(ci, len(codes), CLASSES_PER_FOLDER)
        for k, flat in enumerate(shots):
            part = "train" if k < spec.images_per_class else "val"
            fields = _shot_fields(int(flat))
            stem = _stem((code,), fields)
            image = f"{tree.folder(part, 'single', 'images', n)}/{code}/{stem}.png"
            label_dir = f"{tree.folder(part, 'single', 'labels', n)}/{code}_json"
            jobs.append(Job(0, part, "single", (code,), image, label_dir, fields))
    return jobs


def _draw_combo_codes(spec: SynthSpec, codes: list, rng: np.random.Generator) -> list:
    wanted, seen, out = spec.combos + spec.val_combos, set(), []
    for _ in range(wanted * 50 + 100):
        if len(out) == wanted:
            return out
        k = min(len(codes), int(rng.integers(3, 5)))
        pick = tuple(sorted(codes[int(i)] for i in rng.choice(len(codes), size=k, replace=False)))
        if pick not in seen:
            seen.add(pick)
            out.append(pick)
    raise SynthError(f"cannot draw {wanted} distinct combinations from {len(codes)} classes")


def _plan_combos(spec: SynthSpec, tree: TreeLayout, codes: list, rng: np.random.Generator) -> list:
    jobs = []
    for i, combo in enumerate(_draw_combo_codes(spec, codes, rng)):
        part = "train" if i < spec.combos else "val"
        n = folder_number(i, spec.combos, COMBOS_PER_FOLDER) if part == "train" else \
            folder_number(i - spec.combos, spec.val_combos, COMBOS_PER_FOLDER)
        name = "K-" + "-".join(c[2:] for c in combo)
        img_dir = f"{tree.folder(part, 'combo', 'images', n)}/{name}"
        label_dir = f"{tree.folder(part, 'combo', 'labels', n)}/{name}_json"
        for la in COMBO_ELEVATIONS:
            fields = (0, 2, 0, 2, la, 0)
            jobs.append(Job(0, part, "combo", combo, f"{img_dir}/{_stem(combo, fields)}.png", label_dir, fields,
                            arrangement=i))
        jobs.append(Job(0, part, "index", combo, f"{img_dir}/{name}_index.png", "", arrangement=i))
    return jobs


def _victims(groups: dict, kinds: tuple, per_kind: int, capacity: Optional[dict], rng: np.random.Generator) -> list:
    """Pick ``per_kind`` distinct jobs for each defect kind, round-robin over the groups (K-codes or
    combinations); ``capacity`` caps the victims per group (None: no cap)."""
    pools = {key: [jobs[int(i)] for i in rng.permutation(len(jobs))] for key, jobs in groups.items()}
    order = list(pools)
    picked, turn = [], 0
    for kind in kinds:
        for _ in range(per_kind):
            for _ in range(len(order)):
                key = order[turn % len(order)]
                turn += 1
                if pools[key] and (capacity is None or capacity[key] > 0):
                    if capacity is not None:
                        capacity[key] -= 1
                    picked.append((kind, pools[key].pop()))
                    break
            else:
                raise SynthError(f"not enough images to inject {per_kind} x '{kind}' and keep "
                                 f">= {MIN_CLEAN_PER_CLASS} clean images per class: raise images_per_class")
    return picked


def _group(jobs: list, key) -> dict:
    out: dict = {}
    for j in jobs:
        out.setdefault(key(j), []).append(j)
    return out


def _assign_defects(spec: SynthSpec, jobs: list, codes: list, rng: np.random.Generator) -> None:
    singles = [j for j in jobs if j.part == "train" and j.kind == "single"]
    combos = [j for j in jobs if j.part == "train" and j.kind == "combo"]
    if not combos:
        raise SynthError("defects need at least one training combination (combos >= 1)")
    per_single = max(1, round(len(singles) * 0.005))
    capacity = {c: max(0, spec.images_per_class - MIN_CLEAN_PER_CLASS) for c in codes}
    needed = per_single * len(SINGLE_LABEL_DEFECTS + SINGLE_PNG_DEFECTS)
    if sum(capacity.values()) < needed:
        least = MIN_CLEAN_PER_CLASS + math.ceil(needed / len(codes))
        raise SynthError(f"defects take {needed} training singles and leave >= {MIN_CLEAN_PER_CLASS} clean "
                         f"per class: needs images_per_class >= {least} with {len(codes)} classes")
    groups = _group(singles, lambda j: j.codes[0])
    for kind, job in _victims(groups, SINGLE_LABEL_DEFECTS + SINGLE_PNG_DEFECTS, per_single, capacity, rng):
        if kind in SINGLE_PNG_DEFECTS:
            job.png_defect = kind
        else:
            job.label_defect = kind
    per_combo = max(1, len(combos) // 12)
    if len(combos) < 2 * per_combo:
        raise SynthError("defects need at least one training combination with 2 shots")
    for kind, job in _victims(_group(combos, lambda j: j.arrangement), COMBO_DEFECTS, per_combo, None, rng):
        job.label_defect = kind
        if kind == "double_label":
            others = [c for c in codes if c not in job.codes]
            job.extra_code = _pick(rng, others) if others else ""
            if not job.extra_code:
                raise SynthError("double_label needs a K-code outside the combination: add classes")


def make_plan(spec: SynthSpec) -> tuple:
    """(Catalog, jobs): everything decided up front from the seed, in a fixed order."""
    rng = np.random.default_rng([spec.seed, 0x5EED])
    tree = TreeLayout(spec.layout)
    catalog = _make_catalog(spec, rng)
    jobs = _plan_singles(spec, tree, catalog.codes, rng) + _plan_combos(spec, tree, catalog.codes, rng)
    if spec.defects:
        _assign_defects(spec, jobs, catalog.codes, rng)
    for i, job in enumerate(jobs):
        job.index = i
    return catalog, jobs


# ------------------------------------------------------------------------------------------- rendering
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


def _init_worker(looks: Optional[dict], size: tuple, seed: int, root: str) -> None:
    """Set (or, with ``looks=None``, clear) this process's render state."""
    global _CTX, _ROOT
    _CTX, _ROOT = (RenderContext(looks, size, seed), Path(root)) if looks is not None else (None, None)


def _work(job: Job) -> tuple:
    """Worker entry: render, write the PNG (or its defect), hand back the boxes for the labels."""
    img, boxes = render_job(job, _CTX)
    _write_png(_ROOT / job.image, img, job.png_defect)
    return job.index, boxes


# ---------------------------------------------------------------------------------------------- labels
IMAGE_KEYS = ("file_name", "width", "height", "imgfile", "drug_N", "drug_S", "back_color", "drug_dir",
              "light_color", "camera_la", "camera_lo", "size", "dl_idx", "dl_mapping_code", "dl_name", "dl_name_en",
              "img_key", "dl_material", "dl_material_en", "dl_custom_shape", "dl_company", "dl_company_en",
              "di_company_mf", "di_company_mf_en", "item_seq", "di_item_permit_date", "di_class_no",
              "di_etc_otc_code", "di_edi_code", "chart", "drug_shape", "thick", "leng_long", "leng_short",
              "print_front", "print_back", "color_class1", "color_class2", "line_front", "line_back",
              "img_regist_ts", "form_code_name", "mark_code_front_anal", "mark_code_back_anal",
              "mark_code_front_img", "mark_code_back_img", "mark_code_front", "mark_code_back", "change_date", "id")
NULLED_FIELDS = ("dl_name", "drug_shape", "color_class1", "dl_company", "print_front")
CATEGORY = {"supercategory": "pill", "id": 1, "name": "Drug"}


@dataclass(frozen=True)
class LabelContext:
    size: tuple
    dl_idx: str
    meta: dict


def label_json(job: Job, code: str, bbox: list, ann_id: int, lc: LabelContext) -> dict:
    """One AI Hub label: the 50 images[0] keys in order, 'type', one annotation, one category."""
    s, back, side, light, la, lo = job.fields
    number = int(code[2:])
    per_image = {"file_name": f"{job.stem}.png", "width": lc.size[0], "height": lc.size[1],
                 "imgfile": f"{job.stem}.png", "drug_N": code, "drug_S": "정상알약", "back_color": BACK_COLORS[back][0],
                 "drug_dir": DRUG_DIRS[side], "light_color": LIGHTS[light][0], "camera_la": la, "camera_lo": lo,
                 "size": SIZE_FIELD, "dl_idx": str(number - 1 if lc.dl_idx == "raw" else number),
                 "dl_mapping_code": code, "id": job.index + 1}
    merged = {**lc.meta[code], **per_image}
    images = {k: merged[k] for k in IMAGE_KEYS}
    x, y, w, h = bbox
    ann = {"area": w * h, "iscrowd": 0, "bbox": [x, y, w, h], "category_id": 1, "ignore": 0,
           "segmentation": [], "id": ann_id, "image_id": job.index + 1}
    return {"images": [images], "type": "instances", "annotations": [ann], "categories": [dict(CATEGORY)]}


def _break_label(label: dict, kind: str, serial: int, width: int) -> None:
    """Turn a clean label into one showing the defect ``kind`` (in place)."""
    img, ann = label["images"][0], label["annotations"][0]
    if kind == "bbox_outside":
        ann["bbox"][0] += 6 * width + 200           # like [6567, 625, 311, 315] on a 976-wide image
    elif kind == "bbox_bad_len":
        ann["bbox"] = ann["bbox"][:3] if serial % 2 == 0 else ann["bbox"] + [0]
    elif kind == "bbox_nonpositive":
        ann["bbox"][2 + serial % 2] *= 0 if serial % 2 == 0 else -1
    elif kind == "null_metadata":
        for i, key in enumerate(NULLED_FIELDS):
            img[key] = None if i % 2 == 0 else ""
        if serial % 2 == 1:   # every other one also loses its class field: drug_N -> dl_mapping_code fallback
            img["drug_N"] = None
    elif kind == "zero_dimension":
        img["thick"] = img["leng_long"] = img["leng_short"] = 0


def _dump(label: dict) -> str:
    return json.dumps(label, ensure_ascii=False, indent=2)


class LabelWriter:
    """Writes the label JSONs of rendered jobs (with their defects) and keeps the tallies."""

    def __init__(self, root: Path, lc: LabelContext):
        self.root, self.lc = root, lc
        self.ann_id = 0
        self.files: dict = {k: [] for k in DEFECT_KINDS}
        self.counts: dict = {p: {"single_images": 0, "single_labels": 0, "combo_images": 0, "combo_labels": 0,
                                 "index_images": 0} for p in ("train", "val")}

    def _write(self, rel: str, text: str, kind: str, part: str) -> None:
        path = self.root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")
        self.counts[part][f"{kind}_labels"] += 1

    def add(self, job: Job, boxes: list) -> None:
        part, tally = job.part, self.counts[job.part]
        if job.kind == "index":
            tally["index_images"] += 1
            return
        if job.png_defect == "orphan_label":
            self.files["orphan_label"].append(job.label_paths()[0])
        else:
            tally[f"{job.kind}_images"] += 1
            if job.png_defect:
                self.files[job.png_defect].append(job.image)
        if job.label_defect in ("orphan_image", "combo_missing_pill_json"):
            self.files[job.label_defect].append(job.image)
        pills = list(zip(job.codes, boxes, job.label_paths()))
        if job.label_defect == "orphan_image":
            pills = []
        elif job.label_defect == "combo_missing_pill_json":
            pills = pills[:-1]
        elif job.label_defect == "double_label":
            x, y, w, h = boxes[0]
            extra = f"{job.label_dir}/{job.extra_code}/{job.stem}.json"
            pills.append((job.extra_code, [x + (1 if w >= 20 else 0), y, w, h], extra))
            self.files["double_label"].append(extra)
        for code, box, rel in pills:
            self.ann_id += 1
            self._write(rel, self._text(job, code, box, rel), job.kind, part)

    def _text(self, job: Job, code: str, box: list, rel: str) -> str:
        label = label_json(job, code, list(box), self.ann_id, self.lc)
        kind = job.label_defect
        if kind in SINGLE_LABEL_DEFECTS and kind != "orphan_image":
            self.files[kind].append(rel)
            _break_label(label, kind, len(self.files[kind]), self.lc.size[0])
            if kind == "unparsable_json":
                text = _dump(label)
                return text[: len(text) // 2]
        return _dump(label)


# -------------------------------------------------------------------------------------------- generate
def _run_jobs(jobs: list, catalog: Catalog, spec: SynthSpec, root: Path, writer: LabelWriter, workers: int):
    args = (catalog.looks, spec.size, spec.seed, str(root))
    by_index = {j.index: j for j in jobs}
    if workers <= 1:
        _init_worker(*args)
        results = map(_work, jobs)
        pool = None
    else:
        methods = multiprocessing.get_all_start_methods()
        ctx = multiprocessing.get_context("fork" if "fork" in methods else "spawn")
        pool = ctx.Pool(workers, initializer=_init_worker, initargs=args)
        results = pool.imap(_work, jobs, chunksize=4)
    try:
        for index, boxes in results:
            writer.add(by_index[index], boxes)
    except BaseException:
        if pool is not None:
            pool.terminate()   # do not wait for the rest of the images
        raise
    finally:
        if pool is None:
            _init_worker(None, None, 0, "")   # drop the sprites held in this process
        else:
            pool.close()
            pool.join()


def _defects_report(writer: LabelWriter, catalog: Catalog, tree: TreeLayout, codes: list) -> dict:
    files = {k: sorted(v) for k, v in writer.files.items()}
    pair_dirs = []
    for pair in catalog.pairs:
        for code in pair:
            n = folder_number(codes.index(code), len(codes), CLASSES_PER_FOLDER)
            pair_dirs.append(f"{tree.folder('train', 'single', 'images', n)}/{code}")
    files["near_identical_pair"] = pair_dirs
    counts = {k: len(files[k]) for k in DEFECT_KINDS}
    counts["near_identical_pair"] = len(catalog.pairs)
    return {"counts": counts, "files": files, "pairs": catalog.pairs}


def generate(out_dir: str | Path, *, classes: int = 20, images_per_class: int = 40, combos: int = 12,
             size: tuple = (976, 1280), defects: bool = False, seed: int = 0, layout: str = "raw",
             dl_idx: str = "raw", workers: int = 2) -> SynthSummary:
    """Write a synthetic AI Hub tree under ``out_dir`` (created; must be empty) and describe it.

    ``size`` is (width, height) or ``"976x1280"``; ``workers`` render processes (the bytes do not depend on it).
    Raises SynthError for settings it cannot honour, before anything is written."""
    size = parse_size(size) if isinstance(size, str) else size
    spec = SynthSpec(classes=classes, images_per_class=images_per_class, combos=combos,
                     size=tuple(int(v) for v in size), defects=defects, seed=seed, layout=layout, dl_idx=dl_idx)
    spec.check()
    root = Path(out_dir)
    if root.exists() and any(root.iterdir()):
        raise SynthError(f"{root} is not empty: generate into a new folder")
    start = time.perf_counter()
    catalog, jobs = make_plan(spec)
    root.mkdir(parents=True, exist_ok=True)
    writer = LabelWriter(root, LabelContext(spec.size, spec.dl_idx, catalog.meta))
    _run_jobs(jobs, catalog, spec, root, writer, workers)
    report = _defects_report(writer, catalog, TreeLayout(layout), catalog.codes)
    (root / DEFECTS_FILE).write_text(json.dumps(report, ensure_ascii=False, indent=1), encoding="utf-8")
    combos_by_part = {p: sorted({Path(j.image).parent.name for j in jobs if j.kind == "combo" and j.part == p})
                      for p in ("train", "val")}
    summary = SynthSummary(root=root, layout=layout, size=spec.size, seed=seed, dl_idx=dl_idx, codes=catalog.codes,
                           combos=combos_by_part, counts=writer.counts, defects=report["counts"],
                           meta=catalog.meta, seconds=round(time.perf_counter() - start, 2))
    (root / SUMMARY_FILE).write_text(json.dumps(summary.to_dict(), ensure_ascii=False, indent=1), encoding="utf-8")
    _logger.info("synthetic tree: %d classes, %d train / %d val images in %.1f s at %s", len(catalog.codes),
                 _images(writer.counts["train"]), _images(writer.counts["val"]), summary.seconds, root)
    return summary


def _images(tally: dict) -> int:
    return tally["single_images"] + tally["combo_images"]


# ------------------------------------------------------------------------------------------- demo data
def synth_settings(cfg) -> dict:
    """The settings that decide the demo tree's bytes (``cfg.data.synth`` plus the generator version)."""
    return {**dataclasses.asdict(cfg.data.synth), "generator_version": GENERATOR_VERSION}


def demo_data_dir(cfg) -> Path:
    digest = hashlib.sha1(json.dumps(synth_settings(cfg), sort_keys=True).encode()).hexdigest()[:12]
    return Path(cfg.data.artifacts) / "synth" / digest


def _remove_stale_tmp(target: Path) -> None:
    """Drop half-made trees left by generations whose process is gone."""
    for tmp in target.parent.glob(f".{target.name}.tmp-*"):
        try:
            os.kill(int(tmp.name.rsplit("-", 1)[1]), 0)
        except ProcessLookupError:
            _logger.warning("removing an interrupted synthetic tree %s", tmp)
            shutil.rmtree(tmp, ignore_errors=True)
        except (ValueError, PermissionError):
            continue


def ensure_demo_data(cfg, workers: int = 2) -> Path:
    """The synthetic tree for ``cfg.data.synth``, generated only if missing; returns its ``DIR``.

    Generation goes to a temporary sibling, gets a completion marker last, then is renamed into place, so
    an interrupted or concurrent generation never leaves a half tree where a complete one is expected.
    """
    target = demo_data_dir(cfg)
    if (target / COMPLETE_MARKER).is_file():
        return target
    if target.exists():
        _logger.warning("%s has no completion marker (interrupted generation): generating it again", target)
        shutil.rmtree(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_tmp(target)
    s = cfg.data.synth
    tmp = target.with_name(f".{target.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    _logger.info("generating the synthetic demo tree %s (%s)", target, synth_settings(cfg))
    try:
        generate(tmp, classes=s.classes, images_per_class=s.images_per_class, combos=s.combos,
                 size=parse_size(s.size), defects=s.defects, seed=s.seed, layout=s.layout, workers=workers)
        (tmp / COMPLETE_MARKER).write_text(json.dumps(synth_settings(cfg), sort_keys=True), encoding="utf-8")
        try:
            os.rename(tmp, target)
        except OSError:
            if not (target / COMPLETE_MARKER).is_file():
                raise
            _logger.info("another process finished %s first; using it", target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


# ------------------------------------------------------------------------------------------------- CLI
def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m pillsnap_dali.synth",
                                description="Write a synthetic AI Hub oral-drug tree in the real on-disk layout.")
    add_shared_flags(p, ("out",), required=("out",), helps={"out": "output folder (created; must be empty; "
                                                                   "required)"})
    p.add_argument("--classes", type=int, help=key_help("number of K-codes", "data.synth.classes"))
    p.add_argument("--images-per-class", type=int, help=key_help("training single images per K-code",
                                                                 "data.synth.images_per_class"))
    p.add_argument("--combos", type=int, help=key_help("training combination folders (3 shots each)",
                                                       "data.synth.combos"))
    p.add_argument("--size", help=key_help("WIDTHxHEIGHT of the PNGs", "data.synth.size"))
    p.add_argument("--defects", action="store_true", default=None,
                   help=key_help("inject every known defect (see DIR/defects.json)", "data.synth.defects"))
    p.add_argument("--seed", type=int, help=key_help("same seed, same bytes", "data.synth.seed"))
    p.add_argument("--layout", choices=LAYOUTS, help=key_help("raw (Korean, spaces) | raw_underscore | english",
                                                              "data.synth.layout"))
    p.add_argument("--underscore", action="store_true", help="same as --layout raw_underscore (default: off)")
    p.add_argument("--dl-idx", choices=DL_IDX_MODES, default="raw",
                   help="raw: dl_idx = K-1 (as released); k: K (default: %(default)s)")
    p.add_argument("--workers", type=int, default=2,
                   help="render processes; the output does not depend on it (default: %(default)s)")
    add_shared_flags(p, ("stage", "config", "set"), helps={
        "stage": "take data.synth.* from this stage's overlay; one of %(choices)s (default: none, base.yaml alone)"})
    p.add_argument("-v", "--verbose", action="store_true", help="log at DEBUG level (default: INFO)")
    return p


# each flag's config key: the flags and a --config / --stage / --set all set data.synth.*
_FLAG_KEYS = {"classes": "data.synth.classes", "images_per_class": "data.synth.images_per_class",
              "combos": "data.synth.combos", "size": "data.synth.size", "defects": "data.synth.defects",
              "seed": "data.synth.seed", "layout": "data.synth.layout"}


def _main(args) -> int:
    sc = config_from_args(args, _FLAG_KEYS, default_stage=CUSTOM).data.synth
    layout = "raw_underscore" if args.underscore and sc.layout == "raw" else sc.layout
    s = generate(args.out, classes=sc.classes, images_per_class=sc.images_per_class, combos=sc.combos,
                 size=parse_size(sc.size), defects=sc.defects, seed=sc.seed, layout=layout, dl_idx=args.dl_idx,
                 workers=args.workers)
    print(f"wrote {s.root} ({s.layout}, {s.size[0]}x{s.size[1]}) in {s.seconds:.1f} s")
    print(f"  {len(s.codes)} classes, {len(s.combos['train'])} + {len(s.combos['val'])} combinations")
    for part in ("train", "val"):
        c = s.counts[part]
        print(f"  {part}: {c['single_images']} single + {c['combo_images']} combination images "
              f"(+{c['index_images']} index), {c['single_labels'] + c['combo_labels']} label JSONs")
    hit = {k: v for k, v in s.defects.items() if v}
    print("  defects: " + (", ".join(f"{k}={v}" for k, v in hit.items()) if hit else "none"))
    return 0


def main(argv=None) -> int:
    args = _parser().parse_args(argv)
    setup_logging(verbose=args.verbose)
    return run_main(lambda: _main(args))


if __name__ == "__main__":
    sys.exit(main())
