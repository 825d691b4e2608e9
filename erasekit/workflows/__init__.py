"""Workflows that combine erasing and evaluating: sequential unlearning (:func:`sequential`).

They sit above :mod:`erasekit.erase` and :mod:`erasekit.eval`, which do not import each other.
"""

from __future__ import annotations

__all__ = ["sequential"]


def __getattr__(name: str):
    if name == "sequential":
        from .sequential_unlearning import sequential

        globals()[name] = sequential
        return sequential
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
