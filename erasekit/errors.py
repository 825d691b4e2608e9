"""The one exception family of erasekit: every user-facing failure says what is wrong and how to fix it."""

from __future__ import annotations


class ErasekitError(Exception):
    """Base class of erasekit's errors; the CLI prints these as one line (traceback only with --debug)."""


class ConfigError(ErasekitError, ValueError):
    """A bad option value or combination (names the option, the expected and the actual value)."""


class ModelLoadError(ErasekitError):
    """A base model could not be found or loaded."""


class EditError(ErasekitError):
    """An Edit file is corrupt, incomplete, or was made for another base model."""


class MissingExtraError(ErasekitError, ImportError):
    """An optional dependency is missing; the message gives the pip command."""


class TrainingError(ErasekitError):
    """A training run failed (e.g. a non-finite loss); the last good checkpoint is kept."""


class DegenerateOutputError(ErasekitError):
    """The model made non-finite latents or images, or flat single-colour images: it is broken, so its
    outputs cannot be judged and nothing about erasure can be concluded from them."""


class OutputWriteError(ErasekitError, OSError):
    """A result file could not be written (no space, no permission, a file where a folder should be);
    any previous file at that path is left as it was."""


def require(module: str, extra: str):
    """Import an optional dependency or raise :class:`MissingExtraError` with the install command."""
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise MissingExtraError(
            f"{module} is not installed; install it with: pip install 'erasekit[{extra}]'") from e
