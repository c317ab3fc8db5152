#!/usr/bin/env bash
# One lent-GPU session (the `device` tool: 15 minutes of device time, files back <= 16 MiB each, 8 files).
#
# Runs, in one call, on a bare machine that has torch and timm but not this package installed:
#   1. the SCL/plain step-time benchmark on the GPU (96 px and 128 px);
#   2. four resnet18 trainings side by side on the one GPU, each stopped by a wall-clock budget
#      (the cosine schedule anneals over it): a warm start from models/default (plain, lr 2e-4), and from
#      random init plain 96 px, SCL 96 px (the paper's loss, same sampler and images per step) and plain 128 px;
#   3. the image models' g612 test accuracy (benchmarks/gpu_summary.py);
#   4. the two runs with the best validation accuracy, fp16 weights split into parts under 16 MiB.
#
# Needs .gpu/g612.tgz (the g612 set, never committed: `.gpu/` is in .git/info/exclude) carried with the call:
#   mkdir -p .gpu && (cd /work/data && tar czf /work/main/.gpu/g612.tgz g612)
#   device run: carry [".gpu"], command "BUDGET_MIN=6.5 bash benchmarks/gpu_session.sh", timeout_s 570
# Rejoin a returned model here with `cat model.safetensors.part-* > model.safetensors`, then fit its size prior:
#   chromobatch calibrate --model DIR --data /work/data/g612/manifest.csv
# Local dry run on the CPU: OUT=/tmp/gpu_out BUDGET_MIN=0.2 DEVICE=cpu BENCH_STEPS=2 bash benchmarks/gpu_session.sh
set -u
OUT=${OUT:-/tmp/gpu_out}
W=${WORK:-/tmp/gpuwork}
BUDGET_MIN=${BUDGET_MIN:-6}
DEVICE=${DEVICE:-cuda}
BENCH_STEPS=${BENCH_STEPS:-40}
PY=${PY:-python3}
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD OMP_NUM_THREADS=${OMP_NUM_THREADS:-3}
mkdir -p "$OUT" "$W/runs" "$W/logs"
LOG=$OUT/session.log
say() { echo "[$(date -u +%H:%M:%S)] $*" | tee -a "$LOG"; }

say "start; budget ${BUDGET_MIN} min per run, device $DEVICE"
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>&1 || true
  $PY -c "import torch, timm; print('torch', torch.__version__, 'timm', timm.__version__,
  torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'no cuda')"
  nproc; } 2>&1 | tee -a "$LOG"

# data: unpack g612 and generate the synthetic set (CPU) while the GPU benchmark runs
tar xzf .gpu/g612.tgz -C "$W" &
$PY -c "from pathlib import Path; from chromobatch.synth.cases import generate_dataset
generate_dataset(Path('$W/synth300'), cells=300, seed=0, style='G', upright=False)" > "$W/logs/synth.log" 2>&1 &
for px in 96 128; do
  $PY benchmarks/train_step.py --device "$DEVICE" --steps "$BENCH_STEPS" --input-size $px 2>&1 | tee -a "$LOG"
done
wait
say "data ready: $(wc -l < "$W/g612/manifest.csv") g612 rows, $(wc -l < "$W/synth300/manifest.csv") synthetic rows"

run() {
  local name=$1; shift
  $PY benchmarks/train_default.py --g612 "$W/g612/manifest.csv" --synth-dir "$W/synth300" --out "$W/runs/$name" \
    --device "$DEVICE" --time-budget "$BUDGET_MIN" --steps 200000 --val-every 500 --checkpoint-every 5000 \
    --val-limit 0 --half --no-size-prior "$@" > "$W/logs/$name.log" 2>&1
  say "$name finished (exit $?): $(tail -1 "$W/logs/$name.log" | cut -c1-300)"
}
run warm --preprocess fit --init-from models/default --lr 2e-4 &
run plain --preprocess fit --lr 1e-3 &
run scl --preprocess fit --lr 1e-3 --scl &
run plain128 --preprocess fit --lr 1e-3 --input-size 128 &
wait

$PY benchmarks/gpu_summary.py --runs "$W/runs" --test "$W/g612/manifest.csv" --json "$W/logs/summary.json" \
  --device "$DEVICE" 2>"$W/logs/summary.err" | tee -a "$LOG"

# bring back the two runs with the best validation accuracy (8 files at most: session.log, logs.tgz, 2 x 3)
picks=$($PY -c "import json; rows=[r for r in json.load(open('$W/logs/summary.json')) if r.get('val_accuracy')]
print(' '.join(r['run'] for r in sorted(rows, key=lambda r: -r['val_accuracy'])[:2]))")
say "returning: $picks"
for name in $picks; do
  mkdir -p "$OUT/$name"
  cp "$W/runs/$name/model.json" "$OUT/$name/"
  split -b 12M -d "$W/runs/$name/model.safetensors" "$OUT/$name/model.safetensors.part-"
  sha256sum "$W/runs/$name/model.safetensors" | tee -a "$LOG"
done
for r in "$W"/runs/*/; do cp "$r/history.jsonl" "$W/logs/$(basename "$r").history.jsonl" 2>/dev/null; done
tar czf "$OUT/logs.tgz" -C "$W" logs
say "done"
