"""What the JPEG cache costs at prediction time: a classifier's top-1 on the same rows read three ways.

    PYTHONPATH=. python scripts/cache_parity.py --manifest artifacts/demo/manifest_test.csv \\
        --cache-manifest artifacts/jpeg640/manifests/demo-<hash>/manifest_test.csv \\
        --classifier runs/png/checkpoints/best.pt runs/cache/checkpoints/best.pt

For each classifier, ``predict``'s single-pill path (``inference.make_predictor``: PIL decode, the
checkpoint's own preprocessing) on (1) the original PNGs, (2) phone-style JPEG re-encodes of them (full
size, quality 85, 4:2:0, written to a temp folder) and (3) the cached 640 px JPEGs; prints the top-1 accuracy
of each and the share of rows whose top-1 K-code agrees with the cached input's. Rows are matched by the
cached manifest's ``orig_path`` (the cache leaves unreadable sources out).
"""
from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

from PIL import Image

from pillsnap_dali.config import load_config
from pillsnap_dali.data.manifest import read_manifest
from pillsnap_dali.inference import make_predictor, options_from
from pillsnap_dali.training.model import load_classifier


def phone_jpegs(paths: list[str], folder: Path) -> list[str]:
    """Each source re-encoded as a phone would save it: full size, quality 85, 4:2:0."""
    out = []
    for i, p in enumerate(paths):
        dst = folder / f"{i:06d}.jpg"
        with Image.open(p) as im:
            im.convert("RGB").save(dst, "JPEG", quality=85, subsampling=2)
        out.append(str(dst))
    return out


def top1(predict, paths: list[str]) -> list[str | None]:
    res = [predict(p) for p in paths]
    return [r["pills"][0]["topk"][0]["code"] if r.get("pills") else None for r in res]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--manifest", required=True, help="the original (PNG) manifest")
    ap.add_argument("--cache-manifest", required=True, help="its JPEG cache's manifest")
    ap.add_argument("--classifier", nargs="+", required=True, help="checkpoints to compare")
    args = ap.parse_args(argv)
    cached = read_manifest(args.cache_manifest)
    source = read_manifest(args.manifest)
    by_path = {p: i for i, p in enumerate(source.paths)}
    rows = [by_path[cached.source_path(i)] for i in range(len(cached))]
    png = [source.paths[i] for i in rows]
    truth = [source.codes[i] for i in rows]
    cfg = load_config("demo")
    print(f"{len(rows)} rows of {args.manifest} ({len(source) - len(rows)} not in the cache)")
    print("| classifier | top-1 PNG | top-1 phone JPEG | top-1 cache | agree PNG/cache | agree phone/cache |")
    print("|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        phone = phone_jpegs(png, Path(tmp))
        for ckpt in args.classifier:
            predict = make_predictor(load_classifier(ckpt), None, options_from(cfg, "single", 1))
            got = {name: top1(predict, paths) for name, paths in (("png", png), ("phone", phone),
                                                                  ("cache", cached.paths))}
            acc = {k: sum(a == t for a, t in zip(v, truth)) / len(truth) for k, v in got.items()}
            agree = {k: sum(a == b for a, b in zip(got[k], got["cache"])) / len(truth) for k in ("png", "phone")}
            print(f"| {ckpt} | {acc['png']:.4f} | {acc['phone']:.4f} | {acc['cache']:.4f} | {agree['png']:.4f} | "
                  f"{agree['phone']:.4f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
