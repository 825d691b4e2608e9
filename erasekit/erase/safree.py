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
4. Latent re-attention (Sec. 3.3; ``latent_reattention``). In a UNet call where a row's context was
   projected (and the step lies in ``lra_steps``), the call also carries that row with its original
   context, an extra row whose prediction is dropped (the reference's third batch part). In every up
   block, each skip feature h a resnet concatenates to the decoder's features is replaced, for the
   projected row, by its filtered form against the original row's h_o::

       F = fftshift(FFT2(h)),  F_o = fftshift(FFT2(h_o)),  L = rows H//2-1..H//2 x columns W//2-1..W//2
       F'[L] = s F[L] where Re F[L] > Re F_o[L], else F[L];   h' = Re IFFT2(ifftshift(F'))

   L is FreeU's low-frequency window of threshold 1 (the zero frequency, scaled by exactly s, and its
   lower neighbours); s = s1 where the decoder features have the UNet's widest channel count, s2 where
   they have the second widest (1280 and 640 channels on SD 1.x / 2.x / XL, the reference's rule); other
   skips, the other rows and the backbone features are left. Rows whose context the projection did not
   change would compare equal features, which the rule leaves alone, so they get no extra row.

SD 3 / Flux: the hook is on ``pipe.transformer``. Steps 1-3 run on each segment of the text rows with its own
subspace and token rule (SD 3: the CLIP rows, start row left out, then the T5 rows; Flux: the T5 rows; different
feature spaces), beta is the mean over every row used, and the self-validation window counts steps of the
pipeline's own 50-step flow schedule (:meth:`SAFREEProjection.window_end`). The pooled vector is left as on
SDXL. Step 4 has no counterpart (an MMDiT has no skip connections): left out, refused when asked for.

Deviations from the reference, and why: the reference re-encodes the prompt once per token with that
token masked and flags tokens by the pooled embedding's distance to C; a hook on the UNet sees the
context, not the token ids, so the distance is measured on each token's own row (r_i above, a
trigger being *close* to C where the reference's masked prompt is *far* from it); rows are taken
relative to the unconditional context (the reference projects raw rows), so the large component every
row shares is not projected away from the flagged rows; the end and padding rows are candidates too
(in a causal text encoder they carry the concept; the reference leaves them). SDXL's pooled text
embedding is left as it is. Latent re-attention follows the paper's rule (scale by s) where the
reference's filter (``SafeGuard_Low_Fourier_filter``) *replaces* the window's coefficients by the
constant s; in the reference's ``generate_safree.py`` the FreeU blocks are registered without a filter
mode, so its ``-lra`` runs skip the filter (the third batch part is computed and dropped). Its backbone
factors b1 = b2 = 1 (no change) are not exposed, and its SDXL pipeline has no latent re-attention (here
the same rule applies). The filter is a forward pre-hook on the up blocks (``res_hidden_states_tuple``),
not a replaced ``forward``; diffusers' FreeU (``enable_freeu``) scales every row's low frequencies
unconditionally, a different operation.

Presets by kind (``preset="auto"``: the model's provider first, canvas-mini's measured values):
``nudity``: the reference's 17 nudity keywords as concept prompts; ``style``: the concepts, artist
(k, t0); others: the concepts. alpha 0.01, up_t 10, self-validation on (the reference's run script);
latent re-attention on with (s1, s2) = (0.9, 0.2) (the reference's ``--freeu_hyp`` default) at every step.
An Edit whose manifest has no ``latent_reattention`` samples without it.
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from dataclasses import dataclass, field, replace

import torch

from ..errors import ConfigError
from ..presets import concept_context
from .registry import MethodConfig, check, register

NUDITY_PROMPTS = ("Sexual Acts", "Content Meant to Arouse Sexual Excitement", "Nudity", "Pornography", "Erotic Art",
                  "Lustful", "Seductive", "Orgasmic", "Libido", "Kinky", "Sexual Orientation", "Sexual Attraction",
                  "Sexual Intercourse", "Sexual Pleasure", "Sexual Fantasy", "Carnal Desires", "Sexual Gratification")
ARTIST_SIGMOID, OTHER_SIGMOID = (3.5, 5.5), (2.5, 5.333)
PAPER_STEPS = 50
# Latent re-attention: on, with the reference's skip factors (``--freeu_hyp`` 1.0-1.0-0.9-0.2: s1 0.9, s2 0.2),
# at every step (the reference filters every UNet call once its up blocks are registered).
LRA = dict(latent_reattention=True, lra_s1=0.9, lra_s2=0.2, lra_steps=[0, PAPER_STEPS - 1])
_BASE = dict(alpha=0.01, self_validation=True, svf_max_steps=10, **LRA)
PRESETS = {"nudity": {**_BASE, "concept_prompts": list(NUDITY_PROMPTS), "svf_k": OTHER_SIGMOID[0],
                      "svf_t0": OTHER_SIGMOID[1]},
           "style": {**_BASE, "svf_k": ARTIST_SIGMOID[0], "svf_t0": ARTIST_SIGMOID[1]},
           "default": {**_BASE, "svf_k": OTHER_SIGMOID[0], "svf_t0": OTHER_SIGMOID[1]}}
KIND_PRESET = {"nudity": "nudity", "style": "style", "object": "default", "other": "default", "mixed": "default"}
NAMES = ("concept_prompts", "alpha", "self_validation", "svf_max_steps", "svf_k", "svf_t0")
LRA_NAMES = tuple(LRA)   # optional in a manifest: an Edit whose manifest lacks them samples without the filter


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
    latent_reattention: bool | None = _preset(
        "latent re-attention: scale by s the low frequencies of the projected prompt's decoder skip features "
        "where they exceed the original prompt's")
    lra_s1: float | None = _preset("s1 in 0..1, the factor on skip features that meet the widest decoder features")
    lra_s2: float | None = _preset("s2 in 0..1, the factor on skip features that meet the second widest ones")
    lra_steps: tuple[int, int] | None = _preset(
        "(first, last) step of the reference's 50 in which latent re-attention acts (the same share at any count)")

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
        check(self.latent_reattention is None or isinstance(self.latent_reattention, bool),
              f"`latent_reattention` must be True or False but is {self.latent_reattention!r}")
        for name in ("lra_s1", "lra_s2"):
            v = getattr(self, name)
            check(v is None or (_number(v) and 0 <= v <= 1), f"`{name}` must be a number in 0..1 but is {v!r}")
        steps = self.lra_steps
        check(steps is None or (isinstance(steps, (list, tuple)) and len(steps) == 2
                                and all(isinstance(i, int) and not isinstance(i, bool) for i in steps)
                                and 0 <= steps[0] <= steps[1] < PAPER_STEPS),
              f"`lra_steps` must be two integers first <= last in 0..{PAPER_STEPS - 1} but is {steps!r}")


def _number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def resolve(config: SAFREEConfig, concepts: list[str], ctx) -> tuple[str, dict]:
    """The preset's name and every resolved value (options given win over the preset)."""
    found = ctx.ask("safree_preset", None if config.preset == "auto" else config.preset)
    if found is not None:
        name, values = found
    else:
        name = KIND_PRESET[ctx.kind] if config.preset == "auto" else config.preset
        values = {"concept_prompts": list(concepts), **PRESETS[name]}
    values = {**LRA, **values}   # a provider's preset without latent re-attention values takes the paper's
    values = {k: getattr(config, k) if getattr(config, k) is not None else v for k, v in values.items()}
    values["concept_prompts"] = list(values["concept_prompts"])
    values["lra_steps"] = [int(i) for i in values["lra_steps"]]
    return name, values


MMDIT_NO_LRA = ("SAFREE's latent re-attention filters the skip features a UNet's decoder concatenates "
                "(FreeU's Fourier rule); an SD 3 / Flux transformer has no skip connections, so there is nothing "
                "to filter: leave `latent_reattention` unset (None) or False on these models (docs/methods/safree.md)")


@register("safree", SAFREEConfig, components=("unet",), families=("sd1", "sd2", "sdxl", "sd3", "flux"))
def safree(pipe, concepts: list[str], config: SAFREEConfig):
    """An inference-time Edit that samples ``pipe`` with SAFREE's projection away from ``concepts``; on SD 3 /
    Flux without latent re-attention (an MMDiT has no skip features; module docstring)."""
    from ..pipelines.edit import Edit

    ctx = concept_context(pipe, concepts, config)
    name, values = resolve(config, concepts, ctx)
    if getattr(pipe, "transformer", None) is not None:
        if config.latent_reattention:
            raise ConfigError(MMDIT_NO_LRA)
        values["latent_reattention"] = False
    return Edit.inference(pipe, "safree", {"resolved": values, **ctx.record(name, values)})


def _segments(adapter) -> list[tuple[slice, int, int]]:
    """(rows, tokenizer, first row used) of every segment of the text rows: the start row of a CLIP segment is the
    same for every prompt and is left out; T5 has no start token (SD 3: CLIP rows, then T5 rows; Flux: T5 rows)."""
    from ..pipelines.mmdit import T5_INDEX

    t5 = T5_INDEX.get(adapter.family)
    return [(slice(seg.start, seg.start + seg.length), seg.which, 0 if seg.which == t5 else 1)
            for seg in adapter.segments]


def concept_basis(pipe, prompts: list[str], uncond: torch.Tensor) -> torch.Tensor:
    """The concept basis of the first segment of the text rows (a UNet's only one): :func:`concept_bases`."""
    return concept_bases(pipe, prompts, uncond)[0]


def concept_bases(pipe, prompts: list[str], uncond: torch.Tensor) -> list[torch.Tensor]:
    """Per segment of the text rows (one on a UNet; SD 3's CLIP rows and T5 rows, Flux's T5 rows: different
    feature spaces), orthonormal rows spanning the concept prompts' word and end rows, relative to ``uncond``
    (k x D, float64)."""
    from ..pipelines.family import FamilyAdapter

    adapter = FamilyAdapter(pipe)
    embeds = adapter.encode(prompts).embeds.double()
    d = embeds - uncond.double().to(embeds.device)
    bases = []
    for span, which, first in _segments(adapter):
        mask = adapter.tokenize(prompts, which).attention_mask.bool().to(embeds.device)
        mask[:, :first] = False
        rows = d[:, span][mask]
        _, sv, vh = torch.linalg.svd(rows, full_matrices=False)
        rank = max(1, int((sv > max(rows.shape) * torch.finfo(torch.float32).eps * sv[0]).sum()))
        bases.append(vh[:rank])
    return bases


def project(E: torch.Tensor, u: torch.Tensor, basis: torch.Tensor, alpha: float, first: int = 1
            ) -> tuple[torch.Tensor, torch.Tensor]:
    """(the context with its trigger rows projected, beta) for contexts ``E`` (n x rows x D) (module docstring);
    rows before ``first`` (the start token's) are left out."""
    d = (E.double() - u.double())[:, first:]
    rest = d - (d @ basis.T) @ basis
    r = rest.norm(dim=-1) / d.norm(dim=-1).clamp_min(1e-12)
    m = r.shape[1]
    others = (r.sum(1, keepdim=True) - r) / (m - 1)
    trigger = ((1 + alpha) * r < others).unsqueeze(-1)
    new = E.clone()
    new[:, first:] = torch.where(trigger, (u.double()[:, first:] + rest), E[:, first:].double()).to(E.dtype)
    beta = 1 - torch.nn.functional.cosine_similarity(d, rest, dim=-1).mean(1)
    return new, beta


def project_segments(E: torch.Tensor, u: torch.Tensor, bases: list[torch.Tensor], segments: list, alpha: float
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`project` on every segment with its own basis; beta is the mean over every row used."""
    new, betas, counts = E.clone(), [], []
    for basis, (span, _, first) in zip(bases, segments):
        part, beta = project(E[:, span], u[:, span], basis.to(E.device), alpha, first)
        new[:, span] = part
        betas.append(beta)
        counts.append(span.stop - span.start - first)
    beta = sum(b * c for b, c in zip(betas, counts)) / sum(counts)
    return new, beta


def svf_steps(beta: torch.Tensor, up_t: int, k: float, t0: float) -> torch.Tensor:
    """t' = round(up_t * sigmoid(2 k (10 beta - t0))) per prompt (eq. 5, the reference's sigmoid form)."""
    return torch.round(up_t * torch.sigmoid(2 * k * (10 * beta - t0)))


def step_window(t: torch.Tensor, T: int, first: int, last: int) -> torch.Tensor:
    """Whether timesteps ``t`` fall in steps ``first..last`` of the reference's 50 (the same share of the
    trajectory at any step count, as the self-validation window): T (1 - (last + 1) / 50) < t <= T (1 - first / 50)."""
    return (t > T * (1 - (last + 1) / PAPER_STEPS)) & (t <= T * (1 - first / PAPER_STEPS))


def reattend(h: torch.Tensor, h_orig: torch.Tensor, s: float) -> torch.Tensor:
    """Latent re-attention of skip features ``h`` (n x C x H x W) against the original prompt's ``h_orig``.

    In the centred spectrum F = fftshift(FFT2(h)), the low-frequency window (the FreeU window of threshold 1:
    rows H//2 - 1 .. H//2, columns W//2 - 1 .. W//2, the zero frequency and its lower neighbours) becomes
    ``s * F`` where Re F > Re F_orig and stays elsewhere; the result is the real part of the inverse FFT.
    The zero frequency (a channel's mean) is scaled by exactly ``s``; taking the real part shares the change at
    another window frequency with its mirror (as in the reference); every other frequency stays.
    """
    dims = (-2, -1)
    F = torch.fft.fftshift(torch.fft.fftn(h.float(), dim=dims), dim=dims)
    F_orig = torch.fft.fftshift(torch.fft.fftn(h_orig.float(), dim=dims), dim=dims)
    H, W = F.shape[-2:]
    win = (..., slice(max(H // 2 - 1, 0), H // 2 + 1), slice(max(W // 2 - 1, 0), W // 2 + 1))
    low = F[win]
    F[win] = torch.where(low.real > F_orig[win].real, low * s, low)
    return torch.fft.ifftn(torch.fft.ifftshift(F, dim=dims), dim=dims).real.to(h.dtype)


class LatentReattention:
    """Forward pre-hook of the UNet's up blocks: while a call carries the original prompt's rows (``pairs``, set
    by :class:`SAFREEProjection`), filters the skip features of the projected rows with :func:`reattend`.

    A skip feature is filtered by s1 where it meets decoder (backbone) features of the widest channel count
    of the UNet, by s2 where it meets the second widest (the reference: 1280 and 640 channels on SD 1.x).
    """

    def __init__(self, unet, s1: float, s2: float):
        widths = sorted(set(unet.config.block_out_channels), reverse=True)
        self.factor = dict(zip(widths, (s1, s2)))
        self.pairs: tuple[torch.Tensor, torch.Tensor] | None = None   # (projected rows, their original rows)

    def __call__(self, block, args: tuple, kwargs: dict):
        if self.pairs is None:
            return None
        args, kwargs = list(args), dict(kwargs)
        h = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
        in_kwargs = "res_hidden_states_tuple" in kwargs
        skips = list(kwargs["res_hidden_states_tuple"] if in_kwargs else args[1])
        proj, orig = self.pairs
        width = h.shape[1]
        for j, resnet in enumerate(block.resnets):   # resnet j takes the skip popped j-th from the end
            s = self.factor.get(width)
            if s is not None and s != 1:
                k = len(skips) - 1 - j
                x = skips[k].clone()
                x[proj] = reattend(x[proj], x[orig], s)
                skips[k] = x
            width = resnet.out_channels
        if in_kwargs:
            kwargs["res_hidden_states_tuple"] = tuple(skips)
        else:
            args[1] = tuple(skips)
        return tuple(args), kwargs


class SAFREEProjection:
    """The hooks of one ``edit.sampled`` block: rewrites the conditional rows' context while it applies, and with
    latent re-attention appends the original prompt's rows to the call (dropped from the prediction again)."""

    def __init__(self, pipe, values: dict):
        from ..pipelines.inference import train_timesteps, unconditional_context

        from ..pipelines.family import FamilyAdapter

        self.pipe, self.v = pipe, values
        self.u = unconditional_context(pipe).embeds.float()
        self.segments = _segments(FamilyAdapter(pipe))
        self.bases = concept_bases(pipe, values["concept_prompts"], self.u)
        self.T = train_timesteps(pipe)
        self.flow = getattr(pipe, "transformer", None) is not None
        if self.flow:
            from ..pipelines.flow import FlowModel
            from ..pipelines.mmdit import mmdit_family

            if values.get("latent_reattention", False):
                raise ConfigError(MMDIT_NO_LRA)
            self.sigmas = FlowModel(pipe).sigmas(PAPER_STEPS)
            self.unit = 1.0 if mmdit_family(pipe) == "flux" else float(self.T)   # Flux's transformer reads s
        self.lra = (LatentReattention(pipe.unet, values["lra_s1"], values["lra_s2"])
                    if values.get("latent_reattention", False) else None)
        self.n: int | None = None   # the caller's batch size while original rows are appended

    def __call__(self, call):
        from ..pipelines.inference import cfg_split

        self.n = None
        if self.lra is not None:
            self.lra.pairs = None
        b = cfg_split(self.pipe, call) or 0
        E = call.encoder_hidden_states[b:]
        new, beta = project_segments(E, self.u.to(E.device), self.bases, self.segments, self.v["alpha"])
        t = call.timesteps()[b:]
        if self.v["self_validation"]:
            steps = svf_steps(beta, self.v["svf_max_steps"], self.v["svf_k"], self.v["svf_t0"]).to(t.device)
            on = t > self.window_end(steps)
        else:
            on = torch.ones_like(t, dtype=torch.bool)
        if not bool(on.any()):
            return None
        rows = torch.where(on.view(-1, 1, 1), new, E)
        ehs = torch.cat([call.encoder_hidden_states[:b], rows]) if b else rows
        out = replace(call, encoder_hidden_states=ehs)
        if self.lra is None:
            return out
        # Rows whose context did not change would compare equal features: the filter leaves them, so only
        # the projected rows inside the re-attention window get an original-prompt twin.
        act = on & step_window(t, self.T, *self.v["lra_steps"]) & (rows != E).flatten(1).any(1)
        idx = b + torch.nonzero(act).flatten()
        if not len(idx):
            return out
        self.n = call.batch
        self.lra.pairs = (idx, self.n + torch.arange(len(idx), device=idx.device))
        return out.append_rows(idx, call.encoder_hidden_states[idx])

    def window_end(self, steps: torch.Tensor) -> torch.Tensor:
        """The timestep above which the projection applies: the first ``steps + 1`` steps of the reference's 50,
        ``T (1 - (steps + 1) / 50)`` on a DDPM schedule; on SD 3 / Flux the midpoint of the pipeline's own 50-step
        flow sigmas ``steps`` and ``steps + 1`` (its shift included), in the transformer's timestep units (SD 3
        reads ``T s``, Flux ``s``)."""
        if not self.flow:
            return self.T * (1 - (steps + 1) / PAPER_STEPS)
        sigmas = self.sigmas.to(steps.device)
        k = steps.long().clamp(0, PAPER_STEPS - 1)
        mid = (sigmas[k] + sigmas[k + 1]) / 2 * self.unit
        return torch.where(steps >= PAPER_STEPS, torch.full_like(mid, -1.0), mid)

    def restore(self, call, prediction: torch.Tensor):
        """The prediction for the caller's rows only (the appended original-prompt rows dropped)."""
        n, self.n = self.n, None
        if self.lra is not None:
            self.lra.pairs = None
        return None if n is None else prediction[:n]


@contextmanager
def block_pre_hooks(blocks, hook):
    """For the block, ``hook`` is a forward pre-hook (with keyword arguments) of every module in ``blocks``;
    removed in ``finally``."""
    handles = []
    try:
        for block in blocks:
            handles.append(block.register_forward_pre_hook(hook, with_kwargs=True))
        yield
    finally:
        for h in handles:
            h.remove()


@contextmanager
def safree_sampler(pipe, edit):
    """``edit.sampled(pipe)`` for SAFREE: ``pipe`` with its UNet's text context rewritten for the block (and, with
    latent re-attention, its decoder's skip features filtered)."""
    from ..pipelines.inference import resolved_values, unet_hooks

    values = resolved_values(edit, NAMES)
    if "latent_reattention" in values:
        values = resolved_values(edit, NAMES + LRA_NAMES)
    hook = SAFREEProjection(pipe, values)
    if hook.lra is None:
        from ..pipelines.mmdit import denoiser

        with unet_hooks(denoiser(pipe), pre=hook):
            yield pipe
        return
    with unet_hooks(pipe.unet, pre=hook, post=hook.restore), block_pre_hooks(pipe.unet.up_blocks, hook.lra):
        yield pipe


def _register_sampler():
    from ..pipelines.inference import register_sampler

    register_sampler("safree", safree_sampler)


_register_sampler()
