"""The canvas-mini-mmdit recipe (erasekit.canvas.train_mmdit) on a tiny transformer and 100 renders:
its text encoders, that training learns, that a killed run resumes exactly, and that the export is
an SD 3 pipeline erasekit loads and samples."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

from erasekit.canvas import configs as C

ASSETS = Path(__file__).resolve().parents[1] / "erasekit" / "assets"
pytestmark = pytest.mark.skipif(not (ASSETS / "canvas-mini" / "model_index.json").exists()
                                or not (ASSETS / "canvas-clip" / "model.safetensors").exists(),
                                reason="canvas-mini / canvas-clip assets are not built")

TINY = dict(C.MMDIT_TRANSFORMER, num_layers=1, attention_head_dim=8, num_attention_heads=2, caption_projection_dim=16)
RECIPE = dict(batch=8, lr=3e-3, per_cell=1, transformer_config=TINY, device="cpu", progress=False, warmup=1,
              export_every=0)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    """One render set (1 image per cell) and its latents, copied into each test's run folder."""
    from erasekit.canvas.data import load_or_build
    from erasekit.canvas.train_mmdit import canvas_vae, encode_latents

    d = tmp_path_factory.mktemp("canvas-mmdit-data")
    encode_latents(d, load_or_build(d / "train.npz", per_cell=1), canvas_vae())
    return d


def _run(data_dir: Path, path: Path) -> Path:
    path.mkdir()
    for f in data_dir.iterdir():
        shutil.copy(f, path / f.name)
    return path


def test_canvas_clip_text_tower_converts_exactly():
    import open_clip

    from erasekit.canvas.clip import load_clip
    from erasekit.canvas.train_mmdit import text_encoders

    _, _, te2, tok2 = text_encoders()
    clip, _, _ = load_clip()
    captions = ["A Cats image in Mosaic style.", "Dogs, Van Gogh style"]
    ids = tok2(captions, padding="max_length", max_length=77, return_tensors="pt").input_ids
    assert torch.equal(ids, open_clip.tokenize(captions))    # SD 3's tokenizer_2 pads with "!" = id 0
    with torch.no_grad():
        torch.testing.assert_close(te2(ids).text_embeds, clip.encode_text(ids), atol=1e-5, rtol=1e-5)


def test_training_lowers_loss_on_a_fixed_batch(data_dir, tmp_path):
    from erasekit.canvas.train_mmdit import fixed_batch_loss, train

    run = _run(data_dir, tmp_path / "run")
    train(run, steps=1, **RECIPE)
    before = fixed_batch_loss(run)
    train(run, steps=40, **RECIPE)
    after = fixed_batch_loss(run)
    assert after < 0.8 * before, (before, after)


class _Killed(Exception):
    pass


def test_killed_run_resumes_to_the_same_weights(data_dir, tmp_path):
    from erasekit._io import load_tensors
    from erasekit.canvas.train_mmdit import train

    whole = _run(data_dir, tmp_path / "whole")
    train(whole, steps=6, ckpt_every=2, seed=3, **RECIPE)

    def kill(step, _loss):
        if step == 5:
            raise _Killed

    parts = _run(data_dir, tmp_path / "parts")
    with pytest.raises(_Killed):
        train(parts, steps=6, ckpt_every=2, seed=3, on_step=kill, **RECIPE)
    assert load_tensors(parts / "mmdit.ckpt.safetensors")[1]["step"] == "4"
    train(parts, steps=6, ckpt_every=2, seed=3, **RECIPE)
    a, meta_a = load_tensors(whole / "mmdit.ckpt.safetensors")
    b, meta_b = load_tensors(parts / "mmdit.ckpt.safetensors")
    assert meta_a["step"] == meta_b["step"] == "6"
    weights = [k for k in a if k.startswith(("transformer.", "ema."))]
    assert weights and all(torch.equal(a[k], b[k]) for k in weights)


def test_export_loads_as_sd3_and_generates(data_dir, tmp_path):
    import numpy as np

    from erasekit.canvas.train_mmdit import export, text_encoders, train
    from erasekit.pipelines import default_sampling, detect_family, generate, load_pipeline

    run = _run(data_dir, tmp_path / "run")
    train(run, steps=2, **RECIPE)
    out = export(run, tmp_path / "pipe")
    assert (out / "tokenizer" / "vocab.json").exists() and not (out / "text_encoder_3").exists()
    pipe = load_pipeline(out)
    assert type(pipe).__name__ == "StableDiffusion3Pipeline" and detect_family(pipe) == "sd3"
    assert pipe.transformer.config.num_layers == TINY["num_layers"]
    assert pipe.tokenizer_2.pad_token == "!" and pipe.tokenizer.pad_token == "<|endoftext|>"
    # text encoders shipped in float16, read back as float32: exactly the values the transformer trained on
    te, _, te2, _ = text_encoders()
    for loaded, trained in ((pipe.text_encoder, te), (pipe.text_encoder_2, te2)):
        assert loaded.dtype == torch.float32
        assert all(torch.equal(a, b) for a, b in zip(loaded.state_dict().values(), trained.state_dict().values()))
    sampling = default_sampling(pipe, steps=2, batch_size=2)
    assert sampling.sampler == "flow_euler"
    images = generate(pipe, ["A Cats image in Mosaic style.", "A Dogs image in Sketch style."], [0, 1], sampling,
                      check=False)
    assert [im.size for im in images] == [(32, 32)] * 2
    again = generate(pipe, "A Cats image in Mosaic style.", 0, sampling, check=False)
    assert np.array_equal(np.asarray(images[0]), np.asarray(again[0]))


def test_collapsed_t5_rows_give_the_same_outputs_and_gradients():
    """Training computes the 256 identical T5 zero rows once (RepeatedLastRowAttention); the transformer must
    give what it gives on all rows, outputs and gradients, and the collapse must keep distinct rows."""
    from diffusers import SD3Transformer2DModel

    from erasekit.canvas.train_mmdit import RepeatedLastRowAttention, collapse_repeated_rows

    torch.manual_seed(0)
    cfg = dict(TINY, num_layers=2)
    full = SD3Transformer2DModel(**cfg)
    cut = SD3Transformer2DModel(**cfg)
    cut.load_state_dict(full.state_dict())
    rows = torch.cat([torch.randn(3, 5, cfg["joint_attention_dim"]), torch.zeros(3, 40, cfg["joint_attention_dim"])], 1)
    empty = torch.cat([torch.randn(5, cfg["joint_attention_dim"]), torch.zeros(40, cfg["joint_attention_dim"])])
    copies, (short, short_empty) = collapse_repeated_rows(rows, empty)
    assert copies == 40 and short.shape[1] == 6 and short_empty.shape[0] == 6
    assert collapse_repeated_rows(torch.randn(3, 7, 4))[0] == 1        # distinct rows are all kept
    cut.set_attn_processor(RepeatedLastRowAttention(copies))
    x = torch.randn(3, 4, C.LATENT_SIZE, C.LATENT_SIZE)
    pooled, t = torch.randn(3, cfg["pooled_projection_dim"]), torch.tensor([100.0, 500.0, 900.0])
    a = full(hidden_states=x, encoder_hidden_states=rows, pooled_projections=pooled, timestep=t).sample
    b = cut(hidden_states=x, encoder_hidden_states=short, pooled_projections=pooled, timestep=t).sample
    torch.testing.assert_close(b, a, atol=1e-5, rtol=1e-4)
    (a ** 2).mean().backward()
    (b ** 2).mean().backward()
    for (name, p), q in zip(full.named_parameters(), cut.parameters()):
        torch.testing.assert_close(q.grad, p.grad, atol=1e-6, rtol=1e-3, msg=name)
