"""The ``erasekit`` CLI: help for every subcommand, ``methods`` listing, one-line errors with exit
codes that mean something, and a real ``erase`` run on a tiny pipeline saved to disk."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from erasekit.cli.main import EXIT_FAILURE, EXIT_OK, EXIT_USAGE, main
from erasekit.errors import ConfigError

SUBCOMMANDS = ["erase", "attack", "eval", "demo", "preview", "bench", "methods", "env"]


def run(capsys, *argv) -> tuple[int, str, str]:
    capsys.readouterr()  # drop what the test itself printed
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def assert_one_line_error(err: str, *needles: str) -> None:
    """The error is one line, the last on stderr (after any "loading ..." progress), no traceback."""
    lines = [line for line in err.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("erasekit: error: ")]
    assert len(errors) == 1 and lines[-1] == errors[0], err
    assert "Traceback" not in err
    for needle in needles:
        assert needle in errors[0], (needle, err)


@pytest.fixture(scope="module")
def tiny_dirs(tmp_path_factory, clip_tokenizer_dir):
    """A tiny SD-1 pipeline saved to disk, and a second one with other weights (same architecture)."""
    from conftest import build_tiny

    root = tmp_path_factory.mktemp("cli")
    a = build_tiny("sd1", clip_tokenizer_dir)
    a.save_pretrained(root / "a")
    with torch.no_grad():
        for p in a.unet.parameters():
            p.add_(0.5 * torch.randn_like(p))
    a.save_pretrained(root / "b")
    return root / "a", root / "b"


@pytest.mark.parametrize("command", SUBCOMMANDS)
def test_every_subcommand_has_help_with_examples(capsys, command):
    code, out, _ = run(capsys, command, "--help")
    assert code == EXIT_OK
    assert out.startswith(f"usage: erasekit {command}")
    assert "example" in out and f"erasekit {command}" in out.split("example", 1)[1]
    assert "--quiet" in out and "--json" in out and "--debug" in out


def test_top_level_help_lists_every_subcommand(capsys):
    code, out, _ = run(capsys, "--help")
    assert code == EXIT_OK
    assert all(c in out for c in SUBCOMMANDS)
    assert "exit codes" in out
    assert run(capsys)[0] == EXIT_USAGE  # no command: help and a usage exit code


def test_erase_help_lists_method_options_from_their_configs(capsys):
    from erasekit.erase.registry import get_method

    _, out, _ = run(capsys, "erase", "--help")
    for name, default, _help in get_method("uce")[0].options():
        assert f"{name} (default {default!r})" in out


def test_methods_lists_registered_methods_and_options(capsys):
    from erasekit.erase.registry import _MODULES, get_method

    code, out, _ = run(capsys, "methods", "--json")
    assert code == EXIT_OK
    listed = json.loads(out)["methods"]
    assert set(listed) == set(_MODULES)
    for name in ("uce", "rece"):
        assert listed[name]["available"]
        assert [o["name"] for o in listed[name]["options"]] == [o[0] for o in get_method(name)[0].options()]
    code, out, _ = run(capsys, "methods", "rece")
    assert code == EXIT_OK and out.startswith("rece: ") and "erase_scale" in out


def test_options_take_json_lists_and_comma_lists():
    from erasekit.cli.options import parse_options
    from erasekit.erase.esd import ESDConfig

    got = parse_options(['erase_from=["A Cats image, at dusk.", "B"]', "prompts=x, y", "eta=2"], ESDConfig)
    assert got == {"erase_from": ["A Cats image, at dusk.", "B"], "prompts": ["x", "y"], "eta": 2.0}
    assert parse_options(["erase_from=a hat"], ESDConfig) == {"erase_from": "a hat"}
    with pytest.raises(ConfigError, match="`prompts`"):
        parse_options(['prompts=["x",'], ESDConfig)


def test_env_reports_versions(capsys):
    code, out, _ = run(capsys, "--json", "env")
    data = json.loads(out)
    assert code == EXIT_OK
    assert data["torch"] == torch.__version__.split("+")[0] or data["torch"].startswith(torch.__version__[:4])
    assert {"diffusers", "transformers", "gradio", "assets"} <= set(data)


@pytest.mark.parametrize("argv, needles", [
    (["erase", "--method", "nope", "--concept", "x"], ["unknown method 'nope'", "choose one of"]),
    (["erase", "--method", "uce", "--concept", " "], ["concepts must be a non-empty", "e.g."]),
    (["erase", "--method", "uce", "--concept", "x", "-o", "nope=1"], ["no option 'nope'", "valid options"]),
    (["erase", "--method", "uce", "--concept", "x", "-o", "erase_scale=big"], ["erase_scale", "float", "'big'"]),
    (["erase", "--method", "uce", "--concept", "x", "-o", "erase_scale"], ["key=value"]),
    (["erase", "--method", "uce"], ["required: --concept", "--help"]),
    (["attack", "--edit", "missing.safetensors", "--prompt", "p"], ["no Edit file at missing.safetensors"]),
    (["attack", "--concept", "nudity"], ["no prompts", "--prompt", "canvas-mini's styles and objects"]),
    (["attack", "--concept", "Van_Gogh", "--prompts-file", "nope.txt"], ["nope.txt does not exist"]),
    (["attack", "--concept", "Van_Gogh", "--prompt", "p", "--attack", "zap"], ["unknown attack method 'zap'"]),
    (["frobnicate"], ["invalid choice", "--help"]),
    (["demo", "--concept", "Picasso"], ["not 'Picasso'", "Van_Gogh"]),
    (["bench", "nope"], ["unknown benchmark 'nope'", "choose from"]),
])
def test_bad_input_exits_2_with_one_line(capsys, argv, needles):
    code, out, err = run(capsys, *argv)
    assert code == EXIT_USAGE
    assert out == ""
    assert_one_line_error(err, *needles)


def test_bench_lists_the_benchmark_scripts(capsys):
    from pathlib import Path

    code, out, _ = run(capsys, "bench", "--list", "--json")
    scripts = sorted(p.stem.removeprefix("bench_") for p in (Path(__file__).parents[1] / "benchmarks").glob("*.py")
                     if not p.name.startswith("_"))
    assert code == EXIT_OK and json.loads(out)["benchmarks"] == scripts


def test_edit_for_another_model_is_refused(capsys, tiny_dirs, tmp_path):
    from erasekit.pipelines import Edit, load_pipeline

    a_dir, b_dir = tiny_dirs
    pipe = load_pipeline(a_dir)
    key = "unet/down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k.weight"
    path = Edit.from_weights(pipe, {key: torch.zeros_like(pipe.unet.get_parameter(key[5:]))},
                             {"method": "test", "concepts": ["Van_Gogh"]}).save(tmp_path / "e.safetensors")
    code, _, err = run(capsys, "attack", "--edit", str(path), "--model", str(b_dir), "--prompt", "p")
    assert code == EXIT_USAGE
    assert_one_line_error(err, "different base model", "load it onto the pipeline it was made from")


def test_erase_writes_an_edit_and_reports_it(capsys, tiny_dirs, tmp_path):
    from erasekit.pipelines import Edit, load_pipeline

    a_dir, _ = tiny_dirs
    out_file = tmp_path / "vg.safetensors"
    argv = ["erase", "--method", "uce", "--concept", "Van Gogh", "--model", str(a_dir), "--out", str(out_file),
            "-o", "erase_scale=2", "--json"]
    code, out, _ = run(capsys, *argv)
    assert code == EXIT_OK
    data = json.loads(out)
    assert data["edit"] == str(out_file) and data["method"] == "uce" and data["concepts"] == ["Van Gogh"]
    assert data["config"]["erase_scale"] == 2.0
    edit = Edit.load(out_file, pipe=load_pipeline(a_dir))
    assert edit.manifest["base_model"] == str(a_dir) and edit.nbytes() == data["bytes"] > 0
    code, _, err = run(capsys, *argv)  # the file exists now: refused unless --overwrite
    assert code == EXIT_USAGE
    assert_one_line_error(err, "already exists", "--overwrite")
    code, out, err = run(capsys, *argv[:-1], "--overwrite", "--quiet")
    assert code == EXIT_OK and out == "" and err == ""


def test_unexpected_failures_exit_1_and_debug_shows_the_traceback(capsys, monkeypatch):
    import erasekit.cli.main as cli

    def boom(args, out):
        raise RuntimeError("disk on fire")

    monkeypatch.setattr(cli, "cmd_env", boom)
    code, _, err = run(capsys, "env")
    assert code == EXIT_FAILURE
    assert_one_line_error(err, "RuntimeError: disk on fire", "--debug")
    code, _, err = run(capsys, "env", "--debug")
    assert code == EXIT_FAILURE and "Traceback" in err and "disk on fire" in err


def test_console_process_exit_code_and_stderr():
    proc = subprocess.run([sys.executable, "-m", "erasekit.cli.main", "erase", "--method", "nope", "--concept", "x"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == EXIT_USAGE
    assert proc.stdout == ""
    assert_one_line_error(proc.stderr, "unknown method 'nope'")
