"""MACE: the token alignment of CFR, the exact factors of the closed-form fusion, the attention loss,
masks that are never chosen silently, and one behaviour check on canvas-mini."""

import pytest
import torch

import erasekit
from erasekit.erase.attention_maps import probing
from erasekit.erase.closed_form import kv_weights
from erasekit.erase.attention_maps import concept_positions
from erasekit.erase.mace import aligned_rows, cfr_fitter, fuse
from erasekit.erase.uce import PromptEncoder
from erasekit.errors import ConfigError
from erasekit.pipelines import FamilyAdapter

from _canvas_helpers import style_accuracy


def _state(pipe):
    return {k: v.clone() for k, v in pipe.unet.state_dict().items()}


def test_cfr_rows_skip_the_concept_and_align_the_rest():
    # BOS a photo of <van> <gogh> . EOS   vs   BOS a photo of <art> . EOS   (ids made up)
    old, new = [0, 5, 6, 7, 40, 41, 9, 1], [0, 5, 6, 7, 50, 9, 1]
    a, b = aligned_rows(old, new, 12)
    assert a[:4] == b[:4] == [0, 1, 2, 3]                 # the common prefix, row for row
    assert a[4:6] == [6, 7] and b[4:6] == [5, 6]          # "." and EOS after the concept / the mapping
    assert 4 not in a and 5 not in a and 4 not in b       # the concept's and the mapping's own tokens
    assert len(a) == len(b) and a[-1] == 11 and b[-1] == 10   # padding aligned from the end, equal length


def test_fusion_factors_solve_the_fusion_normal_equations(tiny_sd1):
    s = {"concepts": ["Van Gogh", "a castle"], "mapping": ["art", ""], "templates": ["{}", "a painting of {}"],
         "preserve": ["a dog"], "preserve_scale": 0.3, "lamb": 0.5}
    enc = PromptEncoder(FamilyAdapter(tiny_sd1))
    cfr = cfr_fitter(enc, s).solve()
    W = kv_weights(tiny_sd1)
    g = torch.Generator().manual_seed(0)

    def name(key):
        return key.split("/", 1)[1][:-len(".weight")].replace(".", "__")

    class Factors:   # what an adapter of an AdapterSet gives the fusion
        def __init__(self, U, V):
            self.U, self.V = U, V

        def factors(self):
            return self.U, self.V

    loras = [{name(key): Factors(torch.randn(w.shape[0], 1, generator=g), torch.randn(1, w.shape[1], generator=g))
              for key, w in W.items()} for _ in s["concepts"]]
    factors = fuse(enc, W, cfr, loras, s)
    grams = []
    for c in s["concepts"]:
        rows = enc.rows([t.format(c) for t in s["templates"]])[0].flatten(0, 1)
        grams.append(rows.T @ rows)
    P, _ = enc.gram(s["preserve"])
    B = sum(grams) + s["preserve_scale"] * P + s["lamb"] * torch.eye(enc.dim, dtype=torch.float64)
    for key, w in W.items():
        w = w.double()
        w_cfr = cfr.weight(w.float()).double()
        lora_w = [w_cfr + lora[name(key)].U.double() @ lora[name(key)].V.double() for lora in loras]
        A = sum(lw @ G for lw, G in zip(lora_w, grams)) + s["preserve_scale"] * w @ P + s["lamb"] * w_cfr
        U, V = factors[key]
        W_star = w + U.double() @ V.double()
        assert (W_star @ B - A).norm() / A.norm() < 1e-5, key
        assert U.shape[1] == cfr.rank + len(s["concepts"])     # exact low rank: CFR's rows + one per LoRA


def test_object_masks_must_be_chosen_on_a_model_without_a_world(tiny_sd1):
    before = _state(tiny_sd1)
    with pytest.raises(ConfigError, match="mask_source='attention'"):
        erasekit.erase(tiny_sd1, "mace", ["a castle"], kind="object", steps=1, progress=False)
    with pytest.raises(ConfigError, match="mask_source"):
        erasekit.erase(tiny_sd1, "mace", ["a castle"], mask_source="world", steps=1, progress=False)
    after = _state(tiny_sd1)
    assert all(torch.equal(v, after[k]) for k, v in before.items())


def _concept_attention(pipe, prompt, concept):
    adapter = FamilyAdapter(pipe)
    ctx = adapter.encode([prompt])
    pos = concept_positions(adapter, [prompt], [concept], use_pooler=False)[0]
    mass = []

    def sink(probs, heads):
        if probs.shape[-1] == pos.shape[0]:
            mass.append(float(probs[:, :, pos].sum(-1).mean()))

    x = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(3))
    with torch.no_grad(), probing(pipe.unet, sink):
        pipe.unet(x, 300, encoder_hidden_states=ctx.embeds)
    return sum(mass) / len(mass)


def test_lora_stage_suppresses_the_concept_tokens_attention(tiny_sd1):
    # The LoRA and fusion stages alone (no CFR), on the concept's own tokens (no EOS tokens in the loss, so
    # the loss is exactly the attention measured here); the fused Edit must carry what the LoRA learnt.
    before = _concept_attention(tiny_sd1, "Van Gogh", "Van Gogh")
    edit = erasekit.erase(tiny_sd1, "mace", ["Van Gogh"], cfr=False, steps=20, lr=3e-2, images_per_concept=2,
                          sample_steps=2, mask_source="whole", templates=["{}"], use_pooler=False, progress=False)
    with edit.applied(tiny_sd1):
        after = _concept_attention(tiny_sd1, "Van Gogh", "Van Gogh")
    assert after < 0.4 * before


def test_erasing_a_style_on_canvas_mini(canvas_pipe, canvas_judge):
    def accuracy(style):
        return style_accuracy(canvas_pipe, canvas_judge, style, objects=5, seeds=(0, 1), steps=15)

    base = accuracy("Van_Gogh"), accuracy("Winter")
    edit = erasekit.erase(canvas_pipe, "mace", ["Van Gogh"], progress=False)
    assert edit.manifest["preset"]["name"] == "canvas"
    with edit.applied(canvas_pipe):
        after = accuracy("Van_Gogh"), accuracy("Winter")
    assert base[0] >= 0.7 and after[0] <= 0.2            # the judge stops seeing the target style
    assert after[1] >= base[1] - 0.2                     # another style stays
