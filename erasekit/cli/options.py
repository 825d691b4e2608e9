"""Shared pieces of the CLI: typed ``--option key=value`` parsing, output, and model/judge loading.

Method and attack options are never declared twice: their names, types, defaults and help text are
read from the config dataclass the Python API uses (``MethodConfig.options()`` and its fields).
"""

from __future__ import annotations

import dataclasses
import json
import math
import sys
import typing
from contextlib import contextmanager
from pathlib import Path

from ..errors import ConfigError

_TRUE, _FALSE = {"1", "true", "yes", "on"}, {"0", "false", "no", "off"}


def _convert(raw: str, tp, name: str):
    """Turn the text ``raw`` into a value of type ``tp`` (a resolved annotation)."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, getattr(__import__("types"), "UnionType", None)):
        if raw.lower() in ("none", "null") and type(None) in args:
            return None
        choices = [a for a in args if a is not type(None)]
        if raw.startswith("["):  # a JSON list goes to the list member of the union first
            choices.sort(key=lambda a: typing.get_origin(a) not in (list, tuple))
        for arg in choices:
            try:
                return _convert(raw, arg, name)
            except ConfigError:
                continue
        raise ConfigError(f"option `{name}` must be a {_type_name(tp)} but is {raw!r}")
    if origin in (list, tuple):
        item = args[0] if args else str
        if raw.startswith("["):   # JSON: ["a, b", "c"] keeps commas inside items
            try:
                items = json.loads(raw)
            except ValueError:
                raise ConfigError(f"option `{name}` looks like a JSON list but does not parse: {raw!r}") from None
            values = [_convert(str(v), item, name) for v in items]
        else:
            values = [_convert(v.strip(), item, name) for v in raw.split(",") if v.strip()]
        return values if origin is list else tuple(values)
    if origin is typing.Literal:
        if raw not in [str(a) for a in args]:
            raise ConfigError(f"option `{name}` must be one of {', '.join(map(str, args))} but is {raw!r}")
        return next(a for a in args if str(a) == raw)
    try:
        if tp is bool:
            if raw.lower() not in _TRUE | _FALSE:
                raise ValueError
            return raw.lower() in _TRUE
        if tp in (int, float, str):
            value = tp(raw)
    except ValueError:
        raise ConfigError(f"option `{name}` must be a {_type_name(tp)} but is {raw!r}") from None
    if tp in (int, float, str):
        if tp is float and not math.isfinite(value):   # nan and inf parse, but no option means them
            raise ConfigError(f"option `{name}` must be a finite number but is {raw!r}")
        return value
    try:  # anything else (dicts, unannotated): JSON if it parses, else the text itself
        return json.loads(raw)
    except ValueError:
        return raw


def _type_name(tp) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def field_types(config_cls) -> dict[str, object]:
    """Resolved annotation of each dataclass field (falls back to the default's type)."""
    try:
        hints = typing.get_type_hints(config_cls)
    except Exception:  # unresolvable forward references: use the defaults' types
        hints = {}
    out = {}
    for f in dataclasses.fields(config_cls):
        default = None if f.default is dataclasses.MISSING else f.default
        out[f.name] = hints.get(f.name, type(default) if default is not None else object)
    return out


def parse_options(pairs: list[str] | None, config_cls=None) -> dict:
    """``["steps=20", "guide=art"]`` -> ``{"steps": 20, "guide": "art"}``, typed by ``config_cls``'s fields."""
    types = field_types(config_cls) if config_cls is not None else {}
    out = {}
    for pair in pairs or []:
        key, sep, raw = pair.partition("=")
        key = key.strip().replace("-", "_")
        if not sep or not key:
            raise ConfigError(f"--option must look like key=value but is {pair!r}, e.g. --option steps=20")
        if config_cls is not None and key not in types:
            raise ConfigError(f"{config_cls.__name__} has no option {key!r}; valid options: "
                              f"{', '.join(sorted(types))} (see `erasekit methods`)")
        out[key] = _convert(raw.strip(), types.get(key, object), key)
    return out


def describe_options(config_cls) -> list[str]:
    """One help line per option of a config class: ``name (default): help``."""
    return [f"{name} (default {default!r}): {help_ or 'no help text'}"
            for name, default, help_ in config_cls.options()]


def format_scores(summary: dict) -> str:
    """``UA 60.0 [41.2, 77.3], IRA 98.9 [97.6, 100.0], ...`` from a report's headline numbers, each
    rate with its 95 % interval (the ``<key>_ci`` sibling) where the report has one."""
    def one(k, v):
        ci = summary.get(f"{k}_ci")
        text = f"{k} {v:.1f}" if isinstance(v, float) else f"{k} {v}"
        return text + (f" [{ci['low']:.1f}, {ci['high']:.1f}]" if isinstance(ci, dict) and "low" in ci else "")

    return ", ".join(one(k, v) for k, v in summary.items() if isinstance(v, (int, float)) and not isinstance(v, bool))


class Output:
    """Where a command's results go: a human summary, a JSON object (``--json``), or nothing (``--quiet``)."""

    def __init__(self, quiet: bool = False, as_json: bool = False, stream=None):
        self.quiet, self.as_json = quiet, as_json
        self.stream = stream or sys.stdout

    @property
    def progress(self) -> bool:
        return not self.quiet

    def info(self, message: str) -> None:
        """A step of work being started (stderr, so stdout stays the result)."""
        if not self.quiet and not self.as_json:
            print(message, file=sys.stderr, flush=True)

    def result(self, data: dict, lines: list[str]) -> None:
        if self.as_json:
            print(json.dumps(data, indent=2, default=str), file=self.stream)
        elif not self.quiet:
            print("\n".join(lines), file=self.stream)


@contextmanager
def quiet_loading():
    """Hide diffusers'/transformers' per-file loading bars (the CLI says what it loads in one line)."""
    from diffusers.utils import logging as dlog
    from transformers.utils import logging as tlog

    was = dlog.is_progress_bar_enabled(), tlog.is_progress_bar_enabled()
    dlog.disable_progress_bar()
    tlog.disable_progress_bar()
    try:
        yield
    finally:
        if was[0]:
            dlog.enable_progress_bar()
        if was[1]:
            tlog.enable_progress_bar()


def resolve_device(device: str) -> str:
    """``auto`` -> ``cuda`` if available, else ``cpu``; any other name must be a device this machine has."""
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        dev = torch.device(device)
    except (RuntimeError, ValueError):
        raise ConfigError(f"--device must be auto, cpu, cuda or cuda:N but is {device!r}") from None
    if dev.type == "cuda":
        n = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if n == 0 or (dev.index or 0) >= n:
            raise ConfigError(f"--device {device} is not on this machine ({n} CUDA GPU(s) found): use "
                              + ("--device cpu" if n == 0 else f"cuda:0 .. cuda:{n - 1}"))
    if dev.type == "mps" and not torch.backends.mps.is_available():
        raise ConfigError(f"--device {device} is not available on this machine: use --device cpu")
    return device


def load_judge(name: str):
    """``canvas`` (canvas-mini's style/object judge), ``nudenet[:preset or threshold]``, or a canvas-judge directory."""
    from ..eval import judges

    if name == "canvas":
        return judges.CanvasJudge.load()
    if name == "nudenet" or name.startswith("nudenet:"):   # nudenet:strict (a preset) or nudenet:0.45 (threshold)
        arg = name.partition(":")[2]
        if not arg:
            return judges.NudeNetJudge()
        if arg in judges.NUDENET_PRESETS:
            return judges.NudeNetJudge(arg)
        try:
            return judges.NudeNetJudge(threshold=float(arg))
        except ValueError:
            raise ConfigError(f"--judge {name}: after 'nudenet:' give a preset ({', '.join(judges.NUDENET_PRESETS)}) "
                              "or a threshold such as 0.45") from None
    if Path(name).is_dir():
        return judges.CanvasJudge.load(name)
    raise ConfigError(f"--judge must be 'canvas', 'nudenet' or a judge directory but is {name!r}")
