"""The class map: K-codes in class-id order, with drug metadata.

Class identity is the K-code, never the position alone: two maps are compared code by code, and a
mismatch names the codes that differ.
"""
from __future__ import annotations

import json
from collections import Counter
import logging
from dataclasses import dataclass, field
from pathlib import Path

from pillsnap_dali.atomic import atomic_write_text
from pillsnap_dali.errors import InputError, PillsnapError

_logger = logging.getLogger(__name__)

META_KEYS = ("dl_name", "dl_name_en", "drug_shape", "color_class1", "color_class2", "print_front",
             "print_back", "dl_company", "dl_company_en", "di_edi_code", "dl_custom_shape", "form_code_name",
             "di_class_no", "di_etc_otc_code", "line_front", "line_back", "leng_long", "leng_short", "thick")


class ClassMapMismatch(PillsnapError, ValueError):
    """Two class maps disagree on which K-code sits at which class id."""


def _by_id(code_of: dict, ids: list) -> list[str]:
    """Codes in id order; the ids must be exactly 0..N-1: a model's output i IS class id i, so a map counting
    from 1, with a gap or a repeated id cannot be renumbered without shifting every prediction."""
    n = len(ids)
    if sorted(ids) != list(range(n)):
        dup = sorted(i for i, k in Counter(ids).items() if k > 1)[:5]
        raise InputError(f"class map ids must be 0..{n - 1}, each once (model output i is class id i); got ids "
                         f"{min(ids)}..{max(ids)} for {n} classes" + (f", repeated: {dup}" if dup else ""))
    return [code_of[i] for i in range(n)]


@dataclass
class ClassMap:
    codes: list[str]
    meta: dict[str, dict] = field(default_factory=dict)

    def __post_init__(self):
        if len(set(self.codes)) != len(self.codes):
            dup = sorted({c for c in self.codes if self.codes.count(c) > 1})
            raise InputError(f"class map has duplicate K-codes: {dup[:10]}")
        self.index = {c: i for i, c in enumerate(self.codes)}

    def __len__(self) -> int:
        return len(self.codes)

    def to_dict(self) -> dict:
        return {"version": 1, "num_classes": len(self.codes), "codes": list(self.codes),
                "meta": {c: self.meta.get(c, {}) for c in self.codes}}

    @classmethod
    def from_dict(cls, d: dict) -> "ClassMap":
        if isinstance(d, list):  # a bare list of codes
            return cls(codes=[str(c) for c in d])
        if "codes" in d:
            return cls(codes=[str(c) for c in d["codes"]], meta=dict(d.get("meta") or {}))
        # the existing project's form: {"K-000001": 0, ...} or {"0": "K-000001", ...}
        if d and all(isinstance(v, int) and not isinstance(v, bool) for v in d.values()):
            return cls(codes=_by_id({v: str(k) for k, v in d.items()}, [v for v in d.values()]))
        if d and all(str(k).isdigit() for k in d):
            return cls(codes=_by_id({int(k): str(v) for k, v in d.items()}, [int(k) for k in d]))
        raise InputError("unrecognised class map JSON: expected {'codes': [...]}, a list, or a code->id mapping")

    def save(self, path: str | Path) -> None:
        atomic_write_text(path, json.dumps(self.to_dict(), ensure_ascii=False, indent=1))

    @classmethod
    def load(cls, path: str | Path) -> "ClassMap":
        try:
            with open(path, encoding="utf-8") as fh:
                data = json.load(fh)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise InputError(f"class map {path} is not valid UTF-8 JSON: {e}") from None
        try:
            return cls.from_dict(data)
        except (InputError, TypeError, AttributeError) as e:
            raise InputError(f"class map {path}: {e}") from None

    def check_same(self, other: "ClassMap", what: str = "checkpoint", against: str = "manifest") -> None:
        """Raise ClassMapMismatch naming the K-codes that differ (by name, then by position)."""
        if self.codes == other.codes:
            return
        mine, theirs = set(self.codes), set(other.codes)
        only_a, only_b = sorted(mine - theirs), sorted(theirs - mine)
        moved = [c for c in self.codes if c in theirs and self.index[c] != other.index[c]]
        parts = [f"class map of the {what} ({len(self.codes)} classes) differs from the {against}'s "
                 f"({len(other.codes)} classes)"]
        if only_a:
            parts.append(f"only in the {what}: {', '.join(only_a[:20])}" + (" ..." if len(only_a) > 20 else ""))
        if only_b:
            parts.append(f"only in the {against}: {', '.join(only_b[:20])}" + (" ..." if len(only_b) > 20 else ""))
        if moved:
            parts.append("same K-codes at different class ids: " + ", ".join(
                f"{c} ({self.index[c]} vs {other.index[c]})" for c in moved[:10]) + (" ..." if len(moved) > 10 else ""))
        raise ClassMapMismatch("; ".join(parts))

    def describe(self, code: str) -> dict:
        m = self.meta.get(code, {})
        return {k: m[k] for k in META_KEYS if k in m}


