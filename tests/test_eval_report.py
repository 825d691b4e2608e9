"""Reports (JSON round trip, Markdown table with the baseline row, grids, the trade-off plot), the
original-model cache, and sequential unlearning on a tiny sd1 pipeline."""

from __future__ import annotations

import json

import pytest
import torch

from _eval_helpers import ColourJudge, PaintPipe, tiny_protocol

KEY = "unet/down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_v.weight"


def _flip(pipe, concept="Mosaic"):
    from erasekit.pipelines import Edit

    return Edit.from_weights(pipe, {KEY: -2.0 * pipe.unet.get_parameter(KEY.split("/", 1)[1])},
                             {"method": "flip", "concepts": [concept]})


def test_edit_report_files_and_restored_pipeline(tiny_sd1, tmp_path):
    from erasekit.eval import Report, evaluate, markdown_table, plot_tradeoff

    before = {k: v.clone() for k, v in tiny_sd1.unet.state_dict().items()}
    edit = _flip(tiny_sd1)
    r = evaluate(tiny_sd1, edit, protocol=tiny_protocol(seeds=(0, 1)), judge=ColourJudge(), fid=False, clip=False,
                 cache_dir=tmp_path / "cache", progress=False, out_dir=tmp_path / "out", save_images=True)
    assert all(torch.equal(before[k], v) for k, v in tiny_sd1.unet.state_dict().items())
    assert r.method == "flip" and r.targets == ["Mosaic"] and r.baseline is not None
    assert r.efficiency["storage_bytes"] == edit.nbytes()
    files = sorted(p.relative_to(tmp_path / "out").as_posix() for p in (tmp_path / "out").rglob("*.png"))
    assert "grids/Mosaic.png" in files and "images/edited/Mosaic/Cats_seed1.png" in files
    assert len([f for f in files if f.startswith("images/original/")]) == 8
    back = Report.from_json(tmp_path / "out" / "report.json")
    assert back.scores == json.loads(r.to_json())["scores"]
    table = markdown_table([r, back]).splitlines()
    assert table[2].startswith("| original |") and table[3].startswith("| flip |") and len(table) == 5
    plot = plot_tradeoff([r], tmp_path / "tradeoff.png")
    assert plot.stat().st_size > 0


def test_original_records_come_from_the_cache(tmp_path, monkeypatch):
    from erasekit.eval import evaluate

    kw = dict(protocol=tiny_protocol(), judge=ColourJudge(), targets=["Cubism"], fid=False, clip=False,
              cache_dir=tmp_path, progress=False)
    first = evaluate(PaintPipe(), **kw)

    def no_generation(*args, **kwargs):
        raise AssertionError("the original model was generated again")

    monkeypatch.setattr("erasekit.pipelines.generation.generate", no_generation)
    assert evaluate(PaintPipe(), **kw).scores == first.scores
    with pytest.raises(AssertionError, match="generated again"):  # other weights: a different key
        evaluate(PaintPipe(weight=2.0), **kw)


def _register_flip():
    """A stand-in method (negates one value projection), so this test needs no real method."""
    from dataclasses import dataclass

    from erasekit.erase.registry import MethodConfig, register

    @dataclass
    class FlipConfig(MethodConfig):
        pass

    @register("eval-test-flip", FlipConfig)
    def flip(pipe, concepts, config):
        return _flip(pipe, concepts[0])


def test_sequential_unlearning_reports_every_step_and_restores(tiny_sd1, tmp_path):
    from erasekit.workflows import sequential

    _register_flip()
    before = {k: v.clone() for k, v in tiny_sd1.text_encoder.state_dict().items()}
    before.update({k: v.clone() for k, v in tiny_sd1.unet.state_dict().items()})
    r = sequential(tiny_sd1, "eval-test-flip", ["Cubism", "Mosaic"], protocol=tiny_protocol(seeds=(0,)), judge=ColourJudge(),
                   fid=False, clip=False, cache_dir=None, progress=False, out_dir=tmp_path)
    after = {**tiny_sd1.text_encoder.state_dict(), **tiny_sd1.unet.state_dict()}
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert [list(s["UA_per_target"]) for s in r.sequential] == [["Cubism"], ["Cubism", "Mosaic"]]
    assert "sequence order: ['Cubism', 'Mosaic']" in r.notes
    assert "| 2 | Mosaic |" in (tmp_path / "report.md").read_text()
    assert r.sequential[1]["efficiency"]["storage_bytes"] > 0


def test_sequential_continues_a_one_step_generator(tiny_sd1, monkeypatch):
    """SFD-like methods: step 2 starts from step 1's generator and forgets both targets so far."""
    from dataclasses import dataclass

    from erasekit.erase.registry import MethodConfig, register
    from erasekit.workflows import sequential
    from erasekit.pipelines import Edit

    calls = []

    @dataclass
    class OneStepConfig(MethodConfig):
        generator_init: str | None = None

    @register("eval-test-one-step", OneStepConfig)
    def one_step(pipe, concepts, config):
        start = Edit.load(config.generator_init, pipe).weights[KEY] if config.generator_init else \
            pipe.unet.get_parameter(KEY.split("/", 1)[1]).detach()
        calls.append((list(concepts), config.generator_init is not None))
        return Edit.from_weights(pipe, {KEY: start + 1.0}, {"method": "one-step", "concepts": list(concepts),
                                                             "sampler": "one_step", "generator_timestep": 625},
                                 low_rank=False)

    before = {k: v.clone() for k, v in tiny_sd1.unet.state_dict().items()}
    r = sequential(tiny_sd1, "eval-test-one-step", ["Cubism", "Mosaic"], protocol=tiny_protocol(seeds=(0,)),
                   judge=ColourJudge(), fid=False, clip=False, cache_dir=None, progress=False)
    assert calls == [(["Cubism"], False), (["Cubism", "Mosaic"], True)]
    assert [list(s["UA_per_target"]) for s in r.sequential] == [["Cubism"], ["Cubism", "Mosaic"]]
    assert all(torch.equal(before[k], v) for k, v in tiny_sd1.unet.state_dict().items())
