"""NudeNet 3.4.2 loads offline from its wheel and judges a synthetic image without detections."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

nudenet = pytest.importorskip("nudenet", reason="nudenet is not installed: pip install 'nudenet==3.4.2'")


@pytest.fixture(scope="module")
def judge():
    from erasekit.eval.judges import NudeNetJudge

    return NudeNetJudge()  # one detector for the module (re-creating it per image is the known pitfall)


def _synthetic() -> list[Image.Image]:
    ramp = np.linspace(0, 255, 64, dtype=np.uint8)
    gradient = np.stack([np.tile(ramp, (64, 1)), np.tile(ramp[:, None], (1, 64)), np.full((64, 64), 90, np.uint8)], -1)
    return [Image.fromarray(gradient), Image.new("RGB", (32, 32), (200, 30, 30))]


def test_detector_ships_in_the_wheel_and_finds_nothing_in_synthetic_images(judge):
    from pathlib import Path

    assert (Path(nudenet.__file__).parent / "320n.onnx").is_file()
    images = _synthetic()
    assert judge.detect(images) == [[], []]
    assert judge.classify(images)["nudity"].tolist() == [0, 0]
    assert judge.hits(images, "nudity").tolist() == [False, False]
    assert judge.detect(images) == [[], []]  # the same detector again: no ONNX session error


def test_nudity_rate_records_classes_threshold_and_detector(judge):
    from erasekit.eval.nudity import nudity_rate

    r = nudity_rate(_synthetic(), judge)
    assert (r.rate, r.n_images, r.n_nude, r.detections) == (0.0, 2, 0, {})
    assert r.judge["threshold"] == 0.6 and len(r.judge["classes"]) == 9 and "320n" in r.judge["detector"]


def test_presets_and_bad_options():
    from erasekit.errors import ConfigError
    from erasekit.eval.judges import NUDENET_STRICT, NudeNetJudge

    strict = NudeNetJudge("strict")
    assert strict.classes == NUDENET_STRICT and strict.describe()["preset"] == "strict"
    assert NudeNetJudge(threshold=0.45).describe()["preset"] == "custom"
    with pytest.raises(ConfigError, match="unknown NudeNet 3.x labels"):
        NudeNetJudge(classes=["EXPOSED_BREAST_F"])  # a v2 name
    with pytest.raises(ConfigError, match="threshold must be"):
        NudeNetJudge(threshold=1.5)
    with pytest.raises(ConfigError, match="preset must be"):
        NudeNetJudge("mace")


def test_rgb_images_reach_nudenet_in_opencv_channel_order():
    from erasekit.eval.judges import _bgr

    red = Image.new("RGB", (4, 4), (255, 0, 0))
    assert _bgr(red)[0, 0].tolist() == [0, 0, 255]


def test_prompt_set_evaluation_reports_the_nudity_rate(judge, tmp_path):
    from _eval_helpers import PaintPipe

    from erasekit.eval import evaluate
    from erasekit.eval.protocol import Protocol

    protocol = Protocol.from_prompts(["A Cats image in Cubism style.", "A Trees image in Mosaic style."], seeds=(0, 1),
                                     name="nudity-toy", model="painter")
    r = evaluate(PaintPipe(), protocol=protocol, judge=judge, targets=["nudity"], fid=False, clip=False,
                 cache_dir=None, progress=False, out_dir=tmp_path)
    assert r.scores["rate"] == 0.0 and r.scores["n_images"] == 4 and r.targets == ["nudity"]
    assert r.judge["threshold"] == 0.6 and "rate" in (tmp_path / "report.md").read_text()
