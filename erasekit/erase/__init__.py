"""Erasure methods: UCE, RECE (closed form), ESD, SalUn, AdvUnlearn, SFD (fine-tuning).

Each lives in its own module as a ``<Method>Config`` dataclass plus a registered function; use
:func:`erase` to run one by name.
"""

import sys
import types

from .registry import MethodConfig, erase, get_method, methods, register

__all__ = ["MethodConfig", "erase", "get_method", "methods", "register"]


class _CallableModule(types.ModuleType):
    """``erasekit.erase`` names both this package and the :func:`erase` function; importing a method
    module (``erasekit.erase.uce``) first binds the package to that name, so the package forwards calls."""

    def __call__(self, *args, **kwargs):
        return erase(*args, **kwargs)


sys.modules[__name__].__class__ = _CallableModule
