"""Concept Ablation: prompt pairs per preset, both losses on tiny pipelines, resume, canvas behaviour."""

from __future__ import annotations

import pytest
import torch

import erasekit
from erasekit.erase.ca import CAConfig, make_pairs
from erasekit.errors import ConfigError
from erasekit.pipelines import FamilyAdapter
from erasekit.presets import concept_context

from _canvas_helpers import style_hits

FAST = dict(steps=3, images_per_prompt=1, batch_size=2, data_steps=2, progress=False)


def _pairs(concepts, pipe=None, **kw):
    config = CAConfig(**kw)
    return make_pairs(concepts, config, concept_context(pipe, concepts, config))


def test_pairs_per_preset():
    name, opts, pairs = _pairs(["Van Gogh"], kind="style")
    assert name == "style" and opts["anchor"] == "painting" and opts["param_set"] == "kv" and len(pairs) == 10
    assert pairs[0] == ("a painting of a quiet harbour at dawn, in the style of Van Gogh",
                        "a painting of a quiet harbour at dawn")
    assert pairs[1][0].startswith("in Van Gogh's style, a painting of")
    name, opts, pairs = _pairs(["Grumpy Cat"], anchor="cat")   # kind other: the object preset
    assert name == "object" and all(a.count("cat") == 1 and t == a.replace("cat", "Grumpy Cat") for t, a in pairs)
    name, opts, pairs = _pairs(["nudity"])
    assert name == "nudity" and opts["prior_preservation"] and opts["param_set"] == "attn"
    assert pairs[0] == ("nudity, a photo of a man", "a photo of a man")
    with pytest.raises(ConfigError, match="`anchor`"):
        _pairs(["Grumpy Cat"])
    _, _, given = _pairs(["x"], anchor_prompts=["a dog", "two dogs"], target_prompts=["a wolf", "two wolves"])
    assert given == [("a wolf", "a dog"), ("two wolves", "two dogs")]


def test_canvas_pairs_map_each_caption_to_the_next_style(canvas_pipe):
    name, opts, pairs = _pairs(["Van_Gogh"], canvas_pipe)
    assert name == "canvas" and len(pairs) == 10
    assert ("A Cats image in Van Gogh style.", "A Cats image in Watercolor style.") in pairs


def _gap(pipe, x, t, kw_target, kw_anchor):
    with torch.no_grad():
        return (pipe.unet(x, t, **kw_target).sample - pipe.unet(x, t, **kw_anchor).sample).pow(2).mean()


def test_model_based_ca_brings_the_target_prediction_onto_the_anchor(tiny_pipe):
    adapter = FamilyAdapter(tiny_pipe)
    gen = torch.Generator().manual_seed(2)
    s = tiny_pipe.unet.config.sample_size
    x, t = torch.randn(4, 4, s, s, generator=gen), torch.randint(100, 900, (4,), generator=gen)
    kw_t = adapter.encode(["a photo of a Grumpy Cat"] * 4).unet_kwargs(tiny_pipe)
    kw_a = adapter.encode(["a photo of a cat"] * 4).unet_kwargs(tiny_pipe)
    start = _gap(tiny_pipe, x, t, kw_t, kw_a)
    before = {k: v.clone() for k, v in tiny_pipe.unet.state_dict().items()}
    edit = erasekit.erase(tiny_pipe, "ca", ["Grumpy Cat"], anchor="cat", **dict(FAST, steps=30, lr=1e-2))
    assert all(torch.equal(v, before[k]) for k, v in tiny_pipe.unet.state_dict().items())
    assert {k.rsplit(".", 2)[-2] for k in edit.keys} <= {"to_k", "to_v"}   # kv: attn2 keys and values only
    with edit.applied(tiny_pipe):
        end = _gap(tiny_pipe, x, t, kw_t, kw_a)
    assert end < 0.6 * start
    assert edit.manifest["loss"] == "model" and edit.manifest["resolved"]["preset"] == "object"


def test_noise_based_loss_and_groups_run(tiny_sd1):
    edit = erasekit.erase(tiny_sd1, "ca", ["Van Gogh"], kind="style", loss="noise", param_set="attn",
                          prior_preservation=True, **FAST)
    assert any(".attn1." in k for k in edit.keys) and any(".attn2.to_q" in k for k in edit.keys)
    full = erasekit.erase(tiny_sd1, "ca", ["Van Gogh"], kind="style", param_set="full-weight", **FAST)
    assert "unet/conv_in.weight" in full.keys
    model = erasekit.erase(tiny_sd1, "ca", ["Van Gogh"], kind="style", param_set="attn", **FAST)
    assert any(not torch.equal(model.weights[k], edit.weights[k]) for k in edit.keys)   # the losses differ


def test_resumed_ca_equals_the_uninterrupted_run(tiny_sd1, tmp_path):
    opts = dict(FAST, anchor="cat", lr=1e-4)
    full = erasekit.erase(tiny_sd1, "ca", ["Grumpy Cat"], **dict(opts, steps=4))
    ck = dict(opts, checkpoint_dir=str(tmp_path), checkpoint_every=1)
    erasekit.erase(tiny_sd1, "ca", ["Grumpy Cat"], **dict(ck, steps=2))
    resumed = erasekit.erase(tiny_sd1, "ca", ["Grumpy Cat"], **dict(ck, steps=4))
    assert resumed.manifest["training"]["resumed_from"] == 2
    assert all(torch.equal(full.weights[k], resumed.weights[k]) for k in full.keys)


@pytest.mark.parametrize("bad", [dict(loss="score"), dict(preset="x"), dict(anchor=" "), dict(anchor_prompts=[]),
                                 dict(batch_size=0), dict(prior_weight=-1.0), dict(images_per_prompt=0),
                                 dict(data_steps=0)])
def test_bad_options_are_refused(bad):
    with pytest.raises(ConfigError, match=f"`{next(iter(bad))}`"):
        CAConfig(**bad)


def test_target_prompts_need_anchor_prompts_of_the_same_length():
    with pytest.raises(ConfigError, match="`target_prompts`"):
        CAConfig(target_prompts=["a wolf"])
    with pytest.raises(ConfigError, match="`target_prompts`"):
        CAConfig(anchor_prompts=["a dog", "two dogs"], target_prompts=["a wolf"])


# About 15 s: in the slow suite (python -m pytest -m slow tests/test_ca.py) so the default suite keeps its
# 10-minute budget; the tiny-pipeline tests above check CA's losses and trained set.
@pytest.mark.slow
def test_ca_erases_a_canvas_style_and_keeps_the_others(canvas_pipe, canvas_judge):
    edit = erasekit.erase(canvas_pipe, "ca", ["Van_Gogh"], progress=False)
    with edit.applied(canvas_pipe):
        hit = style_hits(canvas_pipe, canvas_judge, ("Van_Gogh", "Pop_Art", "Winter"))
    assert sum(hit[:5]) <= 1    # UA >= 80 % (the base model draws all 15 in their styles)
    assert sum(hit[5:]) >= 8    # IRA >= 80 % on the other styles
