"""``python -m pillsnap_dali.synth``: the command line of the generator."""
from __future__ import annotations

import argparse
import sys

from pillsnap_dali.commands.common import add_shared_flags, config_from_args, key_help, run_cli
from pillsnap_dali.config import CUSTOM
from pillsnap_dali.data.synth.spec import DL_IDX_MODES, LAYOUTS, parse_size
from pillsnap_dali.data.synth.tree import generate


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
    return run_cli(_parser(), _main, argv)


if __name__ == "__main__":
    sys.exit(main())
