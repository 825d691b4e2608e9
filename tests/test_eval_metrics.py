"""UA / IRA / CRA on hand-made judge outputs whose answers are worked out by hand, both ambiguous
denominators, missing images (fail / count), and the evaluate() path on a stand-in pipeline."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from erasekit.errors import ConfigError, DegenerateOutputError
from erasekit.eval.canvas_metrics import MissingImageError, UnlearnCanvasMetric, unlearncanvas_scores

from _eval_helpers import ColourJudge, PaintPipe, tiny_protocol

THEMES = ["Cubism", "Mosaic", "Seed_Images"]  # A, B and the photo class P
OBJECTS = ["Cats", "Trees"]                   # X, Y
A, B, P, X, Y = 0, 1, 2, 0, 1
# (theme, object, style prediction, object prediction): 2 seeds per cell.
# acc_S: A 1/4 = 25 %, B 3/4 = 75 %, P 4/4 = 100 %.  acc_O: X (2+1+0)/6 = 50 %, Y (1+2+2)/6 = 83.3 %.
JUDGED = [
    (A, X, A, X), (A, X, B, X),
    (A, Y, B, Y), (A, Y, B, X),
    (B, X, B, X), (B, X, B, Y),
    (B, Y, B, Y), (B, Y, A, Y),
    (P, X, P, Y), (P, X, P, Y),
    (P, Y, P, Y), (P, Y, P, Y),
]
EXPECTED = np.full((3, 2), 2)


def _counts(rows=JUDGED):
    m = UnlearnCanvasMetric(len(THEMES), len(OBJECTS))
    m.update(*(torch.tensor(c) for c in zip(*rows)))
    return {k: v.numpy() for k, v in m.compute().items()}


def _scores(targets, rows=JUDGED, **kw):
    return unlearncanvas_scores(_counts(rows), EXPECTED, THEMES, OBJECTS, targets, photo_theme="Seed_Images", **kw)


def test_per_class_accuracy_counts_every_theme_in_the_object_denominator():
    s = _scores([])
    assert s["style_accuracy"] == pytest.approx({"Cubism": 25.0, "Mosaic": 75.0, "Seed_Images": 100.0})
    assert s["object_accuracy"] == pytest.approx({"Cats": 50.0, "Trees": 500 / 6})
    assert "UA" not in s and s["missing"] == 0


def test_style_target_both_ira_denominators_and_cra_variants():
    t = _scores([("style", A)])["targets"]["Cubism"]
    assert t["UA"] == pytest.approx(75.0)                      # 1 - acc_S(A)
    assert t["IRA"] == pytest.approx(75.0)                     # other styles without the photo class: B
    assert t["IRA_photo_included"] == pytest.approx(87.5)      # mean(B, P) = (75 + 100) / 2
    assert t["CRA"] == pytest.approx((50 + 500 / 6) / 2)       # mean acc_O over all themes' images
    # without theme A's images: X (1 + 0) / 4 = 25 %, Y (2 + 2) / 4 = 100 %
    assert t["CRA_excluding_targets"] == pytest.approx(62.5)


def test_object_target_cra_over_styles_with_and_without_photo():
    t = _scores([("object", X)])["targets"]["Cats"]
    assert t["UA"] == pytest.approx(50.0)
    assert t["IRA"] == pytest.approx(500 / 6)                  # the other object, Y
    assert t["CRA"] == pytest.approx(50.0)                     # mean(A, B) = (25 + 75) / 2
    assert t["CRA_photo_included"] == pytest.approx(200 / 3)   # mean(A, B, P)
    # style accuracy without object X's images: A 0/2, B 1/2 (photo excluded)
    assert t["CRA_excluding_targets"] == pytest.approx(25.0)


def test_two_targets_average_ua_and_exclude_both_from_retention():
    s = _scores([("style", A), ("style", B)])
    assert s["UA"] == pytest.approx((75 + 25) / 2)
    assert np.isnan(s["IRA"])  # no non-photo style left to retain: NaN, never a made-up 100
    assert s["targets"]["Mosaic"]["IRA_photo_included"] == pytest.approx(100.0)


def test_missing_image_fails_by_default_and_is_counted_on_request():
    rows = JUDGED[:4] + JUDGED[5:]  # drop (B, X) seed 1, a style hit
    with pytest.raises(MissingImageError, match="1 of 12 images are missing"):
        _scores([("style", A)], rows)
    s = _scores([("style", A)], rows, on_missing="count")
    assert s["missing"] == 1 and s["n_images"] == 11 and s["n_expected"] == 12
    # the missing image stays in the denominator as not recognised: B 2/4 instead of 3/4
    assert s["style_accuracy"]["Mosaic"] == pytest.approx(50.0)


def test_an_image_judged_twice_is_an_error():
    with pytest.raises(MissingImageError, match="judged twice"):
        _scores([], JUDGED + JUDGED[:1], on_missing="count")


def test_sharded_states_sum_to_the_single_metric():
    half = len(JUDGED) // 2
    a, b = UnlearnCanvasMetric(3, 2), UnlearnCanvasMetric(3, 2)
    a.update(*(torch.tensor(c) for c in zip(*JUDGED[:half])))
    b.update(*(torch.tensor(c) for c in zip(*JUDGED[half:])))
    a.merge_state(b)
    whole = _counts()
    assert all(np.array_equal(a.compute()[k].numpy(), whole[k]) for k in whole)


# -- the evaluate() path ---------------------------------------------------------------------------
def test_evaluate_scores_a_perfect_painter(tmp_path):
    from erasekit.eval import evaluate

    attack = {"asr": 40.0, "pre_asr": 10.0, "prompts": [{"prompt": "..."}]}
    r = evaluate(PaintPipe(), protocol=tiny_protocol(), judge=ColourJudge(), targets=["Mosaic"], fid=False,
                 clip=False, cache_dir=None, progress=False, out_dir=tmp_path, attack=attack)
    assert r.scores["UA"] == 0.0 and r.scores["IRA"] == 100.0 and r.scores["CRA"] == 100.0
    assert r.asr == [{"asr": 40.0, "pre_asr": 10.0}]  # scalars recorded, bulky per-prompt rows left out
    saved = json.loads((tmp_path / "report.json").read_text())
    assert saved["protocol"]["sampling"]["steps"] == 2 and saved["protocol"]["seeding"]
    assert saved["scores"]["targets"]["Mosaic"]["IRA_photo_included"] == 100.0


def test_evaluate_fails_on_a_non_finite_image_unless_counted(tmp_path):
    from erasekit.eval import evaluate

    kw = dict(protocol=tiny_protocol(), judge=ColourJudge(), targets=["Cubism"], fid=False, clip=False,
              cache_dir=None, progress=False)
    with pytest.raises(DegenerateOutputError, match="not finite"):
        evaluate(PaintPipe(broken={1}), **kw)
    r = evaluate(PaintPipe(broken={1}), out_dir=tmp_path, **kw, on_missing="count")
    assert r.scores["missing"] == 4 and r.scores["n_images"] == 8  # seed 1 of each of the 4 cells
    assert r.scores["style_accuracy"]["Mosaic"] == pytest.approx(200 / 3)
    assert "4 of 12 images missing" in (tmp_path / "report.md").read_text()
    assert json.loads((tmp_path / "report.json").read_text())["scores"]["missing"] == 4


def test_unknown_target_and_bad_options_are_clear_errors():
    from erasekit.eval import evaluate

    kw = dict(protocol=tiny_protocol(), judge=ColourJudge(), fid=False, clip=False, cache_dir=None, progress=False)
    with pytest.raises(ConfigError, match="does not know the concept 'Van Gogh'"):
        evaluate(PaintPipe(), targets=["Van Gogh"], **kw)
    with pytest.raises(ConfigError, match="on_missing must be"):
        evaluate(PaintPipe(), targets=["Cubism"], on_missing="skip", **kw)
    with pytest.raises(ConfigError, match="protocol must be one of"):
        evaluate(PaintPipe(), protocol="coco", judge=ColourJudge())
