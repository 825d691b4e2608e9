"""Shared pieces of the evaluation tests: a hand-made judge, a tiny protocol, a stand-in pipeline."""

from __future__ import annotations

import numpy as np
import torch

from erasekit.eval.judges import Judge
from erasekit.eval.protocol import Protocol
from erasekit.pipelines import Sampling


class ColourJudge(Judge):
    """Style: Cubism when red outweighs blue, else Mosaic; object: Cats when brighter than mid-grey."""

    name = "colour"
    heads = {"style": ["Cubism", "Mosaic"], "object": ["Cats", "Trees"]}

    def classify(self, images):
        x = np.stack([np.asarray(im, dtype=np.float32) for im in images])
        return {"style": (x[..., 0].mean((1, 2)) <= x[..., 2].mean((1, 2))).astype(np.int64),
                "object": (x.mean((1, 2, 3)) <= 127).astype(np.int64)}


class ParityJudge(ColourJudge):
    """Labels from the parity of the pixel sum: any change of any pixel can flip them, so equal
    counts mean bit-identical images."""

    name = "parity"

    def classify(self, images):
        total = np.array([int(np.asarray(im, dtype=np.int64).sum()) for im in images])
        return {"style": total % 2, "object": (total // 2) % 2}


def tiny_protocol(seeds=(0, 1, 2), batch_size: int = 4, **kw) -> Protocol:
    return Protocol("tiny", themes=("Cubism", "Mosaic"), objects=("Cats", "Trees"), seeds=tuple(seeds),
                    sampling=Sampling("ddim", 2, 7.5, batch_size=batch_size), model="tiny", **kw)


class _Weights(torch.nn.Module):
    dtype = torch.float32

    def __init__(self, value: float):
        super().__init__()
        self.w = torch.nn.Parameter(torch.tensor([value]))


class PaintPipe:
    """A one-step "pipeline" (the hook SFD's generators use) that paints each image from its prompt:
    red for Cubism, blue for Mosaic; bright for Cats, dark for Trees, with a zero-mean checkerboard
    texture (a flat colour is what a broken model makes, and generation refuses it). ``broken`` seeds
    give NaN; ``weight`` is its one (unused) parameter, which tells two painters apart."""

    def __init__(self, broken=(), weight: float = 1.0):
        self.unet = _Weights(weight)
        self.broken = set(broken)

    def erasekit_generate(self, prompts, seeds, sampling, progress=False, output_type="np"):
        out = []
        for p, s in zip(prompts, seeds):
            level = 0.8 if "Cats" in p else 0.2
            img = np.full((8, 8, 3), level, np.float32)
            img[..., 0 if "Cubism" in p else 2] += 0.15
            img += np.where(np.indices((8, 8)).sum(0) % 2 == 0, 0.04, -0.04)[..., None].astype(np.float32)
            out.append(np.full_like(img, np.nan) if s in self.broken else img)
        return out
