"""``erasekit attack`` and ``erasekit eval`` outputs: checked before any work (an existing result is
refused without --overwrite, an unwritable folder fails in a second), replaced atomically with
--overwrite, and a full disk is a one-line error (exit 2) that leaves the previous file intact."""

from __future__ import annotations

import errno
import json
import pathlib

import pytest

import erasekit.cli.commands as commands
from erasekit.cli.main import EXIT_OK, EXIT_USAGE, main

from _eval_helpers import ColourJudge, PaintPipe, tiny_protocol

RESULT = {"attack": "attack.json", "eval": "report.json"}


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory, clip_tokenizer_dir):
    from conftest import build_tiny

    path = tmp_path_factory.mktemp("outputs") / "tiny"
    build_tiny("sd1", clip_tokenizer_dir).save_pretrained(path)
    return path


@pytest.fixture
def loads(monkeypatch):
    """Records every model load; ``eval`` runs the real evaluate() on a stand-in painter (cheap)."""
    from erasekit.eval import evaluation

    calls = []
    real_load, real_evaluate = commands._load_pipe, evaluation.evaluate

    def load(args, out, manifest=None):
        calls.append(args.command)
        return (PaintPipe(), "paint") if args.command == "eval" else real_load(args, out, manifest)

    def evaluate(pipe, out_dir=None, progress=False, **_):
        return real_evaluate(pipe, protocol=tiny_protocol(), judge=ColourJudge(), targets=["Cubism"], fid=False,
                                   clip=False, cache_dir=None, progress=False, out_dir=out_dir)

    monkeypatch.setattr(commands, "_load_pipe", load)
    monkeypatch.setattr(evaluation, "evaluate", evaluate)
    monkeypatch.setattr("erasekit.eval.evaluate", evaluate)
    return calls


def _argv(command, tiny_model, out) -> list[str]:
    if command == "attack":
        return ["attack", "--model", str(tiny_model), "--concept", "Van_Gogh", "--prompt", "a cat", "--attack", "none",
                "--out", str(out), "-q"]
    return ["eval", "--out", str(out), "-q"]


def _run(capsys, argv) -> tuple[int, str]:
    capsys.readouterr()
    code = main(argv)
    return code, capsys.readouterr().err


def _one_line(err: str, *needles: str) -> None:
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("erasekit: error: "), err
    assert all(n in lines[0] for n in needles), (needles, err)


@pytest.mark.parametrize("command", ["attack", "eval"])
def test_existing_result_needs_overwrite_and_is_replaced_atomically(capsys, loads, tiny_model, tmp_path, command):
    out = tmp_path / "out"
    out.mkdir()
    (out / RESULT[command]).write_text("old")
    code, err = _run(capsys, _argv(command, tiny_model, out))
    assert code == EXIT_USAGE and loads == []          # refused before the model is loaded
    _one_line(err, str(out / RESULT[command]), "already exists", "--overwrite")
    assert (out / RESULT[command]).read_text() == "old"
    code, err = _run(capsys, _argv(command, tiny_model, out) + ["--overwrite"])
    assert code == EXIT_OK, err
    assert loads == [command] and json.loads((out / RESULT[command]).read_text())   # a whole new result
    assert not [p for p in out.rglob("*") if p.name.endswith(".tmp")]


@pytest.mark.parametrize("command", ["attack", "eval"])
def test_unwritable_output_fails_before_any_work(capsys, loads, tiny_model, tmp_path, command):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    code, err = _run(capsys, _argv(command, tiny_model, blocker / "out"))
    assert code == EXIT_USAGE and loads == []
    _one_line(err, "cannot write", "is a file, not a folder")


@pytest.mark.parametrize("command", ["attack", "eval"])
def test_full_disk_is_a_clear_error_and_keeps_the_previous_result(capsys, loads, tiny_model, tmp_path, monkeypatch,
                                                                   command):
    out = tmp_path / "out"
    out.mkdir()
    (out / RESULT[command]).write_text("old")
    real_write = pathlib.Path.write_text

    def full_disk(self, text, *a, **k):
        if self.name.startswith(f".{RESULT[command]}."):   # the temporary file of the result
            real_write(self, text[: len(text) // 2], *a, **k)
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_write(self, text, *a, **k)

    monkeypatch.setattr(pathlib.Path, "write_text", full_disk)
    code, err = _run(capsys, _argv(command, tiny_model, out) + ["--overwrite"])
    assert code == EXIT_USAGE
    _one_line(err, "cannot write", RESULT[command], "disk is full", "unchanged")
    assert (out / RESULT[command]).read_text() == "old"
    assert not [p for p in out.rglob("*") if p.name.endswith(".tmp")]
