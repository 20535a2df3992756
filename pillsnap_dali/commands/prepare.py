"""``python -m pillsnap_dali.prepare``: the PNG -> JPEG cache (written once, read by every epoch). The work is done
by ``pillsnap_dali.data.cache``."""
from __future__ import annotations

import argparse
import sys

from pillsnap_dali.commands.common import add_shared_flags, config_from_args, existing_file, key_help, run_cli
from pillsnap_dali.data.cache import SUBSAMPLING, PrepareOptions, prepare_cache


def _max_side(text: str) -> str | int:
    """``--max-side``: a number, or none/null/0 for "keep the size" (the config's null)."""
    return "null" if text.lower() in ("none", "null", "0") else int(text)


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m pillsnap_dali.prepare", description=__doc__.split("\n")[0])
    ap.add_argument("--manifest", required=True, help="source manifest CSV, ours or the legacy 4-column one "
                                                      "(required)")
    ap.add_argument("--cache-dir", "--out", dest="cache_dir", required=True, metavar="DIR",
                    help="cache directory, gets <manifest stem>.csv and the JPEGs (required)")
    ap.add_argument("--quality", type=int, help=key_help("JPEG quality", "prepare.quality"))
    ap.add_argument("--max-side", type=_max_side, help=key_help("long side of the cached JPEG; 'none' keeps the "
                                                                "size", "prepare.max_side"))
    ap.add_argument("--subsampling", choices=sorted(SUBSAMPLING),
                    help=key_help("chroma subsampling, one of %(choices)s", "prepare.subsampling"))
    ap.add_argument("--workers", type=int, help=key_help("transcoding processes", "prepare.workers"))
    ap.add_argument("--margin-gb", type=float, help=key_help("free space to keep", "prepare.free_space_margin_gb"))
    ap.add_argument("--sample", type=int, help=key_help("rows sampled for the estimate and the final check",
                                                        "prepare.sample"))
    ap.add_argument("--limit", type=int, help="transcode at most this many new rows, then stop; resumable "
                                              "(default: all)")
    ap.add_argument("--dry-run", action="store_true", help="estimate the size and check the space; write nothing "
                                                           "(default: off)")
    add_shared_flags(ap, ("stage", "config", "set"))
    return ap


# each flag's config key
_FLAG_KEYS = {"quality": "prepare.quality", "max_side": "prepare.max_side", "subsampling": "prepare.subsampling",
              "workers": "prepare.workers", "margin_gb": "prepare.free_space_margin_gb", "sample": "prepare.sample"}


def _main(args: argparse.Namespace) -> int:
    existing_file(args.manifest, "--manifest")
    cfg = config_from_args(args, _FLAG_KEYS)
    opts = PrepareOptions.from_config(cfg, limit=args.limit, dry_run=args.dry_run or None)
    report = prepare_cache(args.manifest, args.cache_dir, opts)
    print(report.summary())
    return 1 if report.stopped and opts.limit is None else 0


def main(argv=None) -> int:
    return run_cli(_parser(), _main, argv)


if __name__ == "__main__":
    sys.exit(main())
