"""The benchmark page's table (docs/benchmark.md) is what the committed benchmark produces.

Three links of the chain are checked: the table on the benchmark page is exactly the rendering of the
committed results (``benchmarks/tables/cpu.json``), every committed cell ran its method's current
defaults, and one of those results (UCE on Van_Gogh: erase, ``canvas-lite`` evaluation,
UnlearnDiffAtk) comes out again, within the stated tolerance, when the benchmark's own job function
reruns it here.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "tables" / "cpu.json"
BEGIN, END = "<!-- bench_table:begin -->", "<!-- bench_table:end -->"
# canvas-lite has 10 images per label: one image is 10 points of UA, about 1.1 of IRA / CRA; the
# attack has 5 prompts: one prompt is 20 points of ASR
TOLERANCE = {"UA": 10.0, "IRA": 3.4, "CRA": 3.4, "pre_ASR": 20.0, "ASR": 20.0}
FID_RELATIVE = 0.10


@pytest.fixture(scope="module")
def bench():
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        import bench_table
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))
    return bench_table


@pytest.fixture(scope="module")
def committed():
    return json.loads(RESULTS.read_text())


def test_benchmark_page_table_is_the_rendering_of_the_committed_results(bench, committed):
    readme = (ROOT / "docs" / "benchmark.md").read_text()
    assert BEGIN in readme and END in readme, "docs/benchmark.md lacks the benchmark table markers"
    block = readme.split(BEGIN, 1)[1].split(END, 1)[0].strip()
    assert block == bench.render(committed).strip()
    assert committed["format"] == bench.FORMAT


def test_every_job_of_the_full_benchmark_is_in_the_committed_results(bench, committed):
    plan = bench.jobs(bench.METHODS)
    missing = sorted(set(plan) - set(committed["jobs"]))
    assert not missing, f"committed results lack {missing}: rerun python benchmarks/bench_table.py"


def test_committed_cells_ran_the_current_defaults(committed):
    """A method whose defaults changed since the table was measured has stale rows: rerun its jobs."""
    from erasekit.erase.registry import get_method

    # paths, display and checkpoint cadence: how a run is carried out, not what it computes
    local = {"checkpoint_dir", "progress", "generator_init", "checkpoint_every", "resume"}
    stale = {}
    for name, job in committed["jobs"].items():
        if name.startswith("cell/"):
            config_cls, _ = get_method(job["method"])
            want = {**json.loads(json.dumps(config_cls().to_dict())), **job["options"]}
            diff = {k for k in (set(want) | set(job["edit_config"])) - local
                    if want.get(k) != job["edit_config"].get(k)}
            if diff:
                stale[name] = sorted(diff)
    assert not stale, f"results measured with other defaults: {stale}; rerun bench_table.py --methods <method>"


def test_a_committed_cell_is_reproduced(bench, committed, tmp_path):
    import torch

    name = "cell/uce/Van_Gogh"
    want = committed["jobs"][name]
    spec = bench.jobs(["uce"], ["Van_Gogh"], [], [])[name]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)   # as the benchmark's workers
    try:
        got = bench.run_job(name, spec, tmp_path, tmp_path / "cache")
    finally:
        torch.set_num_threads(threads)
    for key, tol in TOLERANCE.items():
        assert abs(got[key] - want[key]) <= tol, f"{key}: {got[key]} now, {want[key]} committed (tolerance {tol})"
    assert math.isclose(got["fid"], want["fid"], rel_tol=FID_RELATIVE)
    # the Edit file as the table shows it (3 significant figures): the tensors are the same bytes, the
    # manifest in the file's header grows when the toolkit records more about a run
    assert bench._size(got["edit_bytes"]) == bench._size(want["edit_bytes"])
