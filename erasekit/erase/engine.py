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
  autocast, **gradient checkpointing** of the components being trained, **gradient accumulation**.
- **Seeded randomness.** Before micro-step ``i`` the generator :attr:`Trainer.rng` and the global
  torch RNG (forked, so the caller's state is untouched) are seeded from ``(seed, stage, rank, i)``:
  a step's randomness depends on nothing else, so resuming needs no RNG state and is exact.
- **Several processes** (``accelerate launch`` / ``torchrun``): each process draws its own samples;
  gradients are averaged with one all-reduce per optimizer step, so every rank takes identical steps.
  Load the pipeline on :func:`process_device` in each process.
- **Checkpoints**: every ``checkpoint_every`` steps one safetensors file (trained weights, optimizer
  state, step, a signature of the run) is written atomically to ``checkpoint_dir``; a run with the
  same signature resumes from it. A non-finite loss stops the run with :class:`TrainingError`
  and leaves the last good checkpoint in place.
- A tqdm bar with the running loss (main process only).
"""

from __future__ import annotations

import hashlib
import json
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from .._io import load_optimizer_tensors, load_tensors, optimizer_tensors, save_tensors
from ..errors import ConfigError, TrainingError
from .registry import MethodConfig, check

COMPONENTS = ("unet", "text_encoder", "text_encoder_2")
CHECKPOINT_NAME = "checkpoint.safetensors"
# Options that change how a run is carried out but not what it computes (left out of the signature).
_NOT_IN_SIGNATURE = {"steps", "checkpoint_dir", "checkpoint_every", "resume", "progress"}


def _help(text: str) -> dict:
    return {"help": text}


@dataclass
class TrainConfig(MethodConfig):
    """Options of the engine, shared by every fine-tuning method's config (subclass it)."""

    steps: int | None = field(default=None, metadata=_help("optimizer steps (None: the method's preset)"))
    lr: float | None = field(default=None, metadata=_help("learning rate (None: the method's preset)"))
    optimizer: str = field(default="adam", metadata=_help("adam or adamw"))
    weight_decay: float = field(default=0.0, metadata=_help("weight decay (adam: coupled, adamw: decoupled)"))
    max_grad_norm: float | None = field(default=None, metadata=_help("clip the gradient norm (None: off)"))
    grad_accum: int = field(default=1, metadata=_help("micro-steps per optimizer step"))
    mixed_precision: str = field(default="no", metadata=_help("no, bf16, or fp16 (GPU only)"))
    gradient_checkpointing: bool = field(default=False, metadata=_help("recompute activations in backward"))
    seed: int = field(default=0, metadata=_help("seed of every random draw of the run"))
    checkpoint_dir: str | None = field(default=None, metadata=_help("folder for the resumable checkpoint"))
    checkpoint_every: int = field(default=100, metadata=_help("steps between checkpoints"))
    resume: bool = field(default=True, metadata=_help("resume from checkpoint_dir if it holds this run"))
    progress: bool = field(default=True, metadata=_help("show a progress bar with the loss"))

    def validate(self) -> None:
        check(self.steps is None or self.steps >= 1, f"`steps` must be >= 1 but is {self.steps}")
        check(self.lr is None or self.lr >= 0, f"`lr` must be >= 0 but is {self.lr}")
        check(self.optimizer in ("adam", "adamw"), f"`optimizer` must be 'adam' or 'adamw' but is {self.optimizer!r}")
        check(self.weight_decay >= 0, f"`weight_decay` must be >= 0 but is {self.weight_decay}")
        check(self.max_grad_norm is None or self.max_grad_norm > 0,
              f"`max_grad_norm` must be > 0 or None but is {self.max_grad_norm}")
        check(self.grad_accum >= 1, f"`grad_accum` must be >= 1 but is {self.grad_accum}")
        check(self.mixed_precision in ("no", "bf16", "fp16"),
              f"`mixed_precision` must be 'no', 'bf16' or 'fp16' but is {self.mixed_precision!r}")
        check(self.checkpoint_every >= 1, f"`checkpoint_every` must be >= 1 but is {self.checkpoint_every}")


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


class Trainer:
    """One fine-tuning run over ``params`` (``{"<component>/<name>": Parameter}``) of ``pipe``.

    Use as a context manager; see the module docstring for the loop it runs.
    """

    def __init__(self, pipe, params: dict, config: TrainConfig, *, steps: int | None = None,
                 lr: float | None = None, signature: dict | None = None):
        if not params:
            raise ConfigError("the parameter set selects no parameters: there is nothing to train; "
                              "choose another param_set")
        self.pipe, self.config = pipe, config
        self.params = dict(sorted(params.items()))
        for key in self.params:
            _component(pipe, key)
        self.steps = steps if steps is not None else config.steps
        self.lr = lr if lr is not None else config.lr
        check(self.steps is not None and self.steps >= 1, f"`steps` must be >= 1 but is {self.steps}")
        check(self.lr is not None and self.lr >= 0, f"`lr` must be >= 0 but is {self.lr}")
        self.signature = {k: v for k, v in (signature or config.to_dict()).items() if k not in _NOT_IN_SIGNATURE}
        self.mask: dict[str, torch.Tensor] | None = None
        self.rng = torch.Generator()
        self.history: list[float] = []
        self.resumed_from: int | None = None
        self._active = False
        self._checkpointing: dict[str, bool] = {}

    # -- set-up and restore -------------------------------------------------------------------------
    def __enter__(self) -> "Trainer":
        self.device = next(iter(self.params.values())).device
        self.accelerator = _accelerator(self.config.mixed_precision, self.config.grad_accum, self.device)
        self.accelerator.gradient_state._set_sync_gradients(True)
        self.rank, self.world = self.accelerator.process_index, self.accelerator.num_processes
        acc = self.accelerator.device
        if self.world > 1 and (acc.type, acc.index or 0) != (self.device.type, self.device.index or 0):
            raise ConfigError(f"with {self.world} processes the pipeline must be on this process's device "
                              f"{self.accelerator.device} but is on {self.device}: load it with "
                              "device=erasekit.erase.engine.process_device()")
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
            self._checkpointing = self._set_checkpointing()
        except BaseException:
            self.restore()
            raise
        return self

    def _set_checkpointing(self) -> dict[str, bool]:
        before = {}
        if not self.config.gradient_checkpointing:
            return before
        for comp in sorted({_component(self.pipe, k)[0] for k in self.params}):
            module = getattr(self.pipe, comp)
            before[comp] = bool(getattr(module, "is_gradient_checkpointing", False))
            if hasattr(module, "enable_gradient_checkpointing"):  # diffusers models
                module.enable_gradient_checkpointing()
            elif hasattr(module, "gradient_checkpointing_enable"):  # transformers models
                module.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
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
            raise ConfigError("frozen() takes one of the pipeline's components (pipe.unet, pipe.text_encoder, ...)")
        with torch.no_grad():
            return torch.func.functional_call(module, self._frozen.get(comp, {}), args, kwargs, strict=False)

    @contextmanager
    def _seeded(self, stage: str, index: int):
        seed = _derive_seed(self.config.seed, stage, self.rank, index)
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

    # -- the loop -----------------------------------------------------------------------------------
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

    def fit(self, loss_fn: Callable[[int], torch.Tensor], manifest: dict | None = None):
        """Run ``steps`` optimizer steps of ``loss_fn``; returns the Edit of the trained weights.

        ``loss_fn(i)`` gets this process's micro-step index ``i`` (``step * grad_accum + j``), runs
        under autocast with :attr:`rng` seeded for ``i``, and returns a scalar loss.
        """
        from tqdm.auto import tqdm

        self._require_active()
        trainable = self._trainable()
        opt = self._optimizer(trainable)
        start = self._resume(opt, trainable)
        accum = self.config.grad_accum
        bar = tqdm(total=self.steps, initial=start, desc="train",
                   disable=not (self.config.progress and self.is_main_process))
        for step in range(start, self.steps):
            total = 0.0
            for j in range(accum):
                with self._seeded("fit", step * accum + j), self.autocast():
                    loss = loss_fn(step * accum + j)
                value = float(self.accelerator.reduce(loss.detach().float().reshape(1), reduction="mean"))
                if not torch.isfinite(torch.tensor(value)):
                    raise TrainingError(self._nan_message(step, value))
                self.accelerator.backward(loss)
                total += value / accum
            self._prepare_step(trainable)
            opt.step()
            opt.zero_grad(set_to_none=True)
            self._reapply_mask(trainable)
            self.history.append(total)
            bar.update(1)
            bar.set_postfix(loss=f"{total:.4g}")
            if (step + 1) % self.config.checkpoint_every == 0 or step + 1 == self.steps:
                self._save_checkpoint(opt, trainable, step + 1)
        bar.close()
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
    def _checkpoint_path(self) -> Path | None:
        d = self.config.checkpoint_dir
        return None if d is None else Path(d) / CHECKPOINT_NAME

    def _run_signature(self) -> str:
        from ..pipelines.edit import fingerprint

        sig = {"config": self.signature, "processes": self.world, "base": fingerprint(self._originals)["id"],
               "params": {k: list(p.shape) for k, p in self.params.items()},
               "mask": None if self.mask is None else sum(int(m.sum()) for m in self.mask.values())}
        return hashlib.sha256(json.dumps(sig, sort_keys=True, default=str).encode()).hexdigest()[:24]

    def _save_checkpoint(self, opt, trainable: dict, step: int) -> None:
        path = self._checkpoint_path()
        if path is None:
            return
        if not all(bool(torch.isfinite(p).all()) for p in trainable.values()):
            raise TrainingError(self._nan_message(step, float("nan"), what="weights"))
        if self.is_main_process:
            opt_tensors, scalars = optimizer_tensors(opt.optimizer)
            if self.accelerator.scaler is not None:
                scalars["scaler"] = self.accelerator.scaler.state_dict()
            tensors = {f"param/{k}": p for k, p in self.params.items()} | opt_tensors
            save_tensors(path, tensors, {"format": "erasekit.checkpoint/1", "step": str(step),
                                         "signature": self._run_signature(), "optimizer": scalars})
        self.accelerator.wait_for_everyone()

    def _resume(self, opt, trainable: dict) -> int:
        path = self._checkpoint_path()
        if path is None or not self.config.resume or not path.exists():
            return 0
        try:
            tensors, meta = load_tensors(path)
        except Exception as e:  # safetensors raises several types for a damaged file
            raise TrainingError(f"the checkpoint {path} cannot be read ({e}); delete it or set resume=False") from None
        if meta.get("format") != "erasekit.checkpoint/1" or meta.get("signature") != self._run_signature():
            raise ConfigError(f"the checkpoint in {path.parent} belongs to a different run (other method options, "
                              "base model, parameters or process count): use another checkpoint_dir, or "
                              "resume=False to overwrite it")
        step = int(meta["step"])
        if step > self.steps:
            raise ConfigError(f"the checkpoint in {path.parent} is at step {step}, beyond `steps`={self.steps}")
        with torch.no_grad():
            for key, p in self.params.items():
                p.copy_(tensors[f"param/{key}"])
        scalars = json.loads(meta["optimizer"])
        load_optimizer_tensors(opt.optimizer, tensors, scalars)
        if self.accelerator.scaler is not None and "scaler" in scalars:
            self.accelerator.scaler.load_state_dict(scalars["scaler"])
        self.resumed_from = step
        return step
