"""``python -m pillsnap_dali.synth``: the command line of the generator.
"""
from __future__ import annotations

import argparse
import logging
import sys

from pillsnap_dali.data.synth.spec import DL_IDX_MODES, LAYOUTS, parse_size, SynthError
from pillsnap_dali.data.synth.tree import generate


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m pillsnap_dali.synth",
                                description="Write a synthetic AI Hub oral-drug tree in the real on-disk layout.")
    p.add_argument("--out", required=True, help="output folder (created; must be empty)")
    p.add_argument("--classes", type=int, default=20, help="number of K-codes (default 20)")
    p.add_argument("--images-per-class", type=int, default=40, help="training single images per K-code")
    p.add_argument("--combos", type=int, default=12, help="training combination folders (3 shots each)")
    p.add_argument("--size", default="976x1280", help="WIDTHxHEIGHT of the PNGs (default 976x1280)")
    p.add_argument("--defects", action="store_true", help="inject every known defect (see DIR/defects.json)")
    p.add_argument("--seed", type=int, default=0, help="same seed, same bytes")
    p.add_argument("--layout", choices=LAYOUTS, default="raw", help="raw (Korean, spaces) | raw_underscore | english")
    p.add_argument("--underscore", action="store_true", help="same as --layout raw_underscore")
    p.add_argument("--dl-idx", choices=DL_IDX_MODES, default="raw", help="raw: dl_idx = K-1 (as released); k: K")
    p.add_argument("--workers", type=int, default=2, help="render processes (output does not depend on it)")
    p.add_argument("-v", "--verbose", action="store_true")
    return p


def main(argv=None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format="%(levelname)s %(message)s")
    layout = "raw_underscore" if args.underscore and args.layout == "raw" else args.layout
    try:
        s = generate(args.out, classes=args.classes, images_per_class=args.images_per_class, combos=args.combos,
                     size=parse_size(args.size), defects=args.defects, seed=args.seed, layout=layout,
                     dl_idx=args.dl_idx, workers=args.workers)
    except SynthError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {s.root} ({s.layout}, {s.size[0]}x{s.size[1]}) in {s.seconds:.1f} s")
    print(f"  {len(s.codes)} classes, {len(s.combos['train'])} + {len(s.combos['val'])} combinations")
    for part in ("train", "val"):
        c = s.counts[part]
        print(f"  {part}: {c['single_images']} single + {c['combo_images']} combination images "
              f"(+{c['index_images']} index), {c['single_labels'] + c['combo_labels']} label JSONs")
    hit = {k: v for k, v in s.defects.items() if v}
    print("  defects: " + (", ".join(f"{k}={v}" for k, v in hit.items()) if hit else "none"))
    return 0
