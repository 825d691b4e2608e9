"""SFD on SD 3 (flow matching): the one-step generator, its training and forgetting; Flux refused with its reason."""

from __future__ import annotations

import pytest
import torch

import erasekit
from erasekit.erase.sfd import SIGMA_INIT, SFDConfig, SFDTrainer, flow_t_init
from erasekit.errors import ConfigError
from erasekit.pipelines import Edit, FamilyAdapter, Sampling, generate, load_pipeline, one_step_pipeline
from erasekit.pipelines.flow import FlowModel
from erasekit.pipelines.one_step import NoiseSchedule, one_step_latents

RETAIN = ("a photo of a dog", "a tree in winter")
TINY = dict(distill_iterations=0, batch_size=1, forget_batch_size=1, retain_prompts=RETAIN, progress=False)


@pytest.fixture
def tiny_sd3(clip_tokenizer_dir):
    from conftest import build_tiny_mmdit

    return build_tiny_mmdit("sd3", clip_tokenizer_dir)


def test_flow_schedule_is_the_transformers_interpolation(tiny_sd3):
    from diffusers import FlowMatchEulerDiscreteScheduler

    sched = NoiseSchedule(tiny_sd3)
    t = torch.tensor([1, 300, 714, 999])
    sigma = FlowModel(tiny_sd3).shifted(t.float() / 1000).view(-1, 1, 1, 1)
    a, b = sched.ab(t)
    assert torch.allclose(a, 1 - sigma) and torch.allclose(b, sigma)
    g = torch.Generator().manual_seed(0)
    x0, eps, v = (torch.randn(4, 4, 8, 8, generator=g) for _ in range(3))
    x_t = (1 - sigma) * x0 + sigma * eps
    x0_hat, eps_hat = sched.x0_eps(eps - x0, x_t, t)          # the exact velocity gives back x0 and eps
    assert torch.allclose(x0_hat, x0, atol=1e-5) and torch.allclose(eps_hat, eps, atol=1e-5)
    x0_v, eps_v = sched.x0_eps(v, x_t, t)                      # any velocity: consistent with x_t and v
    assert torch.allclose(a * x0_v + b * eps_v, x_t, atol=1e-5) and torch.allclose(eps_v - x0_v, v, atol=1e-5)
    # t_init: SiD's generator noise level sigma_init = 2.5 in EDM units, s / (1 - s), on the pipeline's own grid
    for shift, expected in ((1.0, 714), (3.0, 455)):
        tiny_sd3.scheduler = FlowMatchEulerDiscreteScheduler(shift=shift)
        t_init = flow_t_init(NoiseSchedule(tiny_sd3))
        s = float(FlowModel(tiny_sd3).shifted(torch.tensor(t_init / 1000)))
        assert t_init == expected and s / (1 - s) == pytest.approx(SIGMA_INIT, rel=0.01)


def test_one_step_generator_is_one_transformer_call_per_batch(tiny_sd3):
    ctx = FamilyAdapter(tiny_sd3).encode(["a cat", "a dog"])
    z = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    s = float(FlowModel(tiny_sd3).shifted(torch.tensor(0.714)))
    with torch.no_grad():
        v = FlowModel(tiny_sd3).predict(tiny_sd3.transformer, s * z, s, ctx)
        x_g = one_step_latents(tiny_sd3.transformer, z, ctx, 714, NoiseSchedule(tiny_sd3))
    assert torch.allclose(x_g, s * (z - v), atol=1e-5)         # x_g = s (z - v_theta(s z, s, c))
    fast = one_step_pipeline(tiny_sd3, t_init=714)
    calls = []
    hook = tiny_sd3.transformer.register_forward_hook(lambda m, args, kw, out: calls.append(len(kw["hidden_states"])),
                                                      with_kwargs=True)
    try:
        images = generate(fast, ["a cat", "a dog", "a tree"], seeds=[0, 1, 2], sampling=Sampling(batch_size=3))
        latents = fast(["a cat", "a dog"], latents=z, output_type="latent").images
    finally:
        hook.remove()
    assert calls == [3, 2] and len(images) == 3 and images[0].size == (16, 16)
    assert torch.allclose(latents, x_g, atol=1e-5)


def test_sfd_on_sd3_trains_a_transformer_generator_that_saves_loads_merges_and_samples(tiny_sd3, tmp_path):
    before = {k: v.clone() for k, v in tiny_sd3.transformer.state_dict().items()}
    edit = erasekit.erase(tiny_sd3, "sfd", ["Van Gogh"], iterations=2, **TINY)
    assert all(torch.equal(before[k], v) for k, v in tiny_sd3.transformer.state_dict().items())
    m = edit.manifest
    assert (m["sampler"], m["generator_timestep"], m["prediction_type"]) == ("one_step", 714, "flow")
    assert m["generator_sigma"] == pytest.approx(0.714)
    assert set(edit.keys) == {f"transformer/{n}" for n, _ in tiny_sd3.transformer.named_parameters()}
    assert any(not torch.equal(edit.weights[k], before[k.split("/", 1)[1]]) for k in edit.keys)
    edit.save(tmp_path / "g.safetensors")
    loaded = Edit.load(tmp_path / "g.safetensors", tiny_sd3)
    a = generate(one_step_pipeline(tiny_sd3, edit), ["a cat"], seeds=[0], output_type="np")[0]
    b = generate(one_step_pipeline(tiny_sd3, loaded), ["a cat"], seeds=[0], output_type="np")[0]
    teacher = generate(one_step_pipeline(tiny_sd3, t_init=714), ["a cat"], seeds=[0], output_type="np")[0]
    assert (a == b).all() and not (a == teacher).all()
    edit.merge(tiny_sd3, tmp_path / "merged")                  # a merged folder loads as its one-step sampler
    merged = load_pipeline(tmp_path / "merged")
    assert merged.transformer is not None and merged.t_init == 714
    assert abs(generate(merged, ["a cat"], seeds=[0], output_type="np")[0] - a).max() < 1e-4
    # attacked through its one-step pipeline, which reads as an SD 3 pipeline (prefix tokens encode through it)
    from tests.test_attacks import ToneJudge

    for method in ("none", "random_prefix"):
        judge = ToneJudge(threshold=1e9)   # never "bright": the attack spends its budget
        res = erasekit.attack(tiny_sd3, ["a cat"], "bright", judge=judge, method=method, edit=edit, progress=False)
        assert res.prompts[0].unet_evals == judge.images >= 1   # one transformer call per judged image


def test_forget_samples_move_to_the_anchor_relative_to_retain_samples(tiny_sd3):
    """Diffusion-classifier margin of the teacher: how much better the anchor's text than a sample's own text
    denoises the generator's samples (fixed noise). The forgetting term must lower it for the forget prompt, more
    than for the retain prompts, and more than the same run without the forgetting term (lam_g_f = 0)."""
    forget, anchor = "a painting by Van Gogh", "a red car"
    with torch.no_grad():   # a random tiny transformer barely reads its text: make the conditions matter
        tiny_sd3.transformer.context_embedder.weight.mul_(10)
        tiny_sd3.transformer.time_text_embed.text_embedder.linear_1.weight.mul_(10)
    g = torch.Generator().manual_seed(1)
    z, eps = torch.randn(8, 4, 8, 8, generator=g), torch.randn(8, 4, 8, 8, generator=g)
    t = torch.linspace(100, 900, 8).long()

    def margins(tr) -> list[float]:
        enc = {p: tr.adapter.encode([p] * len(z)) for p in (forget, anchor, *RETAIN)}
        a, b = tr.schedule.ab(t)

        def err(x_t, prompt):
            out = tr.schedule.output(tiny_sd3.transformer, x_t, t, enc[prompt])
            return (tr.schedule.x0_eps(out, x_t, t)[1] - eps).pow(2).mean()

        with torch.no_grad():
            found = []
            for prompt in (forget, *RETAIN):
                x_t = a * one_step_latents(tr.G, z, enc[prompt], tr.config.t_init, tr.schedule) + b * eps
                found.append(float(err(x_t, prompt) - err(x_t, anchor)))
            return found

    change = {}
    for lam in (1.0, 0.0):
        cfg = SFDConfig(iterations=4, distill_iterations=0, batch_size=1, forget_batch_size=2, forget_prompts=(forget,),
                        safe_prompts=(anchor,), retain_prompts=RETAIN, lr_psi=1e-4, lr_theta=1e-4, kappa=1.0,
                        lam_g_f=lam, seed=1, progress=False)
        with SFDTrainer(tiny_sd3, ["Van Gogh"], cfg) as tr:
            start = margins(tr)
            tr.train()
            change[lam] = [after - before for after, before in zip(margins(tr), start)]
    f, *r = change[1.0]
    assert f > 0 and f > 1.5 * max(r) and f > change[0.0][0] + abs(change[0.0][0])


def test_flux_is_refused_with_the_reason(clip_tokenizer_dir):
    from conftest import build_tiny_mmdit

    flux = build_tiny_mmdit("flux", clip_tokenizer_dir)
    with pytest.raises(ConfigError, match="sfd.*flux: .*FLUX.1-dev is guidance-distilled.*no unconditional"):
        erasekit.erase(flux, "sfd", ["Van Gogh"], iterations=1, **TINY)
    with pytest.raises(ConfigError, match="not flux"):
        one_step_pipeline(flux, t_init=714)
