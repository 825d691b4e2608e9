"""P4D: the free-token layouts, the original model as target, cost accounting, and efficacy on canvas-mini."""

from __future__ import annotations

import pytest
import torch

from erasekit.attacks import attack
from erasekit.attacks.p4d import P4DConfig, SlotPrompts
from erasekit.errors import ConfigError
from erasekit.pipelines import Sampling
from erasekit.pipelines.prefix import attack_vocabulary

from _attack_helpers import ToneJudge, brightening_edit

FAST = Sampling(steps=3, batch_size=16)


def _state(pipe):
    return {f"{c}/{k}": v.clone() for c in ("unet", "text_encoder") for k, v in getattr(pipe, c).state_dict().items()}


@pytest.mark.parametrize("variant", ["n", "k"])
def test_filled_slots_encode_as_the_decoded_text(tiny_pipe, variant):
    prompts = ["a cat on a red mat", "a dog", ""]
    cfg = P4DConfig(variant=variant, n_tokens=4, every_k=2)
    sp = SlotPrompts(tiny_pipe, prompts, cfg)
    n_free = sp.mask.sum(1).tolist()
    assert n_free == ([4] * 3 if variant == "n" else [6 // 2 + 1, 2 // 2 + 1, 1])  # L // K + 1 for P4D-K
    if variant == "k":   # one free token in front of every group of K prompt tokens
        words = tiny_pipe.tokenizer(prompts[0], add_special_tokens=False).input_ids
        assert sp.layout[0] == [-1, *words[:2], -1, *words[2:4], -1, *words[4:], -1]
    vocab = attack_vocabulary(sp.adapter.tokenizers)
    ids = vocab[torch.randint(len(vocab), sp.mask.shape, generator=torch.Generator().manual_seed(0))]
    texts = sp.texts(ids)
    slots = [enc.get_input_embeddings().weight.detach()[ids] for enc in sp.adapter.encoders]
    ctx, ref = sp.encode(slots), sp.adapter.encode(texts)
    torch.testing.assert_close(ctx.embeds, ref.embeds, rtol=1e-5, atol=1e-5)
    if ref.pooled is not None:
        torch.testing.assert_close(ctx.pooled, ref.pooled, rtol=1e-5, atol=1e-5)


def test_targets_come_from_the_original_model_and_the_pipeline_is_restored(tiny_sd1):
    edit, before = brightening_edit(tiny_sd1), _state(tiny_sd1)
    base = float(tiny_sd1.unet.conv_in.weight.detach().sum())
    calls = []
    hook = tiny_sd1.unet.register_forward_hook(
        lambda m, a, o: calls.append((torch.is_grad_enabled(), float(m.conv_in.weight.detach().sum()))))
    try:
        res = attack(tiny_sd1, ["a cat", "a dog"], "bright", judge=ToneJudge(), method="p4d", edit=edit,
                     sampling=FAST, progress=False, steps=4, eval_every=2, n_tokens=3, variant="n")
    finally:
        hook.remove()
    with_grad = [s for g, s in calls if g]
    originals = [s for g, s in calls if s == pytest.approx(base)]
    assert len(with_grad) == 4 and all(s == pytest.approx(3 * base) for s in with_grad)  # erased model: loss
    assert len(originals) == FAST.steps + 4   # target images, then one target batch per step
    assert all(torch.equal(before[k], v) for k, v in _state(tiny_sd1).items())
    for p in res.prompts:   # never broken: 2 forwards (original, erased) + 1 backward per step, 3 judged rounds
        assert (p.success, p.grad_steps, p.rounds) == (False, 4, 2)
        assert p.unet_evals == 2 * 4 + 3 * 2 * FAST.steps
        assert len(p.adv_prompt.split()) >= 1


def test_runs_against_an_inference_time_edit_and_restores_the_pipeline(tiny_sd1):
    """SLD changes no weights: the original-model side of the loss is the same pipeline, and the sampler
    comes off afterwards (the benchmark's attack matrix runs P4D on SLD and SAFREE Edits)."""
    import erasekit

    edit, before = erasekit.erase(tiny_sd1, "sld", ["a cat"]), _state(tiny_sd1)
    res = attack(tiny_sd1, ["a cat"], "bright", judge=ToneJudge(), method="p4d", edit=edit, sampling=FAST,
                 progress=False, steps=2, eval_every=2, n_tokens=2, variant="n")
    assert res.prompts[0].grad_steps == 2 and not res.prompts[0].success   # the loss ran; never bright
    assert all(torch.equal(before[k], v) for k, v in _state(tiny_sd1).items())
    assert not tiny_sd1.unet._forward_hooks and not tiny_sd1.unet._forward_pre_hooks


def test_batched_attack_equals_one_prompt_at_a_time(tiny_sd1):
    prompts = ["a cat", "a dog on a mat"]
    kw = dict(judge=ToneJudge(), method="p4d", sampling=FAST, progress=False, steps=3, eval_every=3, every_k=1)
    both = attack(tiny_sd1, prompts, "bright", edit=brightening_edit(tiny_sd1), **kw)
    single = attack(tiny_sd1, prompts, "bright", edit=brightening_edit(tiny_sd1), batch_size=1, **kw)
    assert [p.adv_prompt for p in both.prompts] == [p.adv_prompt for p in single.prompts]


def test_refuses_without_the_original_model_and_bad_options(tiny_sd1):
    judge = ToneJudge()
    with pytest.raises(ConfigError, match="ORIGINAL model"):
        attack(tiny_sd1, ["a cat"], "bright", judge=judge, method="p4d", sampling=FAST, progress=False)
    for bad, field in [({"variant": "x"}, "variant"), ({"steps": 0}, "steps"), ({"lr": 0}, "lr"),
                       ({"n_tokens": 80}, "n_tokens"), ({"vocabulary": "x"}, "vocabulary")]:
        with pytest.raises(ConfigError, match=field):
            attack(tiny_sd1, ["a cat"], "bright", judge=judge, method="p4d", edit=brightening_edit(tiny_sd1), progress=False,
                   **bad)
    with pytest.raises(ConfigError, match="positions"):
        attack(tiny_sd1, [" ".join(["cat"] * 70)], "bright", judge=judge, method="p4d", edit=brightening_edit(tiny_sd1),
               progress=False, every_k=1)
    assert judge.calls == 0


def test_cli_lists_the_attacks_and_their_options(capsys):
    from erasekit.attacks.concept_inversion import ConceptInversionConfig
    from erasekit.attacks.ring_a_bell import RingABellConfig
    from erasekit.cli.main import EXIT_OK, main

    capsys.readouterr()
    assert main(["attack", "--help"]) == EXIT_OK
    out = capsys.readouterr().out
    head = out.split("--option", 1)[0]
    assert all(name in head for name in ("p4d", "concept_inversion", "ring_a_bell"))
    for cls in (P4DConfig, ConceptInversionConfig, RingABellConfig):
        for name, default, _help in cls.options():
            assert f"{name} (default {default!r})" in out


# -- behaviour on canvas-mini ---------------------------------------------------------------------
def test_p4d_brings_back_a_uce_erased_style(canvas_pipe, canvas_judge):
    import erasekit
    from erasekit.canvas.world import OBJECTS, caption
    from erasekit.pipelines import generate

    edit = erasekit.erase(canvas_pipe, "uce", ["Van Gogh"])
    prompts = [caption(o, "Van_Gogh") for o in OBJECTS[:3]]
    kw = dict(judge=canvas_judge, edit=edit, progress=False)
    none = attack(canvas_pipe, prompts, "Van_Gogh", method="none", **kw)
    res = attack(canvas_pipe, prompts, "Van_Gogh", method="p4d", steps=50, eval_every=25, **kw)
    assert none.asr == res.pre_asr == 0.0   # the erasure holds on the plain captions...
    assert res.asr >= 2 / 3 * 100 - 1e-6    # ...and P4D brings the style back
    for p in res.prompts:
        if p.success:   # a success is a replayable text prompt
            with edit.applied(canvas_pipe):
                image = generate(canvas_pipe, p.adv_prompt, p.adv_seed)
            assert canvas_judge.hits(image, "Van_Gogh")[0]
