"""FMN: Forget-Me-Not, attention re-steering (Zhang et al., 2023, arXiv 2303.17591).

Fine-tune the UNet on images of the concept so that the concept's tokens stop drawing
cross-attention. With ``A^l(x_t, c)`` the cross-attention probabilities of layer ``l`` (batch x
heads x pixels x 77) and ``P(c)`` the positions of the concept's tokens in prompt ``c`` (plus, with
``use_pooler``, every position holding the end token, the reference's "pooler": on SD 1.x tokenizers,
which pad with it, the padding too), the attention re-steering loss (paper
section 3.2, eq. 2; reference ``src/train_attn.py``) is the norm of every concept-token map::

    L_attn = || concat_l A^l(x_t, c)[..., P(c)] ||_2,    x_t = sqrt(abar_t) z_0 + sqrt(1 - abar_t) eps,
    t ~ U{0..T-1},  z_0 = an image of the concept,  c = a prompt that names it.

Nothing else enters the loss: no denoising target, no frozen model. The maps are read through
diffusers' attention-processor API: :func:`attention_recorder` sets diffusers' own ``AttnProcessor``
(:class:`~erasekit.erase.attention_maps.AttentionProbe`, shared with MACE) on every cross-attention
block (``attn2``) for the run, and :class:`ConceptAttention` sums the squares of the probabilities it
computes at the concept positions, so the attention itself is diffusers'.

SD 3 / Flux (flow matching; :mod:`.joint_attention`). An MMDiT has no cross-attention: each joint block runs one
softmax over the image and text tokens' keys together. ``A^l`` is then the image queries' rows of that joint
softmax at the text tokens' columns (batch x heads x image tokens x text rows), read in every joint block and in
Flux's single-stream blocks (which run the same joint softmax over ``[text ; image]`` with shared weights, so the
concept's tokens are read there too). diffusers' processors use a fused kernel, so
:class:`~.joint_attention.JointAttentionProbe` recomputes each block's image queries and all keys exactly as
the processor does (per-head norms, Flux's rotary embedding) and forms the probabilities; the block's output is
still its own processor's. Differences from a UNet's map: the softmax is normalised over image and text keys,
so lowering the concept's columns may move attention to image tokens as well as to other words; text queries
(the text stream attending to the concept) are not part of the loss, as the paper's maps are the pixels'.
``P(c)``: the concept's rows in every text segment of the conditioning, each with its own tokenizer
(:func:`~.attention_maps.concept_positions`; SD 3: the CLIP rows and the T5 rows; Flux: the T5 rows),
and with ``use_pooler`` each segment's end-token rows. Noising: ``x_s = (1 - s) z_0 + s eps`` with ``s`` from the
scheduler's training grid and shift (the counterpart of ``t ~ U{0..T-1}``); the images are drawn with flow
Euler at the native size. Trained set: the preset's ``full`` is the whole transformer (the reference trains the
whole UNet); ``param_set="esd-x"`` (the joint attention's text-side projections ``add_q/k/v_proj``,
``to_add_out``) or ``"esd-x-strict"`` (``add_k_proj``, ``add_v_proj``) is the counterpart of the reference's
``only_optimize_ca``. Memory: the exact joint softmax needs every image-to-image score, kept for the backward
pass (batch x heads x N x (N + text rows) per block, with its softmax), far more than a UNet's cross-attention
maps (estimated at 1024 px, batch 1, fp32: about 3.5 GB per block, some 85 GB over SD 3.5-medium's 24 joint
blocks and 200 GB over Flux's 57).

Data (the forget set D_f), chosen by ``preset``:

- ``reference`` (any model): ``images_per_prompt`` images drawn by the model itself from the kind's
  template ("a photo of {}", styles "a photo in the style of {}", the reference's templates),
  or your ``prompts``, or a folder of real images (``forget_dir``, captions as :mod:`.data` reads
  them). The concept's own words are the tokens re-steered (``concept_words`` overrides).
- the model's provider (canvas-mini: ``canvas``): the concept's captions, one image each, drawn by
  the model, the label's words ("Van Gogh") as the tokens, no end token; 60 steps, lr 3e-4, batch 4,
  cross-attention only (``xattn``), measured on canvas-mini (docs/methods/fmn.md,
  benchmarks/sweeps/results/fmn_quick_cpu.jsonl).

Defaults on real models (reference ``configs/attn.yaml``): 35 steps, lr 2e-6, batch 1, the whole
UNet (``only_optimize_ca: false``), the end token included (``use_pooler: true``), timesteps
uniform over the training schedule. Deviations (docs/methods/fmn.md): no textual-inversion stage
(the reference first learns tokens for the concept from its images; here the concept's own words
are re-steered); Adam without weight decay and without clipping (AdamW's decay would move every
weight of the UNet, the loss reaches only the weights upstream of the attention scores); the
generated images stay latents (no decode / encode round trip).
"""

from __future__ import annotations

import re
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Iterator

import torch

from ..errors import ConfigError
from ..presets import concept_context, world_preset_names
from .data import cycle_indices, folder_set, generate_set
from .attention_maps import concept_positions
from .joint_attention import probing_joint
from .engine import TrainConfig, Trainer
from .param_sets import select_params
from .registry import check, register

TEMPLATES = {"style": ("a photo in the style of {}",), "object": ("a photo of {}",)}
PRESETS = {"reference": dict(steps=35, lr=2e-6, batch_size=1, images_per_prompt=10, param_set="full",
                            use_pooler=True)}


@dataclass
class FMNConfig(TrainConfig):
    """Options of FMN (None means "from the preset")."""

    param_set: str | None = field(default=None, metadata={
        "help": "trained parameters: full (reference), xattn, esd-x-strict, ... (None: the preset's)"})
    batch_size: int | None = field(default=None, metadata={"help": "images per step (None: the preset's)"})
    use_pooler: bool | None = field(default=None, metadata={
        "help": "also re-steer every position holding the end token (the reference's use_pooler; SD 1.x: "
                "the padding too; None: the preset's)"})
    preset: str = field(default="auto", metadata={"help": "auto, reference, or a provider's (canvas-mini: canvas)"})
    prompts: list[str] | None = field(default=None, metadata={
        "help": "prompts that draw the concept's images (default: the kind's template / the model's prompts)"})
    concept_words: list[str] | None = field(default=None, metadata={
        "help": "the words whose tokens are re-steered, one per concept (default: each concept's words)"})
    forget_dir: str | None = field(default=None, metadata={
        "help": "folder of real images of the concept (with <stem>.txt captions, or the first prompt)"})
    images_per_prompt: int | None = field(default=None, metadata={"help": "generated images per prompt"})
    data_steps: int = field(default=25, metadata={"help": "DDIM steps when generating the images"})
    data_guidance: float = field(default=7.5, metadata={"help": "guidance when generating the images"})
    data_seed: int = field(default=0, metadata={"help": "first seed of the generated images"})

    def validate(self) -> None:
        super().validate()
        names = ("auto", *PRESETS, *world_preset_names("fmn"))
        check(self.preset in names, f"`preset` must be one of {', '.join(names)} but is {self.preset!r}")
        check(self.batch_size is None or self.batch_size >= 1, f"`batch_size` must be >= 1 but is {self.batch_size}")
        check(self.images_per_prompt is None or self.images_per_prompt >= 1,
              f"`images_per_prompt` must be >= 1 but is {self.images_per_prompt}")
        check(self.data_steps >= 1, f"`data_steps` must be >= 1 but is {self.data_steps}")
        check(self.use_pooler is None or isinstance(self.use_pooler, bool),
              f"`use_pooler` must be True, False or None but is {self.use_pooler!r}")
        for name in ("prompts", "concept_words"):
            value = getattr(self, name)
            check(value is None or (isinstance(value, list) and value
                                    and all(isinstance(p, str) and p.strip() for p in value)),
                  f"`{name}` must be a non-empty list of non-empty strings but is {value!r}")


class ConceptAttention:
    """How much cross-attention the concept tokens draw: a sink for :class:`~.attention_maps.AttentionProbe`.

    :meth:`start` sets the concept positions of the batch (``B x 77`` bool); every cross-attention
    call then adds the squared probabilities at those positions to :attr:`sum_sq`, so
    ``sqrt(sum_sq)`` is the norm of the concatenated concept-token maps (the FMN loss).
    """

    def __init__(self):
        self.positions: torch.Tensor | None = None
        self.sum_sq: torch.Tensor | None = None

    def start(self, positions: torch.Tensor) -> None:
        self.positions, self.sum_sq = positions, None

    def record(self, probs: torch.Tensor, heads: int) -> None:
        if self.positions is None:
            return
        b = self.positions.shape[0]
        maps = probs.float().reshape(b, -1, probs.shape[-2], probs.shape[-1])   # B x heads x pixels x tokens
        part = (maps * self.positions[:, None, None, :]).pow(2).sum()
        self.sum_sq = part if self.sum_sq is None else self.sum_sq + part

    def loss(self) -> torch.Tensor:
        if self.sum_sq is None:
            raise ConfigError("the UNet ran no cross-attention through the FMN processor; FMN needs a UNet "
                              "with cross-attention (attn2) blocks")
        return self.sum_sq.sqrt()


@contextmanager
def attention_recorder(unet) -> Iterator[ConceptAttention]:
    """A :class:`ConceptAttention` fed by every ``attn2`` of ``unet`` for the block (old processors restored)."""
    from .attention_maps import probing

    if not any(name.endswith("attn2") for name, _ in unet.named_modules()):
        raise ConfigError(f"{type(unet).__name__} has no cross-attention (attn2) blocks for FMN to re-steer")
    recorder = ConceptAttention()
    with probing(unet, recorder.record):
        yield recorder


def _plan(concepts: list[str], config: FMNConfig, ctx) -> tuple[str, dict, list[str], list[str]]:
    """(preset name, resolved values, prompts of D_f, concept words)."""
    name = None if config.preset == "auto" else config.preset
    found = ctx.ask("fmn_preset", name)
    if found is None:
        name = name or "reference"
        if name not in PRESETS:
            raise ConfigError(f"`preset` must be auto or one of {', '.join(PRESETS)} for this model "
                              f"({ctx.provider.name} presets) but is {name!r}")
        found = name, dict(PRESETS[name])
    name, values = found
    opts = {"preset": name, **{k: (getattr(config, k) if getattr(config, k) is not None else v)
                               for k, v in values.items()}}
    words = config.concept_words or [ctx.ask("concept_words", c) or c for c in concepts]
    if config.prompts:
        prompts = list(config.prompts)
    elif name == "reference":
        prompts = [t.format(c) for c in concepts for t in TEMPLATES.get(ctx.kind_of(c), TEMPLATES["object"])]
    else:
        prompts = [p for c in concepts for p in ctx.prompts(c)]
    return name, opts, prompts, words


@register("fmn", FMNConfig, components=("unet", "transformer"), families=("sd1", "sd2", "sdxl", "sd3", "flux"))
def fmn(pipe, concepts: list[str], config: FMNConfig):
    """Erase ``concepts`` with Forget-Me-Not; returns an Edit of the trained weights (see module docstring)."""
    from ..pipelines import FamilyAdapter
    from ..pipelines.generation import Sampling, default_sampling
    from .salun import _Noiser

    about = concept_context(pipe, concepts, config)
    preset, opts, prompts, words = _plan(concepts, config, about)
    params = select_params(pipe, opts["param_set"])   # a bad set fails before any image is drawn
    adapter = FamilyAdapter(pipe)
    if config.forget_dir:
        images = folder_set(pipe, config.forget_dir, prompts[0], name="forget")
    else:
        sampling = (default_sampling(pipe, steps=config.data_steps, guidance=config.data_guidance) if adapter.mmdit
                    else Sampling(steps=config.data_steps, guidance=config.data_guidance))   # flow Euler on sd3/flux
        images = generate_set(pipe, prompts, opts["images_per_prompt"], config.data_seed, sampling,
                              progress=config.progress, name="forget")
    texts = sorted(set(images.prompts))
    row = {p: i for i, p in enumerate(texts)}
    ctx = adapter.encode(texts)
    positions = concept_positions(adapter, texts, [re.sub(r"\s+", " ", w).strip() for w in words],
                     opts["use_pooler"]).to(ctx.embeds.device)
    noiser, forward, recording, extras = _model(pipe, adapter, positions.shape[1]) if adapter.mmdit else (
        _Noiser(pipe), lambda x_t, t, c: pipe.unet(x_t, t, **c.unet_kwargs(pipe)), attention_recorder(pipe.unet), {})
    b = opts["batch_size"]

    with Trainer(pipe, params, config, steps=opts["steps"], lr=opts["lr"]) as tr, recording as recorder:
        def loss_fn(i: int) -> torch.Tensor:
            idx = cycle_indices(len(images), b, i * tr.world + tr.rank, config.seed)
            z0, batch_prompts = images.batch(idx, tr.device)
            x_t, t, _ = noiser(z0, tr.rng)
            rows = torch.tensor([row[p] for p in batch_prompts])
            recorder.start(positions[rows.to(positions.device)])
            forward(x_t, t, ctx[rows])
            return recorder.loss()

        values = {k: v for k, v in opts.items() if k != "preset"}
        return tr.fit(loss_fn, manifest={
            "resolved": opts, "forget_set": images.protocol, "concept_words": words, **extras,
            **about.record(preset, {**values, "concept_words": words})})


def _model(pipe, adapter, text_len: int):
    """SD 3 / Flux: (noiser of the flow-matching training grid, the transformer's call at ``(x_s, s)``, the
    recorder of the joint attention's concept-text columns, manifest extras); module docstring."""
    from ..pipelines.flow import FlowModel
    from .salun import _FlowNoiser

    fm = FlowModel(pipe)   # the native size, at which the images were drawn

    @contextmanager
    def recording():
        recorder = ConceptAttention()
        with probing_joint(pipe.transformer, adapter.family, lambda p: recorder.record(p, p.shape[1]),
                           text_len):
            yield recorder

    return (_FlowNoiser(fm), lambda x_s, s, c: fm.predict(pipe.transformer, x_s, s, c), recording(),
            {"flow": {"resolution": fm.size, "guidance_embed": fm.guidance}})
