"""RECE: the adversarial-embedding derivation (joint over layers, against the original weights), the
edit against the current weights, epoch selection, and bad input."""

import json

import numpy as np
import pytest
import torch

import erasekit
from erasekit.erase.closed_form import RightUpdate, UCEFitter, kv_weights
from erasekit.erase.rece import RECEConfig, derive
from erasekit.erase.uce import PromptEncoder, UCEConfig, resolve, uce_fitter
from erasekit.errors import ConfigError
from erasekit.eval.judges import Judge
from erasekit.pipelines import FamilyAdapter


def _state(pipe):
    return {k: v.clone() for k, v in pipe.unet.state_dict().items()}


def _same(a, b):
    return all(torch.equal(a[k], b[k]) for k in a)


def test_derivation_is_joint_over_layers_against_original_weights(tiny_sd1):
    adapter = FamilyAdapter(tiny_sd1)
    W_old = {k: w.double() for k, w in kv_weights(tiny_sd1).items()}
    X = uce_fitter(PromptEncoder(adapter), resolve(UCEConfig(preset="nudity"), ["nudity"])).solve().dense()
    H = sum(w.T @ w for w in W_old.values())
    C = adapter.encode(["nudity", "a nude person"]).embeds.flatten(0, 1).double()
    C_adv = derive(H, X, C, lam_r=0.1)
    W_now = [w @ X for w in W_old.values()]     # the UCE-edited weights, layer by layer
    lhs = 0.1 * torch.eye(X.shape[0], dtype=X.dtype) + sum(w.T @ w for w in W_now)
    rhs = sum(w.T @ w_old for w, w_old in zip(W_now, W_old.values()))
    assert torch.allclose(lhs @ C_adv.T, rhs @ C.T, atol=1e-8 * (rhs @ C.T).abs().max())
    # the derived embedding brings back (part of) what the original model made of the concept
    gap = lambda E: sum((E @ w.T - C @ w_old.T).norm() ** 2 for w, w_old in zip(W_now, W_old.values()))
    assert gap(C_adv) < 0.5 * gap(C)


def test_unedited_model_derives_the_concept_itself(tiny_sd1):
    W = [w.double() for w in kv_weights(tiny_sd1).values()]
    H = sum(w.T @ w for w in W)
    C = FamilyAdapter(tiny_sd1).encode(["nudity"]).embeds[0].double()
    C_adv = derive(H, torch.eye(H.shape[0], dtype=H.dtype), C, lam_r=1e-6)
    assert torch.allclose(C_adv, C, atol=1e-3 * C.abs().max())


def test_right_updates_compose_exactly():
    g = torch.Generator().manual_seed(0)
    a = RightUpdate(torch.randn(6, 2, generator=g, dtype=torch.float64), torch.randn(2, 6, generator=g, dtype=torch.float64))
    b = RightUpdate(torch.randn(6, 1, generator=g, dtype=torch.float64), torch.randn(1, 6, generator=g, dtype=torch.float64))
    assert torch.allclose(a.then(b).dense(), a.dense() @ b.dense())
    assert a.then(b).then(a).rank == 5 and a.then(b).then(a).then(b).rank == 6   # dense once rank >= d


def test_each_epoch_erases_its_adversarial_embedding_against_current_weights(tiny_pipe):
    before = _state(tiny_pipe)
    edits = {n: erasekit.erase(tiny_pipe, "rece", ["nudity"], preset="nudity", epochs=n) for n in (0, 1, 2)}
    assert _same(before, _state(tiny_pipe))
    assert edits[2].manifest["best_epoch"] == 2 and len(edits[2].manifest["history"]) == 2
    adapter = FamilyAdapter(tiny_pipe)
    C = adapter.encode(["nudity"]).embeds[0].double()
    G = adapter.encode([" "]).embeds[0].double()
    W_old = {k: w.double() for k, w in kv_weights(tiny_pipe).items()}
    H = sum(w.T @ w for w in W_old.values())
    weights = {}
    for n, edit in edits.items():
        with edit.applied(tiny_pipe):
            weights[n] = {k: w.double() for k, w in kv_weights(tiny_pipe).items()}
    for k in (0, 1):   # epoch k+1: keys c' derived from epoch k now map (nearly) to W_k's guide outputs
        X = torch.linalg.lstsq(torch.cat(list(W_old.values())), torch.cat(list(weights[k].values()))).solution
        C_adv = derive(H, X, C, lam_r=0.1)
        miss = lambda W: sum((C_adv @ W[key].T - G @ weights[k][key].T).norm() for key in W)
        assert miss(weights[k + 1]) < 0.5 * miss(weights[k])
    with edits[2].applied(tiny_pipe):
        pass
    assert _same(before, _state(tiny_pipe))


def test_validation_keeps_the_best_epoch_and_stops_at_zero(tiny_sd1):
    scores = iter([0.4, 0.1, 0.3, 0.0, 0.5])
    seen = []

    def validation(pipe):
        seen.append({k: w.clone() for k, w in kv_weights(pipe).items()})
        return next(scores)

    before = _state(tiny_sd1)
    edit = erasekit.erase(tiny_sd1, "rece", ["nudity"], epochs=5, validation=validation)
    assert [h["score"] for h in edit.manifest["history"]] == [0.4, 0.1, 0.3, 0.0]   # stopped at 0
    assert edit.manifest["best_epoch"] == 4 and _same(before, _state(tiny_sd1))
    with edit.applied(tiny_sd1):   # the kept edit is the one validated in epoch 4
        assert all(torch.equal(w, seen[3][k]) for k, w in kv_weights(tiny_sd1).items())
    scores = iter([0.4, 0.1, 0.3])
    edit = erasekit.erase(tiny_sd1, "rece", ["nudity"], epochs=3, validation=lambda p: next(scores))
    assert edit.manifest["best_epoch"] == 2
    json.dumps(edit.manifest)   # the callback is recorded by name


class _FakeJudge(Judge):
    name = "fake"
    heads = {"object": ["nudity", "cat"]}

    def classify(self, images):
        return {"object": np.zeros(len(images), dtype=int)}


def test_judge_selection_and_unknown_concept(tiny_sd1, tmp_path):
    edit = erasekit.erase(tiny_sd1, "rece", ["nudity"], epochs=1, judge=_FakeJudge(), validation_seeds=(0,))
    assert edit.manifest["history"] == [{"epoch": 1, "score": 1.0}]
    assert edit.manifest["config"]["judge"]["name"] == "fake"
    erasekit.Edit.load(edit.save(tmp_path / "rece.safetensors"), pipe=tiny_sd1)
    before = _state(tiny_sd1)
    with pytest.raises(ConfigError, match="does not know the concept"):
        erasekit.erase(tiny_sd1, "rece", ["a dog"], judge=_FakeJudge())
    assert _same(before, _state(tiny_sd1))


@pytest.mark.parametrize("options,match", [
    ({"regular_scale": 0.0}, "regular_scale"),
    ({"epochs": -1}, "epochs"),
    ({"ridge": 0.0}, "ridge"),
    ({"judge": "canvas"}, "judge"),
    ({"preset": "unknown"}, "preset"),
])
def test_bad_options(tiny_sd1, options, match):
    with pytest.raises(ConfigError, match=match):
        erasekit.erase(tiny_sd1, "rece", ["nudity"], **options)
    assert isinstance(RECEConfig(), UCEConfig)


def test_fitter_refuses_a_singular_system():
    fitter = UCEFitter(dim=8, lam=0.0)
    fitter.update(torch.ones(20, 8), torch.zeros(20, 8))   # 20 rows, all the same: rank 1
    with pytest.raises(ConfigError, match="singular"):
        fitter.solve()
