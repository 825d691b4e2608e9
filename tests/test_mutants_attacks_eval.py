"""Directions and operands that a one-line bug would flip while the rest of the suite still passes:
UnlearnDiffAtk descends its loss; FID compares the images with the reference set and with the
original model's images, never with themselves."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch


def test_unlearndiffatk_step_descends_the_attack_loss(tiny_sd1):
    """One step sets u.grad = clip(dL/ds, -1, 1) (straight-through) and moves u against it, where L is
    the diffusion loss of the sampled prefix recomputed here from the step's own x_t and t."""
    from erasekit.attacks import PrefixPrompts, attack_vocabulary
    from erasekit.attacks.result import PromptAttack
    from erasekit.attacks.unlearndiffatk import UnlearnDiffAttackConfig, _BatchAttack

    config = UnlearnDiffAttackConfig(k=2, weight_decay=0.0)
    pp = PrefixPrompts(tiny_sd1, ["a cat"], k=2)
    vocab = attack_vocabulary(pp.adapter.tokenizers)[:400]
    z0 = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    state = _BatchAttack(tiny_sd1, pp, z0, [PromptAttack(0, "a cat", 0, "a cat")], vocab, config, config.plan())
    sampled, inputs = [], []
    sample = state.sample_onehot
    state.sample_onehot = lambda: sampled.append(sample()) or sampled[-1]
    hook = tiny_sd1.unet.register_forward_hook(lambda m, args, out: inputs.append((args[0].detach(), args[1])))
    u0 = state.u.detach().clone()
    try:
        state.step(0)
    finally:
        hook.remove()
    u1, (x_t, t) = state.u.detach().clone(), inputs[0]
    abar = state.abar[t].view(-1, 1, 1, 1)
    eps = (x_t - abar.sqrt() * state.z0) / (1 - abar).sqrt()        # the noise the step drew
    s = sampled[0].detach().clone().requires_grad_(True)
    pred = tiny_sd1.unet(x_t, t, **pp.encode(pp.embed_onehot(s, vocab)).unet_kwargs(tiny_sd1)).sample
    (grad,) = torch.autograd.grad((pred - eps).pow(2).mean(), s)
    assert grad.abs().max() > 0
    torch.testing.assert_close(state.u.grad, grad.clamp(-1, 1), rtol=1e-3, atol=1e-4 * float(grad.abs().max()))
    assert float((grad * (u1 - u0)).sum()) < 0      # the step goes downhill
    torch.testing.assert_close(u1.sum(-1), torch.ones(1, 2))


def _records(features: np.ndarray):
    from erasekit.eval.runner import Records

    n = len(features)
    return Records(np.arange(n), np.ones(n, dtype=bool), {}, features=features)


def test_fid_is_against_the_reference_and_the_original_not_the_images_themselves():
    from erasekit.eval.fid import frechet_distance
    from erasekit.eval.scoring import fid_scores

    rng = np.random.default_rng(0)
    n, d = 40, 4
    edited = rng.normal(size=(n, d))
    original = edited + 3.0                          # same covariance, mean shifted by 3 in every dim
    reference = rng.normal(size=(n, d)) * 2.0 + 1.0
    runner = SimpleNamespace(share=np.arange(n), items=[SimpleNamespace(theme=0, object=0)] * n)
    out = fid_scores(runner, _records(edited), [], (reference, "test reference"), _records(original),
                     SimpleNamespace(name="test features", dim=d))
    expected = frechet_distance(torch.from_numpy(reference), torch.from_numpy(edited))
    assert expected > 1 and out["fid"] == pytest.approx(expected, rel=1e-9)
    assert out["fid_vs_original"] == pytest.approx(9.0 * d, rel=1e-4)   # ||mean shift||^2, no covariance term
    assert out["n_fake"] == n and out["reference"] == "test reference"
