"""The generator's settings and what it made: format constants (file-name fields, defect kinds), ``SynthSpec``,
``SynthSummary``, ``SynthError`` and the folder layouts (``TreeLayout``).
"""
from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path

from pillsnap_dali.errors import PillsnapError


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
