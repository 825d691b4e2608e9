"""Methods registered by name: a config dataclass plus one function ``(pipe, concepts, config) -> Edit``.

``erase(pipe, "uce", ["Van Gogh"], guide="art")`` looks the method up, builds and validates its
config from the keyword arguments (an unknown option is an error that lists the valid ones),
measures wall time and peak memory, and records everything in the Edit's manifest. Methods leave
the pipeline's weights as they found them, on success and on error; the Edit is applied by the
caller.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from typing import Callable

from ..config import MethodConfig as _BaseConfig
from ..config import check, make_config  # noqa: F401  (the method modules import them from here)
from ..errors import ConfigError
from ..presets import KINDS


@dataclass
class MethodConfig(_BaseConfig):
    """Base of every erasure method's config: the options every method shares, about its concepts.

    ``kind`` selects the presets (:mod:`erasekit.presets`); ``allow_unknown_concept`` lets a model
    with a closed world (canvas-mini) erase a concept outside it.
    """

    kind: str | None = field(default=None, metadata={
        "help": "the concepts' kind: style, object, nudity or other (None: guessed; the presets follow it)"})
    allow_unknown_concept: bool = field(default=False, metadata={
        "help": "erase a concept the model's world does not know (canvas-mini refuses it otherwise)"})

    def __post_init__(self):
        check(self.kind is None or self.kind in KINDS,
              f"`kind` must be one of {', '.join(KINDS)} or None (guessed) but is {self.kind!r}")
        check(isinstance(self.allow_unknown_concept, bool),
              f"`allow_unknown_concept` must be True or False but is {self.allow_unknown_concept!r}")
        super().__post_init__()

_REGISTRY: dict[str, tuple[type, Callable]] = {}
_FAMILIES: dict[str, tuple[str, ...]] = {}   # method -> the model families it supports
_REFUSALS: dict[str, dict[str, str]] = {}    # method -> {family it refuses: why}
# Methods live in their own modules, imported on first use so `import erasekit` stays light.
_MODULES = {"uce": "uce", "rece": "rece", "esd": "esd", "salun": "salun", "advunlearn": "advunlearn",
            "sfd": "sfd", "fmn": "fmn", "ca": "ca",
            "mace": "mace", "spm": "spm", "sld": "sld", "safree": "safree"}


def register(name: str, config_cls: type[MethodConfig], components: tuple[str, ...] | None = None,
             families: tuple[str, ...] | None = None, refusals: dict[str, str] | None = None):
    """Decorator: register ``fn(pipe, concepts, config) -> Edit`` under ``name``.

    ``components``: the pipeline components its Edits change (e.g. ``("unet",)``). Declared, they are
    enforced: :func:`erase` refuses an Edit that changes anything else, and so does ``Edit.load``
    for a file that names this method.
    ``families``: the model families (:data:`~erasekit.pipelines.family.FAMILIES`) the method supports;
    None: the UNet families sd1, sd2 and sdxl. :func:`erase` refuses any other pipeline before the method runs.
    ``refusals``: ``{family: why}`` for families refused by design; the reason goes into the refusal.
    """
    from ..pipelines.edit import declare_components
    from ..pipelines.family import FAMILIES, UNET_FAMILIES
    from ..pipelines.inference import add_resolver

    families = UNET_FAMILIES if families is None else tuple(families)
    if not families or any(f not in FAMILIES for f in families):
        raise ConfigError(f"method {name!r} must declare families among {', '.join(FAMILIES)}, not {list(families)}")

    add_resolver(get_method)   # a loaded inference-time Edit finds its method's sampler (pipelines.inference)

    def deco(fn: Callable) -> Callable:
        if components is not None:
            declare_components(name, components)
        _REGISTRY[name] = (config_cls, fn)
        _FAMILIES[name] = families
        _REFUSALS[name] = dict(refusals or {})
        fn.config_class = config_cls
        return fn

    return deco


def get_method(name: str) -> tuple[type[MethodConfig], Callable]:
    key = name.lower().strip()
    if key not in _REGISTRY and key in _MODULES:
        importlib.import_module(f"erasekit.erase.{_MODULES[key]}")
    if key not in _REGISTRY:
        raise ConfigError(f"unknown method {name!r}; choose one of: {', '.join(sorted(_MODULES))}")
    return _REGISTRY[key]


def supported_families(name: str) -> tuple[str, ...]:
    """The model families method ``name`` supports (:func:`register`)."""
    get_method(name)
    return _FAMILIES[name.lower().strip()]


def methods() -> dict[str, type[MethodConfig]]:
    """Every available method name with its config class: the built-in ones and any registered since."""
    return {name: get_method(name)[0] for name in sorted(set(_MODULES) | set(_REGISTRY))}


def normalize_concepts(concepts) -> list[str]:
    if isinstance(concepts, str):
        concepts = [concepts]
    concepts = [c for c in (concepts or [])]
    if not concepts or any(not isinstance(c, str) or not c.strip() for c in concepts):
        raise ConfigError("concepts must be a non-empty list of non-empty strings, e.g. ['Van Gogh']")
    return [c.strip() for c in concepts]


def erase(pipe, method: str, concepts, config: MethodConfig | None = None, **options):
    """Erase ``concepts`` from ``pipe`` with ``method``; returns an :class:`~erasekit.Edit`.

    Args:
        pipe: a diffusers Stable Diffusion pipeline (left unchanged; apply the Edit yourself).
        method: a registered name (:func:`methods`): ``uce``, ``rece``, ``esd``, ``salun``, ``advunlearn``,
            ``sfd``, ``fmn``, ``ca``, ``mace``, ``spm``, ``sld`` or ``safree``.
        concepts: one concept or a list (``"Van Gogh"``, ``"nudity"``, ``"Cats"``).
        config: a ready config object, or give the method's options as keyword arguments.

    Example:
        >>> import erasekit
        >>> pipe = erasekit.load_pipeline("canvas-mini")
        >>> edit = erasekit.erase(pipe, "uce", ["Van Gogh"], preset="style")
        >>> edit.manifest["method"], edit.manifest["concepts"]
        ('uce', ['Van Gogh'])
    """
    from .._profile import measure

    config_cls, fn = get_method(method)
    concepts = normalize_concepts(concepts)
    if config is None:
        config = make_config(config_cls, options)
    elif options:
        raise ConfigError("give either config= or keyword options, not both")
    elif not isinstance(config, config_cls):
        raise ConfigError(f"config must be a {config_cls.__name__} for method {method!r}, "
                          f"not {type(config).__name__}")
    from ..pipelines.family import detect_family
    from ..pipelines.mmdit import denoiser
    from .engine import run_scope  # training methods key their automatic checkpoints by this run

    family, supported = detect_family(pipe), supported_families(method)
    if family not in supported:
        why = _REFUSALS.get(method.lower().strip(), {}).get(family)
        raise ConfigError(f"method {method!r} supports {', '.join(supported)} pipelines, but this one is {family}: "
                          + (f"{why}; " if why else "")
                          + f"choose a method that supports {family} ({', '.join(_supporting(family)) or 'none yet'})")
    net = denoiser(pipe)
    with measure(net.device) as usage, run_scope(method.lower(), concepts):
        edit = fn(pipe, concepts, config)

    edit.manifest.update({
        "method": method.lower(), "concepts": concepts, "config": config.to_dict(),
        "family": family, "wall_time_s": round(usage.wall_time_s, 4),
        "peak_memory_bytes": usage.peak_memory_bytes, "memory_kind": usage.memory_kind,
        "dtype": str(net.dtype).replace("torch.", ""),
    })
    from ..pipelines.edit import declared_components, undeclared_keys

    outside = undeclared_keys(method, edit.keys)
    if outside:
        raise ConfigError(f"method {method!r} changes only {', '.join(declared_components(method))}, but this run "
                          f"changed {outside[0]!r}: choose options (e.g. `param_set`) within those components")
    return edit


def _supporting(family: str) -> list[str]:
    """The built-in methods that support ``family`` (each is imported to read its registration)."""
    found = []
    for name in sorted(set(_MODULES) | set(_REGISTRY)):
        try:
            if family in supported_families(name):
                found.append(name)
        except ImportError:   # a method whose optional dependencies are missing
            continue
    return found
