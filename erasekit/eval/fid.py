"""FID with torchmetrics' ``FrechetInceptionDistance`` and an injected feature extractor.

FID values are only comparable when made the same way (metrics.md section 2), so every value is
stored with its feature extractor, feature dimension, set sizes and image resolution. Feature
extractors:

- ``"canvas-clip"`` (default on canvas-mini): the canvas CLIP's image embedding (64-d). This is
  *not* Inception FID and is named as such in every report.
- a :class:`~erasekit.eval.clip_score.ClipEncoder`: its image embedding.
- ``("inception", weights_path)``: torchmetrics' Inception-v3 (2048-d pool features) with local
  weights (``pip install torch-fidelity``; nothing is downloaded).

The evaluation computes features once per image and feeds them through :class:`Precomputed`, so
the Frechet distance itself is always torchmetrics' (states reduced by sum across processes).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Sequence

import torch


class ClipImageFeatures(torch.nn.Module):
    """Image embeddings of a :class:`ClipEncoder` (not normalised) as an FID feature extractor."""

    def __init__(self, encoder):
        super().__init__()
        self.encoder = encoder
        self.model = encoder.model  # registered, so the weights are part of state_dict (cache keys)
        self.num_features = encoder.embed_dim

    def forward(self, images) -> torch.Tensor:
        return self.encoder.encode_images(images, normalize=False).double()


class Precomputed(torch.nn.Module):
    """Identity "extractor": ``update`` receives features computed beforehand (N x num_features)."""

    def __init__(self, num_features: int):
        super().__init__()
        self.num_features = num_features

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return features.double()


@dataclass
class FeatureSpace:
    """Which features an FID uses: an extractor module and its recorded description."""

    module: torch.nn.Module
    name: str
    dim: int

    @classmethod
    def resolve(cls, features="canvas-clip") -> "FeatureSpace":
        from .clip_score import ClipEncoder, load_canvas_clip

        if isinstance(features, FeatureSpace):
            return features
        if features == "canvas-clip":
            features = load_canvas_clip()
        if isinstance(features, ClipEncoder):
            return cls(ClipImageFeatures(features), f"{features.name} image embedding (not Inception)",
                       features.embed_dim)
        if isinstance(features, tuple) and features[0] == "inception":
            return cls(_inception(features[1]), "Inception-v3 pool3 (torchmetrics)", 2048)
        raise ValueError(f"features must be 'canvas-clip', a ClipEncoder or ('inception', weights_path), "
                         f"not {features!r}")

    def __call__(self, images: Sequence) -> torch.Tensor:
        """Features of images (PIL / uint8 arrays) as an N x dim float64 tensor."""
        if isinstance(self.module, ClipImageFeatures):
            return self.module(images)
        from ..pipelines.images import images_to_tensor

        x = images_to_tensor(images, 299).add(1).mul(127.5).round().clamp(0, 255).to(torch.uint8)
        return self.module(x).double()


def _inception(weights_path):
    from torchmetrics.image.fid import NoTrainInceptionV3

    from ..errors import MissingExtraError

    try:
        import torch_fidelity  # noqa: F401
    except ImportError as e:
        raise MissingExtraError("Inception FID needs torch-fidelity: pip install torch-fidelity") from e
    return NoTrainInceptionV3(name="inception-v3-compat", features_list=["2048"],
                              feature_extractor_weights_path=str(weights_path))


@dataclass
class FIDResult:
    value: float
    features: str
    feature_dim: int
    n_real: int
    n_fake: int
    resolution: int | None = None
    implementation: str = "torchmetrics FrechetInceptionDistance (injected features)"
    reference: str = ""

    def to_dict(self) -> dict:
        return asdict(self)


def frechet_distance(real: torch.Tensor, fake: torch.Tensor, **metric_kwargs) -> float:
    """FID between two feature sets (N x D each) with torchmetrics' implementation.

    Under ``torch.distributed`` each process passes its share; the states are summed across
    processes before the distance is computed (pass ``sync_on_compute=False`` to opt out).
    """
    from torchmetrics.image.fid import FrechetInceptionDistance

    metric = FrechetInceptionDistance(feature=Precomputed(real.shape[-1]), **metric_kwargs)
    # update even with an empty share: every process must reach the collective sync in compute()
    metric.update(real.double().reshape(-1, real.shape[-1]), real=True)
    metric.update(fake.double().reshape(-1, fake.shape[-1]), real=False)
    return float(metric.compute())


def fid_score(real_images: Sequence, fake_images: Sequence, features="canvas-clip", reference: str = "") -> FIDResult:
    """FID of ``fake_images`` against ``real_images`` (PIL images or uint8 arrays)."""
    space = FeatureSpace.resolve(features)
    real, fake = space(real_images), space(fake_images)
    size = getattr(fake_images[0], "size", None) if len(fake_images) else None
    return FIDResult(frechet_distance(real, fake), space.name, space.dim, len(real), len(fake),
                     size[0] if isinstance(size, tuple) else None, reference=reference)
