"""Training methods and attacks on tiny random SD 3 and Flux pipelines: the flow-matching targets and mechanics."""

from __future__ import annotations

import pytest
import torch

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


def _state(pipe) -> dict:
    return {f"{n}/{k}": v.detach().clone() for n, m in pipe.components.items() if isinstance(m, torch.nn.Module)
            for k, v in m.state_dict().items()}


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


@torch.no_grad()
def test_flow_model_calls_the_transformer_as_the_pipeline_does(mmdit):
    """Noise, sigmas and every transformer input match the pipeline's own first denoising step."""
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
    assert all(torch.equal(v, _state(mmdit)[k]) for k, v in before.items()), "erase left the pipeline changed"
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
    assert all(torch.equal(v, _state(mmdit)[k]) for k, v in before.items())


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
