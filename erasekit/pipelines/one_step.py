"""The one-step pipeline that SFD produces: text encoder -> one generator UNet call -> VAE.

SFD (Score Forgetting Distillation, arXiv 2409.11219) distils a diffusion model into a one-step
generator G_theta with the teacher's UNet architecture, used at one fixed timestep t_init
(sfd.md section 1). With ``a = sqrt(abar_{t_init})`` and ``b = sqrt(1 - abar_{t_init})``:

    x_g = G_theta(z, c) = (b z - b eps_theta(b z, t_init, c)) / a,    z ~ N(0, I)

i.e. "add noise to a zero sample at t_init, then take the x0 prediction". No classifier-free
guidance at sampling time (the guidance was distilled in). The generator ships as an ordinary
:class:`~erasekit.pipelines.Edit` that replaces every UNet weight; its manifest says
``"sampler": "one_step"`` and gives ``"generator_timestep"``. :func:`one_step_pipeline` turns a
stock pipeline plus such an Edit into a :class:`OneStepPipeline`, which
:func:`erasekit.pipelines.generate` samples with the same call as any multi-step pipeline.

Example:
    >>> import erasekit
    >>> from erasekit.pipelines import Edit, generate, one_step_pipeline
    >>> pipe = erasekit.load_pipeline("canvas-mini")
    >>> edit = Edit.load("sfd-van-gogh.safetensors", pipe)
    >>> fast = one_step_pipeline(pipe, edit)          # pipe itself is left unchanged
    >>> images = generate(fast, "A Cats image in Pop Art style.", seeds=[0, 1, 2])
"""

from __future__ import annotations

import copy

import torch
from tqdm.auto import tqdm

from ..errors import ConfigError, EditError
from .family import Context, FamilyAdapter
from .locking import pipeline_lock, share_lock

ONE_STEP = "one_step"


def alphas_cumprod(scheduler) -> torch.Tensor:
    """abar_t for t = 0..T-1 of a pipeline's noise schedule (float32, CPU)."""
    from diffusers import DDPMScheduler

    return DDPMScheduler.from_config(scheduler.config).alphas_cumprod.float()


def to_x0_eps(out: torch.Tensor, x_t: torch.Tensor, a: torch.Tensor, b: torch.Tensor,
              prediction_type: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(x0, eps) from a UNet output of the given parametrisation, with x_t = a x0 + b eps."""
    if prediction_type == "epsilon":
        return (x_t - b * out) / a, out
    if prediction_type == "v_prediction":
        return a * x_t - b * out, a * out + b * x_t
    if prediction_type == "sample":
        return out, (x_t - a * out) / b
    raise ConfigError(f"prediction_type must be epsilon, v_prediction or sample but is {prediction_type!r}")


def unet_output(unet, x: torch.Tensor, t: torch.Tensor, ctx: Context, pipe) -> torch.Tensor:
    """``unet(x, t, ctx).sample`` in float32, whatever the UNet's own dtype."""
    dtype = next(unet.parameters()).dtype  # also for a DistributedDataParallel-wrapped UNet
    ctx = Context(ctx.embeds.to(dtype), None if ctx.pooled is None else ctx.pooled.to(dtype))
    return unet(x.to(dtype), t, **ctx.unet_kwargs(pipe)).sample.float()


def one_step_latents(unet, z: torch.Tensor, ctx: Context, t_init: int, abar: torch.Tensor, pipe,
                     prediction_type: str = "epsilon") -> torch.Tensor:
    """x_g = G(z, c): the generator's x0 prediction at ``t_init`` from the input ``b z`` (sfd.md section 1)."""
    a, b = abar[t_init].sqrt().to(z.device), (1 - abar[t_init]).sqrt().to(z.device)
    x_in = b * z.float()
    t = torch.full((z.shape[0],), t_init, device=z.device, dtype=torch.long)
    return to_x0_eps(unet_output(unet, x_in, t, ctx, pipe), x_in, a, b, prediction_type)[0]


class OneStepPipeline:
    """A distilled one-step generator with the stock text encoder(s) and VAE.

    It has the attributes erasekit reads from a Stable Diffusion pipeline (``unet`` is the
    generator; ``text_encoder``/``tokenizer``, SDXL's ``text_encoder_2``/``tokenizer_2``, ``vae``,
    ``scheduler`` for the noise schedule, ``vae_scale_factor``), a diffusers-style ``__call__``, and
    ``erasekit_generate`` so :func:`erasekit.pipelines.generate` dispatches here. A plain class, not
    a ``DiffusionPipeline``, so that ``import erasekit.pipelines`` stays free of diffusers.
    """

    def __init__(self, vae, text_encoder, tokenizer, unet, scheduler, text_encoder_2=None, tokenizer_2=None,
                 t_init: int = 625):
        self.vae, self.text_encoder, self.tokenizer, self.unet = vae, text_encoder, tokenizer, unet
        self.text_encoder_2, self.tokenizer_2, self.scheduler = text_encoder_2, tokenizer_2, scheduler
        self.vae_scale_factor = 2 ** (len(vae.config.block_out_channels) - 1)
        from diffusers.image_processor import VaeImageProcessor

        self.image_processor = VaeImageProcessor(vae_scale_factor=self.vae_scale_factor)
        self._abar = alphas_cumprod(scheduler)
        if not 0 < int(t_init) < len(self._abar):
            raise ConfigError(f"t_init must be in 1..{len(self._abar) - 1} (the schedule's timesteps) "
                              f"but is {t_init}")
        self._t_init = int(t_init)

    def __repr__(self) -> str:
        return f"OneStepPipeline(t_init={self.t_init}, family={FamilyAdapter(self).family!r}, device={self.device})"

    @property
    def device(self) -> torch.device:
        return self.unet.device

    @property
    def dtype(self) -> torch.dtype:
        return self.unet.dtype

    def to(self, *args, **kwargs) -> "OneStepPipeline":
        """Move every module (as ``DiffusionPipeline.to``); returns self."""
        for m in (self.vae, self.text_encoder, self.text_encoder_2, self.unet):
            if m is not None:
                m.to(*args, **kwargs)
        return self

    @property
    def t_init(self) -> int:
        return self._t_init

    def decode(self, latents: torch.Tensor, output_type: str = "pil"):
        """VAE-decode latents into images of ``output_type`` (pil, np, pt or latent)."""
        if output_type == "latent":
            return latents
        cfg = self.vae.config
        latents = latents / cfg.scaling_factor + (getattr(cfg, "shift_factor", None) or 0.0)
        image = self.vae.decode(latents.to(self.vae.dtype)).sample
        return self.image_processor.postprocess(image.float(), output_type=output_type)

    @torch.no_grad()
    def __call__(self, prompt: str | list[str], generator=None, height: int | None = None,
                 width: int | None = None, output_type: str = "pil", latents: torch.Tensor | None = None,
                 return_dict: bool = True):
        """One image per prompt: z ~ N(0, I) (from ``generator``, one per image allowed), one UNet call."""
        from diffusers.pipelines.pipeline_utils import ImagePipelineOutput
        from diffusers.utils.torch_utils import randn_tensor

        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        height = height or self.unet.config.sample_size * self.vae_scale_factor
        width = width or self.unet.config.sample_size * self.vae_scale_factor
        shape = (len(prompts), self.unet.config.in_channels, height // self.vae_scale_factor,
                 width // self.vae_scale_factor)
        if latents is None:
            latents = randn_tensor(shape, generator=generator, device=self.device, dtype=torch.float32)
        ctx = FamilyAdapter(self).encode(prompts)
        x0 = one_step_latents(self.unet, latents.to(self.device), ctx, self.t_init, self._abar, self,
                              self.scheduler.config.get("prediction_type", "epsilon"))
        images = self.decode(x0, output_type)
        return ImagePipelineOutput(images=images) if return_dict else (images,)

    def erasekit_generate(self, prompts: list[str], seeds: list[int], sampling, progress: bool = False,
                          output_type: str = "pil") -> list:
        """What :func:`erasekit.pipelines.generate` calls: one image per (prompt, seed), seeded per image.

        ``sampling.sampler``, ``steps`` and ``guidance`` do not apply (one step, guidance distilled
        in); ``batch_size``, ``height`` and ``width`` do.
        """
        out, bs = [], sampling.batch_size
        for i in tqdm(range(0, len(prompts), bs), desc="generate (one step)", disable=not progress):
            gens = [torch.Generator("cpu").manual_seed(int(s)) for s in seeds[i:i + bs]]
            images = self(prompts[i:i + bs], generator=gens, height=sampling.height, width=sampling.width,
                          output_type=output_type).images
            out.extend(list(images))
        return out


def one_step_pipeline(pipe, edit=None, t_init: int | None = None) -> OneStepPipeline:
    """The one-step sampler for ``pipe`` with the generator of an SFD ``edit``; ``pipe`` is left unchanged.

    With an Edit, the generator is a copy of ``pipe.unet`` carrying the Edit's weights and
    ``t_init`` comes from its manifest. Without one, ``pipe.unet`` itself (shared, not copied) is
    used as a one-step generator at ``t_init`` (e.g. the teacher that SFD starts from).
    """
    if edit is None:
        if t_init is None:
            raise ConfigError("give an SFD Edit, or t_init to use the pipeline's own UNet as the generator")
        unet = pipe.unet
    else:
        if not edit.one_step:
            raise EditError(f"this Edit (method {edit.manifest.get('method')!r}) is not a one-step generator: "
                            "apply it with edit.apply(pipe) and sample with generate(pipe, ...)")
        others = [k for k in edit.keys if not k.startswith("unet/")]
        if others:
            raise EditError(f"a one-step generator Edit changes only the UNet, this one also {others[0]!r}")
        edit.check(pipe)
        t_init = int(edit.manifest["generator_timestep"]) if t_init is None else t_init
        with pipeline_lock(pipe):   # copied while no other thread applies or removes an Edit
            unet = copy.deepcopy(pipe.unet)
        with torch.no_grad():
            for key in edit.keys:
                param = unet.get_parameter(key.split("/", 1)[1])
                param.copy_(edit.new_weight(key, param.detach()))
        unet.requires_grad_(False)
    fast = OneStepPipeline(vae=pipe.vae, text_encoder=pipe.text_encoder, tokenizer=pipe.tokenizer, unet=unet,
                           scheduler=pipe.scheduler, text_encoder_2=getattr(pipe, "text_encoder_2", None),
                           tokenizer_2=getattr(pipe, "tokenizer_2", None), t_init=t_init)
    share_lock(fast, pipe)   # it shares pipe's text encoders and VAE, so it shares its lock
    return fast
