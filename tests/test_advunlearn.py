"""AdvUnlearn: options and bad input, what it trains, the frozen-model pool, plug-and-play Edits.

Mechanics run on the tiny sd1/sd2/sdxl pipelines with a few iterations; the behaviour check on
canvas-mini (a style is erased, the others stay) is marked slow.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

import erasekit
from erasekit.errors import ConfigError, TrainingError
from erasekit.erase.advunlearn import (AdvUnlearnConfig, AdvUnlearnTrainer, LatentPool, concept_prompts, overlaps,
                                       preset, prompt_attributes, retain_prompts)
from erasekit.pipelines import FamilyAdapter, Sampling, generate

RETAIN = ["a photo of a cat", "a photo of a dog", "a photo of a tree"]
# A run small enough for the tiny pipelines: 4 iterations (1 warm-up), 2 attack steps, 4 DDIM steps.
FAST = dict(steps=4, warmup=1, attack_steps=2, retain=RETAIN, retain_batch=2, pool_size=2, ddim_steps=4,
            prompts="concept", progress=False)


def _state(module: nn.Module) -> dict:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def _same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# -- options and bad input ---------------------------------------------------------------------------
@pytest.mark.parametrize("options, field", [
    ({"k": 0}, "`k`"), ({"attack": "free_at"}, "`attack`"), ({"retain": []}, "`retain`"),
    ({"retain_train": "both"}, "`retain_train`"), ({"attack_loss": "p4d"}, "`attack_loss`"),
    ({"mixed_precision": "fp8"}, "`mixed_precision`"), ({"layers": 0}, "`layers`"),
])
def test_bad_options_name_the_field(options, field):
    with pytest.raises(ConfigError, match=field):
        AdvUnlearnConfig(**options)


def test_retain_overlapping_the_concept_is_refused_and_pipeline_untouched(tiny_sd1):
    before = _state(tiny_sd1.text_encoder)
    with pytest.raises(ConfigError, match="mentions the erased concept 'Van Gogh'"):
        erasekit.erase(tiny_sd1, "advunlearn", ["Van Gogh"], **{**FAST, "retain": ["a Van Gogh painting", "a dog"]})
    assert _same(before, _state(tiny_sd1.text_encoder))


def test_retain_prompts_from_a_text_file(tmp_path):
    path = tmp_path / "retain.txt"
    path.write_text("a photo of a dog\n\na red car\n")
    assert retain_prompts(["Van Gogh"], str(path)) == ["a photo of a dog", "a red car"]
    assert AdvUnlearnConfig(retain=str(path)).retain == str(path)
    with pytest.raises(ConfigError, match="text file with one prompt per line"):
        AdvUnlearnConfig(retain=str(tmp_path / "missing.txt"))


def _ctx(concepts, pipe=None, **options):
    from erasekit.presets import concept_context

    return concept_context(pipe, concepts, AdvUnlearnConfig(**options))


def test_automatic_retain_sets_never_mention_the_concept(canvas_pipe):
    canvas = retain_prompts(["Van_Gogh"], "auto", _ctx(["Van_Gogh"], canvas_pipe))
    assert len(canvas) == 90 and not any("Van Gogh" in p for p in canvas)
    coco = retain_prompts(["cat"], "auto")
    assert "a photo of a dog" in coco and "a photo of a cat" not in coco
    assert "a photo of a person" not in retain_prompts(["nudity"], "coco")
    assert overlaps("A Cats image in Van Gogh style.", "van_gogh") and not overlaps("a catalogue", "cat")
    with pytest.raises(ConfigError, match="retain set is empty"):
        retain_prompts(["photo"], "coco")


def test_concept_prompts_use_canvas_captions_for_canvas_labels(canvas_pipe):
    assert concept_prompts(["Cats"], "auto", _ctx(["Cats"], canvas_pipe)) == [
        f"A Cats image in {s} style." for s in ("Cubism", "Mosaic", "Neon Lines", "On Fire", "Pencil Drawing",
                                                "Pop Art", "Ukiyoe", "Van Gogh", "Watercolor", "Winter")]
    assert concept_prompts(["Cats"], "auto") == ["Cats"]   # another model: the concept itself
    assert concept_prompts(["nudity"], "auto") == ["nudity"]
    assert concept_prompts(["Cats"], "concept", _ctx(["Cats"], canvas_pipe)) == ["Cats"]


def test_canvas_labels_get_the_attribute_form_other_concepts_the_whole_prompt(canvas_pipe):
    ctx = _ctx(["Cats", "nudity"], canvas_pipe, allow_unknown_concept=True)
    prompts = concept_prompts(["Cats", "nudity"], "auto", ctx)
    attrs = prompt_attributes(["Cats", "nudity"], prompts, AdvUnlearnConfig(), ctx)
    assert attrs == ["A Cats image."] * 10 + ["nudity"]
    ctx = _ctx(["Van_Gogh"], canvas_pipe)
    vg = concept_prompts(["Van_Gogh"], "auto", ctx)
    assert prompt_attributes(["Van_Gogh"], vg, AdvUnlearnConfig(), ctx) is None   # auto: styles keep the caption form
    assert prompt_attributes(["Van_Gogh"], vg, AdvUnlearnConfig(prompt_form="attribute"), ctx) == \
        ["Van Gogh style."] * 10
    ctx = _ctx(["Cats"], canvas_pipe)
    assert prompt_attributes(["Cats"], prompts[:10], AdvUnlearnConfig(prompt_form="caption"), ctx) is None
    assert prompt_attributes(["nudity"], ["nudity"], AdvUnlearnConfig(), _ctx(["nudity"])) is None


def test_text_encoder_without_inputs_embeds_is_refused(tiny_sd1):
    class Opaque(nn.Module):  # a text encoder that only takes token ids
        def __init__(self, inner):
            super().__init__()
            self.inner, self.config = inner, inner.config

        def get_input_embeddings(self):
            return self.inner.get_input_embeddings()

        def forward(self, ids, **kw):
            return self.inner(ids, **kw)

    tiny_sd1.text_encoder = Opaque(tiny_sd1.text_encoder)
    with pytest.raises(ConfigError, match="cannot be run from token embeddings"):
        erasekit.erase(tiny_sd1, "advunlearn", ["Van Gogh"], **FAST)


def test_presets_follow_the_model(tiny_sd1, canvas_pipe):
    small = preset(canvas_pipe, ["Van Gogh"], AdvUnlearnConfig())
    assert small["steps"] < 1000 and small["warmup"] == small["steps"] // 5 and small["gamma"] == 0.5
    assert (small["k"], small["lr"], small["eta"]) == (3, 1e-3, 1.0)
    assert preset(canvas_pipe, ["Cats"], AdvUnlearnConfig())["eta"] == 3.0        # canvas object, attribute form
    assert preset(canvas_pipe, ["Cats"], AdvUnlearnConfig(prompt_form="caption"))["eta"] == 1.0
    assert preset(canvas_pipe, ["Cats"], AdvUnlearnConfig(eta=2.0))["eta"] == 2.0
    assert preset(canvas_pipe, ["Van Gogh"], AdvUnlearnConfig(k=2, lr=5e-4))["k"] == 2
    tiny = preset(tiny_sd1, ["Cats"], AdvUnlearnConfig())   # a small model that is not canvas-mini: the paper's
    assert (tiny["steps"], tiny["lr"], tiny["k"], tiny["eta"], tiny["ddim_steps"]) == (1000, 1e-5, 1, 1.0, 50)
    tiny_sd1.unet.register_to_config(sample_size=64)   # what a full-size SD 1.x UNet reports
    full = preset(tiny_sd1, ["nudity"], AdvUnlearnConfig(attack="fast_at"))
    assert (full["steps"], full["lr"], full["warmup"], full["attack_steps"], full["gamma"], full["ddim_steps"]) == \
        (1000, 1e-5, 200, 1, 0.3, 50)
    assert full["k"] == 1   # the reference CLI's budget
    assert full["gradient_checkpointing"] and full["mixed_precision"] == "no"   # bf16 only on GPU


# -- what is trained ----------------------------------------------------------------------------------
def test_edit_holds_only_text_encoder_layers_and_pipeline_is_unchanged(tiny_pipe):
    unet, te = _state(tiny_pipe.unet), _state(tiny_pipe.text_encoder)
    flags = [p.requires_grad for p in tiny_pipe.text_encoder.parameters()]
    edit = erasekit.erase(tiny_pipe, "advunlearn", ["Van Gogh"], **FAST)
    assert edit.keys and all(k.startswith(("text_encoder/", "text_encoder_2/")) for k in edit.keys)
    assert not any("embeddings" in k for k in edit.keys)          # token/position tables frozen
    assert _same(unet, _state(tiny_pipe.unet)) and _same(te, _state(tiny_pipe.text_encoder))
    assert flags == [p.requires_grad for p in tiny_pipe.text_encoder.parameters()]
    assert not tiny_pipe.unet.is_gradient_checkpointing
    assert edit.manifest["resolved"]["attack_steps"] == 2 and edit.manifest["attacks"]["runs"] == 3
    if getattr(tiny_pipe, "text_encoder_2", None) is not None:   # SDXL: both encoders trained
        assert any(k.startswith("text_encoder_2/") for k in edit.keys)


def test_half_precision_pipeline_trains_with_mixed_precision_and_stays_half(tiny_sd1):
    """The trainer keeps fp32 copies of the trained encoder weights beside the frozen bf16 ones; every
    encoding (the latent pool's too) runs under its autocast, and the pipeline comes back in bf16."""
    half = tiny_sd1.to(torch.bfloat16)
    before = _state(half.text_encoder)
    edit = erasekit.erase(half, "advunlearn", ["Van Gogh"], mixed_precision="bf16", **FAST)
    assert edit.keys and all(k.startswith("text_encoder/") for k in edit.keys)
    assert half.text_encoder.dtype == torch.bfloat16 and _same(before, _state(half.text_encoder))


def test_layer_subset_attention_only_and_first_encoder(clip_tokenizer_dir):
    from conftest import build_tiny

    pipe = build_tiny("sdxl", clip_tokenizer_dir)
    edit = erasekit.erase(pipe, "advunlearn", ["Van Gogh"], param_set="text-encoder-attn", layers=1,
                          encoders="first", **FAST)
    assert edit.keys and all(k.startswith("text_encoder/") and ".layers.0.self_attn." in k for k in edit.keys)


def test_warmup_only_run_never_attacks_and_fast_at_is_one_step(tiny_sd1):
    edit = erasekit.erase(tiny_sd1, "advunlearn", ["Van Gogh"], **{**FAST, "warmup": 4})
    assert edit.manifest["attacks"]["runs"] == 0
    edit = erasekit.erase(tiny_sd1, "advunlearn", ["Van Gogh"], **{**FAST, "attack": "fast_at", "attack_steps": None})
    assert edit.manifest["resolved"]["attack_steps"] == 1 and edit.manifest["attacks"]["runs"] == 3


def test_same_seed_same_edit_and_iter_mode_runs(tiny_sd1):
    a = erasekit.erase(tiny_sd1, "advunlearn", ["Van Gogh"], **FAST)
    b = erasekit.erase(tiny_sd1, "advunlearn", ["Van Gogh"], **FAST)
    assert all(torch.equal(a.weights[k], b.weights[k]) for k in a.weights)
    c = erasekit.erase(tiny_sd1, "advunlearn", ["Van Gogh"], **{**FAST, "retain_train": "iter"})
    assert c.manifest["training"]["steps"] == 2 * FAST["steps"]


def test_non_finite_training_stops_with_pipeline_unchanged(tiny_sd1):
    te = _state(tiny_sd1.text_encoder)
    calls = []

    def poison(module, args, out):   # the UNet turns NaN from its 4th differentiable call on
        if torch.is_grad_enabled():
            calls.append(1)
            if len(calls) > 3:
                out.sample.fill_(float("nan"))
        return out

    hook = tiny_sd1.unet.register_forward_hook(poison)
    try:
        with pytest.raises(TrainingError, match="NaN|nan"):
            erasekit.erase(tiny_sd1, "advunlearn", ["Van Gogh"], **FAST)
    finally:
        hook.remove()
    assert len(calls) > 3 and _same(te, _state(tiny_sd1.text_encoder))


# -- the frozen model's pool ----------------------------------------------------------------------------
def test_pool_predictions_are_the_frozen_models(tiny_sd1):
    adapter = FamilyAdapter(tiny_sd1)
    pool = LatentPool(tiny_sd1, adapter, ["Van Gogh", "a dog"], size=2, steps=3, guidance=3.0, seed=0)
    d = pool.draw([1], step=2, gen=torch.Generator().manual_seed(0))
    with torch.no_grad():
        kw = adapter.encode(["a dog"]).unet_kwargs(tiny_sd1)
        eps_c = tiny_sd1.unet(d.z, d.t, **kw).sample
        eps_u = tiny_sd1.unet(d.z, d.t, **adapter.encode([""]).unet_kwargs(tiny_sd1)).sample
    torch.testing.assert_close(d.eps_c, eps_c, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(d.eps_u, eps_u, rtol=1e-4, atol=1e-5)
    assert int(d.t) == int(pool.timesteps[2])
    fresh = LatentPool(tiny_sd1, adapter, ["a dog"], size=0, steps=3, guidance=3.0, seed=0)
    assert fresh.draw([0], step=1, gen=torch.Generator().manual_seed(0)).z.shape == d.z.shape
    assert d.eps_a is None


@pytest.mark.parametrize("size", [2, 0])
def test_pool_attribute_predictions_are_the_frozen_models_at_the_same_latent(tiny_sd1, size):
    adapter = FamilyAdapter(tiny_sd1)
    pool = LatentPool(tiny_sd1, adapter, ["Van Gogh", "a dog"], size=size, steps=3, guidance=3.0, seed=0,
                      attributes=["a cat", "a dog"])
    for p, text in ((0, "a cat"), (1, "a dog")):
        d = pool.draw([p], step=1, gen=torch.Generator().manual_seed(0))
        with torch.no_grad():
            eps_a = tiny_sd1.unet(d.z, d.t, **adapter.encode([text]).unet_kwargs(tiny_sd1)).sample
        torch.testing.assert_close(d.eps_a, eps_a, rtol=1e-4, atol=1e-5)
        if text == "a dog":   # the prompt as its own attribute: the conditional prediction itself
            torch.testing.assert_close(d.eps_a, d.eps_c, rtol=1e-4, atol=1e-5)


def test_pool_enters_a_fresh_autocast_context_for_every_unet_call(tiny_sd1):
    # A context manager object can be entered once; mixed precision (bf16 on a GPU) passes a factory.
    entered = []

    def autocast():
        entered.append(1)
        return torch.autocast("cpu", dtype=torch.bfloat16)

    pool = LatentPool(tiny_sd1, FamilyAdapter(tiny_sd1), ["a dog"], size=2, steps=3, guidance=3.0, seed=0,
                      autocast=autocast)
    assert len(entered) >= 3 and pool.draw([0], step=1, gen=torch.Generator().manual_seed(0)).z.isfinite().all()


@pytest.mark.parametrize("attack", ["pgd", "fast_at"])
def test_inner_attack_lowers_its_loss_and_leaves_encoder_grads_alone(tiny_sd1, attack):
    # One trajectory of one DDIM step: the attack's objective is deterministic, so it must go down.
    cfg = AdvUnlearnConfig(**{**FAST, "attack": attack, "attack_steps": 20, "attack_lr": 0.01, "ddim_steps": 1,
                              "attack_init": "latest"})
    adapter = FamilyAdapter(tiny_sd1)
    run = AdvUnlearnTrainer(tiny_sd1, adapter, ["Van Gogh"], RETAIN, cfg, preset(tiny_sd1, ["Van Gogh"], cfg))
    run.pool = LatentPool(tiny_sd1, adapter, ["Van Gogh"], size=1, steps=1, guidance=3.0, seed=0)
    pp, gen = run.per_prompt[0], torch.Generator().manual_seed(0)
    run.delta = pp.embed_ids(pp.random_ids(gen))

    def l_atk(delta):
        with torch.no_grad():
            pred, target = run._attack_pred(pp, delta, 0, gen)
        return float(torch.nn.functional.mse_loss(pred, target))

    tiny_sd1.text_encoder.requires_grad_(True)
    before = l_atk(run.delta)
    after = l_atk(run.attack(0, gen))
    assert after < before
    assert all(p.grad is None for p in tiny_sd1.text_encoder.parameters())


# -- plug and play ----------------------------------------------------------------------------------------
def test_edit_plugs_into_another_pipeline_with_the_same_text_encoder(clip_tokenizer_dir):
    from conftest import build_tiny

    a, b = build_tiny("sd1", clip_tokenizer_dir), build_tiny("sd1", clip_tokenizer_dir)
    torch.manual_seed(7)
    for p in b.unet.parameters():          # another UNet, the same text encoder
        p.data.add_(0.05 * torch.randn_like(p))
    edit = erasekit.erase(a, "advunlearn", ["Van Gogh"], **FAST)
    prompt = "Van Gogh"
    with edit.applied(a):
        ctx_a = FamilyAdapter(a).encode([prompt]).embeds
    plain = generate(b, prompt, seeds=1, sampling=Sampling(steps=2), output_type="np")[0]
    with edit.applied(b):
        ctx_b = FamilyAdapter(b).encode([prompt]).embeds
        edited = generate(b, prompt, seeds=1, sampling=Sampling(steps=2), output_type="np")[0]
    torch.testing.assert_close(ctx_a, ctx_b)
    assert not torch.equal(ctx_b, FamilyAdapter(b).encode([prompt]).embeds)
    assert abs(edited - plain).max() > 0


# -- behaviour on canvas-mini ---------------------------------------------------------------------------
@pytest.mark.slow
def test_canvas_style_is_erased_and_other_styles_stay(canvas_pipe, canvas_judge):
    from erasekit.canvas.world import OBJECTS

    edit = erasekit.erase(canvas_pipe, "advunlearn", ["Van_Gogh"], progress=False)
    seeds = list(range(3))
    target = [f"A {o} image in Van Gogh style." for o in OBJECTS for _ in seeds]
    other = [f"A {o} image in Watercolor style." for o in OBJECTS for _ in seeds]
    s = seeds * len(OBJECTS)
    base_hit = canvas_judge.hits(generate(canvas_pipe, target, s), "Van_Gogh").mean()
    base_other = canvas_judge.hits(generate(canvas_pipe, other, s), "Watercolor").mean()
    with edit.applied(canvas_pipe):
        hit = canvas_judge.hits(generate(canvas_pipe, target, s), "Van_Gogh").mean()
        kept = canvas_judge.hits(generate(canvas_pipe, other, s), "Watercolor").mean()
    assert hit <= base_hit - 0.5 and kept >= base_other - 0.2
