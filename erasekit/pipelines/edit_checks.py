"""What an Edit must satisfy before it touches a pipeline (see :mod:`erasekit.pipelines.edit`).

An Edit file is input from outside: these checks run on its manifest and tensors with no pipeline
(``Edit.validate``, at load), and every failure is an :class:`~erasekit.errors.EditError` that names
the problem. The comparisons with a pipeline (parameters, shapes, family, fingerprint) are in
``Edit.check``.
"""

from __future__ import annotations

import math
import re
import warnings

import torch

from ..errors import ConfigError, EditError
from .family import FAMILIES

COMPONENTS = ("unet", "transformer", "text_encoder", "text_encoder_2", "text_encoder_3")  # transformer: SD3, Flux
_DECLARED: dict[str, tuple[str, ...]] = {}   # method name -> the components its Edits may change
RECREATE = "re-create it with `erasekit erase` (or Edit.save)"
OPT_OUT = (" (only if you know it fits this one, e.g. a fine-tuned copy: unsafe_skip_base_check=True, "
           "CLI --unsafe-skip-base-check)")


class BaseCheckSkippedWarning(UserWarning):
    """An Edit is checked with ``unsafe_skip_base_check=True``: nothing shows it fits this pipeline."""


def declare_components(method: str, components) -> None:
    """Record that Edits made by ``method`` change only ``components`` (a subset of :data:`COMPONENTS`).

    The method registry calls this for every method that declares its components; a loaded Edit
    whose manifest names such a method and changes anything else is refused.
    """
    components = tuple(components)
    unknown = [c for c in components if c not in COMPONENTS]
    if not components or unknown:
        raise ConfigError(f"method {method!r} must declare components among {', '.join(COMPONENTS)}, "
                          f"not {list(components)}")
    _DECLARED[str(method).lower()] = components


def declared_components(method) -> tuple[str, ...] | None:
    """The components ``method`` declared (:func:`declare_components`), or None if it declared none."""
    return _DECLARED.get(method.lower()) if isinstance(method, str) else None


def undeclared_keys(method, keys) -> list[str]:
    """The ``keys`` outside the components ``method`` declared (none if it declared none)."""
    declared = declared_components(method)
    return [] if declared is None else [k for k in keys if k.split("/", 1)[0] not in declared]


def split_key(key) -> tuple[str, str]:
    """``"unet/a.b.weight"`` -> ``("unet", "a.b.weight")``; refuses other components and malformed keys."""
    if not isinstance(key, str) or "/" not in key or not key.split("/", 1)[1]:
        raise EditError(f"tensor key {key!r} is not '<component>/<parameter name>' (e.g. "
                        f"'unet/mid_block.attentions.0.transformer_blocks.0.attn2.to_k.weight'): not a valid "
                        f"Edit; {RECREATE}")
    comp, name = key.split("/", 1)
    if comp not in COMPONENTS:
        raise EditError(f"this Edit writes {key!r}, but an Edit may change only {', '.join(COMPONENTS)} "
                        f"(never {comp!r}): refusing it; {RECREATE}")
    return comp, name


def _number(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def _stats_ok(stats) -> bool:
    return isinstance(stats, dict) and all(
        isinstance(k, str) and isinstance(v, list) and len(v) >= 2 and all(_number(x) for x in v)
        for k, v in stats.items())


# manifest field -> (test of its value, what it must be); fields not listed are free-form
_FIELDS = {
    "keys": (lambda x: isinstance(x, list) and bool(x) and all(isinstance(k, str) for k in x),
             "a non-empty list of tensor names"),
    "method": (lambda x: isinstance(x, str) and bool(x.strip()), "a method name"),
    "concepts": (lambda x: isinstance(x, list) and all(isinstance(c, str) and c.strip() for c in x),
                 "a list of concept names"),
    "family": (lambda x: isinstance(x, str) and x in FAMILIES, "one of " + ", ".join(FAMILIES)),
    "fingerprint": (lambda x: isinstance(x, dict) and isinstance(x.get("id"), str) and _stats_ok(x.get("stats")),
                    "an object with an 'id' and per-tensor 'stats'"),
    "base_model": (lambda x: isinstance(x, str) and bool(x.strip()), "a model name or path"),
    "config": (lambda x: isinstance(x, dict), "an object of options"),
    "erasekit_version": (lambda x: isinstance(x, str), "a version string"),
    "sampler": (lambda x: isinstance(x, str) and bool(re.fullmatch(r"[a-z0-9_]+", x)),
                "'one_step' or an inference-time sampler's name (or absent)"),
    "generator_timestep": (lambda x: isinstance(x, int) and not isinstance(x, bool) and x > 0,
                           "a positive integer timestep"),
    "wall_time_s": (lambda x: x is None or (_number(x) and x >= 0), "a number of seconds"),
    "peak_memory_bytes": (lambda x: x is None or (_number(x) and x >= 0), "a number of bytes"),
}


def check_manifest(m, skip_base: bool) -> None:
    """Raise :class:`EditError` unless ``m`` is a JSON object whose known fields have their types and whose
    required ones are present (``family`` and ``fingerprint`` unless ``skip_base``)."""
    if not isinstance(m, dict):
        raise EditError(f"the Edit's manifest is a JSON {type(m).__name__}, not an object: not a valid Edit; "
                        f"{RECREATE}")
    for name, (ok, want) in _FIELDS.items():
        if name == "keys" and m.get("sampler") not in (None, "one_step") and m.get("keys") == []:
            continue   # an inference-time Edit (SLD, SAFREE) holds no tensors
        if name in m and not ok(m[name]):
            raise EditError(f"the Edit's manifest field {name!r} must be {want} but is {str(m[name])[:60]!r}: the "
                            f"file was altered or is corrupt; {RECREATE}")
    sampler = m.get("sampler")
    if isinstance(sampler, str) and sampler != "one_step" and sampler != m.get("method"):
        raise EditError(f"the Edit's manifest field 'sampler' must be 'one_step' or its method's name "
                        f"({str(m.get('method'))[:30]!r}, an inference-time sampler) but is {sampler[:60]!r}: the file "
                        f"was altered or is corrupt; {RECREATE}")
    required = ["keys"] + ([] if skip_base else ["family", "fingerprint"])
    if m.get("sampler") == "one_step":
        required.append("generator_timestep")
    missing = [name for name in required if name not in m]
    if missing in (["family"], ["fingerprint"], ["family", "fingerprint"]):
        raise EditError(f"the Edit's manifest has no {missing[0]!r}, so nothing shows which base model it was made "
                        f"for (the file was altered or is incomplete): {RECREATE}{OPT_OUT}")
    if missing:
        what = {"keys": "the list of its tensors",
                "generator_timestep": "the timestep of its one-step generator (sampler 'one_step')"}
        raise EditError(f"the Edit's manifest has no {missing[0]!r} ({what.get(missing[0], 'required')}): the file "
                        f"is incomplete; {RECREATE}")


def check_tensor(name: str, t) -> None:
    """Raise :class:`EditError` unless ``t`` is a finite floating-point tensor."""
    if not isinstance(t, torch.Tensor):
        raise EditError(f"{name} is a {type(t).__name__}, not a tensor")
    if not t.is_floating_point():
        raise EditError(f"{name} has dtype {str(t.dtype).replace('torch.', '')}, but Edit weights are floating "
                        f"point: the file is corrupt or not an erasekit Edit; {RECREATE}")
    if not torch.isfinite(t).all():
        raise EditError(f"{name} contains NaN or Inf: applied, it would break the model (black or noise images); "
                        f"refusing the Edit; {RECREATE}")


def check_contents(weights: dict, deltas: dict, manifest: dict) -> None:
    """Raise :class:`EditError` unless the tensors are exactly the manifest's keys, each a finite
    floating-point tensor of an allowed component, with multiplying delta factors (manifest checked)."""
    keys = sorted(set(weights) | set(deltas))
    both = sorted(set(weights) & set(deltas))
    if both:
        raise EditError(f"{both[0]} is stored both as a weight and as a low-rank delta: not a valid Edit; "
                        f"{RECREATE}")
    for key, w in weights.items():
        split_key(key)
        check_tensor(f"the weight {key}", w)
    for key, (u, v) in deltas.items():
        split_key(key)
        check_tensor(f"the delta factor U of {key}", u)
        check_tensor(f"the delta factor V of {key}", v)
        if u.ndim != 2 or v.ndim != 2 or u.shape[1] != v.shape[0]:
            raise EditError(f"the low-rank delta of {key} has factors U {tuple(u.shape)} and V {tuple(v.shape)}, "
                            f"which do not multiply (U's columns must equal V's rows): not a valid Edit; "
                            f"{RECREATE}")
    listed, stored = set(manifest["keys"]), set(keys)
    if listed - stored:
        missing = sorted(listed - stored)
        raise EditError(f"the Edit is missing {len(missing)} tensor(s) its manifest lists, e.g. {missing[0]!r}: "
                        f"the file is incomplete; {RECREATE}")
    if stored - listed:
        extra = sorted(stored - listed)
        raise EditError(f"the Edit holds {len(extra)} tensor(s) its manifest does not list, e.g. {extra[0]!r}: "
                        f"the file was altered; {RECREATE}")
    fp = manifest.get("fingerprint")
    if fp is not None and set(fp["stats"]) != stored:
        raise EditError("the Edit's fingerprint does not cover exactly its tensors: the file was altered; "
                        f"{RECREATE}")
    method = manifest.get("method")
    outside = undeclared_keys(method, keys)
    if outside:
        raise EditError(f"this Edit says it was made by {method!r}, which changes only "
                        f"{', '.join(declared_components(method))}, but it changes {outside[0]!r}: the file was "
                        "altered or mislabelled; refusing it")
    if manifest.get("sampler") == "one_step" and keys:   # the generator: one denoiser (UNet, or SD 3's transformer)
        comp = "transformer" if keys[0].startswith("transformer/") else "unet"
        other = next((k for k in keys if not k.startswith(f"{comp}/")), None)
        if other is not None:
            raise EditError(f"a one-step generator Edit changes only the {comp}, this one also {other!r}")


def fingerprints_match(ref: dict, now: dict) -> bool:
    """Whether two :func:`~erasekit.pipelines.fingerprint` results describe the same weights (2 % tolerance)."""
    if ref["stats"].keys() != now["stats"].keys():
        return False
    for key, a in ref["stats"].items():
        b = now["stats"][key]
        if len(a) != len(b):
            return False
        a, b = torch.tensor(a, dtype=torch.float64), torch.tensor(b, dtype=torch.float64)
        scale = max(abs(a[1].item()), 1e-8)  # RMS of the tensor
        if not torch.allclose(a, b, rtol=2e-2, atol=2e-2 * scale):
            return False
    return True


def warn_skipped(manifest: dict, stacklevel: int = 3) -> None:
    """The loud warning of a skipped base-model check (``unsafe_skip_base_check``)."""
    fp = manifest.get("fingerprint") if isinstance(manifest.get("fingerprint"), dict) else {}
    warnings.warn(
        f"UNSAFE: the base-model check of this Edit (method {manifest.get('method')!r}, made for "
        f"{manifest.get('family') or 'an unknown family'}, fingerprint {fp.get('id') or 'missing'}) is skipped "
        "(unsafe_skip_base_check): nothing shows it fits this pipeline, and on another model it can break "
        "it or erase nothing while looking fine", BaseCheckSkippedWarning, stacklevel=stacklevel)
