"""Method details that a plausible one-line bug would break while the rest of the suite still passes:
AdvUnlearn's outer step trains on the adversarial prompt, ESD's attribute target starts from
eps*(c_from), RECE keeps the earliest of equally good epochs."""

from __future__ import annotations

import types

import torch
import torch.nn.functional as F

import erasekit
from erasekit.erase.closed_form import kv_weights
from erasekit.pipelines import FamilyAdapter

RETAIN = ["a photo of a cat", "a photo of a dog", "a photo of a tree"]


def _record_unet_contexts(pipe, seen: list):
    """Record the text context of every differentiable UNet call (the training calls)."""

    def hook(module, args, kwargs, out):
        if torch.is_grad_enabled():
            seen.append(kwargs["encoder_hidden_states"].detach().clone())

    return pipe.unet.register_forward_hook(hook, with_kwargs=True)


def test_advunlearn_outer_step_trains_on_the_adversarial_prompt_after_warmup(tiny_sd1):
    """Warm-up iterations condition the trained encoder on the clean prompt; every later iteration on
    the prompt with the attack's prefix delta* (advunlearn.md section 4: the outer problem)."""
    from diffusers import DDPMScheduler

    from erasekit.erase.advunlearn import AdvUnlearnConfig, AdvUnlearnTrainer, LatentPool, preset

    cfg = AdvUnlearnConfig(steps=2, warmup=1, attack_steps=1, retain=RETAIN, retain_batch=1, pool_size=1,
                           ddim_steps=2, prompts="concept", progress=False)
    adapter = FamilyAdapter(tiny_sd1)
    run = AdvUnlearnTrainer(tiny_sd1, adapter, ["Van Gogh"], RETAIN, cfg, preset(tiny_sd1, ["Van Gogh"], cfg))
    run.pool = LatentPool(tiny_sd1, adapter, ["Van Gogh"], size=1, steps=2, guidance=3.0, seed=0)
    run.retain_pool = LatentPool(tiny_sd1, adapter, RETAIN, size=1, steps=2, guidance=3.0, seed=1)
    run.noise_sched = DDPMScheduler.from_config(tiny_sd1.scheduler.config)
    clean = adapter.encode(["Van Gogh"]).embeds[0]
    seen, gen = [], torch.Generator().manual_seed(0)
    hook = _record_unet_contexts(tiny_sd1, seen)
    try:
        run.loss(0, gen)                   # warm-up: the clean prompt
        torch.testing.assert_close(seen[-1][0], clean, rtol=1e-5, atol=1e-6)
        run.loss(1, gen)                   # adversarial: delta* prefixed
        adversarial = run.per_prompt[0].encode(run.delta).embeds[0]
    finally:
        hook.remove()
    assert run.delta is not None and len(run.attack_losses) == 1
    torch.testing.assert_close(seen[-1][0], adversarial, rtol=1e-5, atol=1e-6)
    assert (seen[-1][0] - clean).abs().max() > 1e-3   # and that is not the clean prompt


def test_esd_attribute_target_starts_from_the_erase_from_prediction(tiny_sd1, monkeypatch):
    """With ``erase_from`` the target is eps*(c_from) - (eta + 1) (eps*(c) - eps*("")) (esd.md, the
    rewrite's attribute form), not the plain target built on eps*(c)."""
    import erasekit.erase.esd as esd_module

    targets, frozen = [], []
    monkeypatch.setattr(esd_module, "F", types.SimpleNamespace(
        mse_loss=lambda pred, target: targets.append(target.detach().clone()) or F.mse_loss(pred, target)))

    def hook(module, args, kwargs, out):   # the frozen query: ("", c, c_from) at one latent
        if out.sample.shape[0] == 3:
            frozen.append(out.sample.detach().float().clone())

    handle = tiny_sd1.unet.register_forward_hook(hook, with_kwargs=True)
    try:
        erasekit.erase(tiny_sd1, "esd", ["a red hat"], erase_from="a hat", eta=1.0, steps=1, ddim_steps=2,
                       progress=False)
    finally:
        handle.remove()
    assert len(targets) == 1 and len(frozen) == 1
    e_0, e_p, e_from = frozen[0].chunk(3)
    assert (e_from - e_p).abs().max() > 1e-4          # c_from and c predict differently here
    torch.testing.assert_close(targets[0], e_from - 2.0 * (e_p - e_0), rtol=1e-5, atol=1e-6)


def test_rece_keeps_the_earliest_of_equally_good_epochs(tiny_sd1):
    """A later epoch replaces the kept one only when it scores strictly better (less editing for the
    same validation score)."""
    scores, seen = iter([0.3, 0.1, 0.1]), []

    def validation(pipe):
        seen.append({k: w.clone() for k, w in kv_weights(pipe).items()})
        return next(scores)

    edit = erasekit.erase(tiny_sd1, "rece", ["nudity"], epochs=3, validation=validation)
    assert [h["score"] for h in edit.manifest["history"]] == [0.3, 0.1, 0.1]
    assert edit.manifest["best_epoch"] == 2
    assert any(not torch.equal(seen[1][k], seen[2][k]) for k in seen[1])   # epochs 2 and 3 differ
    with edit.applied(tiny_sd1):
        assert all(torch.equal(w, seen[1][k]) for k, w in kv_weights(tiny_sd1).items())
