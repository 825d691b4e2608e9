"""SAFREE: the projection leaves flagged rows outside the concept subspace, self-validation gates it, the UNet
hook applies it for any caller, and a canvas style goes while another stays."""

import pytest
import torch

import erasekit
from erasekit.erase.safree import SAFREEConfig, concept_basis, project, svf_steps
from erasekit.errors import ConfigError, EditError
from erasekit.pipelines import FamilyAdapter
from erasekit.pipelines.inference import unconditional_context

from _canvas_helpers import style_accuracy


@pytest.mark.parametrize("options, name", [
    ({"preset": "nsfw"}, "preset"), ({"alpha": -1.0}, "alpha"), ({"concept_prompts": "nudity"}, "concept_prompts"),
    ({"concept_prompts": []}, "concept_prompts"), ({"svf_max_steps": 51}, "svf_max_steps"), ({"svf_k": 0.0}, "svf_k"),
    ({"self_validation": "yes"}, "self_validation"),
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
    edit = erasekit.erase(pipe, "safree", ["Van Gogh"], self_validation=False, alpha=-0.9)   # flag most rows
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


def test_erasing_a_style_on_canvas_mini(canvas_pipe, canvas_judge):
    def accuracy(p, style):
        return style_accuracy(p, canvas_judge, style, objects=4, seeds=(0,), steps=10)

    base = accuracy(canvas_pipe, "Winter"), accuracy(canvas_pipe, "Pop_Art")
    edit = erasekit.erase(canvas_pipe, "safree", ["Winter"])   # canvas-mini's measured preset
    with edit.sampled(canvas_pipe) as p:
        after = accuracy(p, "Winter"), accuracy(p, "Pop_Art")
    assert base[0] >= 0.75 and after[0] <= 0.25     # the judge stops seeing the erased style
    assert after[1] >= base[1] - 0.25               # another style stays
