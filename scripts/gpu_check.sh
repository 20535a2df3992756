#!/usr/bin/env bash
# One command on any CUDA machine: GPU tests, the decode benchmark, a short demo training on the `dali`
# backend (data_time share reported), the model-only ceiling. Results go to gpu_results/<timestamp>/.
#   scripts/gpu_check.sh [--skip-install]
set -uo pipefail
case "${1:-}" in
  ""|--skip-install) ;;
  -h|--help) sed -n '2,4p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
  *) echo "unknown argument: $1 (scripts/gpu_check.sh [--skip-install])" >&2; exit 2 ;;
esac
cd "$(dirname "$0")/.."
out="gpu_results/$(date +%Y%m%d-%H%M%S)"
mkdir -p "$out"
if [ "${1:-}" != "--skip-install" ]; then
  pip install -e '.[dev]' >"$out/install.log" 2>&1 || { echo "install failed, see $out/install.log"; exit 1; }
fi
python - <<'PY' | tee "$out/machine.txt"
import os, platform, torch
print("cpu cores:", os.cpu_count(), "|", platform.processor() or platform.machine())
print("torch", torch.__version__, "cuda", torch.version.cuda, "available", torch.cuda.is_available())
if torch.cuda.is_available():
    print("gpu:", torch.cuda.get_device_name(0))
try:
    import nvidia.dali as d; print("dali", d.__version__)
except Exception as e:
    print("dali missing:", e)
PY
python -c "import torch,sys; sys.exit(0 if torch.cuda.is_available() else 1)" || { echo "no CUDA here: nothing to check"; exit 1; }
status=0
echo "== gpu tests"
python -m pytest -m gpu -q -rs 2>&1 | tee "$out/gpu_tests.txt" || status=1
echo "== decode benchmark"
python -m pillsnap_dali.bench decode --out "$out/bench_decode" 2>&1 | tee "$out/bench_decode.txt" || status=1
echo "== model-only ceiling (stage 3 settings)"
python -m pillsnap_dali.bench step --stage 3 --batch-size 64 --json "$out/step.json" 2>&1 | tee "$out/step.txt" || status=1
echo "== short demo training on the dali backend"
python -m pillsnap_dali.train --stage demo --backend dali --epochs 3 --out "$out/runs" --name demo_gpu \
  2>&1 | tee "$out/train.txt" || status=1
grep -h "data" "$out/runs/demo_gpu/report.md" 2>/dev/null | head -3
echo "== stage-3-like throughput on the dali backend (synthetic 976x1280 tree, 384 px, tf_efficientnetv2_s)"
s3=(--set data.synth.size=976x1280 --set data.synth.images_per_class=60 --set data.synth.combos=12
    --set "data.artifacts=$out/artifacts")
python -m pillsnap_dali.train --stage demo --backend dali --epochs 2 --out "$out/runs" --name s3like \
  "${s3[@]}" --img-size 384 --model tf_efficientnetv2_s --batch-size 64 2>&1 | tee "$out/train_s3like.txt" || status=1
grep -h "data_time share" "$out/runs/s3like/report.md" 2>/dev/null
echo "== detector on DALI (yolo11m, 640 px, 1 epoch) and combo latency with the users' model sizes"
python -m pillsnap_dali.detect --stage demo --model yolo11m.yaml --epochs 1 --imgsz 640 --backend dali \
  "${s3[@]}" --set "train.out=$out/runs" 2>&1 | tee "$out/detect.txt" || status=1
combos=$(ls -d "$out"/artifacts/synth/*/*/*/1.Training/*/*조합*/TS_1_* 2>/dev/null | head -1)
python -m pillsnap_dali.bench predict "$combos" --classifier "$out/runs/s3like/checkpoints/last.pt" \
  --detector "$out/runs/detect_demo/weights/last.pt" --mode combo --conf 0 --max-det 4 \
  --json "$out/predict_latency.json" 2>&1 | tee "$out/predict_latency.txt" || status=1
echo "results in $out"
exit $status
