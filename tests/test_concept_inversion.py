"""Concept inversion: token placement, the pipeline left unchanged, saved embeddings, efficacy on canvas-mini."""

from __future__ import annotations

import pytest
import torch

from erasekit.attacks import AttackResult, attack, learned_tokens
from erasekit.attacks.concept_inversion import SECOND, token_name, with_token
from erasekit.errors import ConfigError
from erasekit.pipelines import Sampling
from erasekit.pipelines.family import FamilyAdapter

from _attack_helpers import ToneJudge, brightening_edit

FAST = Sampling(steps=3, batch_size=16)
SHORT = dict(steps=4, eval_every=2, images_per_step=2)


def _text_state(pipe):
    pairs = [("tokenizer", "text_encoder"), ("tokenizer_2", "text_encoder_2")]
    return [(getattr(pipe, t), len(getattr(pipe, t)), getattr(pipe, e).get_input_embeddings(),
             getattr(pipe, e).get_input_embeddings().weight.clone()) for t, e in pairs if getattr(pipe, t, None)]


def _same_text_state(pipe, before) -> bool:
    return all(tok is t and len(t) == n and emb is e and torch.equal(e.weight, w)
               for (tok, n, emb, w), (t, _, e, _) in zip(before, _text_state(pipe)))


def test_token_replaces_the_concept_name_or_goes_in_front():
    assert token_name("Van_Gogh") == "<van_gogh>" and token_name("Van Gogh", 250) == "<van_gogh-250>"
    assert with_token("A Cats image in Van Gogh style.", "Van_Gogh", "<t>") == "A Cats image in <t> style."
    assert with_token("van_gogh, VAN GOGH!", "Van Gogh", "<t>") == "<t>, <t>!"
    assert with_token("a vanity gogher", "Van Gogh", "<t>") == "<t> a vanity gogher"   # whole words only


def test_learned_token_encodes_as_its_vector_and_the_pipeline_is_restored(tiny_pipe):
    before = _text_state(tiny_pipe)
    dims = [e.get_input_embeddings().weight.shape[1] for e in FamilyAdapter(tiny_pipe).encoders]
    vec = {"<t>": torch.randn(dims[0])} | ({"<t>" + SECOND: torch.randn(dims[1])} if len(dims) > 1 else {})
    with learned_tokens(tiny_pipe, vec) as ids:
        adapter = FamilyAdapter(tiny_pipe)
        got = adapter.encode(["a <t> cat"])
        toks = [adapter.tokenize(["a <t> cat"], which=i) for i in range(len(dims))]
        assert all(int((t.input_ids == ids["<t>"]).sum()) == 1 for t in toks)
    assert _same_text_state(tiny_pipe, before)
    # the same context from the original tables with the vector spliced in where the token sits
    embeds = []
    for enc, t, key in zip(adapter.encoders, toks, ["<t>", "<t>" + SECOND]):
        table = enc.get_input_embeddings().weight.detach()
        e = table[t.input_ids.clamp_max(table.shape[0] - 1)]
        e[t.input_ids == ids["<t>"]] = vec[key].to(e)
        embeds.append(e)
    ref = adapter.encode_token_embeds(embeds, toks)
    torch.testing.assert_close(got.embeds, ref.embeds, rtol=1e-5, atol=1e-5)
    with pytest.raises(RuntimeError, match="inside"), learned_tokens(tiny_pipe, vec):
        raise RuntimeError("inside")
    assert _same_text_state(tiny_pipe, before)


def test_attack_trains_only_the_token_and_leaves_the_pipeline_unchanged(tiny_pipe):
    edit, before = brightening_edit(tiny_pipe), _text_state(tiny_pipe)
    weights = {k: v.clone() for k, v in tiny_pipe.unet.state_dict().items()}
    res = attack(tiny_pipe, ["a cat in bright style", "a dog"], "bright", judge=ToneJudge(), edit=edit,
                 method="concept_inversion", sampling=FAST, progress=False, **SHORT)
    assert _same_text_state(tiny_pipe, before)
    assert all(torch.equal(weights[k], v) for k, v in tiny_pipe.unet.state_dict().items())
    assert all(p.grad is None for p in tiny_pipe.unet.parameters())
    assert [p.adv_prompt for p in res.prompts] == ["a cat in <bright-4> style", "<bright-4> a dog"]
    # one token per judged round, per text encoder; the token moved away from its initialiser
    n_enc = len(before)
    assert len(res.embeddings) == 2 * n_enc
    assert not torch.equal(res.embeddings["<bright-2>"], res.embeddings["<bright-4>"])
    for p in res.prompts:   # 2 x 4 images of training (shared by the two prompts), 3 judged rounds
        assert (p.success, p.grad_steps, p.rounds) == (False, 4, 2)
        assert p.unet_evals == 4 + 3 * 2 * FAST.steps


def test_pipeline_restored_when_the_attack_fails(tiny_sd1):
    class Late(ToneJudge):
        def classify(self, images):
            self.calls += 1
            if self.calls > 1:
                raise RuntimeError("judge crashed")
            return super().classify(images)

    before = _text_state(tiny_sd1)
    with pytest.raises(RuntimeError, match="judge crashed"):
        attack(tiny_sd1, ["a cat"], "bright", judge=Late(), edit=brightening_edit(tiny_sd1), method="concept_inversion",
               sampling=FAST, progress=False, **SHORT)
    assert _same_text_state(tiny_sd1, before)


def test_result_saves_the_embeddings_next_to_it(tiny_sd1, tmp_path):
    res = attack(tiny_sd1, ["a cat"], "bright", judge=ToneJudge(), edit=brightening_edit(tiny_sd1), method="concept_inversion",
                 sampling=FAST, progress=False, **SHORT)
    res.save(tmp_path / "attack.json")
    assert (tmp_path / "attack.embeddings.safetensors").is_file()
    back = AttackResult.load(tmp_path / "attack.json")
    assert back.embeddings.keys() == res.embeddings.keys()
    assert all(torch.equal(back.embeddings[k], v) for k, v in res.embeddings.items())


def test_bad_options_fail_before_any_work(tiny_sd1):
    judge = ToneJudge()
    for bad, field in [({"steps": 0}, "steps"), ({"lr": -1.0}, "lr"), ({"images_per_step": 0}, "images_per_step"),
                       ({"initializer": " "}, "initializer")]:
        with pytest.raises(ConfigError, match=field):
            attack(tiny_sd1, ["a cat"], "bright", judge=judge, method="concept_inversion", edit=brightening_edit(tiny_sd1),
                   progress=False, **bad)
    assert judge.calls == 0


def test_a_token_the_tokenizer_already_has_is_refused(tiny_sd1):
    with learned_tokens(tiny_sd1, {"<x>": torch.zeros(tiny_sd1.text_encoder.config.hidden_size)}):
        with pytest.raises(ConfigError, match="already has the token"):
            with learned_tokens(tiny_sd1, {"<x>": torch.zeros(tiny_sd1.text_encoder.config.hidden_size)}):
                pass


# -- behaviour on canvas-mini ---------------------------------------------------------------------
def test_concept_inversion_brings_back_a_uce_erased_style(canvas_pipe, canvas_judge):
    import erasekit
    from erasekit.canvas.world import OBJECTS, caption
    from erasekit.pipelines import generate

    edit = erasekit.erase(canvas_pipe, "uce", ["Van Gogh"])
    prompts = [caption(o, "Van_Gogh") for o in OBJECTS[:3]]
    kw = dict(judge=canvas_judge, edit=edit, progress=False)
    none = attack(canvas_pipe, prompts, "Van_Gogh", method="none", **kw)
    res = attack(canvas_pipe, prompts, "Van_Gogh", method="concept_inversion", steps=50, eval_every=50,
                 images_per_step=3, **kw)
    assert none.asr == res.pre_asr == 0.0   # the erasure holds on the plain captions...
    assert res.asr >= 2 / 3 * 100 - 1e-6    # ...and the learned token brings the style back
    for p in res.prompts:
        if p.success:   # the saved embedding replays the judged image's success
            with edit.applied(canvas_pipe), learned_tokens(canvas_pipe, res.embeddings):
                image = generate(canvas_pipe, p.adv_prompt, p.adv_seed)
            assert canvas_judge.hits(image, "Van_Gogh")[0]
