"""Failure paths that a one-line bug would silence while the rest of the suite still passes:
``save_tensors`` writes atomically, ``erasekit bench`` exits non-zero when a benchmark fails."""

from __future__ import annotations

import errno
import json
from pathlib import Path

import pytest
import torch


def test_save_tensors_replaces_the_file_atomically(tmp_path, monkeypatch):
    """The old file stays whole while the new one is written, and after a write that dies half-way;
    no temporary file is left behind."""
    import safetensors.torch

    from erasekit._io import load_tensors, save_tensors

    path = tmp_path / "edit.safetensors"
    save_tensors(path, {"w": torch.ones(3)}, {"format": "old"})
    real_save, targets = safetensors.torch.save_file, []

    def save_while_checking(tensors, filename, metadata=None):
        targets.append(Path(filename))
        assert load_tensors(path)[1] == {"format": "old"}   # the old file is intact during the write
        real_save(tensors, filename, metadata=metadata)

    monkeypatch.setattr(safetensors.torch, "save_file", save_while_checking)
    save_tensors(path, {"w": torch.full((3,), 2.0)}, {"format": "new"})
    tensors, meta = load_tensors(path)
    assert torch.equal(tensors["w"], torch.full((3,), 2.0)) and meta == {"format": "new"}
    assert targets[0].parent == path.parent and targets[0] != path

    def die_half_way(tensors, filename, metadata=None):
        Path(filename).write_bytes(b"\x08\x00\x00")         # a few bytes, then the disk is full
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(safetensors.torch, "save_file", die_half_way)
    with pytest.raises(OSError):
        save_tensors(path, {"w": torch.zeros(3)}, {"format": "broken"})
    tensors, meta = load_tensors(path)
    assert torch.equal(tensors["w"], torch.full((3,), 2.0)) and meta == {"format": "new"}
    assert [p.name for p in tmp_path.iterdir()] == ["edit.safetensors"]


def test_bench_exits_non_zero_when_a_benchmark_fails(capsys, monkeypatch):
    import subprocess

    from erasekit.cli.main import EXIT_OK, main

    capsys.readouterr()
    code = main(["bench", "eval", "--json", "--", "--no-such-flag"])   # the script's argparse exits 2
    out = capsys.readouterr().out
    assert code != EXIT_OK and json.loads(out)["returncodes"] == {"eval": 2}

    def call(cmd, *args, **kwargs):   # one benchmark fails, the other succeeds
        return 3 if Path(cmd[1]).name == "bench_closed_form.py" else 0

    monkeypatch.setattr(subprocess, "call", call)
    code = main(["bench", "closed_form", "eval", "--json"])
    out = capsys.readouterr().out
    assert code != EXIT_OK and json.loads(out)["returncodes"] == {"closed_form": 3, "eval": 0}
    assert main(["bench", "eval", "--json"]) == EXIT_OK
