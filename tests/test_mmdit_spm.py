"""SPM on the tiny SD 3 and Flux pipelines: the layers it adapts, the adapters as exact Edit factors of the
transformer, the flow-matching erase objective, and facilitated transport on transformer calls."""

import pytest
import torch

import erasekit
from erasekit.erase.adapters import AdapterSet, adapter_edit
from erasekit.erase.esd import esd_target
from erasekit.erase.spm import adapted_layers
from erasekit.pipelines import Context, Edit, FamilyAdapter
from erasekit.pipelines.flow import FlowModel


def _velocity(pipe, ctx: Context, z, sigma=0.6):
    with torch.no_grad():
        return FlowModel(pipe).predict(pipe.transformer, z, sigma, ctx)


def _noise(pipe, n: int, seed: int):
    return FlowModel(pipe).noise(n, torch.Generator().manual_seed(seed))


def test_adapters_on_every_token_linear_become_an_edit_that_reproduces_them(tiny_mmdit):
    pipe = tiny_mmdit
    found = adapted_layers(pipe.transformer, "transformer")
    assert found == adapted_layers(pipe.transformer, "linear")          # no 1x1 convolutions in an MMDiT
    assert any(n.endswith("attn.add_k_proj") for n in found) and any(n.endswith("attn.to_q") for n in found)
    assert any(".ff_context." in n for n in found) and not any(".norm" in n for n in found)   # no modulation
    assert any(n.startswith("single_transformer_blocks.") for n in found) == (pipe.transformer.config.get(
        "num_single_layers", 0) > 0)
    g = torch.Generator().manual_seed(0)
    sets = []
    for seed in (1, 2):
        torch.manual_seed(seed)
        s = AdapterSet("transformer", found, rank=1, init="kaiming")
        for a in s.values():
            a.up.data = 0.05 * torch.randn(a.up.shape, generator=g)
        sets.append(s)
    edit = adapter_edit(pipe, sets, {"method": "spm"})
    assert not edit.weights and all(U.shape[1] == 2 for U, _ in edit.deltas.values())
    assert set(edit.deltas) == {f"transformer/{n}.weight" for n in found}
    ctx, z = FamilyAdapter(pipe).encode(["a painting of a dog"]), _noise(pipe, 1, 3)
    base = _velocity(pipe, ctx, z)
    with sets[0].attached(pipe.transformer), sets[1].attached(pipe.transformer):
        hooked = _velocity(pipe, ctx, z)
    with edit.applied(pipe):
        applied = _velocity(pipe, ctx, z)
    assert not torch.allclose(hooked, base, atol=1e-4)
    assert torch.allclose(hooked, applied, atol=1e-5)


def test_training_moves_the_concept_velocity_onto_the_flow_target(tiny_mmdit):
    """The erase term regresses v(x_s, c) onto v("") - eta (v(c) - v("")) (ESD's target in velocity space)."""
    pipe = tiny_mmdit
    ctx = FamilyAdapter(pipe).encode(["", "a cat"])
    z = _noise(pipe, 4, 1)
    sigmas = FlowModel(pipe).sigmas(3)[1:3]

    def velocities():
        return [[_velocity(pipe, Context(ctx.embeds[i:i + 1].expand(4, -1, -1), ctx.pooled[i:i + 1].expand(4, -1)),
                           z, s) for i in (0, 1)] for s in sigmas]

    before = velocities()
    targets = [esd_target(v_0, v_c, v_c, 1.0) for v_0, v_c in before]
    start = sum((v_c - t).pow(2).mean() for (_, v_c), t in zip(before, targets))
    edit = erasekit.erase(pipe, "spm", ["a cat"], steps=12, lr=3e-2, warmup=0, ddim_steps=3, la_strength=0.0,
                          progress=False)
    assert edit.manifest["flow"]["sigmas"] == [round(float(s), 6) for s in FlowModel(pipe).sigmas(3)]
    with edit.applied(pipe):
        after = velocities()
    end = sum((v_c - t).pow(2).mean() for (_, v_c), t in zip(after, targets))
    assert end < 0.5 * start


def test_facilitated_transport_scales_each_adapter_on_transformer_calls(tiny_mmdit):
    pipe = tiny_mmdit
    edit = erasekit.erase(pipe, "spm", ["a cat"], steps=3, lr=1e-2, ddim_steps=3, anchors=1, layers="linear",
                          facilitated_transport=True, progress=False)
    assert edit.inference_time and not edit.weights
    full = Edit(edit.weights, edit.deltas, {k: v for k, v in edit.manifest.items() if k != "sampler"})
    enc = FamilyAdapter(pipe).encode(["a cat", "a red car parked on a wet street at night"])
    z = _noise(pipe, 1, 4)
    base_other = _velocity(pipe, enc[1:2], z)
    with full.applied(pipe):
        full_cat, full_other = _velocity(pipe, enc[0:1], z), _velocity(pipe, enc[1:2], z)
    with edit.sampled(pipe):
        ft_cat, ft_other = _velocity(pipe, enc[0:1], z), _velocity(pipe, enc[1:2], z)
    assert torch.allclose(ft_cat, full_cat, atol=1e-5)                          # the concept itself: strength 1
    assert (ft_other - base_other).norm() < (full_other - base_other).norm()   # another prompt: less
    assert torch.equal(_velocity(pipe, enc[1:2], z), base_other)                # hooks gone after the block


def test_transport_reads_the_conditional_half_of_a_guided_batch(clip_tokenizer_dir):
    """SD 3's pipeline batches (unconditional, conditional): both halves take the conditional row's strength."""
    from conftest import build_tiny_mmdit
    from erasekit.pipelines import default_sampling, generate

    pipe = build_tiny_mmdit("sd3", clip_tokenizer_dir)
    edit = erasekit.erase(pipe, "spm", ["a cat"], steps=3, lr=1e-2, ddim_steps=3, anchors=1, layers="linear",
                          facilitated_transport=True, progress=False)
    deltas = {k: (30 * U, V) for k, (U, V) in edit.deltas.items()}   # adapters strong enough to show in latents
    edit = Edit({}, deltas, edit.manifest)
    full = Edit({}, deltas, {k: v for k, v in edit.manifest.items() if k != "sampler"})
    sampling = default_sampling(pipe, steps=2, guidance=3.0)
    with edit.sampled(pipe) as sampler:
        ft = generate(sampler, ["a cat"], [0], sampling, output_type="latent", check=False)
    with full.applied(pipe):
        applied = generate(pipe, ["a cat"], [0], sampling, output_type="latent", check=False)
    base = generate(pipe, ["a cat"], [0], sampling, output_type="latent", check=False)
    ft, applied, base = (torch.stack(list(x)) if isinstance(x, (list, tuple)) else x for x in (ft, applied, base))
    # the concept prompt: every adapter at strength 1 in both halves of the guided batch
    assert (ft - applied).abs().max() < 1e-3 * (applied - base).abs().max()


def test_first_loss_is_the_flow_matching_erase_loss_at_the_sampled_sigma(tiny_mmdit):
    """At the first step the adapter is zero (``up`` = 0), so x_s is the base model's flow-Euler sample stopped at
    step k and the loss is || v(x_s, c) - [v(x_s, "") - eta (v(x_s, c) - v(x_s, ""))] ||^2 at s = sigmas[k]:
    with eta = 1, 4 || v(x_s, c) - v(x_s, "") ||^2 (the rng is the trainer's stream, seeded with ``seed``)."""
    pipe = tiny_mmdit
    edit = erasekit.erase(pipe, "spm", ["a cat"], steps=1, ddim_steps=4, anchors=0, sample_guidance=2.0, seed=5,
                          progress=False)
    fm, rng = FlowModel(pipe), torch.Generator().manual_seed(5)
    ctx = FamilyAdapter(pipe).encode(["", "a cat"])
    assert int(torch.randint(1, (1,), generator=rng)) == 0                      # the one (c, c_from) pair
    k = int(torch.randint(1, 4, (1,), generator=rng))
    sigmas = fm.sigmas(4)
    with torch.no_grad():
        z = fm.sample_partway(pipe.transformer, fm.noise(1, rng), sigmas, k, ctx[0:1], ctx[1:2], 2.0)
    v_0, v_c = _velocity(pipe, ctx[0:1], z, sigmas[k]), _velocity(pipe, ctx[1:2], z, sigmas[k])
    expected = 4 * (v_c - v_0).pow(2).mean()
    assert edit.manifest["training"]["final_loss"][0] == pytest.approx(float(expected), rel=1e-4)
