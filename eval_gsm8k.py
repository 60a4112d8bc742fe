"""GSM8K evaluation of a run (see lorafa.eval.cli):

    torchrun --nproc_per_node=2 eval_gsm8k.py --wandb_name="$runname"
"""

from lorafa.eval.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
