"""SAFREE on tiny SD 3 and Flux pipelines: the projection of the transformer's text rows (per segment), the
self-validation window on the flow schedule, and the refusal of latent re-attention (no skip features)."""

from __future__ import annotations

import pytest
import torch

import erasekit
from erasekit.errors import ConfigError
from erasekit.pipelines.flow import FlowModel

CONCEPT = "Van Gogh"
PROMPT = f"a painting by {CONCEPT}"


def _transformer_context(pipe, edit=None) -> tuple[torch.Tensor, torch.Tensor]:
    """(the prompt's text rows as encoded, the rows the transformer reads) for one direct call."""
    from erasekit.pipelines import FamilyAdapter

    fm = FlowModel(pipe)
    ctx = FamilyAdapter(pipe).encode([PROMPT])
    kw = fm.kwargs(fm.noise(1, torch.Generator().manual_seed(0)), 0.9, ctx)
    seen = []
    handle = None
    try:
        with torch.no_grad(), edit.sampled(pipe) as p:
            handle = p.transformer.register_forward_pre_hook(
                lambda m, a, k: seen.append(k["encoder_hidden_states"]), with_kwargs=True)
            p.transformer(**kw)
    finally:
        if handle is not None:
            handle.remove()
    return ctx.embeds, seen[0]


def test_safree_projects_the_concept_rows_out_of_each_segments_subspace(tiny_mmdit):
    """The rows the transformer reads: the concept's rows in every segment (SD 3: CLIP and T5; Flux: T5) are
    projected (relative to the unconditional rows they have no component in that segment's concept subspace),
    and every row not projected is the prompt's own."""
    from erasekit.erase.attention_maps import concept_positions
    from erasekit.erase.safree import _segments, concept_bases
    from erasekit.pipelines import FamilyAdapter
    from erasekit.pipelines.inference import unconditional_context

    pipe = tiny_mmdit
    edit = erasekit.erase(pipe, "safree", [CONCEPT], self_validation=False)
    assert edit.manifest["resolved"]["latent_reattention"] is False
    original, read = _transformer_context(pipe, edit)
    adapter = FamilyAdapter(pipe)
    u = unconditional_context(pipe).embeds.double()
    bases = concept_bases(pipe, [CONCEPT], u.float())
    pos = concept_positions(adapter, [PROMPT], [CONCEPT], False)[0]
    changed = (read != original).flatten(2).any(-1)[0]
    for basis, (span, _, first) in zip(bases, _segments(adapter)):
        assert changed[span][pos[span]].all(), "every concept row of the segment is projected"
        d = (read[0, span].double() - u[0, span])[changed[span]]
        assert (d @ basis.T).abs().max() < 1e-4 * d.abs().max()
    assert torch.equal(read[0, ~changed], original[0, ~changed])
    assert not changed.all()


@pytest.mark.parametrize("family", ["sd3", "flux"])
def test_self_validation_window_counts_steps_of_the_flow_schedule(family, clip_tokenizer_dir):
    """With t' projected steps, exactly the first t' + 1 calls of the pipeline's own 50-step flow schedule
    (in the transformer's timestep units: SD 3 ``T s``, Flux ``s``) fall in the window."""
    from conftest import build_tiny_mmdit

    from erasekit.erase.safree import SAFREEProjection, resolve
    from erasekit.presets import concept_context

    pipe = build_tiny_mmdit(family, clip_tokenizer_dir)
    config = erasekit.erase.registry.get_method("safree")[0]()
    _, values = resolve(config, [CONCEPT], concept_context(pipe, [CONCEPT], config))
    hook = SAFREEProjection(pipe, {**values, "latent_reattention": False})
    unit = 1.0 if family == "flux" else 1000.0
    timesteps = FlowModel(pipe).sigmas(50)[:50] * unit   # what the pipeline passes its transformer
    for k in (0, 3, 10, 49, 50):
        end = hook.window_end(torch.tensor([float(k)]))
        assert int((timesteps > end).sum()) == min(k + 1, 50)


def test_latent_reattention_is_refused_on_mmdit(tiny_mmdit):
    """Asked for explicitly it is a ConfigError that says why; an Edit whose manifest asks for it is refused too."""
    with pytest.raises(ConfigError, match="skip"):
        erasekit.erase(tiny_mmdit, "safree", [CONCEPT], latent_reattention=True)
    edit = erasekit.erase(tiny_mmdit, "safree", [CONCEPT])
    edit.manifest["resolved"]["latent_reattention"] = True
    with pytest.raises(ConfigError, match="skip"):
        with edit.sampled(tiny_mmdit):
            pass
