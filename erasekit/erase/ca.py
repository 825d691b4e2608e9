"""CA: Concept Ablation (Kumari et al., ICCV 2023, arXiv 2303.13516).

Fine-tune the model so that a prompt of the target concept c* predicts what a prompt of an anchor
concept c gives ("Van Gogh painting" -> "painting", "Grumpy Cat" -> "cat"), on images x of the
anchor drawn by the model itself. With x_t = sqrt(abar_t) x + sqrt(1 - abar_t) eps, t ~ U{0..T-1}
(paper section 3, eqs. 3-5; reference ``diffusers/train.py``, ``loss_type_reverse``):

- model-based (``loss="model"``, default, eq. 5)::

      L = || eps_theta(x_t, c*, t) - stopgrad eps_theta(x_t, c, t) ||^2

  the anchor prediction comes from the model being trained under ``no_grad`` (as the reference
  does), so no frozen copy exists;
- noise-based (``loss="noise"``, eq. 4)::

      L = || eps_theta(x_t, c*, t) - eps ||^2          (v-prediction models: the velocity)

- optional prior preservation (``prior_preservation``): ``+ prior_weight * || eps_theta(x'_t, c, t) - eps' ||^2``
  on another batch of anchor images with their own prompts.

Prompt pairs (c*, c), chosen by ``preset``:

- ``style``: anchor "painting"; c = templates of the anchor ("a painting of a harbour at dawn",
  ...); c* = c with the concept appended in one of the reference's forms
  ("{c}, in the style of {concept}", "in {concept}'s style, {c}").
- ``object`` / ``other``: give ``anchor`` (the category: "cat" for "Grumpy Cat"); c = object
  templates of the anchor, c* = c with the anchor replaced by the concept (the reference's
  ``caption_target "cat+grumpy cat"``).
- ``nudity``: anchor "people, body, boy, girl, women, man, child" (the reference's class prompt)
  drawn from person templates; c* = "{concept}, {c}" or "{c}, {concept}"; prior preservation on,
  every attention projection trained.
- the model's provider (canvas-mini: ``canvas``): c* = each caption of the concept, c = the same
  caption with the next label not erased (SalUn's fixed next class), one anchor image per caption;
  100 steps, lr 5e-4, batch 4, ``attn`` (``kv`` could not erase Pop_Art), measured there (docs/methods/ca.md,
  benchmarks/sweeps/results/ca_quick_cpu.jsonl).

``anchor_prompts`` replaces the templates; ``target_prompts`` (same length) gives c* directly.

Parameter groups (reference ``--parameter_group``): ``kv`` / ``cross-attn`` (``attn2.to_k``,
``attn2.to_v``, default), ``attn`` (q, k, v, out of every attention), ``full-weight`` (the
whole UNet); any named set of :mod:`.param_sets` is accepted too.

SD 3 / Flux (flow matching, :mod:`erasekit.pipelines.flow`): the transformer predicts the velocity v of
``x_s = (1 - s) x + s eps``, and every term above becomes the model's own flow-matching loss, as ESD and SalUn
carry theirs: ``s = shift(t / T)``, ``t ~ U{1..T}`` (the scheduler's training grid and shift), the model-based
loss ``|| v_theta(x_s, c*, s) - stopgrad v_theta(x_s, c, s) ||^2``, the noise-based one and the prior term with
the target ``v = eps - x``. Matching velocities is matching the implied noise predictions
(``eps = x_s + (1 - s) v``, one affine map for every text at a fixed ``(x_s, s)``) weighted by ``1 / (1 - s)^2``,
the weighting of the model's own training loss, so the minimiser at each ``(x_s, s)`` is the paper's. The anchor
images are drawn with flow Euler (``data_steps``, ``data_guidance``) at the native size and kept as the
transformer's latents (Flux's packed). Parameter groups, as ESD chooses them on an MMDiT: ``kv`` /
``cross-attn`` the joint attention's text keys and values (``attn.add_k_proj``, ``add_v_proj``: ESD's
``esd-x-strict``), ``attn`` every attention projection of the transformer (joint blocks: ``to_q``, ``to_k``,
``to_v``, ``to_out``, ``add_q/k/v_proj``, ``to_add_out``; Flux's single-stream blocks: ``to_q``, ``to_k``,
``to_v``), ``full-weight`` the whole transformer. A guidance-distilled Flux (FLUX.1-dev) reads its pipeline's
default guidance embedding in every call, drawing the anchors and training alike.

Defaults on real models (reference README, one process): style / object 200 steps at batch 4,
lr 2e-6 scaled by the batch (``--scale_lr``) = 8e-6, 1000 anchor images (25 DDIM steps, CFG 6);
nudity 800 steps, lr 4e-6 x 4 x 2 (prior preservation doubles it) = 3.2e-5. Deviations
(docs/methods/ca.md): anchor prompts from fixed templates instead of a language model's captions;
Adam without weight decay and without clipping; no resize / flip augmentation, so the loss mask
of the reference is all ones; the generated images stay latents.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from ..errors import ConfigError
from ..presets import concept_context, world_preset_names
from .data import cycle_indices, generate_set
from .engine import TrainConfig, Trainer
from .param_sets import component_params, register_param_set, select_params
from .registry import check, register

SCENES = ("a quiet harbour at dawn", "a city street in the rain", "a woman reading by a window",
          "a mountain village", "flowers in a vase", "a farmhouse in a wheat field", "a sailing ship on a rough sea",
          "an old man with a hat", "a forest path in autumn", "a town under a night sky")
OBJECT_FORMS = ("a photo of a {}", "a close-up photo of a {}", "a {} in a garden", "a {} on a wooden table",
                "a {} in the snow", "a picture of a {} indoors", "a {} at the beach", "a drawing of a {}",
                "a {} in a city street", "a small {} in a field")
PEOPLE = ("a photo of a man", "a photo of a woman", "a photo of a boy", "a photo of a girl", "a photo of a child",
          "a photo of people in a park", "a full body photo of a person", "a portrait of a woman",
          "a portrait of a man", "a group of people on a street")
STYLE_FORMS = ("{c}, in the style of {t}", "in {t}'s style, {c}")
NUDITY_FORMS = ("{t}, {c}", "{c}, {t}")
GROUPS = {"kv": "esd-x-strict", "cross-attn": "esd-x-strict", "full-weight": "full"}
_BASE = dict(steps=200, lr=8e-6, batch_size=4, images_per_prompt=100, param_set="kv", prior_preservation=False)
PRESETS = {"style": dict(_BASE, anchor="painting"), "object": dict(_BASE, anchor=None),
           "nudity": dict(_BASE, steps=800, lr=3.2e-5, param_set="attn", prior_preservation=True,
                          anchor="people, body, boy, girl, women, man, child")}
KIND_PRESET = {"style": "style", "nudity": "nudity"}   # object, other: the object preset


@register_param_set("attn", "every attention projection (to_q, to_k, to_v, to_out) of self- and cross-attention")
def _attn(pipe):
    return component_params(pipe, "unet", lambda m, mod, n: re.search(r"\.attn[12]\.(to_q|to_k|to_v|to_out)\.", n)
                            is not None)


_MMDIT_ATTN = r"\.attn\.(to_q|to_k|to_v|to_out\.0|add_q_proj|add_k_proj|add_v_proj|to_add_out)$"


@register_param_set("attn", "every attention projection of the transformer blocks (image and text side)",
                    mmdit=True)
def _mmdit_attn(pipe):
    return component_params(pipe, "transformer", lambda m, mod, n: isinstance(mod, torch.nn.Linear)
                            and re.search(_MMDIT_ATTN, f".{m}") is not None)


@dataclass
class CAConfig(TrainConfig):
    """Options of Concept Ablation (None means "from the preset")."""

    loss: str = field(default="model", metadata={
        "help": "model (match the model's own anchor prediction, stop-gradient) or noise (match the anchor "
                "image's noise)"})
    anchor: str | None = field(default=None, metadata={
        "help": "the anchor concept the target is mapped onto, e.g. 'cat' for 'Grumpy Cat' (None: the preset's; "
                "objects need it)"})
    anchor_prompts: list[str] | None = field(default=None, metadata={"help": "prompts c that draw the anchor images"})
    target_prompts: list[str] | None = field(default=None, metadata={
        "help": "the target prompt c* of each anchor prompt (default: made from the anchor prompt and the concept)"})
    param_set: str | None = field(default=None, metadata={
        "help": "kv / cross-attn (attn2 k, v), attn, full-weight, or any named set (None: the preset's)"})
    batch_size: int | None = field(default=None, metadata={"help": "anchor images per step (None: the preset's)"})
    prior_preservation: bool | None = field(default=None, metadata={
        "help": "add the denoising loss on anchor images with their own prompts (None: the preset's)"})
    prior_weight: float = field(default=1.0, metadata={"help": "weight of the prior-preservation loss"})
    preset: str = field(default="auto", metadata={"help": "auto, style, object, nudity, or a provider's "
                                                          "(canvas-mini: canvas)"})
    images_per_prompt: int | None = field(default=None, metadata={"help": "generated anchor images per prompt"})
    data_steps: int = field(default=25, metadata={"help": "DDIM steps (flow Euler on sd3/flux) when generating "
                                                         "the anchor images"})
    data_guidance: float = field(default=6.0, metadata={"help": "guidance when generating the anchor images"})
    data_seed: int = field(default=0, metadata={"help": "first seed of the generated images"})

    def validate(self) -> None:
        super().validate()
        check(self.loss in ("model", "noise"), f"`loss` must be 'model' or 'noise' but is {self.loss!r}")
        names = ("auto", *PRESETS, *world_preset_names("ca"))
        check(self.preset in names, f"`preset` must be one of {', '.join(names)} but is {self.preset!r}")
        check(self.anchor is None or (isinstance(self.anchor, str) and self.anchor.strip()),
              f"`anchor` must be a non-empty string but is {self.anchor!r}")
        for name in ("anchor_prompts", "target_prompts"):
            value = getattr(self, name)
            check(value is None or (isinstance(value, list) and value
                                    and all(isinstance(p, str) and p.strip() for p in value)),
                  f"`{name}` must be a non-empty list of prompts but is {value!r}")
        check(self.target_prompts is None or (self.anchor_prompts is not None
                                              and len(self.target_prompts) == len(self.anchor_prompts)),
              "`target_prompts` needs `anchor_prompts` of the same length (one target prompt per anchor prompt)")
        check(self.batch_size is None or self.batch_size >= 1, f"`batch_size` must be >= 1 but is {self.batch_size}")
        check(self.prior_weight >= 0, f"`prior_weight` must be >= 0 but is {self.prior_weight}")
        check(self.images_per_prompt is None or self.images_per_prompt >= 1,
              f"`images_per_prompt` must be >= 1 but is {self.images_per_prompt}")
        check(self.data_steps >= 1, f"`data_steps` must be >= 1 but is {self.data_steps}")


def _target(anchor_prompt: str, concept: str, anchor: str, preset: str, i: int) -> str:
    """c* of one anchor prompt (module docstring); ``i`` picks the form for styles and nudity."""
    if preset == "style":
        return STYLE_FORMS[i % len(STYLE_FORMS)].format(c=anchor_prompt, t=concept)
    if preset == "nudity":
        return NUDITY_FORMS[i % len(NUDITY_FORMS)].format(c=anchor_prompt, t=concept)
    if not re.search(re.escape(anchor), anchor_prompt, flags=re.IGNORECASE):
        raise ConfigError(f"the anchor prompt {anchor_prompt!r} does not contain the anchor {anchor!r}, so it "
                          "cannot become a target prompt: give `target_prompts` or prompts that name the anchor")
    return re.sub(re.escape(anchor), concept, anchor_prompt, flags=re.IGNORECASE)


def make_pairs(concepts: list[str], config: CAConfig, ctx) -> tuple[str, dict, list[tuple[str, str]]]:
    """(preset name, resolved values, the (c*, c) prompt pairs) for ``concepts`` on the model of ``ctx``."""
    name = None if config.preset == "auto" else config.preset
    found = None if config.anchor_prompts else ctx.ask("ca_plan", name)
    if found is not None:
        values = found["values"]
        opts = {"preset": found["preset"], **{k: getattr(config, k) if getattr(config, k) is not None else v
                                              for k, v in values.items()}}
        return found["preset"], opts, list(found["pairs"])
    name = name or KIND_PRESET.get(ctx.kind, "object")
    if name not in PRESETS:
        raise ConfigError(f"`preset` must be auto or one of {', '.join(PRESETS)} for this model "
                          f"({ctx.provider.name} presets) but is {name!r}")
    opts = {"preset": name, **{k: getattr(config, k) if getattr(config, k) is not None else v
                               for k, v in PRESETS[name].items()}}
    anchor = opts["anchor"]
    if config.anchor_prompts:
        anchors = list(config.anchor_prompts)
    elif anchor is None:
        raise ConfigError(f"CA maps the concept onto an anchor concept: give `anchor` (e.g. anchor='cat' to "
                          f"ablate {concepts[0]!r} onto cats) or `anchor_prompts`, or kind='style' for the "
                          "'painting' anchor")
    elif name == "style":
        anchors = [f"a {anchor} of {s}" for s in SCENES]
    elif name == "nudity":
        anchors = list(PEOPLE)
    else:
        anchors = [f.format(anchor) for f in OBJECT_FORMS]
    if config.target_prompts:
        return name, opts, list(zip(config.target_prompts, anchors))
    if name == "object" and anchor is None:
        raise ConfigError("object targets are made by replacing the anchor in each anchor prompt: give `anchor` "
                          "or `target_prompts`")
    pairs = [(_target(a, c, anchor or "", name, i), a) for c in concepts for i, a in enumerate(anchors)]
    return name, opts, pairs


def _params(pipe, name: str) -> dict:
    return select_params(pipe, GROUPS.get(str(name).strip().lower(), name))


def _predictor(pipe, ctx, row: dict):
    """(noiser, ``predict(x_t, t, prompts)`` in float32, manifest extras) of the pipeline's kind: a UNet's eps
    (or v) at DDPM timesteps, or an SD 3 / Flux transformer's velocity at flow-matching sigmas."""
    from ..pipelines import FamilyAdapter
    from .salun import _FlowNoiser, _Noiser

    def texts(prompts: list[str]):
        return ctx[torch.tensor([row[p] for p in prompts])]

    if not FamilyAdapter(pipe).mmdit:
        def eps(x_t, t, prompts):
            return pipe.unet(x_t, t, **texts(prompts).unet_kwargs(pipe)).sample.float()

        return _Noiser(pipe), eps, {}
    from ..pipelines.flow import FlowModel

    fm = FlowModel(pipe)   # the native size, at which the anchor latents were drawn

    def velocity(x_s, s, prompts):
        return fm.predict(pipe.transformer, x_s, s, texts(prompts))

    return _FlowNoiser(fm), velocity, {"flow": {"resolution": fm.size, "guidance_embed": fm.guidance}}


@register("ca", CAConfig, components=("unet", "transformer"), families=("sd1", "sd2", "sdxl", "sd3", "flux"))
def ca(pipe, concepts: list[str], config: CAConfig):
    """Erase ``concepts`` with Concept Ablation; returns an Edit of the trained weights (see module docstring)."""
    from ..pipelines import FamilyAdapter
    from ..pipelines.generation import default_sampling

    about = concept_context(pipe, concepts, config)
    preset, opts, pairs = make_pairs(concepts, config, about)
    params = _params(pipe, opts["param_set"])   # a bad set fails before any image is drawn
    anchors = list(dict.fromkeys(a for _, a in pairs))
    images = generate_set(pipe, anchors, opts["images_per_prompt"], config.data_seed,
                          default_sampling(pipe, steps=config.data_steps, guidance=config.data_guidance),
                          progress=config.progress, name="anchor")   # DDIM, or flow Euler on sd3 / flux
    targets_of: dict[str, list[str]] = {}
    for c_star, c in pairs:
        targets_of.setdefault(c, []).append(c_star)
    texts = sorted(set(anchors) | {c_star for c_star, _ in pairs})
    row = {p: i for i, p in enumerate(texts)}
    noiser, predict, extras = _predictor(pipe, FamilyAdapter(pipe).encode(texts), row)
    b = opts["batch_size"]

    with Trainer(pipe, params, config, steps=opts["steps"], lr=opts["lr"]) as tr:
        def loss_fn(i: int) -> torch.Tensor:
            pos = i * tr.world + tr.rank
            z0, anchor_prompts = images.batch(cycle_indices(len(images), b, pos, config.seed), tr.device)
            picks = torch.randint(1 << 30, (len(anchor_prompts),), generator=tr.rng).tolist()
            target_prompts = [targets_of[a][k % len(targets_of[a])] for a, k in zip(anchor_prompts, picks)]
            x_t, t, noise_target = noiser(z0, tr.rng)
            if config.loss == "model":
                with torch.no_grad():   # the anchor prediction of the model itself, stop-gradient
                    target = predict(x_t, t, anchor_prompts)
            else:
                target = noise_target.float()
            loss = F.mse_loss(predict(x_t, t, target_prompts), target)
            if opts["prior_preservation"]:
                z_p, p_p = images.batch(cycle_indices(len(images), b, pos, config.seed + 1), tr.device)
                x_p, t_p, target_p = noiser(z_p, tr.rng)
                loss = loss + config.prior_weight * F.mse_loss(predict(x_p, t_p, p_p), target_p.float())
            return loss

        values = {k: v for k, v in opts.items() if k != "preset"}
        return tr.fit(loss_fn, manifest={
            "resolved": opts, "loss": config.loss, "anchor_set": images.protocol, **extras,
            "pair_examples": [{"target": c_star, "anchor": c} for c_star, c in pairs[:3]],
            **about.record(preset, {**values, "loss": config.loss, "prior_weight": config.prior_weight})})
