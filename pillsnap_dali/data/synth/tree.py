"""Generating a tree (``generate``: plan, render in worker processes, write labels and the summary) and the
demo data of ``--stage demo`` (``ensure_demo_data``: generated once per settings, reused after).
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import multiprocessing
import os
import shutil
import time
from pathlib import Path

from pillsnap_dali.data.synth.spec import (CLASSES_PER_FOLDER, COMPLETE_MARKER, DEFECT_KINDS, DEFECTS_FILE,
                                           GENERATOR_VERSION, parse_size, SUMMARY_FILE, SynthError, SynthSpec,
                                           SynthSummary, TreeLayout)
from pillsnap_dali.data.synth.looks import Catalog
from pillsnap_dali.data.synth.plan import folder_number, make_plan
from pillsnap_dali.data.synth.render import init_worker, render_and_write
from pillsnap_dali.data.synth.labels import LabelContext, LabelWriter

_logger = logging.getLogger(__name__)

def _run_jobs(jobs: list, catalog: Catalog, spec: SynthSpec, root: Path, writer: LabelWriter, workers: int):
    args = (catalog.looks, spec.size, spec.seed, str(root))
    by_index = {j.index: j for j in jobs}
    if workers <= 1:
        init_worker(*args)
        results = map(render_and_write, jobs)
        pool = None
    else:
        methods = multiprocessing.get_all_start_methods()
        ctx = multiprocessing.get_context("fork" if "fork" in methods else "spawn")
        pool = ctx.Pool(workers, initializer=init_worker, initargs=args)
        results = pool.imap(render_and_write, jobs, chunksize=4)
    try:
        for index, boxes in results:
            writer.add(by_index[index], boxes)
    except BaseException:
        if pool is not None:
            pool.terminate()   # do not wait for the rest of the images
        raise
    finally:
        if pool is None:
            init_worker(None, None, 0, "")   # drop the sprites held in this process
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
