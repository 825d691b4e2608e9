"""erasekit: concept erasure for text-to-image diffusion models, with attacks and evaluation.

Heavy modules load lazily: ``import erasekit`` imports no torch model code, gradio, nudenet or
open_clip. The top-level API::

    pipe = erasekit.load_pipeline("canvas-mini")
    edit = erasekit.erase(pipe, "rece", ["Van Gogh"])
    with edit.applied(pipe):
        ...
"""

from __future__ import annotations

__version__ = "0.1.0"

_LAZY = {
    "load_pipeline": ("erasekit.pipelines.loading", "load_pipeline"),
    "generate": ("erasekit.pipelines.generation", "generate"),
    "Sampling": ("erasekit.pipelines.generation", "Sampling"),
    "Edit": ("erasekit.pipelines.edit", "Edit"),
    "erase": ("erasekit.erase.registry", "erase"),
    "methods": ("erasekit.erase.registry", "methods"),
    "attack": ("erasekit.attacks", "attack"),
    "evaluate": ("erasekit.eval", "evaluate"),
    "ErasekitError": ("erasekit.errors", "ErasekitError"),
}

__all__ = ["__version__", *_LAZY]


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        module, attr = _LAZY[name]
        value = getattr(importlib.import_module(module), attr)
        if name == "Edit":   # a loaded inference-time Edit (SLD, SAFREE) finds its method's sampler
            from .erase.registry import get_method
            from .pipelines.inference import add_resolver

            add_resolver(get_method)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'erasekit' has no attribute {name!r}")


def __dir__():
    return sorted(__all__)
