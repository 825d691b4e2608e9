"""Every example of the README runs as written.

The code blocks are read from README.md itself, so an example that is edited there is the example
that is tested: the CLI block line by line in one folder (later lines use the files of earlier
ones), the Python API block as a script, the demo, and the scale-out block under two CPU processes.
The install lines are covered by the wheel test and by CI itself, which runs command 2.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"


def _blocks(section: str, lang: str) -> list[str]:
    text = README.read_text()
    parts = re.split(r"^## ", text, flags=re.M)
    body = next((p for p in parts if p.startswith(section + "\n")), None)
    assert body is not None, f"README has no section {section!r}"
    return re.findall(rf"```{lang}\n(.*?)```", body, flags=re.S)


def _commands(section: str) -> list[str]:
    lines = []
    for block in _blocks(section, "bash"):
        lines += [ln.split("  #", 1)[0].strip() for ln in block.splitlines() if ln.strip() and not ln.startswith("#")]
    return lines


def _env() -> dict:
    env = dict(os.environ, TQDM_DISABLE="1", OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    env["PATH"] = str(Path(sys.executable).parent) + os.pathsep + env.get("PATH", "")
    return env


def _run(command: str, cwd: Path, timeout: int = 900) -> subprocess.CompletedProcess:
    argv = shlex.split(command)
    exe = shutil.which(argv[0], path=_env()["PATH"])
    assert exe, f"{argv[0]} is not installed in this environment"
    done = subprocess.run([exe, *argv[1:]], cwd=cwd, env=_env(), capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, f"README example failed (exit {done.returncode}): {command}\n{done.stderr[-3000:]}"
    return done


def test_readme_is_a_short_user_guide():
    text = README.read_text()
    assert len(text.splitlines()) <= 250
    for needed in ("## Install", "## The metrics", "## The Python API", "## The CLI", "## Methods", "## Scale-out"):
        assert needed in text, needed
    for word in ("previous", "the issue", "earlier session"):
        assert word not in text.lower(), f"README speaks of history: {word!r}"


def test_readme_links_point_to_files():
    text = README.read_text()
    for target in re.findall(r"\]\(([^)#]+)(?:#[^)]*)?\)", text):
        if target.startswith("http"):
            continue
        assert (ROOT / target).exists(), f"README links to {target}, which does not exist"


# The attack and the evaluation take minutes on 2 cores, the two exports about 18 s: the default suite runs the
# other lines of the CLI block, the slow one every line in order (tests/test_export.py::test_cli_export checks
# the export command in the default suite, in process).
_LONG = ("erasekit attack", "erasekit eval", "erasekit export")


def test_quick_cli_examples_run_as_written(tmp_path):
    commands = [c for c in _commands("The CLI") if not c.startswith(_LONG)]
    assert any(c.startswith("erasekit erase") for c in commands)
    for command in commands:
        _run(command, tmp_path)
    assert (tmp_path / "van_gogh.safetensors").is_file()


@pytest.mark.slow
def test_every_cli_example_runs_as_written(tmp_path):
    commands = _commands("The CLI")
    assert any(c.startswith("erasekit attack") for c in commands) and any(c.startswith("erasekit eval") for c in commands)
    for command in commands:
        _run(command, tmp_path)
    assert (tmp_path / "attack" / "attack.json").is_file()
    assert (tmp_path / "report" / "report.json").is_file()


@pytest.mark.slow
def test_python_api_example_runs_as_written(tmp_path):
    (code,) = _blocks("The Python API", "python")
    script = tmp_path / "example.py"
    script.write_text(code)
    done = subprocess.run([sys.executable, str(script)], cwd=tmp_path, env=_env(), capture_output=True, text=True,
                          timeout=1800)
    assert done.returncode == 0, done.stderr[-3000:]
    assert (tmp_path / "van_gogh.rece.safetensors").is_file()


@pytest.mark.slow
def test_demo_runs_as_written(tmp_path):
    (block,) = _blocks("The two commands", "bash")
    assert "erasekit demo" in block
    _run("erasekit demo", tmp_path)
    assert (tmp_path / "erasekit-demo" / "report" / "report.md").is_file()


@pytest.mark.slow
def test_scale_out_examples_run_with_two_cpu_processes(tmp_path):
    commands = _commands("Scale-out")
    assert len(commands) == 2 and all(c.startswith("accelerate launch") for c in commands)
    for command in commands:
        # the README's command on a machine without GPUs: accelerate's --cpu flag, as the README says
        _run(command.replace("accelerate launch", "accelerate launch --cpu", 1), tmp_path, timeout=1800)
    assert (tmp_path / "vg_esd.safetensors").is_file()
    assert (tmp_path / "vg_report" / "report.json").is_file()
