"""Flow matching on SD 3 / Flux: calling the transformer at a noise level, its schedule, noising and targets.

Rectified flow (SD 3, Flux) interpolates data and noise linearly,

    x_sigma = (1 - sigma) x0 + sigma eps,        sigma in [0, 1] (1: pure noise),

and the transformer predicts the velocity ``v = d x_sigma / d sigma = eps - x0``. The flow-Euler
sampler steps ``x <- x + (sigma_next - sigma) v`` down the scheduler's sigmas. Training methods
(ESD, SalUn, AdvUnlearn) and UnlearnDiffAtk use :class:`FlowModel` where the UNet families use
``unet(x_t, t, ...)`` and a DDPM ``alphas_cumprod``:

- :meth:`FlowModel.kwargs`: the transformer's inputs for latents ``z`` at ``sigma`` with a
  :class:`~erasekit.pipelines.Context`, exactly as the pipeline's denoising loop builds them (SD 3:
  ``timestep = sigma x num_train_timesteps``; Flux: packed 2 x 2 latent patches, ``timestep = sigma``,
  image and text position ids, and the guidance embedding of guidance-distilled models such as
  FLUX.1-dev, ``guidance_embeds``);
- :meth:`FlowModel.sigmas`: the pipeline's sigmas for ``steps`` steps (``FlowMatchEulerDiscreteScheduler``
  with its ``shift``, or its resolution-dependent ``mu`` when the config asks for dynamic shifting);
- :func:`noisy` / :func:`velocity`: the interpolation and the regression target above.

Latents are in the transformer's layout: SD 3 ``B x C x h x w``; Flux ``B x (h/2 * w/2) x 4C``.
"""

from __future__ import annotations

import inspect

import torch

from ..errors import ConfigError
from .mmdit import denoiser, mmdit_family


def noisy(x0: torch.Tensor, eps: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """``x_sigma = (1 - sigma) x0 + sigma eps`` (``sigma`` per sample, broadcast over the other dims)."""
    s = sigma.reshape(-1, *([1] * (x0.dim() - 1))).to(x0.dtype)
    return (1 - s) * x0 + s * eps


def velocity(x0: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
    """The flow-matching regression target ``v = eps - x0`` (the derivative of :func:`noisy` in sigma)."""
    return eps - x0


def _call_default(pipe, name: str):
    param = inspect.signature(type(pipe).__call__).parameters.get(name)
    return None if param is None else param.default


class FlowModel:
    """How one SD 3 / Flux pipeline's transformer is called (module docstring).

    Args:
        pipe: a ``StableDiffusion3Pipeline`` or ``FluxPipeline`` with a flow-matching scheduler.
        resolution: image side in pixels (None: the pipeline's native size, ``default_sample_size x
            vae_scale_factor``, which its ``__call__`` uses).
        guidance: the guidance embedding of a guidance-distilled Flux model (None: the pipeline's default
            ``guidance_scale``, 3.5); refused on models without a guidance embedding.
    """

    def __init__(self, pipe, resolution: int | None = None, guidance: float | None = None):
        self.family = mmdit_family(pipe)
        if self.family is None:
            raise ConfigError(f"{type(pipe).__name__} has no transformer: flow matching applies to sd3 and flux")
        self.pipe, self.transformer = pipe, denoiser(pipe)
        scale = pipe.vae_scale_factor
        size = resolution if resolution is not None else pipe.default_sample_size * scale
        multiple = scale * (2 if self.family == "flux" else self.transformer.config.patch_size)
        if size <= 0 or size % multiple:
            raise ConfigError(f"`resolution` must be a positive multiple of {multiple} for this {type(pipe).__name__} "
                              f"but is {size}")
        self.size, self.latent = size, size // scale
        self.uses_guidance = bool(getattr(self.transformer.config, "guidance_embeds", False))
        if guidance is not None and not self.uses_guidance:
            raise ConfigError(f"`guidance_embed` sets the guidance embedding of guidance-distilled Flux models "
                              f"(FLUX.1-dev), but this {type(self.transformer).__name__} has none: leave it None")
        self.guidance = (guidance if guidance is not None else _call_default(pipe, "guidance_scale")) \
            if self.uses_guidance else None
        self.n_train = int(pipe.scheduler.config.num_train_timesteps)

    # -- latents ------------------------------------------------------------------------------------------
    @property
    def channels(self) -> int:
        """Latent channels of the VAE's space (Flux's transformer reads 2 x 2 patches of them: 4x)."""
        c = self.transformer.config.in_channels
        return c // 4 if self.family == "flux" else c

    def pack(self, z: torch.Tensor) -> torch.Tensor:
        """VAE-space latents ``B x C x h x w`` in the transformer's layout (Flux: 2 x 2 patches as tokens)."""
        if self.family != "flux":
            return z
        b, c, h, w = z.shape
        return z.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5).reshape(b, (h // 2) * (w // 2), c * 4)

    def noise(self, n: int, generator: torch.Generator) -> torch.Tensor:
        """``n`` standard normal latents (drawn on the CPU from ``generator``, in the transformer's layout)."""
        z = torch.randn((n, self.channels, self.latent, self.latent), generator=generator)
        return self.pack(z).to(self.transformer.device)

    def encode_images(self, x: torch.Tensor) -> torch.Tensor:
        """Latents of images ``x`` (``B x 3 x H x W`` in [-1, 1]): the VAE posterior mean, shifted and scaled as
        the pipeline decodes them (``(mean - shift_factor) * scaling_factor``), in the transformer's layout."""
        vae = self.pipe.vae
        with torch.no_grad():
            z = vae.encode(x.to(vae.device, vae.dtype)).latent_dist.mean.float()
        shift = getattr(vae.config, "shift_factor", None) or 0.0
        return self.pack((z - shift) * vae.config.scaling_factor)

    # -- the schedule ---------------------------------------------------------------------------------------
    def sigmas(self, steps: int) -> torch.Tensor:
        """The pipeline's ``steps + 1`` sigmas for ``steps`` flow-Euler steps (float32, from ~1 down to 0)."""
        import numpy as np
        from diffusers import FlowMatchEulerDiscreteScheduler

        sched = FlowMatchEulerDiscreteScheduler.from_config(self.pipe.scheduler.config)
        kwargs = {}
        if self.family == "flux":   # FluxPipeline passes these sigmas and always a mu
            kwargs["sigmas"] = np.linspace(1.0, 1 / steps, steps)
        if self._mu() is not None:
            kwargs["mu"] = self._mu()
        sched.set_timesteps(None if "sigmas" in kwargs else steps, **kwargs)
        return sched.sigmas.float().cpu()

    def _mu(self) -> float | None:
        """The resolution-dependent shift the pipeline passes (Flux always; SD 3 with dynamic shifting), else None."""
        from diffusers.pipelines.flux.pipeline_flux import calculate_shift

        cfg = self.pipe.scheduler.config
        if not (self.family == "flux" or cfg.get("use_dynamic_shifting", False)):
            return None
        patch = 2 if self.family == "flux" else self.transformer.config.patch_size   # Flux packs 2 x 2 patches
        tokens = (self.latent // patch) ** 2
        return calculate_shift(tokens, cfg.get("base_image_seq_len", 256), cfg.get("max_image_seq_len", 4096),
                               cfg.get("base_shift", 0.5), cfg.get("max_shift", 1.15))

    def shifted(self, u: torch.Tensor) -> torch.Tensor:
        """Noise levels ``u`` in [0, 1] shifted as the scheduler shifts its timesteps: by ``mu`` under dynamic
        shifting, else ``shift u / (1 + (shift - 1) u)`` (the identity for shift 1)."""
        cfg = self.pipe.scheduler.config
        if cfg.get("use_dynamic_shifting", False):
            from diffusers import FlowMatchEulerDiscreteScheduler

            return FlowMatchEulerDiscreteScheduler.from_config(cfg).time_shift(self._mu(), 1.0, u)
        shift = float(cfg.get("shift", 1.0))
        return shift * u / (1 + (shift - 1) * u)

    def grid_sigma(self, t: torch.Tensor) -> torch.Tensor:
        """The noise level of timesteps ``t`` of the scheduler's training grid: ``shifted(t / T)``."""
        return self.shifted(t.float() / self.n_train)

    def sample_sigmas(self, n: int, generator: torch.Generator) -> torch.Tensor:
        """``n`` training noise levels: ``t ~ U{1..T}``, ``sigma = shifted(t / T)`` (the scheduler's training grid
        with its shift: what diffusers' SD 3 / Flux training scripts draw with uniform weighting)."""
        return self.grid_sigma(torch.randint(1, self.n_train + 1, (n,), generator=generator))

    # -- calling the transformer ------------------------------------------------------------------------
    def kwargs(self, z: torch.Tensor, sigma: torch.Tensor | float, ctx) -> dict:
        """Keyword arguments of ``transformer(**kwargs)`` for latents ``z`` at noise level ``sigma`` with text
        ``ctx`` (a Context with ``pooled``), as the pipeline's loop gives them; ``return_dict=False``."""
        n = z.shape[0]
        if ctx.embeds.shape[0] != n:
            raise ConfigError(f"{n} latents but {ctx.embeds.shape[0]} prompts: give one prompt per latent")
        sigma = torch.as_tensor(sigma, dtype=torch.float32, device=z.device).reshape(-1).expand(n)
        dtype = self.transformer.dtype
        kw = {"hidden_states": z.to(dtype), "encoder_hidden_states": ctx.embeds.to(dtype),
              "pooled_projections": ctx.pooled.to(dtype), "return_dict": False}
        if self.family == "sd3":
            kw["timestep"] = sigma * self.n_train
            return kw
        h = self.latent // 2
        img = torch.zeros(h, h, 3)
        img[..., 1] += torch.arange(h)[:, None]
        img[..., 2] += torch.arange(h)[None, :]
        kw.update(timestep=sigma, img_ids=img.reshape(h * h, 3).to(z.device, dtype),
                  txt_ids=torch.zeros(ctx.embeds.shape[1], 3, device=z.device, dtype=dtype))
        if self.uses_guidance:
            kw["guidance"] = torch.full((n,), float(self.guidance), device=z.device, dtype=torch.float32)
        return kw

    def predict(self, call, z: torch.Tensor, sigma, ctx) -> torch.Tensor:
        """The velocity (float32) from ``call(**kwargs)`` (the transformer, or a frozen call of it)."""
        return call(**self.kwargs(z, sigma, ctx))[0].float()

    @torch.no_grad()
    def sample_partway(self, call, z: torch.Tensor, sigmas: torch.Tensor, k: int, uncond, cond,
                       guidance: float) -> torch.Tensor:
        """Flow-Euler from ``z`` over the first ``k`` steps of ``sigmas`` with the concept text ``cond``, as the
        pipeline samples: SD 3 with classifier-free guidance ``guidance`` against ``uncond``; Flux (one
        conditional pass; a guidance-distilled model reads its guidance embedding) without."""
        for i in range(k):
            s, s_next = sigmas[i], sigmas[i + 1]
            if self.family == "flux":
                v = self.predict(call, z, s, cond)
            else:
                from .family import Context

                v_u, v_c = self.predict(call, torch.cat([z, z]), s, Context.cat([uncond, cond])).chunk(2)
                v = v_u + guidance * (v_c - v_u)
            z = z + (s_next - s) * v.to(z.dtype)
        return z
