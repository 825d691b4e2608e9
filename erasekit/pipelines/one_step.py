"""The one-step pipeline that SFD produces: text encoder -> one generator UNet call -> VAE.

SFD (Score Forgetting Distillation, arXiv 2409.11219) distils a diffusion model into a one-step
generator G_theta with the teacher's UNet architecture, used at one fixed timestep t_init
(sfd.md section 1). With ``a = sqrt(abar_{t_init})`` and ``b = sqrt(1 - abar_{t_init})``:

    x_g = G_theta(z, c) = (b z - b eps_theta(b z, t_init, c)) / a,    z ~ N(0, I)

i.e. "add noise to a zero sample at t_init, then take the x0 prediction". On SD 3 (flow matching,
x_s = (1 - s) x0 + s eps, velocity v = eps - x0) the same construction reads, with s = sigma_{t_init},

    x_g = G_theta(z, c) = s z - s v_theta(s z, s, c) = s (z - v_theta(s z, s, c))

(the generator is a copy of the transformer; :class:`NoiseSchedule`). No classifier-free
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
    """(x0, eps) from a denoiser output of the given parametrisation, with x_t = a x0 + b eps.

    ``flow`` is a flow-matching velocity v = eps - x0 with a = 1 - sigma, b = sigma: x0 = x_t - b v,
    eps = x_t + a v."""
    if prediction_type == "epsilon":
        return (x_t - b * out) / a, out
    if prediction_type == "v_prediction":
        return a * x_t - b * out, a * out + b * x_t
    if prediction_type == "sample":
        return out, (x_t - a * out) / b
    if prediction_type == "flow":
        return x_t - b * out, x_t + a * out
    raise ConfigError(f"prediction_type must be epsilon, v_prediction, sample or flow but is {prediction_type!r}")


def unet_output(unet, x: torch.Tensor, t: torch.Tensor, ctx: Context, pipe) -> torch.Tensor:
    """``unet(x, t, ctx).sample`` in float32, whatever the UNet's own dtype."""
    dtype = next(unet.parameters()).dtype  # also for a DistributedDataParallel-wrapped UNet
    ctx = Context(ctx.embeds.to(dtype), None if ctx.pooled is None else ctx.pooled.to(dtype))
    return unet(x.to(dtype), t, **ctx.unet_kwargs(pipe)).sample.float()


class NoiseSchedule:
    """The teacher's forward process x_t = a_t x0 + b_t eps at the integer timesteps t of its training grid,
    and how a denoiser of its architecture is called there (SFD's teacher, fake score and generator).

    DDPM (UNet families): a_t = sqrt(abar_t), b_t = sqrt(1 - abar_t); the UNet predicts eps, v or x0
    (the scheduler's ``prediction_type``). Flow matching (``sd3``): sigma_t = the scheduler's shifted
    t / T (:meth:`~erasekit.pipelines.flow.FlowModel.shifted`, the grid diffusers' SD 3 training draws
    from), a_t = 1 - sigma_t, b_t = sigma_t; the transformer predicts v = eps - x0 (``"flow"``), so
    x0 = x_t - sigma v and eps = x_t + (1 - sigma) v, both affine in v.
    """

    def __init__(self, pipe):
        from .flow import FlowModel
        from .mmdit import mmdit_family

        self.pipe = pipe
        self.flow = FlowModel(pipe) if mmdit_family(pipe) is not None else None
        if self.flow is not None:
            if self.flow.family != "sd3":
                raise ConfigError(f"the one-step generator reads SD 3 transformers, not {self.flow.family}")
            self.abar, self.n = None, self.flow.n_train
            self.prediction_type = "flow"
        else:
            self.abar = alphas_cumprod(pipe.scheduler)
            self.n = len(self.abar)
            self.prediction_type = pipe.scheduler.config.get("prediction_type", "epsilon")

    def __len__(self) -> int:
        return self.n

    def to(self, device) -> "NoiseSchedule":
        if self.abar is not None:
            self.abar = self.abar.to(device)
        return self

    def sigma(self, t: torch.Tensor) -> torch.Tensor:
        """Flow matching: the noise level sigma_t of grid timesteps ``t`` (float32)."""
        return self.flow.grid_sigma(t)

    def ab(self, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(a_t, b_t), shaped to broadcast over latents ``B x C x h x w``."""
        if self.flow is None:
            abar = self.abar.to(t.device)[t].view(-1, 1, 1, 1)
            return abar.sqrt(), (1 - abar).sqrt()
        s = self.sigma(t).view(-1, 1, 1, 1)
        return 1 - s, s

    def latent_shape(self, net, height: int | None = None, width: int | None = None,
                     scale: int = 1) -> tuple[int, int, int]:
        """(C, h, w) of one latent for denoiser ``net`` (its native size, or ``height x width`` pixels)."""
        cfg = net.config
        h = height // scale if height else cfg.sample_size
        w = width // scale if width else cfg.sample_size
        return int(cfg.in_channels), int(h), int(w)

    def output(self, net, x: torch.Tensor, t: torch.Tensor, ctx: Context, pipe=None) -> torch.Tensor:
        """``net``'s output (eps, v or x0 for a UNet, the velocity for a transformer) at ``(x, t)``, float32."""
        if self.flow is None:
            return unet_output(net, x, t, ctx, pipe if pipe is not None else self.pipe)
        dtype = next(net.parameters()).dtype
        kw = self.flow.kwargs(x, self.sigma(t).to(x.device), ctx)
        kw.update(hidden_states=x.to(dtype), encoder_hidden_states=ctx.embeds.to(dtype),
                  pooled_projections=ctx.pooled.to(dtype))
        return net(**kw)[0].float()

    def x0_eps(self, out: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(x0, eps) implied by a denoiser output ``out`` at ``(x_t, t)``."""
        a, b = self.ab(t)
        return to_x0_eps(out, x_t, a.to(x_t.device), b.to(x_t.device), self.prediction_type)


def one_step_latents(net, z: torch.Tensor, ctx: Context, t_init: int, schedule: NoiseSchedule,
                     pipe=None) -> torch.Tensor:
    """x_g = G(z, c): the generator's x0 prediction at ``t_init`` from the input ``b z`` (sfd.md section 1).

    DDPM: x_g = (b z - b eps_theta(b z)) / a; flow matching: x_g = sigma (z - v_theta(sigma z)), sigma = sigma_{t_init}.
    """
    t = torch.full((z.shape[0],), int(t_init), device=z.device, dtype=torch.long)
    _, b = schedule.ab(t)
    x_in = b.to(z.device) * z.float()
    return schedule.x0_eps(schedule.output(net, x_in, t, ctx, pipe), x_in, t)[0]


class OneStepPipeline:
    """A distilled one-step generator with the stock text encoder(s) and VAE.

    It has the attributes erasekit reads from a Stable Diffusion pipeline (``unet`` is the
    generator; ``text_encoder``/``tokenizer``, SDXL's ``text_encoder_2``/``tokenizer_2``, ``vae``,
    ``scheduler`` for the noise schedule, ``vae_scale_factor``), a diffusers-style ``__call__``, and
    ``erasekit_generate`` so :func:`erasekit.pipelines.generate` dispatches here. A plain class, not
    a ``DiffusionPipeline``, so that ``import erasekit.pipelines`` stays free of diffusers.

    SD 3: the generator is ``transformer`` (``unet`` is None) and ``base``, the stock SD 3 pipeline,
    gives the flow schedule, its third text encoder and its ``encode_prompt``, so that erasekit reads
    this pipeline as an SD 3 one (:class:`~erasekit.pipelines.FamilyAdapter`, ``FlowModel``; attacks).
    """

    def __init__(self, vae, text_encoder, tokenizer, unet, scheduler, text_encoder_2=None, tokenizer_2=None,
                 t_init: int = 625, transformer=None, base=None):
        self.vae, self.text_encoder, self.tokenizer, self.unet = vae, text_encoder, tokenizer, unet
        self.text_encoder_2, self.tokenizer_2, self.scheduler = text_encoder_2, tokenizer_2, scheduler
        self.transformer, self._base = transformer, base
        if base is not None:
            self.text_encoder_3, self.tokenizer_3 = getattr(base, "text_encoder_3", None), base.tokenizer_3
            self.default_sample_size, self.encode_prompt = base.default_sample_size, base.encode_prompt
        if (unet is None) == (transformer is None) or (transformer is not None and base is None):
            raise ConfigError("a one-step pipeline takes a generator UNet, or a generator transformer with its "
                              "base SD 3 pipeline (base=)")
        self.vae_scale_factor = 2 ** (len(vae.config.block_out_channels) - 1)
        from diffusers.image_processor import VaeImageProcessor

        self.image_processor = VaeImageProcessor(vae_scale_factor=self.vae_scale_factor)
        self._schedule = NoiseSchedule(self if base is None else base)
        if not 0 < int(t_init) < len(self._schedule):
            raise ConfigError(f"t_init must be in 1..{len(self._schedule) - 1} (the schedule's timesteps) "
                              f"but is {t_init}")
        self._t_init = int(t_init)

    @property
    def base_pipeline(self):
        """SD 3: the stock pipeline whose text side and schedule this one uses; None on UNet families."""
        return self._base

    @property
    def generator(self):
        """The generator network: the UNet, or SD 3's transformer."""
        return self.unet if self.unet is not None else self.transformer

    def __repr__(self) -> str:
        family = FamilyAdapter(self).family
        return f"OneStepPipeline(t_init={self.t_init}, family={family!r}, device={self.device})"

    @property
    def device(self) -> torch.device:
        return self.generator.device

    @property
    def dtype(self) -> torch.dtype:
        return self.generator.dtype

    def to(self, *args, **kwargs) -> "OneStepPipeline":
        """Move every module (as ``DiffusionPipeline.to``); returns self."""
        third = getattr(self, "text_encoder_3", None)
        for m in (self.vae, self.text_encoder, self.text_encoder_2, third, self.generator):
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
        """One image per prompt: z ~ N(0, I) (from ``generator``, one per image allowed), one generator call."""
        from diffusers.pipelines.pipeline_utils import ImagePipelineOutput
        from diffusers.utils.torch_utils import randn_tensor

        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        shape = (len(prompts), *self._schedule.latent_shape(self.generator, height, width, self.vae_scale_factor))
        if latents is None:
            latents = randn_tensor(shape, generator=generator, device=self.device, dtype=torch.float32)
        ctx = FamilyAdapter(self).encode(prompts)
        x0 = one_step_latents(self.generator, latents.to(self.device), ctx, self.t_init, self._schedule, self)
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

    With an Edit, the generator is a copy of ``pipe``'s UNet (SD 3: its transformer) carrying the Edit's
    weights and ``t_init`` comes from its manifest. Without one, the pipeline's own denoiser (shared, not
    copied) is used as a one-step generator at ``t_init`` (e.g. the teacher that SFD starts from).
    """
    from .mmdit import denoiser, mmdit_family

    family = mmdit_family(pipe)
    if family not in (None, "sd3"):
        raise ConfigError(f"one-step generators (SFD) exist for SD 1.x, 2.x, SDXL and SD 3, not {family}")
    comp = "unet" if family is None else "transformer"
    if edit is None:
        if t_init is None:
            raise ConfigError("give an SFD Edit, or t_init to use the pipeline's own denoiser as the generator")
        net = denoiser(pipe)
    else:
        if not edit.one_step:
            raise EditError(f"this Edit (method {edit.manifest.get('method')!r}) is not a one-step generator: "
                            "apply it with edit.apply(pipe) and sample with generate(pipe, ...)")
        others = [k for k in edit.keys if not k.startswith(f"{comp}/")]
        if others:
            raise EditError(f"a one-step generator Edit changes only the {comp}, this one also {others[0]!r}")
        edit.check(pipe)
        t_init = int(edit.manifest["generator_timestep"]) if t_init is None else t_init
        with pipeline_lock(pipe):   # copied while no other thread applies or removes an Edit
            net = copy.deepcopy(denoiser(pipe))
        with torch.no_grad():
            for key in edit.keys:
                param = net.get_parameter(key.split("/", 1)[1])
                param.copy_(edit.new_weight(key, param.detach()))
        net.requires_grad_(False)
    nets = {"unet": net} if family is None else {"unet": None, "transformer": net, "base": pipe}
    fast = OneStepPipeline(vae=pipe.vae, text_encoder=pipe.text_encoder, tokenizer=pipe.tokenizer,
                           scheduler=pipe.scheduler, text_encoder_2=getattr(pipe, "text_encoder_2", None),
                           tokenizer_2=getattr(pipe, "tokenizer_2", None), t_init=t_init, **nets)
    share_lock(fast, pipe)   # it shares pipe's text encoders and VAE, so it shares its lock
    return fast
