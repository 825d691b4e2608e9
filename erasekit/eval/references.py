"""Real images for FID: one reference image per protocol item, featurised once and cached.

On canvas protocols the references are held-out renders of the same (style, object) cells (seeds
>= 1,000,000, never used in training), the k-th seed of a cell matched with the k-th render; on
other grid protocols they come from a folder in UnlearnCanvas' dataset layout,
``<theme>/<object>/<k>.(jpg|png)`` with k = 1 .. number of seeds (metrics.md section 2: "dataset
images idx 1..5 per (theme, object)"). Missing reference files are an error, never skipped.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import torch

from ..errors import ConfigError

CANVAS_REFERENCE = "held-out canvas renders (seeds >= 1,000,000), one per (cell, seed position)"


def reference_features(s, fid_reference=None) -> tuple[np.ndarray, str] | None:
    """(N x D features aligned with the protocol's items, description), or None with a note."""
    from ..canvas.world import OBJECTS, STYLES

    p = s.protocol
    canvas = p.is_grid and set(p.themes) <= set(STYLES) and set(p.objects) <= set(OBJECTS)
    if not p.is_grid or (fid_reference is None and not canvas):
        s.notes.append("FID vs real images: not computed (no reference set; pass fid_reference=DIR laid out "
                       "<theme>/<object>/<k>.png); FID vs the original model's images is reported")
        return None
    name = CANVAS_REFERENCE if fid_reference is None else f"folder {fid_reference}"
    path = None
    if s.cache_dir is not None:
        from .runner import object_hash

        key = json.dumps({"protocol": p.to_dict(), "features": object_hash(s.space), "source": name},
                         sort_keys=True, default=str)
        path = Path(s.cache_dir) / f"reference-{hashlib.sha256(key.encode()).hexdigest()[:24]}.safetensors"
        if path.exists():
            from .._io import load_tensors

            return load_tensors(path)[0]["features"].numpy(), name
    load = _canvas_image if fid_reference is None else _folder_image(Path(fid_reference))
    runner = s.runner
    local = _features(s, [load(p, runner.items[i]) for i in runner.share])
    feats = local
    if runner.state.num_processes > 1:
        from accelerate.utils import gather_object

        feats = np.concatenate(gather_object([local]))  # shares are contiguous and in rank order
    if path is not None and runner.is_main:
        from .._io import save_tensors

        save_tensors(path, {"features": torch.from_numpy(feats)}, {"source": name})
    return feats, name


def _features(s, images: list) -> np.ndarray:
    out = [s.space(images[i:i + 256]).float().numpy() for i in range(0, len(images), 256)]
    return np.concatenate(out) if out else np.zeros((0, s.space.dim), np.float32)


def _canvas_image(p, it) -> np.ndarray:
    from ..canvas.data import HELDOUT_SEED_BASE
    from ..canvas.render import render

    k = p.seeds.index(it.seed)
    return np.asarray(render(p.objects[it.object], p.themes[it.theme], HELDOUT_SEED_BASE + k))


def _folder_image(root: Path):
    from PIL import Image

    def load(p, it) -> np.ndarray:
        k = p.seeds.index(it.seed) + 1
        base = root / p.themes[it.theme] / p.objects[it.object]
        for ext in (".jpg", ".png", ".jpeg"):
            if (base / f"{k}{ext}").exists():
                return np.asarray(Image.open(base / f"{k}{ext}").convert("RGB"))
        raise ConfigError(f"reference image {base}/{k}.jpg (or .png) is missing: FID needs one real image per "
                          f"(theme, object, seed position); the folder must be laid out <theme>/<object>/<k>.jpg")

    return load
