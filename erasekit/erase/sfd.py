"""SFD: Score Forgetting Distillation (Chen et al., ICLR 2025, arXiv 2409.11219), a data-free one-step generator.

Three UNets (sfd.md section 1): the frozen teacher eps_phi (the pipeline's own UNet, never
changed), a fake score eps_psi and a one-step generator G_theta, both copies of the teacher in fp32
(master weights, whatever the pipeline's dtype). x0 predictions are f(x_t, t, c) = (x_t - b_t eps) / a_t
with a_t = sqrt(abar_t), b_t = sqrt(1 - abar_t), and x_g = G_theta(z, c) is the generator's x0
prediction at the fixed timestep t_init from the input b_{t_init} z (see ``pipelines/one_step.py``).

SFD is two-stage, as every SD run of the reference: stage 2 (``iterations``, the forgetting) starts
G from a one-step generator, psi from a fresh copy of the teacher, the teacher being the original
model. The reference's SD generator is the SiD-LSG one-step SD 1.5 checkpoint; give such a generator
(or a previous run's Edit) as ``generator_init``. Without one, stage 1 makes it here: plain SiD
distillation of the retain prompts (``distill_iterations``, no forgetting term), G and psi starting
from the teacher (the reference's one-stage DDPM initialisation). The two stages share every other
option. A plain run (``forget_batch_size=0``) is a stage 1 by itself: its ``iterations`` only.
Both stages train on the shared engine (:mod:`erasekit.erase.engine`): mixed precision, gradient
checkpointing, the seed and the checkpoints are its options (:class:`~erasekit.erase.engine.RunConfig`);
a named ``checkpoint_dir`` holds one folder per stage (``stage1``, ``stage2``).

Each iteration alternates 1 : 1 (section 4), noising x_t = a_t x_g + b_t eps with t ~ U{t_min..t_max}:

1. fake score, on sg(G(z, c)) for retain conditions c in C_r and the forget condition c_f (eq. L_psi)::

       L_psi = lam_sg_r E ||eps^kappa_psi(x_t, t, c) - eps||^2 + lam_sg_f E ||eps^kappa_psi(x^f_t, t, c_f) - eps||^2

   (sum over latent dims, mean over samples; kappa-guided psi, ``cfg_dropout`` of its conditions
   replaced by the unconditional prompt);
2. generator, with psi frozen and fresh z, t, eps and prompts, the SiD loss per sample::

       l(x_g; c_R, c_F) = sum (f_phi(x_t; c_R) - f_psi(x_t; c_F)) . [(f_phi - x_g) - alpha (f_phi - f_psi)] / omega,
       omega = sg(mean |f_phi - x_g|) >= 1e-5,
       L_theta = lam_g_r E_{c in C_r} l(G(z, c); c, c) + lam_g_f E l(G(z, c_f); c_o, c_f)      (L_r + L_MU)

   The gradient reaches theta through x_g and through the inputs x_t of both frozen networks.
   ``stop_gradient=True`` is the DMD / Diff-Instruct variant: f_phi and f_psi without gradient, so
   dl/dx_g = -(f_phi - f_psi) / omega; much cheaper; results should say which was used.

Guidance is SiD-LSG's eps^kappa(x; c, u) = eps(x, u) + kappa (eps(x, c) - eps(x, u)) for psi and
the teacher (u = "", or ``negative_prompt`` on the forget side); none at sampling. Gradients get
``nan_to_num`` and element-wise value clipping; samples with a non-finite loss are dropped.

The safe condition c_o is the forget prompt with the concept's words replaced (case-insensitively)
by ``override`` (the reference's celebrity recipe: "brad pitt" -> "a middle aged man"), or given
per prompt as ``safe_prompts``. With ``override=None`` the model's preset provider
(:mod:`erasekit.presets`) may name the safe concepts and the prompts: on canvas-mini another label
of the same kind that is not being forgotten, by default (``pseudo_label="next"``) the next one in
the world's list, fixed for the run, as the reference's shipped configurations fix one override
(DDPM class 0 -> class 1, "brad pitt" -> "a middle aged man"); ``pseudo_label="rand"`` draws one per
sample (the reference DDPM's ``pseudo_label_type="rand"``), which on canvas-mini forgets less and
costs the other styles more (a moving target: docs/methods/sfd.md); the prompts are its captions
(every unique template). On other models the concept is replaced by "" and ``retain_prompts`` is required.

SD 3 (flow matching; docs/backbones.md, "SFD on SD 3"). The teacher's forward process is
x_s = (1 - s) x0 + s eps, i.e. x0 + (s / (1 - s)) eps scaled by 1 - s: SiD's EDM process with
sigma = s / (1 - s), as SD's x_t = a x0 + b eps is with sigma = b / a. SiD's identities hold for any
such Gaussian process, and every loss above is written in x0 and eps predictions, which are affine
in the transformer's velocity v = eps - x0 at a given s (x0 = x_s - s v, eps = x_s + (1 - s) v;
:class:`~erasekit.pipelines.one_step.NoiseSchedule`), so they carry over unchanged: L_psi in eps
space is the flow-matching loss ||v_psi - (eps - x_g)||^2 weighted by (1 - s)^2, and omega, SiD's
data-adaptive weight, reads x0 predictions only. The LSG combination taken on v is the same
combination of the implied eps. The generator is a copy of the transformer at t_init:
x_g = s (z - v_theta(s z, s, c)); ``t``, ``t_init``, ``t_min`` and ``t_max`` index the scheduler's
1000-step training grid, s = its shifted t / 1000, and the preset's t_init is the grid step at SiD's
sigma_init = 2.5 (s = 5 / 7: 455 at SD 3's shift 3; :func:`flow_t_init`). Flux is refused
(:data:`FLUX_REFUSAL`).

Presets (:func:`resolve`): every option of :data:`PRESET_KEYS` left at None takes the value of the
model's preset, recorded with the others in the Edit's manifest (``preset``, ``resolved``); an option
you give always wins. Every model without a provider of its own gets ``reference``, the SD v1.5
recipe of the reference code (:data:`REFERENCE`; sfd.md section 6, SD/run_sfd.sh); canvas-mini's
provider gives ``canvas``, chosen by measurement on a 2-core CPU. The DDPM recipe, for comparison:

=====================  ===========================  =================  ===========================
knob                   ``reference`` (SD v1.5)      ``canvas``         DDPM CIFAR-10 (reference)
=====================  ===========================  =================  ===========================
alpha                  1.0                          1.0                1.2
lam g_r/g_f/sg_r/sg_f  1 / 1 / 1 / 1                1 / 0.1 / 1 / 1    1 / 0.01 / 1 / 0.01
lr psi / theta         3e-6 / 1e-6                  3e-4 / 1e-4        3e-5 / 1e-5 (two-stage)
Adam betas, eps        (0, 0.999), 1e-6             (0, 0.999), 1e-6   (0, 0.999), 1e-8
batch retain + forget  8 + 8 per process            10 + 2             128
iterations             12.5k + 12.5k                400 + 200          50k (+ 50k two-stage)
t_init; t range        625; U{20..979}              625; U{20..979}    440; U{38..711}
kappa                  4.5 (10 % "" for psi)        1.5 (10 % "")      none
precision              bf16 autocast on GPU, else   fp32               fp32
                       fp32 (fp32 master weights)
grad checkpointing     on for full-size models      off                off
                       (latents > 32 px)
grad value clip; EMA   1.0; off                     1.0; off           1.0; 0.9999
safe label             ``next`` (fixed)             ``next`` (fixed)   fixed override
=====================  ===========================  =================  ===========================

``reference`` follows the reference's SD run: 8 retain and 8 forget prompts per iteration (its
global batch, drawn once each for the retain and the forget iterator; here per process, so divide
by the number of processes to match it on several GPUs), 12.5k iterations (100 kimg, the
checkpoint its README evaluates). The reference starts the forgetting from SiD-LSG's one-step SD 1.5
generator; give it (converted to a diffusers UNet folder) as ``generator_init``, or stage 1 distils
one here with the same budget as stage 2 (``distill_iterations``; the reference has no stage 1 for SD).
The reference trains pure fp16 weights without master copies, which its upstream users report
degrading (sfd.md, Pitfalls); here bf16 autocast with fp32 master weights.

Three ``canvas`` values depart from the SD recipe, each measured on canvas-mini (docs/methods/sfd.md):
kappa 1.5 (SiD-LSG's other published scale; plain distillation kept 64 % style accuracy at 4.5, 86 % at
1.5), lam_g_f 0.1 (at 1 the forgetting term costs the other styles 20 points of accuracy; the DDPM
recipe uses 0.01) and the fixed ``pseudo_label`` "next" on canvas concepts; its budget (400 + 200
iterations, batch 10 + 2, lr 3e-4 / 1e-4, fp32) fits minutes on a CPU.
"""

from __future__ import annotations

import copy
import re
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch

from ..errors import ConfigError
from ..pipelines.family import Context
from ..presets import concept_context
from .engine import AUTO, RunConfig, Trainer
from .registry import check, register


def _f(default, help: str):
    return field(default=default, metadata={"help": help})


def _preset(help: str):
    """An option whose default (None) is the model's preset's value (:func:`resolve`)."""
    return _f(None, f"{help} (None: the model's preset)")


# The reference's SD v1.5 recipe (sfd.md section 6 and "Defaults (toolkit)"; tqch/score-forgetting-distillation
# SD/run_sfd.sh and SD/training/training_loop.py): every model without a preset of its own.
REFERENCE = dict(iterations=12_500, distill_iterations=12_500, batch_size=8, forget_batch_size=8, lr_psi=3e-6,
                 lr_theta=1e-6, adam_betas=(0.0, 0.999), adam_eps=1e-6, alpha=1.0, lam_g_r=1.0, lam_g_f=1.0,
                 lam_sg_r=1.0, lam_sg_f=1.0, t_init=625, t_min=20, t_max=979, kappa=4.5, cfg_dropout=0.1,
                 grad_clip=1.0, ema_decay=0.0, pseudo_label="next")
FULL_SIZE_LATENT = 32   # denoisers with larger latents (SD 1.x/2.x: 64, SDXL, SD 3: 128) checkpoint their activations
# SiD's generator noise level in EDM units (x0 + sigma eps): SD's t_init 625 has sqrt((1 - abar) / abar) = 2.50.
SIGMA_INIT = 2.5
# The options a preset fills (a None field takes the preset's value).
PRESET_KEYS = (*REFERENCE, "mixed_precision", "gradient_checkpointing")


def reference_preset(pipe) -> dict:
    """:data:`REFERENCE` with the reference's precision for ``pipe``: bf16 autocast on GPU (fp32 master
    weights), gradient checkpointing of the three denoisers on full-size models. On SD 3 ``t_init`` is
    the grid timestep at SiD's generator noise level (:func:`flow_t_init`)."""
    from ..pipelines.mmdit import denoiser, mmdit_family

    net = denoiser(pipe)
    values = {**REFERENCE, "mixed_precision": "bf16" if net.device.type == "cuda" else "no",
              "gradient_checkpointing": int(net.config.sample_size) > FULL_SIZE_LATENT}
    if mmdit_family(pipe) is not None:
        from ..pipelines.one_step import NoiseSchedule

        values["t_init"] = flow_t_init(NoiseSchedule(pipe))
    return values


def flow_t_init(schedule) -> int:
    """The flow grid's timestep whose noise level s is nearest SiD's sigma_init in EDM units.

    x_s = (1 - s) x0 + s eps is x0 + (s / (1 - s)) eps scaled by 1 - s, so the EDM noise level is
    s / (1 - s); SiD-LSG's t_init 625 on SD's schedule is sigma_init 2.5, i.e. s = 2.5 / 3.5 = 0.714
    (SD 3's shift 3: t_init 455 of 1000; shift 1: 714)."""
    t = torch.arange(1, len(schedule))
    return int(t[(schedule.sigma(t) - SIGMA_INIT / (1 + SIGMA_INIT)).abs().argmin()])


@dataclass
class SFDConfig(RunConfig):
    """Options of :func:`sfd` (see the module docstring for the equations and the presets).

    ``None`` means "the model's preset" (:func:`resolve`): the reference's SD v1.5 recipe, or the
    values the model's preset provider gives (canvas-mini's). The engine's options (seed of z, t,
    eps, prompt choice and dropout, checkpoints, progress, and mixed precision and gradient
    checkpointing of all three UNets, which are preset options here too) come from :class:`RunConfig`.
    """

    iterations: int | None = _preset("alternating psi/theta iterations of SFD (stage 2)")
    distill_iterations: int | None = _preset("stage 1 without `generator_init`: plain SiD distillation iterations "
                                             "that make the one-step generator SFD starts from (0 = start from "
                                             "the teacher; skipped when forget_batch_size is 0)")
    batch_size: int | None = _preset("retain conditions (C_r) per iteration and process")
    forget_batch_size: int | None = _preset("forget conditions (c_f) per iteration and process; 0 = plain SiD "
                                            "distillation")
    lr_psi: float | None = _preset("Adam learning rate of the fake score psi")
    lr_theta: float | None = _preset("Adam learning rate of the generator theta")
    adam_betas: tuple[float, float] | None = _preset("Adam betas of both optimisers")
    adam_eps: float | None = _preset("Adam epsilon of both optimisers")
    alpha: float | None = _preset("SiD alpha (1.0 SD, 1.2 DDPM)")
    lam_g_r: float | None = _preset("weight of the remain (distillation) term L_r in the generator loss")
    lam_g_f: float | None = _preset("weight of the forgetting term L_MU in the generator loss")
    lam_sg_r: float | None = _preset("weight of retain samples in the fake-score loss")
    lam_sg_f: float | None = _preset("weight of forget samples in the fake-score loss")
    t_init: int | None = _preset("the generator's fixed timestep (625 SD schedule, 440 DDPM linear)")
    t_min: int | None = _preset("smallest timestep of both losses")
    t_max: int | None = _preset("largest timestep of both losses")
    kappa: float | None = _preset("SiD-LSG guidance scale of psi and the teacher (1 = no guidance)")
    cfg_dropout: float | None = _preset("fraction of psi's training conditions replaced by the unconditional "
                                        "prompt")
    negative_prompt: str = _f("", "unconditional branch on the forget side (teacher and psi), e.g. an NSFW list")
    stop_gradient: bool = _f(False, "DMD-style variant: no gradient through the teacher and psi")
    grad_clip: float | None = _preset("element-wise gradient value clip of both networks (0 = off)")
    ema_decay: float | None = _preset("EMA of the generator weights (0 = off, as the SD recipe)")
    forget_prompts: tuple[str, ...] | None = _f(None, "prompts showing the concept ('{}' = the concept); "
                                                      "None: the model's prompts of the concept (canvas-mini: "
                                                      "its captions), else the concept itself")
    safe_prompts: tuple[str, ...] | None = _f(None, "the teacher's prompt c_o for each forget prompt "
                                                    "(instead of replacing the concept by `override`)")
    retain_prompts: tuple[str, ...] | None = _f(None, "prompts to keep (C_r); None: the model's prompts of "
                                                      "other concepts (canvas-mini's captions; required elsewhere)")
    override: str | None = _f(None, "text replacing the concept in c_o, e.g. 'a middle aged man'; None: the "
                                    "model's safe concept (canvas-mini: another label, see `pseudo_label`) or ''")
    pseudo_label: str | None = _preset("safe label when `override` is None on a model with labels (canvas-mini): "
                                       "'next' = the next retained label of the same kind, fixed; 'rand' = a "
                                       "random retained label per sample")
    generator_init: str | None = _f(None, "start G from a one-step generator: an SFD/SiD Edit file (e.g. a "
                                          "stage-1 run with forget_batch_size=0) or a diffusers UNet folder")
    mixed_precision: str | None = _f(None, "no, bf16, or fp16 (GPU only); weights train in fp32 (None: the "
                                           "preset's; reference: bf16 on GPU, no on CPU)")
    gradient_checkpointing: bool | None = _f(None, "recompute the three UNets' activations in backward (None: the "
                                                   "preset's; reference: on for full-size models)")

    def validate(self) -> None:
        mp = self.mixed_precision  # None (the preset's) passes the engine's check as "no"
        self.mixed_precision = "no" if mp is None else mp
        try:
            super().validate()
        finally:
            self.mixed_precision = mp
        given = {name: getattr(self, name) for name in PRESET_KEYS if getattr(self, name) is not None}
        for name in ("iterations", "distill_iterations", "forget_batch_size", "t_min"):
            check(given.get(name, 0) >= 0, f"`{name}` must be >= 0 but is {given.get(name)}")
        for name in ("batch_size", "t_init"):
            check(given.get(name, 1) >= 1, f"`{name}` must be >= 1 but is {given.get(name)}")
        for name in ("lr_psi", "lr_theta", "adam_eps", "kappa"):
            check(given.get(name, 1) > 0, f"`{name}` must be > 0 but is {given.get(name)}")
        for name in ("alpha", "lam_g_r", "lam_g_f", "lam_sg_r", "lam_sg_f", "grad_clip"):
            check(given.get(name, 0) >= 0, f"`{name}` must be >= 0 but is {given.get(name)}")
        betas = given.get("adam_betas", (0.0, 0.0))
        check(len(betas) == 2 and all(0 <= b < 1 for b in betas),
              f"`adam_betas` must be two numbers in [0, 1) but is {self.adam_betas}")
        if self.t_min is not None and self.t_max is not None:
            check(self.t_min <= self.t_max, f"`t_min` must be <= `t_max` but is {self.t_min} > {self.t_max}")
        check(0 <= given.get("cfg_dropout", 0) < 1, f"`cfg_dropout` must be in [0, 1) but is {self.cfg_dropout}")
        check(0 <= given.get("ema_decay", 0) < 1, f"`ema_decay` must be in [0, 1) but is {self.ema_decay}")
        check(given.get("pseudo_label", "next") in ("next", "rand"),
              f"`pseudo_label` must be 'next' or 'rand' but is {self.pseudo_label!r}")
        for name in ("forget_prompts", "safe_prompts", "retain_prompts"):
            value = getattr(self, name)
            check(value is None or (not isinstance(value, str) and len(value) > 0),
                  f"`{name}` must be a non-empty list of prompts or None but is {value!r}")
        if self.safe_prompts is not None:
            check(self.forget_prompts is not None and len(self.safe_prompts) == len(self.forget_prompts),
                  "`safe_prompts` must pair up with `forget_prompts` (same length) but got "
                  f"{len(self.safe_prompts)} safe for {len(self.forget_prompts or ())} forget prompts")


def resolve(pipe, concepts: list[str], config: SFDConfig, ctx=None) -> tuple[SFDConfig, str]:
    """``config`` with every ``None`` preset option (:data:`PRESET_KEYS`) filled, and the preset's name.

    The model's preset provider gives the values (canvas-mini: ``canvas``, measured there), else they
    are the reference's SD v1.5 recipe (``reference``, :func:`reference_preset`). Options you give win.
    """
    ctx = ctx or concept_context(pipe, concepts, config)
    name, values = ctx.ask("sfd_preset") or ("reference", reference_preset(pipe))
    missing = {key: values[key] for key in PRESET_KEYS if getattr(config, key) is None}
    return (replace(config, **missing) if missing else config), name


# -- conditions ---------------------------------------------------------------------------------
@dataclass
class PromptSets:
    """The forget prompts c_f with their safe prompts c_o (fixed or drawn), and the retain prompts C_r."""

    forget: list[str]
    retain: list[str]
    safe: list[str] | None = None                                  # c_o per forget prompt, if fixed
    swaps: list[tuple[re.Pattern, list[str]]] = field(default_factory=list)  # concept words -> choices

    def safe_prompt(self, i: int, rng: torch.Generator) -> str:
        """c_o for forget prompt ``i``: given, or the concept's words replaced by a (random) override."""
        if self.safe is not None:
            return self.safe[i]
        prompt = self.forget[i]
        for pattern, choices in self.swaps:
            pick = choices[int(torch.randint(len(choices), (1,), generator=rng))]
            prompt = pattern.sub(lambda _: pick, prompt)
        return re.sub(r"\s+", " ", prompt).strip()


def prompt_sets(concepts: list[str], config: SFDConfig, ctx=None) -> PromptSets:
    """Build c_f, c_o and C_r from the concepts and the config (``ctx``: the concepts on a model).

    The model's provider may give each concept its words, its safe choices and the forget / retain
    prompts (canvas-mini: captions over every paraphrase template, the next retained label of the
    same kind); otherwise the concept itself is c_f, '' replaces it in c_o and C_r must be given.
    """
    ctx = ctx or concept_context(None, concepts, config)
    pseudo = config.pseudo_label or (ctx.ask("sfd_preset") or ("reference", REFERENCE))[1]["pseudo_label"]
    world = ctx.ask("sfd_prompts", pseudo, config.override is None) or {}
    words = world.get("words") or {c: c for c in concepts}
    if config.forget_prompts is not None:
        forget = [p.format(words[c]) for p in config.forget_prompts for c in concepts] if any(
            "{}" in p for p in config.forget_prompts) else list(config.forget_prompts)
    else:
        forget = world.get("forget") or [words[c] for c in concepts]
    if config.retain_prompts is not None:
        retain = list(config.retain_prompts)
    elif world.get("retain") is not None:
        retain = world["retain"]
    else:
        raise ConfigError(f"`retain_prompts` is required for {concepts} on this model ({ctx.provider.name} "
                          "presets have no retain prompts for them): give prompts the generator must keep, "
                          "e.g. LAION captions")
    sets = PromptSets(forget, retain, list(config.safe_prompts) if config.safe_prompts else None)
    for c in concepts:
        choices = [config.override] if config.override is not None else world.get("choices", {}).get(c, [""])
        sets.swaps.append((re.compile(re.escape(words[c]), re.IGNORECASE), choices))
    if sets.safe is None:
        missing = [p for p in forget if not any(pat.search(p) for pat, _ in sets.swaps)]
        if missing:
            raise ConfigError(f"forget prompt {missing[0]!r} does not contain the concept's words, so its safe "
                              "prompt would be itself: include the concept or give `safe_prompts`")
    return sets


def sid_loss(x_g: torch.Tensor, f_phi: torch.Tensor, f_psi: torch.Tensor, alpha: float) -> torch.Tensor:
    """Per-sample SiD generator loss (sfd.md section 3); omega is a stop-gradient normaliser."""
    omega = (f_phi - x_g).abs().flatten(1).mean(1).clamp_min(1e-5).detach()
    diff = f_phi - f_psi
    return (diff * ((f_phi - x_g) - alpha * diff)).flatten(1).sum(1) / omega


def _split_mean(per_sample: torch.Tensor, n_retain: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Means over the retain rows and the forget rows, dropping non-finite samples."""
    def mean(x):
        ok = torch.isfinite(x)
        return x[ok].mean() if ok.any() else x[ok].sum()  # no rows (or none finite): 0, graph kept
    return mean(per_sample[:n_retain]), mean(per_sample[n_retain:])


def _where(mask: torch.Tensor, a: Context, b: Context) -> Context:
    """Row-wise ``a`` where ``mask`` else ``b`` (classifier-free-guidance dropout of conditions)."""
    pooled = None if b.pooled is None else torch.where(mask.view(-1, 1), a.pooled, b.pooled)
    return Context(torch.where(mask.view(-1, 1, 1), a.embeds, b.embeds), pooled)


def _load_generator(unet, source: str, pipe, t_init: int) -> None:
    """Overwrite the generator copy with a distilled one-step generator (two-stage SFD, sfd.md section 1)."""
    from ..pipelines.edit import Edit

    path = Path(source)
    if path.is_dir():  # a diffusers model folder (safetensors) of the denoiser's class, e.g. a converted SiD-LSG UNet
        unet.load_state_dict(type(unet).from_pretrained(path, use_safetensors=True).state_dict())
        return
    edit = Edit.load(path, pipe)
    if not edit.one_step or edit.manifest.get("generator_timestep") != t_init:
        raise ConfigError(f"`generator_init` {source} is not a one-step generator at t_init={t_init} (its "
                          f"manifest: sampler {edit.manifest.get('sampler')!r}, timestep "
                          f"{edit.manifest.get('generator_timestep')}): give a matching SFD Edit or set `t_init`")
    with torch.no_grad():
        for key in edit.keys:
            param = unet.get_parameter(key.split("/", 1)[1])
            param.copy_(edit.new_weight(key, param.detach()))


# -- training -----------------------------------------------------------------------------------
@dataclass
class Batch:
    """One draw of conditions and noise: rows [0, n_retain) retain, the rest forget."""

    n_retain: int
    gen: Context      # c for G and psi (c_r or c_f)
    teacher: Context  # c_R for the teacher (c_r or c_o)
    uncond: Context   # the unconditional branch per row ("" or the negative prompt)
    z: torch.Tensor
    t: torch.Tensor
    eps: torch.Tensor


class SFDTrainer:
    """The three networks, both optimisers and the alternation; ``with SFDTrainer(...) as tr: tr.train()``.

    ``config``'s preset options left at None are resolved for the model first (:func:`resolve`;
    ``ctx``: the concepts on the model, when the caller has them already).

    The teacher is the pipeline's UNet: frozen for the duration of the ``with`` block (its
    ``requires_grad`` flags are restored on exit) and never stepped. The loop, precision, seeding
    (one generator stream, ``seed + rank``), checkpoints and resume are the shared engine's
    (:class:`~erasekit.erase.engine.Trainer` over the networks ``psi``, ``G`` and the EMA, if kept).
    """

    def __init__(self, pipe, concepts: list[str], config: SFDConfig, generator: dict | None = None, ctx=None):
        from ..pipelines.family import FamilyAdapter
        from ..pipelines.mmdit import denoiser
        from ..pipelines.one_step import NoiseSchedule

        self.pipe, self.concepts = pipe, list(concepts)
        self.ctx = ctx or concept_context(pipe, self.concepts, config)
        config, self.preset = resolve(pipe, self.concepts, config, self.ctx)
        self.config = config
        self.prompts = prompt_sets(self.concepts, config, self.ctx)
        self.adapter = FamilyAdapter(pipe)
        self.teacher = denoiser(pipe)
        self.component = "transformer" if self.adapter.mmdit else "unet"
        self.schedule = NoiseSchedule(pipe)
        n = len(self.schedule)
        check(config.t_init < n and config.t_max < n,
              f"`t_init` and `t_max` must be < {n} (the schedule's length) but are {config.t_init}, {config.t_max}")
        self.prediction_type = self.schedule.prediction_type
        self.psi, self.G = (copy.deepcopy(self.teacher).float().train() for _ in range(2))
        kw = dict(betas=tuple(config.adam_betas), eps=config.adam_eps)
        optimizers = {"psi": torch.optim.Adam(self.psi.parameters(), lr=config.lr_psi, **kw),
                      "G": torch.optim.Adam(self.G.parameters(), lr=config.lr_theta, **kw)}
        if generator is not None:  # stage 1's generator (the UNet's state dict)
            self.G.load_state_dict(generator)
        elif config.generator_init:
            _load_generator(self.G, config.generator_init, pipe, config.t_init)
        self.ema = copy.deepcopy(self.G).requires_grad_(False) if config.ema_decay > 0 else None
        networks = {"psi": self.psi, "G": self.G, **({"ema": self.ema} if self.ema is not None else {})}
        signature = {**{k: v for k, v in config.to_dict().items() if k != "iterations"}, "concepts": self.concepts}
        self.engine = Trainer(pipe, {}, config, steps=config.iterations, signature=signature, networks=networks,
                              optimizers=optimizers, grad_through=(self.component,), stream_rng=True)
        self.last: dict = {}
        self._empty = self.adapter.encode([""])
        self._negative = self.adapter.encode([config.negative_prompt])

    # -- the frozen teacher -----------------------------------------------------------------------
    def __enter__(self) -> "SFDTrainer":
        self.engine.__enter__()
        self.device, self.rng = self.engine.device, self.engine.rng
        self.schedule.to(self.device)
        return self

    def __exit__(self, *exc) -> None:
        self.engine.__exit__(*exc)

    @property
    def step(self) -> int:
        """Iterations done (resumed ones included)."""
        return self.engine.step

    # -- conditions and noise -----------------------------------------------------------------------
    def _randint(self, high: int, n: int, low: int = 0) -> list[int]:
        return torch.randint(low, high, (n,), generator=self.rng).tolist()

    def draw(self, n_retain: int | None = None, n_forget: int | None = None) -> Batch:
        """Random retain/forget conditions (G/psi, teacher, unconditional) and z, t, eps."""
        cfg, P = self.config, self.prompts
        n_r = cfg.batch_size if n_retain is None else n_retain
        n_f = cfg.forget_batch_size if n_forget is None else n_forget
        retain = [P.retain[i] for i in self._randint(len(P.retain), n_r)]
        picks = self._randint(len(P.forget), n_f)
        gen = retain + [P.forget[i] for i in picks]
        teacher = retain + [P.safe_prompt(i, self.rng) for i in picks]
        uncond = Context.cat([self._empty] * n_r + [self._negative] * n_f)
        n = n_r + n_f
        shape = (n, *self.schedule.latent_shape(self.teacher))
        z, eps = (torch.randn(shape, generator=self.rng).to(self.device) for _ in range(2))
        t = torch.tensor(self._randint(cfg.t_max + 1, n, cfg.t_min), device=self.device)
        return Batch(n_r, self._encode(gen), self._encode(teacher), uncond, z, t, eps)

    def _encode(self, prompts: list[str]):
        return self.adapter.encode(prompts)

    # -- predictions --------------------------------------------------------------------------------
    def _ab(self, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.schedule.ab(t)

    def generate(self, z: torch.Tensor, ctx, grad: bool = True) -> torch.Tensor:
        """x_g = G_theta(z, c) (with or without gradient)."""
        from ..pipelines.one_step import one_step_latents

        with torch.set_grad_enabled(grad), self.engine.autocast():
            return one_step_latents(self.G, z, ctx, self.config.t_init, self.schedule).float()

    def guided(self, net, x_t: torch.Tensor, t: torch.Tensor, cond, uncond) -> tuple[torch.Tensor, torch.Tensor]:
        """(x0, eps) of eps^kappa(x_t; c, u) = eps(x_t, u) + kappa (eps(x_t, c) - eps(x_t, u)).

        The combination is taken on the network's raw output (eps, v or x0; SD 3's velocity): every
        output type is affine in eps at a given (x_t, t) with the same coefficients for u and c, so it
        is the same combination of the implied eps."""
        out_of = self.schedule.output
        kappa = self.config.kappa
        with self.engine.autocast():
            if kappa == 1.0:
                out = out_of(net, x_t, t, cond).float()
            else:
                both = out_of(net, torch.cat([x_t, x_t]), torch.cat([t, t]), Context.cat([uncond, cond])).float()
                out_u, out_c = both.chunk(2)
                out = out_u + kappa * (out_c - out_u)
        return self.schedule.x0_eps(out, x_t, t)

    # -- the two losses -------------------------------------------------------------------------------
    def fake_score_loss(self, batch: Batch) -> tuple[torch.Tensor, dict]:
        """L_psi on sg(G(z, c)): kappa-guided psi regressed on eps, retain and forget samples."""
        cfg = self.config
        with torch.no_grad():
            x_g = self.generate(batch.z, batch.gen, grad=False)
        a, b = self._ab(batch.t)
        x_t = a * x_g + b * batch.eps
        drop = (torch.rand(len(x_t), generator=self.rng) < cfg.cfg_dropout).to(self.device)
        cond = _where(drop, batch.uncond, batch.gen)
        _, eps_psi = self.guided(self.psi, x_t, batch.t, cond, batch.uncond)
        per = (eps_psi - batch.eps).pow(2).flatten(1).sum(1)
        remain, forget = _split_mean(per, batch.n_retain)
        return cfg.lam_sg_r * remain + cfg.lam_sg_f * forget, {"psi_r": remain.item(), "psi_f": forget.item()}

    def generator_loss(self, batch: Batch) -> tuple[torch.Tensor, dict]:
        """L_theta = lam_g_r L_r + lam_g_f L_MU (full SiD, or the stop-gradient variant)."""
        cfg = self.config
        x_g = self.generate(batch.z, batch.gen, grad=True)
        a, b = self._ab(batch.t)
        x_t = a * x_g + b * batch.eps
        with torch.set_grad_enabled(not cfg.stop_gradient):
            x_in = x_t.detach() if cfg.stop_gradient else x_t
            f_phi, _ = self.guided(self.teacher, x_in, batch.t, batch.teacher, batch.uncond)
            f_psi, _ = self.guided(self.psi, x_in, batch.t, batch.gen, batch.uncond)
        per = sid_loss(x_g, f_phi, f_psi, cfg.alpha)
        remain, forget = _split_mean(per, batch.n_retain)
        return cfg.lam_g_r * remain + cfg.lam_g_f * forget, {"g_r": remain.item(), "g_mu": forget.item()}

    # -- the alternation ------------------------------------------------------------------------------
    def _clean_grads(self, params: list) -> None:
        """Non-finite gradient entries to 0, then the element-wise value clip (sfd.md section 4)."""
        for p in params:
            if p.grad is not None:
                torch.nan_to_num_(p.grad, nan=0.0, posinf=0.0, neginf=0.0)
        if self.config.grad_clip > 0:
            torch.nn.utils.clip_grad_value_(params, self.config.grad_clip)

    def train_step(self) -> dict:
        """One iteration: a fake-score step, then a generator step with psi frozen (1 : 1)."""
        loss_psi, log = self.fake_score_loss(self.draw())
        self.engine.update("psi", loss_psi, self._clean_grads)
        self.psi.requires_grad_(False)
        try:
            loss_g, log_g = self.generator_loss(self.draw())
            self.engine.update("G", loss_g, self._clean_grads)
        finally:
            self.psi.requires_grad_(True)
        if self.ema is not None:
            with torch.no_grad():
                for e, p in zip(self.ema.parameters(), self.G.parameters()):
                    e.lerp_(p, 1 - self.config.ema_decay)
        self.last = {**log, **log_g}
        return self.last

    def train(self) -> None:
        """Run (or resume, from the engine's checkpoint) to ``config.iterations``."""
        self.engine.run(lambda step: self.train_step(), desc="sfd")

    # -- the result -------------------------------------------------------------------------------------
    def generator(self):
        """The generator network, a copy of the teacher's UNet or transformer (its EMA when kept)."""
        return self.ema if self.ema is not None else self.G

    def edit(self, **manifest_extra):
        """The generator as an Edit replacing every weight of the denoiser (UNet or SD 3 transformer); its
        manifest asks for the one-step sampler (and gives SD 3's ``generator_sigma``)."""
        from ..pipelines.edit import Edit
        from ..pipelines.one_step import ONE_STEP

        gen = self.generator()
        new = {f"{self.component}/{name}": p.detach() for name, p in gen.named_parameters()}
        if self.schedule.flow is not None:
            manifest_extra = {"generator_sigma": round(float(self.schedule.sigma(torch.tensor(
                [self.config.t_init]))[0]), 6), **manifest_extra}
        manifest = {"sampler": ONE_STEP, "generator_timestep": self.config.t_init,
                    "prediction_type": self.prediction_type, "iterations_run": self.step,
                    "resumed_from": self.engine.resumed_from,
                    "loss": "stop_gradient" if self.config.stop_gradient else "sid",
                    "safe_concepts": None if self.prompts.safe is not None else {
                        c: choices for c, (_, choices) in zip(self.concepts, self.prompts.swaps)},
                    "last_losses": {k: round(v, 6) for k, v in self.last.items()}, **manifest_extra}
        return Edit.from_weights(self.pipe, new, manifest, low_rank=False)


FLUX_REFUSAL = (
    "SFD distils a one-step generator from the teacher's score with SiD-LSG guidance: a fake score and the teacher "
    "each combine an unconditional and a conditional prediction with scale kappa, and the fake score is trained on "
    "the generator's samples with 10 % of its conditions dropped to the unconditional one. FLUX.1-dev is "
    "guidance-distilled (one conditional prediction with a guidance embedding, no unconditional prediction for "
    "guidance to combine) and FLUX.1-schnell is timestep-distilled (not a score of its distribution at "
    "every noise level), so neither gives the guided teacher score or a fake score of that form; SD 3 does "
    "(docs/backbones.md, 'SFD on SD 3')")


@register("sfd", SFDConfig, components=("unet", "transformer"), families=("sd1", "sd2", "sdxl", "sd3"),
          refusals={"flux": FLUX_REFUSAL})
def sfd(pipe, concepts: list[str], config: SFDConfig):
    """Score Forgetting Distillation: distil ``pipe`` into a one-step generator that forgets ``concepts``.

    Returns an Edit (every weight of the UNet, or of SD 3's transformer) whose manifest has
    ``"sampler": "one_step"``; sample it with
    ``generate(one_step_pipeline(pipe, edit), prompts, seeds)``. The pipeline is left unchanged.
    Without ``generator_init``, stage 1 (``distill_iterations`` of plain SiD) makes the one-step
    generator that the forgetting stage starts from; a plain run (``forget_batch_size=0``) is
    itself a stage 1 and runs ``iterations`` only.
    """
    ctx = concept_context(pipe, concepts, config)
    config, _ = resolve(pipe, concepts, config, ctx)

    def stage_dir(name: str) -> str | None:
        d = config.checkpoint_dir
        return d if d in (None, AUTO) else str(Path(d) / name)  # "auto": the stages' keys differ already

    generator, distilled = None, None
    if config.generator_init is None and config.distill_iterations > 0 and config.forget_batch_size > 0:
        stage1 = replace(config, iterations=config.distill_iterations, distill_iterations=0, forget_batch_size=0,
                         checkpoint_dir=stage_dir("stage1"))
        with SFDTrainer(pipe, concepts, stage1, ctx=ctx) as trainer:
            trainer.train()
            generator = trainer.generator().state_dict()  # detached tensors, kept alive past the trainer
            distilled = trainer.step
        config = replace(config, checkpoint_dir=stage_dir("stage2"))
    with SFDTrainer(pipe, concepts, config, generator, ctx=ctx) as trainer:
        trainer.train()
        edit = trainer.edit(distill_iterations_run=distilled)
        record = _preset_record(trainer)
        edit.manifest.update(record)
        edit.manifest.setdefault("resolved", record["preset"]["values"])
        return edit


def _preset_record(trainer: SFDTrainer) -> dict:
    """The manifest's kind and preset entries: the preset's name, every option it controls as resolved
    (:data:`PRESET_KEYS`) and the number of forget and retain prompts."""
    cfg, sets = trainer.config, trainer.prompts
    values = {**{k: getattr(cfg, k) for k in PRESET_KEYS}, "forget_prompts": len(sets.forget),
              "retain_prompts": len(sets.retain)}
    return trainer.ctx.record(trainer.preset, values)
