#!/usr/bin/env bash
# Issue 23's rate benchmark on the causal preset, CPU protocol (SmolLM2-135M-Instruct on GSM8K, r = 8 on q,k,v,o,
# 40 steps of batch 4; 64 validation and 64 test problems, evaluated at step 0 and at the end; a run takes 6-10
# minutes on one core). The grids are 2x-spaced around each init's best rate on the H200 ablation's 4x grid
# (docs/learning_rate.md): 3.2e-3 for lora, lora_fa, lora_one; 8e-4 for pissa, eva and PEFT's LoRA-GA; 2e-4 for
# lora_ga. Seeds 0, 1 and 4: the training orders of seeds 2, 3 and 5 hold a GSM8K prompt longer than the preset's
# 192 tokens, which the collator refuses (0, 1, 4, 6 and 7 hold none). Two lanes, resumable (rate_lanes.sh). Beside
# AdamW: default LoRA with schedule-free AdamW at its default rate (FREE) and every init with it at anchored's rate (SF).
SEEDS="0 1 4" OUT=benchmarks/results/rate_causal O="--preset causal --max-extend 3 --eval-every 40 --threads 1" \
  FREE="lora+sf" SF=1 \
  HIGH="0.0016 0.0032 0.0064" MID="0.0004 0.0008 0.0016" LOW="0.0001 0.0002 0.0004" \
  exec bash "$(dirname "$0")/rate_lanes.sh"
