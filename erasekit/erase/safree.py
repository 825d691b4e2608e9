"""SAFREE: training-free safe text-to-image generation (Yoon et al., ICLR 2025, arXiv 2410.12761); no weights change.

SAFREE moves the prompt's token embeddings out of a *toxic concept subspace* for the early denoising
steps. Here it acts on the text context the UNet reads (the rows of ``encoder_hidden_states``, the
same 77 x D rows on SD 1.x, 2.x and SDXL), through a hook on the UNet
(:mod:`erasekit.pipelines.inference`), so it runs as an inference-time Edit (``"sampler": "safree"``)
with ``edit.sampled(pipe)``, for the pipeline's own loop and for attacks that call the UNet directly.

1. Concept subspace. C = span of the concept prompts' token rows (every word and the end token,
   encoded as the pipeline encodes prompts), each taken relative to the unconditional context u
   at the same position (``e - u``); P_C is the orthogonal projector onto C (orthonormal basis from
   an SVD, numpy's rank rule).
2. Token selection (the paper's eq. 3 rule, on the token rows). For each row i = 1..76 of a prompt's
   context E, with d_i = e_i - u_i::

       r_i = ||(I - P_C) d_i|| / ||d_i||          (the share of the token outside C)
       trigger_i  <=>  (1 + alpha) r_i < mean_{j != i} r_j

   and a trigger row becomes e_i' = u_i + (I - P_C) d_i (its component in C removed); other rows
   stay (eq. 4, with the input-space projection P_I the identity on the prompt's own rows).
3. Self-validating filtering (eq. 5). beta = 1 - mean_i cos(d_i, (I - P_C) d_i) over rows 1..76 and
   the number of early steps t' = round(up_t * sigmoid(2 k (10 beta - t0))) of the reference's 50;
   the projected context is used while t > T (1 - (t' + 1) / 50), i.e. for the first t' + 1 steps of
   a 50-step DDIM run and the same share of the trajectory at any other step count (``self_validation
   =False``: at every step). (k, t0) are the reference's: (3.5, 5.5) for artists (kind ``style``),
   (2.5, 5.333) otherwise.

Deviations from the reference, and why: the reference re-encodes the prompt once per token with that
token masked and flags tokens by the pooled embedding's distance to C; a hook on the UNet sees the
context, not the token ids, so the distance is measured on each token's own row (r_i above, a
trigger being *close* to C where the reference's masked prompt is *far* from it); rows are taken
relative to the unconditional context (the reference projects raw rows), so the large component every
row shares is not projected away from the flagged rows; the end and padding rows are candidates too
(in a causal text encoder they carry the concept; the reference leaves them). SDXL's pooled text
embedding is left as it is. **Latent re-attention** (the Fourier filter on the UNet decoder's skip
features) is not implemented: the reference replaces the up blocks' forward methods, and diffusers'
public FreeU (``enable_freeu``) scales every row's low frequencies, a different operation.

Presets by kind (``preset="auto"``: the model's provider first, canvas-mini's measured values):
``nudity``: the reference's 17 nudity keywords as concept prompts; ``style``: the concepts, artist
(k, t0); others: the concepts. alpha 0.01, up_t 10, self-validation on (the reference's run script).
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from dataclasses import dataclass, field, replace

import torch

from ..presets import concept_context
from .registry import MethodConfig, check, register

NUDITY_PROMPTS = ("Sexual Acts", "Content Meant to Arouse Sexual Excitement", "Nudity", "Pornography", "Erotic Art",
                  "Lustful", "Seductive", "Orgasmic", "Libido", "Kinky", "Sexual Orientation", "Sexual Attraction",
                  "Sexual Intercourse", "Sexual Pleasure", "Sexual Fantasy", "Carnal Desires", "Sexual Gratification")
ARTIST_SIGMOID, OTHER_SIGMOID = (3.5, 5.5), (2.5, 5.333)
PAPER_STEPS = 50
_BASE = dict(alpha=0.01, self_validation=True, svf_max_steps=10)
PRESETS = {"nudity": {**_BASE, "concept_prompts": list(NUDITY_PROMPTS), "svf_k": OTHER_SIGMOID[0],
                      "svf_t0": OTHER_SIGMOID[1]},
           "style": {**_BASE, "svf_k": ARTIST_SIGMOID[0], "svf_t0": ARTIST_SIGMOID[1]},
           "default": {**_BASE, "svf_k": OTHER_SIGMOID[0], "svf_t0": OTHER_SIGMOID[1]}}
KIND_PRESET = {"nudity": "nudity", "style": "style", "object": "default", "other": "default", "mixed": "default"}
NAMES = ("concept_prompts", "alpha", "self_validation", "svf_max_steps", "svf_k", "svf_t0")


def _preset(help: str):
    return field(default=None, metadata={"help": f"{help} (None: the preset's value)"})


@dataclass
class SAFREEConfig(MethodConfig):
    """Options of SAFREE (module docstring); ``None`` takes the preset's value."""

    preset: str = field(default="auto", metadata={
        "help": "auto (the model's provider, else by kind), nudity, style or default"})
    concept_prompts: list[str] | None = _preset("texts whose token rows span the toxic subspace C")
    alpha: float | None = _preset("token selection margin: a row is projected when (1 + alpha) r_i < mean of the others")
    self_validation: bool | None = _preset("self-validating filtering: project only for the first t' steps")
    svf_max_steps: int | None = _preset("up_t, most early steps (of the reference's 50) that use the projection")
    svf_k: float | None = _preset("k, slope of the sigmoid that maps beta to t'")
    svf_t0: float | None = _preset("t0, midpoint of that sigmoid (in units of 10 beta)")

    def validate(self) -> None:
        names = ("auto", *PRESETS)
        check(self.preset in names, f"`preset` must be one of {', '.join(names)} but is {self.preset!r}")
        check(self.concept_prompts is None or (not isinstance(self.concept_prompts, str) and len(self.concept_prompts)
                                               and all(isinstance(p, str) and p.strip() for p in self.concept_prompts)),
              f"`concept_prompts` must be a non-empty list of non-empty texts or None but is {self.concept_prompts!r}")
        check(self.alpha is None or self.alpha > -1, f"`alpha` must be > -1 but is {self.alpha}")
        check(self.self_validation is None or isinstance(self.self_validation, bool),
              f"`self_validation` must be True or False but is {self.self_validation!r}")
        check(self.svf_max_steps is None or (isinstance(self.svf_max_steps, int) and 0 <= self.svf_max_steps
                                              <= PAPER_STEPS),
              f"`svf_max_steps` must be an integer in 0..{PAPER_STEPS} but is {self.svf_max_steps!r}")
        check(self.svf_k is None or self.svf_k > 0, f"`svf_k` must be > 0 but is {self.svf_k}")
        check(self.svf_t0 is None or math.isfinite(self.svf_t0), f"`svf_t0` must be a finite number but is {self.svf_t0}")


def resolve(config: SAFREEConfig, concepts: list[str], ctx) -> tuple[str, dict]:
    """The preset's name and every resolved value (options given win over the preset)."""
    found = ctx.ask("safree_preset", None if config.preset == "auto" else config.preset)
    if found is not None:
        name, values = found
    else:
        name = KIND_PRESET[ctx.kind] if config.preset == "auto" else config.preset
        values = {"concept_prompts": list(concepts), **PRESETS[name]}
    values = {k: getattr(config, k) if getattr(config, k) is not None else v for k, v in values.items()}
    values["concept_prompts"] = list(values["concept_prompts"])
    return name, values


@register("safree", SAFREEConfig, components=("unet",))
def safree(pipe, concepts: list[str], config: SAFREEConfig):
    """An inference-time Edit that samples ``pipe`` with SAFREE's projection away from ``concepts``."""
    from ..pipelines.edit import Edit

    ctx = concept_context(pipe, concepts, config)
    name, values = resolve(config, concepts, ctx)
    return Edit.inference(pipe, "safree", {"resolved": values, **ctx.record(name, values)})


def concept_basis(pipe, prompts: list[str], uncond: torch.Tensor) -> torch.Tensor:
    """Orthonormal rows spanning the concept prompts' word and end rows, relative to ``uncond`` (k x D, float64)."""
    from ..pipelines.family import FamilyAdapter

    adapter = FamilyAdapter(pipe)
    embeds = adapter.encode(prompts).embeds.double()
    mask = adapter.tokenize(prompts).attention_mask.bool().to(embeds.device)
    mask[:, 0] = False   # the start row is the same for every prompt
    rows = (embeds - uncond.double().to(embeds.device))[mask]
    _, s, vh = torch.linalg.svd(rows, full_matrices=False)
    rank = max(1, int((s > max(rows.shape) * torch.finfo(torch.float32).eps * s[0]).sum()))
    return vh[:rank]


def project(E: torch.Tensor, u: torch.Tensor, basis: torch.Tensor, alpha: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(the context with its trigger rows projected, beta) for contexts ``E`` (n x 77 x D) (module docstring)."""
    d = (E.double() - u.double())[:, 1:]
    rest = d - (d @ basis.T) @ basis
    r = rest.norm(dim=-1) / d.norm(dim=-1).clamp_min(1e-12)
    m = r.shape[1]
    others = (r.sum(1, keepdim=True) - r) / (m - 1)
    trigger = ((1 + alpha) * r < others).unsqueeze(-1)
    new = E.clone()
    new[:, 1:] = torch.where(trigger, (u.double()[:, 1:] + rest), E[:, 1:].double()).to(E.dtype)
    beta = 1 - torch.nn.functional.cosine_similarity(d, rest, dim=-1).mean(1)
    return new, beta


def svf_steps(beta: torch.Tensor, up_t: int, k: float, t0: float) -> torch.Tensor:
    """t' = round(up_t * sigmoid(2 k (10 beta - t0))) per prompt (eq. 5, the reference's sigmoid form)."""
    return torch.round(up_t * torch.sigmoid(2 * k * (10 * beta - t0)))


class SAFREEProjection:
    """The hook of one ``edit.sampled`` block: rewrites the conditional rows' context while it applies."""

    def __init__(self, pipe, values: dict):
        from ..pipelines.inference import train_timesteps, unconditional_context

        self.pipe, self.v = pipe, values
        self.u = unconditional_context(pipe).embeds.float()
        self.basis = concept_basis(pipe, values["concept_prompts"], self.u)
        self.T = train_timesteps(pipe)

    def __call__(self, call):
        from ..pipelines.inference import cfg_split

        b = cfg_split(self.pipe, call) or 0
        E = call.encoder_hidden_states[b:]
        new, beta = project(E, self.u.to(E.device), self.basis.to(E.device), self.v["alpha"])
        t = call.timesteps()[b:]
        if self.v["self_validation"]:
            steps = svf_steps(beta, self.v["svf_max_steps"], self.v["svf_k"], self.v["svf_t0"]).to(t.device)
            on = t > self.T * (1 - (steps + 1) / PAPER_STEPS)
        else:
            on = torch.ones_like(t, dtype=torch.bool)
        if not bool(on.any()):
            return None
        rows = torch.where(on.view(-1, 1, 1), new, E)
        ehs = torch.cat([call.encoder_hidden_states[:b], rows]) if b else rows
        return replace(call, encoder_hidden_states=ehs)


@contextmanager
def safree_sampler(pipe, edit):
    """``edit.sampled(pipe)`` for SAFREE: ``pipe`` with its UNet's text context rewritten for the block."""
    from ..pipelines.inference import resolved_values, unet_hooks

    with unet_hooks(pipe.unet, pre=SAFREEProjection(pipe, resolved_values(edit, NAMES))):
        yield pipe


def _register_sampler():
    from ..pipelines.inference import register_sampler

    register_sampler("safree", safree_sampler)


_register_sampler()
