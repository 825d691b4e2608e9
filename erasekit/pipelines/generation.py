"""Seeded, batched image generation with a recorded sampling protocol.

Each image has its own CPU ``torch.Generator`` seeded with its seed, so an image depends only on
its (prompt, seed) and the sampling settings, and a call is bit-reproducible on CPU.

Every batch is checked as it is made: a non-finite latent or image, or an image that is one flat
colour, raises :class:`~erasekit.errors.DegenerateOutputError` at the first batch that holds one, so
a broken model (or a broken Edit applied to it) is never judged, and never reported as erased.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import asdict, dataclass

import numpy as np
import torch
from tqdm.auto import tqdm

from ..errors import ConfigError, DegenerateOutputError
from .locking import locked

DEGENERATE_STD = 1 / 255
"""An image is a flat colour when the pixel standard deviation of each of its colour channels, on
the [0, 1] scale, is below this: less than one 8-bit level of spread. A broken model's images are
flat (NaN turns into black, a dead decoder paints its bias). Healthy samples are far above it:
canvas-mini at least 0.15 (20 captions over its 10 styles, and plain prompts such as "a black
image", "a plain white image" and ""), tiny random test pipelines about 0.15. A decoded Stable
Diffusion sample of a plain scene carries shading and VAE texture far larger than one level."""

SAMPLERS = {
    "ddim": "DDIMScheduler",
    "lms": "LMSDiscreteScheduler",
    "euler": "EulerDiscreteScheduler",
    "dpm": "DPMSolverMultistepScheduler",
    "pndm": "PNDMScheduler",
    "flow_euler": "FlowMatchEulerDiscreteScheduler",
}
FLOW_SAMPLERS = ("flow_euler",)
"""Samplers of flow-matching models (SD 3, Flux); the others integrate a DDPM noise schedule. A model is
trained for one kind, and a sampler of the other kind makes noise, so :func:`use_sampler` refuses the mix."""


@dataclass
class Sampling:
    """How images are made: recorded in every report so numbers are compared like for like.

    ``sampler`` ``"ddim"`` (and lms, euler, dpm, pndm) for DDPM-trained models (SD 1.x, 2.x, SDXL),
    ``"flow_euler"`` for flow-matching ones (SD 3, Flux); :func:`default_sampling` picks by the pipeline.
    """

    sampler: str = "ddim"
    steps: int = 25
    guidance: float = 7.5
    height: int | None = None   # None: the model's native size
    width: int | None = None
    batch_size: int = 50

    def __post_init__(self):
        if self.sampler not in SAMPLERS:
            raise ConfigError(f"sampler must be one of {sorted(SAMPLERS)} but is {self.sampler!r}")
        if self.steps < 1:
            raise ConfigError(f"steps must be >= 1 but is {self.steps}")
        if self.batch_size < 1:
            raise ConfigError(f"batch_size must be >= 1 but is {self.batch_size}")

    def to_dict(self) -> dict:
        return asdict(self)


def is_flow_matching(pipe) -> bool:
    """Whether the pipeline's scheduler integrates a flow-matching ODE (SD 3, Flux) rather than a DDPM schedule."""
    scheduler = getattr(pipe, "scheduler", None)
    return type(scheduler).__name__.startswith("FlowMatch") or \
        getattr(getattr(scheduler, "config", None), "prediction_type", None) == "flow_prediction"


def default_sampling(pipe, **kwargs) -> Sampling:
    """:class:`Sampling` with the pipeline's kind of sampler: ``flow_euler`` on flow-matching models, else ``ddim``."""
    return Sampling(sampler="flow_euler" if is_flow_matching(pipe) else "ddim", **kwargs)


@contextmanager
def use_sampler(pipe, sampler: str):
    """Temporarily swap the pipeline's scheduler class (same noise schedule config).

    A DDPM sampler on a flow-matching model, or the reverse, is refused (:data:`FLOW_SAMPLERS`).
    """
    import diffusers

    if sampler not in SAMPLERS:
        raise ConfigError(f"sampler must be one of {sorted(SAMPLERS)} but is {sampler!r}")
    flow = is_flow_matching(pipe)
    if flow != (sampler in FLOW_SAMPLERS):
        fits = [s for s in SAMPLERS if (s in FLOW_SAMPLERS) == flow]
        raise ConfigError(f"sampler {sampler!r} does not fit this {type(pipe).__name__}: its scheduler "
                          f"{type(pipe.scheduler).__name__} is {'flow matching' if flow else 'a DDPM schedule'}, so "
                          f"use {' or '.join(map(repr, fits))} (Sampling(sampler=...))")
    old = pipe.scheduler
    pipe.scheduler = getattr(diffusers, SAMPLERS[sampler]).from_config(old.config)
    try:
        yield pipe
    finally:
        pipe.scheduler = old


def degenerate_reason(image) -> str | None:
    """Why ``image`` cannot be a healthy model's sample (non-finite, or a flat colour), else None.

    ``image``: a PIL image, an H x W x C array in [0, 1] (``output_type="np"``) or a C x H x W tensor in
    [0, 1] (``"pt"``). See :data:`DEGENERATE_STD` for the flatness threshold.
    """
    if isinstance(image, torch.Tensor):
        a = image.detach().float().cpu().numpy()
        a = a.reshape(a.shape[0], -1).T if a.ndim == 3 else a.reshape(-1, 1)
    else:
        a = np.asarray(image)
        a = (a.astype(np.float32) / 255.0 if a.dtype == np.uint8 else a.astype(np.float32, copy=False))
        a = a.reshape(-1, a.shape[-1] if a.ndim == 3 else 1)
    if not np.isfinite(a).all():
        return "it is not finite (NaN/Inf)"
    spread = float(a.std(axis=0).max()) if a.size else 0.0
    if spread < DEGENERATE_STD:
        return (f"it is one flat colour (largest per-channel pixel std {spread:.2g}, below {DEGENERATE_STD:.2g}, "
                "one 8-bit level)")
    return None


def check_outputs(outputs, prompts: list[str], seeds: list[int], output_type: str = "np", exempt=None) -> None:
    """Raise :class:`DegenerateOutputError` naming the first degenerate output of a batch.

    ``output_type="latent"``: only finiteness is checked (latents are not images). ``exempt``: one
    flag per output to skip (images a safety checker blacked out on purpose).
    """
    bad = []
    for k, out in enumerate(outputs):
        if exempt is not None and exempt[k]:
            continue
        if output_type == "latent":
            reason = None if torch.isfinite(torch.as_tensor(out)).all() else "its latent is not finite (NaN/Inf)"
        else:
            reason = degenerate_reason(out)
        if reason is not None:
            bad.append((k, reason))
    if bad:
        k, reason = bad[0]
        raise DegenerateOutputError(
            f"the model made a degenerate output for {prompts[k]!r} at seed {seeds[k]} ({len(bad)} of "
            f"{len(outputs)} in this batch): {reason}. A broken model's images cannot be judged, so nothing is "
            "reported as erased or held: check the model and the Edit applied to it (a float16 model may "
            "overflow: load it in float32)")


@locked   # the pipeline's lock (erasekit.pipelines.locking): no Edit goes on or off mid-call
def generate(pipe, prompts: list[str] | str, seeds: list[int] | int, sampling: Sampling | None = None,
             progress: bool = False, output_type: str = "pil", check: bool = True, **kwargs):
    """Generate one image per (prompt, seed) pair; returns a list (PIL by default).

    ``prompts`` and ``seeds`` are zipped; a single prompt or seed is broadcast. Without ``sampling``, the
    pipeline's kind of sampler with the defaults of :class:`Sampling` (:func:`default_sampling`). Works unchanged on
    the one-step generators SFD produces (they define ``erasekit_generate``). With ``check`` (the
    default), each batch is checked as it is made and the first degenerate output raises
    :class:`~erasekit.errors.DegenerateOutputError` (see :func:`check_outputs`); callers that
    count such images themselves pass ``check=False``.

    Example:
        >>> import erasekit
        >>> from erasekit.pipelines import generate
        >>> pipe = erasekit.load_pipeline("canvas-mini")
        >>> a = generate(pipe, "A Cats image in Mosaic style.", seeds=[0, 1])
        >>> b = generate(pipe, "A Cats image in Mosaic style.", seeds=[0, 1])
        >>> [x.tobytes() == y.tobytes() for x, y in zip(a, b)]
        [True, True]
    """
    sampling = sampling or default_sampling(pipe)
    prompts = [prompts] if isinstance(prompts, str) else list(prompts)
    seeds = [seeds] if isinstance(seeds, int) else list(seeds)
    if len(prompts) == 1 and len(seeds) > 1:
        prompts = prompts * len(seeds)
    if len(seeds) == 1 and len(prompts) > 1:
        seeds = seeds * len(prompts)
    if len(prompts) != len(seeds):
        raise ConfigError(f"got {len(prompts)} prompts but {len(seeds)} seeds: give one seed per prompt")
    # PIL images are made from the float arrays after the check: NaN would otherwise turn into black
    made = "np" if check and output_type == "pil" else output_type
    if hasattr(pipe, "erasekit_generate"):
        # one batch at a time, so the first batch that goes wrong stops the call
        bs = sampling.batch_size if check else len(prompts)
        out = []
        for i in range(0, len(prompts), bs):
            imgs = pipe.erasekit_generate(prompts[i:i + bs], seeds[i:i + bs], sampling, progress=progress,
                                          output_type=made)
            out.extend(_checked(imgs, prompts[i:i + bs], seeds[i:i + bs], made, output_type, check, None))
        return out
    out = []
    bs = sampling.batch_size
    with use_sampler(pipe, sampling.sampler), torch.no_grad():
        for i in tqdm(range(0, len(prompts), bs), desc="generate", disable=not progress):
            gens = [torch.Generator("cpu").manual_seed(int(s)) for s in seeds[i:i + bs]]
            res = pipe(prompt=prompts[i:i + bs], generator=gens, num_inference_steps=sampling.steps,
                       guidance_scale=sampling.guidance, height=sampling.height, width=sampling.width,
                       output_type=made, **kwargs)
            out.extend(_checked(res.images, prompts[i:i + bs], seeds[i:i + bs], made, output_type, check,
                                getattr(res, "nsfw_content_detected", None)))
    return out


def _checked(outputs, prompts, seeds, made: str, output_type: str, check: bool, exempt) -> list:
    """Check one batch (``check``) and convert it from ``made`` to ``output_type``; returns a list."""
    outputs = list(outputs)
    if check:
        check_outputs(outputs, prompts, seeds, made, exempt)
    if made != output_type:   # "np" made for a "pil" request: diffusers' own conversion, bit for bit
        from diffusers.image_processor import VaeImageProcessor

        return VaeImageProcessor.numpy_to_pil(np.stack([np.asarray(x) for x in outputs]))
    return outputs
