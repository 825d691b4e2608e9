"""P4D, concept inversion and Ring-A-Bell on tiny random SD 3 and Flux pipelines: they run end to end through
``erasekit.attack``, optimise something, book their cost and leave the pipeline as it was."""

from __future__ import annotations

import pytest
import torch

from erasekit.attacks import attack
from erasekit.errors import ConfigError
from erasekit.pipelines import Edit, FamilyAdapter, default_sampling, generate

from _attack_helpers import ToneJudge
from conftest import pipeline_state as _state, pipeline_unchanged as _unchanged


@pytest.fixture(scope="module", params=["sd3", "flux"])
def mmdit(request, clip_tokenizer_dir):
    """A tiny SD 3 and Flux pipeline, shared by the module (every test leaves it unchanged)."""
    from conftest import build_tiny_mmdit

    return build_tiny_mmdit(request.param, clip_tokenizer_dir)


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


# -- concept inversion -----------------------------------------------------------------------------------------
def test_learned_token_encodes_as_its_vector_in_every_encoder_and_the_pipeline_is_restored(mmdit):
    """The token goes into every text encoder (SD 3: CLIP-L, CLIP-G, T5; Flux: CLIP-L, T5); the rows the
    attack builds from token embeddings are the pipeline's own ``encode_prompt`` rows of the caption."""
    from erasekit.attacks.concept_inversion import ConceptInversionConfig, _Inversion, learned_tokens
    from erasekit.attacks.result import PromptAttack
    from erasekit.attacks.unlearndiffatk import flow_model

    before, tokenizers = _state(mmdit), [getattr(mmdit, n) for n in ("tokenizer", "tokenizer_2", "tokenizer_3")
                                         if getattr(mmdit, n, None) is not None]
    rows = [PromptAttack(index=0, prompt="a red bright cat", seed=0, adv_prompt="", concept="bright")]
    inv = _Inversion(mmdit, rows, None, ConceptInversionConfig(initializer="dog"), flow_model(mmdit, _sampling(mmdit)))
    n_enc = len(FamilyAdapter(mmdit).encoders)
    assert len(inv.v) == n_enc == (3 if FamilyAdapter(mmdit).family == "sd3" else 2)
    assert all(int(s.sum()) == 1 for s in inv.slot)   # the token sits once in each encoder's caption
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for v in inv.v:
            v.copy_(torch.randn(v.shape, generator=gen))
    emb = inv.embeddings(["<bright>"])
    assert len(emb) == n_enc
    with torch.no_grad():
        embeds = []
        for enc, tok, slot, v in zip(inv.adapter.encoders, inv.tokens, inv.slot, inv.v):
            base = enc.get_input_embeddings().weight.detach()
            ids = tok.input_ids.clamp_max(base.shape[0] - 1)
            embeds.append(torch.where(slot.unsqueeze(-1), v[[0]].unsqueeze(1), base[ids]))
        ctx = inv.encode_mmdit(embeds, inv.tokens)
        with learned_tokens(mmdit, emb) as ids:
            assert list(ids) == ["<bright>"]
            ref = FamilyAdapter(mmdit).encode(["a red <bright> cat"])
            plain = FamilyAdapter(mmdit).encode(["a red cat"])
    torch.testing.assert_close(ctx.embeds, ref.embeds, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ctx.pooled, ref.pooled, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(ref.embeds, plain.embeds, atol=1e-3)
    assert [getattr(mmdit, n) for n in ("tokenizer", "tokenizer_2", "tokenizer_3")
            if getattr(mmdit, n, None) is not None] == tokenizers
    assert _unchanged(before, mmdit), "learned_tokens left the pipeline changed"


def test_concept_inversion_runs_with_the_flow_matching_loss(mmdit):
    from erasekit.attacks import learned_tokens

    edit, before = _scaling_edit(mmdit), _state(mmdit)
    sampling = _sampling(mmdit)
    per_image = _evals_per_image(mmdit, sampling)
    seen = []
    hook = mmdit.transformer.register_forward_pre_hook(
        lambda m, a, kw: seen.append(kw["timestep"].detach().clone()) if torch.is_grad_enabled() else None,
        with_kwargs=True)
    try:
        res = attack(mmdit, ["a bright cat", "a bright dog"], "bright", judge=ToneJudge(), method="concept_inversion",
                     edit=edit, sampling=sampling, progress=False, steps=3, eval_every=3, images_per_step=2,
                     initializer="red")
    finally:
        hook.remove()
    assert _unchanged(before, mmdit), "the attack left the pipeline changed"
    assert len(seen) == 3 and all(len(t) == 2 for t in seen)   # one transformer batch of 2 images per step
    assert len({float(x) for t in seen for x in t}) > 1   # random noise levels
    assert [p.adv_prompt for p in res.prompts] == ["a <bright-3> cat", "a <bright-3> dog"]
    assert sum(p.grad_steps for p in res.prompts) == 3 * 2
    assert sum(p.unet_evals for p in res.prompts) == 3 * 2 + 2 * 2 * per_image   # training + two judged rounds
    assert all(p.rounds == 1 and not p.success and p.wall_time_s > 0 for p in res.prompts)
    n_enc = len(FamilyAdapter(mmdit).encoders)
    assert len(res.embeddings) == n_enc   # the token's vector for every text encoder (T5 included)
    # the learned vectors moved away from the initialiser's embedding in every encoder
    for key, enc, tok in zip(sorted(res.embeddings, key=len), FamilyAdapter(mmdit).encoders,
                             FamilyAdapter(mmdit).tokenizers):
        start = enc.get_input_embeddings().weight.detach()[tok("red", add_special_tokens=False).input_ids].mean(0)
        assert not torch.allclose(res.embeddings[key], start, atol=1e-4), key
    with learned_tokens(mmdit, res.embeddings):   # the saved tokens load back into every encoder
        assert FamilyAdapter(mmdit).encode(["a <bright-3> cat"]).embeds.isfinite().all()


# -- Ring-A-Bell -----------------------------------------------------------------------------------------------
RING = dict(population=8, generations=6, length=3, judge_every=1, pairs=[["a bright red cat", "a cat"],
                                                                         ["a bright house", "a house"]])


def test_ring_a_bell_scores_candidates_on_the_pipelines_own_encoding(mmdit):
    """The concept vector and each candidate's fitness read every text encoder (T5 and pooled included)."""
    from erasekit.attacks.ring_a_bell import Fitness, _flat, candidate_text, concept_vector, search_vocabulary

    ad = FamilyAdapter(mmdit)
    width = ad.encode(["x"]).embeds[0].numel() + ad.encode(["x"]).pooled[0].numel()
    vec = concept_vector(ad, [("a bright cat", "a cat")])
    assert vec.shape == (width,)
    torch.testing.assert_close(vec, (_flat(ad.encode(["a bright cat"])) - _flat(ad.encode(["a cat"])))[0])
    vocab = search_vocabulary(ad, "round_trip", [])
    assert len(vocab) > 0
    ids = torch.tensor([[3, 5], [7, 11]])
    target = torch.randn(2, width, generator=torch.Generator().manual_seed(0))
    fit = Fitness(ad, vocab, target, [None, "a cat"])
    got = fit(torch.tensor([0, 1]), ids)
    texts = [candidate_text(ad.tokenizers[0], vocab[ids[0]].tolist(), None),
             candidate_text(ad.tokenizers[0], vocab[ids[1]].tolist(), "a cat")]
    assert texts[1].endswith(" a cat") and not texts[0].endswith("a cat")
    ref = (_flat(ad.encode(texts)) - target).pow(2).sum(-1)
    torch.testing.assert_close(got, ref)


def test_ring_a_bell_runs_on_the_text_encoders_and_judges_its_search(mmdit):
    edit, before = _scaling_edit(mmdit), _state(mmdit)
    sampling = _sampling(mmdit)
    per_image = _evals_per_image(mmdit, sampling)
    res = attack(mmdit, ["a bright cat"], "bright", judge=ToneJudge(), method="ring_a_bell", edit=edit,
                 sampling=sampling, progress=False, **RING)
    assert _unchanged(before, mmdit), "the attack left the pipeline changed"
    (p,) = res.prompts
    search = res.protocol["search"]
    assert search["text_encoder_evals"][0] >= RING["population"]
    fits = search["best_fitness"][0]
    assert len(fits) == RING["generations"] and fits[-1] < fits[0]   # the search improved on its first population
    assert all(a >= b for a, b in zip(fits, fits[1:]))   # and never lost its best
    assert (p.success, p.grad_steps, p.rounds) == (False, 0, RING["generations"])
    assert p.unet_evals == (1 + RING["generations"]) * per_image and p.wall_time_s > 0
    assert p.adv_prompt != "a bright cat" and len(p.adv_prompt.split()) == RING["length"]


# -- which attacks run on an MMDiT -----------------------------------------------------------------------------
def test_every_attack_runs_on_mmdit_and_an_unlisted_one_is_refused(mmdit, monkeypatch):
    import erasekit.attacks as attacks

    assert set(attacks.MMDIT_ATTACKS) == set(attacks.METHODS)
    monkeypatch.setitem(attacks.METHODS, "unet_only", ("baselines", "NoAttackConfig", "no_attack", False))
    with pytest.raises(ConfigError, match="this one is (sd3|flux)"):
        attack(mmdit, ["a cat"], "bright", judge=ToneJudge(), method="unet_only", progress=False)


def test_sd3_without_t5_runs_p4d_and_concept_inversion(clip_tokenizer_dir):
    """SD 3 loaded without T5 (``text_encoder_3=None``): its T5 rows are zeros, the attacks read the CLIP side."""
    from conftest import build_tiny_mmdit

    pipe = build_tiny_mmdit("sd3", clip_tokenizer_dir)
    pipe.text_encoder_3 = pipe.tokenizer_3 = None
    edit, sampling = _scaling_edit(pipe), _sampling(pipe)
    kw = dict(judge=ToneJudge(), edit=edit, sampling=sampling, progress=False)
    res = attack(pipe, ["a bright cat"], "bright", method="concept_inversion", steps=2, eval_every=2,
                 images_per_step=2, **kw)
    assert sorted(res.embeddings) == ["<bright-2>", "<bright-2>::text_encoder_2"]   # CLIP-L and CLIP-G only
    assert res.prompts[0].grad_steps == 2 * 2   # one backward per image: 2 steps of 2 images
    res = attack(pipe, ["a bright cat"], "bright", method="p4d", steps=2, eval_every=2, n_tokens=2, variant="n", **kw)
    assert res.prompts[0].grad_steps == 2 and res.prompts[0].unet_evals > 4
