"""TermsTrainer under a real 2-process DDP run (gloo, CPU) with a learned alignment projection.

The adapters live in the DDP-wrapped PEFT model (DDP averages their gradients); the projection φ (a LinearMap from
the student's hidden width to the teacher's) lives outside it, and `_TermsCallback.on_pre_optimizer_step`
all-reduces its gradients. Each process trains on its own examples (the Trainer shards the dataset by batch).
Checked after the run:

1. φ is identical on both ranks and moved from its start; each rank's local φ gradient differed from the other's
   (so without the averaging the two copies would drift apart) and the gradient the optimiser used was their mean;
2. the adapters are identical on both ranks;
3. φ and the adapters equal those of a single-process run on the union of the two ranks' micro-batches (per-device
   batch ×2, same learning rate). This holds exactly (up to float rounding) because every example here has the same
   number of labelled tokens: the task loss is a per-micro-batch token mean, so the mean of the two ranks' means is
   the union's mean only when both ranks' micro-batches hold equally many labelled tokens; the pooled-hidden
   alignment loss is a mean over examples, and every micro-batch has the same number of examples. SGD keeps the
   update linear in the gradient (Adam's g/√v would amplify float rounding in near-zero gradient entries).
   The Trainer's gradient clipping (max_grad_norm=1, active at steps 1 and 3) sees the adapters' gradients only,
   already averaged by DDP, so it scales both runs alike; φ's gradient is never clipped.
"""

from __future__ import annotations

import json
import os
import time
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist
from conftest import VOCAB, lora_cfg, tiny_llama
from safetensors.torch import load_file, save_file
from spawn_ranks import free_port, require_gloo, run_ranks

WORLD = 2
STEPS = 3  # optimiser steps
ACCUM = 2  # micro-batches per optimiser step
BSZ = 2  # examples per micro-batch and process
SEQ = 12
LABELLED = 5  # labelled tokens in every example (different lengths and padding, equal token counts)
N_EXAMPLES = WORLD * STEPS * ACCUM * BSZ
LR = 0.2
TIMEOUT_S = 180  # the whole spawned run; a deadlocked collective fails the test instead of blocking the suite


def _examples() -> list[dict]:
    """Right-padded causal-LM examples of different lengths, each with LABELLED labelled tokens at its end."""
    g = torch.Generator().manual_seed(11)
    rows = []
    for i in range(N_EXAMPLES):
        length = int(torch.randint(LABELLED + 2, SEQ + 1, (1,), generator=g))
        ids = torch.randint(0, VOCAB, (SEQ,), generator=g)
        mask = (torch.arange(SEQ) < length).long()
        labels = ids.clone()
        labels[: length - LABELLED] = -100  # the prompt (at least 2 tokens, so the shifted loss counts all LABELLED)
        labels[mask == 0] = -100
        rows.append({"input_ids": ids, "attention_mask": mask, "labels": labels, "idx": torch.tensor(i)})
    return rows


def _wide_teacher():
    """A tiny Llama with another seed and a wider hidden state (48 vs the student's 32): φ is a 32 -> 48 map."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(3)
    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=48, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    return LlamaForCausalLM(cfg).eval()


def _student():
    from peft import get_peft_model

    model = get_peft_model(tiny_llama(seed=0), lora_cfg(["q_proj", "v_proj"]))
    torch.manual_seed(4)
    with torch.no_grad():  # non-zero B, so A gets gradients from the first step
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.1)
    return model


def _train(output_dir: str, dataset: list[dict], per_device_bsz: int, rank: int = 0) -> tuple[dict, list[dict]]:
    """TermsTrainer with a pooled-hidden alignment term and a learned projection, built as the runner builds it
    (`align.projection=learned`). Returns the tensors the tests compare ("seen": the examples of each micro-batch)
    and the step_log rows."""
    from torch.utils.data import SequentialSampler
    from transformers import TrainerCallback, TrainingArguments

    from lorafa.align import ModelTeacher
    from lorafa.align.build import build_term, check_align_section
    from lorafa.runconfig import AlignSection
    from lorafa.terms import TermsTrainer

    student = _student()
    section = AlignSection(mode="distill", teacher="tiny-wide", kind="mse", target="pooled", projection="learned",
                           lambda_=2.0)
    check_align_section(section)
    # the orthogonal init of the 32 -> 48 map differs between processes (another seed on each): TermsTrainer must
    # start every process from rank 0's
    teacher = ModelTeacher(_wide_teacher())  # (seeds the global generator itself)
    torch.manual_seed(5 + rank)
    term = build_term(section, student, teacher, max_steps=STEPS)
    proj = term.student_map.weight
    assert tuple(proj.shape) == (48, 32) and proj.requires_grad
    drawn = proj.detach().clone()

    seen: list[list[int]] = []

    def collate(rows):
        seen.append([int(r["idx"]) for r in rows])
        return {k: torch.stack([r[k] for r in rows]) for k in ("input_ids", "attention_mask", "labels")}

    class LocalGrad(TrainerCallback):  # runs before _TermsCallback: this process's own gradient
        def __init__(self):
            self.grads = []

        def on_pre_optimizer_step(self, args, state, control, **kwargs):
            self.grads.append(proj.grad.detach().clone())

    class UsedGrad(LocalGrad):  # added after _TermsCallback: the start and the gradient the optimiser steps with
        def on_train_begin(self, args, state, control, **kwargs):
            self.start = proj.detach().clone()

    class InOrder(TermsTrainer):  # a fixed order on every transformers version (the tests pair up micro-batches)
        def _get_train_sampler(self, *args, **kwargs):
            return SequentialSampler(self.train_dataset)

    lora = [p for n, p in student.named_parameters() if p.requires_grad]
    optimizer = torch.optim.SGD([{"params": lora}, {"params": term.parameters()}], lr=LR)
    args = TrainingArguments(output_dir=output_dir, per_device_train_batch_size=per_device_bsz,
                             gradient_accumulation_steps=ACCUM, max_steps=STEPS, learning_rate=LR,
                             lr_scheduler_type="constant", report_to=[], use_cpu=True, save_strategy="no",
                             logging_steps=1, disable_tqdm=True, seed=0,
                             remove_unused_columns=False)  # keep "idx" for the collator
    local, averaged = LocalGrad(), UsedGrad()
    rows = []
    trainer = InOrder(model=student, args=args, train_dataset=dataset, data_collator=collate,
                      optimizers=(optimizer, None), callbacks=[local], terms=[term], step_log=rows.append)
    trainer.add_callback(averaged)
    trainer.train()
    assert trainer.state.global_step == STEPS

    names = [type(c).__name__ for c in trainer.callback_handler.callbacks]
    assert names.index("LocalGrad") < names.index("_TermsCallback") < names.index("UsedGrad"), names
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]  # averaged over the processes
    assert len(losses) == STEPS
    out = {"proj_drawn": drawn, "proj_initial": averaged.start, "proj_final": proj.detach().clone(), "logged_loss": torch.tensor(losses),
           "local_grads": torch.stack(local.grads), "averaged_grads": torch.stack(averaged.grads),
           "seen": torch.tensor(seen[: STEPS * ACCUM])}
    for n, p in student.named_parameters():
        if "lora_" in n:
            out[n] = p.detach().clone()
    return out, rows


def _worker(rank: int, port: int, out_dir: str) -> None:
    # what torchrun / accelerate launch would set: the Trainer's accelerate state reads them
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE=str(WORLD), LOCAL_WORLD_SIZE=str(WORLD), OMP_NUM_THREADS="1")
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD, timeout=timedelta(seconds=90))
    try:
        out, rows = _train(os.path.join(out_dir, "trainer"), _examples(), BSZ, rank)
        out["world"] = torch.tensor(dist.get_world_size())
        save_file({k: v.contiguous() for k, v in out.items()}, os.path.join(out_dir, f"rank{rank}.safetensors"))
        with open(os.path.join(out_dir, f"rows{rank}.json"), "w") as f:
            json.dump(rows, f)
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def two_rank_training(tmp_path_factory):
    require_gloo()
    out = tmp_path_factory.mktemp("terms_ddp")
    t = time.perf_counter()
    codes = run_ranks(_worker, WORLD, free_port(), str(out), timeout=TIMEOUT_S, check=False)
    results = []
    for r in range(WORLD):
        path = out / f"rank{r}.safetensors"
        assert path.exists(), f"rank {r} failed (exit code {codes[r]}); its traceback is in the test output"
        results.append(load_file(str(path)))
    rows = [json.loads((out / f"rows{r}.json").read_text()) for r in range(WORLD)]
    print(f"2-process TermsTrainer run: {time.perf_counter() - t:.1f} s")
    return results, rows


def test_each_rank_trains_on_its_own_examples(two_rank_training):
    (r0, r1), rows = two_rank_training
    assert int(r0["world"]) == int(r1["world"]) == WORLD
    s0, s1 = r0["seen"].tolist(), r1["seen"].tolist()
    assert len(s0) == len(s1) == STEPS * ACCUM and all(len(b) == BSZ for b in s0 + s1)
    flat0, flat1 = sum(s0, []), sum(s1, [])
    assert not set(flat0) & set(flat1), "both processes saw the same examples: no data parallelism"
    assert sorted(flat0 + flat1) == list(range(N_EXAMPLES))
    # rank 0 logs every step (its own losses); the alignment term ran at each one
    assert [r["step"] for r in rows[0]] == list(range(1, STEPS + 1)) and rows[1] == []
    assert all(r["align_weight"] == 2.0 and r["align_loss"] > 0 for r in rows[0])


def test_projection_gradients_are_averaged_and_the_projection_stays_identical(two_rank_training):
    (r0, r1), _ = two_rank_training
    # the ranks' own gradients differ at every step (different data): not averaging them would split φ
    for step in range(STEPS):
        diff = (r0["local_grads"][step] - r1["local_grads"][step]).abs().max().item()
        assert diff > 1e-4, f"step {step}: the ranks' local projection gradients agree ({diff}); the test is blind"
    # the optimiser used their mean, the same on both ranks
    assert torch.equal(r0["averaged_grads"], r1["averaged_grads"])
    torch.testing.assert_close(r0["averaged_grads"], (r0["local_grads"] + r1["local_grads"]) / 2, rtol=1e-6,
                               atol=1e-7)
    # each process drew another φ; training started every one from rank 0's, and φ moved and is bitwise identical
    # across ranks after the steps
    assert not torch.allclose(r0["proj_drawn"], r1["proj_drawn"])
    assert torch.equal(r0["proj_initial"], r0["proj_drawn"]) and torch.equal(r1["proj_initial"], r0["proj_drawn"])
    assert torch.equal(r0["proj_final"], r1["proj_final"])
    assert (r0["proj_final"] - r0["proj_initial"]).abs().max().item() > 1e-3


def test_adapters_identical_across_ranks(two_rank_training):
    (r0, r1), _ = two_rank_training
    lora = [k for k in r0 if "lora_" in k]
    assert len(lora) == 2 * 2 * 2  # q_proj and v_proj, A and B, 2 layers
    assert set(lora) == {k for k in r1 if "lora_" in k}
    for k in lora:
        assert torch.equal(r0[k], r1[k]), k
    start = {n: p for n, p in _student().named_parameters() if "lora_" in n}
    assert all((r0[k] - start[k]).abs().max().item() > 1e-5 for k in lora)  # every adapter trained


def test_two_ranks_equal_one_process_on_the_union_of_their_batches(two_rank_training, tmp_path):
    (r0, r1), _ = two_rank_training
    rows_by_idx = _examples()
    # micro-batch k of the single process = rank 0's micro-batch k, then rank 1's
    order = [i for b0, b1 in zip(r0["seen"].tolist(), r1["seen"].tolist()) for i in b0 + b1]
    ref, ref_rows = _train(str(tmp_path / "single"), [rows_by_idx[i] for i in order], WORLD * BSZ)
    assert ref["seen"].flatten().tolist() == order
    torch.testing.assert_close(ref["proj_initial"], r0["proj_initial"], rtol=0, atol=0)
    torch.testing.assert_close(ref["local_grads"], r0["averaged_grads"], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(ref["proj_final"], r0["proj_final"], rtol=1e-5, atol=1e-6)
    for k in r0:
        if "lora_" in k:
            torch.testing.assert_close(ref[k], r0[k], rtol=1e-5, atol=1e-6, msg=k)
    # the training loss the Trainer logs (the mean over the processes) is the single process's loss
    torch.testing.assert_close(ref["logged_loss"], r0["logged_loss"], rtol=1e-3, atol=0)
    assert len(ref_rows) == STEPS
