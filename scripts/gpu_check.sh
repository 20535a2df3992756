#!/usr/bin/env bash
# Proof of the GPU path on a CUDA machine, with a threshold per check and one summary.
#   scripts/gpu_check.sh [--quick] [--wheels DIR] [--skip-install] [--plan] [--out DIR] [--help]
# Modes:
#   (default)       full: every gpu test, more repeats and epochs; install + steps planned <= 10 min
#   --quick         few repeats and epochs; install + every step's timeout planned <= 5 min on one H100
#   --wheels DIR    install ONLY from the wheels in DIR (pip --no-index --find-links DIR 'pillsnap_dali[dev]'):
#                   made where an index is reachable by python -m pillsnap_dali.wheelhouse --cuda 13 --python 3.12
#                   --out DIR (everything beyond torch, torchvision, timm and numpy, which the box holds)
#   --skip-install  use the environment as it is
#   --plan          print the steps, their timeouts and the budget, run nothing (after the install, if any)
#   --out DIR       results folder (default gpu_results/<stamp>)
# Steps (python -m pillsnap_dali.gpu_check run): doctor, the synthetic tree (its own step), gpu tests, decode
# benchmark on JPEG and the 640 px cache, a short Stage-3 `dali` training (data_time share, NVML memory per
# epoch), detector + combo latency, broken JPEGs through `mixed` vs `dali-cpu`, the DALI loader on a full GPU.
# A step runs when the steps it needs succeeded. Ends with gpu_results/<stamp>/summary.json and a pass/fail
# table; exit 0 only when every check passes. Thresholds: pillsnap_dali/commands/gpu_check.py (THRESHOLDS).
set -uo pipefail
quick="" wheels="" install=1 out="" plan=0
while [ $# -gt 0 ]; do
  case "$1" in
    --quick) quick="--quick" ;;
    --wheels) wheels="${2:?--wheels needs a folder}"; shift ;;
    --skip-install) install=0 ;;
    --plan) plan=1 ;;
    --out) out="${2:?--out needs a folder}"; shift ;;
    -h|--help) sed -n '2,19p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) echo "unknown argument: $1 (scripts/gpu_check.sh --help)" >&2; exit 2 ;;
  esac
  shift
done
cd "$(dirname "$0")/.."
out="${out:-gpu_results/$(date +%Y%m%d-%H%M%S)}"
mkdir -p "$out"
install_timeout=120; [ -n "$quick" ] && install_timeout=70   # gpu_check.INSTALL_TIMEOUT: part of the budget
if [ "$install" = 1 ]; then
  if [ -n "$wheels" ]; then  # a lent GPU reaches no package index: everything comes from the carried wheels
    [ -d "$wheels" ] || { echo "no wheel folder $wheels" >&2; exit 2; }
    cmd=(python -m pip install --no-index --find-links "$wheels" 'pillsnap_dali[dev]')
  else
    cmd=(python -m pip install -e '.[dev]')
  fi
  echo "== install: ${cmd[*]}"
  t0=$(date +%s.%N)
  timeout "$install_timeout" "${cmd[@]}" >"$out/install.log" 2>&1 || { echo "install failed, see $out/install.log"; exit 1; }
  secs=$(python -c "print(round($(date +%s.%N) - $t0, 1))")
  echo "{\"seconds\": $secs, \"timeout\": $install_timeout, \"wheels\": \"$wheels\"}" >"$out/install.json"
  echo "== install: $secs s"
fi
if [ "$plan" = 1 ]; then
  exec python -m pillsnap_dali.gpu_check plan $quick --out "$out"
fi
exec python -m pillsnap_dali.gpu_check run $quick --out "$out"
