#!/usr/bin/env bash
# Issue 23's rate benchmark on one preset in two lanes (one thread each, for 2 cores), resumable: every run and probe
# is a JSON file under $OUT, reused when present. Called by rate_causal.sh and rate_main.sh, which set:
#   OUT   the results folder          O     convergence.py's options (--preset ... --threads 1)
#   HIGH  the 2x grid of lora, lora_fa, lora_one       MID  of pissa, eva, PEFT's LoRA-GA       LOW  of lora_ga
#   SEEDS the seeds (default 0 1 2; the first is where each grid's rate is chosen)
#   FREE  optional: the learning-rate-free rows (e.g. "lora+prodigy lora+sf"), each at its own fixed rate, all seeds
#   SF    optional (SF=1): each init also trained with schedule-free AdamW at anchored's rate, c = its default rate
# Each grid is extended past an edge until its best validation rate is bracketed (--max-extend in O). The rules keep
# the constants fitted on the classification preset (--fit); RULE (default anchored, suggest_lr's default) is the
# one trained with.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
FIT="--fit benchmarks/results/rate_cls/fit.json"
RULE=${RULE:-anchored}
SEEDS=${SEEDS:-0 1 2}
FIRST=${SEEDS%% *}
# the held-out losses right after each init, measured once per init and seed and shared by all its runs
O="$O --step0-cache $OUT/step0_cache"
# lane A: the high and low grids, then the high grid's inits' auto runs (schedule-free AdamW's, the runner's
# default, before AdamW's); lane B: the seed-0 probes, the middle grid, then the auto runs of its inits and of
# lora_ga in the same order, then the other seeds' probes (only the summary's rule table reads them). About the same
# work each.
lane_a() {
  $PY benchmarks/convergence.py $O --lrs $HIGH --seeds $SEEDS --out $OUT/grid --methods lora lora_fa lora_one
  $PY benchmarks/convergence.py $O --lrs $LOW --seeds $SEEDS --out $OUT/grid_low --methods lora_ga
  if [ -n "${SF:-}" ]; then
    $PY benchmarks/rate.py auto --out $OUT --seeds $SEEDS --rule anchored --optimizer sf \
      --inits lora lora_fa lora_one $FIT $O
  fi
  if [ -n "${FREE:-}" ]; then
    $PY benchmarks/convergence.py $O --lrs $HIGH --seeds $SEEDS --out $OUT/grid --methods $FREE
  fi
  $PY benchmarks/rate.py auto --out $OUT --seeds $SEEDS --rule $RULE --inits lora lora_fa lora_one $FIT $O
}
lane_b() {
  $PY benchmarks/rate.py probe --out $OUT --seeds $FIRST --rules anchored polyak $O
  $PY benchmarks/convergence.py $O --lrs $MID --seeds $SEEDS --out $OUT/grid_mid --methods pissa eva peft_lora_ga
  if [ -n "${SF:-}" ]; then
    $PY benchmarks/rate.py auto --out $OUT --seeds $SEEDS --rule anchored --optimizer sf \
      --inits pissa eva peft_lora_ga lora_ga $FIT $O
  fi
  $PY benchmarks/rate.py auto --out $OUT --seeds $SEEDS --rule $RULE --inits pissa eva peft_lora_ga lora_ga $FIT $O
  $PY benchmarks/rate.py probe --out $OUT --seeds $SEEDS --rules anchored polyak $O
}
lane_a & a=$!
lane_b & b=$!
wait $a
wait $b
$PY benchmarks/rate.py summary --out $OUT --rule $RULE $FIT $O
