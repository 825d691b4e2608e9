"""Erasure methods: UCE, RECE (closed form), ESD, SalUn, AdvUnlearn, SFD (fine-tuning).

Each lives in its own module as a ``<Method>Config`` dataclass plus a registered function; use
:func:`erase` to run one by name.
"""

from .registry import MethodConfig, erase, get_method, methods, register

__all__ = ["MethodConfig", "erase", "get_method", "methods", "register"]
