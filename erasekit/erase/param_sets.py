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

Other engineers add sets (e.g. text-encoder layers for AdvUnlearn) with::

    @register_param_set("text-encoder-attn", "self-attention of the text encoder")
    def _te_attn(pipe): return component_params(pipe, "text_encoder", lambda mod, name, p: ...)

:func:`select_params` refuses unknown names (listing the valid ones) and sets that select nothing,
so an empty optimizer (the rewrite's README ``xattn`` pitfall) cannot happen silently.
"""

from __future__ import annotations

from typing import Callable

from torch import nn

from ..errors import ConfigError

_SETS: dict[str, tuple[Callable, str]] = {}


def register_param_set(name: str, help: str):
    """Decorator: register ``fn(pipe) -> {"<component>/<name>": Parameter}`` as a named set."""

    def deco(fn: Callable) -> Callable:
        _SETS[name] = (fn, help)
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


def select_params(pipe, name: str) -> dict[str, nn.Parameter]:
    """The parameters of named set ``name``; clear errors for an unknown or empty set."""
    key = str(name).strip().lower()
    if key not in _SETS:
        raise ConfigError(f"param_set must be one of {', '.join(sorted(_SETS))} but is {name!r}")
    params = _SETS[key][0](pipe)
    if not params:
        raise ConfigError(f"param_set {name!r} selects no parameters of this {type(pipe.unet).__name__}; "
                          "choose a set that exists in this architecture (e.g. 'full')")
    return params
