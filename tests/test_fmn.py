"""FMN: the attention recorder, concept positions, re-steering on tiny pipelines, canvas behaviour."""

from __future__ import annotations

import pytest
import torch

import erasekit
from erasekit.erase.attention_maps import concept_positions
from erasekit.erase.fmn import FMNConfig, attention_recorder
from erasekit.errors import ConfigError
from erasekit.pipelines import FamilyAdapter

from _canvas_helpers import style_hits

FAST = dict(steps=3, images_per_prompt=1, batch_size=1, data_steps=2, progress=False)


def _inputs(pipe, prompts, seed=0):
    gen = torch.Generator().manual_seed(seed)
    n, c, s = len(prompts), pipe.unet.config.in_channels, pipe.unet.config.sample_size
    x, t = torch.randn(n, c, s, s, generator=gen), torch.randint(100, 900, (n,), generator=gen)
    return x, t, FamilyAdapter(pipe).encode(prompts).unet_kwargs(pipe)


def _sum_sq(pipe, x, t, kw, positions):
    with torch.no_grad(), attention_recorder(pipe.unet) as rec:
        rec.start(positions)
        out = pipe.unet(x, t, **kw).sample
    return rec.sum_sq, out


def test_recorder_keeps_the_attention_and_measures_the_concept_maps(tiny_pipe):
    prompts = ["a painting of Van Gogh", "a cat"]
    x, t, kw = _inputs(tiny_pipe, prompts)
    with torch.no_grad():
        plain = tiny_pipe.unet(x, t, **kw).sample
    before = dict(tiny_pipe.unet.attn_processors)
    a = torch.zeros(2, 77, dtype=torch.bool)
    a[:, 1:3] = True
    b = torch.zeros(2, 77, dtype=torch.bool)
    b[:, 5:9] = True
    sq_a, out = _sum_sq(tiny_pipe, x, t, kw, a)
    sq_b, _ = _sum_sq(tiny_pipe, x, t, kw, b)
    sq_ab, _ = _sum_sq(tiny_pipe, x, t, kw, a | b)
    sq_none, _ = _sum_sq(tiny_pipe, x, t, kw, torch.zeros(2, 77, dtype=torch.bool))
    assert torch.allclose(out, plain, atol=1e-5)   # recording does not change what the UNet computes
    assert {k: type(v) for k, v in tiny_pipe.unet.attn_processors.items()} == {k: type(v) for k, v in before.items()}
    assert torch.allclose(sq_ab, sq_a + sq_b, rtol=1e-5) and sq_a > 0 and sq_b > 0 and float(sq_none) == 0.0


def test_concept_positions_mark_the_words_and_the_end_token(tiny_sd1):
    adapter = FamilyAdapter(tiny_sd1)
    pos = concept_positions(adapter, ["a painting of Van Gogh", "Van Gogh sunflowers"], ["van gogh"], True)
    ids = adapter.tokenize(["a painting of Van Gogh"]).input_ids[0]
    n_vg = len(tiny_sd1.tokenizer("Van Gogh", add_special_tokens=False).input_ids)
    first = 4   # BOS a painting of
    # SD 1.x pads with the end token: the end token and every pad after it are marked, as in the reference
    assert pos[0, first:first + n_vg].all() and pos[0, first + n_vg:].all() and not pos[0, :first].any()
    assert ids[first + n_vg] == tiny_sd1.tokenizer.eos_token_id
    assert pos[1, 1:1 + n_vg].all() and not pos[1, 0]
    assert int(concept_positions(adapter, ["a painting of Van Gogh"], ["Van Gogh"], False).sum()) == n_vg
    with pytest.raises(ConfigError, match="concept_words"):
        concept_positions(adapter, ["a cat"], ["Van Gogh"], True)


def test_sd2_tokenizers_pad_with_another_token_so_only_the_end_token_is_marked(clip_tokenizer_dir):
    from conftest import build_tiny

    pipe = build_tiny("sd2", clip_tokenizer_dir)
    adapter = FamilyAdapter(pipe)
    pos = concept_positions(adapter, ["a painting of Van Gogh"], ["Van Gogh"], True)
    n_vg = len(pipe.tokenizer("Van Gogh", add_special_tokens=False).input_ids)
    assert int(pos.sum()) == n_vg + 1 and pos[0, 4 + n_vg] and not pos[0, 5 + n_vg:].any()


def test_training_lowers_the_concept_attention_and_restores_the_processors(tiny_pipe):
    prompts = ["a photo of Van Gogh"] * 4
    x, t, kw = _inputs(tiny_pipe, prompts, seed=3)
    pos = concept_positions(FamilyAdapter(tiny_pipe), prompts[:1], ["Van Gogh"], True).repeat(4, 1)
    start, _ = _sum_sq(tiny_pipe, x, t, kw, pos)
    procs = {k: type(v) for k, v in tiny_pipe.unet.attn_processors.items()}
    edit = erasekit.erase(tiny_pipe, "fmn", ["Van Gogh"], **dict(FAST, steps=30, lr=3e-3, param_set="xattn"))
    assert {k: type(v) for k, v in tiny_pipe.unet.attn_processors.items()} == procs
    with edit.applied(tiny_pipe):
        end, _ = _sum_sq(tiny_pipe, x, t, kw, pos)
    assert end < 0.5 * start
    assert edit.manifest["resolved"]["preset"] == "reference" and edit.manifest["concept_words"] == ["Van Gogh"]
    assert edit.manifest["forget_set"]["prompts"] == ["a photo of Van Gogh"]


def test_reference_prompts_follow_the_kind_and_only_upstream_weights_move(tiny_sd1):
    edit = erasekit.erase(tiny_sd1, "fmn", ["Monet"], kind="style", **FAST)
    assert edit.manifest["forget_set"]["prompts"] == ["a photo in the style of Monet"]
    assert edit.manifest["preset"]["values"]["param_set"] == "full"
    # the loss reads attention scores only: the layers after the last attention never move
    assert edit.keys and not {"unet/conv_out.weight", "unet/conv_norm_out.weight"} & set(edit.keys)
    assert "unet/conv_in.weight" in edit.keys


def test_resumed_fmn_equals_the_uninterrupted_run(tiny_sd1, tmp_path):
    full = erasekit.erase(tiny_sd1, "fmn", ["Van Gogh"], **dict(FAST, steps=4, lr=1e-4))
    opts = dict(FAST, lr=1e-4, checkpoint_dir=str(tmp_path), checkpoint_every=1)
    erasekit.erase(tiny_sd1, "fmn", ["Van Gogh"], **dict(opts, steps=2))
    resumed = erasekit.erase(tiny_sd1, "fmn", ["Van Gogh"], **dict(opts, steps=4))
    assert resumed.manifest["training"]["resumed_from"] == 2
    assert full.keys == resumed.keys and all(torch.equal(full.weights[k], resumed.weights[k]) for k in full.keys)


@pytest.mark.parametrize("bad", [dict(batch_size=0), dict(preset="x"), dict(prompts=[]), dict(concept_words=[" "]),
                                 dict(images_per_prompt=0), dict(use_pooler="yes"), dict(data_steps=0)])
def test_bad_options_are_refused(bad):
    with pytest.raises(ConfigError, match=f"`{next(iter(bad))}`"):
        FMNConfig(**bad)


def test_fmn_erases_a_canvas_style_and_keeps_the_others(canvas_pipe, canvas_judge):
    edit = erasekit.erase(canvas_pipe, "fmn", ["Van_Gogh"], progress=False)
    with edit.applied(canvas_pipe):
        hit = style_hits(canvas_pipe, canvas_judge, ("Van_Gogh", "Pop_Art", "Winter"))
    assert sum(hit[:5]) <= 1    # UA >= 80 % (the base model draws all 15 in their styles)
    assert sum(hit[5:]) >= 8    # IRA >= 80 % on the other styles
