"""ESD: Erasing Concepts from Diffusion Models (Gandikota et al., ICCV 2023, arXiv 2303.07345).

Fine-tune the UNet so that its concept-conditioned prediction equals the frozen model's negatively
guided one (paper eq. 2, esd.md section 1)::

    target(x_t, t) = eps*(x_t, "", t) - eta * [eps*(x_t, c, t) - eps*(x_t, "", t)]
    loss = || eps_theta(x_t, c, t) - stopgrad(target) ||^2

``eta`` is stored in the **paper convention**: ``eta = 0`` maps the concept onto the
unconditional prediction, ``eta > 0`` pushes away from it. The diffusers rewrite of the reference
(rohitgandikota/erasing ``esd_sd.py``) writes ``eps*(c) - eta_code (eps*(c) - eps*(""))``, so
**eta_paper = eta_code - 1**: its shipped ``2`` is ``eta=1`` here, ``esd_sdxl.py``'s ``1`` is
``eta=0`` (use :func:`eta_from_rewrite`). With ``erase_from`` (attribute erasure, rewrite only) the
target is ``eps*(x_t, c_from) - (eta + 1) [eps*(x_t, c) - eps*(x_t, "")]``, which is the formula
above when ``c_from = c``.

x_t (esd.md section 4): per iteration draw ``k ~ U{0..T-1}``, run DDIM (eta_ddim 0, ``ddim_steps`` =
T, classifier-free guidance ``sample_guidance`` with condition c) from pure noise over the first k
timesteps, and query the aligned timestep ``t = timesteps[k]``. ``sampler="frozen"`` samples with
the original weights, as the diffusers rewrite does (default: the target then does not drift with
the weights being trained); ``sampler="trained"`` samples with the weights being trained, as the
paper-era CompVis script does. (Deviation: esd.md's toolkit table defaults to "trained".)

Prompts: the reference conditions on the concept text itself and, for several concepts, samples
one per iteration; here one (c, c_from) pair is sampled per iteration (:func:`esd_pairs`): by
default c is each concept itself. When the model's preset provider (:mod:`erasekit.presets`) gives
a concept its own prompts and a short attribute text (canvas-mini: the concept's captions and
``"Van Gogh style."``), the concept is erased with the rewrite's attribute form
(``prompt_form="attribute"``, default): c_from is each of those prompts (x_t is sampled from it and
the trained model is conditioned on it) and c is the attribute text, so the negative direction
``eps*(c) - eps*("")`` carries the concept and not the rest of the prompt. ``prompt_form="caption"``
uses the prompts themselves as c (on canvas-mini that also erased the captions' objects; docs/presets.md).

Parameter sets (esd.md section 3, :mod:`erasekit.erase.param_sets`): ``esd-x`` (cross-attention,
default; styles, objects, celebrities), ``esd-u`` (everything else; nudity and global concepts),
``esd-x-strict``, ``full``, and the paper-era ``xattn`` / ``noxattn``.

Memory: eps* does not come from a second UNet. :meth:`Trainer.frozen` calls the one UNet through
``torch.func.functional_call`` with the original values of the trained tensors only, so the frozen
model costs a copy of the trained subset (ESD-x of SD 1.4: about 50 MB instead of 3.4 GB), and Adam
state exists only for that subset; bf16 autocast and gradient checkpointing are engine options.

Presets (``preset``; None fields take them): ``auto`` asks the model's preset provider first
(canvas-mini: ``canvas``, 400 steps at lr 1e-3 with 20 DDIM steps, measured there), else ``sd``,
esd.md's toolkit defaults, with the parameter set by kind (esd.md section 3):

=============  =====  =====  ==========  ===============  ==========================================
preset         steps  lr     ddim_steps  sample_guidance  param_set
=============  =====  =====  ==========  ===============  ==========================================
``sd``         1000   1e-5   50          3.0              ``esd-u`` for nudity, else ``esd-x``
=============  =====  =====  ==========  ===============  ==========================================

Adam without weight decay, batch 1, one concept sampled per iteration; fp32 master weights.

**SD 3 / Flux (flow matching).** These transformers are trained on ``x_s = (1 - s) x0 + s eps``
(``s`` the sigma in [0, 1]) to predict the velocity ``v = eps - x0`` (:mod:`erasekit.pipelines.flow`).
The same target holds in velocity space. At fixed ``s``, ``E[x0 | x_s] = (x_s - s eps_hat) / (1 - s)``,
so the predicted velocity is ``v = (eps_hat - x_s) / (1 - s)``, and ``eps_hat = -s grad log p_s(x_s)``:
``v = a_s x_s + b_s * score`` with ``a_s = -1 / (1 - s)``, ``b_s = -s / (1 - s)``. ESD's guided score
``score_u - eta (score_c - score_u)`` (weights ``1 + eta`` and ``-eta``, summing to 1) maps through this
affine map term by term, the ``a_s x_s`` parts too because the weights sum to 1::

    v_target(x_s, s) = v*(x_s, "", s) - eta [v*(x_s, c, s) - v*(x_s, "", s)]
    loss = || v_theta(x_s, c, s) - stopgrad(v_target) ||^2

i.e. :func:`esd_target` on velocities. x_s: per iteration ``k ~ U{0..T-1}`` with T = ``ddim_steps``,
flow-Euler from pure noise over the first k of the pipeline's T sigmas (its ``FlowMatchEulerDiscreteScheduler``
with its shift; Flux's resolution-dependent ``mu``), conditioned on c as the pipeline samples: SD 3 with
classifier-free guidance ``sample_guidance``, Flux with one conditional pass (it has no classifier-free
guidance; ``sample_guidance`` is unused there), then ``s = sigmas[k]``. A guidance-distilled Flux
(FLUX.1-dev, ``guidance_embeds``) reads ``guidance_embed`` (None: the pipeline's default 3.5) in every
call, sampling, frozen and trained, so the erasure targets the guidance users generate with.
``resolution`` (None: the pipeline's native size) sets the image size of x_s on every family.
Parameter sets on MMDiT (:mod:`~erasekit.erase.param_sets`): ``esd-x`` the joint attention's text-side
projections (``add_q_proj``, ``add_k_proj``, ``add_v_proj``, ``to_add_out``), ``esd-u`` the transformer
blocks outside the text side, ``esd-x-strict``, ``full``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from ..errors import ConfigError
from ..presets import concept_context, world_preset_names
from .engine import TrainConfig, Trainer
from .param_sets import select_params
from .registry import check, register

PRESETS = {"sd": dict(steps=1000, lr=1e-5, ddim_steps=50, sample_guidance=3.0)}
KIND_PARAM_SET = {"nudity": "esd-u"}   # esd.md section 3: ESD-u for global concepts, else ESD-x


def eta_from_rewrite(eta_code: float) -> float:
    """Paper-convention eta of the diffusers rewrite's ``negative_guidance`` (esd.md section 2)."""
    return eta_code - 1.0


@dataclass
class ESDConfig(TrainConfig):
    """Options of ESD (defaults: esd.md "Defaults (toolkit)"; None means "from the preset")."""

    eta: float = field(default=1.0, metadata={"help": "negative guidance, paper convention (rewrite's value - 1)"})
    param_set: str | None = field(default=None, metadata={
        "help": "esd-x, esd-u, esd-x-strict, full, xattn, noxattn (None: esd-u for nudity, else esd-x)"})
    preset: str = field(default="auto", metadata={"help": "auto, sd, or a provider's (canvas-mini: canvas)"})
    sampler: str = field(default="frozen", metadata={"help": "who samples x_t: frozen (rewrite) or trained (paper)"})
    ddim_steps: int | None = field(default=None, metadata={"help": "steps of the x_t schedule (DDIM; flow Euler "
                                                                    "on sd3/flux)"})
    sample_guidance: float | None = field(default=None, metadata={"help": "CFG scale when sampling x_t"})
    erase_from: str | list[str] | None = field(default=None, metadata={
        "help": "erase the concept from this broader prompt (or these, one sampled per iteration)"})
    prompts: list[str] | None = field(default=None, metadata={
        "help": "prompts c that carry the concepts (default: the model's prompts of each concept, else itself)"})
    resolution: int | None = field(default=None, metadata={
        "help": "image side in pixels of the sampled x_t (None: the model's native size)"})
    guidance_embed: float | None = field(default=None, metadata={
        "help": "guidance-distilled Flux (FLUX.1-dev): its guidance embedding in every call (None: the "
                "pipeline's default, 3.5; other models: must stay None)"})
    prompt_form: str = field(default="attribute", metadata={
        "help": "concepts with model prompts (canvas-mini: captions): attribute (erase the concept's short "
                "text from each prompt) or caption (the whole prompt)"})

    def validate(self) -> None:
        super().validate()
        names = ("auto", *PRESETS, *world_preset_names("esd"))
        check(self.preset in names, f"`preset` must be one of {', '.join(names)} but is {self.preset!r}")
        check(self.sampler in ("frozen", "trained"), f"`sampler` must be 'frozen' or 'trained' but is {self.sampler!r}")
        check(self.ddim_steps is None or self.ddim_steps >= 1, f"`ddim_steps` must be >= 1 but is {self.ddim_steps}")
        check(self.sample_guidance is None or self.sample_guidance >= 0,
              f"`sample_guidance` must be >= 0 but is {self.sample_guidance}")
        check(self.prompts is None or (isinstance(self.prompts, list) and self.prompts
                                       and all(isinstance(p, str) and p.strip() for p in self.prompts)),
              f"`prompts` must be a non-empty list of prompts but is {self.prompts!r}")
        check(self.erase_from is None or (isinstance(self.erase_from, str) and self.erase_from.strip())
              or (isinstance(self.erase_from, list) and self.erase_from
                  and all(isinstance(p, str) and p.strip() for p in self.erase_from)),
              f"`erase_from` must be a prompt or a non-empty list of prompts but is {self.erase_from!r}")
        check(self.prompt_form in ("attribute", "caption"),
              f"`prompt_form` must be 'attribute' or 'caption' but is {self.prompt_form!r}")
        check(self.eta >= 0, f"`eta` must be >= 0 (paper convention; the rewrite's value minus 1) but is {self.eta}")
        check(self.resolution is None or (isinstance(self.resolution, int) and self.resolution > 0),
              f"`resolution` must be a positive number of pixels or None but is {self.resolution!r}")

    def resolved(self, ctx) -> dict:
        """The preset name and every preset-controlled value for the concepts of ``ctx`` on its model."""
        name = None if self.preset == "auto" else self.preset
        found = ctx.ask("esd_preset", name)
        if found is None:
            name = name or "sd"
            if name not in PRESETS:
                raise ConfigError(f"`preset` must be auto or one of {', '.join(PRESETS)} for this model "
                                  f"({ctx.provider.name} presets) but is {name!r}")
            found = name, {**PRESETS[name], "param_set": KIND_PARAM_SET.get(ctx.kind, "esd-x")}
        name, values = found
        out = {"preset": name}
        for key, value in values.items():
            out[key] = getattr(self, key) if getattr(self, key) is not None else value
        return out


def esd_target(e_0: torch.Tensor, e_p: torch.Tensor, e_from: torch.Tensor, eta: float) -> torch.Tensor:
    """Paper eq. 2 with ``eta`` in the paper convention; ``e_from`` is eps*(c_from) (= ``e_p`` normally).

    ``e_from - (eta + 1)(e_p - e_0)`` equals ``e_0 - eta (e_p - e_0)`` when ``e_from = e_p``, and the
    rewrite's ``e_from - eta_code (e_p - e_0)`` with ``eta_code = eta + 1``.
    """
    return e_from - (eta + 1.0) * (e_p - e_0)


def _ddim(pipe, steps: int):
    from diffusers import DDIMScheduler

    sched = DDIMScheduler.from_config(pipe.scheduler.config)
    sched.set_timesteps(steps)
    return sched


@torch.no_grad()
def sample_partway(predict, z, sched, k: int, ctx, guidance: float) -> torch.Tensor:
    """Run DDIM with CFG over the first ``k`` timesteps of ``sched`` from ``z``.

    ``ctx`` is a batch-2 Context (unconditional, concept); ``predict(z2, t, ctx)`` returns eps.
    """
    for t in sched.timesteps[:k]:
        eps_u, eps_c = predict(torch.cat([z, z]), t, ctx).float().chunk(2)
        z = sched.step(eps_u + guidance * (eps_c - eps_u), t, z).prev_sample
    return z


def esd_pairs(concepts: list[str], config: ESDConfig, ctx) -> list[tuple[str, str | None]]:
    """The (c, c_from) prompt pairs, one sampled per iteration; ``c_from`` None means c itself.

    Explicit ``prompts`` / ``erase_from`` pair every prompt with every broader prompt. Otherwise a
    concept with prompts and an attribute text from the model's provider (``ctx``) gets its
    prompts: with ``prompt_form="attribute"`` each prompt is c_from and the attribute text
    (``"Van Gogh style."``) is c; with ``"caption"`` each prompt is c. Any other concept is c itself.
    """
    if config.prompts or config.erase_from:
        prompts = config.prompts or [p for c in concepts for p in ctx.prompts(c)]
        sources = [config.erase_from] if isinstance(config.erase_from, str) else list(config.erase_from or [None])
        return [(c, f) for c in prompts for f in sources]
    pairs = []
    for concept in concepts:
        short = ctx.attribute(concept)
        if short is not None and config.prompt_form == "attribute":
            pairs += [(short, cap) for cap in ctx.prompts(concept)]
        else:
            pairs += [(p, None) for p in ctx.prompts(concept)]
    return pairs


@register("esd", ESDConfig, components=("unet", "transformer"), families=("sd1", "sd2", "sdxl", "sd3", "flux"))
def esd(pipe, concepts: list[str], config: ESDConfig):
    """Erase ``concepts`` with ESD; returns an Edit of the trained parameters (see module docstring)."""
    from ..pipelines import Context, FamilyAdapter

    about = concept_context(pipe, concepts, config)
    opts = config.resolved(about)
    pairs = esd_pairs(concepts, config, about)
    texts = list(dict.fromkeys(t for pair in pairs for t in pair if t is not None))
    adapter = FamilyAdapter(pipe)
    ctx = adapter.encode(["", *texts])  # every prompt encoded once
    uncond, row = ctx[0:1], {t: 1 + i for i, t in enumerate(texts)}
    # The frozen model is queried with ("", c) or ("", c, c_from); the trained model sees the last one.
    queries = [Context.cat([uncond] + [ctx[row[t]:row[t] + 1] for t in pair if t is not None]) for pair in pairs]
    manifest = {"resolved": opts, "eta_convention": "paper", "prompt_form": config.prompt_form,
                "pairs": [{"c": c, "c_from": f} for c, f in pairs],
                **about.record(opts["preset"], {**opts, "eta": config.eta, "prompt_form": config.prompt_form})}
    if adapter.mmdit:
        return _esd_flow(pipe, config, opts, uncond, queries, manifest)
    if config.guidance_embed is not None:
        raise ConfigError("`guidance_embed` sets the guidance embedding of guidance-distilled Flux models; "
                          f"leave it None on this {adapter.family} pipeline")
    unet, sched = pipe.unet, _ddim(pipe, opts["ddim_steps"])
    side = unet.config.sample_size if config.resolution is None else config.resolution // pipe.vae_scale_factor
    size = None if config.resolution is None else (config.resolution, config.resolution)
    shape = (1, unet.config.in_channels, side, side)

    with Trainer(pipe, select_params(pipe, opts["param_set"]), config, steps=opts["steps"], lr=opts["lr"]) as tr:
        def predict_frozen(z, t, c):
            return tr.frozen(unet, z, t, **c.unet_kwargs(pipe, size)).sample

        def predict_trained(z, t, c):
            with torch.no_grad():
                return unet(z, t, **c.unet_kwargs(pipe, size)).sample

        sampler = predict_frozen if config.sampler == "frozen" else predict_trained

        def loss_fn(i: int) -> torch.Tensor:
            query = queries[int(torch.randint(len(queries), (1,), generator=tr.rng))]
            trained_on = query[-1:]  # c_from when given, else c
            k = int(torch.randint(opts["ddim_steps"], (1,), generator=tr.rng))
            z = torch.randn(shape, generator=tr.rng).to(tr.device) * sched.init_noise_sigma
            z = sample_partway(sampler, z, sched, k, Context.cat([uncond, trained_on]), opts["sample_guidance"])
            t = sched.timesteps[k]  # the noise level the partial sample is at
            eps = predict_frozen(torch.cat([z] * len(query.embeds)), t, query).float().chunk(len(query.embeds))
            e_0, e_p, e_from = eps[0], eps[1], eps[-1]
            target = esd_target(e_0, e_p, e_from, config.eta)
            e_n = unet(z, t, **trained_on.unet_kwargs(pipe, size)).sample
            return F.mse_loss(e_n.float(), target)

        return tr.fit(loss_fn, manifest=manifest)


def _esd_flow(pipe, config: ESDConfig, opts: dict, uncond, queries: list, manifest: dict):
    """ESD on SD 3 / Flux: the same loss on velocities, x_s sampled by flow Euler (module docstring)."""
    from ..pipelines.flow import FlowModel

    fm = FlowModel(pipe, config.resolution, config.guidance_embed)
    sigmas, tf = fm.sigmas(opts["ddim_steps"]), pipe.transformer
    manifest = {**manifest, "flow": {"resolution": fm.size, "guidance_embed": fm.guidance,
                                     "sigmas": [round(float(s), 6) for s in sigmas]}}

    with Trainer(pipe, select_params(pipe, opts["param_set"]), config, steps=opts["steps"], lr=opts["lr"]) as tr:
        def frozen(**kw):
            return tr.frozen(tf, **kw)

        sampler = frozen if config.sampler == "frozen" else tf   # sample_partway runs without grad

        def loss_fn(i: int) -> torch.Tensor:
            query = queries[int(torch.randint(len(queries), (1,), generator=tr.rng))]
            trained_on, n = query[-1:], len(query.embeds)
            k = int(torch.randint(opts["ddim_steps"], (1,), generator=tr.rng))
            z = fm.sample_partway(sampler, fm.noise(1, tr.rng), sigmas, k, uncond, trained_on, opts["sample_guidance"])
            v = fm.predict(frozen, torch.cat([z] * n), sigmas[k], query).chunk(n)
            target = esd_target(v[0], v[1], v[-1], config.eta)
            return F.mse_loss(fm.predict(tf, z, sigmas[k], trained_on), target)

        return tr.fit(loss_fn, manifest=manifest)
