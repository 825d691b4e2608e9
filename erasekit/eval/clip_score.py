"""CLIP score with an open_clip model: the canvas CLIP on canvas-mini, or a model the user provides.

The score is torchmetrics' ``CLIPScore``: 100 x the cosine similarity of the image and prompt
embeddings, averaged and clipped at 0 (the "raw logits, about 30" scale of metrics.md section 2,
not the "/ 100, about 0.30" one; the scale is recorded with every value). :func:`clip_score_metric`
returns a real ``torchmetrics.multimodal.CLIPScore`` driven by an open_clip model through a small
model/processor adapter; :meth:`ClipEncoder.scores` gives the same per-image values for the
evaluation, which keeps them per image to split target and retained prompts.
"""

from __future__ import annotations

from dataclasses import dataclass
from types import SimpleNamespace
from typing import Callable, Sequence

import torch

SCALE = "100 x cosine(image, prompt) (torchmetrics CLIPScore)"


@dataclass
class ClipEncoder:
    """An open_clip model with its tokenizer and image preprocessing.

    Images (PIL, uint8 arrays, or uint8 N x 3 x H x W tensors) are resized to ``image_size``
    (bicubic), scaled to [0, 1] and normalised with ``mean``/``std``; or, when ``preprocess`` (an
    open_clip transform on PIL images) is given, passed through it.
    """

    model: torch.nn.Module
    tokenizer: Callable
    image_size: int = 224
    mean: tuple = (0.48145466, 0.4578275, 0.40821073)
    std: tuple = (0.26862954, 0.26130258, 0.27577711)
    name: str = "open_clip"
    preprocess: Callable | None = None
    batch_size: int = 256
    source: str = ""  # where the weights came from (recorded in reports)

    @classmethod
    def from_open_clip(cls, model_name: str, pretrained: str, device: str = "cpu") -> "ClipEncoder":
        """An open_clip architecture with local weights, e.g. ``("ViT-B-32", "/models/vitb32.safetensors")``."""
        import open_clip

        model, _, preprocess = open_clip.create_model_and_transforms(model_name, pretrained=pretrained,
                                                                     device=device)
        return cls(model.eval(), open_clip.get_tokenizer(model_name), name=f"open_clip {model_name}",
                   preprocess=preprocess, source=str(pretrained))

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def pixels(self, images: Sequence) -> torch.Tensor:
        """Preprocessed N x 3 x S x S float tensor."""
        from ..pipelines.images import images_to_tensor

        if isinstance(images, torch.Tensor):
            images = list(images)
        if self.preprocess is not None and images and not isinstance(images[0], torch.Tensor):
            from PIL import Image

            return torch.stack([self.preprocess(im if isinstance(im, Image.Image) else Image.fromarray(im))
                                for im in images])
        if images and isinstance(images[0], torch.Tensor):
            x = torch.stack([im.float() / 255.0 if not im.is_floating_point() else im.float() for im in images])
            x = x.mul(2).sub(1)  # [-1, 1], the form images_to_tensor takes tensors in
        else:
            x = images
        x = images_to_tensor(x, self.image_size).add(1).div(2)
        mean = torch.tensor(self.mean).view(1, 3, 1, 1)
        std = torch.tensor(self.std).view(1, 3, 1, 1)
        return (x - mean) / std

    @torch.no_grad()
    def encode_images(self, images: Sequence, normalize: bool = True) -> torch.Tensor:
        x = self.pixels(images)
        out = [self.model.encode_image(x[i:i + self.batch_size].to(self.device), normalize=normalize).float().cpu()
               for i in range(0, len(x), self.batch_size)]
        return torch.cat(out) if out else torch.zeros(0, self.embed_dim)

    @torch.no_grad()
    def encode_text(self, texts: Sequence[str], normalize: bool = True) -> torch.Tensor:
        tokens = self.tokenizer(list(texts)).to(self.device)
        return self.model.encode_text(tokens, normalize=normalize).float().cpu()

    @property
    def embed_dim(self) -> int:
        return int(self.model.text_projection.shape[-1]) if hasattr(self.model, "text_projection") else 0

    def scores(self, images: Sequence, prompts: Sequence[str]) -> torch.Tensor:
        """Per-image CLIP score, 100 x cosine(image, its prompt) (not clipped; the mean is)."""
        if len(images) != len(prompts):
            raise ValueError(f"got {len(images)} images but {len(prompts)} prompts")
        unique = sorted(set(prompts))
        text = self.encode_text(unique)
        idx = torch.tensor([unique.index(p) for p in prompts])
        return 100.0 * (self.encode_images(images) * text[idx]).sum(-1)

    def describe(self) -> dict:
        return {"model": self.name, "weights": self.source, "image_size": self.image_size,
                "embed_dim": self.embed_dim, "scale": SCALE}


class _TorchmetricsModel(torch.nn.Module):
    """What torchmetrics' CLIPScore calls on a transformers CLIPModel, answered by open_clip."""

    def __init__(self, encoder: ClipEncoder):
        super().__init__()
        self.clip = encoder.model
        self.config = SimpleNamespace()  # no text_config: open_clip tokenizers already truncate

    def get_image_features(self, pixel_values):
        return self.clip.encode_image(pixel_values)

    def get_text_features(self, input_ids, attention_mask=None):
        return self.clip.encode_text(input_ids)


class _TorchmetricsProcessor:
    def __init__(self, encoder: ClipEncoder):
        self.encoder = encoder

    def __call__(self, images=None, text=None, return_tensors="pt", padding=True):
        if images is not None:
            return {"pixel_values": self.encoder.pixels(images)}
        ids = self.encoder.tokenizer(list(text))
        return {"input_ids": ids, "attention_mask": (ids != 0).long()}


def load_canvas_clip(path=None) -> ClipEncoder:
    """The canvas CLIP (shipped, or trained at ``path``) as a :class:`ClipEncoder` (float32, eval mode)."""
    import open_clip

    from ..canvas.clip import load_clip

    model, cfg, path = load_clip(path)
    return ClipEncoder(model, open_clip.tokenize, image_size=cfg["vision_cfg"]["image_size"],
                       mean=tuple(cfg["image_mean"]), std=tuple(cfg["image_std"]), name="canvas-clip",
                       source=str(path))


def clip_score_metric(encoder: ClipEncoder | None = None, **kwargs):
    """A ``torchmetrics.multimodal.CLIPScore`` computed with ``encoder`` (default: the canvas CLIP).

    Feed it uint8 C x H x W image tensors and prompts: ``metric.update(images, prompts)``.
    """
    from torchmetrics.multimodal import CLIPScore

    if encoder is None:
        encoder = load_canvas_clip()
    return CLIPScore(model_name_or_path=lambda: (_TorchmetricsModel(encoder), _TorchmetricsProcessor(encoder)),
                     **kwargs)
