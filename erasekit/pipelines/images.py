"""Image conversion shared by judges, feature models and attacks: one tensor form for every input.

Pipelines return PIL images, datasets hold uint8 arrays and the VAE decodes to [-1, 1] tensors;
every consumer (a judge, a CLIP, the attack's target latents) takes them through
:func:`images_to_tensor`, so they all resize and scale alike.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch


def images_to_tensor(images: Sequence, size: int, resample: str = "bicubic") -> torch.Tensor:
    """PIL images / uint8 arrays / [-1, 1] tensors -> float tensor N x 3 x size x size in [-1, 1]."""
    from PIL import Image

    if isinstance(images, torch.Tensor):
        x = images.float()
    else:
        arrs = []
        for im in images:
            if not isinstance(im, Image.Image):
                im = Image.fromarray(np.asarray(im, dtype=np.uint8))
            im = im.convert("RGB")
            if im.size != (size, size):
                im = im.resize((size, size), Image.BICUBIC if resample == "bicubic" else Image.BILINEAR)
            arrs.append(np.asarray(im))
        if not arrs:
            return torch.zeros(0, 3, size, size)
        x = torch.from_numpy(np.stack(arrs)).permute(0, 3, 1, 2).float().div(127.5).sub(1.0)
    if x.shape[-1] != size:
        x = torch.nn.functional.interpolate(x, size=(size, size), mode=resample, align_corners=False)
    return x
