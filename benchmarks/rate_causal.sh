#!/usr/bin/env bash
# Issue 23's rate benchmark on the causal preset, CPU protocol (SmolLM2-135M-Instruct on GSM8K, r = 8 on q,k,v,o,
# 40 steps of batch 4; 64 validation and 64 test problems, evaluated at step 0 and at the end). Resumable, like
# rate_cls.sh, in two lanes (one thread each; a run takes 6-10 minutes on one core). The grids are 2x-spaced around
# each init's best rate on the H200 ablation's 4x grid (docs/learning_rate.md): 3.2e-3 for lora, lora_fa, lora_one;
# 8e-4 for pissa, eva and PEFT's LoRA-GA; 2e-4 for lora_ga. The rules keep the constants fitted on the
# classification preset (--fit); RULE (default anchored, suggest_lr's default) is the one trained with.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
OUT=benchmarks/results/rate_causal
FIT="--fit benchmarks/results/rate_cls/fit.json"
O="--preset causal --max-extend 3 --eval-every 40 --threads 1"
RULE=${RULE:-anchored}
lane_a() {
  $PY benchmarks/convergence.py $O --lrs 0.0016 0.0032 0.0064 --seeds 0 1 2 --out $OUT/grid --methods lora
  $PY benchmarks/convergence.py $O --lrs 0.0016 0.0032 0.0064 --seeds 0 1 2 --out $OUT/grid --methods lora_fa lora_one
  $PY benchmarks/rate.py auto --out $OUT --seeds 0 1 2 --rule $RULE --inits lora lora_fa lora_one $FIT $O
}
lane_b() {
  $PY benchmarks/convergence.py $O --lrs 0.0004 0.0008 0.0016 --seeds 0 1 2 --out $OUT/grid_mid --methods pissa eva \
    peft_lora_ga
  $PY benchmarks/convergence.py $O --lrs 0.0001 0.0002 0.0004 --seeds 0 1 2 --out $OUT/grid_low --methods lora_ga
  $PY benchmarks/rate.py probe --out $OUT --seeds 0 --rules anchored $O
  $PY benchmarks/rate.py probe --out $OUT --seeds 1 2 --rules anchored polyak adam_step $O
  $PY benchmarks/rate.py auto --out $OUT --seeds 0 1 2 --rule $RULE --inits lora_ga pissa eva peft_lora_ga $FIT $O
}
lane_a & a=$!
lane_b & b=$!
wait $a
wait $b
$PY benchmarks/rate.py summary --out $OUT --rule $RULE $FIT $O
