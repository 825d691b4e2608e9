"""SAFREE: the projection leaves flagged rows outside the concept subspace, self-validation gates it, the UNet
hook applies it for any caller, latent re-attention filters the decoder's skip features in its steps and leaves
the pipeline as it was, and a canvas style goes while another stays."""

import pytest
import torch

import erasekit
from erasekit.erase.safree import SAFREEConfig, concept_basis, project, reattend, svf_steps
from erasekit.errors import ConfigError, EditError
from erasekit.pipelines import Edit, FamilyAdapter
from erasekit.pipelines.inference import unconditional_context

from _canvas_helpers import style_accuracy


@pytest.mark.parametrize("options, name", [
    ({"preset": "nsfw"}, "preset"), ({"alpha": -1.0}, "alpha"), ({"concept_prompts": "nudity"}, "concept_prompts"),
    ({"concept_prompts": []}, "concept_prompts"), ({"svf_max_steps": 51}, "svf_max_steps"), ({"svf_k": 0.0}, "svf_k"),
    ({"self_validation": "yes"}, "self_validation"), ({"latent_reattention": 1}, "latent_reattention"),
    ({"lra_s1": 1.5}, "lra_s1"), ({"lra_s2": -0.1}, "lra_s2"), ({"lra_steps": (5, 2)}, "lra_steps"),
    ({"lra_steps": (0, 50)}, "lra_steps"), ({"lra_steps": 10}, "lra_steps"),
])
def test_bad_options_name_the_field(options, name):
    with pytest.raises(ConfigError, match=f"`{name}`"):
        SAFREEConfig(**options)


def test_projection_removes_the_subspace_from_flagged_rows_only():
    g = torch.Generator().manual_seed(0)
    basis = torch.linalg.qr(torch.randn(16, 2, generator=g, dtype=torch.float64))[0].T   # C: 2 of 16 dims
    u = torch.randn(1, 77, 16, generator=g)
    inside = (torch.randn(77, 2, generator=g, dtype=torch.float64) @ basis).float()
    E = u + 0.05 * torch.randn(1, 77, 16, generator=g)
    E[0, 3:6] = u[0, 3:6] + inside[3:6] * 10    # three rows almost all in C: the triggers
    new, beta = project(E, u, basis, alpha=0.01)
    moved = (new - E).abs().sum(-1)[0] > 1e-6
    assert moved[3:6].all() and moved.sum() < 40            # the triggers, not every row
    assert torch.equal(new[0, 0], E[0, 0])                   # the start row is never touched
    rest = (new - u).double()[0, moved]
    assert (rest @ basis.T).abs().max() < 1e-4               # no component in C is left on a flagged row
    plain, plain_beta = project(u + 0.05 * torch.randn(1, 77, 16, generator=g), u, basis, alpha=0.01)
    assert beta.item() > plain_beta.item()                   # a prompt inside C is "more toxic" (eq. 5)


def test_self_validation_steps_follow_the_sigmoid():
    steps = svf_steps(torch.tensor([0.0, 0.533, 2.0]), up_t=10, k=2.5, t0=5.333)
    assert steps.tolist() == [0.0, 5.0, 10.0]


@torch.no_grad()
def test_every_unet_caller_reads_the_projected_context(tiny_sd1):
    pipe = tiny_sd1
    edit = erasekit.erase(pipe, "safree", ["Van Gogh"], self_validation=False, alpha=-0.9,   # flag most rows
                          latent_reattention=False)   # the context alone (latent re-attention: tests below)
    cond = FamilyAdapter(pipe).encode(["a painting by Van Gogh"]).embeds
    u = unconditional_context(pipe).embeds
    basis = concept_basis(pipe, ["Van Gogh"], u)
    want_ctx, _ = project(cond, u, basis, -0.9)
    x, t = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0)), torch.tensor(500)
    want = pipe.unet(x, t, encoder_hidden_states=want_ctx).sample
    plain = pipe.unet(x, t, encoder_hidden_states=cond).sample
    pipe._guidance_scale = 7.5
    with edit.sampled(pipe) as p:
        direct = p.unet(x, t, encoder_hidden_states=cond).sample
        cfg = p.unet(torch.cat([x, x]), t, encoder_hidden_states=torch.cat([u, cond])).sample
    assert torch.allclose(direct, want, atol=1e-5) and not torch.allclose(want, plain, atol=1e-4)
    assert torch.allclose(cfg[1:], want, atol=1e-5)
    assert torch.allclose(cfg[:1], pipe.unet(x, t, encoder_hidden_states=u).sample, atol=1e-5)
    assert torch.equal(pipe.unet(x, t, encoder_hidden_states=cond).sample, plain)   # unhooked after the block
    with pytest.raises(EditError, match="edit.sampled"):
        edit.apply(pipe)


def _spectrum(x: torch.Tensor) -> torch.Tensor:
    return torch.fft.fftshift(torch.fft.fft2(x.double()), dim=(-2, -1))


def _outside_window(H: int, W: int) -> torch.Tensor:
    """The frequencies latent re-attention must not move: all but its window and the window's mirror."""
    keep = torch.ones(H, W, dtype=torch.bool)
    keep[max(H // 2 - 1, 0):H // 2 + 2, max(W // 2 - 1, 0):W // 2 + 2] = False
    return keep


def test_reattention_scales_the_low_frequencies_that_exceed_the_original_only():
    g = torch.Generator().manual_seed(0)
    h, h_orig = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 4, 8, 8, generator=g)
    out = reattend(h, h_orig, 0.25)
    F, F0, F_orig = _spectrum(out), _spectrum(h), _spectrum(h_orig)
    dc = (..., 4, 4)   # the zero frequency after fftshift
    bigger = F0[dc].real > F_orig[dc].real
    assert bigger.any() and (~bigger).any()                      # both cases occur in this sample
    assert torch.allclose(F[dc], torch.where(bigger, 0.25 * F0[dc], F0[dc]), atol=1e-4)
    keep = _outside_window(8, 8)
    assert torch.allclose(F[..., keep], F0[..., keep], atol=1e-4)  # the high frequencies stay


def _capture(blocks, store: list):
    def hook(module, args, kwargs):
        store.append(tuple(x.clone() for x in kwargs["res_hidden_states_tuple"]))
    return [b.register_forward_pre_hook(hook, with_kwargs=True) for b in blocks]


@torch.no_grad()
def test_latent_reattention_filters_the_projected_rows_skips_in_its_steps_only(tiny_sd1):
    pipe = tiny_sd1
    opts = dict(self_validation=False, alpha=-0.9, lra_s1=0.5, lra_s2=0.25, lra_steps=(0, 9))   # t in (800, 1000]
    edit = erasekit.erase(pipe, "safree", ["Van Gogh"], **opts)
    context_only = erasekit.erase(pipe, "safree", ["Van Gogh"], **{**opts, "latent_reattention": False})
    u, cond = unconditional_context(pipe).embeds, FamilyAdapter(pipe).encode(["a painting by Van Gogh"]).embeds
    x = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    pipe._guidance_scale = 7.5

    def cfg_call(p, t):
        return p.unet(torch.cat([x, x]), torch.tensor(t), encoder_hidden_states=torch.cat([u, cond])).sample

    computed, read = [], []
    handles = _capture(pipe.unet.up_blocks, computed)   # runs before SAFREE's hooks: the skips as computed
    try:
        with edit.sampled(pipe) as p:
            handles += _capture(p.unet.up_blocks, read)   # runs after them: the skips the blocks read
            inside = cfg_call(p, 900)
            n_inside = len(read)
            outside = cfg_call(p, 500)
    finally:
        for h in handles:
            h.remove()
    with context_only.sampled(pipe) as p:
        want_inside, want_outside = cfg_call(p, 900), cfg_call(p, 500)

    # In its steps: the call carries (uncond, projected, original) rows; only the projected row's skips move,
    # by s1 where they meet the widest decoder features (16 channels here) and s2 at the next (8): on the
    # tiny UNet (8, 16) the first up block's skips meet 16 channels, the second's last skip (read first) 16
    # and its first 8.
    factors = [(0.5, 0.5), (0.25, 0.5)]
    assert n_inside == len(factors)
    for before, after, fs in zip(computed[:n_inside], read[:n_inside], factors):
        for b, a, s in zip(before, after, fs):
            assert b.shape[0] == 3 and torch.equal(a[0], b[0]) and torch.equal(a[2], b[2])
            F, F0, F_orig = _spectrum(a[1]), _spectrum(b[1]), _spectrum(b[2])
            H, W = F.shape[-2:]
            dc = (..., H // 2, W // 2)
            bigger = F0[dc].real > F_orig[dc].real
            assert torch.allclose(F[dc], torch.where(bigger, s * F0[dc], F0[dc]), rtol=1e-4, atol=1e-4)
            keep = _outside_window(H, W)
            assert torch.allclose(F[..., keep], F0[..., keep], atol=1e-4)
    assert any(not torch.equal(a, b) for before, after in zip(computed, read) for a, b in zip(before, after))
    assert inside.shape == want_inside.shape and not torch.allclose(inside[1:], want_inside[1:], atol=1e-5)
    assert torch.allclose(inside[:1], want_inside[:1], atol=1e-5)   # the unconditional row is left alone
    # Outside its steps: no original rows, no filter, the prediction of the context projection alone.
    assert all(b.shape[0] == 2 and torch.equal(a, b)
               for before, after in zip(computed[n_inside:], read[n_inside:]) for a, b in zip(before, after))
    assert torch.allclose(outside, want_outside, atol=1e-6)


def _hooks(module) -> int:
    return sum(len(m._forward_pre_hooks) + len(m._forward_hooks) for m in module.modules())


@torch.no_grad()
def test_sampling_with_latent_reattention_leaves_the_pipeline_as_it_was(tiny_pipe):
    pipe = tiny_pipe
    edit = erasekit.erase(pipe, "safree", ["Van Gogh"], self_validation=False, alpha=-0.9)
    assert edit.manifest["resolved"]["latent_reattention"] is True   # the paper's default on a real-model family
    state = {k: v.clone() for k, v in pipe.unet.state_dict().items()}
    hooks = _hooks(pipe.unet)

    def sample(p):
        return p(["a painting by Van Gogh"], num_inference_steps=2, guidance_scale=7.5, output_type="latent",
                 generator=torch.Generator().manual_seed(0)).images

    batches = []
    handle = pipe.unet.up_blocks[0].register_forward_pre_hook(
        lambda m, args, kwargs: batches.append(kwargs["hidden_states"].shape[0]), with_kwargs=True)
    try:
        with edit.sampled(pipe) as p:
            filtered = sample(p)
    finally:
        handle.remove()
    assert batches == [3, 3]   # the pipeline's own loop: unconditional, projected and original rows
    with pytest.raises(RuntimeError, match="inside the block"):
        with edit.sampled(pipe) as p:
            raise RuntimeError("inside the block")
    assert _hooks(pipe.unet) == hooks
    assert all(torch.equal(v, state[k]) for k, v in pipe.unet.state_dict().items())
    with erasekit.erase(pipe, "safree", ["Van Gogh"], self_validation=False, alpha=-0.9,
                        latent_reattention=False).sampled(pipe) as p:
        assert not torch.allclose(sample(p), filtered, atol=1e-6)


def test_a_saved_edit_keeps_its_latent_reattention_options(tiny_sd1, tmp_path):
    pipe = tiny_sd1
    for on in (False, True):
        edit = erasekit.erase(pipe, "safree", ["Van Gogh"], latent_reattention=on, lra_s1=0.7, lra_steps=(2, 20))
        loaded = Edit.load(edit.save(tmp_path / f"safree_{on}.safetensors"), pipe)
        r = loaded.manifest["resolved"]
        assert (r["latent_reattention"], r["lra_s1"], r["lra_s2"], r["lra_steps"]) == (on, 0.7, 0.2, [2, 20])
        with loaded.sampled(pipe) as p:
            assert all(len(b._forward_pre_hooks) == on for b in p.unet.up_blocks)


def test_erasing_a_style_on_canvas_mini(canvas_pipe, canvas_judge):
    def accuracy(p, style):
        return style_accuracy(p, canvas_judge, style, objects=4, seeds=(0,), steps=10)

    base = accuracy(canvas_pipe, "Winter"), accuracy(canvas_pipe, "Pop_Art")
    edit = erasekit.erase(canvas_pipe, "safree", ["Winter"])   # canvas-mini's measured preset
    with edit.sampled(canvas_pipe) as p:
        after = accuracy(p, "Winter"), accuracy(p, "Pop_Art")
    assert base[0] >= 0.75 and after[0] <= 0.25     # the judge stops seeing the erased style
    assert after[1] >= base[1] - 0.25               # another style stays
