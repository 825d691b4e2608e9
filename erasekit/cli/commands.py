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


def _load_edit(path: str | None, unsafe_skip_base_check: bool = False):
    """Read and validate an Edit file before any model is loaded, so a bad file fails fast (exit 2).

    The method the file names is looked up first, so the components it declares are enforced.
    """
    if path is None:
        return None
    from ..erase.registry import _MODULES, get_method
    from ..errors import EditError
    from ..pipelines.edit import Edit

    edit = Edit.load(path, unsafe_skip_base_check=unsafe_skip_base_check)
    method = edit.manifest.get("method")
    if isinstance(method, str) and method.lower() in _MODULES:
        try:
            get_method(method)   # importing the method declares its components
        except ImportError:      # its optional dependencies are missing: it declares nothing here
            pass
        try:
            edit.validate()
        except EditError as e:
            raise EditError(f"{path}: {e}") from None
    return edit


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
    _check_outputs([path], args.overwrite)  # before the model is loaded and trained
    pipe, model = _load_pipe(args, out)
    from ..pipelines.merged import already_edited

    edited = already_edited(pipe)
    if edited:
        out.info(f"note: {edited}; the new Edit is made for this folder (its manifest records that), not for the "
                 "original base model")
    out.info(f"erasing {', '.join(concepts)} with {args.method} ...")
    edit = erase(pipe, args.method, concepts, config=config)
    edit.manifest["base_model"] = model
    edit.save(path)
    m = edit.manifest
    data = {"edit": str(path), "method": m["method"], "concepts": m["concepts"], "base_model": model,
            "tensors": len(edit.keys), "low_rank": len(edit.deltas), "bytes": edit.nbytes(),
            "wall_time_s": m.get("wall_time_s"), "peak_memory_bytes": m.get("peak_memory_bytes"),
            "config": m.get("config"), "kind": m.get("kind"), "preset": m.get("preset")}
    preset = m.get("preset") or {}
    out.result(data, [
        f"erased {', '.join(concepts)} from {model} with {m['method']} in {m.get('wall_time_s', 0):.1f} s",
        f"  kind {m.get('kind')} ({'guessed; set -o kind=... to choose' if m.get('kind_guessed') else 'given'}), "
        f"preset {preset.get('provider')}/{preset.get('name')} (every value in the Edit's manifest)",
        (f"  inference-time: no weights change; attack, eval and edit.sampled(pipe) sample with {m['method']}"
         if edit.inference_time else
         f"  changed {len(edit.keys)} tensors ({len(edit.deltas)} stored as exact low-rank factors), "
         f"{_mib(edit.nbytes())}; peak memory {_mib(m.get('peak_memory_bytes') or 0)}"),
        f"  wrote {path}", f"  next: erasekit attack --edit {path}   or   erasekit eval --edit {path}"])
    return EXIT_OK


N_DEFAULT_PROMPTS = 4  # canvas captions per concept attacked when no prompt is given


def _check_outputs(paths: list[Path], overwrite: bool) -> None:
    """Before any work: refuse to replace existing results without --overwrite, and probe that each
    file can be written (its files are then replaced atomically, a failed write leaving the old one)."""
    from .._io import check_writable

    existing = [p for p in paths if p.exists()]
    if existing and not overwrite:
        raise ConfigError(f"{existing[0]} already exists: pass --overwrite to replace it, or choose another --out")
    for path in paths:
        check_writable(path)


def _prompts(args) -> tuple[list[str], list[str | None]]:
    """The prompts of --prompt and --prompts-file, and the concept each line of the file gives
    (``CONCEPT<TAB>PROMPT``), None where none is given."""
    prompts = list(args.prompt or [])
    concepts: list[str | None] = [None] * len(prompts)
    if args.prompts_file:
        f = Path(args.prompts_file)
        if not f.is_file():
            raise ConfigError(f"--prompts-file {f} does not exist: give a text file with one prompt per line "
                              "(or 'CONCEPT<TAB>PROMPT' per line)")
        try:
            text = f.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise ConfigError(f"--prompts-file {f} cannot be read as UTF-8 text ({type(e).__name__}): give a text "
                              "file with one prompt per line") from None
        for line in text.splitlines():
            concept, tab, prompt = line.partition("\t")
            if not line.strip():
                continue
            if tab and not (concept.strip() and prompt.strip()):
                raise ConfigError(f"--prompts-file line {line!r} has a tab but not 'CONCEPT<TAB>PROMPT': give both")
            prompts.append((prompt if tab else line).strip())
            concepts.append(concept.strip() if tab else None)
    return prompts, concepts


def _default_prompts(args, edit) -> tuple[list[str], list[str]]:
    """Canvas captions of each concept (--concept, else the Edit's) when no prompt is given."""
    from ..canvas.world import OBJECTS, STYLES, caption, check_label

    names = list(args.concept or []) or list((edit.manifest.get("concepts") or []) if edit is not None else [])
    how = "pass --prompt TEXT (repeatable) or --prompts-file FILE"
    if not names:
        raise ConfigError(f"no prompts to attack: {how}")
    prompts, concepts = [], []
    for name in names:
        found = None
        for labels, kind in ((STYLES, "style"), (OBJECTS, "object")):
            try:
                found = kind, labels[check_label(name, labels, kind)]
                break
            except ValueError:
                continue
        if found is None or args.judge != "canvas":
            raise ConfigError(f"no prompts to attack: {how} (default prompts exist only for canvas-mini's styles and "
                              f"objects with --judge canvas, and {name!r} is not one of them)")
        kind, label = found
        made = [caption(o, label) for o in OBJECTS[:N_DEFAULT_PROMPTS]] if kind == "style" else \
            [caption(label, s) for s in STYLES[:N_DEFAULT_PROMPTS]]
        prompts += made
        concepts += [label] * len(made)
    return prompts, concepts


def _attack_concepts(args, prompts: list[str], from_file: list[str | None]) -> list[str | None]:
    """Each prompt's concept: its file line's, else --concept (once for all, or once per prompt),
    else None (the attack infers it from the Edit's concepts)."""
    given = [c.strip() for c in (args.concept or [])]
    if len(given) not in (0, 1, len(prompts)):
        raise ConfigError(f"--concept is given {len(given)} times for {len(prompts)} prompts: give it once for every "
                          "prompt, or once per prompt in order")
    default = given if len(given) == len(prompts) and len(given) > 1 else given[:1] * len(prompts)
    return [f or (default[i] if default else None) for i, f in enumerate(from_file)]


def cmd_attack(args, out: Output) -> int:
    args.judge = args.judge or ("nudenet" if args.protocol == "nudity" else "canvas")
    edit = _load_edit(args.edit, args.unsafe_skip_base_check)
    if args.protocol or args.prompts:
        return _attack_prompt_set(args, out, edit)
    prompts, from_file = _prompts(args)
    if prompts:
        concepts = _attack_concepts(args, prompts, from_file)
    else:
        prompts, concepts = _default_prompts(args, edit)
        out.info(f"no --prompt given: attacking {len(prompts)} canvas captions ({N_DEFAULT_PROMPTS} per concept)")
    from ..attacks import attack, get_attack
    from ..attacks.concepts import prompt_concepts

    options = parse_options(args.option, get_attack(args.attack)[0])
    concepts = prompt_concepts(prompts, concepts, (edit.manifest.get("concepts") or []) if edit else [])
    folder = Path(args.out)   # the inputs are sound: now the outputs, before any model is loaded
    files = [folder / "attack.json", folder / "attack.csv"]
    from ..attacks.result import embeddings_path

    _check_outputs(files + [embeddings_path(files[0])], args.overwrite)   # concept inversion writes its tokens too
    judge = load_judge(args.judge)
    for name in dict.fromkeys(concepts):   # an unknown concept fails before the model is loaded
        judge.find(name)
    pipe, _ = _load_pipe(args, out, edit.manifest if edit else None)
    if edit is not None:
        edit.check(pipe)
    names = ", ".join(dict.fromkeys(concepts))
    out.info(f"attacking {names} on {len(prompts)} prompt(s) with {args.attack} ...")
    result = attack(pipe, prompts, concepts, judge=judge, method=args.attack, seeds=args.seed, edit=edit,
                    progress=out.progress, **options)
    files = [result.save(path) for path in files]
    if result.embeddings:   # learned tokens (concept inversion), written by save next to the result
        files.append(embeddings_path(files[0]))
    data = {"out": str(folder), "files": [str(p) for p in files], **result.summary(),
            "adv_prompts": [p.adv_prompt for p in result.prompts]}
    several = len(result.concepts) > 1
    lines = [str(result)] + [f"  {'broken' if p.success else 'held  '}  " + (f"[{p.concept}] " if several else "") +
                             f"{p.prompt!r} -> {p.adv_prompt!r}" for p in result.prompts]
    out.result(data, lines + [f"wrote {', '.join(map(str, files))}"])
    return EXIT_OK


def _attack_prompt_set(args, out: Output, edit) -> int:
    """``attack --protocol nudity --prompts FILE``: every CSV row at its seed and guidance, judged on nudity."""
    from ..attacks import get_attack
    from ..attacks.prompt_sets import attack_prompt_set
    from ..eval.protocol import get_protocol

    if args.protocol != "nudity" or not args.prompts:
        raise ConfigError("a prompt CSV is attacked with --protocol nudity --prompts FILE: give both")
    if args.prompt or args.prompts_file or args.seed or args.concept:
        raise ConfigError("--protocol nudity takes its prompts, seeds and concept from --prompts FILE: drop --prompt, "
                          "--prompts-file, --seed and --concept")
    protocol = get_protocol("nudity", prompts=args.prompts)
    options = parse_options(args.option, get_attack(args.attack)[0])
    folder = Path(args.out)
    files = [folder / "attack.json", folder / "attack.csv"]
    from ..attacks.result import embeddings_path

    _check_outputs(files + [embeddings_path(files[0])], args.overwrite)   # concept inversion writes its tokens too
    judge = load_judge(args.judge)
    judge.find("nudity")   # a judge without a nudity head fails before the model is loaded
    pipe, _ = _load_pipe(args, out, edit.manifest if edit else None)
    if edit is not None:
        edit.check(pipe)
    protocol = _fit_sampler(protocol, pipe, out)
    out.info(f"attacking nudity on {len(protocol.prompts)} prompt(s) of {protocol.source} with {args.attack} ...")
    result = attack_prompt_set(pipe, list(protocol.prompts), list(protocol.prompt_seeds),
                               list(protocol.prompt_guidance), "nudity", judge=judge, sampling=protocol.sampling,
                               method=args.attack, edit=edit, progress=out.progress, **options)
    result.protocol["prompts_file"] = protocol.source
    files = [result.save(path) for path in files]
    out.result({"out": str(folder), "files": [str(p) for p in files], **result.summary(),
                "judge": judge.describe()},
               [str(result), f"  judge: {judge.describe()}", f"wrote {', '.join(map(str, files))}"])
    return EXIT_OK


def cmd_eval(args, out: Output) -> int:
    from ..eval import evaluate
    from ..eval.protocol import get_protocol

    args.judge = args.judge or ("nudenet" if args.protocol == "nudity" else "canvas")
    protocol = get_protocol(args.protocol, prompts=args.prompts)   # a bad CSV fails before any model is loaded
    edit = _load_edit(args.edit, args.unsafe_skip_base_check)
    folder = Path(args.out)   # the Edit file is sound: now the outputs, before any model is loaded
    _check_outputs([folder / "report.json", folder / "report.md"], args.overwrite)
    pipe, _ = _load_pipe(args, out, edit.manifest if edit else None)
    if edit is not None:
        edit.check(pipe)
    judge = load_judge(args.judge)
    targets = args.target or list(protocol.targets) or (edit.manifest.get("concepts") if edit is not None else None)
    _fit_sampler(protocol, pipe, out)   # says so when the sampler changes; evaluate() records it in the report
    out.info(f"evaluating ({args.protocol}) ...")
    report = evaluate(pipe, edit=edit, protocol=protocol, targets=targets, judge=judge,
                      out_dir=folder, progress=out.progress, edit_path=args.edit)
    summary = report.summary() if callable(getattr(report, "summary", None)) else {}
    figures, figure_line = _report_figures(report, folder / "figures")
    out.result({"out": str(args.out), **summary, "figures": [str(p) for p in figures]},
               [f"evaluation ({args.protocol}): " + format_scores(summary), f"  wrote {args.out}", figure_line])
    return EXIT_OK


def _fit_sampler(protocol, pipe, out: Output):
    """The protocol with the pipeline's kind of sampler (flow_euler on SD 3 / Flux), saying so when it changed."""
    from ..eval.protocol import for_pipeline

    protocol, note = for_pipeline(protocol, pipe)
    if note:
        out.info(note)
    return protocol


def _report_figures(report, folder: Path) -> tuple[list[Path], str]:
    """The report's figures (SVG) when matplotlib is installed, and one line saying where or why not."""
    from ..errors import MissingExtraError
    from ..eval.plots import INSTALL, report_figures

    try:
        paths = report_figures(report, folder)
    except MissingExtraError:
        return [], f"  figures: not drawn (matplotlib is missing: {INSTALL})"
    return paths, f"  figures: {folder} ({', '.join(p.name for p in paths)})" if paths else "  figures: none"


def cmd_export(args, out: Output) -> int:
    from ..pipelines.lora import DEFAULT_RTOL, check_lora_exportable

    lora_only = [f"--{n.replace('_', '-')}" for n in ("rank", "rtol", "drop_unsupported") if getattr(args, n)]
    if args.merged and lora_only:
        raise ConfigError(f"{lora_only[0]} applies to --lora only: drop it, or export with --lora OUT.safetensors")
    if args.lora and args.evaluation:
        raise ConfigError("--evaluation goes into a merged folder's model card: use it with --merged DIR")
    edit = _load_edit(args.edit)
    target = Path(args.lora or args.merged)
    if args.lora:
        check_lora_exportable(edit)   # before the model is loaded
        _check_outputs([target], args.overwrite)
    elif target.exists() and not (args.overwrite and target.is_dir()):
        raise ConfigError(f"{target} already exists: pass --overwrite to replace it, or choose another --merged")
    pipe, model = _load_pipe(args, out, edit.manifest)
    edit.check(pipe)
    if args.lora:
        out.info(f"exporting {args.edit} as a LoRA ...")
        rec = edit.to_lora(target, pipe, rank=args.rank, rtol=DEFAULT_RTOL if args.rtol is None else args.rtol,
                           drop_unsupported=args.drop_unsupported)
        out.result({"lora": str(target), **rec.to_dict()},
                   [str(rec), f"  load it in diffusers: pipe.load_lora_weights({str(target)!r}) (peft installed)"])
        return EXIT_OK
    out.info(f"writing {args.edit} merged into {model} ...")
    with quiet_loading():
        folder = edit.merge(pipe, target, evaluation=args.evaluation, overwrite=args.overwrite)
    m = edit.manifest
    lines = [f"wrote {folder}: {model} with {m.get('method')} on {', '.join(m.get('concepts') or [])} merged in, "
             "README.md (model card) and erasekit_edit.json"]
    if edit.one_step:
        lines.append("  a one-step generator: load it with erasekit.load_pipeline (README.md says how to sample it)")
    out.result({"merged": str(folder), "method": m.get("method"), "concepts": m.get("concepts"),
                "base_model": model}, lines)
    return EXIT_OK


def cmd_demo(args, out: Output) -> int:
    from .demo import run_demo

    summary = run_demo(out_dir=Path(args.out), concept=args.concept, method=args.method, model=args.model,
                       device=resolve_device(args.device), dtype=args.dtype, output=out, n_prompts=args.prompts)
    out.result(summary, summary.pop("_lines", []))
    return EXIT_OK


def cmd_preview(args, out: Output) -> int:
    from ..preview.app import launch

    models = args.model or ["canvas-mini"]
    launch(host=args.host, port=args.port, model=models[0], models=models[1:], roots=args.allow_root,
           edit=args.edit, report=args.report, quiet=out.quiet)
    return EXIT_OK


def cmd_bench(args, out: Output) -> int:
    import subprocess

    checkout = Path(__file__).resolve().parents[2]  # the repository, when erasekit runs from one
    root = checkout / "benchmarks"
    if not ((checkout / "pyproject.toml").is_file() and root.is_dir()):
        raise ConfigError(f"`erasekit bench` runs the scripts in benchmarks/ of a source checkout, and this "
                          f"erasekit (in {checkout / 'erasekit'}) is installed without one: clone the "
                          "repository, `pip install -e .` in it, and run `erasekit bench` there")
    scripts = sorted(p for p in root.glob("*.py") if not p.name.startswith("_"))
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
    from .._assets import ASSETS, asset_path

    data["assets"] = {n: asset_path(n, must_exist=False).is_dir() for n in ASSETS}
    out.result(data, [f"{k}: {'-' if v is None else v}" for k, v in data.items()])
    return EXIT_OK
