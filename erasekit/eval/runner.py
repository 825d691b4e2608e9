"""Making and judging a protocol's images, sharded across processes, with a cache for the base model.

Each process takes a contiguous share of the protocol's items (``accelerate``'s
``split_between_processes``), generates and judges it, and the per-image records (judge labels,
FID features, CLIP scores, a few thumbnails for the grids) are gathered to every process. Metrics
are then updated with each process's share and reduced by sum (torchmetrics), so one process and
several give the same counts. Records of an unedited model are cached on disk, keyed by the
protocol, the weights, the judge and the feature models, so comparing several Edits makes the
original model's images once.
"""

from __future__ import annotations

import hashlib
import json
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from ..errors import DegenerateOutputError
from .protocol import Item, Protocol

CACHE_FORMAT = "erasekit.eval-records/1"


def default_cache_dir() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "erasekit" / "eval"


@dataclass
class Records:
    """Per-image results of one model on a protocol, for the items in ``index`` (sorted)."""

    index: np.ndarray                       # global item indices
    valid: np.ndarray                       # an image was made and is finite
    preds: dict[str, np.ndarray]            # judge head -> label index (-1 when not valid)
    features: np.ndarray | None = None      # N x D FID features (NaN rows when not valid)
    clip: np.ndarray | None = None          # N CLIP scores
    thumbs: dict[int, np.ndarray] = field(default_factory=dict)  # item index -> uint8 image

    def take(self, indices) -> "Records":
        pos = np.searchsorted(self.index, np.asarray(indices, dtype=np.int64))
        sub = lambda a: None if a is None else a[pos]  # noqa: E731
        keep = set(int(i) for i in indices)
        return Records(self.index[pos], self.valid[pos], {h: p[pos] for h, p in self.preds.items()},
                       sub(self.features), sub(self.clip), {i: t for i, t in self.thumbs.items() if i in keep})

    @staticmethod
    def merge(parts: list["Records"]) -> "Records":
        parts = [p for p in parts if len(p.index)] or parts[:1]
        order = np.argsort(np.concatenate([p.index for p in parts]), kind="stable")
        cat = lambda xs: None if xs[0] is None else np.concatenate(xs)[order]  # noqa: E731
        thumbs = {k: v for p in parts for k, v in p.thumbs.items()}
        return Records(np.concatenate([p.index for p in parts])[order], cat([p.valid for p in parts]),
                       {h: cat([p.preds[h] for p in parts]) for h in parts[0].preds},
                       cat([p.features for p in parts]), cat([p.clip for p in parts]), thumbs)

    def to_tensors(self) -> dict[str, torch.Tensor]:
        t = {"index": torch.from_numpy(self.index), "valid": torch.from_numpy(self.valid.astype(np.uint8))}
        t.update({f"pred.{h}": torch.from_numpy(p) for h, p in self.preds.items()})
        if self.features is not None:
            t["features"] = torch.from_numpy(self.features)
        if self.clip is not None:
            t["clip"] = torch.from_numpy(self.clip)
        if self.thumbs:
            keys = sorted(self.thumbs)
            t["thumb_index"] = torch.tensor(keys, dtype=torch.int64)
            t["thumbs"] = torch.from_numpy(np.stack([self.thumbs[k] for k in keys]))
        return t

    @classmethod
    def from_tensors(cls, t: dict[str, torch.Tensor]) -> "Records":
        thumbs = {}
        if "thumbs" in t:
            thumbs = {int(i): a for i, a in zip(t["thumb_index"].tolist(), t["thumbs"].numpy())}
        return cls(t["index"].numpy(), t["valid"].numpy().astype(bool),
                   {k[5:]: v.numpy() for k, v in t.items() if k.startswith("pred.")},
                   t["features"].numpy() if "features" in t else None,
                   t["clip"].numpy() if "clip" in t else None, thumbs)


def weights_hash(*modules) -> str:
    """A cheap, exact-enough digest of module weights: per tensor its float64 sum, absolute sum and a
    few values (any edit of a weight changes it; computing it costs a pass over the weights)."""
    h = hashlib.sha256()
    for m in modules:
        if m is None:
            continue
        for name, p in m.state_dict().items():
            w = p.detach().reshape(-1)
            if not w.is_floating_point():
                h.update(f"{name}:{w.tolist()}".encode())
                continue
            w = w.double()
            probes = w[torch.linspace(0, max(w.numel() - 1, 0), min(8, w.numel())).long()]
            h.update(f"{name}:{w.sum().item()!r}:{w.abs().sum().item()!r}:{probes.tolist()!r}".encode())
    return h.hexdigest()[:20]


PIPELINE_MODULES = ("unet", "transformer", "text_encoder", "text_encoder_2", "text_encoder_3", "vae")
"""The components whose weights make a pipeline's images (a family lacks some: those are skipped, so a UNet
pipeline's digest is the same whether or not the MMDiT names are listed)."""


def pipeline_hash(pipe) -> str:
    """Digest of the weights of the pipeline's :data:`PIPELINE_MODULES` (the cache key of its records)."""
    return weights_hash(*(getattr(pipe, n, None) for n in PIPELINE_MODULES))


def object_hash(obj) -> str:
    """Digest of an object's torch modules (a judge's networks, a CLIP) plus its description."""
    mods = [v for v in vars(obj).values() if isinstance(v, torch.nn.Module)] if obj is not None else []
    mods += [m for v in vars(obj).values() if isinstance(v, dict) for m in v.values()
             if isinstance(m, torch.nn.Module)] if obj is not None else []
    desc = obj.describe() if hasattr(obj, "describe") else repr(type(obj))
    return hashlib.sha256((json.dumps(desc, sort_keys=True, default=str) + weights_hash(*mods)).encode()).hexdigest()[:20]


class Runner:
    """Generates, judges and featurises a protocol's images in this process's share."""

    def __init__(self, protocol: Protocol, judge, features=None, clip=None, progress: bool = True,
                 on_missing: str = "fail", image_dir: Path | None = None, cpu: bool = True):
        from accelerate import PartialState

        self.protocol, self.judge, self.features, self.clip = protocol, judge, features, clip
        self.progress, self.on_missing, self.image_dir = progress, on_missing, image_dir
        # cpu=True: under torchrun, accelerate then joins the processes with gloo on CPU
        self.state = PartialState(cpu=cpu)
        self.items = protocol.items()
        with self.state.split_between_processes(list(range(len(self.items)))) as share:
            self.share = list(share)

    @property
    def is_main(self) -> bool:
        return self.state.is_main_process

    def gather(self, local: Records) -> Records:
        from accelerate.utils import gather_object

        if self.state.num_processes == 1:
            return local
        return Records.merge(gather_object([local]))

    def records(self, pipe, keep: set[int] = frozenset(), label: str = "model", cache_dir: Path | None = None
                ) -> Records:
        """All items' records for ``pipe`` (gathered), from the cache when it has them."""
        path = self._cache_path(pipe, cache_dir) if cache_dir is not None else None
        if path is not None and path.exists():
            rec = Records.from_tensors(_load(path))
            missing = sorted(set(keep) - set(rec.thumbs))
            if missing:  # the cache lacks thumbnails a grid needs: make just those images
                rec.thumbs.update(self._run(pipe, missing, set(missing), label, judge=False).thumbs)
            return rec
        rec = self.gather(self._run(pipe, self.share, set(keep), label))
        if len(rec.valid) and not rec.valid.any():   # counted missing one by one, but nothing is left to score
            raise DegenerateOutputError(
                f"none of the {label} model's {len(rec.valid)} images could be made or used (each failed or was "
                "degenerate): the model is broken, so it is not scored")
        if path is not None and self.is_main:
            from .._io import save_tensors

            save_tensors(path, rec.to_tensors(), {"format": CACHE_FORMAT})
        return rec

    def _cache_path(self, pipe, cache_dir: Path) -> Path:
        key = {"format": CACHE_FORMAT, "protocol": self.protocol.to_dict(), "model": pipeline_hash(pipe),
               "judge": object_hash(self.judge), "features": object_hash(self.features),
               "clip": object_hash(self.clip)}
        digest = hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:24]
        return Path(cache_dir) / f"{self.protocol.name}-{digest}.safetensors"

    def _run(self, pipe, indices: list[int], keep: set[int], label: str, judge: bool = True) -> Records:
        from ..pipelines.generation import generate

        items = [self.items[i] for i in indices]
        n, heads = len(items), list(self.judge.heads)
        rec = Records(np.asarray(indices, dtype=np.int64), np.zeros(n, bool), {h: np.full(n, -1) for h in heads})
        feats, clips = [], []
        bs = self.protocol.sampling.batch_size
        for start in tqdm(range(0, n, bs), desc=f"{label} images", disable=not self.progress or n == 0):
            batch = items[start:start + bs]
            arrays = self._generate(generate, pipe, batch)
            ok = np.array([a is not None for a in arrays], dtype=bool)
            rec.valid[start:start + len(batch)] = ok
            imgs = [a for a in arrays if a is not None]
            for it, a in zip(batch, arrays):
                if a is not None and it.index in keep:
                    rec.thumbs[it.index] = a
            if self.image_dir is not None:
                self._save(batch, arrays, label)
            if not judge or not imgs:
                feats.append(np.full((len(batch), self._feature_dim()), np.nan, np.float32))
                clips.append(np.full(len(batch), np.nan, np.float32))
                continue
            pos = start + np.flatnonzero(ok)
            for h, p in self.judge.classify(imgs).items():
                rec.preds[h][pos] = p
            feats.append(self._fill(ok, self.features(imgs).float().numpy() if self.features else None))
            clips.append(self._fill(ok, self.clip.scores(imgs, [it.prompt for it, a in zip(batch, arrays)
                                                                if a is not None]).numpy()
                                    if self.clip else None))
        if self.features is not None:
            rec.features = np.concatenate(feats) if feats else np.zeros((0, self._feature_dim()), np.float32)
        if self.clip is not None:
            rec.clip = np.concatenate(clips) if clips else np.zeros(0, np.float32)
        return rec

    def _feature_dim(self) -> int:
        return self.features.dim if self.features is not None else 0

    @staticmethod
    def _fill(ok: np.ndarray, values: np.ndarray | None):
        if values is None:
            return None
        out = np.full((len(ok),) + values.shape[1:], np.nan, np.float32)
        out[ok] = values
        return out

    def _generate(self, generate, pipe, batch: list[Item]) -> list[np.ndarray | None]:
        """uint8 images of a batch; None for an image that failed or is degenerate (non-finite or one
        flat colour, :func:`~erasekit.pipelines.generation.degenerate_reason`) when they are counted;
        otherwise such an image raises :class:`~erasekit.errors.DegenerateOutputError` at once."""
        from ..pipelines.generation import degenerate_reason

        try:
            out = self._generate_by_guidance(generate, pipe, batch)
        except Exception as e:  # noqa: BLE001 - turned into a counted or raised missing image
            if self.on_missing == "fail":
                raise
            warnings.warn(f"{len(batch)} images failed to generate ({type(e).__name__}: {e}); "
                          "they are counted as missing", stacklevel=2)
            return [None] * len(batch)
        arrays = []
        for it, a in zip(batch, out):
            a = np.asarray(a, dtype=np.float32)
            reason = degenerate_reason(a)
            if reason is not None:
                if self.on_missing == "fail":
                    raise DegenerateOutputError(
                        f"the image for {it.prompt!r}, seed {it.seed} is degenerate: {reason}. The model is broken, "
                        "so it is not scored (never as erased); pass on_missing='count' to count such images as "
                        "missing")
                arrays.append(None)
            else:
                arrays.append((a.clip(0, 1) * 255).round().astype(np.uint8))
        return arrays

    def _generate_by_guidance(self, generate, pipe, batch: list[Item]) -> list:
        """The batch's images in order; items with their own guidance (prompt CSVs) are made in one call
        per guidance value."""
        import dataclasses

        out: list = [None] * len(batch)
        for g in dict.fromkeys(it.guidance for it in batch):
            pos = [i for i, it in enumerate(batch) if it.guidance == g]
            sampling = self.protocol.sampling if g is None else dataclasses.replace(self.protocol.sampling, guidance=g)
            made = generate(pipe, [batch[i].prompt for i in pos], [batch[i].seed for i in pos], sampling,
                            output_type="np", check=False)
            for i, image in zip(pos, made):
                out[i] = image
        return out

    def _save(self, batch: list[Item], arrays, label: str) -> None:
        from PIL import Image

        for it, a in zip(batch, arrays):
            if a is None:
                continue
            path = self.image_dir / label / image_name(self.protocol, it)
            path.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(a).save(path)


def image_name(protocol: Protocol, it: Item) -> str:
    """``<theme>/<object>_seed<seed>.png`` (grid protocols) or ``prompt<i>_seed<seed>.png``."""
    if protocol.is_grid:
        return f"{protocol.themes[it.theme]}/{protocol.objects[it.object]}_seed{it.seed}.png"
    return f"prompt{it.index // len(protocol.seeds):05d}_seed{it.seed}.png"


def _load(path: Path) -> dict[str, torch.Tensor]:
    from .._io import load_tensors

    tensors, meta = load_tensors(path)
    if meta.get("format") != CACHE_FORMAT:
        raise ValueError(f"{path} is not an erasekit evaluation cache")
    return tensors
