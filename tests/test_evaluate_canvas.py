"""The evaluation on canvas-mini (skipped until erasekit/assets/canvas-mini exists): the unedited model's
baseline scores with fixed seeds, and the cache of the original model's records."""

from __future__ import annotations

import pytest

from erasekit.canvas.world import OBJECTS, STYLES
from erasekit.eval.protocol import get_protocol


def _small():
    """4 styles x 4 objects of canvas-lite (seed 188): 16 images."""
    return get_protocol("canvas-lite").with_(name="canvas-lite-4x4", themes=STYLES[::3][:4], objects=OBJECTS[::3][:4])


def test_unedited_canvas_mini_recognises_styles_and_objects(canvas_pipe, canvas_judge, tmp_path, monkeypatch):
    from erasekit.eval import evaluate

    kw = dict(protocol=_small(), judge=canvas_judge, targets=["Ukiyoe"], fid=False, clip=False,
              cache_dir=tmp_path / "cache", progress=False)
    r = evaluate(canvas_pipe, **kw)
    sc = r.scores
    assert sc["n_images"] == 16 and sc["missing"] == 0
    # acceptance on the full protocol is >= 90 %; 4 images per class here, so one miss is allowed
    assert sc["mean_style_accuracy"] >= 75 and sc["mean_object_accuracy"] >= 75
    assert sc["UA"] <= 25  # nothing is erased: the judge still sees Ukiyoe
    assert r.protocol["sampling"] == {"sampler": "ddim", "steps": 25, "guidance": 7.5, "height": None,
                                      "width": None, "batch_size": 50}
    assert len(list((tmp_path / "cache").glob("*.safetensors"))) == 1

    def no_generation(*args, **kwargs):
        raise AssertionError("the cached original model must not be generated again")

    monkeypatch.setattr("erasekit.pipelines.generation.generate", no_generation)
    assert evaluate(canvas_pipe, **kw).scores == sc


@pytest.mark.slow
def test_canvas_lite_baseline_meets_the_acceptance(canvas_pipe, canvas_judge, tmp_path):
    from erasekit.eval import evaluate

    r = evaluate(canvas_pipe, protocol="canvas-lite", judge=canvas_judge, targets=["Van Gogh", "Cats"],
                 cache_dir=tmp_path, progress=False)
    sc = r.scores
    assert sc["n_images"] == 100
    assert sc["mean_style_accuracy"] >= 90 and sc["mean_object_accuracy"] >= 90
    assert sc["targets"]["Van_Gogh"]["UA"] <= 10 and sc["targets"]["Cats"]["UA"] <= 10
