#!/usr/bin/env bash
# DALI against PIL and the peers a user would pick instead (OpenCV, torchvision, PIL draft; torchvision on the
# GPU with CUDA), with ceilings and each DALI arm's ratio to the best peer: python -m pillsnap_dali.bench decode
# (peer arms need `pip install -e '.[bench]'`; absent ones are skipped with a one-line note)
#   scripts/bench_decode.sh                       # generated 976x1280 PNG + JPEG images, all arms
#   scripts/bench_decode.sh --manifest artifacts/stage3/manifest_train.csv --limit 512
set -euo pipefail
cd "$(dirname "$0")/.."
exec python -m pillsnap_dali.bench decode "$@"
