"""SLD and CA on the MMDiT families (tiny random SD 3 / Flux pipelines): the maths carried to velocity space.

SLD: the hook on SD 3's transformer gives the velocity whose implied noise prediction is the paper's eq. (3)
(module docstring of :mod:`erasekit.erase.sld`); Flux is refused with the reason. CA: the flow-matching losses
(the target's velocity regressed onto the anchor's at one noisy latent), the trained set per backbone. The method
matrix (tests/test_method_matrix.py) runs both through the shared checks.
"""

from __future__ import annotations

import pytest
import torch

import erasekit
from erasekit.errors import ConfigError
from erasekit.pipelines import FamilyAdapter, default_sampling, generate
from erasekit.pipelines.flow import FlowModel
from erasekit.pipelines.inference import unconditional_context


@pytest.fixture
def sd3(clip_tokenizer_dir):
    from conftest import build_tiny_mmdit

    return build_tiny_mmdit("sd3", clip_tokenizer_dir)


def _state(pipe) -> dict:
    return {f"{name}/{k}": v.detach().clone() for name, m in pipe.components.items() if isinstance(m, torch.nn.Module)
            for k, v in m.state_dict().items()}


def _unchanged(before: dict, pipe) -> bool:
    return before.keys() == _state(pipe).keys() and all(torch.equal(v, _state(pipe)[k]) for k, v in before.items())


def _v(pipe, z, sigma, ctx):
    """The transformer's velocity at ``sigma``, called as the SD 3 pipeline calls it (hooks included)."""
    return FlowModel(pipe).predict(pipe.transformer, z, sigma, ctx)


# -- SLD ----------------------------------------------------------------------------------------------------------
def _paper_eps(pipe, values, z, sigma, cond, s_g):
    """Eq. (3) on the noise predictions the velocities imply (eps = x + (1 - s) v), first step of a trajectory
    (nu = 0), as the paper writes it for eps."""
    safety = FamilyAdapter(pipe).encode([values["safety_concept"]])
    eps = {k: z + (1 - sigma) * _v(pipe, z, sigma, c)
           for k, c in (("u", unconditional_context(pipe)), ("c", cond), ("s", safety))}
    diff = eps["c"] - eps["s"]
    mu = torch.where(diff >= values["threshold"], 0.0, (diff.abs() * values["guidance_scale"]).clamp(max=1.0))
    gamma = mu * (eps["s"] - eps["u"])
    return eps["u"] + s_g * ((eps["c"] - eps["u"]) - gamma), eps


@torch.no_grad()
def test_sld_on_sd3_cfg_batch_gives_the_papers_eq3_in_noise_units(sd3):
    edit = erasekit.erase(sd3, "sld", ["Van Gogh"], guidance_scale=50.0, threshold=0.0)
    values, s_g, sigma = edit.manifest["resolved"], 7.0, 0.4
    cond, uncond = FamilyAdapter(sd3).encode(["a painting by Van Gogh"]), unconditional_context(sd3)
    z = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    want, eps = _paper_eps(sd3, values, z, sigma, cond, s_g)
    sd3._guidance_scale = s_g   # what the pipeline's __call__ sets
    with edit.sampled(sd3) as p:   # the pipeline's CFG batch: unconditional rows first
        from erasekit.pipelines.family import Context

        v_u, v_c = _v(p, torch.cat([z, z]), sigma, Context.cat([uncond, cond])).chunk(2)
    got = z + (1 - sigma) * (v_u + s_g * (v_c - v_u))   # the pipeline's guidance, then the implied eps
    torch.testing.assert_close(v_u, _v(sd3, z, sigma, uncond), atol=1e-5, rtol=1e-5)   # the unconditional half
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
    plain = eps["u"] + s_g * (eps["c"] - eps["u"])
    assert (got - plain).abs().max() > 1e-2, "the safety guidance did nothing"


@torch.no_grad()
def test_sld_on_sd3_warmup_counts_steps_of_the_pipelines_own_50_step_schedule(sd3):
    edit = erasekit.erase(sd3, "sld", ["Van Gogh"], preset="medium", guidance_scale=50.0, threshold=0.0)
    assert edit.manifest["resolved"]["warmup_steps"] == 10
    sigmas = FlowModel(sd3).sigmas(50)
    cond = FamilyAdapter(sd3).encode(["a painting by Van Gogh"])
    z = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    with edit.sampled(sd3) as p:   # direct calls (no CFG batch): v_c - mu (v_S - v_u), no momentum
        step9, step10 = _v(p, z, sigmas[9], cond), _v(p, z, sigmas[10], cond)
    assert torch.equal(step9, _v(sd3, z, sigmas[9], cond))          # inside the warm-up: untouched
    assert not torch.allclose(step10, _v(sd3, z, sigmas[10], cond), atol=1e-4)
    values = edit.manifest["resolved"]
    s = float(sigmas[10])
    want, eps = _paper_eps(sd3, values, z, s, cond, 1.0)   # s_g = 1: eps_c - gamma
    torch.testing.assert_close(z + (1 - s) * step10, want, atol=1e-4, rtol=1e-4)


def test_sld_momentum_is_kept_in_noise_units():
    from erasekit.erase.sld import PRESETS, SLDGuidance

    guide = SLDGuidance.__new__(SLDGuidance)
    guide.v, guide.nu, guide.last_t = {**PRESETS["medium"]}, None, None   # s_m 0.3, beta_m 0.4
    g1, g2 = torch.ones(1, 2), torch.full((1, 2), 2.0)
    half, quarter = torch.tensor([[0.5]]), torch.tensor([[0.25]])
    assert torch.allclose(guide.momentum(g1, torch.tensor([500.0]), half), g1)   # nu_0 = 0
    nu1 = 0.6 * 0.5 * g1                                                          # (1 - beta_m) gamma_eps
    assert torch.allclose(guide.momentum(g2, torch.tensor([250.0]), quarter), g2 + 0.3 * nu1 / 0.25)
    zero = torch.tensor([[0.0]])   # s = 1: every condition implies eps = x, g passes as it is
    assert torch.equal(guide.momentum(g1, torch.tensor([1000.0]), zero), g1)


def test_sld_changes_the_sd3_sample_and_leaves_the_pipeline(sd3):
    edit = erasekit.erase(sd3, "sld", ["Van Gogh"], preset="max")
    sampling = default_sampling(sd3, steps=3)
    before, hooks = _state(sd3), (dict(sd3.transformer._forward_hooks), dict(sd3.transformer._forward_pre_hooks))
    plain = generate(sd3, "a painting by Van Gogh", [0], sampling, output_type="np")[0]
    with edit.sampled(sd3) as p:
        safe = generate(p, "a painting by Van Gogh", [0], sampling, output_type="np")[0]
    again = generate(sd3, "a painting by Van Gogh", [0], sampling, output_type="np")[0]
    assert abs(safe - plain).max() > 1e-2, "SLD did not change the sample"
    assert (again == plain).all(), "after the block the pipeline samples as before"
    assert _unchanged(before, sd3)
    assert (dict(sd3.transformer._forward_hooks), dict(sd3.transformer._forward_pre_hooks)) == hooks


def test_unlearndiffatk_attacks_an_sld_edit_on_sd3_through_the_guided_velocity(sd3, monkeypatch):
    from _attack_helpers import ToneJudge

    from erasekit.attacks import attack
    from erasekit.erase.sld import SLDGuidance

    edit = erasekit.erase(sd3, "sld", ["bright"], preset="max")
    before, guided, real_gamma = _state(sd3), [], SLDGuidance.gamma

    def counting(self, *args):   # the attack's loss (with grad) reads the hook's guided velocity
        guided.append(torch.is_grad_enabled())
        return real_gamma(self, *args)

    monkeypatch.setattr(SLDGuidance, "gamma", counting)
    res = attack(sd3, ["a cat"], "bright", judge=ToneJudge(255), edit=edit, sampling=default_sampling(sd3, steps=2),
                 progress=False, steps_per_block=2, blocks=1, block_growth=1.0, restarts=1)
    (p,) = res.prompts
    assert p.grad_steps == 2 and p.adv_prompt.endswith(" a cat") and not p.success
    assert guided.count(True) == 2   # one guided prediction per gradient step
    assert _unchanged(before, sd3) and not sd3.transformer._forward_hooks


def test_sld_refuses_flux_and_says_why(clip_tokenizer_dir):
    from conftest import build_tiny_mmdit

    flux = build_tiny_mmdit("flux", clip_tokenizer_dir)
    with pytest.raises(ConfigError) as info:
        erasekit.erase(flux, "sld", ["Van Gogh"])
    message = str(info.value)
    assert "flux" in message and "guidance-distilled" in message and "classifier-free guidance" in message
    assert "uce" in message   # names methods that do support flux


# -- CA -----------------------------------------------------------------------------------------------------------
CA_TINY = {"anchor": "dog", "images_per_prompt": 1, "batch_size": 2, "data_steps": 2, "progress": False}


@pytest.mark.parametrize("param_set, expected", [(None, "esd-x-strict"), ("attn", "attn")])
def test_ca_on_mmdit_trains_every_parameter_of_its_set_and_nothing_else(tiny_mmdit, param_set, expected):
    from erasekit.erase.param_sets import select_params

    before = _state(tiny_mmdit)
    edit = erasekit.erase(tiny_mmdit, "ca", ["Van Gogh"], steps=3, lr=1e-3, param_set=param_set, **CA_TINY)
    assert _unchanged(before, tiny_mmdit), "erase left the pipeline changed"
    declared = set(select_params(tiny_mmdit, expected))
    assert set(edit.keys) <= declared and all(k.startswith("transformer/") for k in edit.keys)
    # SD 3's last joint block (context_pre_only) drops the text side of its attention output, so its text
    # queries get no gradient: the one part of the set that cannot move, and the Edit stores only what moved
    last = f"transformer/transformer_blocks.{len(tiny_mmdit.transformer.transformer_blocks) - 1}.attn.add_q_proj."
    dead = {k for k in declared if k.startswith(last)} if edit.manifest["family"] == "sd3" else set()
    assert declared - set(edit.keys) == dead
    for key in edit.keys:   # every trained tensor moved
        assert not torch.equal(edit.new_weight(key, before[key]), before[key]), key
    names = " ".join(edit.keys)
    if expected == "esd-x-strict":   # the text keys and values of the joint attention, as ESD's kv counterpart
        assert all(k.endswith(("attn.add_k_proj.weight", "attn.add_k_proj.bias", "attn.add_v_proj.weight",
                               "attn.add_v_proj.bias")) for k in edit.keys)
    elif edit.manifest["family"] == "flux":   # single-stream attention is attention too
        assert "single_transformer_blocks.0.attn.to_q" in names and "transformer_blocks.0.attn.add_q_proj" in names
    assert edit.manifest["anchor_set"]["sampling"]["sampler"] == "flow_euler"
    assert edit.manifest["flow"]["resolution"] == FlowModel(tiny_mmdit).size


@torch.no_grad()
def _gap(pipe, z0, target: str, anchor: str) -> float:
    """Sum over a few noise levels of || v(x_s, c*) - v(x_s, c) ||, at fixed noise."""
    from erasekit.pipelines.flow import noisy

    fm, ad = FlowModel(pipe), FamilyAdapter(pipe)
    eps = torch.randn(z0.shape, generator=torch.Generator().manual_seed(7))
    total = 0.0
    for s in (0.3, 0.6, 0.9):
        x_s = noisy(z0, eps, torch.tensor([s]))
        total += float((fm.predict(pipe.transformer, x_s, s, ad.encode([target]))
                        - fm.predict(pipe.transformer, x_s, s, ad.encode([anchor]))).norm())
    return total


PAIRS = {"anchor_prompts": ["a photo of a dog"], "target_prompts": ["a photo of Van Gogh"]}


def test_ca_on_sd3_regresses_the_targets_velocity_onto_the_anchors_at_the_same_noisy_latent(sd3, monkeypatch):
    from erasekit.pipelines import flow

    calls, real = [], flow.FlowModel.predict

    def recording(self, call, z, sigma, ctx):
        calls.append((z.detach().clone(), torch.as_tensor(sigma).detach().clone(), ctx.embeds.detach().clone(),
                      torch.is_grad_enabled()))
        return real(self, call, z, sigma, ctx)

    monkeypatch.setattr(flow.FlowModel, "predict", recording)
    erasekit.erase(sd3, "ca", ["Van Gogh"], steps=2, images_per_prompt=2, batch_size=2, data_steps=2, progress=False,
                   **PAIRS)
    monkeypatch.undo()
    ad = FamilyAdapter(sd3)
    anchor, target = ad.encode(["a photo of a dog"]).embeds, ad.encode(["a photo of Van Gogh"]).embeds
    assert len(calls) == 4   # per step: the anchor's prediction (no grad), then the target's (trained)
    for (z_a, s_a, c_a, grad_a), (z_t, s_t, c_t, grad_t) in zip(calls[0::2], calls[1::2]):
        assert torch.equal(z_a, z_t) and torch.equal(s_a, s_t)   # the same x_s at the same noise level
        assert not grad_a and grad_t
        assert torch.equal(c_a, anchor.expand_as(c_a)) and torch.equal(c_t, target.expand_as(c_t))
        assert ((s_a > 0) & (s_a <= 1)).all() and s_a.numel() == 2


def test_ca_on_sd3_pulls_the_targets_velocity_onto_the_anchors(sd3):
    z0 = generate(sd3, "a photo of a dog", [3], default_sampling(sd3, steps=2), output_type="latent")[0][None]
    before = _gap(sd3, z0, "a photo of Van Gogh", "a photo of a dog")
    edit = erasekit.erase(sd3, "ca", ["Van Gogh"], steps=30, lr=1e-3, images_per_prompt=2, batch_size=2, data_steps=2,
                          progress=False, **PAIRS)
    with edit.applied(sd3):
        after = _gap(sd3, z0, "a photo of Van Gogh", "a photo of a dog")
    assert after < 0.9 * before, (before, after)   # measured: 0.84 of it (random weights: both predictions move)
