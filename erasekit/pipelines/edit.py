"""The :class:`Edit`: what an erasure leaves behind, applied to and removed from stock pipelines.

An Edit holds, for the parameters a method touched, either the new weights or an exact low-rank
factorisation of the change (``W_new = W_base + U @ V``; closed-form edits have rank at most the
number of erase rows, closed-form.md), plus a manifest (method, concepts, every option, the base
model's family and fingerprint, erasekit version, wall time, peak memory). ``save`` writes one
safetensors file with the manifest in its header. ``apply``/``remove`` are exact inverses:
``apply`` keeps the replaced tensors and ``remove`` puts the very same values back.

An Edit file is input from outside, and a broken one silently breaks the model it is applied to
(NaN weights make black images that an attack then reports as "held"). So :meth:`Edit.load` checks
everything it can before any pipeline is touched, and every problem is an
:class:`~erasekit.errors.EditError` naming it (:meth:`Edit.validate`, :mod:`.edit_checks`):

- the manifest is a JSON object whose known fields have their types; ``keys``, ``family`` and
  ``fingerprint`` are present; a one-step generator gives its timestep; an inference-time Edit (SLD,
  SAFREE: ``"sampler"`` names a registered sampler, :mod:`.inference`) has no tensors and empty ``keys``;
- every tensor key is ``<component>/<parameter>`` with the component one of :data:`COMPONENTS`
  (never the VAE or anything else), and within the components its method declares
  (:func:`declare_components`, which the method registry calls);
- the tensors are exactly those the manifest lists, floating point and finite; the factors of a
  low-rank delta have matching inner dimensions.

Against a pipeline (:meth:`Edit.check`, run by ``load(path, pipe)`` and by every ``apply``) the
parameters must exist with the same shapes, and the base model must match: same family (sd1, sd2,
sdxl) and same weight fingerprint. ``unsafe_skip_base_check=True`` skips only the family and
fingerprint comparison, for users who know the Edit fits a model it was not made from (a
fine-tuned copy, say); it warns every time (:class:`BaseCheckSkippedWarning`). ``apply`` also
checks that the weights it is about to write are finite (a float16 pipeline can overflow) before it
writes any.

Threads: ``apply``, ``remove``, ``with edit.applied(pipe)`` and ``edit.sampled(pipe)`` take the
pipeline's lock (:mod:`erasekit.pipelines.locking`), the blocks for their whole duration, and so
does :func:`~erasekit.pipelines.generate`: no other thread samples a pipeline while an Edit is on it.
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
from .edit_checks import (COMPONENTS, OPT_OUT, RECREATE, BaseCheckSkippedWarning, check_contents,  # noqa: F401
                          check_manifest, declare_components, declared_components, fingerprints_match,
                          split_key, undeclared_keys, warn_skipped)  # (re-exported: the Edit's public API)
from .family import detect_family
from .locking import applied_edits, pipeline_lock

FORMAT = "erasekit.edit/1"
_U, _V = "#delta_u", "#delta_v"
_N_PROBES = 16


def _param(pipe, key: str) -> torch.nn.Parameter:
    comp, name = split_key(key)
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


def low_rank_factors(delta: torch.Tensor, rtol: float = 1e-5) -> tuple[torch.Tensor, torch.Tensor] | None:
    """Exact factors (U, V) with ``U @ V == delta`` to ``rtol``, or None if they would not be smaller.

    The numerical rank is numpy's ``matrix_rank`` rule for the delta's dtype: singular values above
    ``max(m, n) * eps(dtype) * s_max`` count (below that they are the rounding of the difference
    itself). The factors are then kept only if they reproduce the delta to ``rtol`` (relative
    Frobenius norm) and take less storage than the dense matrix.
    """
    if delta.ndim != 2:
        return None
    d = delta.double()
    u, s, vh = torch.linalg.svd(d, full_matrices=False)
    m, n = d.shape
    eps = torch.finfo(delta.dtype if delta.is_floating_point() else torch.float32).eps
    if s.numel() == 0 or s[0] == 0:
        r = 1
    else:
        r = max(1, int((s > max(m, n) * eps * s[0]).sum()))
    if r * (m + n) >= m * n:
        return None
    big_u, big_v = (u[:, :r] * s[:r]), vh[:r]
    err = (big_u @ big_v - d).norm() / d.norm().clamp_min(1e-30)
    if err > rtol:
        return None
    return big_u.float(), big_v.float()


@dataclass(eq=False)
class Edit:
    """Named new weights (or exact low-rank deltas) for pipeline components, plus a manifest.

    ``weights`` maps ``"<component>/<parameter name>"`` (component one of
    :data:`COMPONENTS`: ``unet`` or ``transformer``, ``text_encoder``, ``text_encoder_2``, ``text_encoder_3``) to the new tensor; ``deltas`` maps the same kind of key to
    ``(U, V)`` with the new weight ``base + U @ V``. ``unsafe_skip_base_check`` skips the family and
    fingerprint comparison of every check (module docstring); it warns each time.
    """

    weights: dict[str, torch.Tensor] = field(default_factory=dict)
    deltas: dict[str, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)
    manifest: dict = field(default_factory=dict)
    unsafe_skip_base_check: bool = field(default=False, repr=False)
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
        return cls(weights, deltas, _manifest(pipe, manifest, base))

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
        return cls(weights, deltas, _manifest(pipe, manifest, base))

    @classmethod
    def inference(cls, pipe, sampler: str, manifest: dict) -> "Edit":
        """An inference-time Edit (no tensors) that samples ``pipe`` with the registered ``sampler``
        (:mod:`erasekit.pipelines.inference`); the manifest records family and an empty fingerprint."""
        from .inference import is_inference_sampler

        if not is_inference_sampler(sampler):
            raise EditError(f"sampler {sampler!r} is not an inference-time sampler name")
        return cls({}, {}, _manifest(pipe, {**manifest, "sampler": sampler}, {}))

    # -- checks ---------------------------------------------------------------------------------
    @property
    def keys(self) -> list[str]:
        return sorted(set(self.weights) | set(self.deltas))

    def _skip(self, unsafe_skip_base_check: bool | None) -> bool:
        return self.unsafe_skip_base_check if unsafe_skip_base_check is None else bool(unsafe_skip_base_check)

    def validate(self, *, unsafe_skip_base_check: bool | None = None) -> None:
        """Raise :class:`EditError` unless this Edit is well formed (module docstring), pipeline or not.

        ``unsafe_skip_base_check`` (None: the Edit's own) lets the family and fingerprint be missing.
        """
        check_manifest(self.manifest, self._skip(unsafe_skip_base_check))
        check_contents(self.weights, self.deltas, self.manifest)

    def check(self, pipe, *, unsafe_skip_base_check: bool | None = None) -> None:
        """Raise :class:`EditError` unless this Edit is valid and fits ``pipe`` (parameters, shapes, and,
        unless skipped, family and base fingerprint). ``unsafe_skip_base_check`` None: the Edit's own."""
        skip = self._skip(unsafe_skip_base_check)
        self.validate(unsafe_skip_base_check=skip)
        if skip:
            warn_skipped(self.manifest)
        else:
            made_for, here = self.manifest["family"], detect_family(pipe)
            if made_for != here:
                raise EditError(f"this Edit was made for an {made_for} model and this pipeline is {here}: load it "
                                f"onto the pipeline it was made from{OPT_OUT}")
        params = {k: _param(pipe, k) for k in self.keys}
        for k, w in self.weights.items():
            if tuple(w.shape) != tuple(params[k].shape):
                raise EditError(f"{k}: Edit has shape {tuple(w.shape)}, pipeline {tuple(params[k].shape)}; "
                                "load this Edit onto the architecture it was made for")
        for k, (u, v) in self.deltas.items():
            if (u.shape[0], v.shape[1]) != tuple(params[k].shape):
                raise EditError(f"{k}: Edit delta has shape {(u.shape[0], v.shape[1])}, pipeline "
                                f"{tuple(params[k].shape)}")
        if self.one_step:
            steps = int(pipe.scheduler.config.num_train_timesteps)
            if not self.manifest["generator_timestep"] < steps:
                raise EditError(f"the one-step generator's timestep {self.manifest['generator_timestep']} is outside "
                                f"this pipeline's schedule (1..{steps - 1})")
        if not skip:
            ref, now = self.manifest["fingerprint"], fingerprint({k: params[k] for k in self.keys})
            if not fingerprints_match(ref, now):
                from .merged import already_edited

                edited = already_edited(pipe)
                if edited:   # a folder written by Edit.merge: its weights carry an erasure already
                    raise EditError(f"{edited}, so it no longer has the weights this Edit (method "
                                    f"{self.manifest.get('method')!r}) was made for: apply it to the base model "
                                    f"instead{OPT_OUT}")
                raise EditError(
                    f"this Edit was made for a different base model (fingerprint {ref['id']} vs "
                    f"{now['id']}): load it onto the pipeline it was made from{OPT_OUT}")

    # -- application ----------------------------------------------------------------------------
    def new_weight(self, key: str, base: torch.Tensor) -> torch.Tensor:
        if key in self.weights:
            return self.weights[key].to(device=base.device, dtype=base.dtype)
        u, v = self.deltas[key]
        return (base.float() + u.to(base.device) @ v.to(base.device)).to(base.dtype)

    def apply(self, pipe, *, unsafe_skip_base_check: bool | None = None):
        """Write the edited weights into ``pipe`` in place (after :meth:`check`); returns ``pipe``.

        Nothing is written unless every new weight is finite; takes the pipeline's lock.
        """
        with pipeline_lock(pipe):
            if id(pipe) in self._backups:
                raise EditError("this Edit is already applied to this pipeline; remove() it first")
            if self.inference_time:   # SLD, SAFREE: a way of sampling (plus weights, if any)
                raise EditError(f"this Edit (method {self.manifest.get('method')!r}) changes how the pipeline samples "
                                "(an inference-time sampler), which applying weights cannot do. Sample it with "
                                "`with edit.sampled(pipe) as p: generate(p, ...)` (evaluate and attack do this)")
            if self.one_step:   # SFD: its UNet is a generator, not a denoiser
                raise EditError(f"this Edit (method {self.manifest.get('method')!r}) is a one-step generator: applied "
                                "to a multi-step pipeline it would be sampled wrongly. Build its sampler with "
                                "erasekit.pipelines.one_step_pipeline(pipe, edit) and pass that pipeline to "
                                "generate / attack / evaluate instead")
            self._write(pipe, unsafe_skip_base_check)
        return pipe

    def _write(self, pipe, unsafe_skip_base_check: bool | None) -> None:
        """:meth:`apply` after its refusals: check, then write every weight (with a backup), under the lock."""
        with pipeline_lock(pipe):
            self.check(pipe, unsafe_skip_base_check=unsafe_skip_base_check)
            params = {k: _param(pipe, k) for k in self.keys}
            backup = {}
            with torch.no_grad():
                new = {k: self.new_weight(k, p.detach()) for k, p in params.items()}
                broken = [k for k, w in new.items() if not torch.isfinite(w).all()]
                if broken:
                    raise EditError(f"applied to this pipeline ({str(params[broken[0]].dtype).replace('torch.', '')}), "
                                    f"this Edit makes {broken[0]} NaN or Inf (overflow): nothing was changed; load "
                                    "the pipeline in float32")
                try:
                    for k, p in params.items():
                        backup[k] = p.detach().clone()
                        p.copy_(new[k])
                except BaseException:
                    for k, w in backup.items():
                        params[k].copy_(w)
                    raise
            self._backups[id(pipe)] = backup
            applied_edits(pipe).append(self)

    def remove(self, pipe):
        """Restore exactly the weights :meth:`apply` replaced; returns ``pipe``.

        Edits come off in the reverse order they went on where they change the same weights.
        """
        with pipeline_lock(pipe):
            backup = self._backups.get(id(pipe))
            if backup is None:
                raise EditError("this Edit is not applied to this pipeline; nothing to remove")
            stack = applied_edits(pipe)
            at = next((i for i, e in enumerate(stack) if e is self), len(stack))
            later = [k for e in stack[at + 1:] for k in e.keys if k in backup]
            if later:
                raise EditError(f"another Edit applied after this one also changes {later[0]}: remove that one first "
                                "(Edits come off in the reverse order they went on)")
            del self._backups[id(pipe)]
            del stack[at:at + 1]
            with torch.no_grad():
                for k, w in backup.items():
                    _param(pipe, k).copy_(w)
        return pipe

    @contextmanager
    def applied(self, pipe, *, unsafe_skip_base_check: bool | None = None) -> Iterator:
        """``with edit.applied(pipe): ...`` runs the block on the edited pipeline, then restores it.

        Holds the pipeline's lock for the whole block: other threads' generation on ``pipe`` waits.
        """
        with pipeline_lock(pipe):
            self.apply(pipe, unsafe_skip_base_check=unsafe_skip_base_check)
            try:
                yield pipe
            finally:
                self.remove(pipe)

    @contextmanager
    def removed(self, pipe) -> Iterator:
        """``with edit.removed(pipe): ...`` runs the block on the original weights of a pipeline this Edit is
        on (applied, or inside :meth:`sampled`), then writes the Edit's weights back (P4D's original-model
        predictions). Holds the pipeline's lock for the block."""
        with pipeline_lock(pipe):
            self.remove(pipe)
            try:
                yield pipe
            finally:
                self._write(pipe, None)

    @property
    def one_step(self) -> bool:
        """True for a one-step generator (SFD): sample it through its own one-step pipeline."""
        from .one_step import ONE_STEP

        return self.manifest.get("sampler") == ONE_STEP

    @property
    def inference_time(self) -> bool:
        """True for an inference-time Edit (SLD, SAFREE): no weights; sample it with :meth:`sampled`."""
        from .inference import is_inference_sampler

        return is_inference_sampler(self.manifest.get("sampler"))

    @contextmanager
    def sampled(self, pipe) -> Iterator:
        """``with edit.sampled(pipe) as p: generate(p, ...)``: the pipeline that samples this Edit.

        A weight Edit is applied to ``pipe`` for the block and removed after it (as :meth:`applied`);
        a one-step generator (SFD) yields :func:`~erasekit.pipelines.one_step_pipeline` of ``pipe``
        and leaves ``pipe`` untouched. Evaluation and attacks use this, so both kinds run unchanged.
        An inference-time Edit (``manifest["sampler"]`` names a registered sampler,
        :mod:`erasekit.pipelines.inference`; SLD and SAFREE hold no tensors) is checked against ``pipe``,
        its weights (if any) are applied, and its sampler hooks ``pipe``, all for the block only.
        Either way the pipeline's lock is held for the block.
        """
        if self.inference_time:
            from .inference import sampler_factory

            factory = sampler_factory(self.manifest["sampler"], self.manifest.get("method"))
            with pipeline_lock(pipe):
                if id(pipe) in self._backups:
                    raise EditError("this Edit is already applied to this pipeline; remove() it first")
                self._write(pipe, None)   # its weights, if it has any (none for SLD, SAFREE)
                try:
                    with factory(pipe, self) as sampler:
                        yield sampler
                finally:
                    self.remove(pipe)
            return
        if self.one_step:
            from .one_step import one_step_pipeline

            with pipeline_lock(pipe):
                yield one_step_pipeline(pipe, self)
            return
        with self.applied(pipe):
            yield pipe

    # -- files ----------------------------------------------------------------------------------
    def save(self, path: str | Path) -> Path:
        """Write one safetensors file (atomically) with the manifest in its metadata (after :meth:`validate`)."""
        self.validate()
        tensors = dict(self.weights)
        for k, (u, v) in self.deltas.items():
            tensors[k + _U], tensors[k + _V] = u, v
        path = Path(path)
        save_tensors(path, tensors, {"format": FORMAT, "manifest": json.dumps(self.manifest)})
        return path

    @classmethod
    def load(cls, path: str | Path, pipe=None, *, unsafe_skip_base_check: bool = False) -> "Edit":
        """Read an Edit file and :meth:`validate` it; with ``pipe``, also :meth:`check` it against that pipeline.

        ``unsafe_skip_base_check=True`` accepts an Edit whose family or fingerprint is missing or does not
        match (it warns; module docstring). Every problem with the file is an :class:`EditError`.
        """
        path = Path(path)
        if not path.is_file():
            where = f"{path} is a folder, not an Edit file" if path.is_dir() else f"no Edit file at {path}"
            raise EditError(f"{where}: check the path (Edits are written by `erasekit erase` or Edit.save)")
        if path.stat().st_size == 0:
            raise EditError(f"{path} is empty, not an Edit file; {RECREATE}")
        tensors, meta = _read(path)
        if meta.get("format") != FORMAT or "manifest" not in meta:
            raise EditError(f"{path} is a safetensors file but not an erasekit Edit (no manifest in its header): "
                            "give a file written by `erasekit erase` or Edit.save")
        try:
            manifest = json.loads(meta["manifest"])
        except ValueError as e:
            raise EditError(f"{path}: the Edit's manifest is not valid JSON ({e}): the file was altered or is "
                            f"corrupt; {RECREATE}") from None
        us = {k[:-len(_U)]: t for k, t in tensors.items() if k.endswith(_U)}
        vs = {k[:-len(_V)]: t for k, t in tensors.items() if k.endswith(_V)}
        half = sorted(set(us) ^ set(vs))
        if half:
            has = "U" if half[0] in us else "V"
            raise EditError(f"{path}: the low-rank delta of {half[0]} has only its {has} factor: the file is "
                            f"incomplete; {RECREATE}")
        weights = {k: t for k, t in tensors.items() if not k.endswith((_U, _V))}
        edit = cls(weights, {k: (us[k], vs[k]) for k in us}, manifest,
                   unsafe_skip_base_check=bool(unsafe_skip_base_check))
        try:
            edit.validate()
            if pipe is not None:
                edit.check(pipe)
            elif edit.unsafe_skip_base_check:
                warn_skipped(manifest)
        except EditError as e:
            raise EditError(f"{path}: {e}") from None
        return edit

    # -- export (erasekit.pipelines.lora, .merged)---------------------------------------------------
    def to_lora(self, path: str | Path, pipe=None, *, rank: int | None = None, rtol: float | None = None,
                drop_unsupported: bool = False):
        """Write this Edit as a LoRA file for diffusers' ``load_lora_weights``; see
        :func:`erasekit.pipelines.lora.to_lora` (``rtol`` None: its default). Returns a ``LoraExport``."""
        from .lora import DEFAULT_RTOL, to_lora

        return to_lora(self, path, pipe, rank=rank, rtol=DEFAULT_RTOL if rtol is None else rtol,
                       drop_unsupported=drop_unsupported)

    def merge(self, pipe, out_dir: str | Path, evaluation: str | Path | None = None, overwrite: bool = False) -> Path:
        """Save ``pipe`` with this Edit merged in, a model card and the manifest, as a diffusers folder;
        see :func:`erasekit.pipelines.merged.merge`. ``pipe`` is left unchanged."""
        from .merged import merge

        return merge(self, pipe, out_dir, evaluation=evaluation, overwrite=overwrite)

    def nbytes(self) -> int:
        """Bytes of tensor data this Edit stores."""
        n = sum(w.numel() * w.element_size() for w in self.weights.values())
        return n + sum(u.numel() * u.element_size() + v.numel() * v.element_size() for u, v in self.deltas.values())

    def __repr__(self) -> str:
        m = self.manifest
        return (f"Edit(method={m.get('method')!r}, concepts={m.get('concepts')}, tensors={len(self.keys)}, "
                f"low_rank={len(self.deltas)}, bytes={self.nbytes()})")


def _manifest(pipe, manifest: dict, base: dict[str, torch.Tensor]) -> dict:
    """The manifest of a new Edit of ``pipe``: the method's fields plus version, family, fingerprint, keys."""
    from .. import __version__
    from .merged import merged_provenance

    edited = merged_provenance(pipe)   # erasing from a merged folder: record the erasure it already carries
    before = {} if edited is None else {"base_edited_by": {k: edited.get(k) for k in ("method", "concepts", "folder")}}
    return {"erasekit_version": __version__, **manifest, **before, "family": detect_family(pipe),
            "fingerprint": fingerprint(base), "keys": sorted(base)}


def _read(path: Path) -> tuple[dict[str, torch.Tensor], dict]:
    """Every tensor and the header metadata of a safetensors file; any failure is an :class:`EditError`."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:  # noqa: BLE001 -- whatever the parser raises, the file is not a readable Edit
        raise EditError(f"{path} is not a readable Edit file (truncated or corrupt: {' '.join(str(e).split())[:200]}); "
                        f"{RECREATE}") from None
    return tensors, meta
