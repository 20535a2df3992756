#!/usr/bin/env bash
# Proof of the GPU path on a CUDA machine, with a threshold per check and one summary.
#   scripts/gpu_check.sh [--quick] [--wheels DIR] [--skip-install] [--out DIR] [--help]
# Modes:
#   (default)       full: every gpu test, more repeats and epochs; each step has a timeout, all of them <= 10 min
#   --quick         few repeats and epochs; every step's timeout adds up to <= 5 min on one H100 (once installed)
#   --wheels DIR    install from the wheels carried in DIR, no package index (pip --no-index --find-links DIR)
#   --skip-install  use the environment as it is
#   --out DIR       results folder (default gpu_results/<stamp>)
# Steps (python -m pillsnap_dali.gpu_check run): doctor first (stops the rest when the GPU path cannot work),
# gpu tests, decode benchmark on JPEG and the 640 px cache, a short Stage-3 `dali` training (data_time share,
# NVML memory per epoch), detector + combo latency, broken JPEGs through `mixed` vs `dali-cpu`, a run that
# runs out of GPU memory. Ends with gpu_results/<stamp>/summary.json and a pass/fail table; exit 0 only when
# every check passes. Thresholds: pillsnap_dali/commands/gpu_check.py (THRESHOLDS).
set -uo pipefail
quick="" wheels="" install=1 out=""
while [ $# -gt 0 ]; do
  case "$1" in
    --quick) quick="--quick" ;;
    --wheels) wheels="${2:?--wheels needs a folder}"; shift ;;
    --skip-install) install=0 ;;
    --out) out="${2:?--out needs a folder}"; shift ;;
    -h|--help) sed -n '2,14p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) echo "unknown argument: $1 (scripts/gpu_check.sh --help)" >&2; exit 2 ;;
  esac
  shift
done
cd "$(dirname "$0")/.."
out="${out:-gpu_results/$(date +%Y%m%d-%H%M%S)}"
mkdir -p "$out"
if [ "$install" = 1 ]; then
  if [ -n "$wheels" ]; then  # a lent GPU reaches no package index: everything comes from the carried wheels
    cmd=(pip install --no-index --find-links "$wheels" --no-build-isolation -e '.[dev]')
  else
    cmd=(pip install -e '.[dev]')
  fi
  echo "== install: ${cmd[*]}"
  timeout 300 "${cmd[@]}" >"$out/install.log" 2>&1 || { echo "install failed, see $out/install.log"; exit 1; }
fi
exec python -m pillsnap_dali.gpu_check run $quick --out "$out"
