#!/usr/bin/env bash
# Issue 23's rate benchmark on the classification preset (benchmarks/rate.py's docstring explains each stage).
# Resumable: every run and probe is a JSON file under benchmarks/results/rate_cls, reused when present.
# The grids are centred per init (grid: 3e-3, the LoRA-like inits; grid_low: 1e-3, where lora_ga, eva and PEFT's
# LoRA-GA stayed at chance from 1.5e-3 up); --min-gain 0.03 keeps chance-level runs from steering the grids.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
OUT=benchmarks/results/rate_cls
C="--preset classification --lrs 0.0015 0.003 0.006 --max-extend 4 --eval-every 20 --threads 1 --min-gain 0.03"
L="--preset classification --lrs 0.0005 0.001 0.002 --max-extend 4 --eval-every 20 --threads 1 --min-gain 0.03"
$PY benchmarks/convergence.py $C --seeds 0 1 2 --out $OUT/grid --methods lora
$PY benchmarks/rate.py probe --out $OUT --seeds 0 1 2 --rules adam_step $C
$PY benchmarks/rate.py fit --out $OUT $C
$PY benchmarks/convergence.py $L --seeds 0 1 2 --out $OUT/grid_low --methods lora_ga eva peft_lora_ga
$PY benchmarks/convergence.py $C --seeds 0 1 2 --out $OUT/grid --methods lora lora_fa lora_one pissa lora+prodigy lora+sf
$PY benchmarks/rate.py auto --out $OUT --seeds 0 1 2 --rule adam_step $C
$PY benchmarks/rate.py summary --out $OUT $C
$PY benchmarks/rate.py probe --out $OUT --seeds 0 --rules lambda_max range_test $C
$PY benchmarks/rate.py summary --out $OUT $C
