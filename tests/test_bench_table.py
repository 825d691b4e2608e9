"""The benchmark page's table (docs/benchmark.md) is what the committed benchmark produces.

Links of the chain checked: the table on the benchmark page (intervals and claims included) is exactly
the rendering of the committed results (``benchmarks/tables/cpu.json``), its figures carry the hash of
the data derived from them, every committed cell ran the document's settings and its method's current
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


def test_canvas_mini_mmdit_block_is_the_rendering_of_its_committed_results(bench):
    """The page's canvas-mini-mmdit block (SD 3 architecture) is the rendering of
    ``benchmarks/tables/cpu-mmdit.json``, whose cells ran on that model with UnlearnDiffAtk, for at least
    the five methods issue 24 asks for."""
    doc = json.loads(bench.BLOCK_RESULTS["canvas-mini-mmdit"].read_text())
    assert doc["model"] == "canvas-mini-mmdit" and doc["format"] == bench.FORMAT
    begin, end = bench.markers(doc)
    page = (ROOT / "docs" / "benchmark.md").read_text()
    assert begin in page and end in page, "docs/benchmark.md lacks the canvas-mini-mmdit block markers"
    assert page.split(begin, 1)[1].split(end, 1)[0].strip() == bench.render(doc).strip()
    cells = [j for k, j in doc["jobs"].items() if k.startswith("cell/")]
    assert {"uce", "rece", "esd", "salun", "advunlearn"} <= {c["method"] for c in cells}
    for c in cells:
        assert c["preset"]["provider"] == "canvas-mini-mmdit", c["method"]
        assert None not in (c["UA"], c["IRA"], c["CRA"], c["ASR"]), c["method"]


def test_canvas_protocol_block_is_the_rendering_of_its_committed_results(bench):
    """The page's ``canvas`` block is the rendering of ``benchmarks/tables/cpu-canvas.json``: canvas-mini at
    the ``canvas`` protocol (5 seeds), every cell with 10 captions attacked at k = 3 and k = 5 and every
    prompt's outcome kept at both, so that its ASR has at least 40 prompts per method and kind."""
    doc = json.loads(bench.BLOCK_RESULTS["canvas"].read_text())
    assert doc["model"] == bench.MODEL and doc["protocol"] == "canvas" and doc["format"] == bench.FORMAT
    begin, end = bench.markers(doc)
    page = (ROOT / "docs" / "benchmark.md").read_text()
    assert begin in page and end in page, "docs/benchmark.md lacks the canvas block markers"
    assert page.split(begin, 1)[1].split(end, 1)[0].strip() == bench.render(doc).strip()
    cells = [j for k, j in doc["jobs"].items() if k.startswith("cell/")]
    assert cells and doc["jobs"]["original"]["protocol"]["seeds"] == [188, 288, 588, 688, 888]
    for c in cells:
        assert c["settings"] == bench.PRESETS["canvas"], c["job"]
        for k in ("3", "5"):
            assert len(c["attacks_by_k"][k]["attack_outcomes"]) == 10, (c["job"], k)
    for name, styles, objects in bench._method_cells(doc):
        if name != "original":
            assert all(sum(len(c["attack_outcomes"]) for c in kind) >= 40 for kind in (styles, objects)), name


def test_committed_figures_are_drawn_from_the_committed_results(bench, committed):
    """Every figure the page shows is in docs/figures/, and each carries the hash of the data that
    ``bench_table.figure_data`` derives from cpu.json now (redraw: bench_table.py --docs)."""
    from erasekit.eval.plots import data_hash, embedded_hash

    want = bench.figure_data(committed)
    folder = ROOT / "docs" / "figures"
    assert want and sorted(p.name for p in folder.glob("*.svg")) == sorted(want)
    page = (ROOT / "docs" / "benchmark.md").read_text()
    for name, (_, data) in want.items():
        assert f"(figures/{name})" in page, f"docs/benchmark.md does not show {name}"
        assert embedded_hash(folder / name) == data_hash(data), f"{name} is stale: run bench_table.py --docs"


def test_every_committed_cell_ran_the_documents_settings(bench, committed):
    """One protocol and one attack set-up for every row, and it is one of the script's presets; a
    claim is only tested on matched prompts and targets."""
    settings = bench.settings_of(committed)
    assert settings in bench.PRESETS.values()
    for name, job in committed["jobs"].items():
        if name.startswith("cell/"):
            assert bench.cell_settings(committed, job) == settings, name
            assert job["attack_prompts"] == bench.attack_prompts(job["target"], settings["attack_prompts"])
    orig = committed["jobs"]["original"]["targets"]
    assert all(t["attack_prompts"] == bench.attack_prompts(n, settings["attack_prompts"]) for n, t in orig.items())


def test_claims_table_lists_every_claim_with_a_test_and_verdict(bench, committed):
    from erasekit.stats import VERDICTS

    rows = bench.claims(committed)
    text = " ".join(r["claim"] for r in rows)
    for claim in ("RECE is more robust than UCE", "AdvUnlearn's ASR is at most half", "SalUn retains better",
                  "SFD forgets in one step", "fall to UnlearnDiffAtk"):
        assert claim in text
    for r in rows:
        assert r["verdict"] in VERDICTS and r["parts"]
        for part in r["parts"]:
            assert 0 < part["p_value"] <= 1 and part["low"] <= part["estimate"] <= part["high"]


def test_every_job_of_the_full_benchmark_is_in_the_committed_results(bench, committed):
    plan = bench.jobs(bench.METHODS, attacks=bench.ATTACKS)   # the default command's plan
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


# About 90 s on 2 cores (an erasure, a canvas-lite evaluation and an attack): in the slow suite, so the default
# suite stays under 10 minutes; the tests above check the table and figures against the committed results.
@pytest.mark.slow
def test_a_committed_cell_is_reproduced(bench, committed, tmp_path):
    name = "cell/uce/Van_Gogh"
    want = committed["jobs"][name]
    spec = bench.jobs(["uce"], ["Van_Gogh"], [], [], settings=bench.settings_of(committed))[name]
    # all the machine's threads (the benchmark's workers use one each): the tolerances below cover round-off
    got = bench.run_job(name, spec, tmp_path, tmp_path / "cache")
    for key, tol in TOLERANCE.items():
        assert abs(got[key] - want[key]) <= tol, f"{key}: {got[key]} now, {want[key]} committed (tolerance {tol})"
    assert math.isclose(got["fid"], want["fid"], rel_tol=FID_RELATIVE)
    # the Edit file as the table shows it (3 significant figures): the tensors are the same bytes, the
    # manifest in the file's header grows when the toolkit records more about a run
    assert bench._size(got["edit_bytes"]) == bench._size(want["edit_bytes"])


def _synthetic_doc(bench, uce_hits: int, p4d_hits: int) -> dict:
    """Eight targets of one method: UnlearnDiffAtk breaks ``uce_hits`` of each target's 5 prompts, P4D
    ``p4d_hits``, Ring-A-Bell none; no prompt breaks without attack."""
    targets = list(bench.STYLES + bench.OBJECTS)
    settings = bench.PRESETS["lite"]

    def outcomes(hits):
        return [[int(i < hits), 0, 100 * (i + 1) if i < hits else None] for i in range(5)]

    jobs = {}
    for t in targets:
        prompts = bench.attack_prompts(t, 5)
        jobs[f"cell/uce/{t}"] = {"method": "uce", "target": t, "UA": 100.0, "IRA": 99.0, "CRA": 99.0,
                                 "pre_ASR": 0.0, "ASR": 20.0 * uce_hits, "attack_unet_evals_mean": 500.0,
                                 "attack_prompts": prompts, "attack_seeds": [0], "attack_outcomes": outcomes(uce_hits),
                                 "settings": settings}
        attacks = {a: {"pre_ASR": 0.0, "ASR": 20.0 * h, "attack_unet_evals_mean": 300.0,
                       "attack_outcomes": outcomes(h)} for a, h in (("ring_a_bell", 0), ("p4d", p4d_hits))}
        jobs[f"attacks/uce/{t}"] = {"method": "uce", "target": t, "settings": settings, "attacks": attacks,
                                    "attack_prompts": prompts, "attack_seeds": [0]}
    return {"styles": list(bench.STYLES), "objects": list(bench.OBJECTS), "jobs": jobs}


def test_attack_matrix_pools_the_prompts_and_tests_the_strongest_against_unlearndiffatk(bench):
    from erasekit.stats import wilson

    doc = _synthetic_doc(bench, uce_hits=1, p4d_hits=4)
    [row] = bench.attack_matrix(doc)
    assert row["attacks"]["p4d"]["ASR"] == 80.0 and row["attacks"]["p4d"]["ASR_ci"] == wilson(32, 40).to_dict()
    assert row["attacks"]["unlearndiffatk"]["ASR_ci"] == wilson(8, 40).to_dict()
    assert row["attacks"]["ring_a_bell"]["ASR"] == 0.0
    best, test = bench._strongest(row)
    assert best == "p4d" and "McNemar" in test.method and test.p_value < 0.001 and test.estimate > 0.5
    line = [x for x in bench.attack_lines(doc) if x.startswith("| uce |")][0]
    assert "80.0 % [" in line and line.endswith("P4D-K (" + test.format() + ") |")
    # when UnlearnDiffAtk is ahead it is named, with no test against itself
    assert bench._strongest(bench.attack_matrix(_synthetic_doc(bench, uce_hits=4, p4d_hits=1))[0]) == \
        ("unlearndiffatk", None)
    # a method with one target's attacks missing has no row
    del doc["jobs"]["attacks/uce/Fishes"]
    assert bench.attack_matrix(doc) == []


def test_an_attack_that_refuses_a_methods_edits_is_named_and_left_out_of_the_strongest(bench):
    """P4D refuses a one-step (SFD) Edit before any work: the matrix shows the refusal, not a rate, and the
    strongest attack is chosen among those that ran."""
    doc = _synthetic_doc(bench, uce_hits=1, p4d_hits=4)
    for name, job in doc["jobs"].items():
        if name.startswith("attacks/"):
            job["attacks"]["p4d"] = {"refused": "p4d matches noise predictions of a denoiser"}
    [row] = bench.attack_matrix(doc)
    assert row["attacks"]["p4d"] == {"refused": "p4d matches noise predictions of a denoiser"}
    assert bench._strongest(row) == ("unlearndiffatk", None)
    lines = bench.attack_lines(doc)
    assert "refuses this Edit" in [x for x in lines if x.startswith("| uce |")][0]
    assert 'P4D-K on uce: "p4d matches noise predictions of a denoiser"' in lines[-1]


def test_another_models_results_fill_their_own_block_of_the_page(bench, tmp_path):
    """``--model canvas-mini-mmdit`` results render as that model's block (its markers, its sampler, no
    figures); writing them leaves the main table's block as it was."""
    doc = _synthetic_doc(bench, uce_hits=2, p4d_hits=0)
    doc.update(model="canvas-mini-mmdit", protocol="canvas-lite", attack_prompts_per_target=5, attack_ks=[3],
               runs=[{"wall_s": 100.0, "workers": 2, "threads": 1}])
    doc["jobs"] = {k: v for k, v in doc["jobs"].items() if k.startswith("cell/")}
    doc["jobs"]["original"] = {"targets": {}, "protocol": {"sampling": {"sampler": "flow_euler", "steps": 25,
                                                                        "guidance": 7.5}}}
    block = bench.render(doc)
    assert block.startswith("| method | style UA") and "| uce | 100.0 % [" in block
    assert "Model: canvas-mini-mmdit; protocol canvas-lite, sampled with flow_euler at 25 steps" in block
    assert "40.0 % [" in block   # UnlearnDiffAtk: 2 of 5 prompts at every target
    assert bench.settings_of(doc)["model"] == "canvas-mini-mmdit"
    assert "canvas-mini-mmdit" in bench.markers(doc)[0]
    _writes_only_its_block(bench, doc, block, tmp_path)


def _writes_only_its_block(bench, doc, block, tmp_path):
    """Writing ``doc`` into a page replaces its own block with ``block`` and leaves the main table's as it
    was, and draws no figures."""
    begin, end = bench.markers(doc)
    assert (begin, end) != (bench.BEGIN, bench.END)
    page = tmp_path / "benchmark.md"
    page.write_text(f"head\n{bench.BEGIN}\nmain table\n{bench.END}\nmiddle\n{begin}\nstale block\n{end}\ntail\n")
    assert bench.write_docs(doc, page, tmp_path / "figures") == [page]
    text = page.read_text()
    assert f"{bench.BEGIN}\nmain table\n{bench.END}" in text and "stale block" not in text
    assert text.split(begin)[1].split(end)[0].strip() == block.strip() and not (tmp_path / "figures").exists()


def test_prefix_jobs_give_the_asr_vs_k_figure_and_the_claim_at_each_k(bench):
    """Cells from a lite run (one k, no per-prompt outcomes) plus ``prefix/`` jobs at k = 3 and 5: the figure
    and the RECE / UCE claim per k come from the prefix jobs, the budget curve from their run at the cell's k,
    and the page counts how many reruns at the cell's k got the cell's ASR."""
    def outcomes(hits):
        return [[int(i < hits), 0, 100 * (i + 1) if i < hits else None] for i in range(5)]

    jobs = {}
    for m, hits in (("uce", {3: 1, 5: 4}), ("rece", {3: 3, 5: 0})):
        for t in bench.STYLES + bench.OBJECTS:
            jobs[f"cell/{m}/{t}"] = {"method": m, "target": t, "UA": 100.0, "IRA": 99.0, "CRA": 99.0, "pre_ASR": 0.0,
                                     "ASR": 20.0 * hits[3], "attack_config": {"k": 3},
                                     "attack_prompts": bench.attack_prompts(t, 5), "attack_seeds": [0]}
            jobs[f"prefix/{m}/{t}"] = {"method": m, "target": t, "ks": [3, 5], "attacks_by_k": {
                str(k): {"ASR": 20.0 * h, "pre_ASR": 0.0, "attack_outcomes": outcomes(h)} for k, h in hits.items()}}
    jobs["prefix/uce/Fishes"]["attacks_by_k"]["3"]["ASR"] = 40.0   # one rerun disagrees with its cell
    doc = {"styles": list(bench.STYLES), "objects": list(bench.OBJECTS), "jobs": jobs, "attack_ks": [3],
           "protocol": "canvas-lite", "attack_prompts_per_target": 5}
    assert bench.doc_ks(doc) == [3, 5]
    figs = bench.figure_data(doc)
    series = figs["asr_k.svg"][1]["series"]
    assert [p["asr"]["value"] for p in series["uce"]] == [20.0, 80.0]
    assert [p["asr"]["value"] for p in series["rece"]] == [60.0, 0.0]
    assert set(figs["asr_budget.svg"][1]["curves"]) == {"uce", "rece"}
    by_claim = {c["claim"]: c for c in bench.claims(doc)}
    at3 = by_claim["RECE is more robust than UCE (lower ASR), k = 3"]
    at5 = by_claim["RECE is more robust than UCE (lower ASR), k = 5"]
    assert "McNemar" in at3["parts"][0]["method"] and at3["verdict"] == "does not hold"
    assert at5["verdict"] == "holds"
    assert bench.prefix_check(doc) == (15, 16)


def test_canvas_protocol_results_fill_their_own_block_with_asr_at_each_k(bench, tmp_path):
    """A ``--preset canvas`` run (canvas-mini, 10 captions, k = 3 and 5 in every cell) renders as the page's
    ``canvas`` block: the table, ASR at each k with the McNemar test between them, the claims per k, the
    protocol and the run's time, and the methods a stopped run has not finished; no figures, and the main
    table's block is left as it was."""
    def outcomes(hits):
        return [[int(i < hits), 0, 100 * (i + 1) if i < hits else None] for i in range(10)]

    settings = bench.PRESETS["canvas"]
    jobs = {"original": {"targets": {}, "protocol": {"seeds": [188, 288], "dtype": "float32",
                                                     "sampling": {"sampler": "ddim", "steps": 25, "guidance": 7.5}}}}
    for m, hits in (("uce", {3: 2, 5: 9}), ("rece", {3: 4, 5: 8})):
        for t in bench.STYLES + bench.OBJECTS:
            by_k = {str(k): {"ASR": 10.0 * h, "pre_ASR": 0.0, "attack_outcomes": outcomes(h)} for k, h in hits.items()}
            jobs[f"cell/{m}/{t}"] = {"method": m, "target": t, "UA": 100.0, "IRA": 99.0, "CRA": 99.0, "pre_ASR": 0.0,
                                     "ASR": 10.0 * hits[3], "attack_outcomes": outcomes(hits[3]), "attacks_by_k": by_k,
                                     "attack_prompts": bench.attack_prompts(t, 10), "attack_seeds": [0],
                                     "settings": settings, "wall_s": 10.0}
    doc = {"format": bench.FORMAT, "styles": list(bench.STYLES), "objects": list(bench.OBJECTS), "sequence": [],
           "model": bench.MODEL, "protocol": "canvas", "attack_prompts_per_target": 10, "attack_seeds": [0],
           "attack_ks": [3, 5], "jobs": jobs,
           "runs": [{"wall_s": 100.0, "workers": 2, "threads": 1, "methods": ["uce"]},
                    {"wall_s": 50.0, "workers": 2, "threads": 1, "methods": ["rece", "esd"], "left": ["cell/esd/Cats"]}]}
    assert bench.block_name(doc) == "canvas"
    block = bench.render(doc)
    from erasekit.stats import mcnemar, wilson
    uce3, uce5 = ([o[0] for _ in range(8) for o in outcomes(h)] for h in (2, 9))
    assert (f"| uce | {wilson(16, 80).format()} | {wilson(72, 80).format()} | "
            f"{mcnemar(uce5, uce3, **bench.BOOTSTRAP).format()} |") in block
    assert "RECE is more robust than UCE (lower ASR), k = 3: **does not hold**" in block
    assert "RECE is more robust than UCE (lower ASR), k = 5: **holds**" in block
    assert "Protocol canvas: seeds 188, 288, ddim at 25 steps and guidance 7.5, float32" in block
    assert "Not finished: esd (jobs left: 1)" in block and "100 + 50 = 150 s" in block
    _writes_only_its_block(bench, doc, block, tmp_path)


def test_a_run_past_its_stop_after_starts_nothing_and_records_what_it_left(bench, tmp_path):
    """``--stop-after 0``: no job starts; the run is recorded with every job of its plan left for a rerun,
    and the results folder holds no job result."""
    assert bench.main(["--methods", "uce", "--styles", "Van_Gogh", "--objects", "Cats", "--sequence",
                       "--attacks", "--stop-after", "0", "--out", str(tmp_path)]) == 0
    [run] = json.loads((tmp_path / "runs.json").read_text())
    assert run["left"] == ["cell/uce/Cats", "cell/uce/Van_Gogh", "original", "ratio/closed_form"]
    assert not list(tmp_path.glob("jobs/*.json"))


def test_a_run_goes_on_from_a_collected_results_file(bench, tmp_path):
    """``--continue-from``: the file's finished jobs and runs are written into the new folder, so the run
    leaves only the rest; jobs already in the folder are kept; a file measured with other settings is refused
    and writes nothing."""
    doc = {"format": bench.FORMAT, "styles": ["Van_Gogh"], "objects": ["Cats"], "sequence": [], "model": bench.MODEL,
           "protocol": "canvas-lite", "attack_prompts_per_target": 5, "attack_seeds": [0], "attack_ks": [3],
           "runs": [{"wall_s": 100.0, "workers": 2, "threads": 1, "methods": ["uce"]}],
           "jobs": {"cell/uce/Van_Gogh": {"job": "cell/uce/Van_Gogh", "settings": bench.PRESETS["lite"], "wall_s": 9.0}}}
    results = tmp_path / "done.json"
    results.write_text(json.dumps(doc))
    out = tmp_path / "out"
    (out / "jobs").mkdir(parents=True)
    (out / "jobs" / "ratio__closed_form.json").write_text(json.dumps({"job": "ratio/closed_form", "wall_s": 1.0}))
    argv = ["--methods", "uce", "--styles", "Van_Gogh", "--objects", "Cats", "--sequence", "--attacks",
            "--stop-after", "0", "--out", str(out), "--continue-from", str(results)]
    assert bench.main(argv) == 0
    first, run = json.loads((out / "runs.json").read_text())
    assert first == doc["runs"][0] and run["left"] == ["cell/uce/Cats", "original"]
    assert json.loads((out / "jobs" / "ratio__closed_form.json").read_text())["wall_s"] == 1.0
    with pytest.raises(SystemExit, match="measured with"):
        bench.main([*argv[:-3], str(tmp_path / "other"), "--preset", "canvas", "--continue-from", str(results)])
    assert not (tmp_path / "other").exists()
