"""Training methods and attacks on tiny random SD 3 and Flux pipelines: the flow-matching targets and mechanics."""

from __future__ import annotations

import pytest
import torch

from conftest import pipeline_state as _state, pipeline_unchanged as _unchanged

import erasekit
from erasekit.erase.esd import esd_target
from erasekit.erase.param_sets import select_params
from erasekit.errors import ConfigError
from erasekit.pipelines import Edit, FamilyAdapter
from erasekit.pipelines.flow import FlowModel, noisy, velocity

FAST = dict(steps=2, ddim_steps=3, resolution=16, progress=False, checkpoint_dir=None)


def _build(family: str, tokenizer_dir, guidance_embeds: bool = False):
    from conftest import build_tiny_mmdit

    pipe = build_tiny_mmdit(family, tokenizer_dir)
    if guidance_embeds:   # a guidance-distilled Flux (FLUX.1-dev's architecture), same tiny shape
        from diffusers import FluxTransformer2DModel

        torch.manual_seed(0)
        pipe.transformer = FluxTransformer2DModel(patch_size=1, in_channels=16, num_layers=1, num_single_layers=1,
                                                  attention_head_dim=16, num_attention_heads=2, joint_attention_dim=32,
                                                  pooled_projection_dim=32, axes_dims_rope=[4, 4, 8],
                                                  guidance_embeds=True).eval()
    return pipe


@pytest.fixture(scope="module", params=["sd3", "flux", "flux-dev"])
def mmdit(request, clip_tokenizer_dir):
    """A tiny SD3, Flux and guidance-distilled Flux pipeline, shared by the module (tests leave it unchanged)."""
    family = request.param.split("-")[0]
    return _build(family, clip_tokenizer_dir, guidance_embeds=request.param == "flux-dev")


# -- the flow-matching maths -------------------------------------------------------------------------------
def test_flow_interpolation_velocity_and_euler_step_on_a_hand_made_case():
    x0, eps = torch.tensor([[2.0, -1.0]]), torch.tensor([[5.0, 1.0]])
    s = torch.tensor([0.25])
    assert torch.equal(noisy(x0, eps, s), torch.tensor([[2.75, -0.5]]))   # 0.75 x0 + 0.25 eps
    assert torch.equal(velocity(x0, eps), torch.tensor([[3.0, 2.0]]))      # eps - x0
    # one Euler step with the true velocity moves exactly along the line: from s = 0.75 down to 0.25
    x = noisy(x0, eps, torch.tensor([0.75])) + (0.25 - 0.75) * velocity(x0, eps)
    assert torch.allclose(x, noisy(x0, eps, s))


def test_esd_velocity_target_is_negative_guidance_in_velocity_space():
    """v_target = v_u - eta (v_c - v_u), and it is the affine image of the guided score (module docstring)."""
    v_u, v_c = torch.tensor([1.0, 2.0]), torch.tensor([3.0, -1.0])
    assert torch.equal(esd_target(v_u, v_c, v_c, eta=1.0), torch.tensor([-1.0, 5.0]))
    assert torch.equal(esd_target(v_u, v_c, v_c, eta=0.0), v_u)
    s, x = 0.3, torch.tensor([0.5, -2.0])
    score_u, score_c, eta = torch.tensor([0.2, 1.0]), torch.tensor([-0.7, 0.4]), 1.5

    def v_of(score):   # eps_hat = -s score, x0_hat = (x - s eps_hat) / (1 - s), v = eps_hat - x0_hat
        e = -s * score
        return e - (x - s * e) / (1 - s)

    guided = v_of(score_u - eta * (score_c - score_u))
    assert torch.allclose(esd_target(v_of(score_u), v_of(score_c), v_of(score_c), eta), guided, atol=1e-6)


@pytest.mark.parametrize("shifted", [False, True])
@torch.no_grad()
def test_flow_model_calls_the_transformer_as_the_pipeline_does(mmdit, shifted, monkeypatch):
    """Noise, sigmas and every transformer input match the pipeline's own first denoising step (also with
    SD 3.5's static shift 3 and FLUX.1's resolution-dependent dynamic shifting)."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    if shifted:
        flux = type(mmdit.transformer).__name__.startswith("Flux")
        sched = FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=flux, base_image_seq_len=256,
                                                max_image_seq_len=4096, base_shift=0.5, max_shift=1.15)
        monkeypatch.setattr(mmdit, "scheduler", sched)
    fm = FlowModel(mmdit, resolution=16)
    seen = {}

    def grab(module, args, kwargs):
        seen.setdefault("kw", {k: v.clone() if torch.is_tensor(v) else v for k, v in kwargs.items()})

    handle = mmdit.transformer.register_forward_pre_hook(grab, with_kwargs=True)
    try:
        mmdit("Van Gogh", num_inference_steps=3, guidance_scale=1.0 if fm.family == "sd3" else 3.5, height=16,
              width=16, output_type="latent", generator=torch.Generator().manual_seed(0))
    finally:
        handle.remove()
    sigmas = fm.sigmas(3)
    torch.testing.assert_close(sigmas, mmdit.scheduler.sigmas.float())
    assert shifted == (float(sigmas[1]) > 0.7)   # unshifted: 0.5 (SD 3) or 2/3 (Flux); shifted: about 0.75
    kw = fm.kwargs(fm.noise(1, torch.Generator().manual_seed(0)), sigmas[0], FamilyAdapter(mmdit).encode("Van Gogh"))
    expected = seen["kw"]
    for name in ("hidden_states", "timestep", "encoder_hidden_states", "pooled_projections", "img_ids", "txt_ids",
                 "guidance"):
        if expected.get(name) is None:
            assert kw.get(name) is None, name
            continue
        torch.testing.assert_close(kw[name].float(), expected[name].float(), msg=name)
    assert (expected.get("guidance") is not None) == fm.uses_guidance


# -- ESD ---------------------------------------------------------------------------------------------------
@torch.no_grad()
def _target_gap(pipe, fm: FlowModel, concept: str, eta: float, edit: Edit | None) -> float:
    """Mean ||v(z, c, s) - v_target(z, s)||^2 over fixed (z, s), v_target from the ORIGINAL model."""
    ctx = FamilyAdapter(pipe).encode(["", concept])
    g = torch.Generator().manual_seed(123)
    z, sig = fm.noise(4, g), torch.tensor([0.9, 0.7, 0.5, 0.3])
    tf = pipe.transformer
    v_u = fm.predict(tf, z, sig, ctx[[0, 0, 0, 0]])
    v_c = fm.predict(tf, z, sig, ctx[[1, 1, 1, 1]])
    target = esd_target(v_u, v_c, v_c, eta)
    if edit is None:
        return float((v_c - target).pow(2).mean())
    with edit.applied(pipe):
        return float((fm.predict(tf, z, sig, ctx[[1, 1, 1, 1]]) - target).pow(2).mean())


@pytest.mark.parametrize("param_set", ["esd-x", "esd-u"])
def test_esd_moves_the_concept_velocity_toward_the_target_and_trains_only_its_set(mmdit, param_set):
    before = _state(mmdit)
    fm = FlowModel(mmdit, resolution=16)
    edit = erasekit.erase(mmdit, "esd", ["Van Gogh"], **{**FAST, "steps": 8, "lr": 3e-3, "param_set": param_set})
    assert _unchanged(before, mmdit), "erase left the pipeline changed"
    allowed = set(select_params(mmdit, param_set))
    assert edit.keys and set(edit.keys) <= allowed and all(k.startswith("transformer/") for k in edit.keys)
    text_side = ("add_q_proj", "add_k_proj", "add_v_proj", "to_add_out", "ff_context", "norm1_context")
    if param_set == "esd-x":
        assert all(any(p in k for p in text_side[:4]) for k in edit.keys)
    else:
        assert not any(p in k for k in edit.keys for p in text_side)
    gap0, gap1 = _target_gap(mmdit, fm, "Van Gogh", 1.0, None), _target_gap(mmdit, fm, "Van Gogh", 1.0, edit)
    assert gap1 < 0.8 * gap0, (gap0, gap1)
    assert edit.manifest["family"] == fm.family and edit.manifest["flow"]["resolution"] == 16


def test_esd_edit_round_trips_bit_exactly(mmdit, tmp_path):
    before = _state(mmdit)
    edit = erasekit.erase(mmdit, "esd", ["Van Gogh"], **FAST)
    loaded = Edit.load(edit.save(tmp_path / "esd.safetensors"), mmdit)
    assert loaded.keys == edit.keys and all(torch.equal(loaded.weights[k], edit.weights[k]) for k in edit.keys)
    with loaded.applied(mmdit):
        for key in edit.keys:
            assert torch.equal(mmdit.transformer.get_parameter(key.split("/", 1)[1]), edit.weights[key])
    assert _unchanged(before, mmdit)


def test_esd_guidance_embedding_defaults_to_the_pipelines_and_is_refused_without_one(mmdit):
    fm = FlowModel(mmdit, resolution=16)
    if fm.uses_guidance:
        assert fm.guidance == 3.5 and FlowModel(mmdit, 16, guidance=2.0).kwargs(
            fm.noise(1, torch.Generator()), 0.5, FamilyAdapter(mmdit).encode("a"))["guidance"].item() == 2.0
        edit = erasekit.erase(mmdit, "esd", ["Van Gogh"], **FAST, guidance_embed=2.0)
        assert edit.manifest["flow"]["guidance_embed"] == 2.0
    else:
        with pytest.raises(ConfigError, match="guidance_embed"):
            erasekit.erase(mmdit, "esd", ["Van Gogh"], **FAST, guidance_embed=2.0)


def test_esd_refusals_name_the_problem(mmdit, tiny_sd1):
    with pytest.raises(ConfigError, match="UNet set"):
        erasekit.erase(mmdit, "esd", ["Van Gogh"], **FAST, param_set="xattn")
    with pytest.raises(ConfigError, match="resolution"):
        erasekit.erase(mmdit, "esd", ["Van Gogh"], **{**FAST, "resolution": 15})
    with pytest.raises(ConfigError, match="guidance_embed"):
        erasekit.erase(tiny_sd1, "esd", ["Van Gogh"], steps=1, ddim_steps=2, progress=False, guidance_embed=3.5)


# -- UnlearnDiffAtk ------------------------------------------------------------------------------------------
ATTACK = {"steps_per_block": 2, "blocks": 2, "block_growth": 1.0, "restarts": 1}


@torch.no_grad()
def test_prefix_slots_encode_as_the_pipeline_for_clip_and_t5_reads_the_plain_prompt(mmdit):
    from erasekit.pipelines.prefix import PrefixPrompts

    ad, pp = FamilyAdapter(mmdit), PrefixPrompts(mmdit, ["a cat", "Van Gogh"], k=1)
    assert all(type(e).__name__.startswith("CLIPTextModel") for e in pp.adapter.encoders)
    red = pp.adapter.tokenizers[0]("red", add_special_tokens=False).input_ids[0]
    ctx = pp.encode(pp.embed_ids(torch.tensor([[red], [red]])))
    prefixed, plain = ad.encode(["red a cat", "red Van Gogh"]), ad.encode(["a cat", "Van Gogh"])
    clip = 77 if ad.family == "sd3" else 0   # SD 3: 77 CLIP rows, then T5; Flux: T5 rows only
    torch.testing.assert_close(ctx.embeds[:, :clip], prefixed.embeds[:, :clip])
    torch.testing.assert_close(ctx.pooled, prefixed.pooled)
    torch.testing.assert_close(ctx.embeds[:, clip:], plain.embeds[:, clip:])
    assert not torch.allclose(ctx.pooled, plain.pooled)


def test_unlearndiffatk_runs_end_to_end_with_the_flow_matching_loss(mmdit, monkeypatch):
    from _attack_helpers import ToneJudge

    from erasekit.attacks import attack
    from erasekit.attacks.unlearndiffatk import flow_model, target_latents
    from erasekit.pipelines import default_sampling, generate
    from erasekit.pipelines import flow

    from diffusers import FlowMatchEulerDiscreteScheduler

    # shift 3 (SD 3.5's): the attack's noise levels must be shifted as the scheduler shifts its timesteps
    monkeypatch.setattr(mmdit, "scheduler", FlowMatchEulerDiscreteScheduler(shift=3.0))
    before = _state(mmdit)
    sampling = default_sampling(mmdit, steps=2, height=16, width=16)
    targets = generate(mmdit, ["a cat"], [0], sampling)
    seen, noisy_calls, targets_used = [], [], []
    real_noisy, real_velocity = flow.noisy, flow.velocity

    def recording_noisy(x0, eps, sigma):
        noisy_calls.append((x0.detach().clone(), sigma.detach().clone()))
        return real_noisy(x0, eps, sigma)

    def recording_velocity(x0, eps):
        targets_used.append(x0.detach().clone())
        return real_velocity(x0, eps)

    def hook(module, args, kwargs):
        if torch.is_grad_enabled():   # the attack's loss (generation runs without grad)
            seen.append((kwargs["hidden_states"].detach().clone(), kwargs["timestep"].detach().clone()))

    monkeypatch.setattr(flow, "noisy", recording_noisy)
    monkeypatch.setattr(flow, "velocity", recording_velocity)
    handle = mmdit.transformer.register_forward_pre_hook(hook, with_kwargs=True)
    judge = ToneJudge(255)
    try:
        res = attack(mmdit, ["a cat"], "bright", judge=judge, target_images=targets, progress=False, **ATTACK,
                     sampling=sampling)
    finally:
        handle.remove()
    (p,) = res.prompts
    assert p.grad_steps == 4 and p.adv_prompt.endswith(" a cat") and p.adv_prompt != "a cat" and not p.success
    assert judge.calls >= 3 and res.protocol["sampling"]["sampler"] == "flow_euler"
    assert _unchanged(before, mmdit), "the attack left the pipeline changed"
    fm = flow_model(mmdit, sampling)
    z0 = target_latents(mmdit, targets, fm)
    assert len(seen) == len(noisy_calls) == len(targets_used) == 4
    lo, hi = fm.shifted(torch.tensor(0.5)), fm.shifted(torch.tensor(1.0))
    assert float(lo) == pytest.approx(0.75)
    for (x0, sigma), (_, timestep), v_x0 in zip(noisy_calls, seen, targets_used):
        torch.testing.assert_close(x0, z0)   # noised from the target image's latents ...
        torch.testing.assert_close(v_x0, z0)   # ... and regressed onto v = eps - z_tgt
        assert lo <= float(sigma) < hi       # the fast schedule's t in [500, 1000), shifted as the scheduler does
        scale = 1.0 if fm.family == "flux" else fm.n_train
        torch.testing.assert_close(timestep.float(), sigma.float() * scale)


# -- SalUn -----------------------------------------------------------------------------------------------------
SALUN = dict(pseudo="a dog", retain_prompts=["a photo of a cat", "a tree"], steps=3, images_per_prompt=2,
             retain_images_per_prompt=1, data_steps=2, batch_size=2, progress=False, checkpoint_dir=None, lr=1e-3)


def test_salun_flow_noiser_interpolates_and_targets_the_velocity(mmdit):
    from erasekit.erase.salun import _FlowNoiser

    fm = FlowModel(mmdit)
    z0 = fm.noise(3, torch.Generator().manual_seed(1)) * 2 + 1
    x, sigma, v = _FlowNoiser(fm)(z0, torch.Generator().manual_seed(2))
    s = sigma.view(-1, *[1] * (z0.dim() - 1))
    torch.testing.assert_close(x, z0 + s * v)            # x_s = (1 - s) z0 + s eps  and  v = eps - z0
    torch.testing.assert_close((v + z0).std(), torch.tensor(1.0), atol=0.3, rtol=0)   # eps is standard normal
    assert ((sigma > 0) & (sigma <= 1)).all() and sigma.unique().numel() > 1


def test_salun_trains_only_salient_weights_of_its_set(mmdit):
    from erasekit.erase.salun import SalUnConfig, saliency

    before = _state(mmdit)
    mask = saliency(mmdit, ["Van Gogh"], SalUnConfig(**SALUN, mask_ratio=0.3))
    assert mask and all(k.startswith("transformer/") for k in mask)
    kept = sum(int(m.sum()) for m in mask.values()) / sum(m.numel() for m in mask.values())
    assert kept == pytest.approx(0.3, abs=0.01)
    edit = erasekit.erase(mmdit, "salun", ["Van Gogh"], **SALUN, mask_ratio=0.3)
    assert _unchanged(before, mmdit), "erase left the pipeline changed"
    assert edit.keys and set(edit.keys) <= set(mask)
    moved = 0
    for key in edit.keys:
        changed = edit.weights[key] != before[key]
        assert not (changed & ~mask[key]).any(), f"{key} changed outside the saliency mask"
        moved += int(changed.sum())
    assert moved > 0 and edit.manifest["forget_set"]["sampling"]["sampler"] == "flow_euler"


# -- AdvUnlearn --------------------------------------------------------------------------------------------------
ADV = dict(steps=2, warmup=1, attack_steps=1, retain=["a photo of a cat", "a photo of a dog"], retain_batch=1,
           pool_size=1, ddim_steps=2, prompts="concept", progress=False, checkpoint_dir=None)


@torch.no_grad()
def test_advunlearn_latents_are_the_pipelines_own_flow_trajectory(mmdit):
    from erasekit.erase.advunlearn import flow_trajectories

    fm, ad = FlowModel(mmdit), FamilyAdapter(mmdit)
    z_T = fm.noise(1, torch.Generator().manual_seed(5))
    guidance = 4.0 if fm.family == "sd3" else 3.5   # Flux: no CFG (a distilled model reads it as its embedding)
    out = flow_trajectories(fm, ad.encode(["Van Gogh"]), ad.encode([""]), z_T, guidance, steps=3)
    ref = mmdit("Van Gogh", num_inference_steps=3, guidance_scale=guidance, latents=z_T.clone(), output_type="latent",
                height=fm.size, width=fm.size).images
    torch.testing.assert_close(out["z0"], ref.float(), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(out["timesteps"], fm.sigmas(3)[:3])
    assert out["z"].shape[:2] == (1, 3) and torch.equal(out["z"][:, 0], z_T.cpu())


@pytest.mark.parametrize("attack_loss", ["esd_match", "diffusion_classifier"])
def test_advunlearn_trains_the_clip_encoders_only_with_t5_frozen(mmdit, attack_loss):
    before = _state(mmdit)
    edit = erasekit.erase(mmdit, "advunlearn", ["Van Gogh"], **ADV, attack_loss=attack_loss)
    assert _unchanged(before, mmdit), "erase left the pipeline changed"
    clip = {c for c in ("text_encoder", "text_encoder_2", "text_encoder_3")
            if type(getattr(mmdit, c, None)).__name__.startswith("CLIPTextModel")}
    assert edit.keys and {k.split("/")[0] for k in edit.keys} == clip
    assert set(edit.keys) <= set(select_params(mmdit, "text-encoder-full"))
    assert edit.manifest["attacks"]["runs"] == 1 and edit.manifest["family"] in ("sd3", "flux")
    with edit.applied(mmdit):   # the erased encoders change what the transformer reads for the concept
        changed = FamilyAdapter(mmdit).encode("Van Gogh")
    original = FamilyAdapter(mmdit).encode("Van Gogh")
    assert not torch.equal(changed.pooled, original.pooled)
    t5 = slice(77, None) if mmdit.transformer.__class__.__name__.startswith("SD3") else slice(None)
    torch.testing.assert_close(changed.embeds[:, t5], original.embeds[:, t5], rtol=0, atol=0)   # T5 rows untouched


def test_image_folders_encode_to_the_transformers_latent_layout(mmdit, tmp_path):
    from PIL import Image

    from erasekit.erase.data import folder_set

    for i, colour in enumerate([(200, 30, 30), (20, 40, 220)]):
        Image.new("RGB", (40, 24), colour).save(tmp_path / f"im{i}.png")
        (tmp_path / f"im{i}.txt").write_text(f"a picture {i}")
    images = folder_set(mmdit, tmp_path)
    fm = FlowModel(mmdit)
    assert images.latents.shape == (2, *fm.noise(1, torch.Generator()).shape[1:])   # Flux: packed 2 x 2 patches
    assert images.prompts == ["a picture 0", "a picture 1"]
    assert not torch.allclose(images.latents[0], images.latents[1])


def test_esd_resolution_at_the_native_size_is_the_default_on_unet_families(tiny_pipe):
    """``resolution=None`` keeps the UNet families' runs as they were: the native size, bit for bit."""
    native = tiny_pipe.unet.config.sample_size * tiny_pipe.vae_scale_factor
    opts = dict(steps=2, ddim_steps=3, progress=False, checkpoint_dir=None, lr=1e-3)
    a = erasekit.erase(tiny_pipe, "esd", ["Van Gogh"], **opts)
    b = erasekit.erase(tiny_pipe, "esd", ["Van Gogh"], **opts, resolution=native)
    assert a.keys == b.keys and all(torch.equal(a.weights[k], b.weights[k]) for k in a.keys)
    c = erasekit.erase(tiny_pipe, "esd", ["Van Gogh"], **opts, resolution=2 * native)
    assert any(not torch.equal(a.weights[k], c.weights[k]) for k in a.keys)
