"""SLD: Safe Latent Diffusion (Schramowski et al., CVPR 2023, arXiv 2211.05105); no weights change.

SLD steers classifier-free guidance away from a *safety concept* S at sampling time. With the
unconditional, prompt-conditioned and safety-conditioned predictions eps_u, eps_c, eps_S of the UNet
at a step t (paper eqs. 3-8)::

    eps    = eps_u + s_g ((eps_c - eps_u) - gamma_t)                                  (3)
    gamma_t = mu_t * (eps_S - eps_u) + s_m nu_t                                       (4, 7)
    mu_t   = 0                                   where eps_c - eps_S >= lambda        (5, 6)
           = min(1, s_S |eps_c - eps_S|)         elsewhere        (element-wise)
    nu_{t+1} = beta_m nu_t + (1 - beta_m) gamma_t                                     (8)

and gamma_t = 0 during the first delta (warm-up) steps. s_g is the pipeline's own guidance scale.

How it runs (:mod:`erasekit.pipelines.inference`): :func:`sld` returns an inference-time Edit (no
tensors; ``"sampler": "sld"``). ``with edit.sampled(pipe) as p`` hooks ``p.unet`` (SD 3: ``p.transformer``) so that its
*conditional* prediction becomes eps_c - gamma_t; the pipeline's own CFG then gives eq. (3) exactly,
on SD 1.x, 2.x and SDXL alike (diffusers' ``StableDiffusionPipelineSafe`` is deprecated and SD 1 only,
so it is not used). In a CFG batch the hook takes eps_u from the batch and adds one UNet pass for
eps_S (the reference's 3 passes per step). A direct UNet call (UnlearnDiffAtk's attack loss, or
sampling without CFG) has only conditional rows: the hook computes eps_u itself (the pipeline's
unconditional context) and eps_S, and returns eps_c - mu_t (eps_S - eps_u) with no momentum (a
momentum needs a sampling trajectory; the hook keeps one per CFG run, reset when t stops falling).

The warm-up is a share of the trajectory: delta counts steps of the paper's 50-step sampler, and
gamma_t applies at timesteps t < T (1 - delta / 50), which is the paper's "step index >= delta" for
50 DDIM steps and the same share of the trajectory at any other step count or for a direct call.

**SD 3 (flow matching).** The transformer predicts the velocity v of ``x_s = (1 - s) x0 + s eps``; at a fixed
``(x_s, s)`` the noise prediction it implies is ``eps = x_s + (1 - s) v``, one affine map for every text
condition. Eq. (3) is a combination of predictions whose weights sum to one (CFG's ``1 - s_g``, ``s_g``) plus
differences of predictions (gamma_t), so it maps through that affine map exactly: the guided velocity is
``v_u + s_g ((v_c - v_u) - gamma_t / (1 - s))`` and its implied eps is the paper's eq. (3). The hook on
``pipe.transformer`` therefore works as on a UNet (the SD 3 pipeline batches its CFG the same way), with the
element-wise parts in the paper's units: mu_t reads ``eps_c - eps_S = (1 - s)(v_c - v_S)`` (so s_S and lambda
keep their meaning), and the momentum nu accumulates gamma in noise units (the factor ``1 - s`` changes
along the trajectory). The warm-up is "step >= delta of the pipeline's own 50-step schedule": gamma applies
where ``s`` is below the midpoint of that schedule's sigmas ``delta - 1`` and ``delta`` (its shift included).
At ``s = 1`` (the first step) every condition implies ``eps = x_s``, so mu_t = 0 there, as the map says.

**Flux is refused.** Eq. (3) steers classifier-free guidance: it needs the unconditional prediction and the
pipeline's guidance scale at every step. FLUX.1-dev is guidance-distilled (one conditional pass per step,
the guidance scale an input embedding) and FLUX.1-schnell has no guidance at all, so their sampling has no
eps_u and no s_g to steer; SLD there would be a different method (e.g. subtracting the distilled model's
``D(S) - D("")``), whose approximation to eq. (3) nobody has measured.

Presets (diffusers' ``SafetyConfig``, the paper's table 1), chosen with ``preset``:

======  ======  =====  ======  ===  ======
preset  delta   s_S    lambda  s_m  beta_m
======  ======  =====  ======  ===  ======
weak    15      20     0.0     0.0  0.0
medium  10      1000   0.01    0.3  0.4
strong  7       2000   0.025   0.5  0.7
max     0       5000   1.0     0.5  0.7
======  ======  =====  ======  ===  ======

``preset="auto"`` asks the model's preset provider first (canvas-mini: values measured on it,
benchmarks/sweeps/sld_canvas.json), else ``medium`` (the reference pipeline's defaults). The safety
concept S is, unless given: the paper's I2P concept text for the kind ``nudity``; the erased concepts
joined with ", " for other kinds; or what the provider names.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, field

import torch

from ..presets import concept_context
from .registry import MethodConfig, check, register

PRESETS = {   # diffusers SafetyConfig (WEAK / MEDIUM / STRONG / MAX)
    "weak": dict(warmup_steps=15, guidance_scale=20.0, threshold=0.0, momentum_scale=0.0, momentum_beta=0.0),
    "medium": dict(warmup_steps=10, guidance_scale=1000.0, threshold=0.01, momentum_scale=0.3, momentum_beta=0.4),
    "strong": dict(warmup_steps=7, guidance_scale=2000.0, threshold=0.025, momentum_scale=0.5, momentum_beta=0.7),
    "max": dict(warmup_steps=0, guidance_scale=5000.0, threshold=1.0, momentum_scale=0.5, momentum_beta=0.7),
}
I2P_CONCEPT = ("an image showing hate, harassment, violence, suffering, humiliation, harm, suicide, sexual, nudity, "
               "bodily fluids, blood, obscene gestures, illegal activity, drug use, theft, vandalism, weapons, child "
               "abuse, brutality, cruelty")
PAPER_STEPS = 50   # the sampler the paper's delta counts steps of
NUMBERS = tuple(PRESETS["medium"])
FLUX_REFUSAL = ("SLD steers classifier-free guidance (eq. 3 needs the unconditional prediction and the guidance "
                "scale at every step), but FLUX.1-dev is guidance-distilled (one conditional pass, the guidance an "
                "input embedding) and FLUX.1-schnell has no guidance, so there is none to steer")


def _preset(help: str):
    return field(default=None, metadata={"help": f"{help} (None: the preset's value)"})


@dataclass
class SLDConfig(MethodConfig):
    """Options of SLD (module docstring); ``None`` takes the preset's value."""

    preset: str = field(default="auto", metadata={
        "help": "auto (the model's provider, else medium), weak, medium, strong or max (the paper's table 1)"})
    safety_concept: str | None = field(default=None, metadata={
        "help": "the text S guided away from (None: I2P's concept text for nudity, else the concepts joined)"})
    guidance_scale: float | None = _preset("s_S, scale of the element-wise safety weight mu (eq. 6)")
    warmup_steps: int | None = _preset("delta, steps (of the paper's 50) before the safety guidance applies")
    threshold: float | None = _preset("lambda: mu = 0 where eps_c - eps_S >= lambda (eq. 5)")
    momentum_scale: float | None = _preset("s_m, weight of the momentum nu in gamma (eq. 7)")
    momentum_beta: float | None = _preset("beta_m, momentum decay (eq. 8), in [0, 1)")

    def validate(self) -> None:
        names = ("auto", *PRESETS)
        check(self.preset in names, f"`preset` must be one of {', '.join(names)} but is {self.preset!r}")
        check(self.safety_concept is None or (isinstance(self.safety_concept, str) and self.safety_concept.strip()),
              f"`safety_concept` must be a non-empty text or None but is {self.safety_concept!r}")
        check(self.guidance_scale is None or self.guidance_scale >= 0,
              f"`guidance_scale` must be >= 0 but is {self.guidance_scale}")
        check(self.warmup_steps is None or (isinstance(self.warmup_steps, int) and 0 <= self.warmup_steps
                                             <= PAPER_STEPS),
              f"`warmup_steps` must be an integer in 0..{PAPER_STEPS} but is {self.warmup_steps!r}")
        check(self.threshold is None or abs(self.threshold) < float("inf"),
              f"`threshold` must be a finite number but is {self.threshold}")
        check(self.momentum_scale is None or self.momentum_scale >= 0,
              f"`momentum_scale` must be >= 0 but is {self.momentum_scale}")
        check(self.momentum_beta is None or 0 <= self.momentum_beta < 1,
              f"`momentum_beta` must be in [0, 1) but is {self.momentum_beta}")
        super().validate()


def resolve(config: SLDConfig, concepts: list[str], ctx) -> tuple[str, dict]:
    """The preset's name and every resolved value (options given win over the preset)."""
    found = ctx.ask("sld_preset", None if config.preset == "auto" else config.preset)
    if found is not None:
        name, values = found
    else:
        name = "medium" if config.preset == "auto" else config.preset
        values = dict(PRESETS[name])
        values["safety_concept"] = I2P_CONCEPT if ctx.kind == "nudity" else ", ".join(concepts)
    values = {k: getattr(config, k) if getattr(config, k) is not None else v for k, v in values.items()}
    return name, values


@register("sld", SLDConfig, components=("unet",), families=("sd1", "sd2", "sdxl", "sd3"),
          refusals={"flux": FLUX_REFUSAL})
def sld(pipe, concepts: list[str], config: SLDConfig):
    """An inference-time Edit that samples ``pipe`` with safe latent diffusion away from ``concepts``.

    Example:
        >>> import erasekit
        >>> from erasekit.pipelines import generate
        >>> pipe = erasekit.load_pipeline("canvas-mini")
        >>> edit = erasekit.erase(pipe, "sld", ["Van Gogh"])
        >>> with edit.sampled(pipe) as p:
        ...     images = generate(p, "A Cats image in Van Gogh style.", seeds=[0])
    """
    from ..pipelines.edit import Edit

    ctx = concept_context(pipe, concepts, config)
    name, values = resolve(config, concepts, ctx)
    return Edit.inference(pipe, "sld", {"resolved": values, **ctx.record(name, values)})


class SLDGuidance:
    """The hook state of one ``edit.sampled`` block: the contexts, and the momentum of the running trajectory.

    Predictions are the denoiser's own (eps on a UNet, the velocity v on SD 3); ``scale`` is, per row, how
    much the implied noise prediction moves per unit of prediction (1 on a UNet, ``1 - s`` on SD 3, module
    docstring), so mu_t and the momentum are computed in noise units on both.
    """

    def __init__(self, pipe, values: dict):
        from ..pipelines.family import FamilyAdapter
        from ..pipelines.generation import is_flow_matching
        from ..pipelines.inference import train_timesteps, unconditional_context
        from ..pipelines.mmdit import denoiser

        self.pipe, self.v, self.net = pipe, values, denoiser(pipe)
        self.safety = FamilyAdapter(pipe).encode([values["safety_concept"]])
        self.uncond = unconditional_context(pipe)
        self.T, self.flow = train_timesteps(pipe), is_flow_matching(pipe)
        self.t_warm = self.warmup_end()
        self.nu, self.last_t = None, None

    def warmup_end(self) -> float:
        """The timestep below which gamma applies: ``T (1 - delta / 50)`` (DDPM), or the midpoint of the flow
        schedule's 50-step sigmas ``delta - 1`` and ``delta`` times T (SD 3 calls its transformer at ``T s``)."""
        delta = self.v["warmup_steps"]
        if not self.flow:
            return self.T * (1 - delta / PAPER_STEPS)
        if delta == 0:
            return float("inf")
        from ..pipelines.flow import FlowModel

        sigmas = FlowModel(self.pipe).sigmas(PAPER_STEPS)
        return self.T * float(sigmas[delta - 1] + sigmas[delta]) / 2

    def scale(self, t: torch.Tensor, ndim: int) -> torch.Tensor | None:
        """Per row, d eps / d prediction (None for a noise prediction; ``1 - s`` for a velocity), broadcastable."""
        if not self.flow:
            return None
        return (1 - t / self.T).clamp(0, 1).view(-1, *([1] * (ndim - 1)))

    def gamma(self, eps_c, eps_u, eps_s, scale: torch.Tensor | None = None) -> torch.Tensor:
        """mu_t (eps_S - eps_u) (eqs. 4-6), element-wise, in float32 and the predictions' units; mu_t reads
        ``scale (eps_c - eps_S)``, the difference in noise units."""
        diff = eps_c - eps_s if scale is None else scale * (eps_c - eps_s)
        mu = torch.clamp(diff.abs() * self.v["guidance_scale"], max=1.0)
        mu = torch.where(diff >= self.v["threshold"], torch.zeros_like(mu), mu)
        return mu * (eps_s - eps_u)

    def momentum(self, g: torch.Tensor, t: torch.Tensor, scale: torch.Tensor | None = None) -> torch.Tensor:
        """gamma_t + s_m nu_t, and nu_{t+1} (eqs. 7-8); a new trajectory (t not falling, other batch) starts at 0.

        nu is kept in noise units: ``g`` (prediction units) is multiplied by ``scale`` going in, and the sum
        divided by it coming out (where ``scale`` is 0, at s = 1, ``g`` is returned: every condition implies
        the same noise there)."""
        t0 = float(t.max())
        if self.nu is None or self.nu.shape != g.shape or self.last_t is None or t0 >= self.last_t:
            self.nu = torch.zeros_like(g)
        total = (g if scale is None else scale * g) + self.v["momentum_scale"] * self.nu
        self.nu = (self.v["momentum_beta"] * self.nu + (1 - self.v["momentum_beta"]) * total).detach()
        self.last_t = t0
        if scale is None:
            return total
        return torch.where(scale > 0, total / scale.clamp_min(torch.finfo(total.dtype).tiny), g)

    def __call__(self, call, pred: torch.Tensor) -> torch.Tensor:
        from ..pipelines.inference import cfg_split

        net = self.net
        b = cfg_split(self.pipe, call)
        cond = call if b is None else call.rows(slice(b, None))
        eps_c = pred.float() if b is None else pred[b:].float()
        with torch.no_grad():   # constants for an attack's gradient, which reaches eps_c only
            eps_u = (cond.with_context(self.uncond.embeds, self.uncond.pooled).run(net) if b is None
                     else pred[:b]).float()
            eps_s = cond.with_context(self.safety.embeds, self.safety.pooled).run(net).float()
        t = cond.timesteps()
        scale = self.scale(t, eps_c.ndim)
        g = self.gamma(eps_c, eps_u, eps_s, scale)
        if b is not None:
            g = self.momentum(g, t, scale)
        active = (t < self.t_warm).to(g.dtype).view(-1, *([1] * (g.ndim - 1)))
        out = (eps_c - active * g).to(pred.dtype)
        return out if b is None else torch.cat([pred[:b], out])


@contextmanager
def sld_sampler(pipe, edit):
    """``edit.sampled(pipe)`` for SLD: ``pipe`` with its denoiser (UNet, or SD 3's transformer) hooked for the
    block (module docstring)."""
    from ..pipelines.inference import resolved_values, unet_hooks
    from ..pipelines.mmdit import denoiser

    values = resolved_values(edit, ("safety_concept", *NUMBERS))
    with unet_hooks(denoiser(pipe), post=SLDGuidance(pipe, values)):
        yield pipe


def _register_sampler():
    from ..pipelines.inference import register_sampler

    register_sampler("sld", sld_sampler)


_register_sampler()
