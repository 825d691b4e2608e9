"""SLD: the hook gives the paper's guided prediction, in CFG batches and direct UNet calls; a canvas style goes."""

import pytest
import torch

import erasekit
from erasekit.erase.sld import PRESETS, SLDConfig, SLDGuidance
from erasekit.errors import ConfigError, EditError
from erasekit.pipelines import Edit, FamilyAdapter, Sampling, generate
from erasekit.pipelines.inference import unconditional_context

from _canvas_helpers import style_accuracy


@pytest.mark.parametrize("options, name", [
    ({"preset": "extreme"}, "preset"), ({"guidance_scale": -1.0}, "guidance_scale"),
    ({"warmup_steps": 51}, "warmup_steps"), ({"momentum_beta": 1.0}, "momentum_beta"),
    ({"momentum_scale": -0.1}, "momentum_scale"), ({"safety_concept": " "}, "safety_concept"),
])
def test_bad_options_name_the_field(options, name):
    with pytest.raises(ConfigError, match=f"`{name}`"):
        SLDConfig(**options)


def _eps(pipe, x, t, ctx):
    return pipe.unet(x, t, **ctx.unet_kwargs(pipe)).sample


def _expected(pipe, values, x, t, cond):
    """eps_c - mu (eps_S - eps_u) from three plain UNet calls (eqs. 3-6, no momentum yet)."""
    adapter = FamilyAdapter(pipe)
    eps_c, eps_u = _eps(pipe, x, t, cond), _eps(pipe, x, t, unconditional_context(pipe))
    eps_s = _eps(pipe, x, t, adapter.encode([values["safety_concept"]]))
    diff = eps_c - eps_s
    mu = torch.where(diff >= values["threshold"], 0.0, (diff.abs() * values["guidance_scale"]).clamp(max=1.0))
    return eps_c - mu * (eps_s - eps_u), eps_c


@torch.no_grad()
def test_direct_unet_call_gets_the_guided_prediction_after_the_warmup(tiny_sd1):
    pipe = tiny_sd1
    edit = erasekit.erase(pipe, "sld", ["Van Gogh"], guidance_scale=50.0, threshold=0.0)
    values = edit.manifest["resolved"]
    cond = FamilyAdapter(pipe).encode(["a painting by Van Gogh"])
    x = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    late, early = torch.tensor([300]), torch.tensor([990])   # warm-up 10 of 50 steps: t < 800 is guided
    want, eps_c = _expected(pipe, values, x, late, cond)
    with edit.sampled(pipe) as p:
        got_late, got_early = _eps(p, x, late, cond), _eps(p, x, early, cond)
    assert torch.allclose(got_late, want, atol=1e-5) and not torch.allclose(want, eps_c, atol=1e-4)
    assert torch.equal(got_early, _eps(pipe, x, early, cond))   # inside the warm-up: untouched
    assert torch.equal(_eps(pipe, x, late, cond), eps_c)        # after the block: the plain UNet again


@torch.no_grad()
def test_cfg_batch_keeps_the_unconditional_half_and_guides_the_conditional_one(tiny_sd1):
    pipe = tiny_sd1
    edit = erasekit.erase(pipe, "sld", ["Van Gogh"], guidance_scale=50.0, threshold=0.0)
    cond = FamilyAdapter(pipe).encode(["a painting by Van Gogh"])
    uncond = unconditional_context(pipe)
    x = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    t = torch.tensor(300)
    want, _ = _expected(pipe, edit.manifest["resolved"], x, t, cond)
    pipe._guidance_scale = 7.5   # what the pipeline's __call__ sets
    with edit.sampled(pipe) as p:
        out = p.unet(torch.cat([x, x]), t, encoder_hidden_states=torch.cat([uncond.embeds, cond.embeds])).sample
    assert torch.allclose(out[:1], _eps(pipe, x, t, uncond), atol=1e-5)   # (batch size changes the last bits)
    assert torch.allclose(out[1:], want, atol=1e-5)


def test_momentum_follows_eqs_7_and_8():
    guide = SLDGuidance.__new__(SLDGuidance)
    guide.v, guide.nu, guide.last_t = {**PRESETS["medium"]}, None, None
    g1, g2 = torch.ones(1, 2), torch.full((1, 2), 2.0)
    assert torch.equal(guide.momentum(g1, torch.tensor([900.0])), g1)                  # nu_0 = 0
    assert torch.allclose(guide.momentum(g2, torch.tensor([800.0])), g2 + 0.3 * 0.6 * g1)  # s_m nu_1
    assert torch.equal(guide.momentum(g1, torch.tensor([950.0])), g1)                  # t rose: a new trajectory


def test_apply_refuses_and_save_load_samples_the_same(tiny_sd1, tmp_path):
    edit = erasekit.erase(tiny_sd1, "sld", ["Van Gogh"], preset="max")
    with pytest.raises(EditError, match="edit.sampled"):
        edit.apply(tiny_sd1)
    loaded = Edit.load(edit.save(tmp_path / "sld.safetensors"), tiny_sd1)
    assert loaded.inference_time and loaded.nbytes() == 0 and loaded.manifest["resolved"] == edit.manifest["resolved"]
    sampling = Sampling(steps=3, guidance=5.0)
    plain = generate(tiny_sd1, "a painting by Van Gogh", [0], sampling, output_type="pt")[0]
    with edit.sampled(tiny_sd1) as p:
        a = generate(p, "a painting by Van Gogh", [0], sampling, output_type="pt")[0]
    with loaded.sampled(tiny_sd1) as p:
        b = generate(p, "a painting by Van Gogh", [0], sampling, output_type="pt")[0]
    assert torch.equal(a, b) and not torch.equal(a, plain)
    assert torch.equal(generate(tiny_sd1, "a painting by Van Gogh", [0], sampling, output_type="pt")[0], plain)


def test_erasing_a_style_on_canvas_mini(canvas_pipe, canvas_judge):
    def accuracy(p, style):
        return style_accuracy(p, canvas_judge, style, objects=4, seeds=(0,), steps=10)

    base = accuracy(canvas_pipe, "Pop_Art"), accuracy(canvas_pipe, "Winter")
    edit = erasekit.erase(canvas_pipe, "sld", ["Pop Art"])   # canvas-mini's measured preset
    with edit.sampled(canvas_pipe) as p:
        after = accuracy(p, "Pop_Art"), accuracy(p, "Winter")
    assert base[0] >= 0.75 and after[0] <= 0.25     # the judge stops seeing the erased style
    assert after[1] >= base[1] - 0.25               # another style stays


def test_sequential_unlearning_samples_one_edit_for_every_target_so_far(tiny_sd1, monkeypatch):
    from _eval_helpers import ColourJudge, tiny_protocol

    from erasekit.workflows import sequential, sequential_unlearning

    made = []

    def recording_erase(*args, **kwargs):
        made.append(erasekit.erase(*args, **kwargs))
        return made[-1]

    monkeypatch.setattr(sequential_unlearning, "erase", recording_erase)
    r = sequential(tiny_sd1, "sld", ["Cubism", "Mosaic"], protocol=tiny_protocol(seeds=(0,)), judge=ColourJudge(),
                   fid=False, clip=False, cache_dir=None, progress=False, method_options={"kind": "style"})
    assert [list(s["UA_per_target"]) for s in r.sequential] == [["Cubism"], ["Cubism", "Mosaic"]]
    assert [e.manifest["concepts"] for e in made] == [["Cubism"], ["Cubism", "Mosaic"]]
    assert made[1].manifest["resolved"]["safety_concept"] == "Cubism, Mosaic"
    assert not tiny_sd1.unet._forward_hooks and not tiny_sd1.unet._forward_pre_hooks   # unhooked after
