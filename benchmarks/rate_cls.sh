#!/usr/bin/env bash
# Issue 23's rate benchmark on the classification preset (benchmarks/rate.py's docstring explains each stage).
# Resumable: every run and probe is a JSON file under benchmarks/results/rate_cls, reused when present.
# Two lanes run side by side (one thread each, for 2 cores). The grids are centred per init (grid: 3e-3, the
# LoRA-like inits; grid_low: 1e-3 for lora_ga, eva and PEFT's LoRA-GA, which stayed at chance from 1.5e-3 up);
# --min-gain 0.03 keeps chance-level runs from steering the grids. Every rule is probed on every init and seed but
# lambda_max and range_test (seed 0 only: each costs more than a run); polyak and adam_step are trained with.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
OUT=benchmarks/results/rate_cls
C="--preset classification --lrs 0.0015 0.003 0.006 --max-extend 4 --eval-every 20 --threads 1 --min-gain 0.03"
L="--preset classification --lrs 0.0005 0.001 0.002 --max-extend 4 --eval-every 20 --threads 1 --min-gain 0.03"
lane_a() {
  $PY benchmarks/convergence.py $C --seeds 0 1 2 --out $OUT/grid --methods lora
  $PY benchmarks/rate.py probe --out $OUT --seeds 0 1 2 --rules polyak adam_step $C
  $PY benchmarks/rate.py fit --out $OUT $C
  $PY benchmarks/rate.py probe --out $OUT --seeds 0 1 2 --rules anchored $C
  $PY benchmarks/convergence.py $C --seeds 0 1 2 --out $OUT/grid --methods lora lora_fa lora_one pissa lora+prodigy \
    lora+sf
  $PY benchmarks/rate.py auto --out $OUT --seeds 0 1 2 --rule polyak $C
}
lane_b() {
  $PY benchmarks/convergence.py $L --seeds 0 1 2 --out $OUT/grid_low --methods lora_ga eva peft_lora_ga
  until [ -f $OUT/fit.json ]; do sleep 20; done
  $PY benchmarks/rate.py auto --out $OUT --seeds 0 1 2 --rule adam_step $C
  $PY benchmarks/rate.py probe --out $OUT --seeds 0 --rules lambda_max range_test $C
}
lane_a & a=$!
lane_b & b=$!
wait $a
wait $b
$PY benchmarks/rate.py fit --out $OUT $C
# the default rule (anchored), then the same with schedule-free AdamW at c = its own default rate (no constant fitted)
$PY benchmarks/rate.py auto --out $OUT --seeds 0 1 2 --rule anchored $C
$PY benchmarks/rate.py auto --out $OUT --seeds 0 1 2 --rule anchored --optimizer sf $C
$PY benchmarks/rate.py summary --out $OUT --rule anchored $C
