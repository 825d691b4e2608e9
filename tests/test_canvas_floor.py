"""benchmarks/canvas_floor.py: the lower bound on the canvas block's wall time adds the right work."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def canvas_floor():
    spec = importlib.util.spec_from_file_location("canvas_floor", ROOT / "benchmarks" / "canvas_floor.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _cell(method: str, erase: float, attacks: dict) -> dict:
    return {"method": method, "erase_wall_s": erase,
            "attacks_by_k": {k: {"attack_unet_equiv_mean": equiv, "attack_outcomes": [[0, 0, None]] * n,
                                 "attack_wall_s": wall} for k, (equiv, n, wall) in attacks.items()}}


def test_floor_counts_protocol_passes_attack_equivalents_and_recorded_parts(canvas_floor):
    results = {"protocol": "canvas", "jobs": {
        "original": {"wall_s": 100.0},
        "cell/uce/Cats": _cell("uce", 2.0, {"3": (1000.0, 10, 50.0), "5": (600.0, 10, 40.0)}),
        "cell/sfd/Cats": _cell("sfd", 300.0, {"3": (800.0, 10, 30.0), "5": (400.0, 10, 20.0)})}}
    s = 0.004  # seconds per latent
    every = canvas_floor.floor(results, s, workers=2)
    # canvas: 500 images; UCE samples DDIM 25 with two guidance branches, SFD's Edit one pass per image
    assert every["unet_passes"] == 500 * 25 * 2 + 500
    assert every["attack_unet_equiv"] == 10 * (1000 + 600 + 800 + 400)
    assert every["parts_core_s"] == pytest.approx({"evaluation_sampling": 25_500 * s, "attacks": 28_000 * s,
                                                   "erasure": 302.0, "other_jobs": 100.0}, abs=0.1)
    assert every["attacks_recorded_core_s"] == pytest.approx(140.0)
    assert every["floor_wall_s"] == pytest.approx(every["core_s"] / 2, abs=0.1)
    first = canvas_floor.floor(results, s, workers=2, attack_ks=lambda m: ["3"])
    assert first["attack_unet_equiv"] == 10 * (1000 + 800)
    mixed = canvas_floor.floor(results, s, workers=2, attack_ks=lambda m: ["3", "5"] if m == "uce" else ["3"])
    assert mixed["attack_unet_equiv"] == 10 * (1000 + 600 + 800)
    assert first["core_s"] < mixed["core_s"] < every["core_s"]


def test_committed_canvas_block_is_the_work_the_floor_describes(canvas_floor):
    """The committed canvas run holds 12 methods x 8 cells, attacked at k = 3 and 5 on 10 prompts each."""
    results = json.loads((ROOT / "benchmarks" / "tables" / "cpu-canvas.json").read_text())
    f = canvas_floor.floor(results, 0.004, workers=2)
    assert f["cells"] == 96
    assert f["unet_passes"] == 88 * 25_000 + 8 * 500
    assert all(len(a["attack_outcomes"]) == 10 for j in results["jobs"].values()
               for a in (j.get("attacks_by_k") or {}).values())
