"""The fine-tuning engine shared by ESD, SalUn, AdvUnlearn and SFD: one loop on ``accelerate``.

A method names the parameters it trains, writes a loss for one micro-step, and gets an
:class:`~erasekit.Edit` holding only the trained weights; the pipeline's weights are left exactly
as they were found (on success and on error)::

    from erasekit.erase.engine import TrainConfig, Trainer
    from erasekit.erase.param_sets import select_params

    @dataclass
    class MyConfig(TrainConfig):          # inherits steps, lr, mixed_precision, checkpointing, ...
        param_set: str = "esd-x"

    def my_method(pipe, concepts, config):
        with Trainer(pipe, select_params(pipe, config.param_set), config, steps=200, lr=1e-5) as tr:
            def loss_fn(i: int) -> torch.Tensor:              # i: this process's micro-step index
                noise = torch.randn(shape, generator=tr.rng).to(tr.device)   # seeded by (seed, rank, i)
                target = tr.frozen(pipe.unet, x_t, t, **kw).sample          # ORIGINAL weights
                return F.mse_loss(pipe.unet(x_t, t, **kw).sample, target)
            return tr.fit(loss_fn, manifest={"preset": "..."})

A method that trains networks of its own (SFD's generator and fake score, copies of the UNet) gives
them with their optimizers and drives each iteration itself; the engine still owns the loop,
precision, seeding, checkpoints and resume::

    with Trainer(pipe, {}, config, steps=n, networks={"G": gen, "psi": psi},
                 optimizers={"G": opt_g, "psi": opt_psi}) as tr:
        tr.run(lambda step: {"loss_psi": tr.update("psi", loss_psi(...)), ...})

What the engine does, so methods do not:

- **Trainable subset.** Only the given parameters get ``requires_grad`` and optimizer state; every
  other flag is restored afterwards. Half-precision trained weights are trained as fp32 master
  copies (mixed precision required) and cast back into the Edit.
- **A frozen model without a second UNet.** :meth:`Trainer.frozen` runs a module with the original
  values of the trained parameters through ``torch.func.functional_call``; the untrained parameters
  are shared, so "the frozen copy" costs only the trained subset (for ESD-x a few MB instead of a
  second 3.4 GB SD UNet). The same originals restore the pipeline at the end.
- **Masked updates** (:meth:`Trainer.set_mask`): gradients are multiplied by a bool mask before the
  step and, after it, ``theta = where(mask, theta, theta_o)`` is re-applied, so weights outside the
  mask stay bitwise unchanged whatever the optimizer (AdamW's decoupled weight decay included).
- **Mixed precision** (``bf16``; ``fp16`` on GPUs with loss scaling) through the Accelerator's
  autocast, **gradient checkpointing** of the components being trained (and of ``grad_through``,
  frozen components that gradients flow through), **gradient accumulation**.
- **Seeded randomness.** Before micro-step ``i`` the generator :attr:`Trainer.rng` and the global
  torch RNG (forked, so the caller's state is untouched) are seeded from ``(seed, stage, rank, i)``:
  a step's randomness depends on nothing else, so resuming needs no RNG state and is exact.
  ``stream_rng=True`` instead seeds :attr:`Trainer.rng` once with ``seed + rank`` and carries its
  state through the run and its checkpoints (SFD draws from one stream, as its reference does).
- **Several processes** (``accelerate launch`` / ``torchrun``): each process draws its own samples;
  gradients are averaged with one all-reduce per optimizer step, so every rank takes identical steps.
  Load the pipeline on :func:`process_device` in each process.
- **Checkpoints, on by default.** Every ``checkpoint_every`` steps (default: every 10 % of the run's
  steps, and at its last step) one safetensors file (trained weights, optimizer states, step, the
  RNG stream if any, state the method hands over with :meth:`Trainer.carry`, a signature of the
  run) is written atomically to ``checkpoint_dir``; a run with the same signature resumes from it,
  exactly. ``checkpoint_dir="auto"`` (the default) is a folder of the run cache
  (:func:`~erasekit.erase.checkpoints.cache_dir` ``/runs/<key>``) keyed by everything that changes
  the result: the pipeline's weights, the method and its concepts, every option but the ones that
  only say how the run is carried out, the number of processes and steps. Runs started by
  :func:`erasekit.erase` (and ``erasekit erase``) use it, so a killed run resumes by running the
  same command again; the automatic checkpoints are deleted when that call succeeds. ``None`` turns
  checkpoints off; a folder you name is kept after the run (a later run with more ``steps``
  continues it). A non-finite loss stops the run with :class:`TrainingError` and leaves the last
  good checkpoint in place.
- A tqdm bar with the running loss (main process only).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import warnings
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from .._io import load_optimizer_tensors, load_tensors, optimizer_tensors, save_tensors
from ..errors import ConfigError, TrainingError
from .checkpoints import (AUTO, CHECKPOINT_NAME, auto_checkpoint_path, cache_dir, current_run,  # noqa: F401
                          digest, pipeline_digest, run_scope)
from .registry import MethodConfig, check

COMPONENTS = ("unet", "transformer", "text_encoder", "text_encoder_2", "text_encoder_3")   # transformer: SD 3, Flux
CHECKPOINT_FORMAT = "erasekit.checkpoint/2"
AUTO_CHECKPOINTS = 10  # checkpoint_every=None saves about this many times per run
# Options that change how a run is carried out but not what it computes (left out of the signature).
_NOT_IN_SIGNATURE = {"steps", "checkpoint_dir", "checkpoint_every", "resume", "progress"}


def _help(text: str) -> dict:
    return {"help": text}


@dataclass
class RunConfig(MethodConfig):
    """How a training run is carried out: precision, memory, seed, checkpoints, progress.

    Shared by every training method's config; :class:`TrainConfig` adds the options of the
    one-optimizer loop (:meth:`Trainer.fit`).
    """

    mixed_precision: str = field(default="no", metadata=_help("no, bf16, or fp16 (GPU only); weights train in fp32"))
    gradient_checkpointing: bool = field(default=False, metadata=_help("recompute activations in backward"))
    seed: int = field(default=0, metadata=_help("seed of every random draw of the run"))
    checkpoint_dir: str | None = field(default=AUTO, metadata=_help(
        "folder for the resumable checkpoint; 'auto': the run cache ($ERASEKIT_CACHE or ~/.cache/erasekit, "
        "runs/<key of the run>), deleted after success; None: no checkpoints"))
    checkpoint_every: int | None = field(default=None, metadata=_help(
        f"steps between checkpoints (None: every {100 // AUTO_CHECKPOINTS} % of the steps)"))
    resume: bool = field(default=True, metadata=_help("resume from checkpoint_dir if it holds this run"))
    progress: bool = field(default=True, metadata=_help("show a progress bar with the loss"))

    def validate(self) -> None:
        check(self.mixed_precision in ("no", "bf16", "fp16"),
              f"`mixed_precision` must be 'no', 'bf16' or 'fp16' but is {self.mixed_precision!r}")
        check(self.checkpoint_every is None or self.checkpoint_every >= 1,
              f"`checkpoint_every` must be >= 1 or None but is {self.checkpoint_every}")
        check(self.checkpoint_dir is None or (isinstance(self.checkpoint_dir, (str, os.PathLike))
                                              and str(self.checkpoint_dir).strip()),
              f"`checkpoint_dir` must be a folder, 'auto' or None but is {self.checkpoint_dir!r}")


@dataclass
class TrainConfig(RunConfig):
    """Options of the engine's one-optimizer loop, shared by ESD, SalUn and AdvUnlearn (subclass it)."""

    steps: int | None = field(default=None, metadata=_help("optimizer steps (None: the method's preset)"))
    lr: float | None = field(default=None, metadata=_help("learning rate (None: the method's preset)"))
    optimizer: str = field(default="adam", metadata=_help("adam or adamw"))
    weight_decay: float = field(default=0.0, metadata=_help("weight decay (adam: coupled, adamw: decoupled)"))
    max_grad_norm: float | None = field(default=None, metadata=_help("clip the gradient norm (None: off)"))
    grad_accum: int = field(default=1, metadata=_help("micro-steps per optimizer step"))

    def validate(self) -> None:
        super().validate()
        check(self.steps is None or self.steps >= 1, f"`steps` must be >= 1 but is {self.steps}")
        check(self.lr is None or self.lr >= 0, f"`lr` must be >= 0 but is {self.lr}")
        check(self.optimizer in ("adam", "adamw"), f"`optimizer` must be 'adam' or 'adamw' but is {self.optimizer!r}")
        check(self.weight_decay >= 0, f"`weight_decay` must be >= 0 but is {self.weight_decay}")
        check(self.max_grad_norm is None or self.max_grad_norm > 0,
              f"`max_grad_norm` must be > 0 or None but is {self.max_grad_norm}")
        check(self.grad_accum >= 1, f"`grad_accum` must be >= 1 but is {self.grad_accum}")


def process_device() -> torch.device:
    """The device this process should load its pipeline on (one GPU per process under accelerate)."""
    from accelerate import PartialState

    return PartialState().device


def _accelerator(mixed_precision: str, grad_accum: int, device: torch.device):
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    # cpu=True for a CPU pipeline: accelerate then sets up gloo when torchrun starts several processes.
    kwargs = dict(mixed_precision=mixed_precision, gradient_accumulation_steps=grad_accum, cpu=device.type == "cpu")
    try:
        try:
            return Accelerator(**kwargs)
        except ValueError as e:
            if "already been initialized" not in str(e):
                raise
            # accelerate keeps one global state per process; a later run with other settings
            # re-initialises it (the process group itself is kept).
            AcceleratorState._reset_state(reset_partial_state=False)
            return Accelerator(**kwargs)
    except ValueError as e:
        raise ConfigError(f"`mixed_precision`={mixed_precision!r} is not available here ({e}); "
                          "use 'bf16' or 'no' on CPU") from None


def _derive_seed(*parts) -> int:
    digest = hashlib.blake2b(repr(parts).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


def _component(pipe, key: str) -> tuple[str, str]:
    comp, name = key.split("/", 1)
    check(comp in COMPONENTS and getattr(pipe, comp, None) is not None,
          f"trained parameter {key!r} must belong to one of the pipeline's {COMPONENTS}")
    return comp, name


def _enable_checkpointing(module) -> None:
    if hasattr(module, "enable_gradient_checkpointing"):  # diffusers models
        module.enable_gradient_checkpointing()
    elif hasattr(module, "gradient_checkpointing_enable"):  # transformers models
        module.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})


class Trainer:
    """One fine-tuning run over ``params`` (``{"<component>/<name>": Parameter}``) of ``pipe``.

    ``networks`` are trained modules of the method's own (not pipeline components, e.g. copies of
    the UNet), each stepped by ``optimizers[name]`` (a network without an optimizer, such as an EMA,
    is only carried in the checkpoints). ``grad_through`` names frozen pipeline components that
    gradients flow through (gradient checkpointing applies to them too). Use as a context manager;
    see the module docstring for the loop it runs.
    """

    def __init__(self, pipe, params: dict, config: RunConfig, *, steps: int | None = None,
                 lr: float | None = None, signature: dict | None = None, networks: dict | None = None,
                 optimizers: dict | None = None, grad_through: tuple[str, ...] = (), stream_rng: bool = False):
        self.networks = dict(networks or {})
        self._opt_specs = dict(optimizers or {})
        if not params and not self.networks:
            raise ConfigError("the parameter set selects no parameters: there is nothing to train; "
                              "choose another param_set")
        unknown = sorted(set(self._opt_specs) - set(self.networks))
        check(not unknown, f"optimizer {unknown[0] if unknown else ''!r} has no network of that name")
        self.pipe, self.config = pipe, config
        self.params = dict(sorted(params.items()))
        for key in self.params:
            _component(pipe, key)
        for comp in grad_through:
            check(comp in COMPONENTS and getattr(pipe, comp, None) is not None,
                  f"grad_through names {comp!r}, which is not one of the pipeline's {COMPONENTS}")
        self.grad_through = tuple(grad_through)
        self.steps = steps if steps is not None else getattr(config, "steps", None)
        self.lr = lr if lr is not None else getattr(config, "lr", None)
        check(self.steps is not None and self.steps >= 0, f"`steps` must be >= 1 but is {self.steps}")
        check(not self.params or (self.lr is not None and self.lr >= 0), f"`lr` must be >= 0 but is {self.lr}")
        self.signature = {k: v for k, v in (signature or config.to_dict()).items() if k not in _NOT_IN_SIGNATURE}
        self.stream_rng = stream_rng
        self.mask: dict[str, torch.Tensor] | None = None
        self.rng = torch.Generator()
        self.history: list[float] = []
        self.resumed_from: int | None = None
        self.step = 0
        self._active = False
        self._checkpointing: dict[str, bool] = {}
        self._optimizers: dict = {}   # name -> (prepared optimizer, {key: parameter} it steps)
        self._carried: dict = {}      # name -> (get, put) of a method's own state
        self._sig: str | None = None
        self._pipe_digest: str | None = None

    # -- set-up and restore -------------------------------------------------------------------------
    def __enter__(self) -> "Trainer":
        first = next(iter(self.params.values()), None)
        if first is None:
            first = next(p for net in self.networks.values() for p in net.parameters())
        self.device = first.device
        self.accelerator = _accelerator(self.config.mixed_precision, getattr(self.config, "grad_accum", 1),
                                        self.device)
        self.accelerator.gradient_state._set_sync_gradients(True)
        self.rank, self.world = self.accelerator.process_index, self.accelerator.num_processes
        acc = self.accelerator.device
        if self.world > 1 and (acc.type, acc.index or 0) != (self.device.type, self.device.index or 0):
            raise ConfigError(f"with {self.world} processes the pipeline must be on this process's device "
                              f"{self.accelerator.device} but is on {self.device}: load it with "
                              "device=erasekit.erase.engine.process_device()")
        if self.stream_rng:
            self.rng.manual_seed(self.config.seed + self.rank)
        if self._checkpoints_on:  # before any weight is touched
            self._pipe_digest = pipeline_digest(self.pipe)
        self._originals = {k: p.detach().clone() for k, p in self.params.items()}
        self._frozen = {}
        for key, orig in self._originals.items():
            comp, name = _component(self.pipe, key)
            self._frozen.setdefault(comp, {})[name] = orig
        self._flags = {(c, n): p.requires_grad for c in COMPONENTS if getattr(self.pipe, c, None) is not None
                       for n, p in getattr(self.pipe, c).named_parameters()}
        self._active = True
        try:
            for comp in {c for c, _ in self._flags}:
                getattr(self.pipe, comp).requires_grad_(False)
            for key, p in self.params.items():
                if p.dtype != torch.float32:
                    if self.config.mixed_precision == "no":
                        raise ConfigError(f"{key} is {p.dtype}; train half-precision pipelines with "
                                          "mixed_precision='bf16' or 'fp16' (weights are trained in fp32)")
                    p.data = p.data.float()
                p.requires_grad_(True)
            for name, opt in self._opt_specs.items():
                self.networks[name].requires_grad_(True)
                prepared = self.accelerator.prepare_optimizer(opt, device_placement=False)
                self._optimizers[name] = (prepared, dict(self.networks[name].named_parameters()))
            self._checkpointing = self._set_checkpointing()
        except BaseException:
            self.restore()
            raise
        return self

    def _set_checkpointing(self) -> dict[str, bool]:
        before = {}
        if not self.config.gradient_checkpointing:
            return before
        for comp in sorted({_component(self.pipe, k)[0] for k in self.params} | set(self.grad_through)):
            module = getattr(self.pipe, comp)
            before[comp] = bool(getattr(module, "is_gradient_checkpointing", False))
            _enable_checkpointing(module)
        for net in self.networks.values():  # the method's own copies: nothing to restore
            _enable_checkpointing(net)
        return before

    def __exit__(self, *exc) -> None:
        self.restore()

    def restore(self) -> None:
        """Put the original weights, ``requires_grad`` flags and checkpointing settings back."""
        if not self._active:
            return
        with torch.no_grad():
            for key, p in self.params.items():
                orig = self._originals[key]
                if p.dtype != orig.dtype:
                    p.data = orig
                else:
                    p.copy_(orig)
                p.grad = None
        for (comp, name), flag in self._flags.items():
            getattr(self.pipe, comp).get_parameter(name).requires_grad_(flag)
        for comp, was_on in self._checkpointing.items():
            module = getattr(self.pipe, comp)
            if not was_on:
                (module.disable_gradient_checkpointing if hasattr(module, "disable_gradient_checkpointing")
                 else module.gradient_checkpointing_disable)()
        self._active = False

    def _require_active(self) -> None:
        if not self._active:
            raise RuntimeError("use the Trainer as a context manager: `with Trainer(...) as trainer:`")

    # -- what loss functions use --------------------------------------------------------------------
    def frozen(self, module, *args, **kwargs):
        """``module(*args, **kwargs)`` with the ORIGINAL values of the trained parameters, no grad."""
        self._require_active()
        comp = next((c for c in COMPONENTS if getattr(self.pipe, c, None) is module), None)
        if comp is None:
            raise ConfigError("frozen() takes one of the pipeline's components (pipe.unet, pipe.transformer, "
                              "pipe.text_encoder, ...)")
        with torch.no_grad():
            return torch.func.functional_call(module, self._frozen.get(comp, {}), args, kwargs, strict=False)

    @contextmanager
    def _seeded(self, stage: str, index: int):
        seed = _derive_seed(self.config.seed, stage, self.rank, index)
        if not self.stream_rng:
            self.rng.manual_seed(seed)
        devices = [self.device] if self.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(seed)
            yield

    def autocast(self):
        """The mixed-precision context of this run (the loop enters it around every loss)."""
        return self.accelerator.autocast() if self.config.mixed_precision != "no" else nullcontext()

    @property
    def is_main_process(self) -> bool:
        return self.rank == 0

    # -- gradient statistics (SalUn's saliency) -----------------------------------------------------
    def gradient_sum(self, loss_fn: Callable[[int], torch.Tensor], n: int, desc: str = "gradients") -> dict:
        """Sum over ``i < n`` of the gradient of ``loss_fn(i)`` at the current weights (no step).

        The indices are shared out among processes and the sums all-reduced, so every process gets
        the same result. Returns ``{key: fp32 tensor}`` for every trained parameter.
        """
        from tqdm.auto import tqdm

        self._require_active()
        for p in self.params.values():
            p.grad = None
        finite = True
        for i in tqdm(range(self.rank, n, self.world), desc=desc, disable=not (self.config.progress and self.is_main_process)):
            with self._seeded("gradient_sum", i), self.autocast():
                loss = loss_fn(i)
            finite &= bool(torch.isfinite(loss.detach()).all())
            loss.backward()
        ok = self.accelerator.reduce(torch.tensor([float(finite)], device=self.device), reduction="sum")
        grads = {k: (p.grad if p.grad is not None else torch.zeros_like(p)).float() for k, p in self.params.items()}
        for p in self.params.values():
            p.grad = None
        if int(ok.item()) != self.world:
            raise TrainingError("the loss became NaN or Inf while accumulating gradients; "
                                "check the data and lower the guidance")
        self._all_reduce_(list(grads.values()), mean=False)
        return grads

    def set_mask(self, mask: dict[str, torch.Tensor]) -> None:
        """Train only where ``mask`` is True; a trained parameter missing from ``mask`` is not trained."""
        unknown = sorted(set(mask) - set(self.params))
        if unknown:
            raise ConfigError(f"mask names {unknown[0]!r}, which is not a trained parameter")
        for key, m in mask.items():
            if tuple(m.shape) != tuple(self.params[key].shape) or m.dtype != torch.bool:
                raise ConfigError(f"mask for {key} must be a bool tensor of shape {tuple(self.params[key].shape)}")
        self.mask = {k: m.to(self.params[k].device) for k, m in mask.items()}

    # -- optimizer steps ------------------------------------------------------------------------------
    def _trainable(self) -> dict:
        if self.mask is None:
            return self.params
        return {k: p for k, p in self.params.items() if k in self.mask and bool(self.mask[k].any())}

    def _optimizer(self, trainable: dict):
        cls = torch.optim.AdamW if self.config.optimizer == "adamw" else torch.optim.Adam
        if not trainable:
            raise ConfigError("the mask leaves no parameter to train; raise the mask ratio")
        opt = cls(list(trainable.values()), lr=self.lr, weight_decay=self.config.weight_decay)
        return self.accelerator.prepare_optimizer(opt, device_placement=False)

    def _all_reduce_(self, tensors: list[torch.Tensor], mean: bool) -> None:
        if self.world == 1 or not tensors:
            return
        from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors

        flat = self.accelerator.reduce(_flatten_dense_tensors(tensors), reduction="mean" if mean else "sum")
        for t, r in zip(tensors, _unflatten_dense_tensors(flat, tensors)):
            t.copy_(r)

    def _prepare_step(self, trainable: dict) -> None:
        grads = []
        for key, p in trainable.items():
            if p.grad is None:
                p.grad = torch.zeros_like(p)
            grads.append(p.grad)
        self._all_reduce_(grads, mean=True)
        if self.mask is not None:
            for key, p in trainable.items():
                p.grad.mul_(self.mask[key])
        if self.config.max_grad_norm is not None:
            self.accelerator.clip_grad_norm_(list(trainable.values()), self.config.max_grad_norm)

    @torch.no_grad()
    def _reapply_mask(self, trainable: dict) -> None:
        if self.mask is None:
            return
        for key, p in trainable.items():
            p.copy_(torch.where(self.mask[key], p, self._originals[key].to(p.dtype)))

    def update(self, name: str, loss: torch.Tensor, prepare_grads: Callable[[list], None] | None = None) -> float:
        """One optimizer step of network ``name`` on ``loss``; returns the loss value.

        A non-finite loss stops the run (:class:`TrainingError`). Gradients are averaged over the
        processes, then ``prepare_grads(parameters)`` may change them in place (clipping) before the step.
        """
        self._require_active()
        opt, params = self._optimizers[name]
        value = float(loss.detach())
        if not math.isfinite(value):
            raise TrainingError(self._nan_message(self.step, value, what=f"loss of {name}"))
        self.accelerator.backward(loss)
        if self.world > 1:
            grads = []
            for p in params.values():
                if p.requires_grad:
                    p.grad = torch.zeros_like(p) if p.grad is None else p.grad
                    grads.append(p.grad)
            self._all_reduce_(grads, mean=True)
        if prepare_grads is not None:
            prepare_grads(list(params.values()))
        opt.step()
        opt.zero_grad(set_to_none=True)
        return value

    def carry(self, name: str, get: Callable[[], dict], put: Callable[[dict], None]) -> None:
        """Carry state of the method's own through checkpoints, so that a resumed run is exact.

        ``get()`` returns ``{key: tensor}`` when a checkpoint is written; ``put(tensors)`` gets them
        back on resume (before the first resumed step). Call it before :meth:`fit` / :meth:`run`.
        """
        self._carried[name] = (get, put)

    # -- the loop -----------------------------------------------------------------------------------
    def _checkpoint_every(self) -> int:
        every = self.config.checkpoint_every
        return every if every is not None else max(1, math.ceil(self.steps / AUTO_CHECKPOINTS))

    def run(self, step_fn: Callable[[int], dict], desc: str = "train") -> None:
        """Run (or resume) to ``steps``: ``step_fn(step)`` does one step and returns numbers to show.

        Checkpoints are written every ``checkpoint_every`` steps and at the last step; with
        ``stream_rng`` each step runs with the global torch RNG seeded for it (forked).
        """
        from tqdm.auto import tqdm

        self._require_active()
        self._sig = self._run_signature() if self._checkpoints_on else None
        start = self._resume()
        every = self._checkpoint_every()
        bar = tqdm(total=self.steps, initial=start, desc=desc,
                   disable=not (self.config.progress and self.is_main_process))
        for step in range(start, self.steps):
            self.step = step
            with self._seeded("step", step) if self.stream_rng else nullcontext():
                logs = step_fn(step)
            self.step = step + 1
            bar.update(1)
            bar.set_postfix({k: f"{v:.4g}" for k, v in (logs or {}).items()}, refresh=False)
            if (step + 1) % every == 0 or step + 1 == self.steps:
                self._save_checkpoint(step + 1)
        bar.close()
        self.step = max(self.step, start)
        path, run = self._checkpoint_path(), current_run()
        if path is not None and self.config.checkpoint_dir == AUTO and run is not None and self.is_main_process:
            run.checkpoints.append(path)  # deleted when the whole erasure succeeds

    def fit(self, loss_fn: Callable[[int], torch.Tensor], manifest: dict | None = None):
        """Run ``steps`` optimizer steps of ``loss_fn``; returns the Edit of the trained weights.

        ``loss_fn(i)`` gets this process's micro-step index ``i`` (``step * grad_accum + j``), runs
        under autocast with :attr:`rng` seeded for ``i``, and returns a scalar loss.
        """
        self._require_active()
        trainable = self._trainable()
        opt = self._optimizer(trainable)
        self._optimizers[None] = (opt, trainable)
        accum = self.config.grad_accum

        def step_fn(step: int) -> dict:
            total = 0.0
            for j in range(accum):
                with self._seeded("fit", step * accum + j), self.autocast():
                    loss = loss_fn(step * accum + j)
                value = float(self.accelerator.reduce(loss.detach().float().reshape(1), reduction="mean"))
                if not math.isfinite(value):
                    raise TrainingError(self._nan_message(step, value))
                self.accelerator.backward(loss)
                total += value / accum
            self._prepare_step(trainable)
            opt.step()
            opt.zero_grad(set_to_none=True)
            self._reapply_mask(trainable)
            self.history.append(total)
            return {"loss": total}

        self.run(step_fn)
        return self._edit(manifest or {})

    def _nan_message(self, step: int, value: float, what: str = "loss") -> str:
        path = self._checkpoint_path()
        kept = (f"the last good checkpoint {path} is kept; resume from it with a lower lr"
                if path is not None and path.exists() else "no checkpoint was written (set checkpoint_dir)")
        return f"the {what} became {value} at step {step}: training stopped and the pipeline is unchanged; {kept}"

    def _edit(self, manifest: dict):
        from ..pipelines.edit import Edit

        # Hand the original tensors back to the pipeline and keep the trained ones (no extra copy).
        trained = {key: p.data for key, p in self.params.items()}
        for key, p in self.params.items():
            p.data = self._originals[key]
        self.restore()
        new = {}
        for key, w in trained.items():
            orig = self._originals[key]
            if not torch.equal(w.to(orig.dtype), orig):
                new[key] = w.to(orig.dtype)
        if not new:
            raise TrainingError("training changed no weight (lr 0, or a mask that keeps nothing); "
                                "raise lr or the mask ratio")
        summary = {"steps": self.steps, "lr": self.lr, "processes": self.world,
                   "final_loss": self.history[-1] if self.history else None, "resumed_from": self.resumed_from,
                   "trained_tensors": len(self.params), "changed_tensors": len(new)}
        if self.mask is not None:
            kept = sum(int(m.sum()) for m in self.mask.values())
            summary["mask_density"] = kept / sum(m.numel() for m in self.mask.values())
        return Edit.from_weights(self.pipe, new, {**manifest, "training": summary}, low_rank=False)

    # -- checkpoints ----------------------------------------------------------------------------------
    @property
    def _checkpoints_on(self) -> bool:
        d = self.config.checkpoint_dir
        return d is not None and (d != AUTO or current_run() is not None)

    def _checkpoint_path(self) -> Path | None:
        d = self.config.checkpoint_dir
        if d is None:
            return None
        if d != AUTO:
            return Path(d) / CHECKPOINT_NAME
        if current_run() is None:
            return None
        return auto_checkpoint_path(self._sig or self._run_signature(), self.steps)

    def _run_signature(self) -> str:
        run = current_run()
        sig = {"config": self.signature, "processes": self.world, "pipeline": self._pipe_digest,
               "run": None if run is None else run.identity, "stream_rng": self.stream_rng,
               "params": {k: list(p.shape) for k, p in self.params.items()},
               "networks": {n: digest(net.state_dict()) for n, net in sorted(self.networks.items())},
               "mask": None if self.mask is None else sum(int(m.sum()) for m in self.mask.values())}
        return hashlib.sha256(json.dumps(sig, sort_keys=True, default=str).encode()).hexdigest()[:24]

    def _trained_tensors(self) -> list[torch.Tensor]:
        return [p for _, params in self._optimizers.values() for p in params.values()]

    def _save_checkpoint(self, step: int) -> None:
        path = self._checkpoint_path()
        if path is None:
            return
        if not all(bool(torch.isfinite(p).all()) for p in self._trained_tensors()):
            raise TrainingError(self._nan_message(step, float("nan"), what="weights"))
        if self.is_main_process:
            tensors = {f"param/{k}": p for k, p in self.params.items()}
            for name, net in self.networks.items():
                tensors.update({f"net/{name}/{k}": v for k, v in net.state_dict().items()})
            meta = {"format": CHECKPOINT_FORMAT, "step": str(step), "signature": self._sig or self._run_signature()}
            for name, (opt, _) in self._optimizers.items():
                opt_tensors, scalars = optimizer_tensors(opt.optimizer, _opt_prefix(name))
                tensors.update(opt_tensors)
                meta[_opt_prefix(name)] = scalars
            if self.accelerator.scaler is not None:
                meta["scaler"] = self.accelerator.scaler.state_dict()
            if self.stream_rng:
                tensors["rng"] = self.rng.get_state()
            for name, (get, _) in self._carried.items():
                tensors.update({f"state/{name}/{k}": v for k, v in get().items()})
            save_tensors(path, tensors, meta)
        self.accelerator.wait_for_everyone()

    def _resume(self) -> int:
        path = self._checkpoint_path()
        if path is None or not self.config.resume or not path.exists():
            return 0
        auto = self.config.checkpoint_dir == AUTO
        try:
            tensors, meta = load_tensors(path)
        except Exception as e:  # safetensors raises several types for a damaged file
            if auto:
                warnings.warn(f"ignoring the unreadable automatic checkpoint {path} ({e}); starting afresh")
                return 0
            raise TrainingError(f"the checkpoint {path} cannot be read ({e}); delete it or set resume=False") from None
        if meta.get("format") != CHECKPOINT_FORMAT or meta.get("signature") != self._sig:
            if auto:
                warnings.warn(f"ignoring the automatic checkpoint {path}, written by another erasekit version; "
                              "starting afresh")
                return 0
            raise ConfigError(f"the checkpoint in {path.parent} belongs to a different run (other method options, "
                              "base model, parameters or process count): use another checkpoint_dir, or "
                              "resume=False to overwrite it")
        step = int(meta["step"])
        if step > self.steps:
            raise ConfigError(f"the checkpoint in {path.parent} is at step {step}, beyond `steps`={self.steps}")
        with torch.no_grad():
            for key, p in self.params.items():
                p.copy_(tensors[f"param/{key}"])
        for name, net in self.networks.items():
            prefix = f"net/{name}/"
            net.load_state_dict({k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)})
        for name, (opt, _) in self._optimizers.items():
            load_optimizer_tensors(opt.optimizer, tensors, json.loads(meta[_opt_prefix(name)]), _opt_prefix(name))
        if self.accelerator.scaler is not None and "scaler" in meta:
            self.accelerator.scaler.load_state_dict(json.loads(meta["scaler"]))
        if self.stream_rng:
            self.rng.set_state(tensors["rng"])
        for name, (_, put) in self._carried.items():
            prefix = f"state/{name}/"
            put({k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)})
        self.resumed_from = self.step = step
        return step


def _opt_prefix(name: str | None) -> str:
    return "optim" if name is None else f"optim_{name}"
