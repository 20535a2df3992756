#!/usr/bin/env bash
# DALI against PIL, with ceilings: python -m pillsnap_dali.bench decode [args]
#   scripts/bench_decode.sh                       # generated 976x1280 PNG + JPEG images, all arms
#   scripts/bench_decode.sh --manifest artifacts/stage3/manifest_train.csv --limit 512
set -euo pipefail
cd "$(dirname "$0")/.."
exec python -m pillsnap_dali.bench decode "$@"
