"""Inference-time Edits: methods that change how a pipeline samples, not its weights (SLD, SAFREE).

Such an Edit holds no tensors. Its manifest names a *sampler* (``"sampler": "sld"``), and the
method's module registers, under that name, a factory ``factory(pipe, edit)`` that returns a
context manager: entered, it makes ``pipe`` sample with the method (through hooks on the pipeline's
modules) and yields the pipeline to sample; left, it removes every hook, so the pipeline is exactly
as before. :meth:`Edit.sampled <erasekit.pipelines.Edit.sampled>` runs that factory under the
pipeline's lock, so evaluation, attacks, :func:`~erasekit.pipelines.generate` and a plain
``pipe(prompt)`` inside the block all see the method, and nothing outside the block does.
``Edit.apply`` refuses such an Edit (there are no weights to write) and says to use ``sampled``.

Methods register with :func:`register_sampler` when their module is imported. A process that loads
an Edit file before that finds the sampler through the resolver the method registry adds as soon as
any method registers (:func:`add_resolver`); the CLI imports an Edit's method when it loads the file.
Otherwise :meth:`Edit.sampled` raises an :class:`~erasekit.errors.EditError` that names the import.

The hooks are on the denoiser *module* (:func:`unet_hooks`, torch forward hooks with keyword
arguments: ``pipe.unet``, or an SD 3 pipeline's ``pipe.transformer``), so every caller of it gets the
method's prediction: the pipeline's own denoising loop, and the attacks that call it directly
(UnlearnDiffAtk). A hook tells the two apart by the batch layout (:func:`cfg_split`): diffusers'
classifier-free guidance batches the unconditional rows first and the conditional rows second, with
the same latents and timestep in both halves; any other call has only conditional rows. The calls a
hook makes itself (:meth:`UNetCall.run`) are not hooked again. A transformer's call reads its latents
as ``hidden_states`` and its pooled text as ``pooled_projections`` (:class:`UNetCall` keeps the names).
"""

from __future__ import annotations

import inspect
import threading
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from typing import Callable, Iterator

import torch

from ..errors import EditError

_SAMPLERS: dict[str, Callable] = {}
_RESOLVERS: list[Callable[[str], None]] = []
_BYPASS = threading.local()   # set while a hook runs the UNet itself


def register_sampler(name: str, factory: Callable) -> None:
    """Register ``factory(pipe, edit) -> context manager yielding the pipeline`` for ``manifest["sampler"] == name``."""
    if name == "one_step" or not name.replace("_", "").isalnum() or name != name.lower():
        raise EditError(f"sampler name {name!r} must be lower-case letters, digits or '_' and not 'one_step'")
    _SAMPLERS[name] = factory


def add_resolver(fn: Callable[[str], None]) -> None:
    """Add ``fn(method_name)``, which imports the method so that it registers its sampler."""
    if fn not in _RESOLVERS:
        _RESOLVERS.append(fn)


def sampler_factory(name: str, method: str | None = None) -> Callable:
    """The factory registered for sampler ``name`` (asking the resolvers with ``method`` first)."""
    if name not in _SAMPLERS:
        for resolve in _RESOLVERS:
            try:
                resolve(method or name)
            except Exception:   # noqa: BLE001 -- an unknown method: the error below says what to do
                pass
    if name not in _SAMPLERS:
        raise EditError(f"this Edit samples with the inference-time sampler {name!r}, which is not registered in "
                        f"this process: import its method first (e.g. `import erasekit.erase.{method or name}` or "
                        "erasekit.methods()), then call edit.sampled(pipe)")
    return _SAMPLERS[name]


def is_inference_sampler(name) -> bool:
    """Whether ``manifest["sampler"]`` names an inference-time sampler (anything but absent or one_step)."""
    return isinstance(name, str) and name not in ("", "one_step")


# -- hooks on the UNet ------------------------------------------------------------------------------
@dataclass
class UNetCall:
    """One call of a diffusers UNet (or an SD 3 / Flux transformer), split into latents, timestep, text context
    and the other options. ``latent_name`` is the forward's name of the latents: ``sample`` for a UNet,
    ``hidden_states`` for a transformer, whose pooled text stays in ``kwargs["pooled_projections"]``."""

    sample: torch.Tensor
    timestep: torch.Tensor | float | int
    encoder_hidden_states: torch.Tensor
    kwargs: dict = field(default_factory=dict)
    latent_name: str = "sample"

    @classmethod
    def parse(cls, args: tuple, kwargs: dict, latent_name: str = "sample") -> "UNetCall":
        kw = dict(kwargs)
        if latent_name != "sample":   # a transformer: forward(hidden_states, encoder_hidden_states, ...)
            if len(args) > 1:
                raise EditError("an inference-time Edit's transformer hook expects every input after the latents "
                                "as a keyword (as diffusers pipelines pass them)")
            latents = args[0] if args else kw.pop(latent_name, None)
            return cls(latents, kw.pop("timestep", None), kw.pop("encoder_hidden_states", None), kw, latent_name)
        names = ("sample", "timestep", "encoder_hidden_states")
        values = [args[i] if i < len(args) else kw.pop(n, None) for i, n in enumerate(names)]
        if len(args) > 3:
            raise EditError("an inference-time Edit's UNet hook expects the options after the text context as "
                            "keywords (as diffusers pipelines pass them)")
        return cls(*values, kw)

    def hook_args(self) -> tuple[tuple, dict]:
        if self.latent_name != "sample":
            return (), {self.latent_name: self.sample, "timestep": self.timestep,
                        "encoder_hidden_states": self.encoder_hidden_states, **self.kwargs}
        return (self.sample, self.timestep), {"encoder_hidden_states": self.encoder_hidden_states, **self.kwargs}

    @property
    def batch(self) -> int:
        return self.sample.shape[0]

    def timesteps(self) -> torch.Tensor:
        """The timestep of every row (a 0-d or scalar timestep broadcast), as a float tensor."""
        t = torch.as_tensor(self.timestep, device=self.sample.device).float().flatten()
        return t.expand(self.batch) if t.numel() == 1 else t

    def rows(self, idx: slice | torch.Tensor) -> "UNetCall":
        """The call for rows ``idx`` of the batch (every per-row tensor option sliced alike)."""
        n = self.batch

        def pick(v):
            if isinstance(v, torch.Tensor) and v.ndim and v.shape[0] == n:
                return v[idx]
            if isinstance(v, dict):
                return {k: pick(x) for k, x in v.items()}
            return v

        return UNetCall(self.sample[idx], pick(self.timestep), self.encoder_hidden_states[idx],
                        {k: pick(v) for k, v in self.kwargs.items()}, self.latent_name)

    def append_rows(self, idx: torch.Tensor, encoder_hidden_states: torch.Tensor) -> "UNetCall":
        """This call with rows ``idx`` repeated after the batch (every per-row option alike), the repeats
        reading ``encoder_hidden_states`` (one context per index) instead of their own."""
        n = self.batch

        def grow(v):
            if isinstance(v, torch.Tensor) and v.ndim and v.shape[0] == n:
                return torch.cat([v, v[idx]])
            if isinstance(v, dict):
                return {k: grow(x) for k, x in v.items()}
            return v

        ehs = torch.cat([self.encoder_hidden_states, encoder_hidden_states.to(self.encoder_hidden_states)])
        return UNetCall(grow(self.sample), grow(self.timestep), ehs, {k: grow(v) for k, v in self.kwargs.items()},
                        self.latent_name)

    def with_context(self, embeds: torch.Tensor, pooled: torch.Tensor | None = None) -> "UNetCall":
        """The same call with another text context (one row broadcast to the batch); the pooled text too
        (SDXL's ``added_cond_kwargs["text_embeds"]``, a transformer's ``pooled_projections``)."""
        ehs = self.encoder_hidden_states
        embeds = embeds.to(ehs.device, ehs.dtype).expand(self.batch, *ehs.shape[1:])
        kwargs = dict(self.kwargs)
        added = kwargs.get("added_cond_kwargs")
        if pooled is not None and added is not None and "text_embeds" in added:
            te = added["text_embeds"]
            kwargs["added_cond_kwargs"] = {**added, "text_embeds": pooled.to(te.device, te.dtype).expand_as(te)}
        pp = kwargs.get("pooled_projections")
        if pooled is not None and isinstance(pp, torch.Tensor):
            kwargs["pooled_projections"] = pooled.to(pp.device, pp.dtype).expand_as(pp)
        return replace(self, encoder_hidden_states=embeds, kwargs=kwargs)

    def run(self, unet) -> torch.Tensor:
        """The UNet's prediction for this call, without the hooks (a hook's own call)."""
        before = getattr(_BYPASS, "on", False)
        _BYPASS.on = True
        try:
            args, kwargs = self.hook_args()
            return unet(*args, **{**kwargs, "return_dict": False})[0]
        finally:
            _BYPASS.on = before


def latent_name(module) -> str:
    """The forward's name of the latents: ``sample`` (UNet) or ``hidden_states`` (SD 3 / Flux transformer), read
    from the class (an instance's forward may be wrapped or patched)."""
    return list(inspect.signature(type(module).forward).parameters)[1]


def output_sample(output) -> torch.Tensor:
    return output[0] if isinstance(output, tuple) else output.sample


def with_sample(output, sample: torch.Tensor):
    """``output`` (a tuple, a ``UNet2DConditionOutput`` or a ``Transformer2DModelOutput``) with its prediction
    replaced."""
    if isinstance(output, tuple):
        return (sample, *output[1:])
    return type(output)(sample=sample)


def cfg_split(pipe, call: UNetCall) -> int | None:
    """B when ``call`` is a classifier-free-guidance batch of diffusers (B unconditional rows, then B
    conditional rows, both halves with bitwise equal latents and timesteps, the pipeline's guidance
    scale above 1), else None: every row is conditional (a direct call, or sampling without CFG)."""
    n = call.batch
    scale = getattr(pipe, "_guidance_scale", None)
    if n % 2 or not isinstance(scale, (int, float)) or scale <= 1:
        return None
    b = n // 2
    t = call.timesteps()
    if not (torch.equal(call.sample[:b], call.sample[b:]) and torch.equal(t[:b], t[b:])):
        return None
    if torch.equal(call.encoder_hidden_states[:b], call.encoder_hidden_states[b:]):
        return None   # the same text in both halves: nothing tells unconditional from conditional
    return b


@contextmanager
def unet_hooks(unet, pre: Callable | None = None, post: Callable | None = None) -> Iterator:
    """For the block, ``pre(call) -> UNetCall | None`` rewrites every call of ``unet`` (a UNet, or an SD 3 /
    Flux transformer) before it runs and ``post(call, prediction) -> prediction | None`` rewrites its
    prediction; removed in ``finally``.

    Calls made with :meth:`UNetCall.run` (from inside a hook) pass untouched.
    """
    handles, name = [], latent_name(unet)

    def pre_hook(module, args, kwargs):
        if getattr(_BYPASS, "on", False):
            return None
        new = pre(UNetCall.parse(args, kwargs, name))
        return None if new is None else new.hook_args()

    def post_hook(module, args, kwargs, output):
        if getattr(_BYPASS, "on", False):
            return None
        sample = post(UNetCall.parse(args, kwargs, name), output_sample(output))
        return None if sample is None else with_sample(output, sample)

    try:
        if pre is not None:
            handles.append(unet.register_forward_pre_hook(pre_hook, with_kwargs=True))
        if post is not None:
            handles.append(unet.register_forward_hook(post_hook, with_kwargs=True))
        yield unet
    finally:
        for h in handles:
            h.remove()


def unconditional_context(pipe):
    """The text context the pipeline uses for classifier-free guidance with no negative prompt:
    ``""`` encoded, or zeros where an SDXL pipeline forces them (``force_zeros_for_empty_prompt``)."""
    from .family import FamilyAdapter

    ctx = FamilyAdapter(pipe).encode([""])
    if getattr(getattr(pipe, "config", None), "force_zeros_for_empty_prompt", False):
        ctx = type(ctx)(torch.zeros_like(ctx.embeds), None if ctx.pooled is None else torch.zeros_like(ctx.pooled))
    return ctx


def train_timesteps(pipe) -> int:
    """T, the number of timesteps of the pipeline's training schedule."""
    return int(pipe.scheduler.config.num_train_timesteps)


def resolved_values(edit, names: tuple[str, ...]) -> dict:
    """The method's resolved options from an inference-time Edit's manifest, every one of ``names`` present."""
    values = edit.manifest.get("resolved")
    missing = [n for n in names if not isinstance(values, dict) or n not in values]
    if missing:
        raise EditError(f"this {edit.manifest.get('method')!r} Edit's manifest has no resolved {missing[0]!r}: the "
                        "file was altered or is incomplete; re-create it with `erasekit erase` (or Edit.save)")
    return values
