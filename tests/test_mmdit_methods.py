"""SLD and CA on the MMDiT families (tiny random SD 3 / Flux pipelines): the maths carried to velocity space.

SLD: the hook on SD 3's transformer gives the velocity whose implied noise prediction is the paper's eq. (3)
(module docstring of :mod:`erasekit.erase.sld`); Flux is refused with the reason. The method matrix
(tests/test_method_matrix.py) runs both through the shared checks.
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


def test_sld_refuses_flux_and_says_why(clip_tokenizer_dir):
    from conftest import build_tiny_mmdit

    flux = build_tiny_mmdit("flux", clip_tokenizer_dir)
    with pytest.raises(ConfigError) as info:
        erasekit.erase(flux, "sld", ["Van Gogh"])
    message = str(info.value)
    assert "flux" in message and "guidance-distilled" in message and "classifier-free guidance" in message
    assert "uce" in message   # names methods that do support flux
