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
option and checkpoint into ``checkpoint_dir``/stage1 and /stage2. A plain run (``forget_batch_size=0``)
is a stage 1 by itself: its ``iterations`` only.

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
per prompt as ``safe_prompts``. For a canvas-mini style or object with ``override=None`` the safe
concept is another canvas label of the same kind that is not being forgotten: by default
(``pseudo_label="next"``) the next one in the world's list, fixed for the run, as the reference's
shipped configurations fix one override (DDPM class 0 -> class 1, "brad pitt" -> "a middle aged
man"); ``pseudo_label="rand"`` draws one per sample (the reference DDPM's ``pseudo_label_type="rand"``),
which on canvas-mini forgets less and costs the other styles more (a moving target: README, SFD).
The prompts are the canvas captions (every unique template).

Defaults are for canvas-mini on a 2-core CPU; the reference values, for comparison:

=====================  =================  ===========================  ===========================
knob                   canvas-mini        SD v1.5 (reference)          DDPM CIFAR-10 (reference)
=====================  =================  ===========================  ===========================
alpha                  1.0                1.0                          1.2
lam g_r/g_f/sg_r/sg_f  1 / 0.1 / 1 / 1    1 / 1 / 1 / 1                1 / 0.01 / 1 / 0.01
lr psi / theta         3e-4 / 1e-4        3e-6 / 1e-6                  3e-5 / 1e-5 (two-stage)
Adam                   (0, 0.999), 1e-6   (0, 0.999), 1e-6             (0, 0.999), 1e-8
batch (retain+forget)  10 + 2             8 (global)                   128
iterations             400 + 200          G from SiD-LSG + 12.5k       50k (+ 50k two-stage)
t_init; t range        625; U{20..979}    625; U{20..979}              440; U{38..711}
kappa                  1.5 (10 % "")      4.5 (10 % "" for psi)        none
precision              fp32 (CPU)         bf16 autocast, fp32 master   fp32
grad checkpointing     off                on                           off
G EMA                  off                off                          0.9999
=====================  =================  ===========================  ===========================

Three defaults depart from the SD recipe, each measured on canvas-mini (README, SFD): kappa 1.5
(SiD-LSG's other published scale; plain distillation kept 64 % style accuracy at 4.5, 86 % at 1.5),
lam_g_f 0.1 (at 1 the forgetting term costs the other styles 20 points of accuracy; the DDPM recipe
uses 0.01) and the fixed ``pseudo_label`` "next" on canvas concepts.
"""

from __future__ import annotations

import copy
import json
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..errors import ConfigError, TrainingError
from ..pipelines.family import Context
from .data import canvas_label
from .registry import MethodConfig, check, register

_RUN_FIELDS_EXCLUDED = ("iterations", "checkpoint_dir", "checkpoint_every", "progress")


def _f(default, help: str):
    return field(default=default, metadata={"help": help})


@dataclass
class SFDConfig(MethodConfig):
    """Options of :func:`sfd` (see the module docstring for the equations and reference values)."""

    iterations: int = _f(200, "alternating psi/theta iterations of SFD (stage 2)")
    distill_iterations: int = _f(400, "stage 1 without `generator_init`: plain SiD distillation iterations "
                                      "that make the one-step generator SFD starts from (0 = start from the "
                                      "teacher; skipped when forget_batch_size is 0)")
    batch_size: int = _f(10, "retain conditions (C_r) per iteration")
    forget_batch_size: int = _f(2, "forget conditions (c_f) per iteration; 0 = plain SiD distillation")
    lr_psi: float = _f(3e-4, "Adam learning rate of the fake score psi")
    lr_theta: float = _f(1e-4, "Adam learning rate of the generator theta")
    adam_betas: tuple[float, float] = _f((0.0, 0.999), "Adam betas of both optimisers")
    adam_eps: float = _f(1e-6, "Adam epsilon of both optimisers")
    alpha: float = _f(1.0, "SiD alpha (1.0 SD, 1.2 DDPM)")
    lam_g_r: float = _f(1.0, "weight of the remain (distillation) term L_r in the generator loss")
    lam_g_f: float = _f(0.1, "weight of the forgetting term L_MU in the generator loss")
    lam_sg_r: float = _f(1.0, "weight of retain samples in the fake-score loss")
    lam_sg_f: float = _f(1.0, "weight of forget samples in the fake-score loss")
    t_init: int = _f(625, "the generator's fixed timestep (625 SD schedule, 440 DDPM linear)")
    t_min: int = _f(20, "smallest timestep of both losses")
    t_max: int = _f(979, "largest timestep of both losses")
    kappa: float = _f(1.5, "SiD-LSG guidance scale of psi and the teacher (1 = no guidance)")
    cfg_dropout: float = _f(0.1, "fraction of psi's training conditions replaced by the unconditional prompt")
    negative_prompt: str = _f("", "unconditional branch on the forget side (teacher and psi), e.g. an NSFW list")
    stop_gradient: bool = _f(False, "DMD-style variant: no gradient through the teacher and psi")
    grad_clip: float = _f(1.0, "element-wise gradient value clip of both networks (0 = off)")
    ema_decay: float = _f(0.0, "EMA of the generator weights (0 = off, as the SD recipe)")
    forget_prompts: tuple[str, ...] | None = _f(None, "prompts showing the concept ('{}' = the concept); "
                                                      "None: canvas captions, else the concept itself")
    safe_prompts: tuple[str, ...] | None = _f(None, "the teacher's prompt c_o for each forget prompt "
                                                    "(instead of replacing the concept by `override`)")
    retain_prompts: tuple[str, ...] | None = _f(None, "prompts to keep (C_r); None: canvas captions of the "
                                                      "other concepts (required for other concepts)")
    override: str | None = _f(None, "text replacing the concept in c_o, e.g. 'a middle aged man'; None: "
                                    "another canvas label (see `pseudo_label`) or '' (other concepts)")
    pseudo_label: str = _f("next", "safe canvas label when `override` is None: 'next' = the next retained label "
                                   "of the same kind, fixed; 'rand' = a random retained label per sample")
    generator_init: str | None = _f(None, "start G from a one-step generator: an SFD/SiD Edit file (e.g. a "
                                          "stage-1 run with forget_batch_size=0) or a diffusers UNet folder")
    mixed_precision: str = _f("no", "no, bf16 or fp16 autocast (fp32 master weights either way)")
    gradient_checkpointing: bool = _f(False, "gradient checkpointing on all three UNets (SD on a GPU)")
    checkpoint_dir: str | None = _f(None, "folder for a resumable checkpoint (safetensors)")
    checkpoint_every: int = _f(200, "iterations between checkpoints")
    seed: int = _f(0, "seed of z, t, eps, prompt choice and dropout")
    progress: bool = _f(True, "show a progress bar")

    def validate(self) -> None:
        for name in ("iterations", "distill_iterations", "forget_batch_size", "t_min"):
            check(getattr(self, name) >= 0, f"`{name}` must be >= 0 but is {getattr(self, name)}")
        for name in ("batch_size", "t_init", "checkpoint_every"):
            check(getattr(self, name) >= 1, f"`{name}` must be >= 1 but is {getattr(self, name)}")
        for name in ("lr_psi", "lr_theta", "adam_eps", "kappa"):
            check(getattr(self, name) > 0, f"`{name}` must be > 0 but is {getattr(self, name)}")
        for name in ("alpha", "lam_g_r", "lam_g_f", "lam_sg_r", "lam_sg_f", "grad_clip"):
            check(getattr(self, name) >= 0, f"`{name}` must be >= 0 but is {getattr(self, name)}")
        check(len(self.adam_betas) == 2 and all(0 <= b < 1 for b in self.adam_betas),
              f"`adam_betas` must be two numbers in [0, 1) but is {self.adam_betas}")
        check(self.t_min <= self.t_max, f"`t_min` must be <= `t_max` but is {self.t_min} > {self.t_max}")
        check(0 <= self.cfg_dropout < 1, f"`cfg_dropout` must be in [0, 1) but is {self.cfg_dropout}")
        check(0 <= self.ema_decay < 1, f"`ema_decay` must be in [0, 1) but is {self.ema_decay}")
        check(self.pseudo_label in ("next", "rand"),
              f"`pseudo_label` must be 'next' or 'rand' but is {self.pseudo_label!r}")
        check(self.mixed_precision in ("no", "bf16", "fp16"),
              f"`mixed_precision` must be 'no', 'bf16' or 'fp16' but is {self.mixed_precision!r}")
        for name in ("forget_prompts", "safe_prompts", "retain_prompts"):
            value = getattr(self, name)
            check(value is None or (not isinstance(value, str) and len(value) > 0),
                  f"`{name}` must be a non-empty list of prompts or None but is {value!r}")
        if self.safe_prompts is not None:
            check(self.forget_prompts is not None and len(self.safe_prompts) == len(self.forget_prompts),
                  "`safe_prompts` must pair up with `forget_prompts` (same length) but got "
                  f"{len(self.safe_prompts)} safe for {len(self.forget_prompts or ())} forget prompts")


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


def prompt_sets(concepts: list[str], config: SFDConfig) -> PromptSets:
    """Build c_f, c_o and C_r from the concepts and the config (canvas-mini captions by default)."""
    from ..canvas.world import OBJECTS, PARAPHRASES, STYLES, caption, style_text

    labels = {c: canvas_label(c) for c in concepts}
    canvas = all(labels.values())
    words = {c: style_text(labels[c][1]) if labels[c] else c for c in concepts}
    gone = {lab for lab in labels.values() if lab}
    templates = list(dict.fromkeys(PARAPHRASES))
    cells = [(o, s, tpl) for o in OBJECTS for s in STYLES for tpl in templates]
    if config.forget_prompts is not None:
        forget = [p.format(words[c]) for p in config.forget_prompts for c in concepts] if any(
            "{}" in p for p in config.forget_prompts) else list(config.forget_prompts)
    elif canvas:
        forget = [caption(o, s, tpl) for o, s, tpl in cells if {("object", o), ("style", s)} & gone]
    else:
        forget = [words[c] for c in concepts]
    if config.retain_prompts is not None:
        retain = list(config.retain_prompts)
    elif canvas:
        retain = [caption(o, s, tpl) for o, s, tpl in cells if not {("object", o), ("style", s)} & gone]
    else:
        raise ConfigError(f"`retain_prompts` is required for concepts outside the canvas world ({concepts}): "
                          "give prompts the generator must keep, e.g. LAION captions")
    sets = PromptSets(forget, retain, list(config.safe_prompts) if config.safe_prompts else None)
    for c in concepts:
        if config.override is not None:
            choices = [config.override]
        elif labels[c]:
            kind, label = labels[c]
            pool = STYLES if kind == "style" else OBJECTS
            i = pool.index(label)
            kept = [x for x in pool[i + 1:] + pool[:i] if (kind, x) not in gone]  # the next label first
            if not kept:
                raise ConfigError(f"every canvas {kind} is being forgotten, so none is left as the safe concept: "
                                  "give `override` or `safe_prompts`")
            choices = [style_text(x) for x in (kept[:1] if config.pseudo_label == "next" else kept)]
        else:
            choices = [""]
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
    if path.is_dir():  # a diffusers UNet2DConditionModel folder (safetensors), e.g. a converted SiD-LSG generator
        from diffusers import UNet2DConditionModel

        unet.load_state_dict(UNet2DConditionModel.from_pretrained(path, use_safetensors=True).state_dict())
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

    The teacher is the pipeline's UNet: frozen for the duration of the ``with`` block (its
    ``requires_grad`` flags are restored on exit) and never stepped.
    """

    def __init__(self, pipe, concepts: list[str], config: SFDConfig, generator: dict | None = None):
        from accelerate import Accelerator

        from ..pipelines.family import FamilyAdapter
        from ..pipelines.one_step import alphas_cumprod

        self.pipe, self.config, self.concepts = pipe, config, list(concepts)
        self.prompts = prompt_sets(self.concepts, config)
        self.adapter = FamilyAdapter(pipe)
        self.teacher = pipe.unet
        self.abar = alphas_cumprod(pipe.scheduler)
        n = len(self.abar)
        check(config.t_init < n and config.t_max < n,
              f"`t_init` and `t_max` must be < {n} (the schedule's length) but are {config.t_init}, {config.t_max}")
        self.prediction_type = pipe.scheduler.config.get("prediction_type", "epsilon")
        self.accelerator = Accelerator(mixed_precision=config.mixed_precision,
                                       cpu=pipe.unet.device.type == "cpu")
        psi, gen = (copy.deepcopy(self.teacher).float().train() for _ in range(2))
        for net in (psi, gen):
            net.requires_grad_(True)
        kw = dict(betas=tuple(config.adam_betas), eps=config.adam_eps)
        opt_psi = torch.optim.Adam(psi.parameters(), lr=config.lr_psi, **kw)
        opt_g = torch.optim.Adam(gen.parameters(), lr=config.lr_theta, **kw)
        self.psi, self.opt_psi, self.G, self.opt_G = self.accelerator.prepare(psi, opt_psi, gen, opt_g)
        if generator is not None:  # stage 1's generator (the UNet's state dict)
            self._unwrap(self.G).load_state_dict(generator)
        elif config.generator_init:
            _load_generator(gen, config.generator_init, pipe, config.t_init)
        self.ema = copy.deepcopy(gen).requires_grad_(False) if config.ema_decay > 0 else None
        self.device = self.accelerator.device
        self.abar = self.abar.to(self.device)
        self.rng = torch.Generator().manual_seed(config.seed + self.accelerator.process_index)
        self.step, self.last = 0, {}
        self._empty = self.adapter.encode([""])
        self._negative = self.adapter.encode([config.negative_prompt])

    # -- the frozen teacher -----------------------------------------------------------------------
    def __enter__(self) -> "SFDTrainer":
        self._flags = [p.requires_grad for p in self.teacher.parameters()]
        self._teacher_ckpt = getattr(self.teacher, "is_gradient_checkpointing", False)
        self.teacher.requires_grad_(False)
        if self.config.gradient_checkpointing:
            for net in (self.teacher, self._unwrap(self.psi), self._unwrap(self.G)):
                net.enable_gradient_checkpointing()
        return self

    def __exit__(self, *exc) -> None:
        for p, flag in zip(self.teacher.parameters(), self._flags):
            p.requires_grad_(flag)
        if self.config.gradient_checkpointing and not self._teacher_ckpt:
            self.teacher.disable_gradient_checkpointing()

    def _unwrap(self, net):
        return self.accelerator.unwrap_model(net)

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
        n, unet = n_r + n_f, self.teacher.config
        shape = (n, unet.in_channels, unet.sample_size, unet.sample_size)
        z, eps = (torch.randn(shape, generator=self.rng).to(self.device) for _ in range(2))
        t = torch.tensor(self._randint(cfg.t_max + 1, n, cfg.t_min), device=self.device)
        return Batch(n_r, self._encode(gen), self._encode(teacher), uncond, z, t, eps)

    def _encode(self, prompts: list[str]):
        return self.adapter.encode(prompts)

    # -- predictions --------------------------------------------------------------------------------
    def _ab(self, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        abar = self.abar[t].view(-1, 1, 1, 1)
        return abar.sqrt(), (1 - abar).sqrt()

    def generate(self, z: torch.Tensor, ctx, grad: bool = True) -> torch.Tensor:
        """x_g = G_theta(z, c) (with or without gradient)."""
        from ..pipelines.one_step import one_step_latents

        with torch.set_grad_enabled(grad), self.accelerator.autocast():
            return one_step_latents(self.G, z, ctx, self.config.t_init, self.abar, self.pipe,
                                    self.prediction_type)

    def guided(self, unet, x_t: torch.Tensor, t: torch.Tensor, cond, uncond) -> tuple[torch.Tensor, torch.Tensor]:
        """(x0, eps) of eps^kappa(x_t; c, u) = eps(x_t, u) + kappa (eps(x_t, c) - eps(x_t, u))."""
        from ..pipelines.one_step import to_x0_eps, unet_output

        kappa = self.config.kappa
        with self.accelerator.autocast():
            if kappa == 1.0:
                out = unet_output(unet, x_t, t, cond, self.pipe)
            else:
                both = unet_output(unet, torch.cat([x_t, x_t]), torch.cat([t, t]), Context.cat([uncond, cond]),
                                   self.pipe)
                out_u, out_c = both.chunk(2)
                out = out_u + kappa * (out_c - out_u)
        a, b = self._ab(t)
        return to_x0_eps(out, x_t, a, b, self.prediction_type)

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
        psi = self._unwrap(self.psi)  # frozen here; called outside DDP, which expects no gradients
        with torch.set_grad_enabled(not cfg.stop_gradient):
            x_in = x_t.detach() if cfg.stop_gradient else x_t
            f_phi, _ = self.guided(self.teacher, x_in, batch.t, batch.teacher, batch.uncond)
            f_psi, _ = self.guided(psi, x_in, batch.t, batch.gen, batch.uncond)
        per = sid_loss(x_g, f_phi, f_psi, cfg.alpha)
        remain, forget = _split_mean(per, batch.n_retain)
        return cfg.lam_g_r * remain + cfg.lam_g_f * forget, {"g_r": remain.item(), "g_mu": forget.item()}

    # -- the alternation ------------------------------------------------------------------------------
    def _update(self, net, opt, loss: torch.Tensor) -> None:
        if not torch.isfinite(loss):
            raise TrainingError(f"SFD: non-finite loss at iteration {self.step}; lower lr_psi / lr_theta")
        self.accelerator.backward(loss)
        for p in net.parameters():
            if p.grad is not None:
                torch.nan_to_num_(p.grad, nan=0.0, posinf=0.0, neginf=0.0)
        if self.config.grad_clip > 0:
            torch.nn.utils.clip_grad_value_(net.parameters(), self.config.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)

    def train_step(self) -> dict:
        """One iteration: a fake-score step, then a generator step with psi frozen (1 : 1)."""
        loss_psi, log = self.fake_score_loss(self.draw())
        self._update(self.psi, self.opt_psi, loss_psi)
        psi = self._unwrap(self.psi).requires_grad_(False)
        try:
            loss_g, log_g = self.generator_loss(self.draw())
            self._update(self.G, self.opt_G, loss_g)
        finally:
            psi.requires_grad_(True)
        if self.ema is not None:
            with torch.no_grad():
                for e, p in zip(self.ema.parameters(), self._unwrap(self.G).parameters()):
                    e.lerp_(p, 1 - self.config.ema_decay)
        self.step += 1
        self.last = {**log, **log_g}
        return self.last

    def train(self) -> None:
        """Run (or resume) to ``config.iterations``, checkpointing into ``config.checkpoint_dir``."""
        from tqdm.auto import tqdm

        cfg = self.config
        path = Path(cfg.checkpoint_dir) / "sfd-state.safetensors" if cfg.checkpoint_dir else None
        if path is not None and path.exists():
            self.load_state(path)
        bar = tqdm(total=cfg.iterations, initial=self.step, desc="sfd",
                   disable=not (cfg.progress and self.accelerator.is_local_main_process))
        while self.step < cfg.iterations:
            bar.set_postfix({k: f"{v:.3g}" for k, v in self.train_step().items()}, refresh=False)
            bar.update()
            if path is not None and (self.step % cfg.checkpoint_every == 0 or self.step == cfg.iterations):
                self.save_state(path)
        bar.close()

    # -- checkpoints (safetensors only) ---------------------------------------------------------------
    def _run_key(self) -> str:
        cfg = {k: v for k, v in self.config.to_dict().items() if k not in _RUN_FIELDS_EXCLUDED}
        return json.dumps({"concepts": self.concepts, "config": cfg}, sort_keys=True, default=list)

    def _modules(self) -> dict:
        mods = {"G": self._unwrap(self.G), "psi": self._unwrap(self.psi)}
        return {**mods, "ema": self.ema} if self.ema is not None else mods

    def save_state(self, path: Path) -> None:
        from .._io import optimizer_tensors, save_tensors

        self.accelerator.wait_for_everyone()
        if not self.accelerator.is_main_process:
            return
        tensors = {f"{n}.{k}": v for n, m in self._modules().items() for k, v in m.state_dict().items()}
        meta = {"step": self.step, "run": self._run_key()}
        for name, opt in (("opt_psi", self.opt_psi), ("opt_G", self.opt_G)):
            t, scalars = optimizer_tensors(opt, name)
            tensors.update(t)
            meta[name] = scalars
        tensors["rng"] = self.rng.get_state()
        save_tensors(path, tensors, meta)

    def load_state(self, path: Path) -> None:
        from .._io import load_optimizer_tensors, load_tensors

        tensors, meta = load_tensors(path)
        if meta.get("run") != self._run_key():
            raise ConfigError(f"{path} holds an SFD run with other concepts or options: resume with the same "
                              "ones, or give a new `checkpoint_dir`")
        for n, m in self._modules().items():
            m.load_state_dict({k[len(n) + 1:]: v for k, v in tensors.items() if k.startswith(n + ".")})
        for name, opt in (("opt_psi", self.opt_psi), ("opt_G", self.opt_G)):
            load_optimizer_tensors(opt, tensors, json.loads(meta[name]), name)
        self.rng.set_state(tensors["rng"])
        self.step = int(meta["step"])

    # -- the result -------------------------------------------------------------------------------------
    def generator(self):
        """The generator's UNet (its EMA when kept)."""
        return self.ema if self.ema is not None else self._unwrap(self.G)

    def edit(self, **manifest_extra):
        """The generator as an Edit replacing every UNet weight; its manifest asks for the one-step sampler."""
        from ..pipelines.edit import Edit
        from ..pipelines.one_step import ONE_STEP

        gen = self.generator()
        new = {f"unet/{name}": p.detach() for name, p in gen.named_parameters()}
        manifest = {"sampler": ONE_STEP, "generator_timestep": self.config.t_init,
                    "prediction_type": self.prediction_type, "iterations_run": self.step,
                    "loss": "stop_gradient" if self.config.stop_gradient else "sid",
                    "safe_concepts": None if self.prompts.safe is not None else {
                        c: choices for c, (_, choices) in zip(self.concepts, self.prompts.swaps)},
                    "last_losses": {k: round(v, 6) for k, v in self.last.items()}, **manifest_extra}
        return Edit.from_weights(self.pipe, new, manifest, low_rank=False)


@register("sfd", SFDConfig)
def sfd(pipe, concepts: list[str], config: SFDConfig):
    """Score Forgetting Distillation: distil ``pipe`` into a one-step generator that forgets ``concepts``.

    Returns an Edit (every UNet weight) whose manifest has ``"sampler": "one_step"``; sample it with
    ``generate(one_step_pipeline(pipe, edit), prompts, seeds)``. The pipeline is left unchanged.
    Without ``generator_init``, stage 1 (``distill_iterations`` of plain SiD) makes the one-step
    generator that the forgetting stage starts from; a plain run (``forget_batch_size=0``) is
    itself a stage 1 and runs ``iterations`` only.
    """
    from dataclasses import replace

    def stage_dir(name: str) -> str | None:
        return None if config.checkpoint_dir is None else str(Path(config.checkpoint_dir) / name)

    generator, distilled = None, None
    if config.generator_init is None and config.distill_iterations > 0 and config.forget_batch_size > 0:
        stage1 = replace(config, iterations=config.distill_iterations, distill_iterations=0, forget_batch_size=0,
                         checkpoint_dir=stage_dir("stage1"))
        with SFDTrainer(pipe, concepts, stage1) as trainer:
            trainer.train()
            generator = trainer.generator().state_dict()  # detached tensors, kept alive past the trainer
            distilled = trainer.step
        config = replace(config, checkpoint_dir=stage_dir("stage2"))
    with SFDTrainer(pipe, concepts, config, generator) as trainer:
        trainer.train()
        return trainer.edit(distill_iterations_run=distilled)
