"""Checks of a manifest's content, for ours and for the existing project's (legacy) format alike.

A built manifest passes them by construction; an imported or hand-made one may not. Each finding is an
error (the import or the training stops before it starts: ``ManifestChecks.raise_errors``) or a warning (logged and
stated in the run's report: each ``Finding`` has a level, a check name and a one-line message; ``as_dict``
for report.json):

- error ``kcode_format``: a K-code that is not ``K-`` + six digits (an invisible character such as a
  zero-width space, lower case, spaces inside, a path, two codes in one cell): it would silently become a
  class of its own;
- ``code_conflict``: the same image under two K-codes: an error in the training split (one picture, two
  labels), a warning when validation is involved (those rows are scored against one of them);
- error ``same_split``: the validation list is the training list (every score would be a training score);
- warning ``duplicate_rows``: the same image with the same K-code on several rows (sampled more often);
- warning ``val_in_train``: validation images that are also training images (optimistic scores);
- warning ``class_without_val``: training classes with no validation row (their recall is never measured).
"""
from __future__ import annotations

import logging
import re
import unicodedata
from collections import Counter, defaultdict
from dataclasses import asdict, dataclass, field

from pillsnap_dali.data.manifest import Manifest, ManifestError

_logger = logging.getLogger(__name__)

KCODE = re.compile(r"K-[0-9]{6}")
_EXAMPLES = 5


def kcode_problem(code: str) -> str | None:
    """What is wrong with a K-code cell, or None for ``K-`` + six digits."""
    if KCODE.fullmatch(code):
        return None
    hidden = [ch for ch in code if unicodedata.category(ch) in ("Cf", "Cc", "Co", "Cn") or ch in "\u00a0\u3000"]
    if hidden:
        return f"invisible character U+{ord(hidden[0]):04X} ({unicodedata.name(hidden[0], 'unnamed')})"
    if "/" in code or "\\" in code:
        return "a path, not a K-code"
    if len(KCODE.findall(code.upper())) > 1:
        return "two K-codes in one cell"
    if any(ch.isspace() for ch in code):
        return "spaces inside"
    if KCODE.fullmatch(code.upper()):
        return "lower case"
    return "not K- and six digits"


@dataclass
class Finding:
    level: str      # "error" | "warning"
    check: str      # the check's name (see the module docstring)
    path: str       # the manifest it concerns
    count: int      # rows (or classes) concerned
    message: str    # one line, with examples


@dataclass
class ManifestChecks:
    findings: list = field(default_factory=list)

    @property
    def errors(self) -> list:
        return [f for f in self.findings if f.level == "error"]

    @property
    def warnings(self) -> list:
        return [f for f in self.findings if f.level == "warning"]

    def raise_errors(self) -> None:
        """ManifestError naming every error (one line each) when there is one; warnings are logged."""
        for f in self.warnings:
            _logger.warning("%s: %s", f.path, f.message)
        if self.errors:
            raise ManifestError("; ".join(f"{f.path}: {f.message}" for f in self.errors))

    def as_dict(self) -> list:
        return [asdict(f) for f in self.findings]


def _where(i: int) -> str:
    return f"line {i + 2}"  # the header is line 1; checks run on the rows in file order


def _kcodes(m: Manifest) -> list:
    bad = [(i, c, kcode_problem(c)) for i, c in enumerate(m.codes)]
    bad = [b for b in bad if b[2]]
    if not bad:
        return []
    shown = ", ".join(f"{c!r} ({why}, {_where(i)})" for i, c, why in bad[:_EXAMPLES])
    return [Finding("error", "kcode_format", str(m.path), len(bad),
                    f"{len(bad)} K-code cell(s) are not K- and six digits: {shown}")]


def _codes_per_image(manifests: list) -> dict:
    codes = defaultdict(set)
    for m in manifests:
        for p, c in zip(m.paths, m.codes):
            codes[p].add(c)
    return codes


def _conflicts(manifests: list, level: str) -> list:
    codes = _codes_per_image(manifests)
    clash = {p: sorted(cs) for p, cs in codes.items() if len(cs) > 1}
    if not clash:
        return []
    shown = ", ".join(f"{p} ({' / '.join(cs)})" for p, cs in list(clash.items())[:_EXAMPLES])
    where = " + ".join(str(m.path) for m in manifests)
    return [Finding(level, "code_conflict", where, len(clash),
                    f"{len(clash)} image(s) appear under two or more K-codes: {shown}")]


def _duplicates(m: Manifest) -> list:
    rows = Counter(zip(m.paths, m.codes))
    extra = {k: n for k, n in rows.items() if n > 1}
    if not extra:
        return []
    shown = ", ".join(f"{p} x{n}" for (p, _), n in list(extra.items())[:_EXAMPLES])
    return [Finding("warning", "duplicate_rows", str(m.path), sum(extra.values()) - len(extra),
                    f"{sum(extra.values()) - len(extra)} duplicate row(s) (the same image and K-code again; "
                    f"sampled more often): {shown}")]


def _split_overlap(train: Manifest, val: Manifest) -> list:
    tp, vp = set(train.paths), set(val.paths)
    if tp == vp:
        return [Finding("error", "same_split", str(val.path), len(vp),
                        f"the validation list holds exactly the training images of {train.path} "
                        f"({len(vp)} images): every score would be a training score")]
    both = sorted(tp & vp)
    if not both:
        return []
    return [Finding("warning", "val_in_train", str(val.path), len(both),
                    f"{len(both)} validation image(s) are also in {train.path} (scores are optimistic), "
                    f"e.g. {', '.join(both[:_EXAMPLES])}")]


def _classes_without_val(train: Manifest, val: Manifest) -> list:
    missing = sorted(set(train.codes) - set(val.codes))
    if not missing:
        return []
    return [Finding("warning", "class_without_val", str(val.path), len(missing),
                    f"{len(missing)} training class(es) have no validation row (their recall is never "
                    f"measured): {', '.join(missing[:_EXAMPLES * 2])}")]


def check_manifests(train: Manifest, val: Manifest | None = None) -> ManifestChecks:
    """Every check on a training manifest and, when given, its validation manifest."""
    found = _kcodes(train) + _duplicates(train) + _conflicts([train], "error")
    if val is None:
        return ManifestChecks(found)
    if not any(f.check == "code_conflict" for f in found):  # in validation only: its rows count as misses
        found += _conflicts([train, val], "warning")
    found += _kcodes(val) + _duplicates(val)
    found += _split_overlap(train, val) + _classes_without_val(train, val)
    return ManifestChecks(found)
