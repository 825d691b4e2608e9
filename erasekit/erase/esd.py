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
the original weights, as the diffusers rewrite does and as issue 5 asks (default);
``sampler="trained"`` samples with the weights being trained, as the paper-era CompVis script does.
(Deviation: esd.md's toolkit table defaults to "trained"; the issue wins.)

Prompts: the reference conditions on the concept text itself and, for several concepts, samples
one per iteration; here one (c, c_from) pair is sampled per iteration (:func:`esd_pairs`): by
default c is each concept itself. canvas-mini's text encoder has only ever seen the UnlearnCanvas
captions ``"A {object} image in {style} style."``, so a canvas style or object is erased with the
rewrite's attribute form (``canvas_prompts="attribute"``, default): c_from is each of the label's
ten captions (x_t is sampled from it and the trained model is conditioned on it) and c is the
label's short text (``"Van Gogh style."``, ``"A Cats image."``), so the negative direction
``eps*(c) - eps*("")`` carries the style and not the caption's object. ``canvas_prompts="caption"``
uses the captions themselves as c; on canvas-mini that also erased the captions' objects (Van Gogh
at lr 3e-4: UA 70 %, CRA 61 %) where the attribute form kept them (UA 100 %, CRA 91 % at lr 1e-3;
benchmarks/sweeps/results/esd_*.jsonl).

Parameter sets (esd.md section 3, :mod:`erasekit.erase.param_sets`): ``esd-x`` (cross-attention,
default; styles, objects, celebrities), ``esd-u`` (everything else; nudity and global concepts),
``esd-x-strict``, ``full``, and the paper-era ``xattn`` / ``noxattn``.

Memory: eps* does not come from a second UNet. :meth:`Trainer.frozen` calls the one UNet through
``torch.func.functional_call`` with the original values of the trained tensors only, so the frozen
model costs a copy of the trained subset (ESD-x of SD 1.4: about 50 MB instead of 3.4 GB), and Adam
state exists only for that subset; bf16 autocast and gradient checkpointing are engine options.

Presets (``preset``; None fields take them):

=============  =====  =====  ==========  ===============  ======================================
preset         steps  lr     ddim_steps  sample_guidance  use
=============  =====  =====  ==========  ===============  ======================================
``sd``         1000   1e-5   50          3.0              SD 1.x / 2.x / SDXL (esd.md defaults)
``small``      400    1e-3   20          3.0              canvas-mini and other <= 256 px models
=============  =====  =====  ==========  ===============  ======================================

``auto`` picks ``small`` when the UNet's latent side is at most 32, else ``sd``. The ``small``
values were chosen on canvas-mini so that a concept finishes in minutes on a 2-core CPU: over
Van Gogh, Pop Art, Ukiyoe and Cubism (attribute form, eta 1) lr 3e-4 forgot 85 % on average, lr
1e-3 92.5 % with IRA 93 % and CRA 94 % (benchmarks/sweeps/results/esd_attr.jsonl, GPU).
Adam without weight decay, batch 1, one concept sampled per iteration; fp32 master weights.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from .data import canvas_label, concept_prompts
from .engine import TrainConfig, Trainer
from .param_sets import select_params
from .registry import check, register

PRESETS = {
    "sd": dict(steps=1000, lr=1e-5, ddim_steps=50, sample_guidance=3.0),
    "small": dict(steps=400, lr=1e-3, ddim_steps=20, sample_guidance=3.0),
}


def eta_from_rewrite(eta_code: float) -> float:
    """Paper-convention eta of the diffusers rewrite's ``negative_guidance`` (esd.md section 2)."""
    return eta_code - 1.0


@dataclass
class ESDConfig(TrainConfig):
    """Options of ESD (defaults: esd.md "Defaults (toolkit)"; None means "from the preset")."""

    eta: float = field(default=1.0, metadata={"help": "negative guidance, paper convention (rewrite's value - 1)"})
    param_set: str = field(default="esd-x", metadata={"help": "esd-x, esd-u, esd-x-strict, full, xattn, noxattn"})
    preset: str = field(default="auto", metadata={"help": "auto, sd or small (canvas-mini)"})
    sampler: str = field(default="frozen", metadata={"help": "who samples x_t: frozen (rewrite) or trained (paper)"})
    ddim_steps: int | None = field(default=None, metadata={"help": "DDIM steps of the x_t schedule"})
    sample_guidance: float | None = field(default=None, metadata={"help": "CFG scale when sampling x_t"})
    erase_from: str | list[str] | None = field(default=None, metadata={
        "help": "erase the concept from this broader prompt (or these, one sampled per iteration)"})
    prompts: list[str] | None = field(default=None, metadata={
        "help": "prompts c that carry the concepts (default: each concept itself; canvas labels: their captions)"})
    canvas_prompts: str = field(default="attribute", metadata={
        "help": "canvas labels: attribute (erase the label's short text from each caption) or caption"})

    def validate(self) -> None:
        super().validate()
        check(self.preset in ("auto", *PRESETS), f"`preset` must be one of auto, {', '.join(PRESETS)} "
                                                  f"but is {self.preset!r}")
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
        check(self.canvas_prompts in ("attribute", "caption"),
              f"`canvas_prompts` must be 'attribute' or 'caption' but is {self.canvas_prompts!r}")
        check(self.eta >= 0, f"`eta` must be >= 0 (paper convention; the rewrite's value minus 1) but is {self.eta}")

    def resolved(self, pipe) -> dict:
        """The preset name and every preset-controlled value for ``pipe``."""
        name = self.preset
        if name == "auto":
            name = "small" if pipe.unet.config.sample_size <= 32 else "sd"
        out = {"preset": name}
        for key, value in PRESETS[name].items():
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


def attribute_text(concept: str) -> str | None:
    """A canvas label's short text, c of the attribute form ("Van Gogh style.", "A Cats image."); else None."""
    from ..canvas.world import style_text

    found = canvas_label(concept)
    if found is None:
        return None
    kind, label = found
    return f"{style_text(label)} style." if kind == "style" else f"A {label} image."


def esd_pairs(concepts: list[str], config: ESDConfig) -> list[tuple[str, str | None]]:
    """The (c, c_from) prompt pairs, one sampled per iteration; ``c_from`` None means c itself.

    Explicit ``prompts`` / ``erase_from`` pair every prompt with every broader prompt. Otherwise a
    canvas label gets its captions: with ``canvas_prompts="attribute"`` each caption is c_from and
    the label's short text (``"Van Gogh style."``, ``"A Cats image."``) is c; with ``"caption"``
    each caption is c. Any other concept is c itself.
    """
    if config.prompts or config.erase_from:
        prompts = config.prompts or [p for c in concepts for p in concept_prompts(c)]
        sources = [config.erase_from] if isinstance(config.erase_from, str) else list(config.erase_from or [None])
        return [(c, f) for c in prompts for f in sources]
    pairs = []
    for concept in concepts:
        short = attribute_text(concept)
        if short is not None and config.canvas_prompts == "attribute":
            pairs += [(short, cap) for cap in concept_prompts(concept)]
        else:
            pairs += [(p, None) for p in concept_prompts(concept)]
    return pairs


@register("esd", ESDConfig)
def esd(pipe, concepts: list[str], config: ESDConfig):
    """Erase ``concepts`` with ESD; returns an Edit of the trained parameters (see module docstring)."""
    from ..pipelines import Context, FamilyAdapter

    opts = config.resolved(pipe)
    pairs = esd_pairs(concepts, config)
    texts = list(dict.fromkeys(t for pair in pairs for t in pair if t is not None))
    ctx = FamilyAdapter(pipe).encode(["", *texts])  # every prompt encoded once
    uncond, row = ctx[0:1], {t: 1 + i for i, t in enumerate(texts)}
    # The frozen model is queried with ("", c) or ("", c, c_from); the trained model sees the last one.
    queries = [Context.cat([uncond] + [ctx[row[t]:row[t] + 1] for t in pair if t is not None]) for pair in pairs]
    unet, sched = pipe.unet, _ddim(pipe, opts["ddim_steps"])
    shape = (1, unet.config.in_channels, unet.config.sample_size, unet.config.sample_size)

    with Trainer(pipe, select_params(pipe, config.param_set), config, steps=opts["steps"], lr=opts["lr"]) as tr:
        def predict_frozen(z, t, c):
            return tr.frozen(unet, z, t, **c.unet_kwargs(pipe)).sample

        def predict_trained(z, t, c):
            with torch.no_grad():
                return unet(z, t, **c.unet_kwargs(pipe)).sample

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
            e_n = unet(z, t, **trained_on.unet_kwargs(pipe)).sample
            return F.mse_loss(e_n.float(), target)

        return tr.fit(loss_fn, manifest={"resolved": opts, "eta_convention": "paper",
                                         "canvas_prompts": config.canvas_prompts,
                                         "pairs": [{"c": c, "c_from": f} for c, f in pairs]})
