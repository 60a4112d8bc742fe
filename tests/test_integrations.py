"""`lorafa.initialize_trainer`: the data-aware init inside an already-built HF Trainer / TRL SFTTrainer."""

from __future__ import annotations

import copy

import pytest
import torch
from peft import get_peft_model, get_peft_model_state_dict
from transformers import (DataCollatorForLanguageModeling, DataCollatorWithPadding, LlamaConfig, LlamaForCausalLM,
                          Trainer, TrainerCallback, TrainingArguments)

import lorafa
from lorafa import InitConfig, initialize, initialize_trainer, stat_batches, trainer_stat_batches
from lorafa.saving import init_record
from lorafa.peft_bridge import quiet_checkpointing_rename

from conftest import lora_cfg
from tiny_assets import char_tokenizer

TARGETS = ("q_proj", "v_proj", "down_proj")


@pytest.fixture(scope="module")
def tok():
    return char_tokenizer()


def tiny_lm(tok, seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                      pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    return LlamaForCausalLM(cfg)


def sums(n: int = 12) -> list[tuple[str, str]]:
    g = torch.Generator().manual_seed(0)
    pairs = torch.randint(1, 20, (n, 2), generator=g).tolist()
    return [(f"{a}+{b}=", f"{a + b}") for a, b in pairs]


def lm_rows(tok, n: int = 12) -> list[dict]:
    """Tokenised examples of varying length (so batches carry padding)."""
    return [{"input_ids": tok(p + c + "!" * (i % 3))["input_ids"]} for i, (p, c) in enumerate(sums(n))]


def make_trainer(model, tok, rows, tmp_path, collator=None, callbacks=None, **args) -> Trainer:
    args = TrainingArguments(output_dir=str(tmp_path), max_steps=2, per_device_train_batch_size=2, learning_rate=1e-2,
                             report_to="none", save_strategy="no", use_cpu=True, disable_tqdm=True, seed=0,
                             dataloader_pin_memory=False, logging_steps=1, **args)
    collator = collator or DataCollatorForLanguageModeling(tok, mlm=False)
    return Trainer(model=model, args=args, train_dataset=rows, data_collator=collator, callbacks=callbacks)


def plain(batches) -> list[dict]:
    return [dict(b) for b in batches]  # transformers' collators return BatchEncoding, collect_stats takes dicts


def max_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max((a[k].float() - b[k].float()).abs().max().item() for k in a)


def params(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters()}


class Recording:
    """A data collator that keeps every batch it makes (the k-th batch of training is step k's)."""

    def __init__(self, collate):
        self.collate, self.batches = collate, []

    def __call__(self, examples):
        out = self.collate(examples)
        self.batches.append({k: v.clone() for k, v in dict(out).items()})
        return out


class Snapshots(TrainerCallback):
    """The trainable parameters at the start of every optimiser step."""

    def __init__(self, model):
        self.model, self.at_step = model, []

    def on_step_begin(self, args, state, control, **kwargs):
        self.at_step.append({n: p.detach().clone() for n, p in self.model.named_parameters() if p.requires_grad})


@torch.no_grad()
def assert_trained_on_its_own_loss(trainer, peft_model, batches, snapshots, out):
    """Each logged step loss is the installed PeftModel's loss (with the adapters as they were at that step's start)
    on that step's batch, computed here; the reported training loss is their mean. transformers 4.x rounds the logged
    loss to 4 decimals."""
    logged = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert len(logged) == len(snapshots.at_step) == trainer.state.global_step
    trained = params(peft_model)
    peft_model.eval()
    for step, (at_start, loss) in enumerate(zip(snapshots.at_step, logged)):
        for n, p in peft_model.named_parameters():
            if n in at_start:
                p.copy_(at_start[n])
        # the loss as the installed Trainer asks for it: normalised by its own count of label tokens (transformers
        # 4.x counts them before the causal shift, 5.x after), so the check holds on every supported version
        _, n_items = trainer.get_batch_samples(iter([batches[step]]), 1, peft_model.device)
        want = peft_model(**batches[step], num_items_in_batch=n_items).loss.item()
        assert loss == pytest.approx(want, rel=1e-4, abs=6e-5), step
    for n, p in peft_model.named_parameters():
        p.copy_(trained[n])
    assert out.training_loss == pytest.approx(sum(logged) / len(logged), rel=1e-4)
    assert logged[0] != pytest.approx(logged[-1], rel=1e-6)  # the steps trained: the loss moved


# transformers 5 renamed gradient_checkpointing to activation_checkpointing (the old name warns)
CHECKPOINTING = ("activation_checkpointing" if "activation_checkpointing" in TrainingArguments.__dataclass_fields__
                 else "gradient_checkpointing")


@pytest.mark.parametrize("method, checkpointing", [("lora_fa", False), ("lora_ga", True)])
def test_trainer_init_equals_initialize_on_the_same_batches_and_trains_only_the_adapters(tok, tmp_path, method,
                                                                                         checkpointing):
    rows = lm_rows(tok)
    base = tiny_lm(tok)
    original, fresh = params(base), copy.deepcopy(base)
    collator = DataCollatorForLanguageModeling(tok, mlm=False)
    recording = Recording(collator)
    trainer = make_trainer(base, tok, rows, tmp_path, recording, **{CHECKPOINTING: checkpointing})
    lora, cfg = lora_cfg(TARGETS), InitConfig(method=method, bsz=2, iters=3, sample="first")

    peft_model = initialize_trainer(trainer, lora, cfg, progress=False)
    assert trainer.model is peft_model and trainer.model_wrapped is peft_model
    assert trainer.callback_handler.model is peft_model

    # the same batches, built without the trainer: the first 6 examples, its collator, in order
    ref = initialize(fresh, lora_cfg(TARGETS), cfg, batches=plain(stat_batches(rows, collator, 2, 3, "first")),
                     progress=False)
    assert max_diff(params(peft_model), params(ref)) <= 1e-6
    assert max_diff(get_peft_model_state_dict(peft_model), get_peft_model_state_dict(ref)) <= 1e-6
    guard = init_record(peft_model).summary.get("guard")  # lora_fa's step, checked on the next 2 batches
    if method == "lora_fa":  # here the step does not raise their loss, so the guard changed nothing
        assert guard["remedy"] is None and guard["loss_step"] <= guard["loss_before"]
    else:
        assert guard is None

    at_init = params(peft_model)
    snapshots = Snapshots(peft_model)
    trainer.add_callback(snapshots)
    recording.batches.clear()  # the statistics pass's batches
    out = trainer.train()
    assert trainer.state.global_step == 2
    assert_trained_on_its_own_loss(trainer, peft_model, recording.batches, snapshots, out)
    adapters = {n for n in at_init if ".lora_" in n}
    trained = {n for n, p in peft_model.named_parameters() if not torch.equal(p, at_init[n])}
    assert adapters and trained == adapters  # every adapter moved, nothing else did
    optimised = sum(p.numel() for g in trainer.optimizer.param_groups for p in g["params"])
    assert optimised == sum(at_init[n].numel() for n in adapters)
    # the base: the original weights, but for lora_ga's offset of the target layers
    for name, w in original.items():
        now = peft_model.get_base_model().get_parameter(name.replace(".weight", ".base_layer.weight")
                                                        if any(f"{t}.weight" in name for t in TARGETS) else name)
        offset = method == "lora_ga" and any(f"{t}.weight" in name for t in TARGETS)
        assert torch.equal(now, w) != offset, name


def test_sft_trainer_init_equals_initialize_and_trains(tok, tmp_path):
    pytest.importorskip("trl")
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer
    from trl.trainer.sft_trainer import DataCollatorForLanguageModeling as TRLCollator

    ds = Dataset.from_list([{"prompt": p, "completion": c} for p, c in sums(12)])
    base = tiny_lm(tok)
    fresh = copy.deepcopy(base)
    args = SFTConfig(output_dir=str(tmp_path), max_steps=2, per_device_train_batch_size=2, learning_rate=1e-2,
                     report_to="none", save_strategy="no", use_cpu=True, bf16=False, disable_tqdm=True,
                     max_length=64, dataloader_pin_memory=False, logging_steps=1)  # checkpointing: SFTConfig's default
    trainer = SFTTrainer(model=base, args=args, train_dataset=ds, processing_class=tok)
    cfg = InitConfig(method="lora_fa", bsz=2, iters=3, seed=5)  # a seeded sample

    peft_model = initialize_trainer(trainer, lora_cfg(TARGETS), cfg, progress=False)

    # the same examples: TRL's tokenisation of the dataset, TRL's collator, lorafa's seeded choice of them
    batches = stat_batches(trainer.train_dataset, TRLCollator(pad_token_id=tok.pad_token_id), 2, 3, "random", 5)
    first = batches[0]
    assert (first["labels"] == -100).any() and (first["labels"] != -100).any()  # completion-only loss
    ref = initialize(fresh, lora_cfg(TARGETS), cfg, batches=batches, progress=False)
    assert max_diff(get_peft_model_state_dict(peft_model), get_peft_model_state_dict(ref)) <= 1e-6

    at_init = params(peft_model)
    snapshots, recording = Snapshots(peft_model), Recording(trainer.data_collator)
    trainer.add_callback(snapshots)
    trainer.data_collator = recording
    out = trainer.train()
    assert trainer.state.global_step == 2
    assert_trained_on_its_own_loss(trainer, peft_model, recording.batches, snapshots, out)
    trained = {n for n, p in peft_model.named_parameters() if not torch.equal(p, at_init[n])}
    assert trained == {n for n in at_init if ".lora_" in n}


def test_a_collator_without_labels_fails_before_the_statistics_pass(tok, tmp_path, monkeypatch):
    base = tiny_lm(tok)
    trainer = make_trainer(base, tok, lm_rows(tok), tmp_path, DataCollatorWithPadding(tok))

    def no_pass(*a, **k):
        raise AssertionError("the statistics pass started")

    monkeypatch.setattr(lorafa.sweeps, "collect_stats", no_pass)
    with pytest.raises(ValueError, match=r"without \['labels'\].*DataCollatorForLanguageModeling"):
        initialize_trainer(trainer, lora_cfg(TARGETS), InitConfig(bsz=2, iters=2), progress=False)
    assert trainer.model is base and not hasattr(base, "peft_config")


def test_methods_without_statistics_draw_no_batches(tok, tmp_path, monkeypatch):
    trainer = make_trainer(tiny_lm(tok), tok, lm_rows(tok), tmp_path, DataCollatorWithPadding(tok))
    monkeypatch.setattr(trainer, "get_train_dataloader", lambda: pytest.fail("batches drawn"))
    peft_model = initialize_trainer(trainer, lora_cfg(TARGETS), InitConfig(method="pissa"), progress=False)
    assert trainer.model is peft_model


def test_after_the_optimizer_exists_on_a_peft_model_or_with_too_few_examples_it_refuses(tok, tmp_path):
    trainer = make_trainer(tiny_lm(tok), tok, lm_rows(tok), tmp_path)
    trainer.create_optimizer()
    with pytest.raises(ValueError, match="already has an optimizer"):
        initialize_trainer(trainer, lora_cfg(TARGETS), InitConfig(bsz=2, iters=2), progress=False)

    with quiet_checkpointing_rename():  # PEFT reads a property transformers 5 renamed
        peft_base = get_peft_model(tiny_lm(tok), lora_cfg(TARGETS))
    trainer = make_trainer(peft_base, tok, lm_rows(tok), tmp_path)
    with pytest.raises(ValueError, match="already has adapters"):
        initialize_trainer(trainer, lora_cfg(TARGETS), InitConfig(bsz=2, iters=2), progress=False)
    trainer = make_trainer(tiny_lm(tok), tok, lm_rows(tok, 3), tmp_path)
    with pytest.raises(ValueError, match="needs 4 examples .* has 3"):
        initialize_trainer(trainer, lora_cfg(TARGETS), InitConfig(bsz=2, iters=2), progress=False)
    with pytest.raises(TypeError, match="transformers.Trainer"):
        initialize_trainer(object(), lora_cfg(TARGETS))


def test_the_random_sample_is_seeded_and_each_rank_takes_its_share(tok, tmp_path, monkeypatch):
    rows = lm_rows(tok)
    collator = DataCollatorForLanguageModeling(tok, mlm=False)
    trainer = make_trainer(tiny_lm(tok), tok, rows, tmp_path, collator)

    def draw(seed):
        return trainer_stat_batches(trainer, InitConfig(bsz=2, iters=3, seed=seed))

    def same(a, b):
        return len(a) == len(b) and all(x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)
                                        for x, y in zip(a, b))

    assert same(draw(0), draw(0)) and not same(draw(0), draw(1))
    assert same(draw(0), plain(stat_batches(rows, collator, 2, 3, "random", 0)))
    everything = draw(0)
    monkeypatch.setattr(lorafa.stats.sampling, "world", lambda: (1, 2))  # rank 1 of 2: batch b on rank b mod 2
    assert same(draw(0), everything[1::2])


def test_a_streamed_dataset_gives_its_first_examples(tok, tmp_path):
    rows = lm_rows(tok)

    class Stream(torch.utils.data.IterableDataset):
        def __iter__(self):
            return iter(rows)

    collator = DataCollatorForLanguageModeling(tok, mlm=False)
    trainer = make_trainer(tiny_lm(tok), tok, Stream(), tmp_path, collator)
    with pytest.raises(ValueError, match="sample='first'"):
        trainer_stat_batches(trainer, InitConfig(bsz=2, iters=2))
    got = trainer_stat_batches(trainer, InitConfig(bsz=2, iters=2, sample="first"))
    want = plain(stat_batches(rows, collator, 2, 2, "first"))
    assert all(torch.equal(g[k], w[k]) for g, w in zip(got, want) for k in w)


def _example(tmp_path):
    """examples/trl_sft.py as a module, and its arguments for the tiny model saved to disk."""
    import importlib.util
    from pathlib import Path

    from tiny_assets import save_tiny_causal_lm

    pytest.importorskip("trl")
    pytest.importorskip("reasoning_gym")
    path = Path(__file__).resolve().parents[1] / "examples" / "trl_sft.py"
    spec = importlib.util.spec_from_file_location("trl_sft_example", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    model_dir = save_tiny_causal_lm(str(tmp_path / "tiny"))
    argv = ["--model", model_dir, "--examples", "12", "--eval-examples", "2", "--steps", "1", "--batch-size", "2",
            "--stat-iters", "3", "--max-length", "512", "--out", str(tmp_path / "out")]
    return module, argv


def test_the_trl_example_init_equals_initialize_on_the_same_examples(tmp_path):
    example, argv = _example(tmp_path)
    args = example.parse_args(argv)
    trainer, task = example.build_trainer(args)
    # a second load, not a deepcopy: SFTTrainer patched the model's forward with a closure over the original model
    fresh, _ = example.load_causal_lm(args.model)
    init = example.init_config(args, len(task.train))
    assert (init.bsz, init.iters, init.sample) == (2, 3, "random")
    peft_model = initialize_trainer(trainer, example.lora_config(args), init, progress=False)

    # the same examples: the SFTTrainer's tokenised leg_counting rows, chosen as stat_batches chooses, its collator
    batches = stat_batches(trainer.train_dataset, trainer.data_collator, init.bsz, init.iters, init.sample, init.seed)
    ref = initialize(fresh, example.lora_config(args), init, batches=batches, progress=False)
    assert max_diff(get_peft_model_state_dict(peft_model), get_peft_model_state_dict(ref)) <= 1e-6


def test_the_trl_example_runs(tmp_path, capsys):
    example, argv = _example(tmp_path)
    example.main(argv)
    out = capsys.readouterr().out
    assert "lorafa init: lora_fa" in out and "held-out loss" in out
    assert (tmp_path / "out" / "adapter" / "adapter_model.safetensors").is_file()


def test_a_dict_init_config_is_the_initconfig_of_its_fields(tok, tmp_path):
    rows, fields = lm_rows(tok), {"method": "lora_ga", "bsz": 2, "iters": 3, "sample": "first"}
    by_dict = initialize_trainer(make_trainer(tiny_lm(tok), tok, rows, tmp_path), lora_cfg(TARGETS), dict(fields),
                                 progress=False)
    by_config = initialize_trainer(make_trainer(tiny_lm(tok), tok, rows, tmp_path), lora_cfg(TARGETS),
                                   InitConfig(**fields), progress=False)
    assert max_diff(get_peft_model_state_dict(by_dict), get_peft_model_state_dict(by_config)) == 0
    # the dict's values, not the defaults (lora_ga offsets the base; the default lora_fa does not)
    default = initialize_trainer(make_trainer(tiny_lm(tok), tok, rows, tmp_path), lora_cfg(TARGETS),
                                 InitConfig(bsz=2, iters=3, sample="first"), progress=False)
    assert max_diff(get_peft_model_state_dict(by_dict), get_peft_model_state_dict(default)) > 1e-3

    trainer = make_trainer(tiny_lm(tok), tok, rows, tmp_path)
    with pytest.raises(TypeError, match=r"not InitConfig fields: \['metod'\].*method, direction"):
        initialize_trainer(trainer, lora_cfg(TARGETS), {"metod": "lora_ga"}, progress=False)
    with pytest.raises(ValueError, match="Unknown init method 'bogus'"):
        initialize_trainer(trainer, lora_cfg(TARGETS), {"method": "bogus"}, progress=False)
    with pytest.raises(TypeError, match=r"lorafa.InitConfig .* got str"):
        initialize_trainer(trainer, lora_cfg(TARGETS), "lora_ga", progress=False)
    assert trainer.model is not None and not hasattr(trainer.model, "peft_config")  # nothing was installed
