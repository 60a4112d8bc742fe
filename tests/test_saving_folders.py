"""Where lorafa writes a folder, it never deletes what it did not write (issue 25, item 1): an initial adapter goes
into a new, empty, or previous-initial-adapter folder; anything else is refused before the init runs."""

from __future__ import annotations

import os

import pytest
import torch
from conftest import lora_cfg, make_batches, tiny_llama
from safetensors.torch import load_file

import lorafa
from lorafa import fsio
from lorafa.saving import INITIAL_FILES, is_initial_adapter

TARGETS = ["q_proj", "v_proj"]


def _init(tmp, initial_dir, method="lora_fa", seed=0):
    cfg = lorafa.InitConfig(method=method, iters=2, seed=seed)
    return lorafa.initialize(tiny_llama(seed=0), lora_cfg(TARGETS), cfg, batches=make_batches(2), progress=False,
                             initial_adapter_dir=initial_dir)


def _tree(path) -> dict[str, bytes]:
    """Every file under `path` with its bytes."""
    out = {}
    for root, _, files in os.walk(path):
        for f in files:
            p = os.path.join(root, f)
            with open(p, "rb") as fh:
                out[os.path.relpath(p, path)] = fh.read()
    return out


def _user_folder(path):
    """A folder as a user keeps it: a checkpoint and a runs/ subfolder."""
    (path / "runs").mkdir(parents=True)
    (path / "runs" / "events.out").write_bytes(b"log")
    (path / "model.safetensors").write_bytes(b"weights")
    return _tree(path)


def test_initial_adapter_dir_never_deletes_a_users_folder(tmp_path):
    """The review's reproduction: before the fix, the folder came back holding only the three adapter files."""
    folder = tmp_path / "ckpt"
    before = _user_folder(folder)
    with pytest.raises(FileExistsError, match="never deletes a folder it did not write") as err:
        _init(tmp_path, folder)
    assert "model.safetensors" in str(err.value) and "runs" in str(err.value)
    assert _tree(folder) == before
    assert sorted(os.listdir(tmp_path)) == ["ckpt"]  # no temporary folder left beside it


def test_initial_adapter_dir_refuses_before_the_statistics_pass(tmp_path, monkeypatch):
    """A folder that cannot take the adapter fails at once, not after minutes of statistics."""
    folder = tmp_path / "ckpt"
    _user_folder(folder)

    def no_stats(*a, **k):
        raise AssertionError("the statistics pass ran before the folder was checked")

    monkeypatch.setattr("lorafa.sweeps.collect_stats", no_stats)
    with pytest.raises(FileExistsError):
        _init(tmp_path, folder)


def test_initial_adapter_dir_refuses_a_file(tmp_path):
    target = tmp_path / "notes.txt"
    target.write_text("keep me")
    with pytest.raises(FileExistsError, match="is a file"):
        _init(tmp_path, target)
    assert target.read_text() == "keep me"


def test_initial_adapter_dir_dot_is_refused_and_the_working_directory_kept(tmp_path, monkeypatch):
    (tmp_path / "train.py").write_text("print('mine')")
    monkeypatch.chdir(tmp_path)
    with pytest.raises(FileExistsError):
        _init(tmp_path, ".")
    assert (tmp_path / "train.py").read_text() == "print('mine')"


def test_an_empty_folder_takes_the_initial_adapter(tmp_path):
    folder = tmp_path / "empty"
    folder.mkdir()
    _init(tmp_path, folder)
    assert set(os.listdir(folder)) == set(INITIAL_FILES) and is_initial_adapter(folder)


def test_a_previous_initial_adapter_is_replaced(tmp_path):
    folder = tmp_path / "init"
    _init(tmp_path, folder, seed=0)
    first = load_file(folder / "adapter_model.safetensors")
    _init(tmp_path, folder, method="pissa", seed=1)
    second = load_file(folder / "adapter_model.safetensors")
    assert set(os.listdir(folder)) == set(INITIAL_FILES)
    assert any(not torch.equal(first[k], second[k]) for k in first)  # really the new one
    assert lorafa.read_initial_adapter(folder).init_config.method == "pissa"
    assert sorted(os.listdir(tmp_path)) == ["init"]  # the previous one, set aside, is gone


def test_a_previous_initial_adapter_with_a_users_file_in_it_is_refused(tmp_path):
    folder = tmp_path / "init"
    _init(tmp_path, folder)
    (folder / "notes.md").write_text("mine")
    with pytest.raises(FileExistsError, match="notes.md"):
        _init(tmp_path, folder)
    assert (folder / "notes.md").read_text() == "mine"


def test_save_adapter_save_initial_keeps_a_users_initial_adapter_folder(tmp_path):
    pm = _init(tmp_path, None, method="pissa")
    out = tmp_path / "adapter"
    users = out / "initial_adapter"
    users.mkdir(parents=True)
    (users / "data.bin").write_bytes(b"mine")
    with pytest.raises(FileExistsError, match="data.bin"):
        lorafa.save_adapter(pm, out, save_initial=True)
    assert (users / "data.bin").read_bytes() == b"mine"
    assert os.listdir(out) == ["initial_adapter"]  # nothing was saved either: the check comes first
    (users / "data.bin").unlink()
    lorafa.save_adapter(pm, out, save_initial=True)  # empty now: it takes the initial adapter
    assert is_initial_adapter(users)
    lorafa.save_adapter(pm, out, save_initial=True)  # and a previous one is replaced
    assert is_initial_adapter(users) and not [n for n in os.listdir(out) if n.startswith(".lorafa")]


def test_compat_final_save_removes_only_its_own_initial_adapter(tmp_path):
    """`save_loraga_model_final` drops the initial checkpoint it wrote, and only lorafa's files of it."""
    from lorafa.compat import save_loraga_model_final

    pm = _init(tmp_path, tmp_path / "run" / "initial_adapter")
    save_loraga_model_final(pm, tmp_path / "run")
    assert not (tmp_path / "run" / "initial_adapter").exists()
    users = tmp_path / "run2" / "initial_adapter"
    users.mkdir(parents=True)
    (users / "keep.txt").write_text("mine")
    save_loraga_model_final(pm, tmp_path / "run2")
    assert (users / "keep.txt").read_text() == "mine"


def test_swap_in_puts_the_old_folder_back_when_the_new_one_cannot_move(tmp_path, monkeypatch):
    """A crash between the two renames leaves the previous folder at the destination, whole."""
    dest, tmp = tmp_path / "dest", tmp_path / "new"
    dest.mkdir()
    (dest / "a").write_text("old")
    tmp.mkdir()
    (tmp / "a").write_text("new")
    real = os.replace
    calls = []

    def flaky(src, dst):
        calls.append((src, dst))
        if len(calls) == 2:
            raise OSError("disk full")
        return real(src, dst)

    monkeypatch.setattr(fsio.os, "replace", flaky)
    with pytest.raises(OSError, match="disk full"):
        fsio.swap_in(str(tmp), dest, lambda p: True, ["a"], "thing")
    assert (dest / "a").read_text() == "old"
    assert sorted(os.listdir(tmp_path)) == ["dest", "new"]


def test_write_atomic_keeps_the_old_file_and_no_temporary_one_when_the_write_fails(tmp_path):
    """The one file writer (results.json, ranks.json, statistics, the learned map, GOAT's record...)."""
    target = tmp_path / "results.json"
    fsio.write_json(target, {"a": 1})

    def half(tmp):
        with open(tmp, "w") as f:
            f.write('{"a": ')
        raise RuntimeError("killed mid-write")

    with pytest.raises(RuntimeError, match="killed"):
        fsio.write_atomic(target, half)
    assert target.read_text() == '{\n  "a": 1\n}' and os.listdir(tmp_path) == ["results.json"]
    assert fsio.write_json(tmp_path / "new" / "x.json", {"p": tmp_path}) == str(tmp_path / "new" / "x.json")
    assert (tmp_path / "new" / "x.json").read_text() == '{\n  "p": "%s"\n}' % tmp_path  # str() for what JSON lacks
