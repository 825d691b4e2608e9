"""ESD: parameter sets, the eta convention, x_t sampling, mechanics on every family, canvas behaviour."""

from __future__ import annotations

import pytest
import torch

import erasekit
from erasekit.erase.esd import ESDConfig, _ddim, esd_target, eta_from_rewrite, sample_partway
from erasekit.erase.param_sets import select_params
from erasekit.errors import ConfigError
from erasekit.pipelines import FamilyAdapter


def _unet_state(pipe):
    return {k: v.clone() for k, v in pipe.unet.state_dict().items()}


def test_eta_conventions_agree():
    e_0, e_p = torch.randn(4), torch.randn(4)
    assert eta_from_rewrite(2.0) == 1.0 and eta_from_rewrite(1.0) == 0.0
    # paper form e_0 - eta (e_p - e_0) == rewrite form e_p - eta_code (e_p - e_0) with eta_code = eta + 1
    for eta in (0.0, 1.0, 2.5):
        assert torch.allclose(esd_target(e_0, e_p, e_p, eta), e_0 - eta * (e_p - e_0), atol=1e-6)
        assert torch.allclose(esd_target(e_0, e_p, e_p, eta), e_p - (eta + 1) * (e_p - e_0), atol=1e-6)
    assert torch.allclose(esd_target(e_0, e_p, e_p, 0.0), e_0, atol=1e-6)  # eta = 0: map onto ""


def test_partial_sampling_matches_the_diffusers_ddim_pipeline(tiny_sd1):
    sched = _ddim(tiny_sd1, 6)
    ctx = FamilyAdapter(tiny_sd1).encode(["", "a cat"])
    z = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))

    def predict(x, t, c):
        return tiny_sd1.unet(x, t, **c.unet_kwargs(tiny_sd1)).sample

    assert torch.equal(sample_partway(predict, z, sched, 0, ctx, 3.0), z)
    ours = sample_partway(predict, z, sched, 6, ctx, 3.0)
    from diffusers import DDIMScheduler

    tiny_sd1.scheduler = DDIMScheduler.from_config(tiny_sd1.scheduler.config)
    ref = tiny_sd1(prompt="a cat", latents=z.clone(), num_inference_steps=6, guidance_scale=3.0,
                   output_type="latent").images
    assert torch.allclose(ours, ref, atol=1e-5)


def test_esd_x_touches_only_cross_attention_and_leaves_the_pipeline(tiny_pipe):
    before = _unet_state(tiny_pipe)
    edit = erasekit.erase(tiny_pipe, "esd", ["Van Gogh"], steps=3, progress=False)
    assert _unet_state(tiny_pipe).keys() == before.keys()
    assert all(torch.equal(v, before[k]) for k, v in _unet_state(tiny_pipe).items())
    assert set(edit.keys) == set(select_params(tiny_pipe, "esd-x"))
    assert edit.manifest["method"] == "esd" and edit.manifest["config"]["eta"] == 1.0
    assert edit.manifest["resolved"]["preset"] == "sd"   # not canvas-mini: the paper's defaults
    with edit.applied(tiny_pipe):
        assert any(not torch.equal(v, before[k]) for k, v in _unet_state(tiny_pipe).items())
    assert all(torch.equal(v, before[k]) for k, v in _unet_state(tiny_pipe).items())


def test_training_moves_the_concept_prediction_onto_the_target(tiny_sd1):
    ctx = FamilyAdapter(tiny_sd1).encode(["", "a cat"])
    gen = torch.Generator().manual_seed(1)
    x, t = torch.randn(8, 4, 8, 8, generator=gen), torch.randint(100, 900, (8,), generator=gen)

    def gap():
        with torch.no_grad():
            out = tiny_sd1.unet(torch.cat([x, x]), torch.cat([t, t]),
                                encoder_hidden_states=ctx.embeds.repeat_interleave(8, 0)).sample
        e_0, e_p = out.chunk(2)
        return (e_p - esd_target(e_0_ref, e_p_ref, e_p_ref, 1.0)).pow(2).mean()

    with torch.no_grad():
        e_0_ref, e_p_ref = tiny_sd1.unet(torch.cat([x, x]), torch.cat([t, t]),
                                         encoder_hidden_states=ctx.embeds.repeat_interleave(8, 0)).sample.chunk(2)
    start = gap()
    edit = erasekit.erase(tiny_sd1, "esd", ["a cat"], steps=30, lr=1e-3, ddim_steps=20, progress=False)
    with edit.applied(tiny_sd1):
        end = gap()
    assert end < 0.3 * start


def test_attribute_variant_and_several_concepts_run(tiny_sd1):
    edit = erasekit.erase(tiny_sd1, "esd", ["a red hat", "a blue hat"], erase_from="a hat", sampler="trained",
                          param_set="esd-x-strict", eta=0.0, steps=2, progress=False)
    assert set(edit.keys) == set(select_params(tiny_sd1, "esd-x-strict"))


def test_canvas_labels_are_erased_from_their_captions_as_attributes(canvas_pipe):
    from erasekit.canvas.world import OBJECTS, STYLES, caption
    from erasekit.erase.esd import esd_pairs
    from erasekit.presets import concept_context

    def pairs(concepts, config, pipe=canvas_pipe):
        return esd_pairs(concepts, config, concept_context(pipe, concepts, config))

    style = pairs(["Van Gogh"], ESDConfig())
    assert style == [("Van Gogh style.", caption(o, "Van_Gogh")) for o in OBJECTS]
    obj = pairs(["Cats", "Pop_Art"], ESDConfig())   # several concepts: each paired with its own captions
    assert obj[:10] == [("A Cats image.", caption("Cats", s)) for s in STYLES]
    assert all(c == "Pop Art style." and "Pop Art" in f for c, f in obj[10:])
    assert pairs(["Cats"], ESDConfig(prompt_form="caption")) == [(caption("Cats", s), None) for s in STYLES]
    assert pairs(["Van Gogh"], ESDConfig(), None) == [("Van Gogh", None)]   # another model: the concept itself
    assert pairs(["a red hat"], ESDConfig(allow_unknown_concept=True)) == [("a red hat", None)]
    assert pairs(["x"], ESDConfig(prompts=["p", "q"], erase_from=["f"]), None) == [("p", "f"), ("q", "f")]


def test_resumed_esd_equals_the_uninterrupted_run(tiny_sd1, tmp_path):
    full = erasekit.erase(tiny_sd1, "esd", ["Van Gogh"], steps=4, progress=False)
    opts = dict(progress=False, checkpoint_dir=str(tmp_path), checkpoint_every=1)
    erasekit.erase(tiny_sd1, "esd", ["Van Gogh"], steps=2, **opts)  # stopped half-way
    resumed = erasekit.erase(tiny_sd1, "esd", ["Van Gogh"], steps=4, **opts)
    assert resumed.manifest["training"]["resumed_from"] == 2
    assert all(torch.equal(full.weights[k], resumed.weights[k]) for k in full.keys)


@pytest.mark.parametrize("bad", [dict(sampler="ddpm"), dict(preset="xl"), dict(eta=-1.0), dict(ddim_steps=0),
                                 dict(prompt_form="labels"), dict(erase_from=[]), dict(erase_from=["ok", " "])])
def test_bad_options_are_refused(bad):
    with pytest.raises(ConfigError, match=f"`{next(iter(bad))}`"):
        ESDConfig(**bad)


def test_unknown_param_set_leaves_the_pipeline(tiny_sd1):
    before = _unet_state(tiny_sd1)
    with pytest.raises(ConfigError, match="param_set"):
        erasekit.erase(tiny_sd1, "esd", ["Van Gogh"], param_set="attn3", steps=1)
    assert all(torch.equal(v, before[k]) for k, v in _unet_state(tiny_sd1).items())


@pytest.mark.slow
def test_esd_x_erases_a_canvas_style_and_keeps_another(canvas_pipe, canvas_judge):
    from erasekit.canvas.world import OBJECTS, caption
    from erasekit.pipelines import generate

    prompts = [caption(o, s) for s in ("Van_Gogh", "Pop_Art") for o in OBJECTS]
    seeds = list(range(len(prompts)))
    edit = erasekit.erase(canvas_pipe, "esd", ["Van Gogh"], progress=False)
    with edit.applied(canvas_pipe):
        styles = canvas_judge.classify(generate(canvas_pipe, prompts, seeds))["style"]
    vg, pop = canvas_judge.find("Van_Gogh")[1], canvas_judge.find("Pop_Art")[1]
    assert (styles[:10] == vg).mean() <= 0.2
    assert (styles[10:] == pop).mean() >= 0.8
