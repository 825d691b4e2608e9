"""The built wheel carries canvas-mini, its judge and its CLIP, and works outside the checkout.

The wheel is built from a copy of the package (so nothing is written into the checkout) and
installed with ``--no-deps`` into a fresh venv whose only other packages are the test venv's (a
``.pth`` file points at its site-packages; the test venv's editable erasekit is not on that path
as an import hook, so ``import erasekit`` can only find the installed wheel). Every command then
runs from a temporary folder outside the checkout, without PYTHONPATH.
"""

from __future__ import annotations

import json
import os
import shutil
import site
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
ASSETS = ROOT / "erasekit" / "assets"


def _run(cmd, cwd=None, check=True, timeout=600) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV")}
    proc = subprocess.run([str(c) for c in cmd], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(map(str, cmd))} exited {proc.returncode}:\n{proc.stdout[-3000:]}\n"
                             f"{proc.stderr[-3000:]}")
    return proc


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    """(wheel, venv python, venv site-packages, a working folder outside the checkout)."""
    tmp = tmp_path_factory.mktemp("wheel")
    src = tmp / "src"
    shutil.copytree(ROOT / "erasekit", src / "erasekit", ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src / name)
    _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", tmp / "dist", src])
    (wheel,) = (tmp / "dist").glob("erasekit-*.whl")

    venv = tmp / "venv"
    _run([sys.executable, "-m", "venv", "--without-pip", venv])
    python = venv / ("Scripts" if os.name == "nt" else "bin") / "python"
    purelib = Path(_run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"]).stdout.strip())
    (purelib / "_erasekit_test_venv.pth").write_text("\n".join(site.getsitepackages()) + "\n")
    _run([python, "-m", "pip", "install", "--no-deps", "--no-index", "-q", wheel])
    outside = tmp / "outside"
    outside.mkdir()
    return wheel, python, purelib, outside


def test_the_wheel_holds_every_shipped_asset_file(installed):
    wheel = installed[0]
    names = set(zipfile.ZipFile(wheel).namelist())
    shipped = {p.relative_to(ROOT).as_posix() for p in ASSETS.rglob("*") if p.is_file()}
    assert {"erasekit/assets/canvas-mini/model_index.json", "erasekit/assets/canvas-judge/model.safetensors",
            "erasekit/assets/canvas-clip/model.safetensors",
            "erasekit/assets/canvas-mini-mmdit/transformer/diffusion_pytorch_model.safetensors"} <= shipped
    assert shipped <= names, f"missing from the wheel: {sorted(shipped - names)}"
    assert not any(n.startswith(("tests/", "benchmarks/")) for n in names)


# About 22 s (a cold interpreter importing torch and diffusers from the fresh environment): in the slow suite,
# so the default suite keeps its 10-minute budget; the next test checks in the default suite that the
# installed CLI finds every shipped asset.
@pytest.mark.slow
def test_installed_wheel_loads_canvas_mini_judge_and_clip_outside_the_checkout(installed):
    _, python, purelib, outside = installed
    script = (
        "import json, erasekit\n"
        "from erasekit.eval.clip_score import load_canvas_clip\n"
        "from erasekit.eval.judges import CanvasJudge\n"
        "pipe = erasekit.load_pipeline('canvas-mini')\n"
        "judge, clip = CanvasJudge.load(), load_canvas_clip()\n"
        "print(json.dumps({'erasekit': erasekit.__file__, 'pipeline': type(pipe).__name__,\n"
        "                  'pipe_path': str(pipe.config._name_or_path), 'unet_size': pipe.unet.config.sample_size,\n"
        "                  'judge': judge.source, 'styles': len(judge.heads['style']), 'clip': clip.source}))\n")
    out = json.loads(_run([python, "-c", script], cwd=outside).stdout.strip().splitlines()[-1])
    installed_pkg = (purelib / "erasekit").resolve()
    for key in ("erasekit", "pipe_path", "judge", "clip"):
        path = Path(out[key]).resolve()
        assert path.is_relative_to(installed_pkg) and not path.is_relative_to(ROOT), (key, path)
    assert out["pipeline"] == "StableDiffusionPipeline"
    assert out["unet_size"] == json.loads((ASSETS / "canvas-mini/unet/config.json").read_text())["sample_size"]
    assert out["styles"] == len(json.loads((ASSETS / "canvas-judge/config.json").read_text())["styles"])


def test_installed_cli_finds_its_assets_and_bench_says_it_needs_a_checkout(installed):
    _, python, _, outside = installed
    erasekit_cli = python.parent / "erasekit"
    env = json.loads(_run([erasekit_cli, "env", "--json"], cwd=outside).stdout)
    assert env["assets"] == {"canvas-mini": True, "canvas-judge": True, "canvas-clip": True,
                             "canvas-mini-mmdit": True}
    bench = _run([erasekit_cli, "bench", "--list"], cwd=outside, check=False)
    assert bench.returncode == 2, bench.stdout + bench.stderr
    assert "source checkout" in bench.stderr and "pip install -e ." in bench.stderr


@pytest.mark.slow
def test_installed_wheel_runs_the_demo_outside_the_checkout(installed):
    """``erasekit demo`` at its smallest (UCE, one attacked prompt): about 100 s of CPU on 2 cores."""
    _, python, _, outside = installed
    proc = _run([python.parent / "erasekit", "demo", "--method", "uce", "--prompts", "1", "--out", "demo",
                 "--quiet", "--json"], cwd=outside, timeout=1200)
    summary = json.loads(proc.stdout)
    assert summary["model"] == "canvas-mini" and summary["method"] == "uce" and summary["attack"]["n"] == 1
    assert (outside / "demo" / "edit.safetensors").stat().st_size > 0
    assert json.loads((outside / "demo" / "summary.json").read_text())["scores"]["images"] > 0
