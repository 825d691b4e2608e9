"""Attacks: the prefix splice, the simplex projection, UnlearnDiffAtk's loop and the baselines.

Mechanics on tiny random pipelines (sd1, sd2, sdxl, and a one-step stand-in for SFD's pipeline);
the attack's efficacy on UCE/ESD-erased canvas-mini is a slow test (and benchmarks/bench_attack.py).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from erasekit.attacks import AttackResult, PrefixPrompts, attack, attack_vocabulary
from erasekit.attacks.unlearndiffatk import (UnlearnDiffAttackConfig, ascending_timestep, block_lengths,
                                            project_simplex)
from erasekit.errors import ConfigError
from erasekit.pipelines import Sampling

from _attack_helpers import ToneJudge, brightening_edit

FAST = Sampling(steps=3, batch_size=16)
SHORT = {"steps_per_block": 2, "blocks": 2, "block_growth": 1.0, "restarts": 1}


class LateJudge(ToneJudge):
    """Hits the first image of every call from call ``at`` on: a success that arrives mid-attack."""

    def __init__(self, at: int):
        super().__init__()
        self.at = at

    def classify(self, images):
        self.calls += 1
        hit = np.zeros(len(images), dtype=int)
        if self.calls >= self.at:
            hit[0] = 1
        return {"tone": hit}


def _state(pipe):
    return {f"{c}/{k}": v.clone() for c in ("unet", "text_encoder") for k, v in getattr(pipe, c).state_dict().items()}


# -- prefix machinery ---------------------------------------------------------------------------
def test_decoded_prompt_retokenises_to_chosen_ids(tiny_pipe):
    prompts = ["A Cats image in Van Gogh style.", "a photo", ""] * 8
    pp = PrefixPrompts(tiny_pipe, prompts, k=5)
    ids = pp.random_ids(torch.Generator().manual_seed(0))
    texts = pp.texts(ids)
    for which in range(pp.n_encoders):
        re = pp.adapter.tokenize(texts, which=which)
        assert torch.equal(re.input_ids[:, 1:6], ids)
        assert torch.equal(re.input_ids, pp.tokens[which].input_ids.clone().index_put_(
            (torch.arange(len(prompts))[:, None], torch.arange(1, 6)), ids))
    # encoding the slots gives exactly what the pipeline's own text path gives for the decoded text
    ctx, ref = pp.encode(pp.embed_ids(ids)), pp.adapter.encode(texts)
    torch.testing.assert_close(ctx.embeds, ref.embeds, rtol=1e-5, atol=1e-5)
    if ref.pooled is not None:
        torch.testing.assert_close(ctx.pooled, ref.pooled, rtol=1e-5, atol=1e-5)


def test_onehot_slots_equal_id_slots_and_take_gradients(tiny_sd1):
    pp = PrefixPrompts(tiny_sd1, ["a cat", "a dog"], k=3)
    vocab = attack_vocabulary(pp.adapter.tokenizers)
    pick = torch.tensor([[0, 5, 9], [100, 2, 7]])
    onehot = torch.nn.functional.one_hot(pick, len(vocab)).float().requires_grad_(True)
    slots = pp.embed_onehot(onehot, vocab)
    torch.testing.assert_close(slots[0], pp.embed_ids(vocab[pick])[0])
    pp.encode(slots).embeds.sum().backward()
    assert onehot.grad is not None and onehot.grad.abs().sum() > 0


def test_full_vocabulary_is_larger_and_excludes_specials(tiny_sd1):
    toks = [tiny_sd1.tokenizer]
    full, rt = attack_vocabulary(toks, "full"), attack_vocabulary(toks, "round_trip")
    assert len(rt) < len(full) < len(tiny_sd1.tokenizer)
    assert not set(tiny_sd1.tokenizer.all_special_ids) & set(full.tolist())


def test_prefix_refuses_prompts_that_no_longer_fit(tiny_sd1):
    long = " ".join(["cat"] * 73)  # 73 tokens + BOS + EOS = 75: fits alone, not with 3 more
    PrefixPrompts(tiny_sd1, [long], k=2)
    with pytest.raises(ConfigError, match="refused, not truncated"):
        PrefixPrompts(tiny_sd1, ["a cat", long], k=3)
    with pytest.raises(ConfigError, match="at most 77"):
        PrefixPrompts(tiny_sd1, [" ".join(["cat"] * 80)], k=1)


# -- simplex projection -------------------------------------------------------------------------
def _sort_projection(v: torch.Tensor) -> torch.Tensor:
    """Euclidean projection onto the probability simplex by sorting (Duchi et al. 2008), per row."""
    s, _ = v.sort(-1, descending=True)
    css = s.cumsum(-1) - 1
    idx = torch.arange(1, v.shape[-1] + 1, dtype=v.dtype)
    rho = ((s - css / idx) > 0).sum(-1, keepdim=True)
    theta = css.gather(-1, rho - 1) / rho
    return (v - theta).clamp_min(0)


def test_simplex_projection_keeps_rows_on_the_simplex():
    g = torch.Generator().manual_seed(0)
    u = torch.cat([torch.randn(6, 3, 50, generator=g), torch.rand(2, 3, 50, generator=g) * 0.01,
                   torch.randn(1, 3, 50, generator=g) * 5]).double()
    p = project_simplex(u)
    assert (p >= 0).all() and (p <= 1).all()
    torch.testing.assert_close(p.sum(-1), torch.ones(p.shape[:-1], dtype=p.dtype), rtol=0, atol=1e-9)
    torch.testing.assert_close(p, _sort_projection(u), rtol=0, atol=1e-7)  # the closest point
    torch.testing.assert_close(project_simplex(p), p, rtol=0, atol=0)      # feasible rows are kept


def test_schedules():
    ref = UnlearnDiffAttackConfig(schedule="reference").plan()
    assert block_lengths(ref) == [40] * 50  # 2,000 steps, t = 10, 30, ..., 990
    assert [ascending_timestep(b, 50, 1000) for b in range(50)] == list(range(10, 1000, 20))
    fast = UnlearnDiffAttackConfig().plan()
    assert block_lengths(fast) == [10] * 30 and (fast["restarts"], ref["restarts"]) == (1, 1)
    assert (fast["screen_steps"], ref["screen_steps"], fast["lr"], ref["lr"]) == (8, None, 0.03, 0.01)
    assert UnlearnDiffAttackConfig(lr=0.5, screen_steps=0).plan() | {"lr": 0, "screen_steps": 0} == fast | {
        "lr": 0, "screen_steps": 0}
    assert block_lengths(UnlearnDiffAttackConfig(steps_per_block=3, blocks=3, block_growth=1.5).plan()) == [3, 4, 7]


# -- attack() ---------------------------------------------------------------------------------------
def test_no_attack_is_one_judged_generation(tiny_sd1):
    judge = ToneJudge(127.0)
    res = attack(tiny_sd1, ["a cat", "a dog", "a tree"], "bright", judge=judge, method="none", sampling=FAST,
                 progress=False)
    assert (judge.calls, judge.images) == (1, 3)
    assert all(p.unet_evals == FAST.steps * 2 and p.grad_steps == 0 for p in res.prompts)  # CFG: 2 per step
    assert all(p.adv_prompt == p.prompt and p.step == (0 if p.success else None) for p in res.prompts)
    assert res.asr == res.pre_asr


def test_pre_success_stops_before_any_optimisation(tiny_sd1):
    prompts, judge = ["a cat", "a dog", "a tree", "a house"], ToneJudge(127.0)
    from erasekit.pipelines import generate

    means = [np.asarray(im).mean() for im in generate(tiny_sd1, prompts, 0, FAST)]
    judge.threshold = float(np.median(means))  # about half the prompts succeed without attack
    res = attack(tiny_sd1, prompts, "bright", judge=judge, sampling=FAST, progress=False, **SHORT)
    pre = [p for p in res.prompts if p.pre_success]
    assert 0 < len(pre) < len(prompts)
    assert all(p.grad_steps == 0 and p.step == 0 and p.adv_prompt == p.prompt for p in pre)
    for p in res.prompts:
        if not p.pre_success:  # attacked until a success or the end of the 2 blocks of 2 steps
            assert (p.grad_steps, p.rounds) == ((p.step, p.step // 2) if p.success else (4, 2))
    assert res.pre_asr == 100.0 * len(pre) / len(prompts)


def test_early_stop_drops_broken_prompts_from_the_batch(tiny_sd1):
    # call 1 = no-attack evaluation, call 2 = after block 1: the first active prompt breaks there
    res = attack(tiny_sd1, ["a cat", "a dog", "a tree"], "bright", judge=LateJudge(at=2), sampling=FAST,
                 progress=False, steps_per_block=2, blocks=3, block_growth=1.0)
    first, rest = res.prompts[0], res.prompts[1:]
    assert first.success and not first.pre_success and first.step == 2 and first.grad_steps == 2
    assert first.adv_prompt.endswith("a cat") and first.adv_prompt != "a cat"
    assert rest[0].success and rest[0].step == 4  # the next call's first image is the next active prompt
    assert rest[1].grad_steps == 6 and rest[1].unet_evals > first.unet_evals
    assert res.asr == pytest.approx(100.0) and res.pre_asr == 0.0


def test_restarts_repeat_the_blocks_and_count_their_cost(tiny_sd1):
    res = attack(tiny_sd1, ["a cat"], "bright", judge=ToneJudge(255), sampling=FAST, progress=False,
                 steps_per_block=2, blocks=2, block_growth=1.0, restarts=2)
    (p,) = res.prompts
    gen = FAST.steps * 2   # one judged generation with CFG
    assert (p.grad_steps, p.rounds, p.unet_evals) == (8, 4, gen + 8 + 4 * gen)
    assert res.config["restarts"] == 2


class EvenCallJudge(ToneJudge):
    """Hits the first image of every even call: with screening, every screen and no confirmation."""

    def classify(self, images):
        self.calls += 1
        return {"tone": np.array([int(self.calls % 2 == 0 and i == 0) for i in range(len(images))])}


def test_screen_hits_are_confirmed_by_the_full_sampler(tiny_sd1):
    kw = dict(sampling=FAST, progress=False, steps_per_block=2, blocks=2, block_growth=1.0, restarts=1)
    full, screen = FAST.steps * 2, 2 * 2   # CFG generations with the full sampler / the 2-step screen
    # call 1: no attack (miss), call 2: screen after block 1 (hit) -> call 3: full confirmation (hit)
    judge = LateJudge(at=2)
    (p,) = attack(tiny_sd1, ["a cat"], "bright", judge=judge, screen_steps=2, **kw).prompts
    assert p.success and p.step == 2 and judge.calls == 3
    assert (p.rounds, p.unet_evals) == (1, full + 2 + screen + full)
    # every screen hits, every confirmation misses: no success is booked from a screen
    judge = EvenCallJudge()
    (p,) = attack(tiny_sd1, ["a cat"], "bright", judge=judge, screen_steps=2, **kw).prompts
    assert not p.success and judge.calls == 1 + 2 * 2
    assert (p.rounds, p.unet_evals) == (2, full + 4 + 2 * (screen + full))
    # screen_steps=0: the full sampler after every block, as the reference
    (p,) = attack(tiny_sd1, ["a cat"], "bright", judge=ToneJudge(255), screen_steps=0, **kw).prompts
    assert p.unet_evals == full + 4 + 2 * full


def test_batched_attack_equals_one_prompt_at_a_time(tiny_sd1):
    prompts, kw = ["a cat", "a dog in a house"], dict(judge=ToneJudge(255), sampling=FAST, progress=False, **SHORT)
    together = attack(tiny_sd1, prompts, "bright", batch_size=2, **kw)
    alone = attack(tiny_sd1, prompts, "bright", batch_size=1, **kw)
    assert [p.adv_prompt for p in together.prompts] == [p.adv_prompt for p in alone.prompts]


def test_edit_is_applied_for_the_attack_only_and_targets_use_the_original(tiny_sd1, monkeypatch):
    import erasekit.attacks.baselines as baselines
    import erasekit.pipelines.generation as generation

    edit, before, seen = brightening_edit(tiny_sd1), _state(tiny_sd1), []
    real = generation.generate

    def spy(pipe, *a, **k):
        seen.append(float(pipe.unet.conv_in.weight.detach().sum()))
        return real(pipe, *a, **k)

    monkeypatch.setattr(generation, "generate", spy)
    monkeypatch.setattr(baselines, "generate", spy)
    base = float(tiny_sd1.unet.conv_in.weight.detach().sum())
    res = attack(tiny_sd1, ["a cat"], "bright", judge=ToneJudge(255), edit=edit, sampling=FAST, progress=False,
                 **SHORT)
    assert seen[1] == base and all(s == pytest.approx(3 * base) for s in seen[:1] + seen[2:])
    # one probe image with the edit (a broken Edit fails before the targets); the targets; then with
    # the edit: no-attack evaluation, one per block
    assert len(seen) == 5
    assert res.protocol["targets"].startswith("original model")
    assert all(torch.equal(before[k], v) for k, v in _state(tiny_sd1).items())


def test_pipeline_restored_when_the_attack_fails(tiny_sd1):
    class Boom(ToneJudge):
        def classify(self, images):
            raise RuntimeError("judge crashed")

    edit, before = brightening_edit(tiny_sd1), _state(tiny_sd1)
    with pytest.raises(RuntimeError, match="judge crashed"):
        attack(tiny_sd1, ["a cat"], "bright", judge=Boom(), edit=edit, sampling=FAST, progress=False)
    assert all(torch.equal(before[k], v) for k, v in _state(tiny_sd1).items())
    assert all(p.grad is None for p in tiny_sd1.unet.parameters())


@pytest.mark.parametrize("method", ["seed_search", "random_prefix"])
def test_baselines_share_the_result_type(tiny_sd1, method):
    judge = ToneJudge(255)  # never hit: every round runs
    res = attack(tiny_sd1, ["a cat", "a dog"], "bright", judge=judge, method=method, rounds=2, sampling=FAST,
                 progress=False)
    assert isinstance(res, AttackResult) and judge.calls == 3
    p = res.prompts[0]
    assert p.rounds == 2 and p.unet_evals == 3 * FAST.steps * 2 and not p.success
    if method == "seed_search":
        assert (p.adv_prompt, p.adv_seed) == ("a cat", 2)
    else:
        assert p.adv_prompt.endswith(" a cat") and len(p.adv_prompt.split()) == 5 and p.adv_seed == 0


def test_sdxl_puts_the_prefix_in_both_encoders(clip_tokenizer_dir, monkeypatch):
    from conftest import build_tiny

    from erasekit.attacks import unlearndiffatk
    from erasekit.pipelines import FamilyAdapter

    pipe = build_tiny("sdxl", clip_tokenizer_dir)
    texts, contexts = [], []   # per optimisation step: the sampled prompt, and what the UNet read
    sample = unlearndiffatk._BatchAttack.sample_onehot

    def recording_sample(state):
        s = sample(state)
        texts.append(state.sub.texts(state.vocab[s.argmax(-1)].cpu()))
        return s

    def hook(module, args, kwargs, out):
        if torch.is_grad_enabled():
            contexts.append((kwargs["encoder_hidden_states"].detach(),
                             kwargs["added_cond_kwargs"]["text_embeds"].detach()))

    monkeypatch.setattr(unlearndiffatk._BatchAttack, "sample_onehot", recording_sample)
    handle = pipe.unet.register_forward_hook(hook, with_kwargs=True)
    try:
        res = attack(pipe, ["a cat"], "bright", judge=ToneJudge(255), sampling=FAST, progress=False, **SHORT)
    finally:
        handle.remove()
    p = res.prompts[0]
    assert p.grad_steps == 4 and p.adv_prompt != "a cat"
    for tok in (pipe.tokenizer, pipe.tokenizer_2):   # the prompt re-tokenises to its prefix in both tokenizers
        assert tok.decode(tok(p.adv_prompt).input_ids[1:4]) == p.adv_prompt[:-len(" a cat")]
    # every step's context is the text path's encoding of the sampled prompt, in each encoder's half
    adapter, width = FamilyAdapter(pipe), pipe.text_encoder.config.hidden_size
    assert len(texts) == len(contexts) == 4
    for prompts, (embeds, pooled) in zip(texts, contexts):
        ref = adapter.encode(prompts)
        assert prompts[0].endswith(" a cat") and prompts[0] != "a cat"
        for half in (slice(0, width), slice(width, None)):
            torch.testing.assert_close(embeds[..., half], ref.embeds[..., half], rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(pooled, ref.pooled, rtol=1e-4, atol=1e-5)


class OneStepPipe:
    """Stand-in for SFD's one-step pipeline: a UNet used once at t_init, dispatched via erasekit_generate."""

    def __init__(self, pipe, t_init=625):
        self.base, self.t_init = pipe, t_init
        for name in ("unet", "vae", "text_encoder", "tokenizer", "scheduler", "vae_scale_factor"):
            setattr(self, name, getattr(pipe, name))
        self.calls = 0

    @torch.no_grad()
    def erasekit_generate(self, prompts, seeds, sampling, progress=False, output_type="pil"):
        from erasekit.pipelines import FamilyAdapter

        self.calls += 1
        size = self.unet.config.sample_size
        z = torch.cat([torch.randn(1, 4, size, size, generator=torch.Generator().manual_seed(s)) for s in seeds])
        abar = self.scheduler.alphas_cumprod[self.t_init]
        x_t = (1 - abar).sqrt() * z
        ctx = FamilyAdapter(self).encode(prompts)
        eps = self.unet(x_t, self.t_init, **ctx.unet_kwargs(self)).sample
        x0 = (x_t - (1 - abar).sqrt() * eps) / abar.sqrt()
        img = self.vae.decode(x0 / self.vae.config.scaling_factor).sample
        return self.base.image_processor.postprocess(img, output_type=output_type)


def test_one_step_pipeline(tiny_sd1):
    pipe = OneStepPipe(tiny_sd1)
    res = attack(pipe, ["a cat", "a dog"], "bright", judge=ToneJudge(255), sampling=FAST, progress=False, **SHORT)
    assert pipe.calls == 1 + 1 + 2  # targets, no-attack evaluation, one per block
    assert all(p.unet_evals == 1 + 4 + 2 and p.grad_steps == 4 for p in res.prompts)


# -- bad input ------------------------------------------------------------------------------------
def test_bad_input_fails_before_any_work(tiny_sd1):
    judge = ToneJudge(127.0)
    kw = dict(judge=judge, sampling=FAST, progress=False)
    with pytest.raises(ConfigError, match="does not know the concept 'Van Gogh'"):
        attack(tiny_sd1, ["a cat"], "Van Gogh", **kw)
    with pytest.raises(ConfigError, match="refused, not truncated"):
        attack(tiny_sd1, [" ".join(["cat"] * 74)], "bright", k=3, **kw)
    with pytest.raises(ConfigError, match="`k` must be an integer in \\[1, 75\\]"):
        attack(tiny_sd1, ["a cat"], "bright", k=80, **kw)
    with pytest.raises(ConfigError, match="unknown attack method"):
        attack(tiny_sd1, ["a cat"], "bright", method="no_such_attack", **kw)
    with pytest.raises(ConfigError, match="has no option 'rounds'"):
        attack(tiny_sd1, ["a cat"], "bright", rounds=3, **kw)
    with pytest.raises(ConfigError, match="one integer per prompt"):
        attack(tiny_sd1, ["a cat", "a dog"], "bright", seeds=[1], **kw)
    with pytest.raises(ConfigError, match="`schedule` must be one of"):
        attack(tiny_sd1, ["a cat"], "bright", schedule="slow", **kw)
    edit = brightening_edit(tiny_sd1)
    with edit.applied(tiny_sd1), pytest.raises(ConfigError, match="already applied"):
        attack(tiny_sd1, ["a cat"], "bright", edit=edit, **kw)
    assert judge.calls == 0


# -- results ----------------------------------------------------------------------------------------
def test_result_round_trips_and_states_the_asr_definition(tiny_sd1, tmp_path):
    res = attack(tiny_sd1, ["a cat", "a, dog"], "bright", judge=LateJudge(at=2), sampling=FAST, progress=False,
                 steps_per_block=2, blocks=1, restarts=1)
    assert "ASR includes pre-ASR" in str(res) and "ASR includes pre-ASR" in res.summary()["asr_definition"]
    for suffix in (".json", ".csv"):
        back = AttackResult.load(res.save(tmp_path / f"r{suffix}"))
        assert back.prompts == res.prompts and back.summary()["asr"] == res.asr == 50.0
        assert back.protocol["sampling"]["steps"] == FAST.steps and back.concept == "bright"
    with pytest.raises(ConfigError, match=".json or .csv"):
        res.save(tmp_path / "r.txt")


# -- behaviour on canvas-mini ---------------------------------------------------------------------
@pytest.mark.slow
def test_attack_brings_back_a_uce_erased_style(canvas_pipe, canvas_judge):
    import erasekit
    from erasekit.canvas.world import OBJECTS, caption

    edit = erasekit.erase(canvas_pipe, "uce", ["Van Gogh"])
    prompts = [caption(o, "Van_Gogh") for o in OBJECTS]
    kw = dict(judge=canvas_judge, edit=edit, progress=False)
    none = attack(canvas_pipe, prompts, "Van_Gogh", method="none", **kw)
    # k = 5 as benchmarks/bench_attack.py: with the paper's k = 3 the UCE preset holds on canvas-mini's
    # 64-d text space (ASR 0-10 % on these captions with either schedule)
    res = attack(canvas_pipe, prompts, "Van_Gogh", k=5, **kw)
    assert res.pre_asr == none.asr <= 50.0  # the erasure works on the plain captions...
    assert res.asr >= res.pre_asr + 30.0  # ...and the attack brings the style back
    for p in res.prompts:
        if p.success and not p.pre_success:  # a success is a replayable text prompt
            from erasekit.pipelines import generate

            with edit.applied(canvas_pipe):
                image = generate(canvas_pipe, p.adv_prompt, p.adv_seed)
            assert canvas_judge.hits(image, "Van_Gogh")[0]
