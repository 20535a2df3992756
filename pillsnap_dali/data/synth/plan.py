"""The plan: one ``Job`` per image (file name fields, folder, part) for singles and combinations, and which jobs
carry which injected defect (``make_plan``).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np

from pillsnap_dali.data.synth.spec import (CLASSES_PER_FOLDER, COMBO_DEFECTS, COMBO_ELEVATIONS, COMBOS_PER_FOLDER,
                                           ELEVATIONS, MIN_CLEAN_PER_CLASS, ROTATIONS, SHOT_GRID, SINGLE_LABEL_DEFECTS,
                                           SINGLE_PNG_DEFECTS, SIZE_FIELD, SynthError, SynthSpec, TreeLayout)
from pillsnap_dali.data.synth.looks import make_catalog, pick


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
        combo = tuple(sorted(codes[int(i)] for i in rng.choice(len(codes), size=k, replace=False)))
        if combo not in seen:
            seen.add(combo)
            out.append(combo)
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
            job.extra_code = pick(rng, others) if others else ""
            if not job.extra_code:
                raise SynthError("double_label needs a K-code outside the combination: add classes")


def make_plan(spec: SynthSpec) -> tuple:
    """(Catalog, jobs): everything decided up front from the seed, in a fixed order."""
    rng = np.random.default_rng([spec.seed, 0x5EED])
    tree = TreeLayout(spec.layout)
    catalog = make_catalog(spec, rng)
    jobs = _plan_singles(spec, tree, catalog.codes, rng) + _plan_combos(spec, tree, catalog.codes, rng)
    if spec.defects:
        _assign_defects(spec, jobs, catalog.codes, rng)
    for i, job in enumerate(jobs):
        job.index = i
    return catalog, jobs
