"""Named parameter sets: which weights of a pipeline a fine-tuning method trains.

A set is a function ``pipe -> {"<component>/<parameter name>": Parameter}``; keys use the same
``<component>/`` prefix as :class:`~erasekit.Edit`. Built in (UNet, diffusers parameter names;
esd.md section 3):

=================  =================================================================================
``esd-x``          every ``nn.Linear`` inside a cross-attention block ``attn2`` (to_q, to_k, to_v,
                   to_out.0, weights and biases): ESD-x of the diffusers rewrite
``xattn``          every parameter whose name contains ``attn2`` (paper-era ``xattn``; the same
                   tensors as ``esd-x`` in SD UNets, which have no norms inside ``attn2``)
``esd-x-strict``   ``attn2.to_k`` and ``attn2.to_v`` only
``esd-u``          every ``nn.Linear`` / ``nn.Conv2d`` outside ``attn2``, time embedding and
                   conv_in / conv_out included, norms excluded (rewrite's SD script)
``noxattn``        paper-era ESD-u: every parameter except ``attn2``, the time / added embeddings
                   and the final ``conv_norm_out`` / ``conv_out`` (issue 8 of rohitgandikota/erasing)
``selfattn``       every parameter whose name contains ``attn1``
``full``           the whole UNet (alias ``esd-all``)
=================  =================================================================================

Text-encoder sets (AdvUnlearn; every text encoder, SDXL's two included; token and position
embeddings never): ``text-encoder-full`` (all transformer layers + final layer norm, the reference's
``text_encoder_full``), ``text-encoder-attn`` (self-attention), ``text-encoder-ffn`` (MLP).

MMDiT sets (SD 3 / 3.5, Flux; ``transformer`` parameter names). The text stream has its own
projections in every joint block's attention (``attn.add_q_proj``, ``add_k_proj``, ``add_v_proj`` read
it, ``attn.to_add_out`` writes the attention's text output back to it), its own feed-forward
``ff_context`` and modulation ``norm1_context``; Flux's single-stream blocks process text and image
tokens with shared weights, so no map there is text-only. The same names as the UNet's select:

=================  =================================================================================
``esd-x``          every joint block's text-side attention projections ``attn.add_q_proj``,
                   ``add_k_proj``, ``add_v_proj`` and ``to_add_out`` (weights and biases): where the
                   prompt enters the joint attention, the counterpart of the UNet's ``attn2``
``esd-x-strict``   ``attn.add_k_proj`` and ``attn.add_v_proj`` only (the keys and values that image
                   tokens read, the counterpart of ``attn2.to_k`` / ``to_v``)
``esd-u``          every ``nn.Linear`` of the transformer blocks (joint and single-stream) outside
                   the text side (``attn.add_*``, ``to_add_out``, ``ff_context``, ``norm1_context``)
``full``           the whole transformer (alias ``esd-all``)
=================  =================================================================================

The context embedder and the pooled-text projection are in no set but ``full`` (UCE edits them in
closed form). The text-encoder sets take the CLIP encoders only (SD 3: CLIP-L and CLIP-G; Flux:
CLIP-L); T5 is never trained. The paper-era UNet sets (``xattn``, ``noxattn``, ``selfattn``) have no
MMDiT counterpart and are refused there.

Other engineers add sets (e.g. text-encoder layers for AdvUnlearn) with::

    @register_param_set("text-encoder-attn", "self-attention of the text encoder")
    def _te_attn(pipe): return component_params(pipe, "text_encoder", lambda mod, name, p: ...)

and ``register_param_set(name, help, mmdit=True)`` gives a name its SD 3 / Flux meaning (CA's ``attn``).

:func:`select_params` refuses unknown names (listing the valid ones) and sets that select nothing,
so an empty optimizer (the rewrite's README ``xattn`` pitfall) cannot happen silently.
"""

from __future__ import annotations

from typing import Callable

from torch import nn

from ..errors import ConfigError

_SETS: dict[str, tuple[Callable, str]] = {}
_MMDIT_SETS: dict[str, tuple[Callable, str]] = {}   # the same names on SD 3 / Flux (section below)


def register_param_set(name: str, help: str, mmdit: bool = False):
    """Decorator: register ``fn(pipe) -> {"<component>/<name>": Parameter}`` as a named set (``mmdit``: the
    set of that name on SD 3 / Flux pipelines, selecting ``transformer`` parameters)."""

    def deco(fn: Callable) -> Callable:
        (_MMDIT_SETS if mmdit else _SETS)[name] = (fn, help)
        return fn

    return deco


def param_sets() -> dict[str, str]:
    """Every registered set name with its one-line description."""
    return {name: help for name, (_, help) in sorted(_SETS.items())}


def component_params(pipe, component: str, keep: Callable[[str, nn.Module, str], bool]) -> dict[str, nn.Parameter]:
    """Parameters of ``pipe.<component>`` for which ``keep(module_name, module, param_name)`` holds.

    ``param_name`` is the full dotted parameter name; keys of the result are ``component/param_name``.
    """
    root = getattr(pipe, component, None)
    if root is None:
        raise ConfigError(f"the pipeline has no {component!r}; this parameter set needs one")
    out = {}
    for mod_name, module in root.named_modules():
        for p_name, p in module.named_parameters(recurse=False):
            full = f"{mod_name}.{p_name}" if mod_name else p_name
            if keep(mod_name, module, full):
                out[f"{component}/{full}"] = p
    return dict(sorted(out.items()))


def _in_attn2(mod_name: str) -> bool:
    return ".attn2." in f".{mod_name}."


@register_param_set("esd-x", "every Linear inside cross-attention (attn2): ESD-x")
def _esd_x(pipe):
    return component_params(pipe, "unet", lambda m, mod, n: _in_attn2(m) and isinstance(mod, nn.Linear))


@register_param_set("xattn", "every parameter whose name contains attn2 (paper-era ESD-x)")
def _xattn(pipe):
    return component_params(pipe, "unet", lambda m, mod, n: "attn2" in n)


@register_param_set("esd-x-strict", "cross-attention key and value projections (attn2.to_k, attn2.to_v)")
def _esd_x_strict(pipe):
    return component_params(pipe, "unet", lambda m, mod, n: m.endswith(("attn2.to_k", "attn2.to_v")))


@register_param_set("esd-u", "every Linear/Conv2d outside cross-attention, norms excluded: ESD-u")
def _esd_u(pipe):
    return component_params(pipe, "unet",
                            lambda m, mod, n: not _in_attn2(m) and isinstance(mod, (nn.Linear, nn.Conv2d)))


_NOXATTN_TOP = ("time_embedding", "add_embedding", "conv_norm_out", "conv_out")


def _noxattn_keep(mod_name: str, module: nn.Module, name: str) -> bool:
    parts = name.split(".")
    return "attn2" not in parts and parts[0] not in _NOXATTN_TOP


@register_param_set("noxattn", "paper-era ESD-u: all but attn2, time embedding and the final out layers")
def _noxattn(pipe):
    return component_params(pipe, "unet", _noxattn_keep)


@register_param_set("selfattn", "every parameter whose name contains attn1 (self-attention)")
def _selfattn(pipe):
    return component_params(pipe, "unet", lambda m, mod, n: "attn1" in n)


@register_param_set("full", "the whole UNet")
def _full(pipe):
    return component_params(pipe, "unet", lambda m, mod, n: True)


_SETS["esd-all"] = (_full, "the whole UNet (alias of full)")


# Text-encoder sets (AdvUnlearn, advunlearn.md section 2): every text encoder of the pipeline (SDXL:
# both); the token and position embeddings are never included, so the embedding space stays fixed.
_TEXT_PARTS = {
    "full": lambda n: ".encoder.layers." in f".{n}" or "final_layer_norm" in n,
    "attn": lambda n: ".self_attn." in n,
    "ffn": lambda n: ".mlp." in n,
}


def _text_encoder_params(pipe, part: str) -> dict[str, nn.Parameter]:
    keep = _TEXT_PARTS[part]
    out = {}
    for comp in ("text_encoder", "text_encoder_2"):
        if getattr(pipe, comp, None) is not None:
            out.update(component_params(pipe, comp, lambda m, mod, n: keep(n)))
    return dict(sorted(out.items()))


@register_param_set("text-encoder-full", "every transformer layer and the final layer norm of the text "
                                         "encoder(s); token and position embeddings frozen")
def _te_full(pipe):
    return _text_encoder_params(pipe, "full")


@register_param_set("text-encoder-attn", "self-attention (q, k, v, out projections) of every text-encoder layer")
def _te_attn(pipe):
    return _text_encoder_params(pipe, "attn")


@register_param_set("text-encoder-ffn", "MLP (fc1, fc2) of every text-encoder layer")
def _te_ffn(pipe):
    return _text_encoder_params(pipe, "ffn")


# -- MMDiT (SD 3, Flux): the transformer's sets, same names (module docstring) ---------------------------
_TEXT_SIDE = ("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj", "attn.to_add_out")
_TEXT_STREAM = (".ff_context.", ".norm1_context.")


def _mmdit_set(name: str, help: str):
    def deco(fn: Callable) -> Callable:
        _MMDIT_SETS[name] = (fn, help)
        return fn

    return deco


def _in_blocks(mod_name: str) -> bool:
    return mod_name.startswith(("transformer_blocks.", "single_transformer_blocks."))


@_mmdit_set("esd-x", "text-side projections of every joint attention (add_q/k/v_proj, to_add_out)")
def _mmdit_x(pipe):
    return component_params(pipe, "transformer",
                            lambda m, mod, n: isinstance(mod, nn.Linear) and m.endswith(_TEXT_SIDE))


@_mmdit_set("esd-x-strict", "text key and value projections of every joint attention (add_k_proj, add_v_proj)")
def _mmdit_x_strict(pipe):
    return component_params(pipe, "transformer", lambda m, mod, n: m.endswith(("attn.add_k_proj", "attn.add_v_proj")))


def _text_stream(mod_name: str) -> bool:
    return mod_name.endswith(_TEXT_SIDE) or any(part in f"{mod_name}." for part in _TEXT_STREAM)


@_mmdit_set("esd-u", "every Linear of the transformer blocks outside the text side")
def _mmdit_u(pipe):
    return component_params(pipe, "transformer", lambda m, mod, n: isinstance(mod, nn.Linear) and _in_blocks(m)
                            and not _text_stream(m))


@_mmdit_set("full", "the whole transformer")
def _mmdit_full(pipe):
    return component_params(pipe, "transformer", lambda m, mod, n: True)


_MMDIT_SETS["esd-all"] = (_mmdit_full, "the whole transformer (alias of full)")


def _clip_text_encoder_params(pipe, part: str) -> dict[str, nn.Parameter]:
    """The text-encoder set ``part`` over the CLIP encoders of an MMDiT pipeline (T5 is never trained)."""
    keep = _TEXT_PARTS[part]
    out = {}
    for comp in ("text_encoder", "text_encoder_2", "text_encoder_3"):
        enc = getattr(pipe, comp, None)
        if enc is not None and type(enc).__name__.startswith("CLIPTextModel"):
            out.update(component_params(pipe, comp, lambda m, mod, n: keep(n)))
    return dict(sorted(out.items()))


for _part, _name in (("full", "text-encoder-full"), ("attn", "text-encoder-attn"), ("ffn", "text-encoder-ffn")):
    _MMDIT_SETS[_name] = (lambda pipe, _part=_part: _clip_text_encoder_params(pipe, _part),
                          _SETS[_name][1] + " (CLIP only)")


def select_params(pipe, name: str) -> dict[str, nn.Parameter]:
    """The parameters of named set ``name``; clear errors for an unknown or empty set.

    On an SD 3 / Flux pipeline (one with a ``transformer``) the names select the MMDiT sets.
    """
    key = str(name).strip().lower()
    if getattr(pipe, "transformer", None) is not None:
        if key not in _MMDIT_SETS:
            unet_only = f" ({name!r} is a UNet set)" if key in _SETS else ""
            raise ConfigError(f"param_set must be one of {', '.join(sorted(_MMDIT_SETS))} on SD 3 / Flux pipelines "
                              f"but is {name!r}{unet_only}")
        params, model = _MMDIT_SETS[key][0](pipe), pipe.transformer
    else:
        if key not in _SETS:
            raise ConfigError(f"param_set must be one of {', '.join(sorted(_SETS))} but is {name!r}")
        params, model = _SETS[key][0](pipe), pipe.unet
    if not params:
        raise ConfigError(f"param_set {name!r} selects no parameters of this {type(model).__name__}; "
                          "choose a set that exists in this architecture (e.g. 'full')")
    return params
