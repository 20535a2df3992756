"""``python -m pillsnap_dali.manifest``: build a stage's manifests from an AI Hub tree, or import the existing
project's manifests (``--legacy``). The work is done by ``pillsnap_dali.data.build``."""
from __future__ import annotations

import argparse
from pathlib import Path

from pillsnap_dali.commands.common import add_shared_flags, config_from_args, existing_file, key_help, run_cli
from pillsnap_dali.config import stage_name
from pillsnap_dali.data.build import build_manifests, demo_root, import_legacy


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m pillsnap_dali.manifest",
                                 description="Build a stage's manifests from an AI Hub tree (or import the "
                                             "existing project's manifests).")
    add_shared_flags(ap, ("data-root", "stage", "out"), helps={
        "data-root": "AI Hub tree, raw or English layout (config data.root; default: none: --stage demo "
                     "generates its synthetic tree)",
        "out": "output dir (default: <data.artifacts>/stage<N>, or .../demo)"})
    ap.add_argument("--seed", type=int, default=None, help=key_help("sampling/split seed", "manifest.seed"))
    ap.add_argument("--verify", choices=["none", "header", "full"], default=None,
                    help=key_help("image verification, one of %(choices)s", "data.verify"))
    ap.add_argument("--legacy", nargs="+", metavar="CSV",
                    help="import the existing project's manifests (train [val [test]]) instead of scanning "
                         "(default: scan --data-root)")
    add_shared_flags(ap, ("config", "set"))
    ap.add_argument("--force", action="store_true", help="rebuild even if the outputs match the inputs "
                                                         "(default: reuse them)")
    ap.add_argument("-v", "--verbose", action="store_true", help="log at DEBUG level (default: INFO)")
    return ap


# each flag's config key; --out here is the manifests' folder, not a config key
_FLAG_KEYS = {"data_root": "data.root", "seed": "manifest.seed", "verify": "data.verify"}


def _print_legacy(out: Path, report: dict) -> None:
    print(f"{out}: {report['splits']} rows kept, {report['quarantine']['rows']} quarantined")
    for f in report["checks"]:
        print(f"{f['level']}: {f['path']}: {f['message']}")
    for split, leak in report["leaks"].items():
        if leak["same_image"] or leak["same_combination"]:
            print(f"warning: {split} shares {leak['same_image']} image(s) and {leak['same_combination']} "
                  f"shot(s) of training combinations with train: its scores are optimistic")


def _print_build(out: Path, report: dict) -> None:
    acc = report["accounting"]
    print(f"{out}: train {report['splits']['train']}, val {report['splits']['val']}, "
          f"test {report['splits']['test']} images, {report['got']['classes']} classes; "
          f"detect {report['detect']['train']}/{report['detect']['val']}/{report['detect']['test']}; "
          f"{acc['quarantined_images']} quarantined, {acc['not_sampled']} not sampled; "
          f"dl_idx {report['dl_idx_convention']}")
    for note in report["notes"]:
        print(f"note: {note}")


def _main(args: argparse.Namespace) -> int:
    for csv_path in args.legacy or []:
        existing_file(csv_path, "--legacy")
    cfg = config_from_args(args, _FLAG_KEYS)
    out = Path(args.out) if args.out else Path(cfg.data.artifacts) / stage_name(cfg.stage)
    if args.legacy:
        _print_legacy(out, import_legacy(args.legacy, cfg, out))
        return 0
    root = Path(cfg.data.root) if cfg.data.root else demo_root(cfg)
    _print_build(out, build_manifests(cfg, root, out, force=args.force))
    return 0


def main(argv=None) -> int:
    return run_cli(_parser(), _main, argv)


if __name__ == "__main__":
    raise SystemExit(main())
