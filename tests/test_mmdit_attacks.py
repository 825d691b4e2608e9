"""P4D, concept inversion and Ring-A-Bell on tiny random SD 3 and Flux pipelines: they run end to end through
``erasekit.attack``, optimise something, book their cost and leave the pipeline as it was."""

from __future__ import annotations

import pytest
import torch

from erasekit.attacks import attack
from erasekit.errors import ConfigError
from erasekit.pipelines import Edit, FamilyAdapter, default_sampling, generate

from _attack_helpers import ToneJudge


@pytest.fixture(scope="module", params=["sd3", "flux"])
def mmdit(request, clip_tokenizer_dir):
    """A tiny SD 3 and Flux pipeline, shared by the module (every test leaves it unchanged)."""
    from conftest import build_tiny_mmdit

    return build_tiny_mmdit(request.param, clip_tokenizer_dir)


def _state(pipe) -> dict:
    return {f"{n}/{k}": v.detach().clone() for n, m in pipe.components.items() if isinstance(m, torch.nn.Module)
            for k, v in m.state_dict().items()}


def _unchanged(before: dict, pipe) -> bool:
    after = _state(pipe)
    return after.keys() == before.keys() and all(torch.equal(v, after[k]) for k, v in before.items())


def _sampling(pipe):
    return default_sampling(pipe, steps=2, height=16, width=16)


def _evals_per_image(pipe, sampling) -> int:
    """Transformer evaluations of one judged image (SD 3 with classifier-free guidance counts two per step)."""
    from erasekit.attacks.baselines import count_unet

    with count_unet(pipe) as n:
        generate(pipe, ["a cat"], [0], sampling)
    return n[0]


def _scaling_edit(pipe) -> Edit:
    """A weight Edit of the transformer: its context embedder (the map every text row goes through) scaled by 3."""
    w = pipe.transformer.context_embedder.weight.detach()
    return Edit.from_weights(pipe, {"transformer/context_embedder.weight": w * 3.0}, {"method": "test"},
                             low_rank=False)


# -- P4D -------------------------------------------------------------------------------------------------------
@torch.no_grad()
@pytest.mark.parametrize("variant", ["n", "k"])
def test_p4d_filled_slots_encode_as_the_pipeline_encodes_the_decoded_text(mmdit, variant):
    """CLIP slots from token embeddings, T5 rows of the decoded text: exactly the judged prompt's conditioning."""
    from erasekit.attacks.p4d import P4DConfig, SlotPrompts
    from erasekit.pipelines.prefix import attack_vocabulary

    sp = SlotPrompts(mmdit, ["a cat on a red mat", "a dog"], P4DConfig(variant=variant, n_tokens=3, every_k=2))
    assert all(type(e).__name__.startswith("CLIPTextModel") for e in sp.adapter.encoders)
    vocab = attack_vocabulary(sp.adapter.tokenizers)
    ids = vocab[torch.randint(len(vocab), sp.mask.shape, generator=torch.Generator().manual_seed(0))]
    texts = sp.texts(ids)
    slots = [enc.get_input_embeddings().weight.detach()[ids] for enc in sp.adapter.encoders]
    ctx, ref = sp.encode(slots, sp.t5_rows(texts)), FamilyAdapter(mmdit).encode(texts)
    torch.testing.assert_close(ctx.embeds, ref.embeds, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ctx.pooled, ref.pooled, rtol=1e-5, atol=1e-5)


def test_p4d_runs_with_the_flow_matching_loss_against_the_original_model(mmdit):
    from erasekit.attacks.baselines import prompt_generator
    from erasekit.attacks.p4d import P4DConfig, SlotPrompts
    from erasekit.pipelines.prefix import attack_vocabulary

    edit, before = _scaling_edit(mmdit), _state(mmdit)
    base = float(mmdit.transformer.context_embedder.weight.detach().sum())
    sampling = _sampling(mmdit)
    per_image = _evals_per_image(mmdit, sampling)
    calls = []
    hook = mmdit.transformer.register_forward_hook(
        lambda m, a, o: calls.append((torch.is_grad_enabled(), float(m.context_embedder.weight.detach().sum()))))
    opts = dict(steps=4, eval_every=2, n_tokens=3, variant="n", lr=0.5)
    try:
        res = attack(mmdit, ["a cat"], "bright", judge=ToneJudge(), method="p4d", edit=edit, sampling=sampling,
                     progress=False, **opts)
    finally:
        hook.remove()
    with_grad = [s for g, s in calls if g]
    originals = [s for g, s in calls if not g and s == pytest.approx(base)]
    assert len(with_grad) == 4 and all(s == pytest.approx(3 * base) for s in with_grad)   # erased model: the loss
    assert len(originals) >= 4   # the original model's targets (and the target images)
    assert _unchanged(before, mmdit), "the attack left the pipeline changed"
    (p,) = res.prompts
    assert (p.success, p.grad_steps, p.rounds) == (False, 4, 2)
    assert p.unet_evals == 2 * 4 + 3 * per_image > 0 and p.wall_time_s > 0
    # the prompt the optimisation started from: the initial random tokens of the prompt's own stream
    sp = SlotPrompts(mmdit, ["a cat"], P4DConfig(**opts))
    vocab = attack_vocabulary(sp.adapter.tokenizers)
    start = sp.texts(vocab[torch.randint(len(vocab), (3,), generator=prompt_generator(0, "a cat", 0))][None])[0]
    assert p.adv_prompt != start and len(p.adv_prompt.split()) >= 1


def test_p4d_refuses_without_the_edit_on_mmdit(mmdit):
    with pytest.raises(ConfigError, match="needs the erasure as an Edit"):
        attack(mmdit, ["a cat"], "bright", judge=ToneJudge(), method="p4d", progress=False)
