"""Judges: images in, per-concept decisions out.

The same judge decides an attack's early stop and scores the evaluation, so attack success and
unlearning accuracy mean the same thing. A judge has named heads (``style``, ``object``, or
``nudity``), each with labels; :meth:`Judge.hits` answers "does each image show this concept?".
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from ..errors import ConfigError

JUDGE_DIR = Path(__file__).resolve().parents[2] / "assets" / "canvas-judge"


def _norm(name: str) -> str:
    return name.strip().lower().replace("_", " ")


class Judge:
    """Base class: subclasses set ``heads`` and implement :meth:`classify`."""

    name = "judge"
    heads: dict[str, list[str]] = {}

    def classify(self, images: Sequence) -> dict[str, np.ndarray]:
        """Predicted label index per image for every head."""
        raise NotImplementedError

    def find(self, concept: str) -> tuple[str, int]:
        """(head, label index) of a concept name; a clear error if the judge does not know it."""
        for head, labels in self.heads.items():
            for i, label in enumerate(labels):
                if _norm(label) == _norm(concept):
                    return head, i
        known = "; ".join(f"{h}: {', '.join(v)}" for h, v in self.heads.items())
        raise ConfigError(f"the {self.name} judge does not know the concept {concept!r}; it knows {known}")

    def hits(self, images: Sequence, concept: str) -> np.ndarray:
        """Boolean per image: does the judge see ``concept`` (top-1 of its head)?"""
        head, idx = self.find(concept)
        return self.classify(images)[head] == idx

    def describe(self) -> dict:
        return {"name": self.name, "heads": {h: len(v) for h, v in self.heads.items()}}


def images_to_tensor(images: Sequence, size: int) -> torch.Tensor:
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
                im = im.resize((size, size), Image.BICUBIC)
            arrs.append(np.asarray(im))
        if not arrs:
            return torch.zeros(0, 3, size, size)
        x = torch.from_numpy(np.stack(arrs)).permute(0, 3, 1, 2).float().div(127.5).sub(1.0)
    if x.shape[-1] != size:
        x = torch.nn.functional.interpolate(x, size=(size, size), mode="bicubic", align_corners=False)
    return x


class CanvasJudge(Judge):
    """canvas-mini's style and object classifier (assets/canvas-judge)."""

    name = "canvas"

    def __init__(self, net, styles: list[str], objects: list[str], image_size: int = 32, source: str = ""):
        self.net = net.eval()
        self.heads = {"style": list(styles), "object": list(objects)}
        self.image_size = image_size
        self.source = source

    @classmethod
    def load(cls, path: str | Path = JUDGE_DIR) -> "CanvasJudge":
        from safetensors.torch import load_file

        from ..canvas.judge import CanvasJudgeNet

        path = Path(path)
        if not (path / "model.safetensors").exists():
            raise ConfigError(f"no canvas judge at {path}: it ships in assets/canvas-judge of a full checkout")
        cfg = json.loads((path / "config.json").read_text())
        net = CanvasJudgeNet(len(cfg["styles"]), len(cfg["objects"]))
        net.load_state_dict(load_file(str(path / "model.safetensors")))
        return cls(net, cfg["styles"], cfg["objects"], cfg.get("image_size", 32), str(path))

    @torch.no_grad()
    def logits(self, images: Sequence, batch_size: int = 256) -> dict[str, torch.Tensor]:
        x = images_to_tensor(images, self.image_size)
        s, o = [], []
        for i in range(0, len(x), batch_size):
            a, b = self.net(x[i:i + batch_size])
            s.append(a)
            o.append(b)
        if not s:
            return {"style": torch.zeros(0, len(self.heads["style"])),
                    "object": torch.zeros(0, len(self.heads["object"]))}
        return {"style": torch.cat(s), "object": torch.cat(o)}

    def classify(self, images: Sequence) -> dict[str, np.ndarray]:
        return {k: v.argmax(1).numpy() for k, v in self.logits(images).items()}

    def describe(self) -> dict:
        return {**super().describe(), "weights": "assets/canvas-judge", "rule": "top-1"}
