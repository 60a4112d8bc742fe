#!/bin/bash
# The causal-LM alignment benchmark as it ran on one H100 for docs/benchmarks.md: on a 135M model a single process
# leaves the GPU mostly idle, so the runs go as parallel processes. The three forgetting seeds start at once; the
# teacher (its rate chosen on validation) comes first on the teacher side, then the knob grid beside the task-only
# students and the extraction, then the aligned students of each seed. Every run is cached under its --out, so a
# rerun resumes. Extra arguments go to every process (e.g. --gsm8k PATH); PYTHON picks the interpreter; ACCURACY=N
# adds GSM8K accuracy by generation on N test problems to the teacher side (base, teacher, students).
#
#   [ACCURACY=N] bash benchmarks/alignment_causal.sh [--gsm8k PATH]
set -u
PY=${PYTHON:-python}
C=benchmarks/results/align_causal_gpu
F=benchmarks/results/align_causal_forgetting_gpu
A="$PY benchmarks/alignment.py --preset causal --lr 3.2e-3 --eval-every 20 --dtype float32 --threads 2 $*"
T="--teacher-lr 6e-5 1.8e-4 5.4e-4 --teacher-steps 200 ${ACCURACY:+--accuracy $ACCURACY}"
FG="--forgetting --lams 0 0.1 0.3 1 --targets q_proj k_proj v_proj o_proj gate_proj up_proj down_proj --steps 120
    --general-text pydoc"
for s in 0 1 2; do $A $FG --seeds "$s" --out $F & done
$A $T --seeds 0 1 2 --students --ranks --out $C || exit 1
$A $T --seeds 0 1 2 --students task --ranks 4 8 16 --out $C &
$A $T --seeds 0 1 2 --grid --students --ranks --out $C || exit 1
for s in 0 1 2; do $A $T --seeds "$s" --students distill cyclic align_init --ranks --out $C & done
wait
$A $T --seeds 0 1 2 --grid --ranks 4 8 16 --summary-only --out $C
$A $FG --seeds 0 1 2 --summary-only --out $F
