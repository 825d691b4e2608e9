"""SFD: the losses send gradients to the right networks, the one-step generator saves, loads and samples."""

import pytest
import torch

import erasekit
from erasekit.canvas.world import OBJECTS
from erasekit.erase.engine import CHECKPOINT_NAME
from erasekit.erase.sfd import SFDConfig, SFDTrainer, prompt_sets, sid_loss
from erasekit.errors import ConfigError, EditError
from erasekit.pipelines import Edit, FamilyAdapter, Sampling, generate, one_step_pipeline
from erasekit.pipelines.one_step import NoiseSchedule, alphas_cumprod, one_step_latents, to_x0_eps

RETAIN = ("a photo of a dog", "a red house", "a tree in winter")
TINY = dict(batch_size=2, forget_batch_size=2, distill_iterations=0, retain_prompts=RETAIN, progress=False)


def _trainer(pipe, **options):
    return SFDTrainer(pipe, ["cat"], SFDConfig(**{**TINY, **options}))


def _grads(net):
    return [p.grad for p in net.parameters()]


# -- config and conditions ------------------------------------------------------------------------
@pytest.mark.parametrize("options, field", [
    ({"t_min": 500, "t_max": 100}, "t_min"), ({"lr_theta": 0.0}, "lr_theta"),
    ({"mixed_precision": "fp8"}, "mixed_precision"), ({"cfg_dropout": 1.0}, "cfg_dropout"),
    ({"forget_prompts": ("a cat",), "safe_prompts": ("a dog", "a cow")}, "safe_prompts"),
])
def test_bad_options_name_the_field(options, field):
    with pytest.raises(ConfigError, match=f"`{field}`"):
        SFDConfig(**options)


def _canvas_sets(concepts, config, pipe):
    from erasekit.presets import concept_context

    return prompt_sets(concepts, config, concept_context(pipe, concepts, config))


def test_canvas_style_prompts(canvas_pipe):
    sets = _canvas_sets(["Van Gogh"], SFDConfig(), canvas_pipe)
    assert len(sets.forget) == 50 and len(sets.retain) == 450  # 10 objects x 5 templates; 9 other styles
    assert all("Van Gogh" in p for p in sets.forget) and not any("Van Gogh" in p for p in sets.retain)
    rng = torch.Generator().manual_seed(0)
    assert {sets.safe_prompt(0, rng) for _ in range(10)} == {sets.forget[0].replace("Van Gogh", "Watercolor")}
    rand = _canvas_sets(["Van Gogh"], SFDConfig(pseudo_label="rand"), canvas_pipe)
    safe = [rand.safe_prompt(0, rng) for _ in range(30)]
    assert not any("Van Gogh" in s for s in safe) and len(set(safe)) > 3  # a random other style each time
    obj = sets.forget[0].split()[1]
    assert all(obj in s for s in safe)  # only the style is swapped


def test_next_label_skips_forgotten_ones_and_wraps(canvas_pipe):
    sets = _canvas_sets(["Van_Gogh", "Watercolor", "Winter"], SFDConfig(), canvas_pipe)
    rng = torch.Generator()
    picks = {sets.safe_prompt(i, rng) for i, p in enumerate(sets.forget) if p == "A Cats image in Winter style."}
    assert picks == {"A Cats image in Cubism style."}  # Winter -> (Cubism, wrapped round), not a forgotten one
    with pytest.raises(ConfigError, match="override"):
        _canvas_sets(list(OBJECTS), SFDConfig(), canvas_pipe)
    with pytest.raises(ConfigError, match="retain_prompts"):   # another model: no captions of its own
        prompt_sets(["Van Gogh"], SFDConfig())


def test_override_and_prompt_errors():
    sets = prompt_sets(["Brad Pitt"], SFDConfig(forget_prompts=("a photo of {}", "BRAD PITT smiling"),
                                                override="a middle aged man", retain_prompts=RETAIN))
    rng = torch.Generator()
    assert [sets.safe_prompt(i, rng) for i in range(2)] == ["a photo of a middle aged man",
                                                            "a middle aged man smiling"]
    with pytest.raises(ConfigError, match="retain_prompts"):
        prompt_sets(["Brad Pitt"], SFDConfig())
    with pytest.raises(ConfigError, match="safe_prompts"):
        prompt_sets(["nudity"], SFDConfig(forget_prompts=("a naked woman",), retain_prompts=RETAIN))
    pair = prompt_sets(["nudity"], SFDConfig(forget_prompts=("a naked woman",), safe_prompts=("a woman",),
                                             retain_prompts=RETAIN))
    assert pair.safe_prompt(0, rng) == "a woman"


def test_teacher_sees_safe_condition_generator_sees_forget(tiny_sd1):
    with _trainer(tiny_sd1, override="a dog") as tr:
        batch = tr.draw(n_retain=2, n_forget=3)
        enc = FamilyAdapter(tiny_sd1).encode
        assert torch.equal(batch.gen.embeds[:2], batch.teacher.embeds[:2])                 # retain: c_R = c_F
        assert torch.allclose(batch.gen.embeds[2:], enc(["cat"] * 3).embeds, atol=1e-6)    # G and psi: c_f
        assert torch.allclose(batch.teacher.embeds[2:], enc(["a dog"] * 3).embeds, atol=1e-6)  # teacher: c_o


# -- the losses -------------------------------------------------------------------------------------
def test_sid_loss_form_and_stop_gradient_normaliser():
    g = torch.Generator().manual_seed(0)
    x_g, f_phi, f_psi = (torch.randn(3, 4, 8, 8, generator=g) for _ in range(3))
    alpha = 1.2
    omega = (f_phi - x_g).abs().flatten(1).mean(1)
    d = f_phi - f_psi
    other = ((1 - alpha) * d.pow(2) + d * (f_psi - x_g)).flatten(1).sum(1) / omega  # sfd.md's equivalent form
    x = x_g.clone().requires_grad_(True)
    loss = sid_loss(x, f_phi, f_psi, alpha)
    assert torch.allclose(loss, other, rtol=1e-5, atol=1e-4)
    loss.sum().backward()
    # with f_phi, f_psi fixed and omega a stop-gradient, dl/dx_g = -(f_phi - f_psi) / omega
    assert torch.allclose(x.grad, -d / omega.view(-1, 1, 1, 1), atol=1e-5)


def test_fake_score_loss_trains_only_psi(tiny_sd1):
    with _trainer(tiny_sd1) as tr:
        loss, _ = tr.fake_score_loss(tr.draw())
        loss.backward()
        assert all(g is None for g in _grads(tiny_sd1.unet))   # teacher
        assert all(g is None for g in _grads(tr.G))             # generator (sampled without gradient)
        psi = [g for g in _grads(tr.psi) if g is not None]
        assert len(psi) == len(_grads(tr.psi)) and sum(g.abs().sum() for g in psi) > 0


@pytest.mark.parametrize("stop_gradient", [False, True])
def test_generator_loss_trains_only_theta(tiny_sd1, stop_gradient):
    grad_on = []
    with _trainer(tiny_sd1, stop_gradient=stop_gradient) as tr:
        hook = tiny_sd1.unet.register_forward_hook(lambda *_: grad_on.append(torch.is_grad_enabled()))
        tr.psi.requires_grad_(False)
        loss, _ = tr.generator_loss(tr.draw())
        loss.backward()
        assert all(g is None for g in _grads(tiny_sd1.unet)) and all(g is None for g in _grads(tr.psi))
        assert sum(g.abs().sum() for g in _grads(tr.G) if g is not None) > 0
    hook.remove()
    assert grad_on == [not stop_gradient]  # full SiD differentiates through the teacher's input


def test_full_sid_gradient_flows_through_frozen_networks(tiny_sd1):
    """Same batch, alpha = 1: equal loss values, but the full loss also has the paths through x_t."""
    out = {}
    for sg in (False, True):
        with _trainer(tiny_sd1, stop_gradient=sg, alpha=1.0, seed=3) as tr:
            tr.psi.requires_grad_(False)
            loss, _ = tr.generator_loss(tr.draw())
            loss.backward()
            out[sg] = loss.item(), torch.cat([g.flatten() for g in _grads(tr.G)])
    assert out[False][0] == pytest.approx(out[True][0], rel=1e-4)
    assert not torch.allclose(out[False][1], out[True][1], rtol=1e-3, atol=1e-6)


# -- the method and its one-step pipeline -------------------------------------------------------------
def test_erase_leaves_pipeline_unchanged(tiny_pipe):
    before = {k: v.clone() for k, v in tiny_pipe.unet.state_dict().items()}
    flags = [p.requires_grad for p in tiny_pipe.unet.parameters()]
    edit = erasekit.erase(tiny_pipe, "sfd", ["cat"], iterations=2, **{**TINY, "progress": False})
    assert all(torch.equal(before[k], v) for k, v in tiny_pipe.unet.state_dict().items())
    assert [p.requires_grad for p in tiny_pipe.unet.parameters()] == flags
    m = edit.manifest
    assert (m["method"], m["sampler"], m["generator_timestep"], m["loss"]) == ("sfd", "one_step", 625, "sid")
    assert set(edit.keys) == {f"unet/{n}" for n, _ in tiny_pipe.unet.named_parameters()}
    assert any(not torch.equal(edit.weights[k], before[k.split("/", 1)[1]]) for k in edit.keys)
    images = generate(one_step_pipeline(tiny_pipe, edit), ["a cat", "a dog"], seeds=[0, 1])
    assert len(images) == 2 and images[0].size == (16, 16)


def test_one_step_save_load_round_trip(tiny_sd1, tmp_path):
    edit = erasekit.erase(tiny_sd1, "sfd", ["cat"], iterations=1, **TINY)
    loaded = Edit.load(edit.save(tmp_path / "sfd.safetensors"), tiny_sd1)
    assert loaded.manifest["sampler"] == "one_step" and loaded.manifest["safe_concepts"] == {"cat": [""]}
    a, b = one_step_pipeline(tiny_sd1, edit), one_step_pipeline(tiny_sd1, loaded)
    prompts, seeds = ["a cat", "a dog", "a cat"], [0, 1, 2]
    x = generate(a, prompts, seeds, Sampling(batch_size=3), output_type="pt")
    y = generate(b, prompts, seeds, Sampling(batch_size=3), output_type="pt")
    assert all(torch.equal(u, v) for u, v in zip(x, y))
    one = generate(b, prompts, seeds, Sampling(batch_size=1), output_type="pt")  # seeded per image
    assert all(torch.allclose(u, v, atol=1e-5) for u, v in zip(x, one))
    base = generate(one_step_pipeline(tiny_sd1, t_init=625), prompts, seeds, output_type="pt")
    assert not torch.equal(x[0], base[0])  # the generator, not the teacher, made them


def test_one_step_pipeline_refuses_multi_step_edit(tiny_sd1):
    w = {f"unet/{n}": p.detach() + 0.01 for n, p in list(tiny_sd1.unet.named_parameters())[:1]}
    with pytest.raises(EditError, match="not a one-step generator"):
        one_step_pipeline(tiny_sd1, Edit.from_weights(tiny_sd1, w, {"method": "esd"}))


def test_a_one_step_edit_is_refused_by_multi_step_apply(tiny_sd1):
    w = {f"unet/{n}": p.detach() + 0.01 for n, p in list(tiny_sd1.unet.named_parameters())[:1]}
    edit = Edit.from_weights(tiny_sd1, w, {"method": "sfd", "sampler": "one_step", "generator_timestep": 625})
    before = {k: v.clone() for k, v in tiny_sd1.unet.state_dict().items()}
    with pytest.raises(EditError, match="one_step_pipeline"):
        edit.apply(tiny_sd1)
    with pytest.raises(EditError, match="one-step generator"):
        with edit.applied(tiny_sd1):
            pass
    assert all(torch.equal(v, before[k]) for k, v in tiny_sd1.unet.state_dict().items())
    one_step_pipeline(tiny_sd1, edit)   # the one-step sampler still takes it


def test_attack_and_sampled_route_a_one_step_edit_through_its_own_pipeline(tiny_sd1):
    from erasekit.pipelines import OneStepPipeline
    from tests.test_attacks import ToneJudge

    edit = erasekit.erase(tiny_sd1, "sfd", ["cat"], iterations=1, **TINY)
    before = {k: v.clone() for k, v in tiny_sd1.unet.state_dict().items()}
    with edit.sampled(tiny_sd1) as sampler:
        assert isinstance(sampler, OneStepPipeline)
        got = generate(sampler, ["a cat"], [3], output_type="pt")[0]
    want = generate(one_step_pipeline(tiny_sd1, edit), ["a cat"], [3], output_type="pt")[0]
    assert torch.equal(got, want)
    judge = ToneJudge(threshold=-1.0)   # every image "bright": the pre-attack check succeeds at once
    res = erasekit.attack(tiny_sd1, ["a cat", "a dog"], "bright", judge=judge, method="none", edit=edit,
                          progress=False)
    assert res.pre_asr == 100.0 and judge.images == 2
    assert [p.unet_evals for p in res.prompts] == [1, 1]   # one generator call each, not 25 x 2 with CFG
    assert all(torch.equal(v, before[k]) for k, v in tiny_sd1.unet.state_dict().items())
    w = {f"unet/{n}": p.detach() + 0.01 for n, p in list(tiny_sd1.unet.named_parameters())[:1]}
    plain = Edit.from_weights(tiny_sd1, w, {"method": "esd"})
    with plain.sampled(tiny_sd1) as sampler:   # a weight Edit is applied, then removed
        assert sampler is tiny_sd1 and not torch.equal(sampler.unet.get_parameter(next(iter(w))[5:]),
                                                       before[next(iter(w))[5:]])
    assert all(torch.equal(v, before[k]) for k, v in tiny_sd1.unet.state_dict().items())


def test_one_step_latents_is_x0_prediction_at_t_init(tiny_sd1):
    abar = alphas_cumprod(tiny_sd1.scheduler)
    z = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    ctx = FamilyAdapter(tiny_sd1).encode(["a cat", "a dog"])
    a, b = abar[625].sqrt(), (1 - abar[625]).sqrt()
    with torch.no_grad():
        eps = tiny_sd1.unet(b * z, torch.tensor([625, 625]), encoder_hidden_states=ctx.embeds).sample
        x_g = one_step_latents(tiny_sd1.unet, z, ctx, 625, NoiseSchedule(tiny_sd1))
    assert torch.allclose(x_g, (b * z - b * eps) / a, atol=1e-5)
    x0, e = to_x0_eps(eps, b * z, a, b, "v_prediction")  # any parametrisation keeps x_t = a x0 + b eps
    assert torch.allclose(a * x0 + b * e, b * z, atol=1e-5)


def test_checkpoint_resume_is_exact(tiny_sd1, tmp_path):
    opts = dict(**TINY, checkpoint_dir=str(tmp_path / "ck"), checkpoint_every=1)
    erasekit.erase(tiny_sd1, "sfd", ["cat"], iterations=2, **opts)
    resumed = erasekit.erase(tiny_sd1, "sfd", ["cat"], iterations=3, **opts)
    straight = erasekit.erase(tiny_sd1, "sfd", ["cat"], iterations=3, **TINY)
    assert resumed.manifest["iterations_run"] == 3
    assert all(torch.equal(resumed.weights[k], straight.weights[k]) for k in straight.keys)
    with pytest.raises(ConfigError, match="checkpoint_dir"):
        erasekit.erase(tiny_sd1, "sfd", ["cat"], iterations=3, **{**opts, "lr_psi": 1e-3})


def test_two_stage_generator_init(tiny_sd1, tmp_path):
    stage1 = erasekit.erase(tiny_sd1, "sfd", ["cat"], iterations=1, **{**TINY, "forget_batch_size": 0})
    path = stage1.save(tmp_path / "stage1.safetensors")
    start = erasekit.erase(tiny_sd1, "sfd", ["cat"], iterations=0, generator_init=str(path), **TINY)
    assert all(torch.equal(start.weights[k], stage1.weights[k]) for k in stage1.keys)
    with pytest.raises(ConfigError, match="t_init"):
        erasekit.erase(tiny_sd1, "sfd", ["cat"], iterations=0, generator_init=str(path), t_init=500, **TINY)


def test_stage1_inside_one_call_matches_generator_init(tiny_sd1, tmp_path):
    """Without ``generator_init`` the call distils first (plain SiD), then forgets from that generator."""
    ck = tmp_path / "ck"
    both = erasekit.erase(tiny_sd1, "sfd", ["cat"], iterations=1, **{**TINY, "distill_iterations": 2},
                          checkpoint_dir=str(ck))
    assert both.manifest["distill_iterations_run"] == 2 and both.manifest["iterations_run"] == 1
    assert (ck / "stage1" / CHECKPOINT_NAME).exists() and (ck / "stage2" / CHECKPOINT_NAME).exists()
    plain = erasekit.erase(tiny_sd1, "sfd", ["cat"], iterations=2,
                           **{**TINY, "forget_batch_size": 0, "distill_iterations": 5})  # plain: no stage 1
    assert plain.manifest["distill_iterations_run"] is None and plain.manifest["iterations_run"] == 2
    path = plain.save(tmp_path / "plain.safetensors")
    after = erasekit.erase(tiny_sd1, "sfd", ["cat"], iterations=1, generator_init=str(path), **TINY)
    assert all(torch.equal(both.weights[k], after.weights[k]) for k in after.keys)
    assert not all(torch.equal(both.weights[k], plain.weights[k]) for k in plain.keys)  # stage 2 did move it
