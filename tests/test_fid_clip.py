"""FID (torchmetrics with injected features) and CLIP score (torchmetrics' CLIPScore driven by an
open_clip model), on the canvas CLIP architecture with random weights; the saved canvas CLIP
round trip; and the shortened text pass used in its training."""

from __future__ import annotations

import numpy as np
import pytest
import torch


@pytest.fixture(scope="module")
def encoder():
    import open_clip

    from erasekit.canvas.clip import MEAN, STD, build_clip
    from erasekit.eval.clip_score import ClipEncoder

    torch.manual_seed(0)
    return ClipEncoder(build_clip().eval(), open_clip.tokenize, image_size=32, mean=MEAN, std=STD, name="random")


def _images(seed: int, n: int = 24, shift: float = 0.0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    base = rng.uniform(0, 1, (n, 1, 1, 3)) * 0.6 + shift
    noise = rng.normal(0, 0.1, (n, 32, 32, 3))
    return list((np.clip(base + noise, 0, 1) * 255).astype(np.uint8))


def test_frechet_distance_of_a_set_with_itself_is_zero_and_grows_with_a_shift():
    from erasekit.eval.fid import frechet_distance

    g = torch.Generator().manual_seed(0)
    x = torch.randn(200, 8, generator=g, dtype=torch.float64)
    assert abs(frechet_distance(x, x)) < 1e-6
    d1 = frechet_distance(x, x + 0.5)
    assert d1 == pytest.approx(8 * 0.25, rel=1e-6)  # mean shift only: ||0.5 * 1||^2
    assert frechet_distance(x, 2 * x) > 0.5


def test_fid_on_images_with_clip_features(encoder):
    from erasekit.eval.fid import fid_score

    a, b = _images(0), _images(1, shift=0.3)
    same = fid_score(a, a, features=encoder)
    assert abs(same.value) < 1e-3 and same.n_real == same.n_fake == 24 and same.feature_dim == 64
    assert "not Inception" in same.features
    assert fid_score(a, b, features=encoder).value > 100 * max(abs(same.value), 1e-6)


def test_clip_scores_match_torchmetrics_clipscore(encoder):
    from erasekit.eval.clip_score import clip_score_metric

    images = _images(2, n=6)
    prompts = [f"A Cats image in {s} style." for s in ("Cubism", "Mosaic", "Winter", "Cubism", "Pop Art", "Winter")]
    ours = encoder.scores(images, prompts)
    metric = clip_score_metric(encoder)
    metric.update(torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2), prompts)
    assert float(metric.compute()) == pytest.approx(max(float(ours.mean()), 0.0), abs=1e-4)
    assert ours.shape == (6,) and torch.isfinite(ours).all()


def test_short_text_pass_equals_open_clip_encode_text():
    import open_clip

    from erasekit.canvas.clip import build_clip, encode_text_short

    torch.manual_seed(1)
    model = build_clip().eval()
    tokens = open_clip.tokenize(["A Butterfly image in Pencil Drawing style.", "Cats, Mosaic style"])
    with torch.no_grad():
        assert torch.allclose(encode_text_short(model, tokens), model.encode_text(tokens), atol=1e-5)


def test_saved_canvas_clip_round_trips_in_float16(tmp_path):
    import json

    from erasekit.canvas.clip import build_clip, save_clip
    from erasekit.eval.clip_score import load_canvas_clip

    torch.manual_seed(2)
    model = build_clip().eval()
    save_clip(model, tmp_path, {"steps": 0})
    cfg = json.loads((tmp_path / "config.json").read_text())
    assert cfg["text_cfg"]["vocab_size"] == 49408 and cfg["text_cfg"]["context_length"] == 77
    assert (tmp_path / "model.safetensors").stat().st_size < 4_000_000
    loaded = load_canvas_clip(tmp_path)
    images = _images(3, n=4)
    a = loaded.encode_images(images)
    ref = torch.nn.functional.normalize(model.encode_image(loaded.pixels(images)), dim=-1).detach()
    assert torch.allclose(a, ref, atol=2e-2)


def test_missing_canvas_clip_is_a_clear_error(tmp_path):
    from erasekit.errors import ConfigError
    from erasekit.eval.clip_score import load_canvas_clip

    with pytest.raises(ConfigError, match="no canvas CLIP"):
        load_canvas_clip(tmp_path)
