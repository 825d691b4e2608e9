"""Seeded, batched image generation with a recorded sampling protocol.

Each image has its own CPU ``torch.Generator`` seeded with its seed, so an image depends only on
its (prompt, seed) and the sampling settings, and a call is bit-reproducible on CPU.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import asdict, dataclass

import torch
from tqdm.auto import tqdm

from ..errors import ConfigError

SAMPLERS = {
    "ddim": "DDIMScheduler",
    "lms": "LMSDiscreteScheduler",
    "euler": "EulerDiscreteScheduler",
    "dpm": "DPMSolverMultistepScheduler",
    "pndm": "PNDMScheduler",
}


@dataclass
class Sampling:
    """How images are made: recorded in every report so numbers are compared like for like."""

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


@contextmanager
def use_sampler(pipe, sampler: str):
    """Temporarily swap the pipeline's scheduler class (same noise schedule config)."""
    import diffusers

    if sampler not in SAMPLERS:
        raise ConfigError(f"sampler must be one of {sorted(SAMPLERS)} but is {sampler!r}")
    old = pipe.scheduler
    pipe.scheduler = getattr(diffusers, SAMPLERS[sampler]).from_config(old.config)
    try:
        yield pipe
    finally:
        pipe.scheduler = old


def generate(pipe, prompts: list[str] | str, seeds: list[int] | int, sampling: Sampling | None = None,
             progress: bool = False, output_type: str = "pil", **kwargs):
    """Generate one image per (prompt, seed) pair; returns a list (PIL by default).

    ``prompts`` and ``seeds`` are zipped; a single prompt or seed is broadcast. Works unchanged on
    the one-step generators SFD produces (they define ``erasekit_generate``).

    Example:
        >>> import erasekit
        >>> from erasekit.pipelines import generate
        >>> pipe = erasekit.load_pipeline("canvas-mini")
        >>> a = generate(pipe, "A Cats image in Mosaic style.", seeds=[0, 1])
        >>> b = generate(pipe, "A Cats image in Mosaic style.", seeds=[0, 1])
        >>> [x.tobytes() == y.tobytes() for x, y in zip(a, b)]
        [True, True]
    """
    sampling = sampling or Sampling()
    prompts = [prompts] if isinstance(prompts, str) else list(prompts)
    seeds = [seeds] if isinstance(seeds, int) else list(seeds)
    if len(prompts) == 1 and len(seeds) > 1:
        prompts = prompts * len(seeds)
    if len(seeds) == 1 and len(prompts) > 1:
        seeds = seeds * len(prompts)
    if len(prompts) != len(seeds):
        raise ConfigError(f"got {len(prompts)} prompts but {len(seeds)} seeds: give one seed per prompt")
    if hasattr(pipe, "erasekit_generate"):
        return pipe.erasekit_generate(prompts, seeds, sampling, progress=progress, output_type=output_type)
    out = []
    bs = sampling.batch_size
    with use_sampler(pipe, sampling.sampler), torch.no_grad():
        for i in tqdm(range(0, len(prompts), bs), desc="generate", disable=not progress):
            gens = [torch.Generator("cpu").manual_seed(int(s)) for s in seeds[i:i + bs]]
            res = pipe(prompt=prompts[i:i + bs], generator=gens, num_inference_steps=sampling.steps,
                       guidance_scale=sampling.guidance, height=sampling.height, width=sampling.width,
                       output_type=output_type, **kwargs)
            imgs = res.images
            out.extend(list(imgs) if output_type == "pil" else [x for x in imgs])
    return out
