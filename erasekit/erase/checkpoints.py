"""Where training runs checkpoint, and what identifies a run.

``checkpoint_dir="auto"`` (the engine's default) puts a run's checkpoint in
``cache_dir()/runs/<key>``, the key a hash of everything that changes the result: the pipeline's
weights (:func:`pipeline_digest`), the method and its concepts (:func:`run_scope`, entered by
:func:`erasekit.erase`), the options that matter, the process count and the number of steps. Rerunning
the same command after a crash therefore finds its checkpoint; anything else that differs gets a
folder of its own. The checkpoints of a scope are deleted when the scope succeeds.
"""

from __future__ import annotations

import hashlib
import json
import os
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .._io import sweep_orphan_temps

CHECKPOINT_NAME = "checkpoint.safetensors"
AUTO = "auto"


def cache_dir() -> Path:
    """erasekit's cache folder: ``$ERASEKIT_CACHE``, else ``$XDG_CACHE_HOME/erasekit`` (``~/.cache/erasekit``)."""
    if os.environ.get("ERASEKIT_CACHE"):
        return Path(os.environ["ERASEKIT_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "erasekit"


# -- the run a Trainer belongs to (for the automatic checkpoint folder) --------------------------
@dataclass
class _Run:
    identity: dict
    checkpoints: list[Path] = field(default_factory=list)


_RUN: ContextVar[_Run | None] = ContextVar("erasekit_run", default=None)


@contextmanager
def run_scope(method: str, concepts: list[str]):
    """The erasure that the Trainers inside belong to (:func:`erasekit.erase` enters it).

    With it, ``checkpoint_dir="auto"`` is keyed by the method and concepts too; without it (a
    Trainer used directly) "auto" writes no checkpoint, since the run's identity is unknown. When
    the block succeeds, the automatic checkpoints of its Trainers are deleted (a two-stage method
    keeps its first stage's checkpoint until the whole call is done).
    """
    run = _Run({"method": method, "concepts": list(concepts)})
    token = _RUN.set(run)
    try:
        yield run
    finally:
        _RUN.reset(token)
    for path in run.checkpoints:
        _remove_checkpoint(path)


def _remove_checkpoint(path: Path) -> None:
    try:
        path.unlink(missing_ok=True)
        sweep_orphan_temps(path)
        path.parent.rmdir()
    except OSError:  # not empty (another file of the user's), or already gone
        pass


def digest(tensors: dict[str, torch.Tensor]) -> str:
    """An exact, cheap identity of named tensors: dtype, shape, the integer sum of their bits and probes.

    Integer sums are exact and order-free, so the digest is the same on any thread count and device.
    """
    h = hashlib.sha256()
    for key in sorted(tensors):
        t = tensors[key].detach()
        bits = {2: torch.int16, 4: torch.int32, 8: torch.int64}.get(t.element_size()) if t.is_floating_point() else None
        flat = (t.contiguous().view(bits) if bits is not None else t).flatten()
        probes = flat[torch.linspace(0, max(flat.numel() - 1, 0), min(16, flat.numel())).long()]
        total = int(flat.sum(dtype=torch.int64)) if flat.numel() else 0
        h.update(json.dumps([key, str(t.dtype), list(t.shape), total, probes.tolist()]).encode())
    return h.hexdigest()[:32]


def pipeline_digest(pipe) -> str:
    """:func:`digest` of every weight and buffer of the pipeline's models, plus its scheduler's config."""
    tensors = {f"{name}/{k}": v for name, comp in sorted(pipe.components.items())
               if isinstance(comp, torch.nn.Module) for k, v in comp.state_dict().items()}
    scheduler = getattr(pipe, "scheduler", None)
    sched = json.dumps(dict(getattr(scheduler, "config", {}) or {}), sort_keys=True, default=str)
    return hashlib.sha256((digest(tensors) + sched).encode()).hexdigest()[:32]


def auto_checkpoint_path(signature: str, steps: int) -> Path | None:
    """The automatic checkpoint of a run with this signature and length, or None outside :func:`run_scope`."""
    if current_run() is None:
        return None
    key = hashlib.sha256(f"{signature}/{steps}".encode()).hexdigest()[:24]
    return cache_dir() / "runs" / key / CHECKPOINT_NAME


def current_run():
    """The :func:`run_scope` being run (its ``identity`` and ``checkpoints``), or None."""
    return _RUN.get()

