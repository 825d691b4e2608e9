"""FMN on the tiny SD 3 and Flux pipelines: the joint attention's text columns read by the probe (checked against
the processors' own attention output), the concept's rows in every text segment, and training that lowers the
concept tokens' attention."""

import pytest
import torch

import erasekit
from erasekit.erase.fmn import ConceptAttention
from erasekit.erase.attention_maps import concept_positions
from erasekit.erase.joint_attention import probing_joint
from erasekit.errors import ConfigError
from erasekit.pipelines import FamilyAdapter
from erasekit.pipelines.flow import FlowModel

PROMPT = "a painting by Van Gogh"


def _inputs(pipe, seed=0):
    fm = FlowModel(pipe)
    return fm, fm.noise(1, torch.Generator().manual_seed(seed)), FamilyAdapter(pipe).encode([PROMPT])


def test_probe_reads_the_joint_softmax_text_columns(tiny_mmdit):
    """With the image tokens' values zeroed, each attention's image rows are exactly P_txt @ V_txt: the probe's
    probabilities (normalised over image and text keys) reproduce diffusers' own fused attention."""
    pipe = tiny_mmdit
    tf, family = pipe.transformer, FamilyAdapter(pipe).family
    fm, z, ctx = _inputs(pipe)
    T = ctx.embeds.shape[1]
    probs, values, outputs, hooks = [], [], [], []

    def zero_image_rows(start):
        def hook(mod, args, out):
            out = out.clone()
            out[:, start:] = 0
            return out
        return hook

    for name, attn in tf.named_modules():
        if not hasattr(attn, "to_v") or not hasattr(attn, "processor"):
            continue
        single = attn.add_v_proj is None if hasattr(attn, "add_v_proj") else True
        hooks.append(attn.to_v.register_forward_hook(zero_image_rows(T if single else 0)))
        if single:   # Flux single-stream: text rows first in one sequence, no output projection
            hooks.append(attn.to_v.register_forward_hook(lambda m, a, o: values.append(o[:, :T])))
            hooks.append(attn.register_forward_hook(lambda m, a, o: outputs.append(o[:, T:])))
        else:
            hooks.append(attn.add_v_proj.register_forward_hook(lambda m, a, o: values.append(o)))
            hooks.append(attn.to_out[0].register_forward_pre_hook(lambda m, a: outputs.append(a[0])))
    try:
        with torch.no_grad(), probing_joint(tf, family, probs.append, T):
            fm.predict(tf, z, 0.5, ctx)
    finally:
        for h in hooks:
            h.remove()
    assert len(probs) == len(values) == len(outputs) == len(tf.attn_processors) >= 2
    for p, v, out in zip(probs, values, outputs):
        b, heads, n, t = p.shape
        assert t == T and n == out.shape[1]
        expected = (p @ v.float().view(b, T, heads, -1).transpose(1, 2)).transpose(1, 2).reshape(out.shape)
        assert not torch.allclose(expected, torch.zeros_like(expected))
        assert torch.allclose(expected, out.float(), atol=1e-5)
        assert (p.sum(-1) < 1).all()   # image keys take part in the normaliser


def test_probing_leaves_the_transformer_output_as_it_is(tiny_mmdit):
    pipe = tiny_mmdit
    fm, z, ctx = _inputs(pipe)
    processors = dict(pipe.transformer.attn_processors)
    with torch.no_grad():
        plain = fm.predict(pipe.transformer, z, 0.5, ctx)
        with probing_joint(pipe.transformer, FamilyAdapter(pipe).family, lambda p: None, ctx.embeds.shape[1]):
            probed = fm.predict(pipe.transformer, z, 0.5, ctx)
    assert torch.equal(plain, probed)
    assert dict(pipe.transformer.attn_processors) == processors


def test_concept_positions_cover_every_text_segment(tiny_mmdit):
    adapter = FamilyAdapter(tiny_mmdit)
    found = concept_positions(adapter, [PROMPT, "Van Gogh at night"], ["Van Gogh"], use_pooler=False)
    assert found.shape == (2, adapter.sequence_length)
    for seg in adapter.segments:
        tok = adapter.tokenizers[seg.which]
        n = len(tok("Van Gogh", add_special_tokens=False).input_ids)
        assert found[:, seg.start:seg.start + seg.length].sum(1).tolist() == [n, n]
        ids = adapter.tokenize([PROMPT], which=seg.which).input_ids[0].cpu()
        rows = found[0, seg.start:seg.start + seg.length].nonzero().flatten()
        assert tok.decode(ids[rows]).replace(" ", "").lower() == "vangogh"
    pooled = concept_positions(adapter, [PROMPT], ["Van Gogh"], use_pooler=True)
    assert pooled.sum() > found[0].sum() and (pooled[0] | found[0]).equal(pooled[0])
    with pytest.raises(ConfigError, match="concept_words"):
        concept_positions(adapter, ["a photo of a dog"], ["Van Gogh"], use_pooler=False)


def test_training_lowers_the_concept_tokens_attention(tiny_mmdit):
    pipe = tiny_mmdit
    fm, z, ctx = _inputs(pipe, seed=3)
    adapter = FamilyAdapter(pipe)
    positions = concept_positions(adapter, [PROMPT], ["Van Gogh"], use_pooler=False)

    def concept_attention():
        rec = ConceptAttention()
        rec.start(positions)
        with torch.no_grad(), probing_joint(pipe.transformer, adapter.family, lambda p: rec.record(p, p.shape[1]),
                                            positions.shape[1]):
            fm.predict(pipe.transformer, z, 0.7, ctx)
        return float(rec.loss())

    before = concept_attention()
    edit = erasekit.erase(pipe, "fmn", ["Van Gogh"], prompts=[PROMPT], param_set="esd-x", steps=8, lr=1e-2,
                          images_per_prompt=2, batch_size=2, data_steps=2, use_pooler=False, progress=False)
    assert edit.keys and all(k.startswith("transformer/") and (".attn.add_" in k or ".attn.to_add_out" in k)
                             for k in edit.keys)   # esd-x: the joint attention's text-side projections
    assert edit.manifest["flow"]["resolution"] == fm.size
    with edit.applied(pipe):
        after = concept_attention()
    assert after < 0.5 * before
