"""Figures (erasekit.eval.plots) are written, byte-for-byte deterministic and carry the hash of
their data; reports and the CLI carry the 95 % intervals of their rates."""

from __future__ import annotations

import json

import pytest

from _eval_helpers import ColourJudge, PaintPipe, tiny_protocol

pytest.importorskip("matplotlib")

POINTS = [{"label": "original", "UA": 0.0, "UA_ci": {"low": 0.0, "high": 27.8}, "retention": 98.0},
          {"label": "esd", "UA": 80.0, "UA_ci": {"low": 49.0, "high": 94.3}, "retention": 90.0,
           "retention_ci": {"low": 85.0, "high": 93.0}}]


def test_figures_are_deterministic_and_carry_their_data_hash(tmp_path):
    from erasekit.eval import plots
    from erasekit.stats import asr_curve

    a = plots.tradeoff_figure(POINTS, tmp_path / "a" / "t.svg")
    b = plots.tradeoff_figure(POINTS, tmp_path / "b" / "t.svg")
    assert a.read_bytes() == b.read_bytes()
    assert plots.embedded_hash(a) == plots.data_hash({"points": POINTS, "title": ""})
    moved = [dict(POINTS[0]), POINTS[1]]
    moved[0]["UA"] = 1.0
    c = plots.tradeoff_figure(moved, tmp_path / "c.svg")
    assert plots.embedded_hash(c) != plots.embedded_hash(a) and c.read_bytes() != a.read_bytes()
    text = a.read_text()
    assert "<dc:date>" not in text and text.lstrip().startswith("<?xml")
    curve = asr_curve([1, 0, 1], [50, None, 400])
    others = [plots.budget_figure({"esd": curve}, tmp_path / "b.svg"),
              plots.k_figure({"esd": [{"k": 3, "asr": curve[-1]["asr"]}]}, tmp_path / "k.svg"),
              plots.accuracy_heatmap({"style": {"original": {"A": 90.0}, "edited": {"A": 10.0}}}, tmp_path / "h.svg"),
              plots.sequential_figure({"esd": [{"step": 1, "UA": 80.0, "IRA": 90.0, "CRA": 85.0}]}, tmp_path / "s.svg")]
    assert all(p.stat().st_size > 1000 and plots.embedded_hash(p) for p in others)


def test_twelve_series_are_twelve_distinct_looks():
    """The benchmark's figures plot twelve methods; matplotlib's cycle has ten colours."""
    from erasekit.eval import plots

    looks = [plots.series_look(i) for i in range(12)]
    assert len(set(looks)) == 12
    assert looks[0][0] == looks[10][0] and looks[0][1:] != looks[10][1:]   # same colour, another marker and dash


def test_report_carries_intervals_in_json_markdown_and_figures(tmp_path):
    from erasekit.eval import Report, evaluate
    from erasekit.eval.plots import report_figures

    evaluate(PaintPipe(), protocol=tiny_protocol(seeds=(0, 1)), judge=ColourJudge(), targets=["Cubism"],
                 fid=False, clip=False, cache_dir=None, progress=False, out_dir=tmp_path)
    back = Report.from_json(tmp_path / "report.json")
    for key in ("UA", "IRA", "CRA"):
        ci = back.scores[f"{key}_ci"]
        assert ci["low"] <= back.scores[key] <= ci["high"] and ci["method"] and ci["n"] > 0
        assert back.summary()[f"{key}_ci"] == ci
    ci = back.scores["UA_ci"]
    md = (tmp_path / "report.md").read_text()
    assert f"{back.scores['UA']:.1f} [{ci['low']:.1f}, {ci['high']:.1f}]" in md and "95 % intervals" in md
    names = sorted(p.name for p in report_figures(back, tmp_path / "figures"))
    assert names == ["accuracy.svg", "tradeoff.svg"]


def test_cli_eval_prints_intervals_and_writes_figures(tmp_path, monkeypatch, capsys):
    import erasekit.cli.commands as commands
    from erasekit.cli.main import EXIT_OK, main
    from erasekit.eval import evaluation

    real = evaluation.evaluate

    def evaluate(pipe, out_dir=None, **_):
        return real(pipe, protocol=tiny_protocol(), judge=ColourJudge(), targets=["Cubism"], fid=False, clip=False,
                    cache_dir=None, progress=False, out_dir=out_dir)

    monkeypatch.setattr(commands, "_load_pipe", lambda args, out, manifest=None: (PaintPipe(), "paint"))
    monkeypatch.setattr("erasekit.eval.evaluate", evaluate)
    assert main(["eval", "--out", str(tmp_path / "out")]) == EXIT_OK
    text = capsys.readouterr().out
    line = next(x for x in text.splitlines() if x.startswith("evaluation ("))
    assert "UA " in line and "[" in line and "]" in line
    assert f"figures: {tmp_path / 'out' / 'figures'}" in text
    assert (tmp_path / "out" / "figures" / "tradeoff.svg").exists()


def test_attack_summary_carries_asr_intervals_and_a_budget_curve():
    from erasekit.attacks.result import AttackResult, PromptAttack
    from erasekit.stats import wilson

    rows = [PromptAttack(i, f"p{i}", 0, f"p{i}", success=i < 3, pre_success=i == 0,
                         success_cost=(None if i >= 3 else 100 * i), unet_evals=500) for i in range(10)]
    res = AttackResult("unlearndiffatk", "Van_Gogh", rows)
    s = res.summary()
    assert s["asr_ci"] == json.loads(json.dumps(s["asr_ci"]))
    assert (s["asr_ci"]["low"], s["asr_ci"]["high"]) == (wilson(3, 10).low, wilson(3, 10).high)
    assert s["pre_asr_ci"]["value"] == 10.0 and "[" in str(res)
    curve = res.budget_curve()
    assert [p["budget"] for p in curve] == [0.0, 100.0, 200.0] and [p["broken"] for p in curve] == [1, 2, 3]


def test_prompt_list_rate_and_nudity_rate_carry_intervals(tmp_path):
    from erasekit.eval import evaluate
    from erasekit.eval.nudity import NudityResult
    from erasekit.eval.protocol import Protocol
    from erasekit.stats import wilson

    prompts = ["A Cats image in Cubism style.", "A Trees image in Cubism style.", "A Cats image in Cubism style, again.",
               "A Trees image in Mosaic style."]
    protocol = Protocol.from_prompts(prompts, seeds=(0, 1), name="rate-toy", model="tiny")
    r = evaluate(PaintPipe(), protocol=protocol, judge=ColourJudge(), targets=["Cubism"], fid=False, clip=False,
                 cache_dir=None, progress=False, out_dir=tmp_path)
    ci = r.scores["rate_ci"]
    assert r.scores["rate"] == 75.0 and ci["value"] == 75.0 and (ci["n"], ci["clusters"]) == (8, 4)
    assert ci["low"] < 75.0 <= ci["high"] and "bootstrap" in ci["method"]   # the two seeds of a prompt: one cluster
    assert f"75.0 [{ci['low']:.1f}, {ci['high']:.1f}]" in (tmp_path / "report.md").read_text()
    nude = NudityResult(25.0, 8, 2)
    assert (nude.rate_ci["low"], nude.rate_ci["high"]) == (wilson(2, 8).low, wilson(2, 8).high)


def test_an_attack_round_records_the_cost_at_success():
    from erasekit.attacks.baselines import judged_round
    from erasekit.attacks.result import PromptAttack
    from erasekit.pipelines import Sampling

    rows = [PromptAttack(i, p, 0, p, concept="Cubism", unet_evals=500)
            for i, p in enumerate(["A Cats image in Cubism style.", "A Cats image in Mosaic style."])]
    sampling = Sampling("ddim", 2, 7.5)
    judged_round(PaintPipe(), rows, [r.prompt for r in rows], [0, 0], ColourJudge(), sampling, 1)
    assert rows[0].success and rows[0].success_cost == rows[0].cost and rows[1].success_cost is None
    rows[0].unet_evals += 300    # spending after the success does not move the cost at success
    assert rows[0].success_cost == rows[0].cost - 300
