"""The canvas judge: one small CNN with a style head and an object head, and its recipe.

It plays the role of UnlearnCanvas' two ViT-L classifiers (metrics.md section 1.3) on canvas-mini:
UA/IRA/CRA and the attack's success check both read it. It is trained on rendered images and on
their round trip through canvas-mini's VAE, with blur, noise, colour and shift augmentation, so
that it judges generated images, not only clean renders.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from .world import OBJECTS, STYLES


class CanvasJudgeNet(nn.Module):
    """Images in [-1, 1] (N x 3 x 32 x 32) -> (style logits, object logits)."""

    def __init__(self, n_styles: int = len(STYLES), n_objects: int = len(OBJECTS), width: int = 16):
        super().__init__()
        layers, c_in = [], 3
        for c in (width, 2 * width, 4 * width):
            layers += [nn.Conv2d(c_in, c, 3, padding=1), nn.BatchNorm2d(c), nn.ReLU(inplace=True),
                       nn.Conv2d(c, c, 3, padding=1), nn.BatchNorm2d(c), nn.ReLU(inplace=True),
                       nn.MaxPool2d(2)]
            c_in = c
        self.features = nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.style_head = nn.Linear(c_in, n_styles)
        self.object_head = nn.Linear(c_in, n_objects)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.features(x)
        return self.style_head(h), self.object_head(h)


def load_judge_net(path: str | Path | None = None) -> tuple[CanvasJudgeNet, dict]:
    """The judge network in eval mode and its ``config.json`` (labels, image size); the shipped
    judge (``erasekit/assets/canvas-judge``) unless ``path`` names a trained one."""
    from .._assets import read_weights

    state, cfg, _ = read_weights("canvas-judge", "canvas judge", path, "python -m erasekit.canvas.train judge --run RUN")
    net = CanvasJudgeNet(len(cfg["styles"]), len(cfg["objects"]))
    net.load_state_dict(state)
    return net.eval(), cfg


def _augment(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    n = x.shape[0]
    # colour: per-image brightness/contrast jitter
    x = x * (1 + 0.15 * (torch.rand(n, 1, 1, 1, generator=gen) - 0.5)) + \
        0.2 * (torch.rand(n, 1, 1, 1, generator=gen) - 0.5)
    # blur half of the batch with a 3x3 binomial kernel
    k = torch.tensor([1.0, 2.0, 1.0])
    k = (k[:, None] * k[None, :] / 16).expand(3, 1, 3, 3)
    blurred = F.conv2d(F.pad(x, (1, 1, 1, 1), mode="replicate"), k, groups=3)
    pick = (torch.rand(n, 1, 1, 1, generator=gen) < 0.5).float()
    x = pick * blurred + (1 - pick) * x
    # shift by up to 2 pixels
    dx, dy = (int(v) for v in torch.randint(-2, 3, (2,), generator=gen))
    x = torch.roll(x, shifts=(dy, dx), dims=(2, 3))
    return x + 0.08 * torch.rand(n, 1, 1, 1, generator=gen) * torch.randn(x.shape, generator=gen)


def train_judge(run: Path, steps: int, batch: int, lr: float, seed: int, ckpt_every: int) -> CanvasJudgeNet:
    from .._io import save_tensors
    from .data import load_or_build
    from .train import _load_vae, _to_tensor

    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    data = load_or_build(run / "train.npz", per_cell=100)
    x_clean = _to_tensor(data.images)
    vae_path = run / "vae.ckpt.safetensors"
    x_rec = None
    if vae_path.exists():  # judge VAE round trips too, so generated images are in distribution
        vae = _load_vae(run)
        with torch.no_grad():
            x_rec = torch.cat([vae.decode(vae.encode(x_clean[i:i + 500]).latent_dist.mean).sample.clamp(-1, 1)
                               for i in range(0, len(x_clean), 500)])
    y_s, y_o = torch.from_numpy(data.styles), torch.from_numpy(data.objects)
    net = CanvasJudgeNet()
    opt = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps)
    net.train()
    bar = tqdm(range(steps), desc="judge")
    for step in bar:
        idx = torch.randint(len(x_clean), (batch,), generator=gen)
        x = x_clean[idx]
        if x_rec is not None:
            use_rec = (torch.rand(batch, 1, 1, 1, generator=gen) < 0.5).float()
            x = use_rec * x_rec[idx] + (1 - use_rec) * x
        s_logit, o_logit = net(_augment(x, gen))
        loss = F.cross_entropy(s_logit, y_s[idx]) + F.cross_entropy(o_logit, y_o[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        bar.set_postfix(loss=f"{loss.item():.4f}")
    net.eval()
    out = run / "judge"
    out.mkdir(exist_ok=True)
    save_tensors(out / "model.safetensors", net.state_dict(),
                 {"styles": list(STYLES), "objects": list(OBJECTS), "image_size": 32})
    (out / "config.json").write_text(json.dumps({"styles": list(STYLES), "objects": list(OBJECTS),
                                                 "image_size": 32, "steps": steps, "seed": seed}, indent=1))
    return net


@torch.no_grad()
def accuracy_by_cell(net: CanvasJudgeNet, images: np.ndarray, objects: np.ndarray,
                     styles: np.ndarray) -> dict:
    """Style/object accuracy overall and per (object, style) cell on uint8 images."""
    from .train import _to_tensor

    net.eval()
    preds_s, preds_o = [], []
    for i in range(0, len(images), 500):
        s, o = net(_to_tensor(images[i:i + 500]))
        preds_s.append(s.argmax(1))
        preds_o.append(o.argmax(1))
    ok_s = (torch.cat(preds_s).numpy() == styles)
    ok_o = (torch.cat(preds_o).numpy() == objects)
    cells = {}
    for o in range(len(OBJECTS)):
        for s in range(len(STYLES)):
            sel = (objects == o) & (styles == s)
            cells[(OBJECTS[o], STYLES[s])] = (float(ok_s[sel].mean()), float(ok_o[sel].mean()))
    return {"style": float(ok_s.mean()), "object": float(ok_o.mean()), "cells": cells,
            "min_cell_style": min(v[0] for v in cells.values()),
            "min_cell_object": min(v[1] for v in cells.values())}
