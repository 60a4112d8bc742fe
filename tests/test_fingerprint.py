"""The statistics cache is keyed by the weights' content: a checkpoint changed in place misses it."""

from __future__ import annotations

import types

import torch
from conftest import make_batches, tiny_gpt2, tiny_llama
from peft import LoraConfig

import lorafa.stats.fingerprint as fingerprint
from lorafa import train
from lorafa.runconfig import InitSection, RunConfig
from lorafa.stats import weights_fingerprint


def test_fingerprint_sees_any_change_and_only_a_change(monkeypatch):
    a, b = tiny_llama(seed=0), tiny_llama(seed=0)
    assert weights_fingerprint(a) == weights_fingerprint(b) == weights_fingerprint(a, workers=1)
    monkeypatch.setattr(fingerprint, "_CHUNK", 64)  # many chunks per tensor: the chunking must not matter ...
    chunked = weights_fingerprint(a)
    assert chunked == weights_fingerprint(b, workers=3)
    with torch.no_grad():  # ... and a one-ulp change in the last element of one weight is seen
        w = b.model.layers[1].mlp.down_proj.weight
        w[-1, -1] = torch.nextafter(w[-1, -1], torch.tensor(float("inf")))
    assert weights_fingerprint(b) != chunked
    assert weights_fingerprint(tiny_llama(seed=0).to(torch.bfloat16)) != weights_fingerprint(tiny_llama(seed=0))
    gpt2 = tiny_gpt2()  # buffers and tied weights count (once)
    before = weights_fingerprint(gpt2)
    gpt2.lm_head.weight.data[0, 0] += 1.0  # tied to the input embedding
    assert weights_fingerprint(gpt2) != before


def _stack(rows):
    return {k: torch.stack([r[k] for r in rows]) for k in rows[0]}


def test_weights_changed_in_place_miss_the_cache(tmp_path, monkeypatch):
    passes = []
    real = train.collect_stats
    monkeypatch.setattr(train, "collect_stats", lambda *a, **k: passes.append(1) or real(*a, **k))
    cfg = RunConfig(output_root=str(tmp_path), init=InitSection(direction="LoRA-One", bsz=2, iters=2))
    rows = [{k: b[k][i] for k in b} for b in make_batches(1) for i in range(4)]
    task, state = types.SimpleNamespace(train=rows), types.SimpleNamespace(is_main_process=True,
                                                                          is_local_main_process=True)
    model = tiny_llama(seed=0)

    def init():
        return train._stats_for_init(cfg, model, LoraConfig(target_modules=["q_proj"]), cfg.init_config(), task,
                                     _stack, state)

    first = init()
    cached = init()
    assert len(passes) == 1  # same config, same weights: a hit
    for name in first:
        torch.testing.assert_close(cached[name].grad, first[name].grad)
    with torch.no_grad():  # the "checkpoint" is overwritten in place: same name, other values
        model.model.layers[0].mlp.up_proj.weight.mul_(1.5)
    init()
    assert len(passes) == 2
    assert len(list((tmp_path / ".stats_cache").glob("*.safetensors"))) == 2
    (tmp_path / ".stats_cache").joinpath("junk.safetensors").write_bytes(b"")  # unrelated files are ignored
    init()
    assert len(passes) == 2
    latest = max((p for p in (tmp_path / ".stats_cache").glob("*.safetensors") if p.name != "junk.safetensors"),
                 key=lambda p: p.stat().st_mtime_ns)
    latest.write_bytes(b"truncated")  # an unreadable cache is a miss, recomputed and rewritten
    init()
    init()
    assert len(passes) == 3
