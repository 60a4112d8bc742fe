"""`eval_gsm8k.py` / `lorafa-eval-gsm8k`: GSM8K accuracy of a trained run, on one process or under torchrun.

    torchrun --nproc_per_node=2 eval_gsm8k.py --wandb_name="$runname"

reads `{runs_root}/{runname}/run_config.json` for the base model, loads the PEFT adapter in `{run_dir}/adapter` on
it, generates greedily on each process's shard of the test set, and rank 0 writes `{run_dir}/eval_gsm8k.json`.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import time

import torch
import torch.distributed as dist

from ..models import load_causal_lm, resolve_model_path
from ..fsio import write_json
from ..run_io import network_reachable
from ..stats.distributed import world
from ..targets import out_in_features
from .gsm8k import evaluate_gsm8k, load_gsm8k_examples

logger = logging.getLogger(__name__)
DEFAULT_DATA = "openai/gsm8k"
ADAPTER_PREFIX = "base_model.model."


def build_parser() -> argparse.ArgumentParser:
    """The command line (see the module docstring)."""
    p = argparse.ArgumentParser(description="GSM8K accuracy of a base model, adapter or merged "
                                "checkpoint; shards over processes under torchrun.")
    p.add_argument("--wandb_name", help="run name: the run directory is {runs_root}/{wandb_name}")
    p.add_argument("--run_dir", help="the run directory (instead of --wandb_name)")
    p.add_argument("--runs_root", default=os.environ.get("LORAFA_RUNS", os.path.join("outputs", "runs")),
                   help="folder of run directories (default: $LORAFA_RUNS or outputs/runs)")
    p.add_argument("--model", help="base model id or path (default: run_config.json's model.name)")
    p.add_argument("--adapter", help="PEFT adapter folder (default: {run_dir}/adapter if it exists)")
    p.add_argument("--merged", help="a merged checkpoint folder to evaluate instead of base + adapter")
    p.add_argument("--use_merged", action="store_true", help="evaluate {run_dir}/merged")
    p.add_argument("--data_path", help=f"folder with {{split}}.jsonl, a .jsonl file or a hub id (default: "
                   f"run_config.json's eval.data_path, else {DEFAULT_DATA})")
    p.add_argument("--split", default="test")
    # `--limit` is the spelling to use under torchrun, whose own parser takes `--n...` as an abbreviation of its options
    p.add_argument("--limit", "--n", dest="n", type=int, default=None, help="evaluate the first n examples only")
    p.add_argument("--batch_size", type=int, default=16)
    p.add_argument("--max_new_tokens", type=int, default=256)
    p.add_argument("--out", help="result file (default: {run_dir}/eval_gsm8k.json, else ./eval_gsm8k.json)")
    p.add_argument("--bf16", action="store_true", help="load the model in bfloat16")
    p.add_argument("--wandb_project", help="also log the accuracy to this wandb project (needs wandb installed)")
    return p


def _read_json(path: str) -> dict:
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def resolve_run(args: argparse.Namespace) -> dict:
    """Fill in what the command line left out from the run directory: model, adapter, merged dir, data, output.

    Args:
        args: parsed arguments of `build_parser`.

    Returns:
        {"run_dir", "model", "adapter", "merged", "data", "out"}; run_dir/adapter/merged may be None.

    Raises:
        ValueError: a missing run directory, adapter or merged folder, or no way to tell the base model.
    """
    run_dir = args.run_dir or (os.path.join(args.runs_root, args.wandb_name) if args.wandb_name else None)
    if run_dir is not None and not os.path.isdir(run_dir):
        raise ValueError(f"Run directory {run_dir} does not exist: pass --runs_root (or set LORAFA_RUNS) or --run_dir.")
    config_file = os.path.join(run_dir, "run_config.json") if run_dir else None
    run_config = _read_json(config_file) if config_file and os.path.isfile(config_file) else {}

    adapter = args.adapter
    if adapter is None and run_dir and os.path.isdir(os.path.join(run_dir, "adapter")):
        adapter = os.path.join(run_dir, "adapter")
    merged = args.merged or (os.path.join(run_dir, "merged") if args.use_merged and run_dir else None)
    if args.use_merged and merged is None:
        raise ValueError("--use_merged needs a run directory: pass --wandb_name or --run_dir, or --merged PATH.")
    for label, folder in (("adapter", adapter), ("merged checkpoint", merged)):
        if folder is not None and not os.path.isdir(folder):
            raise ValueError(f"The {label} folder {folder} does not exist: check the path or the run's saving option.")
    if merged is not None:
        adapter = None  # a merged checkpoint already contains the adapter

    model = args.model or (run_config.get("model") or {}).get("name")
    if model is None and adapter is not None and os.path.isfile(os.path.join(adapter, "adapter_config.json")):
        model = _read_json(os.path.join(adapter, "adapter_config.json")).get("base_model_name_or_path")
    if model is None and merged is None:
        raise ValueError("No base model: pass --model (run_config.json has no model.name).")

    eval_config = run_config.get("eval") if isinstance(run_config.get("eval"), dict) else {}
    data = args.data_path or eval_config.get("data_path") or DEFAULT_DATA
    out = args.out or os.path.join(run_dir or ".", "eval_gsm8k.json")
    return {"run_dir": run_dir, "model": model, "adapter": adapter, "merged": merged, "data": data, "out": out}


def _adapter_shapes(adapter_dir: str) -> dict[str, tuple[int, ...]]:
    file = os.path.join(adapter_dir, "adapter_model.safetensors")
    if not os.path.isfile(file):
        return {}  # a legacy .bin adapter: PEFT's own size check still applies
    from safetensors import safe_open

    with safe_open(file, framework="pt") as f:
        return {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}


def check_adapter_fits(base, adapter_dir: str) -> None:
    """Raise before any generation if the adapter in `adapter_dir` was not trained on a model shaped like `base`.

    Args:
        base: the base model (not wrapped by PEFT).
        adapter_dir: a PEFT adapter folder (adapter_config.json, adapter_model.safetensors).

    Raises:
        ValueError: no adapter_config.json, target modules absent from the base, or LoRA factor shapes that do not
            fit the base's layers.
    """
    from peft import PeftConfig
    from peft.tuners.tuners_utils import check_target_module_exists

    if not os.path.isfile(os.path.join(adapter_dir, "adapter_config.json")):
        raise ValueError(f"{adapter_dir} has no adapter_config.json: pass a PEFT adapter folder with --adapter.")
    config = PeftConfig.from_pretrained(adapter_dir)
    modules = dict(base.named_modules())
    if not any(check_target_module_exists(config, name) for name in modules if name):
        raise ValueError(f"The adapter {adapter_dir} targets {config.target_modules!r}, which the base model does not "
                         f"have: it was trained on a different base model. Pass --model with the right base.")
    for key, shape in _adapter_shapes(adapter_dir).items():
        if not key.endswith((".lora_A.weight", ".lora_B.weight")):
            continue
        name = key.removeprefix(ADAPTER_PREFIX).rsplit(".lora_", 1)[0]
        module = modules.get(name)
        if module is None:
            raise ValueError(f"The adapter {adapter_dir} has weights for {name!r}, which the base model lacks: it was "
                             f"trained on a different base model. Pass --model with the right base.")
        if getattr(getattr(module, "weight", None), "dim", lambda: 0)() != 2:
            continue  # not a matrix layer (e.g. a conv): PEFT's own size check applies
        out_f, in_f = out_in_features(module)
        expected, got = (in_f, shape[1]) if ".lora_A." in key else (out_f, shape[0])
        if expected != got:
            raise ValueError(f"The adapter {adapter_dir} was trained on a different base model: {key} has shape "
                             f"{shape}, but {name} has {in_f} inputs and {out_f} outputs. Pass --model with the right "
                             f"base.")


def load_for_eval(model_name: str | None, adapter: str | None = None, merged: str | None = None, dtype=None):
    """(model, tokenizer) to evaluate: a merged checkpoint, or the base model with the adapter loaded on it.

    Args:
        model_name: base model id/path (or the embedded default's name); also the tokenizer's source when a merged
            folder has no tokenizer.
        adapter: a PEFT adapter folder, or None.
        merged: a merged checkpoint folder, or None (takes precedence over `adapter`).
        dtype: torch dtype of the weights (default float32).

    Returns:
        The model (in eval mode) and its tokenizer (with a pad token).

    Raises:
        ValueError: the adapter does not fit the base model, or a merged folder without tokenizer and no model name.
    """
    from peft import PeftModel

    if merged is not None:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        has_tokenizer = os.path.isfile(os.path.join(merged, "tokenizer_config.json"))
        if not has_tokenizer and model_name is None:
            raise ValueError(f"{merged} has no tokenizer: pass --model so the base model's tokenizer is used.")
        model = AutoModelForCausalLM.from_pretrained(merged, dtype=dtype or torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(merged if has_tokenizer else resolve_model_path(model_name))
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
        return model.eval(), tokenizer
    model, tokenizer = load_causal_lm(model_name, dtype=dtype)
    if adapter is not None:
        check_adapter_fits(model, adapter)
        try:
            model = PeftModel.from_pretrained(model, adapter)
        except RuntimeError as exc:
            if "size mismatch" not in str(exc):
                raise
            raise ValueError(f"The adapter {adapter} was trained on a different base model than {model_name} "
                             f"({str(exc).splitlines()[-1].strip()}): pass --model with the right base.") from exc
    return model.eval(), tokenizer


def _device() -> torch.device:
    if torch.cuda.is_available():  # more processes than GPUs share them round-robin
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")) % torch.cuda.device_count())
    return torch.device("cpu")


def _init_distributed() -> bool:
    """Start a process group under torchrun if none exists; True when this call started it.

    NCCL when every local process has its own GPU; gloo otherwise (CPU, or processes sharing a GPU, which NCCL
    refuses). Only Python objects are exchanged, so gloo costs nothing here.
    """
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or dist.is_initialized():
        return False
    backend = "gloo"
    if torch.cuda.is_available():
        torch.cuda.set_device(_device())
        local_world = int(os.environ.get("LOCAL_WORLD_SIZE", os.environ["WORLD_SIZE"]))
        if torch.cuda.device_count() >= local_world:
            backend = "nccl"
        else:
            logger.warning("%d processes share %d GPU(s): using gloo.", local_world, torch.cuda.device_count())
    dist.init_process_group(backend)
    return True


def _log_wandb(project: str, name: str | None, summary: dict) -> None:
    try:
        import wandb
    except ImportError:
        logger.warning("--wandb_project given but wandb is not installed: the accuracy is only in the result file.")
        return
    mode = None if "WANDB_MODE" in os.environ or network_reachable() else "offline"
    try:
        run = wandb.init(project=project, name=name, job_type="eval", mode=mode, config=summary)
        run.log({f"gsm8k/{k}": summary[k] for k in ("accuracy", "correct", "n")})
        run.finish()
    except Exception as exc:  # logging to wandb is optional: never lose the evaluation over it
        logger.warning("wandb logging failed (%s): the accuracy is in the result file.", exc)


def evaluate_run(argv: list[str] | None = None) -> dict:
    """Evaluate as the command line says and (on rank 0) write the result file.

    Args:
        argv: command-line arguments (default: sys.argv[1:]).

    Returns:
        The summary written to the result file, without "records" (the same on every rank).

    Raises:
        ValueError: see `resolve_run`, `load_for_eval` and `load_gsm8k_examples`.
    """
    args = build_parser().parse_args(argv)
    started = _init_distributed()
    rank, size = world()
    logging.basicConfig(level=logging.INFO if rank == 0 else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        t0 = time.time()
        run = resolve_run(args)
        model, tokenizer = load_for_eval(run["model"], run["adapter"], run["merged"],
                                         torch.bfloat16 if args.bf16 else torch.float32)
        model.to(_device())
        examples = load_gsm8k_examples(run["data"], args.split, args.n)
        result = evaluate_gsm8k(model, tokenizer, examples, args.batch_size, args.max_new_tokens)
        summary = {"accuracy": result["accuracy"], "correct": result["correct"], "n": result["n"],
                   "model": run["model"], "adapter": run["adapter"], "merged": run["merged"], "data": run["data"],
                   "split": args.split, "n_processes": size, "batch_size": args.batch_size,
                   "max_new_tokens": args.max_new_tokens, "bf16": args.bf16, "wall_time_s": round(time.time() - t0, 3)}
        if rank == 0:
            write_json(run["out"], {**summary, "records": result["records"]})
            line = f"GSM8K accuracy: {result['accuracy']:.4f} ({result['correct']}/{result['n']})"
            logger.info("%s -> %s", line, run["out"])
            print(line, flush=True)
            if args.wandb_project:
                _log_wandb(args.wandb_project, args.wandb_name or (os.path.basename(run["run_dir"]) if run["run_dir"]
                           else None), summary)
        return summary
    finally:
        if started:
            dist.destroy_process_group()


def main(argv: list[str] | None = None) -> int:
    """Console entry point (`lorafa-eval-gsm8k`, `eval_gsm8k.py`): `evaluate_run`, exit status 0.

    Args:
        argv: command-line arguments (default: sys.argv[1:]).

    Returns:
        0.

    Raises:
        ValueError: see `evaluate_run`.
    """
    evaluate_run(argv)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
