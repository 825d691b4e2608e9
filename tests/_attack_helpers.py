"""Shared pieces of the attack tests: a judge that sees brightness, and an Edit that brightens."""

from __future__ import annotations

import numpy as np

from erasekit.eval.judges import Judge
from erasekit.pipelines import Edit


class ToneJudge(Judge):
    """Test judge: an image is 'bright' if its mean pixel exceeds ``threshold``; counts its calls and images.

    The default threshold, 255, is never exceeded: the concept never appears, so every round of an attack runs.
    """

    name = "tone"
    heads = {"tone": ["dark", "bright"]}

    def __init__(self, threshold: float = 255.0):
        self.threshold, self.calls, self.images = threshold, 0, 0

    def classify(self, images):
        self.calls += 1
        self.images += len(images)
        return {"tone": np.array([int(np.asarray(im).mean() > self.threshold) for im in images])}


def brightening_edit(pipe) -> Edit:
    """A weight Edit of ``pipe`` that every attack must apply: its first convolution scaled by 3."""
    w = pipe.unet.conv_in.weight.detach()
    return Edit.from_weights(pipe, {"unet/conv_in.weight": w * 3.0}, {"method": "test"}, low_rank=False)
