"""canvas-mini-mmdit's preset provider: canvas-mini's world, read by an SD 3 transformer.

canvas-mini-mmdit (``erasekit.canvas.train_mmdit``) is trained on the same procedural world as
canvas-mini and reads it through the same text towers, so everything the canvas provider knows about
the *world* holds unchanged: the concepts and their kinds, the UnlearnCanvas captions a concept is
erased inside, UCE's caption templates and guides, SalUn's / CA's caption pairs, SFD's forget and
retain captions, Ring-A-Bell's caption pairs, MACE's rendered images and masks. The model declares
``erasekit_world: canvas-mini-mmdit`` in its text encoder's config, which selects this provider.

The *numeric* values (steps, learning rates, RECE's lam_r, ...) are canvas-mini's, carried over, not
tuned on the transformer: they are the values its benchmark block (docs/benchmark.md, "canvas-mini-mmdit")
ran with, and each Edit's manifest names this provider and records every resolved value. One value
cannot carry over: SalUn's and FMN's ``xattn`` (the UNet's cross-attention) has no MMDiT counterpart by
that name, so here they train ``esd-x``, the joint attentions' text-side projections
(:mod:`erasekit.erase.param_sets`), the parameters that read the text as ``attn2`` does in a UNet.
"""

from __future__ import annotations

from .presets import CanvasPresets


# canvas-mini's UNet parameter sets -> the MMDiT sets that play their part
PARAM_SETS = {"xattn": "esd-x"}


def _mmdit_sets(values: dict) -> dict:
    return {**values, "param_set": PARAM_SETS.get(values.get("param_set"), values.get("param_set"))}


class CanvasMmditPresets(CanvasPresets):
    """canvas-mini's world and values, under the name of the model they are served to."""

    name = "canvas-mini-mmdit"

    def salun_plan(self, ctx, name, pseudo):
        plan = super().salun_plan(ctx, name, pseudo)
        return plan and {**plan, "values": _mmdit_sets(plan["values"])}

    def fmn_preset(self, ctx, name):
        found = super().fmn_preset(ctx, name)
        return found and (found[0], _mmdit_sets(found[1]))


PROVIDER = CanvasMmditPresets()
