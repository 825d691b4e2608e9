"""The config base that erasure methods and attacks share: a dataclass whose fields carry their help.

A method or attack config subclasses :class:`MethodConfig`, declares its options as dataclass
fields with ``metadata={"help": ...}`` and validates them in ``validate`` with :func:`check`; the
CLI's ``--help`` and ``erasekit methods`` read the same metadata through :meth:`MethodConfig.options`.
It sits below ``erase`` and ``attacks`` so that neither imports the other for it.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, fields

from .errors import ConfigError


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


def make_config(config_cls: type[MethodConfig], options: dict) -> MethodConfig:
    """``config_cls(**options)``, refusing an unknown option with the list of valid ones."""
    valid = {f.name for f in fields(config_cls)}
    unknown = sorted(set(options) - valid)
    if unknown:
        raise ConfigError(f"{config_cls.__name__} has no option {unknown[0]!r}; valid options: "
                          f"{', '.join(sorted(valid))}")
    return config_cls(**options)
