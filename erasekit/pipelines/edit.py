"""The :class:`Edit`: what an erasure leaves behind, applied to and removed from stock pipelines.

An Edit holds, for the parameters a method touched, either the new weights or an exact low-rank
factorisation of the change (``W_new = W_base + U @ V``; closed-form edits have rank at most the
number of erase rows, closed-form.md), plus a manifest (method, concepts, every option, the base
model's fingerprint, erasekit version, wall time, peak memory). ``save`` writes one safetensors file
with the manifest in its header; ``load`` checks the file before anything touches a pipeline.
``apply``/``remove`` are exact inverses: ``apply`` keeps the replaced tensors and ``remove`` puts
the very same values back.
"""

from __future__ import annotations

import hashlib
import json
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import torch

from .._io import save_tensors
from ..errors import EditError

COMPONENTS = ("unet", "text_encoder", "text_encoder_2")
_U, _V = "#delta_u", "#delta_v"
_N_PROBES = 16


def _param(pipe, key: str) -> torch.nn.Parameter:
    comp, name = key.split("/", 1)
    module = getattr(pipe, comp, None)
    if module is None:
        raise EditError(f"this Edit changes {comp!r}, which the pipeline does not have "
                        f"(wrong model family?): load it onto the kind of pipeline it was made for")
    try:
        return module.get_parameter(name)
    except AttributeError:
        raise EditError(f"the pipeline's {comp} has no parameter {name!r}: this Edit was made for a "
                        "different architecture; load it onto the pipeline it was made from") from None


def fingerprint(tensors: dict[str, torch.Tensor]) -> dict:
    """Dtype-robust fingerprint of base weights: per tensor its mean, RMS and fixed probe values.

    Stored in the manifest and compared with a tolerance, so a pipeline loaded in fp16 or bf16 still
    matches the fp32 weights an Edit was made from, while any other model does not.
    """
    stats = {}
    for key in sorted(tensors):
        w = tensors[key].detach().float().flatten().cpu()
        probes = torch.linspace(0, w.numel() - 1, min(_N_PROBES, w.numel())).long()
        stats[key] = [float(w.mean()), float(w.pow(2).mean().sqrt())] + w[probes].tolist()
    digest = hashlib.sha256(json.dumps({k: [round(x, 2) for x in v[:2]] for k, v in stats.items()})
                            .encode()).hexdigest()[:16]
    return {"id": digest, "stats": stats}


def _fingerprints_match(ref: dict, now: dict) -> bool:
    if ref["stats"].keys() != now["stats"].keys():
        return False
    for key, a in ref["stats"].items():
        a, b = torch.tensor(a), torch.tensor(now["stats"][key])
        scale = max(abs(a[1].item()), 1e-8)  # RMS of the tensor
        if not torch.allclose(a, b, rtol=2e-2, atol=2e-2 * scale):
            return False
    return True


def low_rank_factors(delta: torch.Tensor, rtol: float = 1e-5) -> tuple[torch.Tensor, torch.Tensor] | None:
    """Exact factors (U, V) with ``U @ V == delta`` to ``rtol``, or None if they would not be smaller."""
    if delta.ndim != 2:
        return None
    d = delta.double()
    u, s, vh = torch.linalg.svd(d, full_matrices=False)
    if s.numel() == 0 or s[0] == 0:
        r = 1
    else:
        r = int((s > s[0] * 1e-6).sum())
    m, n = d.shape
    if r * (m + n) >= m * n:
        return None
    big_u, big_v = (u[:, :r] * s[:r]), vh[:r]
    err = (big_u @ big_v - d).norm() / d.norm().clamp_min(1e-30)
    if err > rtol:
        return None
    return big_u.float(), big_v.float()


@dataclass
class Edit:
    """Named new weights (or exact low-rank deltas) for pipeline components, plus a manifest.

    ``weights`` maps ``"<component>/<parameter name>"`` (component one of ``unet``,
    ``text_encoder``, ``text_encoder_2``) to the new tensor; ``deltas`` maps the same kind of key to
    ``(U, V)`` with the new weight ``base + U @ V``.
    """

    weights: dict[str, torch.Tensor] = field(default_factory=dict)
    deltas: dict[str, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)
    manifest: dict = field(default_factory=dict)
    _backups: dict[int, dict[str, torch.Tensor]] = field(default_factory=dict, repr=False)

    # -- construction ---------------------------------------------------------------------------
    @classmethod
    def from_weights(cls, pipe, new: dict[str, torch.Tensor], manifest: dict, low_rank: bool = True) -> "Edit":
        """Build an Edit from new weights for parameters of ``pipe`` (whose current weights are the base).

        With ``low_rank``, every 2-D change whose exact factorisation is smaller is stored as factors.
        """
        if not new:
            raise EditError("an Edit must change at least one parameter")
        base = {k: _param(pipe, k).detach() for k in new}
        weights, deltas = {}, {}
        for key, w in new.items():
            if tuple(w.shape) != tuple(base[key].shape):
                raise EditError(f"new weight for {key} has shape {tuple(w.shape)}, the pipeline's has "
                                f"{tuple(base[key].shape)}")
            if not torch.isfinite(w).all():
                raise EditError(f"the new weight for {key} contains NaN or Inf; refusing to build the Edit")
            factors = low_rank_factors(w.detach().float() - base[key].float()) if low_rank else None
            if factors is not None:
                deltas[key] = factors
            else:
                weights[key] = w.detach().to(base[key].dtype).cpu().clone()
        from .. import __version__

        man = {"erasekit_version": __version__, **manifest, "fingerprint": fingerprint(base),
               "keys": sorted(new)}
        return cls(weights, deltas, man)

    @classmethod
    def from_factors(cls, pipe, factors: dict[str, tuple[torch.Tensor, torch.Tensor]], manifest: dict) -> "Edit":
        """Build an Edit from changes a method knows in factored form, ``W_new = W_base + U @ V``.

        Closed-form solvers (UCE, RECE) compute exact factors themselves, so no SVD is needed; a
        factorisation that is not smaller than the dense weight is stored as the dense new weight.
        """
        if not factors:
            raise EditError("an Edit must change at least one parameter")
        base = {k: _param(pipe, k).detach() for k in factors}
        weights, deltas = {}, {}
        for key, (u, v) in factors.items():
            shape, r = tuple(base[key].shape), u.shape[1]
            if len(shape) != 2 or (u.shape[0], v.shape[1]) != shape or v.shape[0] != r:
                raise EditError(f"factors for {key} have shapes {tuple(u.shape)} @ {tuple(v.shape)}, the "
                                f"pipeline's weight has {tuple(base[key].shape)}")
            if not (torch.isfinite(u).all() and torch.isfinite(v).all()):
                raise EditError(f"the change of {key} contains NaN or Inf; refusing to build the Edit")
            u, v = u.detach().float().cpu(), v.detach().float().cpu()
            if r * sum(shape) < shape[0] * shape[1]:
                deltas[key] = (u.clone(), v.clone())
            else:
                weights[key] = (base[key].float().cpu() + u @ v).to(base[key].dtype)
        from .. import __version__

        man = {"erasekit_version": __version__, **manifest, "fingerprint": fingerprint(base),
               "keys": sorted(factors)}
        return cls(weights, deltas, man)

    # -- application ----------------------------------------------------------------------------
    @property
    def keys(self) -> list[str]:
        return sorted(set(self.weights) | set(self.deltas))

    def check(self, pipe) -> None:
        """Raise :class:`EditError` unless this Edit fits ``pipe`` (keys, shapes, base fingerprint)."""
        params = {k: _param(pipe, k) for k in self.keys}
        for k, w in self.weights.items():
            if tuple(w.shape) != tuple(params[k].shape):
                raise EditError(f"{k}: Edit has shape {tuple(w.shape)}, pipeline {tuple(params[k].shape)}; "
                                "load this Edit onto the architecture it was made for")
        for k, (u, v) in self.deltas.items():
            if (u.shape[0], v.shape[1]) != tuple(params[k].shape):
                raise EditError(f"{k}: Edit delta has shape {(u.shape[0], v.shape[1])}, pipeline "
                                f"{tuple(params[k].shape)}")
        ref = self.manifest.get("fingerprint")
        if ref is not None:
            now = fingerprint({k: params[k] for k in self.keys})
            if not _fingerprints_match(ref, now):
                raise EditError(
                    f"this Edit was made for a different base model (fingerprint {ref['id']} vs "
                    f"{now['id']}): load it onto the pipeline it was made from")

    def new_weight(self, key: str, base: torch.Tensor) -> torch.Tensor:
        if key in self.weights:
            return self.weights[key].to(device=base.device, dtype=base.dtype)
        u, v = self.deltas[key]
        return (base.float() + u.to(base.device) @ v.to(base.device)).to(base.dtype)

    def apply(self, pipe, check: bool = True):
        """Write the edited weights into ``pipe`` in place (after :meth:`check`); returns ``pipe``."""
        if id(pipe) in self._backups:
            raise EditError("this Edit is already applied to this pipeline; remove() it first")
        if self.one_step:   # SFD: its UNet is a generator, not a denoiser
            raise EditError(f"this Edit (method {self.manifest.get('method')!r}) is a one-step generator: applied to "
                            "a multi-step pipeline it would be sampled wrongly. Build its sampler with "
                            "erasekit.pipelines.one_step_pipeline(pipe, edit) and pass that pipeline to "
                            "generate / attack / evaluate instead")
        if check:
            self.check(pipe)
        params = {k: _param(pipe, k) for k in self.keys}
        backup = {}
        with torch.no_grad():
            new = {k: self.new_weight(k, p.detach()) for k, p in params.items()}
            for k, p in params.items():
                backup[k] = p.detach().clone()
                p.copy_(new[k])
        self._backups[id(pipe)] = backup
        return pipe

    def remove(self, pipe):
        """Restore exactly the weights :meth:`apply` replaced; returns ``pipe``."""
        backup = self._backups.pop(id(pipe), None)
        if backup is None:
            raise EditError("this Edit is not applied to this pipeline; nothing to remove")
        with torch.no_grad():
            for k, w in backup.items():
                _param(pipe, k).copy_(w)
        return pipe

    @contextmanager
    def applied(self, pipe) -> Iterator:
        """``with edit.applied(pipe): ...`` runs the block on the edited pipeline, then restores it."""
        self.apply(pipe)
        try:
            yield pipe
        finally:
            self.remove(pipe)

    @property
    def one_step(self) -> bool:
        """True for a one-step generator (SFD): sample it through its own one-step pipeline."""
        from .one_step import ONE_STEP

        return self.manifest.get("sampler") == ONE_STEP

    @contextmanager
    def sampled(self, pipe) -> Iterator:
        """``with edit.sampled(pipe) as p: generate(p, ...)``: the pipeline that samples this Edit.

        A weight Edit is applied to ``pipe`` for the block and removed after it (as :meth:`applied`);
        a one-step generator (SFD) yields :func:`~erasekit.pipelines.one_step_pipeline` of ``pipe``
        and leaves ``pipe`` untouched. Evaluation and attacks use this, so both kinds run unchanged.
        """
        if self.one_step:
            from .one_step import one_step_pipeline

            yield one_step_pipeline(pipe, self)
            return
        with self.applied(pipe):
            yield pipe

    # -- files ----------------------------------------------------------------------------------
    def save(self, path: str | Path) -> Path:
        """Write one safetensors file (atomically) with the manifest in its metadata."""
        tensors = dict(self.weights)
        for k, (u, v) in self.deltas.items():
            tensors[k + _U], tensors[k + _V] = u, v
        path = Path(path)
        save_tensors(path, tensors, {"format": "erasekit.edit/1", "manifest": json.dumps(self.manifest)})
        return path

    @classmethod
    def load(cls, path: str | Path, pipe=None) -> "Edit":
        """Read an Edit file; with ``pipe``, also :meth:`check` it against that pipeline."""
        from safetensors import SafetensorError, safe_open

        path = Path(path)
        if not path.is_file():
            raise EditError(f"no Edit file at {path}: check the path (Edits are written by "
                            "`erasekit erase` or Edit.save)")
        try:
            with safe_open(str(path), framework="pt") as f:
                meta = f.metadata() or {}
                tensors = {k: f.get_tensor(k) for k in f.keys()}
        except (SafetensorError, OSError, ValueError, RuntimeError) as e:
            raise EditError(f"{path} is not a readable Edit file (truncated or corrupt: {e}); "
                            "re-create it with `erasekit erase`") from None
        if meta.get("format") != "erasekit.edit/1" or "manifest" not in meta:
            raise EditError(f"{path} is a safetensors file but not an erasekit Edit (no manifest)")
        manifest = json.loads(meta["manifest"])
        weights = {k: v for k, v in tensors.items() if not k.endswith((_U, _V))}
        deltas = {k[:-len(_U)]: (v, tensors.get(k[:-len(_U)] + _V)) for k, v in tensors.items() if k.endswith(_U)}
        missing = [k for k in manifest.get("keys", []) if k not in weights and k not in deltas]
        missing += [k + _V for k, (_, v) in deltas.items() if v is None]
        if missing:
            raise EditError(f"{path} is missing {len(missing)} tensor(s), e.g. {missing[0]!r}: the file is "
                            "incomplete; re-create it")
        edit = cls(weights, deltas, manifest)
        if pipe is not None:
            edit.check(pipe)
        return edit

    def nbytes(self) -> int:
        """Bytes of tensor data this Edit stores."""
        n = sum(w.numel() * w.element_size() for w in self.weights.values())
        return n + sum(u.numel() * u.element_size() + v.numel() * v.element_size() for u, v in self.deltas.values())

    def __repr__(self) -> str:
        m = self.manifest
        return (f"Edit(method={m.get('method')!r}, concepts={m.get('concepts')}, tensors={len(self.keys)}, "
                f"low_rank={len(self.deltas)}, bytes={self.nbytes()})")
