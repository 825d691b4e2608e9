"""canvas-mini-mmdit, the shipped SD 3-architecture model of the canvas world: it loads by name as an SD 3
pipeline with its own preset provider, and a closed-form erasure on it removes a style it draws while the
other styles stay (a behaviour test on a trained MMDiT, fixed seeds)."""

from __future__ import annotations

from pathlib import Path

import pytest

MODEL = Path(__file__).resolve().parents[1] / "erasekit" / "assets" / "canvas-mini-mmdit"
pytestmark = pytest.mark.skipif(not (MODEL / "model_index.json").exists(),
                                reason="canvas-mini-mmdit is not shipped yet (python -m erasekit.canvas.train_mmdit)")

OBJECTS = ("Architectures", "Butterfly", "Cats", "Flowers", "Towers")


@pytest.fixture(scope="module")
def pipe():
    import erasekit

    return erasekit.load_pipeline(MODEL)


@pytest.fixture(scope="module")
def judge():
    from erasekit.eval.judges import CanvasJudge

    return CanvasJudge.load()


def _style_hits(pipe, judge, style: str, seeds=(0,)) -> int:
    """How many of the style's captions (5 objects x ``seeds``) the judge sees in that style."""
    from erasekit.canvas.world import STYLES, caption
    from erasekit.pipelines import default_sampling, generate

    prompts = [caption(o, style) for o in OBJECTS for _ in seeds]
    images = generate(pipe, prompts, [s for _ in OBJECTS for s in seeds], default_sampling(pipe, steps=25))
    return int((judge.classify(images)["style"] == STYLES.index(style)).sum())


def test_loads_as_sd3_with_its_own_provider(pipe):
    from erasekit.pipelines.family import detect_family
    from erasekit.presets import provider_for

    assert type(pipe).__name__ == "StableDiffusion3Pipeline" and detect_family(pipe) == "sd3"
    assert provider_for(pipe).name == "canvas-mini-mmdit"
    assert pipe.text_encoder_3 is None


def test_uce_erases_a_style_and_keeps_another(pipe, judge):
    """Van Gogh: 5 captions (5 objects, seed 0). Before: at least 4 drawn in the style; after UCE (the
    provider's canvas-style preset): at most 1, while Pop Art's captions stay at least 4 of 5. (Measured
    when the model shipped, at seeds 0 and 1 each: 5 of 5 before, 0 of 5 after, Pop Art 5 of 5.)"""
    import erasekit

    before = _style_hits(pipe, judge, "Van_Gogh")
    assert before >= 4, f"canvas-mini-mmdit draws Van Gogh in only {before} of 5 captions"
    edit = erasekit.erase(pipe, "uce", ["Van_Gogh"])
    assert edit.manifest["preset"]["provider"] == "canvas-mini-mmdit"
    with edit.applied(pipe):
        erased, kept = _style_hits(pipe, judge, "Van_Gogh"), _style_hits(pipe, judge, "Pop_Art")
    assert erased <= 1, f"UCE left Van Gogh in {erased} of 5 captions"
    assert kept >= 4, f"UCE broke Pop Art: {kept} of 5 captions kept it"
