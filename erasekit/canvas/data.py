"""The canvas data set: rendered images with their (object, style) labels, cached as .npz."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .render import render_batch
from .world import OBJECTS, PARAPHRASES, STYLES, caption

# Seeds at or above this value are never used for training: held-out images for the judge's
# accuracy and for FID reference sets.
HELDOUT_SEED_BASE = 1_000_000


@dataclass
class CanvasSet:
    images: np.ndarray   # N x H x W x 3, uint8
    objects: np.ndarray  # N, object index
    styles: np.ndarray   # N, style index

    def __len__(self) -> int:
        return len(self.images)

    def captions(self, rng: np.random.Generator | None = None) -> list[str]:
        """One caption per image: UnlearnCanvas' template, or a random paraphrase if ``rng`` is given."""
        out = []
        for o, s in zip(self.objects, self.styles):
            template = PARAPHRASES[rng.integers(len(PARAPHRASES))] if rng is not None else PARAPHRASES[0]
            out.append(caption(OBJECTS[o], STYLES[s], template))
        return out


def build(per_cell: int, heldout: bool = False, size: int = 32) -> CanvasSet:
    """Render ``per_cell`` images of every (object, style) cell, seeded by position in the set."""
    cells = [(o, s) for o in range(len(OBJECTS)) for s in range(len(STYLES)) for _ in range(per_cell)]
    base = HELDOUT_SEED_BASE if heldout else 0
    seeds = [base + i % per_cell for i in range(len(cells))]
    images = render_batch(cells, seeds, size)
    objs, styles = (np.array(c, dtype=np.int64) for c in zip(*cells))
    return CanvasSet(images, objs, styles)


def load_or_build(path: str | Path, per_cell: int, heldout: bool = False) -> CanvasSet:
    """Cached :func:`build` (written atomically to ``path``)."""
    path = Path(path)
    if path.exists():
        z = np.load(path)
        return CanvasSet(z["images"], z["objects"], z["styles"])
    data = build(per_cell, heldout)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp.npz")
    np.savez(tmp, images=data.images, objects=data.objects, styles=data.styles)
    os.replace(tmp, path)
    return data
