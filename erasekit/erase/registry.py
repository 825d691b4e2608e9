"""Methods registered by name: a config dataclass plus one function ``(pipe, concepts, config) -> Edit``.

``erase(pipe, "uce", ["Van Gogh"], guide="art")`` looks the method up, builds and validates its
config from the keyword arguments (an unknown option is an error that lists the valid ones),
measures wall time and peak memory, and records everything in the Edit's manifest. Methods leave
the pipeline's weights as they found them, on success and on error; the Edit is applied by the
caller.
"""

from __future__ import annotations

import dataclasses
import importlib
from dataclasses import dataclass, fields
from typing import Callable

from ..errors import ConfigError

_REGISTRY: dict[str, tuple[type, Callable]] = {}
# Methods live in their own modules, imported on first use so `import erasekit` stays light.
_MODULES = {"uce": "uce", "rece": "rece", "esd": "esd", "salun": "salun", "advunlearn": "advunlearn",
            "sfd": "sfd"}


@dataclass
class MethodConfig:
    """Base of every method's config. Fields carry their help text in ``metadata["help"]``."""

    def __post_init__(self):
        self.validate()

    def validate(self) -> None:
        """Raise :class:`ConfigError` naming the field on a bad value (override in subclasses)."""

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def options(cls) -> list[tuple[str, object, str]]:
        """(name, default, help) of every option, for ``erasekit methods`` and ``--help``."""
        out = []
        for f in fields(cls):
            default = f.default if f.default is not dataclasses.MISSING else (
                f.default_factory() if f.default_factory is not dataclasses.MISSING else None)
            out.append((f.name, default, f.metadata.get("help", "")))
        return out


def check(cond: bool, message: str) -> None:
    """Raise :class:`ConfigError` with ``message`` unless ``cond``."""
    if not cond:
        raise ConfigError(message)


def register(name: str, config_cls: type[MethodConfig]):
    """Decorator: register ``fn(pipe, concepts, config) -> Edit`` under ``name``."""

    def deco(fn: Callable) -> Callable:
        _REGISTRY[name] = (config_cls, fn)
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


def methods() -> dict[str, type[MethodConfig]]:
    """Every available method name with its config class."""
    return {name: get_method(name)[0] for name in sorted(_MODULES)}


def make_config(config_cls: type[MethodConfig], options: dict) -> MethodConfig:
    valid = {f.name for f in fields(config_cls)}
    unknown = sorted(set(options) - valid)
    if unknown:
        raise ConfigError(f"{config_cls.__name__} has no option {unknown[0]!r}; valid options: "
                          f"{', '.join(sorted(valid))}")
    return config_cls(**options)


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
        method: ``uce``, ``rece``, ``esd``, ``salun``, ``advunlearn`` or ``sfd``.
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
    with measure(pipe.unet.device) as usage:
        edit = fn(pipe, concepts, config)
    from ..pipelines.family import detect_family

    edit.manifest.update({
        "method": method.lower(), "concepts": concepts, "config": config.to_dict(),
        "family": detect_family(pipe), "wall_time_s": round(usage.wall_time_s, 4),
        "peak_memory_bytes": usage.peak_memory_bytes, "memory_kind": usage.memory_kind,
        "dtype": str(pipe.unet.dtype).replace("torch.", ""),
    })
    return edit
