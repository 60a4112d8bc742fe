#!/usr/bin/env bash
# Issue 23's rate benchmark on the main job's set-up (convergence.py's main_job preset: SmolLM2-135M-Instruct on
# reasoning-gym's leg_counting, LoRA on every linear layer, 22 steps of batch 8; 64 validation and 64 test problems).
# The grids are 2x-spaced around the rate the default rule (anchored) gives default LoRA, 3e-3 (the runner's fixed
# rate is 1e-3), and for the inits that took lower rates on the causal preset, around those. Two lanes, resumable
# (rate_lanes.sh). The learning-rate-free rows (Prodigy, schedule-free AdamW; default LoRA) run at every seed too.
OUT=benchmarks/results/rate_main O="--preset main_job --max-extend 3 --eval-every 22 --threads 1" \
  FREE="lora+prodigy lora+sf" \
  HIGH="0.0015 0.003 0.006" MID="0.0004 0.0008 0.0016" LOW="0.0001 0.0002 0.0004" \
  exec bash "$(dirname "$0")/rate_lanes.sh"
