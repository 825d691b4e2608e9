"""MACE on tiny SD 3 and Flux pipelines: the joint-attention probe, CFR on the context embedder, the fusion.

Random weights: these check mechanics and the maths (the probe reproduces the block's own attention, the
edit is exact on the maps it claims, training moves the LoRA), not erasure of a real concept.
"""

from __future__ import annotations

import torch

import erasekit
from erasekit.erase.attention_maps import probing
from erasekit.pipelines.flow import FlowModel

CONCEPT = "Van Gogh"


def _call(pipe, prompt: str, seed: int = 0):
    from erasekit.pipelines import FamilyAdapter

    fm = FlowModel(pipe)
    ctx = FamilyAdapter(pipe).encode([prompt])
    z = fm.noise(1, torch.Generator().manual_seed(seed))
    return fm.kwargs(z, 0.6, ctx)


def test_maces_probe_reports_every_blocks_image_to_text_attention(tiny_mmdit):
    """MACE's probe on an MMDiT (the joint-attention probe, whose exactness tests/test_mmdit_fmn.py checks)
    reports, for every block, B*heads x image tokens x text rows with the head count, rows summing to less than
    one (the rest goes to image keys), and leaves the transformer's output unchanged."""
    pipe = tiny_mmdit
    transformer = pipe.transformer
    kw = _call(pipe, f"a painting by {CONCEPT}")
    with torch.no_grad():
        ref = transformer(**kw)[0]
    seen = []
    with torch.no_grad(), probing(transformer, lambda p, h: seen.append((p, h))):
        out = transformer(**kw)[0]
    assert torch.equal(out, ref)
    text = kw["encoder_hidden_states"].shape[1]
    blocks = len(transformer.transformer_blocks) + len(getattr(transformer, "single_transformer_blocks", []))
    assert len(seen) == blocks
    for p, heads in seen:
        assert heads == transformer.config.num_attention_heads and p.shape[0] == heads and p.shape[-1] == text
        assert (p.sum(-1) < 1).all() and (p >= 0).all()


def _concept_attention(pipe, prompt: str) -> float:
    """The image-to-text attention mass at the concept's rows on one fixed input, summed over blocks."""
    from erasekit.erase.attention_maps import concept_positions
    from erasekit.pipelines import FamilyAdapter

    pos = concept_positions(FamilyAdapter(pipe), [prompt], [CONCEPT], False)[0]
    mass = []
    with torch.no_grad(), probing(pipe.transformer, lambda p, h: mass.append(p[..., pos].sum().item())):
        pipe.transformer(**_call(pipe, prompt))
    return sum(mass)


def test_mace_lora_stage_lowers_the_concepts_joint_attention(tiny_mmdit):
    """Stage 2 on E (no CFR, a tiny ridge so the fusion keeps the LoRA on the concept's rows) lowers the
    joint attention to the concept's rows: the loss of eq. 6 reaches the context embedder."""
    pipe = tiny_mmdit
    prompt = f"a painting by {CONCEPT}"
    before = _concept_attention(pipe, prompt)
    edit = erasekit.erase(pipe, "mace", [CONCEPT], cfr=False, steps=8, lr=0.05, lamb=1e-3, preserve_scale=0.0,
                          importance_sampling=False, images_per_concept=1, sample_steps=2, mask_source="whole",
                          templates=["a painting by {}"], use_pooler=False, progress=False)
    assert edit.keys == ["transformer/context_embedder.weight"]
    with edit.applied(pipe):
        after = _concept_attention(pipe, prompt)
    assert after < 0.85 * before


def test_mace_cfr_maps_the_concept_rows_onto_the_mapping(tiny_mmdit):
    """Stage 1 on the context embedder and the pooled projection: with the LoRA left at zero (lr tiny) and no
    preserve rows, the fused edit is CFR's solution, and it moves the concept prompt's aligned rows and pooled
    vector onto the mapped prompt's (measured through the edited maps)."""
    from erasekit.erase.mace import _unpadded, aligned_rows
    from erasekit.pipelines import FamilyAdapter

    pipe = tiny_mmdit
    adapter = FamilyAdapter(pipe)
    old, new = f"a painting by {CONCEPT}", "a painting by art"
    edit = erasekit.erase(pipe, "mace", [CONCEPT], mapping="art", templates=["a painting by {}"], steps=1, lr=1e-12,
                          lamb=0.05, preserve_scale=0.0, images_per_concept=1, sample_steps=2, mask_source="whole",
                          progress=False)
    assert edit.manifest["mmdit_maps"] == "context_embedder+pooled"
    c, g = adapter.encode([old]), adapter.encode([new])
    rows_a, rows_b = [], []
    for seg in adapter.segments:
        a, b = aligned_rows(_unpadded(adapter, [old], seg.which)[0], _unpadded(adapter, [new], seg.which)[0],
                            seg.length)
        rows_a += [seg.start + i for i in a]
        rows_b += [seg.start + i for i in b]
    E, L1 = pipe.transformer.context_embedder, pipe.transformer.time_text_embed.text_embedder.linear_1
    with torch.no_grad():
        target, p_target = E(g.embeds[0, rows_b]), L1(g.pooled)
        gap, p_gap = (E(c.embeds[0, rows_a]) - target).norm(), (L1(c.pooled) - p_target).norm()
        with edit.applied(pipe):
            gap_after, p_gap_after = (E(c.embeds[0, rows_a]) - target).norm(), (L1(c.pooled) - p_target).norm()
    assert gap > 0 and p_gap > 0
    assert gap_after < 0.3 * gap and p_gap_after < 0.3 * p_gap
