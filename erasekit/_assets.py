"""The weights that ship inside the package (``erasekit/assets/``): canvas-mini, its judge, its CLIP, and
canvas-mini-mmdit (the same world on an SD 3 transformer).

They are package data, so a built wheel carries them and an editable install reads them from the
source tree; :func:`asset_path` finds them with :mod:`importlib.resources` wherever erasekit is
installed, and hands back a real folder because diffusers and safetensors read from paths.
"""

from __future__ import annotations

import atexit
import json
from contextlib import ExitStack
from importlib import resources
from pathlib import Path

from .errors import ModelLoadError

ASSETS = ("canvas-mini", "canvas-judge", "canvas-clip", "canvas-mini-mmdit")
_EXTRACTED = ExitStack()  # folders unpacked from a zipped install, removed at exit
atexit.register(_EXTRACTED.close)


def asset_path(name: str, must_exist: bool = True) -> Path:
    """The folder of the shipped asset ``name`` (one of :data:`ASSETS`) on the file system.

    With ``must_exist`` a missing folder raises :class:`ModelLoadError` that says how to get it.
    """
    if name not in ASSETS:
        raise ModelLoadError(f"unknown asset {name!r}; erasekit ships {', '.join(ASSETS)}")
    ref = resources.files("erasekit") / "assets" / name
    path = ref if isinstance(ref, Path) else _EXTRACTED.enter_context(resources.as_file(ref))
    if must_exist and not path.is_dir():
        raise ModelLoadError(f"the shipped asset {name!r} is missing from {path}: this erasekit was built "
                             "without its package data; reinstall it from a wheel or a full checkout "
                             "(pip install erasekit, or pip install -e . in the repository)")
    return Path(path)


def read_weights(name: str, what: str, path: str | Path | None, train: str) -> tuple[dict, dict, Path]:
    """``(state dict, config.json, folder)`` of a small network: the shipped asset ``name`` unless
    ``path`` names a trained one; a folder without both files is a :class:`ConfigError` that names
    the network (``what``) and ``train``, the command that makes one."""
    from safetensors.torch import load_file

    from .errors import ConfigError

    path = Path(path) if path is not None else asset_path(name, must_exist=False)
    if not (path / "model.safetensors").exists() or not (path / "config.json").exists():
        raise ConfigError(f"no {what} at {path} (model.safetensors + config.json): it ships inside erasekit "
                          f"(erasekit/assets/{name}), or train one with `{train}`")
    return load_file(str(path / "model.safetensors")), json.loads((path / "config.json").read_text()), path
