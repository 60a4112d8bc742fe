#!/usr/bin/env bash
# Issue 23 on the main job's set-up with schedule-free AdamW (after benchmarks/rate_main.sh, whose AdamW grids and
# probes it sets the runs beside). Two lanes, resumable (one JSON per run):
#   - every init at every seed trained with schedule-free AdamW at anchored's rate, c = schedule-free AdamW's own
#     default rate 0.0025 (no constant fitted): OUT/auto_anchored+sf
#   - every init at seed 0 with schedule-free AdamW at that default rate itself (does the init-aware rate still
#     matter once the optimiser is schedule-free?): OUT/sf_default (default LoRA's is the grid's lora+sf)
# then the summary (rate.py summary: the summary table's anchored+sf rows, sf_default.md, the figure's diamonds).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
OUT=benchmarks/results/rate_main
O="--preset main_job --max-extend 3 --eval-every 22 --threads 1 --step0-cache $OUT/step0_cache"
AUTO="benchmarks/rate.py auto --out $OUT --rule anchored --optimizer sf"
lane_a() {
  $PY $AUTO --seeds 0 1 2 --inits lora lora_fa lora_one lora_ga $O
}
lane_b() {  # one process writes sf_default (its meta.json is merged at the start of each)
  $PY $AUTO --seeds 0 1 2 --inits pissa eva peft_lora_ga $O
  $PY benchmarks/convergence.py $O --lrs 0.0015 0.003 0.006 --seeds 0 --out $OUT/sf_default \
    --methods lora_fa+sf pissa+sf lora_ga+sf eva+sf peft_lora_ga+sf lora_one+sf
}
lane_a & a=$!
lane_b & b=$!
wait $a
wait $b
$PY benchmarks/rate.py summary --out $OUT --rule anchored --fit benchmarks/results/rate_cls/fit.json $O
