"""Loading a base model by name (``canvas-mini``), local diffusers directory, or hub id."""

from __future__ import annotations

import os
from pathlib import Path

import torch

from .._assets import asset_path
from ..errors import ConfigError, ModelLoadError

BUILTIN = ("canvas-mini", "canvas-mini-mmdit")  # shipped inside the package (erasekit/assets/)
_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16, "fp16": torch.float16,
           "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}


def resolve_dtype(dtype: str | torch.dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    try:
        return _DTYPES[str(dtype).lower()]
    except KeyError:
        raise ConfigError(f"dtype must be one of {sorted(_DTYPES)} but is {dtype!r}") from None


def builtin_path(name: str) -> Path:
    path = asset_path(name, must_exist=False)
    if not (path / "model_index.json").exists():
        raise ModelLoadError(f"the built-in model {name!r} is missing from {path}; reinstall erasekit "
                             "(its wheel carries the weights in erasekit/assets/)")
    return path


def _has_safety_checker(folder: Path) -> bool:
    """Whether the pipeline class saved in ``folder`` takes a safety checker (its model_index.json names one)."""
    import json

    try:
        return "safety_checker" in json.loads((folder / "model_index.json").read_text())
    except (OSError, ValueError):
        return True   # unreadable: from_pretrained reports it


def _absent_components(folder: Path) -> dict:
    """``{name: None}`` for each component that ``folder``'s model_index.json records as absent (``[null, null]``),
    such as the T5 of an SD 3 folder saved without it: diffusers loads a pipeline only when every component of
    its class is there or passed."""
    import json

    try:
        index = json.loads((folder / "model_index.json").read_text())
    except (OSError, ValueError):
        return {}
    return {k: None for k, v in index.items() if isinstance(v, list) and len(v) == 2 and v[0] is None and v[1] is None}


def load_pipeline(name_or_path: str | os.PathLike = "canvas-mini", dtype: str | torch.dtype = "float32",
                  device: str | torch.device = "cpu"):
    """Load a Stable Diffusion pipeline (SD 1.x, SD 2.x, SDXL, SD 3 / 3.5, Flux or ``canvas-mini``).

    Args:
        name_or_path: ``"canvas-mini"`` or ``"canvas-mini-mmdit"`` (built in, offline; the second is an
            SD 3 pipeline), a local diffusers directory (with
            ``model_index.json``), or a Hugging Face hub id such as ``"CompVis/stable-diffusion-v1-4"``.
        dtype: weights dtype (``float32``, ``float16``, ``bfloat16``).
        device: where to put the pipeline.

    The safety checker is disabled (it blacks out images and fakes low nudity rates; metrics.md).
    A folder written by ``Edit.merge`` is recognised as already edited; one holding SFD's one-step
    generator loads as its :class:`~erasekit.pipelines.OneStepPipeline`.

    Example:
        >>> import erasekit
        >>> pipe = erasekit.load_pipeline("canvas-mini")
        >>> type(pipe).__name__
        'StableDiffusionPipeline'
    """
    from diffusers import DiffusionPipeline

    dtype = resolve_dtype(dtype)
    name = str(name_or_path)
    if name in BUILTIN:
        source, local = builtin_path(name), True
    elif Path(name).exists():
        source, local = Path(name), True
        if not (source / "model_index.json").exists():
            raise ModelLoadError(f"{source} is not a diffusers pipeline directory (no model_index.json); "
                                 "point at the folder written by save_pretrained, or use 'canvas-mini'")
    elif name.count("/") == 1 and not name.startswith((".", "/")):
        source, local = name, False
    else:
        raise ModelLoadError(f"unknown model {name!r}: use 'canvas-mini', a local diffusers directory, "
                             "or a hub id like 'CompVis/stable-diffusion-v1-4'")
    kwargs = {"dtype": dtype}  # diffusers >= 0.40 (torch_dtype is deprecated there)
    checker = {"safety_checker": None, "requires_safety_checker": False}
    if local and not _has_safety_checker(source):   # SDXL, SD 3, Flux: no checker to switch off
        checker = {}
    if local:
        checker = {**_absent_components(source), **checker}
    try:
        pipe = DiffusionPipeline.from_pretrained(source, local_files_only=local, **checker, **kwargs)
    except TypeError:  # pipelines without a safety checker argument (SDXL)
        pipe = DiffusionPipeline.from_pretrained(source, local_files_only=local, **kwargs)
    except (OSError, ValueError) as e:
        if local:
            raise ModelLoadError(f"could not load the pipeline at {source}: {e}") from None
        raise ModelLoadError(
            f"could not load {name!r} from the Hugging Face hub ({type(e).__name__}). Offline? Download it "
            "where the hub is reachable (huggingface-cli download), then pass the local directory") from None
    pipe.set_progress_bar_config(disable=True)
    pipe = pipe.to(device)
    if local:   # a folder written by Edit.merge: tagged, so erasekit's checks say it is edited already
        from .merged import from_merged_folder

        pipe = from_merged_folder(pipe, source)
    return pipe
