"""Crash safety: a killed training run resumes from its automatic checkpoint and ends bitwise where an
uninterrupted run ends; a kill mid-save leaves no temp file for good; a full disk is a clear error that
keeps the previous file; an unwritable output fails before any work."""

from __future__ import annotations

import errno
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import erasekit
from erasekit._io import load_tensors, save_tensors
from erasekit.cli.main import EXIT_USAGE, main
from erasekit.erase import engine
from erasekit.erase.engine import CHECKPOINT_NAME
from erasekit.errors import OutputWriteError

ESD = dict(steps=20, ddim_steps=4, progress=False)   # default checkpoint_every: every 2 steps
RETAIN = ("a photo of a dog", "a red house", "a tree in winter")
SFD = dict(iterations=3, distill_iterations=2, batch_size=2, forget_batch_size=1, retain_prompts=RETAIN,
           progress=False)


def _equal(a, b) -> bool:
    return a.keys == b.keys and all(torch.equal(a.weights[k], b.weights[k]) for k in a.keys)


def _checkpoints(cache: Path) -> list[Path]:
    return sorted((cache / "runs").glob(f"*/{CHECKPOINT_NAME}"))


def _leftovers(cache: Path) -> list[Path]:
    return sorted(p for p in (cache / "runs").rglob("*") if p.is_file()) if (cache / "runs").exists() else []


class Killed(BaseException):
    """Stands for kill -9 inside the process: nothing after it runs but the ``finally`` blocks."""


@pytest.fixture
def kill_after_saves(monkeypatch):
    """Make the n-th checkpoint save of the next run its last act."""
    def arm(n: int):
        saved = []
        real = engine.Trainer._save_checkpoint

        def save(self, step):
            real(self, step)
            saved.append(step)
            if len(saved) == n:
                monkeypatch.setattr(engine.Trainer, "_save_checkpoint", real)
                raise Killed(step)
        monkeypatch.setattr(engine.Trainer, "_save_checkpoint", save)
        return saved
    return arm


# -- automatic checkpoints and resume -------------------------------------------------------------
def test_default_checkpoints_resume_automatically_and_are_removed_after_success(
        tiny_sd1, erasekit_cache, kill_after_saves):
    straight = erasekit.erase(tiny_sd1, "esd", ["cat"], checkpoint_dir=None, **ESD)
    assert not _checkpoints(erasekit_cache)
    saved = kill_after_saves(2)
    with pytest.raises(Killed):
        erasekit.erase(tiny_sd1, "esd", ["cat"], **ESD)
    assert saved == [2, 4]                              # every 10 % of the 20 steps
    (ckpt,) = _checkpoints(erasekit_cache)              # in the cache, keyed by the run
    assert load_tensors(ckpt)[1]["step"] == "4"
    other = erasekit.erase(tiny_sd1, "esd", ["dog"], **ESD)       # another concept: not this checkpoint
    assert other.manifest["training"]["resumed_from"] is None
    resumed = erasekit.erase(tiny_sd1, "esd", ["cat"], **ESD)
    assert resumed.manifest["training"]["resumed_from"] == 4
    assert _equal(resumed, straight)
    assert _leftovers(erasekit_cache) == []             # deleted once the run succeeded


def test_checkpoint_dir_none_writes_nothing(tiny_sd1, erasekit_cache, monkeypatch):
    writes = []
    monkeypatch.setattr(engine, "save_tensors", lambda path, *a, **k: writes.append(path))
    erasekit.erase(tiny_sd1, "esd", ["cat"], checkpoint_dir=None, checkpoint_every=1, **{**ESD, "steps": 3})
    assert writes == []
    erasekit.erase(tiny_sd1, "esd", ["cat"], checkpoint_every=1, **{**ESD, "steps": 3})
    assert len(writes) == 3 and writes[0].parent.parent == erasekit_cache / "runs"   # the default: auto


def test_sfd_killed_in_stage_two_keeps_stage_one_and_resumes_both(tiny_sd1, erasekit_cache, kill_after_saves):
    straight = erasekit.erase(tiny_sd1, "sfd", ["cat"], checkpoint_dir=None, **SFD)
    saved = kill_after_saves(4)   # stage 1 saves after each of its 2 iterations, stage 2 after its 2nd
    with pytest.raises(Killed):
        erasekit.erase(tiny_sd1, "sfd", ["cat"], checkpoint_every=1, **SFD)
    assert saved == [1, 2, 1, 2] and len(_checkpoints(erasekit_cache)) == 2
    calls = []
    real = engine.Trainer.run
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(engine.Trainer, "run", lambda self, fn, desc="train": real(
            self, lambda step: calls.append(step) or fn(step), desc))
        resumed = erasekit.erase(tiny_sd1, "sfd", ["cat"], checkpoint_every=1, **SFD)
    assert calls == [2]        # stage 1 was finished; stage 2 went on from its checkpoint
    assert resumed.manifest["resumed_from"] == 2 and _equal(resumed, straight)
    assert _leftovers(erasekit_cache) == []


SALUN = dict(steps=6, images_per_prompt=1, retain_images_per_prompt=1, data_steps=2, batch_size=4, pseudo="Dogs",
             retain_prompts=["a tree", "a house"], progress=False)
ADVUNLEARN = dict(steps=6, warmup=1, attack_steps=2, retain=["a photo of a cat", "a photo of a dog"], retain_batch=2,
                  pool_size=2, ddim_steps=4, prompts="concept", attack_init="latest", attack_every=2, progress=False)


@pytest.mark.parametrize("method, concepts, options", [("salun", ["Cats"], SALUN),
                                                       ("advunlearn", ["Van Gogh"], ADVUNLEARN)])
def test_salun_and_advunlearn_resume_exactly(tiny_sd1, erasekit_cache, kill_after_saves, method, concepts, options):
    """AdvUnlearn's inner attack state (the latest delta, reused by attack_init='latest') travels too."""
    straight = erasekit.erase(tiny_sd1, method, concepts, checkpoint_dir=None, **options)
    kill_after_saves(3)
    with pytest.raises(Killed):
        erasekit.erase(tiny_sd1, method, concepts, checkpoint_every=1, **options)
    resumed = erasekit.erase(tiny_sd1, method, concepts, checkpoint_every=1, **options)
    assert resumed.manifest["training"]["resumed_from"] == 3 and _equal(resumed, straight)
    assert resumed.manifest.get("attacks") == straight.manifest.get("attacks")
    assert _leftovers(erasekit_cache) == []


# -- kill -9 through the CLI ------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory, clip_tokenizer_dir):
    from conftest import build_tiny

    path = tmp_path_factory.mktemp("crash") / "tiny-sd1"
    build_tiny("sd1", clip_tokenizer_dir).save_pretrained(path)
    return path


def _erase_cmd(model: Path, out: Path) -> list[str]:
    return [sys.executable, "-m", "erasekit.cli.main", "--quiet", "erase", "--model", str(model), "--method", "esd",
            "--concept", "cat", "-o", "steps=30", "-o", "ddim_steps=4", "-o", "checkpoint_every=1", "--out", str(out)]


def _env(cache: Path) -> dict:
    return {**os.environ, "ERASEKIT_CACHE": str(cache), "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


def test_kill_9_through_the_cli_resumes_to_the_uninterrupted_edit(tiny_model_dir, tmp_path):
    straight = tmp_path / "straight.safetensors"   # the uninterrupted run, alongside (its own cache)
    uninterrupted = subprocess.Popen(_erase_cmd(tiny_model_dir, straight), env=_env(tmp_path / "cache-a"),
                                     stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    cache, out = tmp_path / "cache-b", tmp_path / "resumed.safetensors"
    proc = subprocess.Popen(_erase_cmd(tiny_model_dir, out), env=_env(cache),
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 240
    while not _checkpoints(cache) and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    assert proc.wait(timeout=60) == -signal.SIGKILL and not out.exists(), "the run ended before it was killed"
    (ckpt,) = _checkpoints(cache)
    killed_at = int(load_tensors(ckpt)[1]["step"])
    assert 1 <= killed_at < 30

    res = subprocess.run(_erase_cmd(tiny_model_dir, out), env=_env(cache), capture_output=True, text=True,
                         timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    assert uninterrupted.wait(timeout=300) == 0, uninterrupted.stderr.read()[-2000:]
    a, b = erasekit.Edit.load(straight), erasekit.Edit.load(out)
    assert b.manifest["training"]["resumed_from"] >= killed_at
    assert a.manifest["training"]["resumed_from"] is None
    assert a.keys == b.keys and all(torch.equal(a.weights[k], b.weights[k]) for k in a.keys)
    assert _leftovers(cache) == []   # checkpoint deleted after success, no temp file left behind


# -- temp files, full disk, unwritable output -------------------------------------------------------
_SLOW_SAVE = """
import sys, time, torch, safetensors.torch as st
from erasekit._io import save_tensors
def stuck(tensors, path, metadata=None):
    open(path, "wb").write(b"half a file")
    time.sleep(600)
st.save_file = stuck
save_tensors(sys.argv[1], {"w": torch.zeros(3)})
"""


def test_a_kill_mid_save_leaves_a_temp_that_the_next_save_sweeps(tmp_path):
    target = tmp_path / "x.safetensors"
    save_tensors(target, {"w": torch.ones(3)})
    proc = subprocess.Popen([sys.executable, "-c", _SLOW_SAVE, str(target)], env=_env(tmp_path))
    deadline = time.monotonic() + 120
    temps = []
    while not temps and proc.poll() is None and time.monotonic() < deadline:
        temps = [p for p in tmp_path.iterdir() if p.name.endswith(".tmp") and p.stat().st_size]
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)
    assert len(temps) == 1 and temps[0].exists()        # what kill -9 leaves behind
    assert torch.equal(load_tensors(target)[0]["w"], torch.ones(3))
    foreign = tmp_path / ".x.safetensors.123@0badc0de.abc.tmp"   # another host's, fresh: maybe in use
    foreign.write_bytes(b"")
    ours = tmp_path / f".x.safetensors.{os.getpid()}@{temps[0].name.split('@')[1]}"  # a live writer's
    ours.write_bytes(b"")
    save_tensors(target, {"w": torch.full((3,), 2.0)})
    assert not temps[0].exists() and foreign.exists() and ours.exists()
    old = time.time() - 3 * 24 * 3600
    os.utime(foreign, (old, old))
    save_tensors(target, {"w": torch.full((3,), 3.0)})
    assert not foreign.exists() and ours.exists()
    assert torch.equal(load_tensors(target)[0]["w"], torch.full((3,), 3.0))


def _disk_full(monkeypatch):
    import safetensors.torch as st

    def full(tensors, path, metadata=None):
        Path(path).write_bytes(b"partial")
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(st, "save_file", full)


def test_disk_full_is_a_clear_error_and_keeps_the_previous_file(tmp_path, monkeypatch):
    target = tmp_path / "x.safetensors"
    save_tensors(target, {"w": torch.ones(3)})
    _disk_full(monkeypatch)
    with pytest.raises(OutputWriteError, match="disk is full") as info:
        save_tensors(target, {"w": torch.zeros(3)})
    assert str(target) in str(info.value)
    monkeypatch.undo()
    assert torch.equal(load_tensors(target)[0]["w"], torch.ones(3))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x.safetensors"]   # no temp left


def test_disk_full_in_the_cli_exits_2_and_keeps_the_previous_edit(tiny_model_dir, tmp_path, monkeypatch, capsys):
    out = tmp_path / "edit.safetensors"
    out.write_bytes(b"the previous Edit")
    _disk_full(monkeypatch)
    code = main(["erase", "--model", str(tiny_model_dir), "--method", "esd", "--concept", "cat", "-o", "steps=1",
                 "-o", "ddim_steps=2", "-o", "checkpoint_dir=none", "-o", "progress=false", "--out", str(out),
                 "--overwrite"])
    err = capsys.readouterr().err
    assert code == EXIT_USAGE
    errors = [line for line in err.splitlines() if line.startswith("erasekit: error: ")]
    assert len(errors) == 1 and "disk is full" in errors[0] and "Traceback" not in err
    assert out.read_bytes() == b"the previous Edit" and sorted(p.name for p in tmp_path.iterdir()) == [out.name]


@pytest.mark.parametrize("where", ["file-as-folder", "folder-as-file"])
def test_unwritable_output_fails_before_any_work(tiny_model_dir, tmp_path, monkeypatch, capsys, where):
    import erasekit.cli.commands as commands

    blocker = tmp_path / "a-file"
    blocker.write_text("")
    out = blocker / "edit.safetensors" if where == "file-as-folder" else tmp_path
    monkeypatch.setattr(commands, "_load_pipe", lambda *a, **k: pytest.fail("the model was loaded"))
    code = main(["erase", "--model", str(tiny_model_dir), "--method", "esd", "--concept", "cat",
                 "--out", str(out), "--overwrite"])
    err = capsys.readouterr().err
    assert code == EXIT_USAGE and f"cannot write {out}" in err and "Traceback" not in err
