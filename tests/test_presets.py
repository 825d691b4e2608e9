"""Presets are chosen by the model, never by the concept's name (erasekit.presets).

The same concept names ("Van Gogh", "Cats", "Pop Art", "nudity") resolve canvas-mini's presets
only on canvas-mini, recognised by the marker its model files carry, and the papers' defaults on
any other model: a tiny sd1 pipeline, and the full-size SD 1.4 architecture built from config
(on the meta device for resolution, with random weights for a real UCE erase, marked slow). A
method that branched on the concept's name would give the canvas presets on those models too.
"""

from __future__ import annotations

import json
import logging

import pytest
import torch

import erasekit
from erasekit.erase import advunlearn, esd, salun, sfd, uce
from erasekit.errors import ConfigError
from erasekit.presets import MARKER, PAPER, concept_context, provider_for

REAL = ["Van Gogh", "Cats", "Pop Art", "nudity"]
CANVAS_WORDS = (" image in ", " style.", "Cubism", "Architectures")   # what canvas-mini's presets put in prompts


def sd14(device: str = "meta"):
    """SD 1.4's UNet and text encoder from config (random weights; no memory on ``meta``), CLIP's tokenizer."""
    from erasekit.canvas.full_size import sd14_random

    return sd14_random(device=device)


@pytest.fixture(scope="module")
def sd14_meta():
    return sd14("meta")


def _no_canvas(values) -> None:
    text = json.dumps(values)
    assert not any(w in text for w in CANVAS_WORDS), f"canvas-mini presets leaked: {text[:300]}"


def resolved(pipe, concept: str, **options) -> dict:
    """What each method resolves for ``concept`` on ``pipe`` (no training, no data)."""
    out = {}
    c = uce.UCEConfig(**options)
    out["uce"] = uce.resolve(c, [concept], pipe).to_dict()
    c = esd.ESDConfig(**options)
    ctx = concept_context(pipe, [concept], c)
    out["esd"] = {**c.resolved(ctx), "pairs": esd.esd_pairs([concept], c, ctx)}
    c = salun.SalUnConfig(pseudo="a dog", retain_prompts=["a tree"], **options)
    plan = salun.make_plan([concept], c, concept_context(pipe, [concept], c))
    out["salun"] = {**salun._resolve(plan, c), "forget": plan.forget_prompts}
    c = advunlearn.AdvUnlearnConfig(**options)
    ctx = concept_context(pipe, [concept], c)
    out["advunlearn"] = {**advunlearn.preset(pipe, [concept], c, ctx),
                         "prompts": advunlearn.concept_prompts([concept], "auto", ctx),
                         "retain": advunlearn.retain_prompts([concept], "auto", ctx)[:3]}
    out["sfd"] = sfd_resolved(pipe, concept, **options)
    return out


def sfd_resolved(pipe, concept: str, **options) -> dict:
    """SFD's prompts, preset name and every preset option as resolved for ``concept`` on ``pipe``."""
    c = sfd.SFDConfig(retain_prompts=("a tree",), **options)
    ctx = concept_context(pipe, [concept], c)
    sets = sfd.prompt_sets([concept], c, ctx)
    full, name = sfd.resolve(pipe, [concept], c, ctx)
    return {"forget": sets.forget, "choices": [ch for _, ch in sets.swaps], "preset": name,
            **{k: getattr(full, k) for k in sfd.PRESET_KEYS}}


# SFD's reference SD v1.5 recipe (sfd.md section 6, docs/presets.md) and canvas-mini's measured values.
SFD_REFERENCE = dict(iterations=12_500, distill_iterations=12_500, batch_size=8, forget_batch_size=8, lr_psi=3e-6,
                     lr_theta=1e-6, adam_betas=(0.0, 0.999), adam_eps=1e-6, alpha=1.0, lam_g_r=1.0, lam_g_f=1.0,
                     lam_sg_r=1.0, lam_sg_f=1.0, t_init=625, t_min=20, t_max=979, kappa=4.5, cfg_dropout=0.1,
                     grad_clip=1.0, ema_decay=0.0, pseudo_label="next")
SFD_CANVAS = dict(iterations=200, distill_iterations=400, batch_size=10, forget_batch_size=2, lr_psi=3e-4,
                  lr_theta=1e-4, adam_betas=(0.0, 0.999), adam_eps=1e-6, alpha=1.0, lam_g_r=1.0, lam_g_f=0.1,
                  lam_sg_r=1.0, lam_sg_f=1.0, t_init=625, t_min=20, t_max=979, kappa=1.5, cfg_dropout=0.1,
                  grad_clip=1.0, ema_decay=0.0, pseudo_label="next", mixed_precision="no",
                  gradient_checkpointing=False)


def _sfd_numbers(r: dict) -> dict:
    return {k: v for k, v in r["sfd"].items() if k not in ("forget", "choices", "preset")}


def _check_paper(r: dict, concept: str, full_size: bool = False) -> None:
    """The papers' defaults (docs/presets.md) for ``concept`` with its guessed kind (on a CPU or meta model)."""
    nude = concept == "nudity"
    assert r["uce"]["preset"] == ("nudity" if nude else "default")
    assert (r["uce"]["guides"], r["uce"]["token_policy"], r["uce"]["templates"]) == (
        [" " if nude else ""], "aligned_tail", ["{}"])
    assert r["uce"]["preserve"] == [""] and r["uce"]["preserve_scale"] == 1.0 and r["uce"]["lamb"] == 0.5
    assert (r["esd"]["preset"], r["esd"]["steps"], r["esd"]["lr"], r["esd"]["ddim_steps"]) == ("sd", 1000, 1e-5, 50)
    assert r["esd"]["param_set"] == ("esd-u" if nude else "esd-x") and r["esd"]["pairs"] == [(concept, None)]
    assert r["salun"]["preset"] == ("nudity" if nude else "custom") and r["salun"]["param_set"] == "full"
    assert r["salun"]["lr"] == 1e-5 and r["salun"]["alpha"] == (0.1 if nude else 0.5)
    a = r["advunlearn"]
    assert (a["steps"], a["lr"], a["k"], a["attack_steps"], a["ddim_steps"], a["eta"]) == (1000, 1e-5, 1, 30, 50, 1.0)
    assert a["gamma"] == (0.3 if nude else 0.5) and a["prompts"] == [concept]
    assert all(p.startswith("a photo of a ") for p in a["retain"])
    assert (r["sfd"]["forget"], r["sfd"]["choices"], r["sfd"]["preset"]) == ([concept], [[""]], "reference")
    assert _sfd_numbers(r) == {**SFD_REFERENCE, "mixed_precision": "no", "gradient_checkpointing": full_size}
    _no_canvas(r)


# -- which provider ----------------------------------------------------------------------------
def test_canvas_mini_is_recognised_by_its_model_files(canvas_pipe, tiny_sd1):
    from diffusers import DiffusionPipeline

    from erasekit.pipelines.loading import builtin_path

    assert provider_for(canvas_pipe).name == "canvas-mini" and provider_for(tiny_sd1) is PAPER
    direct = DiffusionPipeline.from_pretrained(builtin_path("canvas-mini"), local_files_only=True,
                                               safety_checker=None, requires_safety_checker=False)
    assert provider_for(direct).name == "canvas-mini"   # loaded with diffusers alone: the files carry it
    tiny_sd1.text_encoder.config.erasekit_world = "another-world"
    with pytest.raises(ConfigError, match="another-world"):
        provider_for(tiny_sd1)


def test_the_pipeline_decides_not_the_concept_name(tiny_sd1):
    """One tiny pipeline, one concept: the canvas presets appear only once the model says it is canvas-mini."""
    before = uce.resolve(uce.UCEConfig(), ["Van Gogh"], tiny_sd1)
    setattr(tiny_sd1.text_encoder.config, MARKER, "canvas-mini")
    after = uce.resolve(uce.UCEConfig(), ["Van Gogh"], tiny_sd1)
    assert before.preset == "default" and after.preset == "canvas-style" and after.guides == ["Cubism"]


# -- real models: the papers' defaults ----------------------------------------------------------
@pytest.mark.parametrize("concept", REAL)
def test_real_model_concepts_resolve_paper_presets(tiny_sd1, concept):
    _check_paper(resolved(tiny_sd1, concept), concept)


def test_full_size_sd14_resolves_paper_presets(sd14_meta):
    for concept in REAL:
        _check_paper(resolved(sd14_meta, concept), concept, full_size=True)
    a = advunlearn.preset(sd14_meta, ["Van Gogh"], advunlearn.AdvUnlearnConfig())
    assert a["gradient_checkpointing"] is True   # a full-size UNet checkpoints its activations


def test_sfd_reference_precision_follows_the_device_and_size(tiny_sd1):
    """bf16 autocast on a GPU, gradient checkpointing for full-size UNets; neither on a tiny CPU model."""
    from types import SimpleNamespace

    big_gpu = SimpleNamespace(unet=SimpleNamespace(device=torch.device("cuda"), config=SimpleNamespace(sample_size=64)))
    assert {k: sfd.reference_preset(big_gpu)[k] for k in ("mixed_precision", "gradient_checkpointing")} == {
        "mixed_precision": "bf16", "gradient_checkpointing": True}
    assert {k: sfd_resolved(tiny_sd1, "cat")[k] for k in ("mixed_precision", "gradient_checkpointing")} == {
        "mixed_precision": "no", "gradient_checkpointing": False}


def test_sfd_given_options_win_over_either_preset(tiny_sd1, canvas_pipe):
    given = dict(kappa=2.0, iterations=3, lam_g_f=0.5, mixed_precision="bf16", gradient_checkpointing=True)
    for pipe, base in ((tiny_sd1, SFD_REFERENCE), (canvas_pipe, SFD_CANVAS)):
        r = _sfd_numbers({"sfd": sfd_resolved(pipe, "Van Gogh", **given)})
        assert r == {**base, "mixed_precision": "no", "gradient_checkpointing": False, **given}


def test_sfd_records_the_reference_recipe_on_real_models(tiny_sd1):
    m = erasekit.erase(tiny_sd1, "sfd", ["cat"], iterations=1, distill_iterations=0, batch_size=1,
                       forget_batch_size=1, retain_prompts=("a photo of a dog",), checkpoint_dir=None,
                       progress=False).manifest
    assert (m["preset"]["provider"], m["preset"]["name"]) == ("paper", "reference")
    expected = {**SFD_REFERENCE, "iterations": 1, "distill_iterations": 0, "batch_size": 1, "forget_batch_size": 1,
                "adam_betas": [0.0, 0.999], "mixed_precision": "no", "gradient_checkpointing": False}
    assert {k: m["preset"]["values"][k] for k in expected} == expected
    assert {k: m["resolved"][k] for k in expected} == expected


def test_explicit_kind_selects_the_kind_presets(tiny_sd1):
    style = resolved(tiny_sd1, "Van Gogh", kind="style")
    assert style["uce"]["preset"] == "style" and style["uce"]["guides"] == ["art"]
    assert style["uce"]["preserve_scale"] == 0.1
    nude = resolved(tiny_sd1, "naked bodies", kind="nudity")
    assert nude["esd"]["param_set"] == "esd-u" and nude["advunlearn"]["gamma"] == 0.3
    assert nude["salun"]["preset"] == "nudity"
    assert "a photo of a person" not in advunlearn.retain_prompts(
        ["naked bodies"], "coco", concept_context(tiny_sd1, ["naked bodies"], uce.UCEConfig(kind="nudity")))
    with pytest.raises(ConfigError, match="`kind`"):
        uce.UCEConfig(kind="artist")


def test_the_guess_is_logged_and_recorded_with_every_value(tiny_sd1, caplog):
    with caplog.at_level(logging.INFO, logger="erasekit.presets"):
        edit = erasekit.erase(tiny_sd1, "uce", ["nudity"])
    assert "'nudity': nudity" in caplog.text and "paper" in caplog.text
    m = json.loads(json.dumps(edit.manifest))
    assert (m["kind"], m["kinds"], m["kind_guessed"]) == ("nudity", {"nudity": "nudity"}, True)
    assert m["preset"]["provider"] == "paper" and m["preset"]["name"] == "nudity"
    values = m["preset"]["values"]
    assert (values["guides"], values["preserve_scale"], values["lamb"], values["token_policy"]) == (
        [" "], 1.0, 0.5, "aligned_tail")
    assert m["resolved"]["guides"] == [" "]   # what was recorded before stays
    given = erasekit.erase(tiny_sd1, "uce", ["Van Gogh"], kind="style").manifest
    assert (given["kind"], given["kind_guessed"], given["preset"]["name"]) == ("style", False, "style")
    assert given["preset"]["values"]["guides"] == ["art"]


def test_a_fragmented_concept_is_warned_about_on_real_models(tiny_sd1, caplog):
    with caplog.at_level(logging.WARNING, logger="erasekit.presets"):
        concept_context(tiny_sd1, ["Van Gogh", "nudity", "Pop Art"], None)
        assert "splits into many short tokens" not in caplog.text
        concept_context(tiny_sd1, ["Zqxvbnm"], None)
    assert "'Zqxvbnm' splits into many short tokens" in caplog.text


# -- canvas-mini: its presets, its world ----------------------------------------------------------
def test_canvas_presets_resolve_on_canvas_mini(canvas_pipe):
    r = resolved(canvas_pipe, "Van Gogh")
    assert r["uce"]["preset"] == "canvas-style" and r["uce"]["guides"] == ["Cubism"]
    assert (r["uce"]["token_policy"], r["uce"]["preserve_scale"]) == ("all_77", 0.3)
    assert "A Cats image in {} style." in r["uce"]["templates"]
    assert (r["esd"]["preset"], r["esd"]["steps"], r["esd"]["lr"], r["esd"]["ddim_steps"]) == ("canvas", 400, 1e-3, 20)
    assert r["esd"]["pairs"][0] == ("Van Gogh style.", "A Architectures image in Van Gogh style.")
    assert (r["salun"]["preset"], r["salun"]["param_set"], r["salun"]["lr"]) == ("canvas", "xattn", 1e-4)
    assert (r["advunlearn"]["k"], r["advunlearn"]["steps"], r["advunlearn"]["lr"]) == (3, 300, 1e-3)
    assert len(r["sfd"]["forget"]) == 50 and r["sfd"]["choices"] == [["Watercolor"]]
    assert r["sfd"]["preset"] == "canvas" and _sfd_numbers(r) == SFD_CANVAS
    cats = resolved(canvas_pipe, "Cats")
    assert cats["uce"]["preset"] == "canvas-object" and cats["salun"]["lr"] == 3e-4
    assert cats["advunlearn"]["eta"] == 3.0   # objects in the attribute form


def test_canvas_mini_refuses_concepts_outside_its_world(canvas_pipe):
    weights = {k: v.clone() for k, v in canvas_pipe.unet.state_dict().items()}
    for concept in ("Picasso", "nudity"):
        with pytest.raises(ConfigError, match="canvas-mini does not know") as info:
            erasekit.erase(canvas_pipe, "uce", [concept])
        assert "Van Gogh" in str(info.value) and "Cats" in str(info.value)
        assert "allow_unknown_concept" in str(info.value)
    with pytest.raises(ConfigError, match="canvas-mini does not know"):
        erasekit.erase(canvas_pipe, "esd", ["Picasso"], steps=1)
    assert all(torch.equal(v, weights[k]) for k, v in canvas_pipe.unet.state_dict().items())
    with pytest.raises(ConfigError, match="kind='style'"):
        erasekit.erase(canvas_pipe, "uce", ["Van Gogh"], kind="object")


def test_forcing_an_unknown_concept_uses_the_papers_defaults(canvas_pipe):
    edit = erasekit.erase(canvas_pipe, "uce", ["nudity"], allow_unknown_concept=True)
    m = edit.manifest
    assert m["preset"]["provider"] == "canvas-mini" and m["preset"]["name"] == "nudity" and m["kind"] == "nudity"
    assert m["resolved"]["guides"] == [" "] and m["resolved"]["templates"] == ["{}"]


# -- the full-size architecture with random weights: a real UCE erase ----------------------------
@pytest.mark.slow
def test_uce_on_full_size_sd14_uses_paper_presets():
    pipe = sd14("cpu")
    for concept in REAL:
        m = erasekit.erase(pipe, "uce", [concept]).manifest
        assert m["preset"]["provider"] == "paper" and m["preset"]["name"] == ("nudity" if concept == "nudity"
                                                                              else "default")
        assert m["resolved"]["templates"] == ["{}"] and m["resolved"]["token_policy"] == "aligned_tail"
        _no_canvas(m["preset"])


# -- the CLI shows the choice and refuses what canvas-mini does not know ---------------------------
def test_cli_prints_the_kind_and_preset_and_refuses_unknown_concepts(tiny_sd1, tmp_path, capsys):
    from erasekit.cli.main import main

    tiny_sd1.save_pretrained(tmp_path / "model")
    base = ["erase", "--method", "uce", "--concept", "Van Gogh", "--model", str(tmp_path / "model")]
    assert main([*base, "--out", str(tmp_path / "a.safetensors")]) == 0
    out = capsys.readouterr().out
    assert "kind other (guessed" in out and "preset paper/default" in out
    assert main([*base, "--out", str(tmp_path / "b.safetensors"), "-o", "kind=style"]) == 0
    out = capsys.readouterr().out
    assert "kind style (given)" in out and "preset paper/style" in out
    assert main(["erase", "--method", "uce", "--concept", "Picasso", "--out", str(tmp_path / "c.safetensors")]) == 2
    err = capsys.readouterr().err
    assert "canvas-mini does not know the concept 'Picasso'" in err and "allow_unknown_concept" in err
    assert not (tmp_path / "c.safetensors").exists()


def test_canvas_mini_mmdit_serves_the_canvas_world_with_mmdit_parameter_sets(clip_tokenizer_dir):
    """A model that declares ``canvas-mini-mmdit`` gets the canvas world (captions, pairs) under its own name,
    and SalUn / FMN train the MMDiT's text-side projections where canvas-mini's UNet trains ``xattn``."""
    from conftest import build_tiny_mmdit

    from erasekit.canvas.presets import PROVIDER as CANVAS
    from erasekit.erase import salun
    from erasekit.presets import concept_context

    pipe = build_tiny_mmdit("sd3", clip_tokenizer_dir)
    setattr(pipe.text_encoder.config, MARKER, "canvas-mini-mmdit")
    provider = provider_for(pipe)
    assert provider.name == "canvas-mini-mmdit" and provider is not CANVAS
    ctx = concept_context(pipe, ["Van_Gogh"])
    assert ctx.prompts("Van_Gogh")[0] == "A Architectures image in Van Gogh style."
    plan = salun.make_plan(["Van_Gogh"], salun.SalUnConfig(), ctx)
    assert plan.preset == "canvas" and plan.values["param_set"] == "esd-x"
    assert CANVAS.salun_plan(ctx, None, None)["values"]["param_set"] == "xattn"   # the UNet's own set
    assert provider.fmn_preset(ctx, None)[1]["param_set"] == "esd-x"
