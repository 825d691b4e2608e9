"""The canvas world and the shipped canvas-mini assets."""

import numpy as np
import pytest
import torch

from erasekit._assets import asset_path
from erasekit.canvas.render import render
from erasekit.canvas.world import OBJECTS, STYLES, caption

ASSETS = asset_path("canvas-mini", must_exist=False).parent


def test_world_size_and_caption():
    assert len(OBJECTS) >= 10 and len(STYLES) >= 10
    assert caption("Cats", "Van_Gogh") == "A Cats image in Van Gogh style."


def test_renderer_is_deterministic_and_seeded():
    a = np.asarray(render("Cats", "Pop_Art", seed=7))
    b = np.asarray(render("Cats", "Pop_Art", seed=7))
    c = np.asarray(render("Cats", "Pop_Art", seed=8))
    assert a.shape == (32, 32, 3) and a.dtype == np.uint8
    assert np.array_equal(a, b)
    assert not np.array_equal(a, c)


def test_renderer_rejects_unknown_labels():
    with pytest.raises(ValueError, match="unknown canvas style"):
        render("Cats", "Baroque", seed=0)


def test_tokenizer_ids_match_open_clip(clip_tokenizer_dir):
    import open_clip
    from transformers import CLIPTokenizer

    ours = CLIPTokenizer.from_pretrained(clip_tokenizer_dir)
    ref = open_clip.get_tokenizer("ViT-L-14")
    for text in ["A Cats image in Van Gogh style.", "a photo of a nude person!!", "Ukiyoe-style Jellyfish, 1890",
                 "an astronaut riding a horse on mars"]:
        ids = ours(text, padding="max_length", max_length=77).input_ids
        ref_ids = ref([text])[0].tolist()
        n = ref_ids.index(49407) + 1
        assert ids[:n] == ref_ids[:n]
        assert set(ids[n:]) == {49407}  # SD 1.x pads with the end token
    # a few ids known from Stable Diffusion's tokenizer
    assert ours("a photo of").input_ids == [49406, 320, 1125, 539, 49407]


needs_assets = pytest.mark.skipif(not (ASSETS / "canvas-mini" / "model_index.json").exists(),
                                  reason="erasekit/assets/canvas-mini is not built")


@needs_assets
def test_canvas_mini_loads_offline_with_plain_diffusers(monkeypatch):
    from diffusers import StableDiffusionPipeline

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    pipe = StableDiffusionPipeline.from_pretrained(ASSETS / "canvas-mini", local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    out = pipe("A Cats image in Mosaic style.", num_inference_steps=4,
               generator=torch.Generator().manual_seed(0), output_type="np").images
    assert out.shape == (1, 32, 32, 3) and np.isfinite(out).all()


@needs_assets
def test_judge_accuracy_on_fresh_renders(canvas_judge):
    from erasekit.canvas.data import build

    data = build(per_cell=2, heldout=True)  # seeds never used in training
    pred = canvas_judge.classify(list(data.images))
    assert (pred["style"] == data.styles).mean() >= 0.97
    assert (pred["object"] == data.objects).mean() >= 0.97


@needs_assets
def test_canvas_mini_follows_prompts(canvas_pipe, canvas_judge):
    from erasekit.pipelines import Sampling, generate

    cells = [(0, 1), (3, 7), (6, 4), (9, 2)]  # a few (object, style) pairs
    prompts = [caption(OBJECTS[o], STYLES[s]) for o, s in cells]
    images = generate(canvas_pipe, prompts, [0] * len(prompts), Sampling(steps=25))
    pred = canvas_judge.classify(images)
    assert (pred["style"] == [s for _, s in cells]).mean() >= 0.75
    assert (pred["object"] == [o for o, _ in cells]).mean() >= 0.75
