"""SPM: one-dimensional adapters (Lyu et al., CVPR 2024, "One-dimensional Adapter to Rule Them All:
Concepts, Diffusion Models and Erasing Applications", arXiv 2312.16145).

One rank-1 adapter per concept ("concept semi-permeable membrane") on every ``Linear`` and 1x1
``Conv2d`` inside the UNet's transformer blocks (``layers="transformer"``, the reference; or the
``Linear`` layers only, ``"linear"``; SD 3 / Flux: below): ``W' = W + up down`` with ``up`` d_out x 1, ``down`` 1 x d_in
(alpha = rank = 1, so scale 1). The base model is frozen; the adapter alone is trained on

    L = L_erase + la_strength * L_LA

- erasure (ESD's objective, the reference's ``erase`` action with ``guidance_scale`` = ``eta``):
  ``|| eps_SPM(x_t, c) - [eps(x_t, "") - eta (eps(x_t, c) - eps(x_t, ""))] ||^2``
  (with a prompt ``c_from`` that carries c, the target is ESD's attribute form
  ``eps(c_from) - (eta + 1)(eps(c) - eps(""))``; :func:`~erasekit.erase.esd.esd_pairs`);
- latent anchoring (eq. 5): ``|| eps_SPM(x_t, a) - eps(x_t, a) ||^2`` for ``anchors`` random text
  contexts ``a``: Gaussian directions in the whole 77 x d context space, each accepted with
  probability ``1 - cos(a, c)`` (far from the concept) and scaled to ``|c|`` times U(0.8, 1.2).

x_t: DDIM (``ddim_steps``, guidance ``sample_guidance``, concept prompt) from noise with the adapter
on, stopped at a random step k; the losses are taken at that step's timestep. Adam(W) with the
reference's cosine-with-restarts schedule (``warmup`` steps, ``cycles``); gradient norm clipped at
``max_grad_norm`` when given.

Combining: the adapters of several concepts are trained one after the other, each alone, and the
Edit holds their sum (exact factors side by side, rank = number of concepts). Every adapter is
stored as its exact factors (a 1x1 convolution's change as its dense new weight: the Edit factors
2-D weights only).

Facilitated transport (FT, ``facilitated_transport=True``): when sampling, each adapter is scaled, per
prompt, by the prompt's similarity to its concept, the largest cosine similarity between the prompt's
flattened 77 x d context and the concept's prompts (the reference's ``clipcos``), clipped to [0, 1]. The
Edit then names the sampler ``spm`` and is sampled through ``edit.sampled(pipe)`` (hooks on the adapted
layers and the UNet, removed after the block); ``apply`` refuses it. It needs ``layers="linear"`` (every
adapter kept as its own factors). Off by default: the Edit then applies every adapter at full strength to
every prompt, as the reference's notebook and SD-WebUI paths do.

Deviations: FT uses ``clipcos`` only (the reference's default also takes the token overlap with the
concept's prompt, which the UNet's input no longer shows) and scales each adapter's change once (the
reference multiplies both of its factors, i.e. by the square, and sums several adapters' factors before
multiplying them, which adds cross terms). The reference trains with 8-bit AdamW at random resolutions
("dynamic resolution"); here fp32 AdamW at the model's native size.

SD 3 / Flux (flow matching, :mod:`erasekit.pipelines.flow`). The adapters sit where the reference puts them in
a UNet, on every token-reading ``Linear`` of the transformer's blocks: in each joint block the image side
(``attn.to_q``, ``to_k``, ``to_v``, ``to_out.0``, ``ff``) and the text side (``attn.add_q_proj``,
``add_k_proj``, ``add_v_proj``, ``to_add_out``, ``ff_context``), and Flux's single-stream blocks (``attn.to_q``,
``to_k``, ``to_v``, ``proj_mlp``, ``proj_out``), which process text and image tokens together. The reference
adapts every ``Linear`` of SD 1.x's transformer blocks (self-attention, cross-attention, feed-forward), not only
the text path, so the MMDiT counterpart is every such layer, not only ``add_k_proj`` / ``add_v_proj``. Left out:
the blocks' adaLN modulation maps (``norm1.linear``, ``norm1_context.linear``, ``norm.linear``), which read the
timestep and pooled-text embedding rather than tokens (SD 1.x's transformer blocks have no such map), and the
context embedder and the embedders outside the blocks. An MMDiT has no 1x1 convolutions, so ``layers``
``transformer`` and ``linear`` select the same layers and every change is stored as exact factors. The loss
becomes the model's own flow-matching objective: at a fixed ``(x_s, s)`` the velocity is an affine function of
the noise prediction (``eps = x_s + (1 - s) v``) and ESD's guidance weights sum to one, so the erase target
carries exactly, ``v_target = v(x_s, "") - eta (v(x_s, c) - v(x_s, ""))`` (:func:`~erasekit.erase.esd.esd_target`
on velocities, as ESD's), and latent anchoring compares velocities, ``|| v_SPM(x_s, a) - v(x_s, a) ||^2``, the
implied noise predictions weighted by ``1 / (1 - s)^2`` (the model's own training weighting). x_s: flow Euler over
the first k of the pipeline's ``ddim_steps`` sigmas (its scheduler and shift) with the adapter on, SD 3 with
classifier-free guidance ``sample_guidance``, Flux with one conditional pass (a guidance-distilled Flux reads the
pipeline's default guidance embedding); the loss is taken at ``s = sigmas[k]``. The anchors are drawn in the
whole conditioning the transformer reads (the sequence rows, T5's included, and the pooled vector), as above.
Facilitated transport hooks the transformer's calls; its similarity is taken over the flattened sequence the
transformer reads (SD 3: CLIP and T5 rows; Flux: T5 rows). The presets are the SD 1.4 reference's, not measured
on an MMDiT.

Presets (``preset="auto"``): the model's provider (canvas-mini: ``canvas``, measured there), else
``sd``, the reference's configs (SD 1.4, ``configs/*/config.yaml`` and ``prompt.yaml``): 3000
iterations, lr 1e-4, warmup 500, 3 cosine cycles, la_strength 1000, 4 anchors, 30 DDIM steps,
sampling guidance 3, eta 1, rank 1.
"""

from __future__ import annotations

import math
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from types import SimpleNamespace

import torch
import torch.nn.functional as F

from ..errors import ConfigError
from ..presets import concept_context
from .engine import RunConfig, Trainer
from .registry import check, register

LAYERS = ("transformer", "linear")
PRESETS = {"sd": dict(steps=3000, lr=1e-4, la_strength=1000.0, anchors=4, ddim_steps=30, sample_guidance=3.0,
                      eta=1.0, warmup=500, cycles=3)}
_MMDIT_BLOCKS = ("transformer_blocks.", "single_transformer_blocks.")
_PRESET_KEYS = ("steps", "lr", "la_strength", "anchors", "ddim_steps", "sample_guidance", "eta")


@dataclass
class SPMConfig(RunConfig):
    """Options of SPM; ``None`` means "take the preset's value" (module docstring)."""

    preset: str = field(default="auto", metadata={"help": "auto (the model's provider, else sd), sd, or canvas"})
    steps: int | None = field(default=None, metadata={"help": "training iterations per concept"})
    lr: float | None = field(default=None, metadata={"help": "learning rate (AdamW)"})
    la_strength: float | None = field(default=None, metadata={"help": "weight of the latent-anchoring loss"})
    anchors: int | None = field(default=None, metadata={"help": "random anchor contexts per iteration (0: no LA)"})
    ddim_steps: int | None = field(default=None, metadata={"help": "DDIM steps of the x_t schedule"})
    sample_guidance: float | None = field(default=None, metadata={"help": "CFG scale when sampling x_t"})
    eta: float | None = field(default=None, metadata={"help": "erase guidance (the reference's guidance_scale)"})
    warmup: int | None = field(default=None, metadata={"help": "linear warm-up steps of the lr schedule"})
    cycles: int | None = field(default=None, metadata={"help": "cosine-with-restarts cycles of the lr schedule"})
    layers: str = field(default="transformer", metadata={
        "help": "transformer (every Linear and 1x1 Conv2d in the transformer blocks, reference) or linear"})
    rank: int = field(default=1, metadata={"help": "adapter rank (SPM: 1)"})
    weight_decay: float = field(default=0.01, metadata={"help": "AdamW weight decay"})
    max_grad_norm: float | None = field(default=None, metadata={"help": "clip the gradient norm (None: off)"})
    prompt_form: str = field(default="attribute", metadata={
        "help": "concepts with model prompts (canvas-mini: captions): attribute or caption (as ESD)"})
    facilitated_transport: bool = field(default=False, metadata={
        "help": "scale each adapter per prompt by the prompt's similarity to its concept when sampling (the Edit "
                "is then sampled through edit.sampled(pipe) only; needs layers='linear')"})

    def validate(self) -> None:
        super().validate()
        names = ("auto", *PRESETS, "canvas")
        check(self.preset in names, f"`preset` must be one of {', '.join(names)} but is {self.preset!r}")
        for name in ("steps", "ddim_steps", "cycles", "rank"):
            value = getattr(self, name)
            check(value is None or value >= 1, f"`{name}` must be >= 1 but is {value}")
        for name in ("la_strength", "anchors", "sample_guidance", "eta", "warmup", "weight_decay"):
            value = getattr(self, name)
            check(value is None or value >= 0, f"`{name}` must be >= 0 but is {value}")
        check(self.lr is None or self.lr > 0, f"`lr` must be > 0 but is {self.lr}")
        check(self.max_grad_norm is None or self.max_grad_norm > 0,
              f"`max_grad_norm` must be > 0 or None but is {self.max_grad_norm}")
        check(self.layers in LAYERS, f"`layers` must be one of {', '.join(LAYERS)} but is {self.layers!r}")
        check(self.prompt_form in ("attribute", "caption"),
              f"`prompt_form` must be 'attribute' or 'caption' but is {self.prompt_form!r}")
        check(not self.facilitated_transport or self.layers == "linear",
              "`facilitated_transport` needs every adapter as its own factors: set layers='linear' (a 1x1 "
              "convolution's change is stored dense, the concepts' adapters summed)")

    def resolved(self, ctx) -> dict:
        found = ctx.ask("spm_preset") if self.preset in ("auto", "canvas") else None
        if found is None:
            if self.preset == "canvas":
                raise ConfigError(f"`preset` 'canvas' needs canvas-mini; this model has the {ctx.provider.name} "
                                  "presets: use auto or sd")
            found = "sd", dict(PRESETS["sd"])
        name, values = found
        values = {"warmup": 0, "cycles": 1, **values}
        out = {"preset": name}
        for key in (*_PRESET_KEYS, "warmup", "cycles"):
            out[key] = getattr(self, key) if getattr(self, key) is not None else values[key]
        return out


def adapted_layers(net, which: str) -> dict:
    """The layers SPM adapts: every Linear (and 1x1 Conv2d for ``transformer``) inside a UNet's transformer block;
    on an SD 3 / Flux transformer every Linear of its blocks that reads tokens (module docstring)."""
    from torch import nn

    from .adapters import _is_pointwise_conv

    found = {}
    if hasattr(net, "transformer_blocks"):   # an MMDiT: no 1x1 convolutions, so both choices are the same
        for name, m in net.named_modules():
            if isinstance(m, nn.Linear) and name.startswith(_MMDIT_BLOCKS) and ".norm" not in f".{name}":
                found[name] = m
    for name, block in net.named_modules():
        if type(block).__name__ != "Transformer2DModel":
            continue
        for child, m in block.named_modules():
            if isinstance(m, nn.Linear) or (which == "transformer" and _is_pointwise_conv(m)):
                found[f"{name}.{child}"] = m
    if not found:
        raise ConfigError(f"{type(net).__name__} has no transformer blocks with Linear layers for SPM's adapters")
    return found


def lr_factor(step: int, steps: int, warmup: int, cycles: int) -> float:
    """Cosine with hard restarts after a linear warm-up (the reference's schedule)."""
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - warmup)
    return 0.5 * (1 + math.cos(math.pi * ((cycles * progress) % 1.0)))


def sample_anchors(target, n: int, rng: torch.Generator):
    """``n`` random contexts far from ``target`` (module docstring): (embeds n x 77 x d, pooled or None)."""
    def draw(x):
        flat = x.flatten().float().cpu()
        out = []
        while len(out) < n:
            a = torch.randn(flat.shape, generator=rng)
            a = a / a.norm()
            if float(torch.rand((), generator=rng)) < 1 - float(F.cosine_similarity(a, flat, dim=0)):
                scale = 0.8 + 0.4 * float(torch.rand((), generator=rng))
                out.append((scale * a * flat.norm()).reshape(x.shape))
        return torch.stack(out).to(x.device, x.dtype)

    return draw(target.embeds[0]), None if target.pooled is None else draw(target.pooled[0])


def _unet_model(pipe, s: dict, spm):
    """(``predict(z, t, c, on, grad)``: eps in float32 with or without the adapter; ``draw(rng, uncond, cond)``:
    x_t by DDIM with the adapter on, stopped at a random step, and its timestep; manifest extras) on a UNet."""
    from ..pipelines import Context
    from .esd import _ddim, sample_partway

    unet, sched = pipe.unet, _ddim(pipe, s["ddim_steps"])
    shape = (1, unet.config.in_channels, unet.config.sample_size, unet.config.sample_size)

    def predict(z, t, c, on: bool, grad: bool = False):
        with torch.set_grad_enabled(grad), (spm.attached(unet) if on else nullcontext()):
            return unet(z, t, **c.unet_kwargs(pipe)).sample.float()

    def draw(rng, uncond, cond):
        k = int(torch.randint(1, s["ddim_steps"], (1,), generator=rng))
        z = torch.randn(shape, generator=rng).to(unet.device, unet.dtype) * sched.init_noise_sigma
        z = sample_partway(lambda x, t, cc: predict(x, t, cc, on=True), z, sched, k, Context.cat([uncond, cond]),
                           s["sample_guidance"]).to(unet.dtype)
        return z, sched.timesteps[k]

    return predict, draw, {}


def _flow_model(pipe, s: dict, spm):
    """As :func:`_unet_model` on SD 3 / Flux: velocities at sigmas, x_s by flow Euler with the adapter on (SD 3
    with classifier-free guidance ``sample_guidance``, Flux with one conditional pass), stopped at a random step."""
    from ..pipelines.flow import FlowModel

    fm = FlowModel(pipe)   # the native size; a guidance-distilled Flux reads the pipeline's default guidance
    sigmas, tf = fm.sigmas(s["ddim_steps"]), pipe.transformer

    def predict(z, sigma, c, on: bool, grad: bool = False):
        with torch.set_grad_enabled(grad), (spm.attached(tf) if on else nullcontext()):
            return fm.predict(tf, z, sigma, c)

    def draw(rng, uncond, cond):
        k = int(torch.randint(1, s["ddim_steps"], (1,), generator=rng))
        with spm.attached(tf):
            z = fm.sample_partway(tf, fm.noise(1, rng), sigmas, k, uncond, cond, s["sample_guidance"])
        return z, sigmas[k]

    return predict, draw, {"flow": {"resolution": fm.size, "guidance_embed": fm.guidance,
                                    "sigmas": [round(float(x), 6) for x in sigmas]}}


def train_adapter(pipe, layers, pairs, config: SPMConfig, s: dict, index: int):
    """One concept's adapter (module docstring); returns it with its loss history and manifest extras."""
    from ..pipelines import Context, FamilyAdapter
    from .adapters import AdapterSet
    from .esd import esd_target

    texts = list(dict.fromkeys(t for pair in pairs for t in pair if t is not None))
    adapter = FamilyAdapter(pipe)
    enc = adapter.encode(["", *texts])
    uncond, row = enc[0:1], {t: 1 + i for i, t in enumerate(texts)}
    with torch.random.fork_rng():
        torch.manual_seed(config.seed + 7919 * index)
        spm = AdapterSet("transformer" if adapter.mmdit else "unet", layers, config.rank, scale=1.0, init="kaiming")
    opt = torch.optim.AdamW(spm.parameters(), lr=s["lr"], weight_decay=config.weight_decay)
    predict, draw, extras = (_flow_model if adapter.mmdit else _unet_model)(pipe, s, spm)
    signature = {**config.to_dict(), "concept_index": index, "resolved": s, "pairs": pairs}
    losses: list[float] = []

    with Trainer(pipe, {}, config, steps=s["steps"], signature=signature, networks={"spm": spm},
                 optimizers={"spm": opt}, stream_rng=True) as tr:
        def prepare(params):
            if config.max_grad_norm is not None:
                torch.nn.utils.clip_grad_norm_(params, config.max_grad_norm)

        def step(i: int) -> dict:
            for g in opt.param_groups:
                g["lr"] = s["lr"] * lr_factor(i, s["steps"], s["warmup"], s["cycles"])
            c, c_from = pairs[int(torch.randint(len(pairs), (1,), generator=tr.rng))]
            p = enc[row[c]:row[c] + 1]
            trained_on = enc[row[c_from]:row[c_from] + 1] if c_from else p
            with tr.autocast():
                z, t = draw(tr.rng, uncond, trained_on)
                e_0, e_p = predict(z, t, uncond, False), predict(z, t, p, False)
                e_from = predict(z, t, trained_on, False) if c_from else e_p
                loss = F.mse_loss(predict(z, t, trained_on, True, grad=True), esd_target(e_0, e_p, e_from, s["eta"]))
                if s["anchors"] and s["la_strength"]:
                    embeds, pooled = sample_anchors(trained_on, s["anchors"], tr.rng)
                    a = Context(embeds, pooled)
                    za = z.expand(s["anchors"], *z.shape[1:])
                    loss = loss + s["la_strength"] * F.mse_loss(predict(za, t, a, True, grad=True),
                                                                predict(za, t, a, False))
            losses.append(tr.update("spm", loss, prepare_grads=prepare))
            return {"loss": losses[-1]}

        tr.run(step, desc=f"spm {index + 1}")
    return spm, losses, extras


@register("spm", SPMConfig, components=("unet", "transformer"), families=("sd1", "sd2", "sdxl", "sd3", "flux"))
def spm(pipe, concepts: list[str], config: SPMConfig):
    """Erase ``concepts`` with SPM; returns an Edit of the summed rank-1 adapters (exact factors)."""
    from ..pipelines.mmdit import denoiser
    from .adapters import adapter_edit
    from .esd import esd_pairs

    ctx = concept_context(pipe, concepts, config)
    s = config.resolved(ctx)
    layers = adapted_layers(denoiser(pipe), config.layers)
    adapters, finals, all_pairs, ft_prompts, extras = [], [], [], [], {}
    for i, concept in enumerate(concepts):
        pairs = esd_pairs([concept], SimpleNamespace(prompts=None, erase_from=None, prompt_form=config.prompt_form),
                          ctx)
        adapter, losses, extras = train_adapter(pipe, layers, pairs, config, s, i)
        adapters.append(adapter)
        finals.append(losses[-1] if losses else None)
        all_pairs += [{"c": c, "c_from": f} for c, f in pairs]
        ft_prompts.append(list(dict.fromkeys(t for pair in pairs for t in pair if t)))
    values = {k: v for k, v in s.items() if k != "preset"}
    ft = {"sampler": "spm", "ft_prompts": ft_prompts} if config.facilitated_transport else {}
    return adapter_edit(pipe, adapters, {
        "resolved": {**values, "layers": config.layers, "rank": config.rank}, "pairs": all_pairs,
        "facilitated_transport": config.facilitated_transport, "adapters": len(adapters),
        "adapted_layers": len(layers), "training": {"final_loss": finals}, **ft, **extras,
        **ctx.record(s["preset"], values)})


# -- facilitated transport: each adapter scaled per prompt when sampling -----------------------------
def transport_strength(context: torch.Tensor, concept_embeds: torch.Tensor, owner: torch.Tensor, n: int):
    """rows x n: per prompt row and concept, the largest cosine similarity (flattened 77 x d contexts) between
    the row and the concept's prompts, clipped to [0, 1] (the reference's ``clipcos``)."""
    sim = F.cosine_similarity(context.flatten(1).float()[:, None], concept_embeds[None].to(context.device), dim=-1)
    return torch.stack([sim[:, owner == i].amax(1) for i in range(n)], 1).clamp(0, 1)


@contextmanager
def spm_sampler(pipe, edit):
    """``edit.sampled(pipe)`` for SPM with facilitated transport: every adapter scaled per batch row by
    :func:`transport_strength` of the row's prompt (classifier-free guidance: the conditional row's strength
    for both halves). ``sampled`` writes the Edit's weights (every adapter at strength 1) for the block, so the
    forward hooks on the adapted layers add ``(m - 1)`` times each adapter's output."""
    from ..errors import EditError
    from ..pipelines import FamilyAdapter
    from ..pipelines.inference import cfg_split, resolved_values, unet_hooks
    from ..pipelines.mmdit import denoiser

    rank = int(resolved_values(edit, ("rank",))["rank"])
    groups = edit.manifest.get("ft_prompts") or []
    if edit.weights or not groups:
        raise EditError("this SPM Edit cannot be sampled with facilitated transport (dense weights or no concept "
                        "prompts in its manifest): re-create it with layers='linear', facilitated_transport=True")
    E = FamilyAdapter(pipe).encode([p for g in groups for p in g]).embeds.flatten(1).float()
    owner = torch.tensor([i for i, g in enumerate(groups) for _ in g], device=E.device)
    state = {}

    def pre(call):
        b = cfg_split(pipe, call)
        m = transport_strength(call.encoder_hidden_states[b:] if b else call.encoder_hidden_states, E, owner,
                               len(groups))
        state["m"] = (torch.cat([m, m]) if b else m).repeat_interleave(rank, 1) - 1.0
        return None

    def hook(mod, args, out, U, V):
        h = args[0] @ V.T.to(out.dtype)
        m = state["m"].to(out.dtype)
        return out + (h * m.view(m.shape[0], *[1] * (h.ndim - 2), -1)) @ U.T.to(out.dtype)

    handles = []
    try:
        for key, (U, V) in edit.deltas.items():
            comp, name = key.split("/", 1)
            layer = getattr(pipe, comp).get_submodule(name[:-len(".weight")])
            dev = layer.weight.device
            handles.append(layer.register_forward_hook(
                lambda mod, args, out, U=U.to(dev), V=V.to(dev): hook(mod, args, out, U, V)))
        with unet_hooks(denoiser(pipe), pre=pre):
            yield pipe
    finally:
        for h in handles:
            h.remove()


def _register_sampler():
    from ..pipelines.inference import register_sampler

    register_sampler("spm", spm_sampler)


_register_sampler()
