"""The subcommands of ``erasekit``: one function each, ``cmd_NAME(args, out) -> exit code``.

Each reads its parsed arguments, calls the Python API and hands the result to :class:`Output`;
the parser and the error handling live in :mod:`erasekit.cli.main`.
"""

from __future__ import annotations

import sys
from pathlib import Path

from ..errors import ConfigError
from .options import Output, describe_options, format_scores, load_judge, parse_options, quiet_loading, \
    resolve_device

EXIT_OK, EXIT_FAILURE = 0, 1


def _load_pipe(args, out: Output, edit_manifest: dict | None = None):
    from ..pipelines.loading import load_pipeline

    model = args.model or (edit_manifest or {}).get("base_model") or "canvas-mini"
    out.info(f"loading {model} ...")
    with quiet_loading():
        return load_pipeline(model, dtype=args.dtype, device=resolve_device(args.device)), model


def _load_edit(path: str | None):
    """Read and validate an Edit file before any model is loaded (a missing file fails fast)."""
    if path is None:
        return None
    from ..pipelines.edit import Edit

    return Edit.load(path)


def _mib(n: int) -> str:
    return f"{n / 2**20:.2f} MiB" if n >= 2**20 else f"{n / 1024:.1f} KiB"


def cmd_erase(args, out: Output) -> int:
    from ..erase.registry import erase, get_method, make_config, normalize_concepts

    config_cls, _ = get_method(args.method)
    concepts = normalize_concepts(args.concept)
    options = parse_options(args.option, config_cls)
    if "progress" in {f[0] for f in config_cls.options()}:
        options.setdefault("progress", out.progress)
    config = make_config(config_cls, options)
    path = Path(args.out or f"{args.method}-{'_'.join(c.replace(' ', '_') for c in concepts)}.safetensors")
    if path.exists() and not args.overwrite:
        raise ConfigError(f"{path} already exists: choose another --out or pass --overwrite")
    pipe, model = _load_pipe(args, out)
    out.info(f"erasing {', '.join(concepts)} with {args.method} ...")
    edit = erase(pipe, args.method, concepts, config=config)
    edit.manifest["base_model"] = model
    edit.save(path)
    m = edit.manifest
    data = {"edit": str(path), "method": m["method"], "concepts": m["concepts"], "base_model": model,
            "tensors": len(edit.keys), "low_rank": len(edit.deltas), "bytes": edit.nbytes(),
            "wall_time_s": m.get("wall_time_s"), "peak_memory_bytes": m.get("peak_memory_bytes"),
            "config": m.get("config")}
    out.result(data, [
        f"erased {', '.join(concepts)} from {model} with {m['method']} in {m.get('wall_time_s', 0):.1f} s",
        f"  changed {len(edit.keys)} tensors ({len(edit.deltas)} stored as exact low-rank factors), "
        f"{_mib(edit.nbytes())}; peak memory {_mib(m.get('peak_memory_bytes') or 0)}",
        f"  wrote {path}", f"  next: erasekit attack --edit {path}   or   erasekit eval --edit {path}"])
    return EXIT_OK


def _prompts(args) -> list[str]:
    prompts = list(args.prompt or [])
    if args.prompts_file:
        f = Path(args.prompts_file)
        if not f.is_file():
            raise ConfigError(f"--prompts-file {f} does not exist: give a text file with one prompt per line")
        prompts += [line.strip() for line in f.read_text().splitlines() if line.strip()]
    return prompts


def _concept(args, edit) -> str:
    concept = args.concept if args.concept is not None else (
        (edit.manifest.get("concepts") or [None])[0] if edit is not None else None)
    if concept is None or not str(concept).strip():
        raise ConfigError("no concept to attack: pass --concept NAME (e.g. --concept Van_Gogh)")
    return str(concept).strip()


def cmd_attack(args, out: Output) -> int:
    edit = _load_edit(args.edit)
    concept = _concept(args, edit)
    prompts = _prompts(args)
    if not prompts:
        raise ConfigError("no prompts to attack: pass --prompt TEXT (repeatable) or --prompts-file FILE")
    from ..attacks import attack, get_attack

    options = parse_options(args.option, get_attack(args.attack)[0])
    pipe, _ = _load_pipe(args, out, edit.manifest if edit else None)
    if edit is not None:
        edit.check(pipe)
    judge = load_judge(args.judge)
    judge.find(concept)
    out.info(f"attacking {concept!r} on {len(prompts)} prompt(s) with {args.attack} ...")
    result = attack(pipe, prompts, concept, judge=judge, method=args.attack, seeds=args.seed, edit=edit,
                    progress=out.progress, **options)
    folder = Path(args.out)
    files = [result.save(folder / "attack.json"), result.save(folder / "attack.csv")]
    data = {"out": str(folder), "files": [str(p) for p in files], **result.summary(),
            "adv_prompts": [p.adv_prompt for p in result.prompts]}
    lines = [str(result)] + [f"  {'broken' if p.success else 'held  '}  {p.prompt!r} -> {p.adv_prompt!r}"
                             for p in result.prompts]
    out.result(data, lines + [f"wrote {files[0]} and {files[1]}"])
    return EXIT_OK


def cmd_eval(args, out: Output) -> int:
    from ..eval import evaluate

    edit = _load_edit(args.edit)
    pipe, _ = _load_pipe(args, out, edit.manifest if edit else None)
    if edit is not None:
        edit.check(pipe)
    judge = load_judge(args.judge)
    targets = args.target or (edit.manifest.get("concepts") if edit is not None else None)
    out.info(f"evaluating ({args.protocol}) ...")
    report = evaluate(pipe, edit=edit, protocol=args.protocol, targets=targets, judge=judge,
                      out_dir=Path(args.out), progress=out.progress, edit_path=args.edit)
    summary = report.summary() if callable(getattr(report, "summary", None)) else {}
    out.result({"out": str(args.out), **summary},
               [f"evaluation ({args.protocol}): " + format_scores(summary), f"  wrote {args.out}"])
    return EXIT_OK


def cmd_demo(args, out: Output) -> int:
    from .demo import run_demo

    summary = run_demo(out_dir=Path(args.out), concept=args.concept, method=args.method, model=args.model,
                       device=resolve_device(args.device), dtype=args.dtype, output=out, n_prompts=args.prompts)
    out.result(summary, summary.pop("_lines", []))
    return EXIT_OK


def cmd_preview(args, out: Output) -> int:
    from ..preview.app import launch

    launch(host=args.host, port=args.port, model=args.model or "canvas-mini", edit=args.edit,
           report=args.report, quiet=out.quiet)
    return EXIT_OK


def cmd_bench(args, out: Output) -> int:
    import subprocess

    root = Path(__file__).resolve().parents[2] / "benchmarks"
    scripts = sorted(p for p in root.glob("*.py") if not p.name.startswith("_")) if root.is_dir() else []
    if not scripts:
        raise ConfigError(f"no benchmarks found in {root}: run `erasekit bench` from a full checkout")
    names = dict(sorted((p.stem.removeprefix("bench_"), p) for p in scripts))
    args.name = [n.removeprefix("bench_") for n in args.name]
    unknown = [n for n in args.name if n not in names]
    if unknown:
        raise ConfigError(f"unknown benchmark {unknown[0]!r}; choose from: {', '.join(names)}")
    if args.list:
        out.result({"benchmarks": list(names)}, list(names))
        return EXIT_OK
    codes = {}
    default = [n for n, path in names.items() if path.name.startswith("bench_")]  # the others need arguments
    for name in args.name or default:
        out.info(f"== benchmark {name} ==")
        codes[name] = subprocess.call([sys.executable, str(names[name]), *args.extra])
    failed = [n for n, c in codes.items() if c != 0]
    out.result({"returncodes": codes}, [f"{n}: {'ok' if c == 0 else f'failed ({c})'}" for n, c in codes.items()])
    return EXIT_FAILURE if failed else EXIT_OK


def cmd_methods(args, out: Output) -> int:
    from ..erase.registry import _MODULES, get_method

    names = [args.name] if args.name else sorted(_MODULES)
    data, lines = {}, []
    for name in names:
        try:
            config_cls, fn = get_method(name)
        except ImportError as e:  # a method whose optional pieces are missing stays listed, with why
            data[name] = {"available": False, "reason": str(e)}
            lines.append(f"{name}: not available ({e})")
            continue
        doc = (fn.__doc__ or config_cls.__doc__ or "").strip().splitlines()
        data[name] = {"available": True, "summary": doc[0] if doc else "",
                      "options": [{"name": n, "default": d, "help": h} for n, d, h in config_cls.options()]}
        lines += [f"{name}: {data[name]['summary']}"] + [f"    {s}" for s in describe_options(config_cls)]
    out.result({"methods": data}, lines)
    return EXIT_OK


def cmd_env(args, out: Output) -> int:
    import importlib.metadata as md
    import platform

    from .. import __version__

    data = {"erasekit": __version__, "python": platform.python_version(), "platform": platform.platform()}
    for pkg in ("torch", "diffusers", "transformers", "accelerate", "open-clip-torch", "torchmetrics",
                "safetensors", "gradio", "nudenet", "playwright", "scipy"):
        try:
            data[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            data[pkg] = None
    import torch

    data["cuda"] = torch.version.cuda if torch.cuda.is_available() else None
    data["gpus"] = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    assets = Path(__file__).resolve().parents[2] / "assets"
    data["assets"] = {n: (assets / n).is_dir() for n in ("canvas-mini", "canvas-judge")}
    out.result(data, [f"{k}: {'-' if v is None else v}" for k, v in data.items()])
    return EXIT_OK
