"""AdvUnlearn: adversarial unlearning of the text encoder (Zhang et al., NeurIPS 2024, arXiv 2405.15234).

Bilevel objective (advunlearn.md section 1), optimised over the text encoder tau_theta only::

    min_theta  L_u(theta, delta*) + gamma * L_r(theta)
    delta* = argmin_delta  l_atk(theta, delta)          (k free token embeddings after SOT)

with, on a latent z_t from the frozen model's DDIM trajectory of the concept prompt c_e (CFG 3)::

    L_u   = || eps(z_t, t, tau_theta([SOT; delta*; c_e])) - [eps_o("") - eta (eps_o(c_e) - eps_o(""))] ||^2
    l_atk = || eps(z_t, t, tau_theta([SOT; delta; c_e])) - eps_o(c_e) ||^2          (``esd_match``, code)
    L_r   = mean_b || eps(z~_t, t, tau_theta(c~_b)) - eps_o(c~_b) ||^2              (retain prompts c~_b)

``eps_o(c)`` is the frozen UNet on the ORIGINAL encoder's embedding of a fixed prompt. During the
first ``warmup`` iterations L_u uses the clean prompt c_e and there is no attack (section 3).

Defaults (advunlearn.md "Defaults"; full-size models, latents > 32 px): 1000 iterations, Adam lr 1e-5,
warm-up 200, ``text-encoder-full`` (all transformer layers + final layer norm; token and position
embeddings frozen), PGD attack 30 Adam steps lr 1e-3 on k=1 prefix embeddings refreshed every
iteration from random-token init, retain batch 5, gamma 0.5 (0.3 for nudity), eta 1, CFG 3, 50 DDIM
steps, ``retain_train='reg'``. A model's preset provider (:mod:`erasekit.presets`) may replace
them (canvas-mini: a budget that runs in minutes on a CPU, k = 3; docs/presets.md); every resolved
value is recorded in the Edit's manifest.

Efficiency (section 7): one frozen UNet (``requires_grad`` off: only activations flow back to the
encoder); no copy of the original encoder -- tau_o is only ever needed on fixed prompts ("",
c_e, the retain prompts), so those are encoded once before training; the concept and retain
latents and the frozen predictions eps_o on them are computed once as a pool of DDIM trajectories
(batched CFG, bf16 on GPU) instead of one partial DDIM run per draw; UNet gradient checkpointing and
bf16 autocast on full-size models on GPU.

Deviations from the reference code, all recorded in the manifest:

- Latent pool: ``pool_size`` trajectories per run, every (trajectory, step) a draw; the reference
  runs a fresh partial DDIM per draw (``pool_size=0`` does that here too, at about 25 UNet calls
  per draw).
- Query timestep aligned with the latent (t = DDIM timestep of the step reached, the diffusers
  ESD convention, esd.md section 4) instead of t ~ U[20 t_enc, 20 t_enc + 20).
- The attack optimiser's gradients are zeroed each step (the reference accumulates them).
- ``attack='fast_at'`` is truly one signed step by default (the reference runs 30).
- Concepts with prompts and an attribute text from the model's provider (canvas-mini: captions
  and "A Flowers image."): ``prompt_form="attribute"`` keeps every prompt's latent and frozen
  prediction while L_u removes only the attribute's direction, target eps_o(prompt) - (eta + 1)
  (eps_o(attribute) - eps_o("")), ESD's attribute form; ``"caption"`` uses the whole prompt (the
  reference's form); ``"auto"`` (default) takes the provider's choice per concept (canvas-mini:
  objects in the attribute form with eta 3, styles as captions; measured there, docs/presets.md).
- Retain set: the model's provider's prompts of other concepts (canvas-mini: its captions), or the
  80 COCO category names as "a photo of a <name>" (the reference's 243-noun ``coco_object`` list is
  not shipped).
- SDXL and SD 2.x are not covered by the paper (its encoder is SD 1.x's CLIP ViT-L/14 and does not
  transfer, issue 1 of OPTML-Group/AdvUnlearn). Here SD 2.x trains its OpenCLIP encoder the same
  way; SDXL trains both encoders (``encoders='all'``) or only the first, the prefix slots go into
  both encoders, and the pooled projection of ``text_encoder_2`` is not trained. SDXL's UNet reads
  the penultimate layer of the first encoder, so that encoder's last layer and final norm get no
  gradient and stay unchanged (the Edit leaves them out).
- SD 3 / Flux (flow matching, :mod:`erasekit.pipelines.flow`): the CLIP encoders are trained (SD 3:
  CLIP-L and CLIP-G; Flux: CLIP-L, which reaches the transformer through the pooled vector only); T5 is
  frozen, and the prefix slots go into the CLIP encoders while T5 reads the plain prompt
  (:mod:`erasekit.pipelines.prefix`). Every eps above is the transformer's velocity ``v``: the ESD
  target ``v_o("") - eta (v_o(c_e) - v_o(""))`` is the same negative guidance in velocity space
  (:mod:`erasekit.erase.esd`), the latents come from flow-Euler trajectories of the frozen model on the
  pipeline's sigmas (``ddim_steps`` of them; classifier-free guidance on SD 3, one conditional pass on
  Flux), and ``diffusion_classifier`` noises the original model's image as ``(1 - s) z0 + s eps`` with
  the target ``eps - z0``. A guidance-distilled Flux reads the pipeline's default guidance embedding.
"""

from __future__ import annotations

import dataclasses
import re
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from ..errors import ConfigError
from ..pipelines.family import Context
from ..pipelines.mmdit import denoiser
from ..presets import concept_context
from .engine import TrainConfig, Trainer
from .esd import esd_target
from .param_sets import select_params
from .registry import check, register

ATTACKS = ("pgd", "fast_at")
ATTACK_LOSSES = ("esd_match", "diffusion_classifier")
COCO_CATEGORIES = (
    "person", "bicycle", "car", "motorcycle", "airplane", "bus", "train", "truck", "boat", "traffic light",
    "fire hydrant", "stop sign", "parking meter", "bench", "bird", "cat", "dog", "horse", "sheep", "cow",
    "elephant", "bear", "zebra", "giraffe", "backpack", "umbrella", "handbag", "tie", "suitcase", "frisbee",
    "skis", "snowboard", "sports ball", "kite", "baseball bat", "baseball glove", "skateboard", "surfboard",
    "tennis racket", "bottle", "wine glass", "cup", "fork", "knife", "spoon", "bowl", "banana", "apple",
    "sandwich", "orange", "broccoli", "carrot", "hot dog", "pizza", "donut", "cake", "chair", "couch",
    "potted plant", "bed", "dining table", "toilet", "tv", "laptop", "mouse", "remote", "keyboard",
    "cell phone", "microwave", "oven", "toaster", "sink", "refrigerator", "book", "clock", "vase",
    "scissors", "teddy bear", "hair drier", "toothbrush")
# Body words fight nudity erasure (the reference filters its retain set for the same reason).
_NUDITY_CONFLICTS = ("person",)


def _h(text: str) -> dict:
    return {"help": text}


@dataclass
class AdvUnlearnConfig(TrainConfig):
    """Options of :func:`advunlearn`; ``None`` means "the preset for this model" (:func:`preset`)."""

    param_set: str = field(default="text-encoder-full", metadata=_h(
        "text-encoder-full, text-encoder-attn or text-encoder-ffn"))
    layers: int | None = field(default=None, metadata=_h("train only the first N encoder layers (None: all)"))
    encoders: str = field(default="all", metadata=_h("SDXL: 'all' trains both text encoders, 'first' only the first"))
    warmup: int | None = field(default=None, metadata=_h("iterations on the clean prompt, without attack"))
    k: int | None = field(default=None, metadata=_h(
        "adversarial prefix tokens after SOT (None: 1 on full-size models, 3 on small ones)"))
    attack: str = field(default="pgd", metadata=_h("inner attack: pgd (Adam on delta) or fast_at (signed steps)"))
    attack_steps: int | None = field(default=None, metadata=_h("inner steps (None: preset for pgd, 1 for fast_at)"))
    attack_lr: float = field(default=1e-3, metadata=_h("inner attack learning rate"))
    attack_init: str = field(default="random", metadata=_h("random (k random token embeddings) or latest"))
    attack_every: int = field(default=1, metadata=_h("iterations between fresh attacks"))
    attack_loss: str = field(default="esd_match", metadata=_h(
        "esd_match (reference code) or diffusion_classifier (paper: true noise on the original model's image)"))
    gamma: float | None = field(default=None, metadata=_h("retain weight (None: 0.3 nudity, 0.5 otherwise)"))
    retain: str | list = field(default="auto", metadata=_h(
        "retain prompts: 'auto', 'model' (the model's provider's), 'coco', a text file (one prompt a line), "
        "or a list of prompts"))
    retain_batch: int = field(default=5, metadata=_h("retain prompts per iteration"))
    retain_train: str = field(default="reg", metadata=_h("reg: L_u + gamma L_r in one step; iter: separate retain step"))
    eta: float | None = field(default=None, metadata=_h(
        "negative guidance of the ESD target, paper convention (None: 1, or the provider's for the attribute form)"))
    guidance: float = field(default=3.0, metadata=_h("CFG scale of the latent sampler"))
    ddim_steps: int | None = field(default=None, metadata=_h("DDIM steps of the latent sampler (None: preset)"))
    pool_size: int = field(default=32, metadata=_h("frozen-model trajectories sampled once (0: fresh per draw)"))
    prompts: str = field(default="auto", metadata=_h(
        "concept prompts: 'concept' (the words as given) or 'auto' (the model's prompts of each concept, "
        "canvas-mini: its captions)"))
    prompt_form: str = field(default="auto", metadata=_h(
        "concepts with model prompts: attribute (the ESD target removes only the concept's short text from "
        "each prompt), caption (the whole prompt, the reference's form) or auto (the provider's choice)"))
    mixed_precision: str = field(default="auto", metadata=_h("auto (bf16 on GPU, no on CPU), no, bf16, fp16"))
    gradient_checkpointing: bool | None = field(default=None, metadata=_h(
        "checkpoint the UNet's activations (None: on for full-size models)"))

    def validate(self) -> None:
        check(self.mixed_precision in ("auto", "no", "bf16", "fp16"),
              f"`mixed_precision` must be 'auto', 'no', 'bf16' or 'fp16' but is {self.mixed_precision!r}")
        mp, self.mixed_precision = self.mixed_precision, "no"
        try:
            super().validate()
        finally:
            self.mixed_precision = mp
        check(self.k is None or (not isinstance(self.k, bool) and isinstance(self.k, int) and self.k >= 1),
              f"`k` must be an integer >= 1 (prefix tokens) or None but is {self.k!r}")
        check(self.layers is None or self.layers >= 1, f"`layers` must be >= 1 or None but is {self.layers}")
        check(self.encoders in ("all", "first"), f"`encoders` must be 'all' or 'first' but is {self.encoders!r}")
        check(self.warmup is None or self.warmup >= 0, f"`warmup` must be >= 0 but is {self.warmup}")
        check(self.attack in ATTACKS, f"`attack` must be one of {ATTACKS} but is {self.attack!r}")
        check(self.attack_steps is None or self.attack_steps >= 1,
              f"`attack_steps` must be >= 1 but is {self.attack_steps}")
        check(self.attack_lr > 0, f"`attack_lr` must be > 0 but is {self.attack_lr}")
        check(self.attack_init in ("random", "latest"),
              f"`attack_init` must be 'random' or 'latest' but is {self.attack_init!r}")
        check(self.attack_every >= 1, f"`attack_every` must be >= 1 but is {self.attack_every}")
        check(self.attack_loss in ATTACK_LOSSES, f"`attack_loss` must be one of {ATTACK_LOSSES} but is {self.attack_loss!r}")
        check(self.gamma is None or self.gamma >= 0, f"`gamma` must be >= 0 but is {self.gamma}")
        check(self.retain_batch >= 1, f"`retain_batch` must be >= 1 but is {self.retain_batch}")
        check(self.retain_train in ("reg", "iter"), f"`retain_train` must be 'reg' or 'iter' but is {self.retain_train!r}")
        check(self.guidance >= 1, f"`guidance` must be >= 1 but is {self.guidance}")
        check(self.ddim_steps is None or self.ddim_steps >= 1, f"`ddim_steps` must be >= 1 but is {self.ddim_steps}")
        check(self.pool_size >= 0, f"`pool_size` must be >= 0 but is {self.pool_size}")
        check(self.prompts in ("auto", "concept"), f"`prompts` must be 'auto' or 'concept' but is {self.prompts!r}")
        check(self.prompt_form in ("auto", "attribute", "caption"),
              f"`prompt_form` must be 'auto', 'attribute' or 'caption' but is {self.prompt_form!r}")
        if isinstance(self.retain, str):
            check(self.retain in ("auto", "model", "coco") or Path(self.retain).is_file(),
                  f"`retain` must be 'auto', 'model', 'coco', a text file with one prompt per line, or a list of "
                  f"prompts but is {self.retain!r}")
        else:
            check(len(self.retain) > 0, "`retain` is an empty list: give at least one retain prompt "
                  "(prompts of other concepts the model must keep), or 'auto'")


# -- presets, prompts, retain set ----------------------------------------------------------------
PAPER = dict(steps=1000, lr=1e-5, k=1, pgd_steps=30, ddim_steps=50)   # advunlearn.md "Defaults"


def preset(pipe, concepts: list[str], config: AdvUnlearnConfig, ctx=None) -> dict:
    """Resolved values of every ``None``/``auto`` option for this model and these concepts.

    The model's provider gives the budget (canvas-mini: minutes on a CPU, k = 3), else the
    reference values; gamma by kind (0.3 nudity, 0.5 otherwise); eta 1, or the provider's value when
    a concept is in the attribute form. Full-size UNets (latents > 32 px) checkpoint activations.
    """
    ctx = ctx or concept_context(pipe, concepts, config)
    name, budget = ctx.ask("advunlearn_preset") or ("reference", PAPER)
    attribute = any(attribute_form(c, config, ctx) for c in concepts)
    eta = (ctx.ask("advunlearn_attribute_eta") if attribute else None) or 1.0
    steps = config.steps or budget["steps"]
    cuda = denoiser(pipe).device.type == "cuda"
    fm = _flow(pipe)
    side = int(pipe.unet.config.sample_size) if fm is None else fm.latent
    return {
        "preset": name, "steps": steps, "lr": config.lr if config.lr is not None else budget["lr"],
        "k": config.k or budget["k"],
        "warmup": config.warmup if config.warmup is not None else steps // 5,
        "attack_steps": config.attack_steps or (budget["pgd_steps"] if config.attack == "pgd" else 1),
        "ddim_steps": config.ddim_steps or budget["ddim_steps"],
        "gamma": config.gamma if config.gamma is not None else (0.3 if "nudity" in ctx.kinds else 0.5),
        "eta": config.eta if config.eta is not None else eta,
        "mixed_precision": config.mixed_precision if config.mixed_precision != "auto" else ("bf16" if cuda else "no"),
        "gradient_checkpointing": (side > 32 if config.gradient_checkpointing is None
                                   else config.gradient_checkpointing),
    }


def concept_prompts(concepts: list[str], mode: str = "auto", ctx=None) -> list[str]:
    """The prompts c_e trained on: the concepts as given, or the model's prompts of each concept."""
    if mode != "auto":
        return list(dict.fromkeys(concepts))
    ctx = ctx or concept_context(None, concepts)
    return list(dict.fromkeys(p for c in concepts for p in ctx.prompts(c)))


def attribute_form(concept: str, config: AdvUnlearnConfig, ctx) -> bool:
    """Whether L_u takes ``concept`` in ESD's attribute form (it has an attribute; ``auto``: the provider's)."""
    if ctx.attribute(concept) is None or config.prompts != "auto" or config.prompt_form == "caption":
        return False
    return config.prompt_form == "attribute" or ctx.ask("advunlearn_form", concept) == "attribute"


def prompt_attributes(concepts: list[str], prompts: list[str], config: AdvUnlearnConfig, ctx) -> list[str] | None:
    """Per concept prompt, the text whose direction L_u removes: its concept's attribute text
    (attribute form) or the prompt itself; None when no prompt has an attribute (plain ESD target)."""
    owner = {p: ctx.attribute(c) for c in concepts if attribute_form(c, config, ctx) for p in ctx.prompts(c)}
    attributes = [owner.get(p) or p for p in prompts]
    return None if attributes == prompts else attributes


def _words(text: str) -> str:
    return " " + re.sub(r"[^a-z0-9]+", " ", text.lower().replace("_", " ")).strip() + " "


def overlaps(prompt: str, concept: str) -> bool:
    """Whether ``prompt`` mentions ``concept`` (whole words, case and ``_`` insensitive)."""
    c = _words(concept)
    return c.strip() != "" and c in _words(prompt)


def retain_prompts(concepts: list[str], retain: str | list = "auto", ctx=None) -> list[str]:
    """The retain set: prompts of other concepts, never mentioning an erased one (validated).

    ``auto``: the model's provider's prompts when it has some for these concepts (canvas-mini: its
    captions), else ``coco``. ``model``: the provider's prompts that mention no erased concept.
    ``coco``: "a photo of a <category>" over COCO's 80 categories minus erased ones (and minus
    ``person`` for kind nudity). A list (or a text file with one prompt a line) is used as given and
    must not mention a concept.
    """
    ctx = ctx or concept_context(None, concepts)
    if isinstance(retain, str) and retain not in ("auto", "model", "coco"):
        retain = [line.strip() for line in Path(retain).read_text().splitlines() if line.strip()]
    if not isinstance(retain, str):
        prompts = [p for p in retain]
        bad = [(p, c) for p in prompts for c in concepts if overlaps(p, c)]
        if bad:
            raise ConfigError(f"retain prompt {bad[0][0]!r} mentions the erased concept {bad[0][1]!r}: the retain "
                              "set must hold only other concepts; remove it from `retain`")
    else:
        prompts = ctx.ask("retain_prompts") if retain in ("auto", "model") else None
        if retain == "model" and prompts is None:
            raise ConfigError(f"retain='model': the model's {ctx.provider.name} presets have no retain prompts for "
                              f"{ctx.concepts}; use 'coco', a text file or a list of prompts")
        if prompts is None:
            nude = "nudity" in ctx.kinds
            prompts = [f"a photo of a {n}" for n in COCO_CATEGORIES if not (nude and n in _NUDITY_CONFLICTS)]
        prompts = [p for p in prompts if not any(overlaps(p, c) for c in concepts)]
    if not prompts:
        raise ConfigError("the retain set is empty after removing prompts that mention the erased concepts; "
                          "give `retain` as a list of prompts of other concepts")
    return list(dict.fromkeys(prompts))


def trainable_params(pipe, config: AdvUnlearnConfig) -> dict:
    """The selected text-encoder parameters, narrowed to the first ``layers`` layers / ``encoders``."""
    if not config.param_set.startswith("text-encoder"):
        raise ConfigError(f"`param_set` must be a text-encoder set (text-encoder-full, text-encoder-attn, "
                          f"text-encoder-ffn) but is {config.param_set!r}: AdvUnlearn trains the text encoder")
    params = select_params(pipe, config.param_set)
    if config.encoders == "first":
        params = {k: p for k, p in params.items() if k.startswith("text_encoder/")}
    if config.layers is not None:
        keep = re.compile(r"encoder\.layers\.(\d+)\.")
        params = {k: p for k, p in params.items()
                  if (m := keep.search(k)) is not None and int(m.group(1)) < config.layers}
    check(bool(params), f"`layers`={config.layers} with {config.param_set!r} selects no parameter")
    return params


def check_inputs_embeds(adapter) -> None:
    """Refuse text encoders that cannot be run from token embeddings (the attack variable lives there;
    SD 3 / Flux: the CLIP encoders, T5 reads the plain prompt)."""
    from ..pipelines.family import encode_embeds

    for i, enc in enumerate(adapter.encoders):
        if adapter.mmdit and not type(enc).__name__.startswith("CLIPTextModel"):
            continue
        tokens = adapter.tokenize([""], which=i)
        try:
            table = enc.get_input_embeddings().weight
            with torch.no_grad():
                encode_embeds(enc, table[tokens.input_ids], tokens.eos_index)
        except (AttributeError, TypeError, NotImplementedError, ValueError) as e:
            raise ConfigError(
                f"the pipeline's text encoder {type(enc).__name__} cannot be run from token embeddings "
                f"(inputs_embeds: {type(e).__name__}: {e}); AdvUnlearn's attack lives in the token-embedding "
                "space and needs a CLIP-style text encoder (transformers CLIPTextModel)") from None


def _flow(pipe):
    """The pipeline's :class:`~erasekit.pipelines.flow.FlowModel` (SD 3 / Flux, native size), None for a UNet."""
    from ..pipelines.flow import FlowModel
    from ..pipelines.mmdit import mmdit_family

    return FlowModel(pipe) if mmdit_family(pipe) is not None else None


@torch.no_grad()
def flow_trajectories(fm, cond, uncond, z_T: torch.Tensor, guidance: float, steps: int, stop: int | None = None,
                      autocast=None) -> dict:
    """:func:`ddim_trajectories` for SD 3 / Flux: flow Euler on the pipeline's sigmas with the frozen transformer
    (classifier-free guidance on SD 3, the conditional velocity on Flux); ``eps_c`` / ``eps_u`` are velocities
    and ``timesteps`` the sigmas of the steps."""

    sigmas, n, seen = fm.sigmas(steps), z_T.shape[0], []
    ctx, z = Context.cat([uncond[[0] * n], cond]), z_T
    for i in range(stop or steps):
        with autocast() if autocast else nullcontext():
            v_u, v_c = fm.predict(fm.transformer, torch.cat([z, z]), sigmas[i], ctx).chunk(2)
        seen.append((z.float().cpu(), v_c.cpu(), v_u.cpu()))
        v = v_c if fm.family == "flux" else v_u + guidance * (v_c - v_u)
        z = z + (sigmas[i + 1] - sigmas[i]) * v.to(z.dtype)
    z_all, eps_c, eps_u = (torch.stack(x, 1) for x in zip(*seen))
    return {"z": z_all, "eps_c": eps_c, "eps_u": eps_u, "z0": None if stop is not None else z.float().cpu(),
            "timesteps": sigmas[:stop or steps].cpu()}


# -- the frozen model's latents: DDIM trajectories sampled once --------------------------------
@torch.no_grad()
def ddim_trajectories(pipe, cond, uncond, z_T: torch.Tensor, guidance: float, steps: int, stop: int | None = None,
                      autocast=None) -> dict:
    """Run ESD's x_t sampler (frozen UNet, CFG DDIM, eta 0) from ``z_T`` and keep everything on the way.

    Returns (on the CPU, fp32) ``z``: N x S x latent (the latent before each step), ``eps_c`` /
    ``eps_u``: the conditional / unconditional predictions at that latent and step (the two halves
    of the CFG step, so the ESD target and the retain target cost nothing extra), ``z0``: the final
    latent (None with ``stop``) and ``timesteps``: S.
    """

    from .esd import _ddim, sample_partway

    sched = _ddim(pipe, steps)
    n = z_T.shape[0]
    ctx = Context.cat([uncond[[0] * n], cond])
    seen = []

    def predict(z2, t, c):   # the frozen UNet; records what the sampler computes anyway
        with autocast() if autocast else nullcontext():   # a fresh context per call
            e = pipe.unet(z2.to(pipe.unet.dtype), t, **c.unet_kwargs(pipe)).sample.float()
        seen.append((z2[:n].float().cpu(), *(x.cpu() for x in e.chunk(2))))
        return e

    z0 = sample_partway(predict, z_T * sched.init_noise_sigma, sched, stop or steps, ctx, guidance)
    z, eps_u, eps_c = (torch.stack(x, 1) for x in zip(*seen))
    return {"z": z, "eps_c": eps_c, "eps_u": eps_u, "z0": None if stop is not None else z0.float().cpu(),
            "timesteps": sched.timesteps[:stop or steps].cpu()}


@dataclass
class Draw:
    """Latents (B x C x H x W) at one query timestep with the frozen predictions there."""

    z: torch.Tensor
    t: torch.Tensor
    eps_c: torch.Tensor
    eps_u: torch.Tensor
    z0: torch.Tensor | None
    prompt: list[int]
    eps_a: torch.Tensor | None = None   # frozen prediction for the prompt's attribute text (attribute form)


class LatentPool:
    """Frozen-model trajectories of a prompt set; a draw is a (trajectory, step) pair.

    Trajectory j follows prompt ``j % len(prompts)`` (``size`` trajectories, at least one per
    prompt). The original encoder is only read here, once, on fixed prompts. ``size=0`` samples a
    fresh trajectory up to the drawn step on every draw (the reference's behaviour). With
    ``attributes`` (one text per prompt, or None) every draw also carries the frozen prediction for
    its prompt's attribute text at the same latent (``eps_a``, ESD's attribute form).
    """

    def __init__(self, pipe, adapter, prompts: list[str], size: int, steps: int, guidance: float, seed: int,
                 autocast=None, batch: int = 32, attributes: list[str] | None = None, fm=None):
        self.pipe, self.steps, self.guidance, self.autocast, self.fm = pipe, steps, guidance, autocast, fm
        # under the trainer's autocast: a half-precision encoder has fp32 trainable weights beside half ones
        with autocast() if autocast else nullcontext():
            self.cond, self.uncond = adapter.encode(prompts), adapter.encode([""])
            self.attr = adapter.encode(attributes) if attributes else None
        if fm is None:
            unet = pipe.unet.config
            self.shape = (unet.in_channels, unet.sample_size, unet.sample_size)
        self.gen = torch.Generator().manual_seed(seed)
        self.fresh = size == 0
        if not self.fresh:
            idx = [j % len(prompts) for j in range(max(size, len(prompts)))]
            parts = [self._run(idx[i:i + batch]) for i in range(0, len(idx), batch)]
            self.data = {k: torch.cat([p[k] for p in parts]) for k in ("z", "eps_c", "eps_u", "z0")}
            self.timesteps, self.owner = parts[0]["timesteps"], torch.tensor(idx)
            if self.attr is not None:   # every (trajectory, step) once, batched over trajectories
                self.data["eps_a"] = torch.stack([torch.cat([
                    self._frozen_attr(self.data["z"][i:i + batch, s], self.timesteps[s], idx[i:i + batch])
                    for i in range(0, len(idx), batch)]) for s in range(len(self.timesteps))], 1)

    @torch.no_grad()
    def _frozen_attr(self, z: torch.Tensor, t: torch.Tensor, prompt_idx: list[int]) -> torch.Tensor:
        """eps_o(attribute text of each prompt) at latents ``z`` (frozen UNet), on the CPU in fp32."""
    
        dev = denoiser(self.pipe).device
        with self.autocast() if self.autocast else nullcontext():
            if self.fm is not None:
                return self.fm.predict(self.fm.transformer, z.to(dev), t.to(dev), self.attr[prompt_idx]).cpu()
            e = self.pipe.unet(z.to(dev, self.pipe.unet.dtype), t.to(dev),
                               **self.attr[prompt_idx].unet_kwargs(self.pipe)).sample
        return e.float().cpu()

    def _run(self, prompt_idx: list[int], stop: int | None = None, gen=None) -> dict:
        if self.fm is not None:
            z_T = self.fm.noise(len(prompt_idx), gen or self.gen)
            return flow_trajectories(self.fm, self.cond[prompt_idx], self.uncond, z_T, self.guidance, self.steps,
                                     stop, self.autocast)
        z_T = torch.randn((len(prompt_idx), *self.shape), generator=gen or self.gen).to(self.pipe.unet.device)
        return ddim_trajectories(self.pipe, self.cond[prompt_idx], self.uncond, z_T, self.guidance, self.steps,
                                 stop, self.autocast)

    def draw(self, prompts: list[int], step: int, gen: torch.Generator, need_z0: bool = False) -> Draw:
        """One latent per entry of ``prompts`` (prompt indices), all at DDIM step ``step``."""
        if self.fresh:
            data, rows = self._run(prompts, None if need_z0 else step + 1, gen), list(range(len(prompts)))
        else:
            data, rows = self.data, [self._pick(p, gen) for p in prompts]
        dev = denoiser(self.pipe).device
        timesteps = data["timesteps"] if self.fresh else self.timesteps
        at = {k: data[k][rows, step].to(dev) for k in ("z", "eps_c", "eps_u")}
        z0 = None if data["z0"] is None else data["z0"][rows].to(dev)
        eps_a = None
        if self.attr is not None:
            eps_a = (self._frozen_attr(at["z"], timesteps[step], list(prompts)) if self.fresh
                     else data["eps_a"][rows, step]).to(dev)
        return Draw(at["z"], timesteps[step].to(dev), at["eps_c"], at["eps_u"], z0, list(prompts), eps_a)

    def _pick(self, prompt: int, gen: torch.Generator) -> int:
        own = (self.owner == prompt).nonzero().flatten()
        return int(own[torch.randint(len(own), (1,), generator=gen)])


# -- the bilevel loop --------------------------------------------------------------------------------
class AdvUnlearnTrainer:
    """One AdvUnlearn run: the pools, the inner attack and the outer loss for the engine's loop."""

    def __init__(self, pipe, adapter, prompts: list[str], retain: list[str], config: AdvUnlearnConfig,
                 resolved: dict, attributes: list[str] | None = None):
        from ..pipelines.prefix import PrefixPrompts

        self.pipe, self.adapter, self.config, self.r = pipe, adapter, config, resolved
        self.prompts, self.retain, self.attributes = prompts, retain, attributes
        self.fm = _flow(pipe)
        self.prefix = PrefixPrompts(adapter, prompts, resolved["k"])
        self.per_prompt = [self.prefix.subset([i]) for i in range(len(prompts))]
        self.delta: list[torch.Tensor] | None = None
        self.attacked_at = -1
        self.attack_losses: list[float] = []

    # -- inner problem: k continuous prefix embeddings -------------------------------------------
    def attack(self, p: int, gen: torch.Generator) -> list[torch.Tensor]:
        """delta* for prompt ``p``: minimise l_atk over the prefix embeddings (encoder weights fixed)."""
        pp, cfg = self.per_prompt[p], self.config
        if cfg.attack_init == "latest" and self.delta is not None:
            init = self.delta
        else:
            init = pp.embed_ids(pp.random_ids(gen))
        delta = [d.detach().clone().float().requires_grad_(True) for d in init]
        opt = torch.optim.Adam(delta, lr=cfg.attack_lr)
        for _ in range(self.r["attack_steps"]):
            pred, target = self._attack_pred(pp, delta, p, gen)
            loss = F.mse_loss(pred.float(), target)
            grads = torch.autograd.grad(loss, delta)   # only delta: the encoder's .grad stays untouched
            opt.zero_grad(set_to_none=True)
            for d, g in zip(delta, grads):
                d.grad = g.sign() if cfg.attack == "fast_at" else g
            opt.step()
        self.attack_losses.append(float(loss.detach()))
        return [d.detach() for d in delta]

    def _attack_pred(self, pp, delta, p: int, gen: torch.Generator):
        step = int(torch.randint(self.r["ddim_steps"], (1,), generator=gen))
        d = self.pool.draw([p], step, gen, need_z0=self.config.attack_loss == "diffusion_classifier")
        ctx = pp.encode(delta)
        if self.config.attack_loss == "esd_match":   # reproduce the original model's concept prediction
            z, t, target = d.z, d.t, d.eps_c
        elif self.fm is not None:   # diffusion classifier, flow matching: x_s = (1 - s) z0 + s eps, v = eps - z0
            from ..pipelines.flow import noisy, velocity

            noise = torch.randn(d.z0.shape, generator=gen).to(d.z0.device)
            t = self.fm.sample_sigmas(1, gen).to(d.z0.device)
            z, target = noisy(d.z0, noise, t), velocity(d.z0, noise)
        else:   # diffusion classifier (UnlearnDiffAtk): denoise the original model's image of c_e
            noise = torch.randn(d.z0.shape, generator=gen).to(d.z0.device)
            t = torch.randint(self.noise_sched.config.num_train_timesteps, (1,), generator=gen).to(d.z0.device)
            z, target = self.noise_sched.add_noise(d.z0, noise, t), noise
        return self._predict(z, t, ctx), target

    def _predict(self, z: torch.Tensor, t: torch.Tensor, ctx: Context) -> torch.Tensor:
        """The (frozen) denoiser on ``ctx``: the UNet's eps, or the transformer's velocity (SD 3 / Flux)."""
        if self.fm is not None:
            return self.fm.predict(self.fm.transformer, z, t, ctx)
        return self.pipe.unet(z, t, **ctx.unet_kwargs(self.pipe)).sample

    # -- outer problem ----------------------------------------------------------------------------
    def retain_batch(self, it: int) -> list[int]:
        """Retain prompts of iteration ``it``: without replacement, reshuffled when fewer than B remain."""
        n = len(self.retain)
        b = min(self.config.retain_batch, n)
        epoch, slot = divmod(it, n // b)
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(self.config.seed * 100003 + epoch))
        return perm[slot * b:(slot + 1) * b].tolist()

    def loss(self, i: int, gen: torch.Generator) -> torch.Tensor:
        """The engine's micro-step ``i``: L_u + gamma L_r ('reg'), or alternating steps ('iter')."""
        step = i // self.config.grad_accum
        it, phase = divmod(step, 2) if self.config.retain_train == "iter" else (step, 0)
        p = int(torch.randint(len(self.prompts), (1,), generator=gen))
        s = int(torch.randint(self.r["ddim_steps"], (1,), generator=gen))
        adversarial = it >= self.r["warmup"]
        if adversarial and phase == 0 and (self.delta is None or it - self.attacked_at >= self.config.attack_every):
            self.delta, self.attacked_at = self.attack(p, gen), it
        r_idx = self.retain_batch(it)
        d, rd = self.pool.draw([p], s, gen), self.retain_pool.draw(r_idx, s, gen)
        if phase == 0:
            ctx_u = (self.per_prompt[p].encode(self.delta) if adversarial
                     else self.adapter.encode_with_grad([self.prompts[p]]))
            ctx = Context.cat([ctx_u, self.adapter.encode_with_grad([self.retain[j] for j in r_idx])])
            x = torch.cat([d.z, rd.z])
        else:
            ctx = self.adapter.encode_with_grad([self.retain[j] for j in r_idx])
            x = rd.z
        pred = self._predict(x, d.t, ctx).float()
        l_r = F.mse_loss(pred[-len(r_idx):], rd.eps_c)
        if phase == 1:
            return self.r["gamma"] * l_r
        # paper convention; attribute form: remove only the attribute's direction from the caption's
        e_p = d.eps_c if d.eps_a is None else d.eps_a
        target = esd_target(d.eps_u, e_p, d.eps_c, self.r["eta"])
        l_u = F.mse_loss(pred[:1], target)
        return l_u + self.r["gamma"] * l_r if self.config.retain_train == "reg" else l_u

    def fit(self, params: dict, engine_cfg: AdvUnlearnConfig):
        from diffusers import DDPMScheduler

        steps = self.r["steps"] * (2 if self.config.retain_train == "iter" else 1)
        self.noise_sched = DDPMScheduler.from_config(self.pipe.scheduler.config) if self.fm is None else None
        with _unet_checkpointing(denoiser(self.pipe), self.r["gradient_checkpointing"]), \
                Trainer(self.pipe, params, engine_cfg, steps=steps, lr=self.r["lr"]) as tr:
            seed = self.config.seed
            steps, guidance = self.r["ddim_steps"], self.config.guidance
            self.pool = LatentPool(self.pipe, self.adapter, self.prompts, self.config.pool_size, steps, guidance,
                                   seed, tr.autocast, attributes=self.attributes, fm=self.fm)
            self.retain_pool = LatentPool(self.pipe, self.adapter, self.retain, min(self.config.pool_size, 1), steps,
                                          guidance, seed + 1, tr.autocast, fm=self.fm)
            tr.carry("attack", self._attack_state, lambda state: self._put_attack_state(state, tr.device))
            edit = tr.fit(lambda i: self.loss(i, tr.rng), manifest=self.manifest())
        losses = self.attack_losses
        edit.manifest["attacks"] = {"runs": len(losses), "last_loss": losses[-1] if losses else None,
                                    "mean_loss": sum(losses) / len(losses) if losses else None}
        return edit

    def _attack_state(self) -> dict:
        """The inner attack's state a checkpoint keeps (the latest delta, when it was found, the losses)."""
        state = {"attacked_at": torch.tensor([self.attacked_at]),
                 "losses": torch.tensor(self.attack_losses, dtype=torch.float64)}
        return state | {f"delta.{i}": d for i, d in enumerate(self.delta or [])}

    def _put_attack_state(self, state: dict, device: torch.device) -> None:
        self.attacked_at, self.attack_losses = int(state["attacked_at"]), state["losses"].tolist()
        self.delta = [state[f"delta.{i}"].to(device) for i in range(sum(k.startswith("delta.") for k in state))] or None

    def manifest(self) -> dict:
        pool = self.config.pool_size
        deviations = [
            f"latents: a pool of {pool} frozen-model DDIM trajectories (reference: a fresh partial DDIM per draw)"
            if pool else "latents: a fresh frozen-model partial DDIM per draw (as the reference)",
            "query timestep aligned with the latent's DDIM step (reference: t ~ U[20 t_enc, 20 t_enc + 20))",
            "attack optimiser gradients zeroed every step (reference: accumulated)",
        ]
        if self.attributes:
            deviations.append("attribute form: ESD target eps_o(prompt) - (eta + 1) (eps_o(attribute text) - "
                              "eps_o('')) (reference: the whole prompt)")
        return {"resolved": self.r, "prompts": self.prompts, "attributes": sorted(set(self.attributes or [])),
                "retain_prompts": len(self.retain),
                "retain_examples": self.retain[:3], "original_encoder": "encoded once on the fixed prompts (no copy)",
                "attack": {"space": "embedding", "insertion": "prefix", "loss": self.config.attack_loss},
                "deviations": deviations}


@contextmanager
def _unet_checkpointing(unet, on: bool):
    """UNet gradient checkpointing for the run (only activations flow back; the UNet is frozen)."""
    before = bool(getattr(unet, "is_gradient_checkpointing", False))
    if on and not before:
        unet.enable_gradient_checkpointing()
    try:
        yield
    finally:
        if on and not before:
            unet.disable_gradient_checkpointing()


@register("advunlearn", AdvUnlearnConfig, components=("text_encoder", "text_encoder_2"),
          families=("sd1", "sd2", "sdxl", "sd3", "flux"))
def advunlearn(pipe, concepts: list[str], config: AdvUnlearnConfig):
    """Erase ``concepts`` by adversarial training of the text encoder; the Edit holds only its weights.

    The Edit plugs into any pipeline that uses the same text encoder (same base weights): the UNet
    is never changed. See the module docstring for the objective, defaults and deviations.
    """
    from ..pipelines.prefix import PrefixPrompts
    from ..pipelines.family import FamilyAdapter

    adapter = FamilyAdapter(pipe)
    check_inputs_embeds(adapter)
    ctx = concept_context(pipe, concepts, config)
    prompts = concept_prompts(concepts, config.prompts, ctx)
    retain = retain_prompts(concepts, config.retain, ctx)
    resolved = preset(pipe, concepts, config, ctx)
    PrefixPrompts(adapter, prompts, resolved["k"])  # refuses prompts that do not fit with the prefix
    params = trainable_params(pipe, config)
    engine_cfg = dataclasses.replace(config, mixed_precision=resolved["mixed_precision"], gradient_checkpointing=False)
    attributes = prompt_attributes(concepts, prompts, config, ctx)
    edit = AdvUnlearnTrainer(pipe, adapter, prompts, retain, config, resolved, attributes).fit(params, engine_cfg)
    values = {**resolved, "prompt_form": config.prompt_form, "retain_prompts": len(retain),
              "attack_lr": config.attack_lr, "retain_batch": config.retain_batch, "guidance": config.guidance}
    edit.manifest.update(ctx.record(resolved["preset"], {k: v for k, v in values.items() if k != "preset"}))
    return edit
