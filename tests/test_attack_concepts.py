"""Each attacked prompt is judged on its own concept: given for it, given for all, or inferred from
the Edit's concepts (the one the prompt names); none or several named is a clear error. Behaviour
on canvas-mini with two-concept Edits; the README's ``erasekit attack`` example (no prompts) works."""

from __future__ import annotations

import json

import pytest

from erasekit.attacks import attack
from erasekit.attacks.concepts import infer_concept, prompt_concepts
from erasekit.errors import ConfigError

VG = ["A Cats image in Van Gogh style.", "A Trees image in Van Gogh style."]
CUB = ["A Cats image in Cubism style.", "A Trees image in Cubism style."]


class SpyJudge:
    """The canvas judge, recording which concept each image was judged on."""

    def __init__(self, judge):
        self.judge, self.asked = judge, []
        self.name, self.heads = judge.name, judge.heads

    def find(self, concept):
        return self.judge.find(concept)

    def describe(self):
        return self.judge.describe()

    def hits(self, images, concept):
        self.asked += [concept] * len(images)
        return self.judge.hits(images, concept)


def _noop(pipe, concepts):
    """An Edit of ``concepts`` that changes nothing: every prompt still shows its own concept."""
    from erasekit.pipelines import Edit

    key = next(n for n, _ in pipe.unet.named_parameters() if "attn2.to_v" in n)
    return Edit.from_weights(pipe, {f"unet/{key}": pipe.unet.get_parameter(key).detach().clone()},
                             {"method": "uce", "concepts": list(concepts)}, low_rank=False)


# -- inference ------------------------------------------------------------------------------------
def test_the_concept_named_in_the_prompt_is_inferred():
    edit_concepts = ["Van Gogh", "Cubism"]
    assert infer_concept("A Cats image in VAN_GOGH style.", edit_concepts) == "Van Gogh"
    assert infer_concept("cubism, a tree", edit_concepts) == "Cubism"
    assert infer_concept("A Cats image.", ["Van_Gogh"]) == "Van_Gogh"   # one concept judges every prompt
    assert prompt_concepts(VG + CUB, None, edit_concepts) == ["Van Gogh"] * 2 + ["Cubism"] * 2
    assert prompt_concepts(VG + CUB, [None, "Cats", None, None], edit_concepts) == \
        ["Van Gogh", "Cats", "Cubism", "Cubism"]
    assert prompt_concepts(CUB, "Van_Gogh", edit_concepts) == ["Van_Gogh"] * 2   # given for all: it wins


@pytest.mark.parametrize("prompt, needle", [
    ("A Cats image.", "names none of the Edit's concepts"),
    ("A Cats image in Van Gogh and Cubism style.", r"names several \(Van Gogh, Cubism\)"),
    ("A Cats image in Van Goghish style.", "names none"),   # whole words only
])
def test_none_or_several_named_is_a_clear_error(prompt, needle):
    with pytest.raises(ConfigError, match=needle) as e:
        infer_concept(prompt, ["Van Gogh", "Cubism"])
    assert "--concept" in str(e.value) and "concept=[" in str(e.value)


def test_bad_concept_lists_are_refused():
    with pytest.raises(ConfigError, match="one per prompt \\(2\\), but 3"):
        prompt_concepts(VG, ["a", "b", "c"], [])
    with pytest.raises(ConfigError, match="no concept to judge"):
        prompt_concepts(VG, None, [])


# -- attack() on canvas-mini ------------------------------------------------------------------------
def test_each_prompt_is_judged_on_its_own_concept(canvas_pipe, canvas_judge):
    import erasekit

    prompts = VG + CUB
    # an Edit that erased nothing: every prompt still shows its own style, so ASR must be 100 %
    noop = _noop(canvas_pipe, ["Van Gogh", "Cubism"])
    res = attack(canvas_pipe, prompts, judge=canvas_judge, edit=noop, method="none", progress=False)
    assert [p.concept for p in res.prompts] == ["Van_Gogh"] * 2 + ["Cubism"] * 2
    assert res.asr == 100.0 and res.summary()["per_concept"]["Cubism"]["asr"] == 100.0
    assert res.concept == "Van_Gogh, Cubism" and res.protocol["concept_heads"] == {"Van_Gogh": "style",
                                                                                  "Cubism": "style"}
    # a real two-concept UCE Edit: the judge is asked about each image's own concept
    spy = SpyJudge(canvas_judge)
    edit = erasekit.erase(canvas_pipe, "uce", ["Van Gogh", "Cubism"])
    res = attack(canvas_pipe, prompts, judge=spy, edit=edit, method="none", progress=False)
    assert sorted(spy.asked) == sorted(p.concept for p in res.prompts) == sorted(["Van_Gogh"] * 2 + ["Cubism"] * 2)
    assert set(res.summary()["per_concept"]) == {"Van_Gogh", "Cubism"}
    with pytest.raises(ConfigError, match="names none"):
        attack(canvas_pipe, ["A Cats image."], judge=canvas_judge, edit=edit, method="none", progress=False)


def test_result_files_keep_each_prompts_concept(canvas_pipe, canvas_judge, tmp_path):
    from erasekit.attacks import AttackResult

    res = attack(canvas_pipe, [VG[0], CUB[0]], ["Van_Gogh", "Cubism"], judge=canvas_judge, method="none",
                 progress=False)
    for suffix in (".json", ".csv"):
        back = AttackResult.load(res.save(tmp_path / f"r{suffix}"))
        assert [p.concept for p in back.prompts] == ["Van_Gogh", "Cubism"] and back.concept == res.concept
        assert back.summary()["per_concept"] == res.summary()["per_concept"]


def test_evaluate_scores_every_concept_of_an_edit(canvas_pipe, canvas_judge):
    from erasekit.canvas.world import OBJECTS
    from erasekit.eval import evaluate
    from erasekit.eval.protocol import get_protocol

    protocol = get_protocol("canvas-lite").with_(name="two", themes=("Van_Gogh", "Cubism"), objects=OBJECTS[:2])
    r = evaluate(canvas_pipe, _noop(canvas_pipe, ["Van Gogh", "Cubism"]), protocol=protocol, judge=canvas_judge,
                 fid=False, clip=False, cache_dir=None, progress=False, baseline=False)
    sc = r.scores
    assert r.targets == ["Van_Gogh", "Cubism"]
    for name in ("Van_Gogh", "Cubism"):   # each target's UA comes from its own style's accuracy
        assert sc["targets"][name]["UA"] == pytest.approx(100.0 - sc["style_accuracy"][name])


# -- the CLI -------------------------------------------------------------------------------------
def _cli(capsys, monkeypatch, spy, *argv):
    import erasekit.cli.commands as commands
    from erasekit.cli.main import main

    monkeypatch.setattr(commands, "load_judge", lambda name: spy)
    capsys.readouterr()
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_cli_judges_each_prompt_on_its_concept_and_defaults_to_canvas_captions(capsys, monkeypatch, canvas_pipe,
                                                                               canvas_judge, tmp_path):
    import erasekit.cli.commands as commands

    monkeypatch.setattr(commands, "_load_pipe", lambda args, out, manifest=None: (canvas_pipe, "canvas-mini"))
    edit = _noop(canvas_pipe, ["Van_Gogh", "Cubism"]).save(tmp_path / "two.safetensors")
    base = ["attack", "--edit", str(edit), "--attack", "none", "--json", "-q"]
    # the README's form, no prompts: 4 canvas captions of each of the Edit's concepts, each judged on its own
    spy = SpyJudge(canvas_judge)
    code, out, err = _cli(capsys, monkeypatch, spy, *base, "--out", str(tmp_path / "a"))
    assert code == 0, err
    data = json.loads(out)
    assert data["n"] == 8 and sorted(spy.asked) == ["Cubism"] * 4 + ["Van_Gogh"] * 4
    assert data["per_concept"]["Cubism"]["asr"] >= 75 and data["per_concept"]["Van_Gogh"]["asr"] >= 75
    rows = json.loads((tmp_path / "a" / "attack.json").read_text())["prompts"]
    assert all(r["concept"].replace("_", " ") in r["prompt"] for r in rows)
    # prompts from a file, one with its concept given; --prompt inferred
    spy = SpyJudge(canvas_judge)
    f = tmp_path / "prompts.txt"
    f.write_text(f"Cubism\t{VG[0]}\n{CUB[1]}\n")
    code, out, err = _cli(capsys, monkeypatch, spy, *base, "--prompts-file", str(f), "--prompt", VG[1],
                          "--out", str(tmp_path / "b"))
    assert code == 0, err
    assert spy.asked.count("Cubism") == 2 and spy.asked.count("Van_Gogh") == 1
    assert [r["concept"] for r in json.loads((tmp_path / "b" / "attack.json").read_text())["prompts"]] == \
        ["Van_Gogh", "Cubism", "Cubism"]
    # ambiguity: exit 2 with one line that says how to give the concept, before the model is used
    spy = SpyJudge(canvas_judge)
    code, out, err = _cli(capsys, monkeypatch, spy, *base, "--prompt", "A Cats image.", "--out", str(tmp_path / "c"))
    assert code == 2 and "names none" in err and "--concept" in err and len(err.strip().splitlines()) == 1
    assert spy.asked == []
    code, out, err = _cli(capsys, monkeypatch, spy, *base, "--prompt", VG[0], "--prompt", CUB[0], "--concept", "a",
                          "--concept", "b", "--concept", "c", "--out", str(tmp_path / "c"))
    assert code == 2 and "--concept is given 3 times for 2 prompts" in err
