#!/usr/bin/env bash
# Table-1-style ablation on the real data (docs/results.md, "Training and SCL ablation").
#
#   benchmarks/ablation.sh              run every missing run in order (restartable: finished runs are skipped)
#   benchmarks/ablation.sh table        print the markdown table of everything finished so far
#   benchmarks/ablation.sh NAME...      run only these runs
#
# Each run trains with `chromobatch train` (fixed budget, no early stopping, best-by-validation model kept; the
# image model alone: --no-size-prior, so runs stay comparable with those made before the size prior) and
# evaluates the model on the g612 test split and the bioimlab test split (cross-dataset for the other one).
# Runs are sequential and niced: the machine is 2 shared cores. Data and outputs live outside the repository.
set -euo pipefail
cd "$(dirname "$0")/.."
DATA=${DATA:-/work/data}
RUNS=${RUNS:-/work/runs/ablation}
PY=${PY:-.venv/bin/python}
# Two OpenMP threads that sleep instead of spinning when the other core is busy (10x faster under load).
export OMP_WAIT_POLICY=PASSIVE
mkdir -p "$RUNS"

G612=$DATA/g612/manifest.csv
BIO=$DATA/bioimlab/manifest.csv
# Synthetic G-band training set (chromobatch.synth, upright like karyogram crops) for the synthetic-to-real run.
SYNTH=$RUNS/synth-data/manifest.csv
synth_data() {
  [ -f "$SYNTH" ] || nice -n 10 "$PY" -c "from pathlib import Path; from chromobatch.synth.cases import generate_dataset \
as g; g(Path('$RUNS/synth-data'), cells=300, seed=7, style='G', upright=True)"
}

# name | data | extra train flags
RUNLIST=(
  "g612-resnet18-scl|$G612|--backbone resnet18 --steps 800"
  "g612-resnet18-plain|$G612|--backbone resnet18 --steps 800 --no-scl"
  "g612-resnet18-scl-code|$G612|--backbone resnet18 --steps 800 --variant code"
  "bio-resnet18-scl-fit-upright|$BIO|--backbone resnet18 --steps 500 --preprocess fit --orient upright"
  "bio-resnet18-plain-fit-upright|$BIO|--backbone resnet18 --steps 500 --no-scl --preprocess fit --orient upright"
  "g612-mnv3-scl|$G612|--backbone mobilenetv3_large_100 --steps 800"
  "g612-mnv3-plain|$G612|--backbone mobilenetv3_large_100 --steps 800 --no-scl"
  "g612-resnet18-plain-fit|$G612|--backbone resnet18 --steps 800 --no-scl --preprocess fit"
  "g612-resnet18-plain-pow05|$G612|--backbone resnet18 --steps 800 --no-scl --size-power 0.5"
  "g612-resnet18-scl-fit|$G612|--backbone resnet18 --steps 800 --preprocess fit"
  "g612-resnet18-scl-fit-l01|$G612|--backbone resnet18 --steps 800 --preprocess fit --lambda-con 0.1"
  "g612-resnet18-scl-l01|$G612|--backbone resnet18 --steps 800 --lambda-con 0.1"
  "synth-resnet18-plain-cell|$SYNTH|--backbone resnet18 --steps 800 --no-scl --preprocess cell"
  "g612-resnet18-scl-cell|$G612|--backbone resnet18 --steps 800 --preprocess cell"
  "g612-resnet18-plain-cell|$G612|--backbone resnet18 --steps 800 --no-scl --preprocess cell"
  "g612-resnet18-scl-rot180|$G612|--backbone resnet18 --steps 800 --rotate 180"
  "g612-resnet18-plain-rot180|$G612|--backbone resnet18 --steps 800 --no-scl --rotate 180"
)

table() {
  "$PY" - "$RUNS" <<'EOF'
import json, sys
from pathlib import Path
runs = Path(sys.argv[1])
print("| run | steps | train s | val acc | g612 test acc / recall / AUC | bioimlab test acc / recall / AUC |")
print("|---|---|---|---|---|---|")
for d in sorted(p for p in runs.iterdir() if p.is_dir()):
    meta_p = d / "model" / "model.json"
    if not meta_p.is_file():
        continue
    meta = json.loads(meta_p.read_text())
    run = meta.get("training", {}).get("run", {})
    cells = []
    for name in ("g612", "bioimlab"):
        f = d / f"eval-{name}.json"
        if f.is_file():
            m = json.loads(f.read_text())
            cells.append(f"{100*m['accuracy']:.2f} / {100*m['recall_macro']:.2f} / {100*m['auc_macro']:.2f}")
        else:
            cells.append("-")
    print(f"| {d.name} | {run.get('steps_done', '?')} | {run.get('seconds', '?')} | "
          f"{100*meta['metrics'].get('val_accuracy', float('nan')):.2f} | {cells[0]} | {cells[1]} |")
EOF
}

run_one() {
  local name=$1 data=$2 flags=$3 out=$RUNS/$1
  mkdir -p "$out"
  if [ ! -f "$out/model/model.json" ] || [ ! -f "$out/done" ]; then
    echo "[$(date -u +%FT%TZ)] train $name: chromobatch train --data $data --out $out/model $flags" | tee -a "$RUNS/log"
    # shellcheck disable=SC2086
    nice -n 10 "$PY" -m chromobatch.cli train --data "$data" --out "$out/model" $flags --val-every 200 \
      --checkpoint-every 200 --patience 0 --no-size-prior --no-progress --device cpu >"$out/train.log" 2>&1
    touch "$out/done"
  fi
  for ev in g612 bioimlab; do
    if [ ! -f "$out/eval-$ev.json" ]; then
      nice -n 10 "$PY" -m chromobatch.cli evaluate --model "$out/model" --data "$DATA/$ev/manifest.csv" \
        --split test --json "$out/eval-$ev.json" >"$out/eval-$ev.log" 2>&1
    fi
  done
  echo "[$(date -u +%FT%TZ)] done $name: g612 $(grep -h 'images: accuracy' "$out/eval-g612.log") | bioimlab:" \
    "$(grep -h 'images: accuracy' "$out/eval-bioimlab.log")" | tee -a "$RUNS/log"
}

if [ "${1:-}" = "table" ]; then
  table
  exit 0
fi
for entry in "${RUNLIST[@]}"; do
  IFS='|' read -r name data flags <<<"$entry"
  if [ $# -gt 0 ] && [[ ! " $* " =~ " $name " ]]; then
    continue
  fi
  [ "$data" != "$SYNTH" ] || synth_data
  run_one "$name" "$data" "$flags"
done
table
