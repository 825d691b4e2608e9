"""``erasekit``: erase a concept, attack the result, evaluate it, preview it, from the shell.

Every subcommand is one function that calls the Python API; the options every command shares
(``--quiet``, ``--json``, ``--debug``, the model options) are defined once; errors are formatted
in one place (:func:`_fail`): an :class:`~erasekit.errors.ErasekitError` or bad usage prints one
line naming the problem and the fix and exits 2, any other failure exits 1, and only ``--debug``
prints a traceback.
"""

from __future__ import annotations

import argparse
import sys
import traceback
from pathlib import Path

from ..errors import ConfigError, ErasekitError
from .options import (Output, describe_options, format_scores, load_judge, parse_options, quiet_loading,
                      resolve_device)

EXIT_OK, EXIT_FAILURE, EXIT_USAGE, EXIT_INTERRUPTED = 0, 1, 2, 130


class UsageError(Exception):
    """Bad command-line syntax (argparse's complaints), reported like a user error."""


class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors and an epilog that may be computed when help is shown."""

    def __init__(self, *args, epilog_fn=None, **kwargs):
        kwargs.setdefault("formatter_class", argparse.RawDescriptionHelpFormatter)
        super().__init__(*args, **kwargs)
        self.epilog_fn = epilog_fn

    def format_help(self) -> str:
        if self.epilog_fn is not None:
            self.epilog = (self.epilog or "") + self.epilog_fn()
            self.epilog_fn = None
        return super().format_help()

    def error(self, message):
        raise UsageError(f"{self.prog}: {message}; see `{self.prog} --help`")


def _common() -> argparse.ArgumentParser:
    """Options every command takes (SUPPRESS: given before or after the subcommand, never reset)."""
    p = argparse.ArgumentParser(add_help=False)
    g = p.add_argument_group("output")
    g.add_argument("-q", "--quiet", action="store_true", default=argparse.SUPPRESS,
                   help="no progress bars and no summary (errors still go to stderr)")
    g.add_argument("--json", action="store_true", default=argparse.SUPPRESS,
                   help="print the result as one JSON object on stdout (for scripts)")
    g.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                   help="print the full traceback on errors")
    return p


def _model() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(add_help=False)
    g = p.add_argument_group("model")
    g.add_argument("--model", default=None,
                   help="'canvas-mini' (built in, the default), a diffusers directory, or a hub id")
    g.add_argument("--dtype", default="float32", help="float32 (default), float16 or bfloat16")
    g.add_argument("--device", default="auto", help="cpu, cuda, cuda:1, ... (default: cuda if available)")
    return p


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


# -- subcommands ------------------------------------------------------------------------------------
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
    for name in args.name or list(names):
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


def _as_list(x) -> list:
    return [] if x is None else list(x) if isinstance(x, (list, tuple)) else [x]


# -- the parser -------------------------------------------------------------------------------------
def _options_epilog(title: str, names: list[str], load) -> str:
    """Help text listing each method's options, read from its config dataclass when help is shown."""
    lines = ["", title]
    for name in names:
        try:
            config_cls = load(name)
        except ImportError as e:
            lines.append(f"  {name}: not available ({e})")
            continue
        lines.append(f"  {name}:")
        lines += [f"    {s}" for s in describe_options(config_cls)]
    return "\n".join(lines) + "\n"


def _erase_epilog() -> str:
    from ..erase.registry import _MODULES, get_method

    return _options_epilog("method options (--option NAME=VALUE; `erasekit methods NAME` shows one method):",
                           sorted(_MODULES), lambda n: get_method(n)[0])


def _attack_epilog() -> str:
    from ..attacks import METHODS, get_attack

    return _options_epilog("attack options (--option NAME=VALUE) per --attack:", list(METHODS),
                           lambda n: get_attack(n)[0])


EXAMPLES = {
    "erase": "examples:\n  erasekit erase --method rece --concept Van_Gogh\n"
             "  erasekit erase --method uce --concept 'Van Gogh' --concept Cubism -o erase_scale=2 \\\n"
             "      --out vg.safetensors\n"
             "  erasekit erase --method esd --concept nudity --model CompVis/stable-diffusion-v1-4 --device cuda\n",
    "attack": "examples:\n"
              "  erasekit attack --edit rece-Van_Gogh.safetensors --prompt 'A Cats image in Van Gogh style.'\n"
              "  erasekit attack --edit vg.safetensors --concept Van_Gogh --prompts-file prompts.txt \\\n"
              "      --seed 0 --seed 1 -o blocks=5\n",
    "eval": "examples:\n  erasekit eval --edit rece-Van_Gogh.safetensors --out report/\n"
            "  erasekit eval --protocol canvas-lite --target Van_Gogh --out base-report/   # the base model\n",
    "demo": "examples:\n  erasekit demo\n  erasekit demo --concept Cubism --out cubism-demo/\n",
    "preview": "examples:\n  erasekit preview                      # http://127.0.0.1:7860\n"
               "  erasekit preview --edit rece-Van_Gogh.safetensors --report report/ --port 8000\n",
    "bench": "examples:\n  erasekit bench --list\n  erasekit bench closed_form\n  erasekit bench sfd -- --help\n",
    "methods": "examples:\n  erasekit methods\n  erasekit methods rece --json\n",
    "env": "example:\n  erasekit env --json   # paste into bug reports\n",
}


def build_parser() -> argparse.ArgumentParser:
    common, model = _common(), _model()
    parser = _Parser(
        prog="erasekit", parents=[common],
        description="Erase concepts from text-to-image diffusion models, attack the result, evaluate it.",
        epilog="examples:\n  erasekit demo\n  erasekit erase --method rece --concept Van_Gogh\n"
               "  erasekit methods\n\nexit codes: 0 ok, 1 unexpected failure, 2 bad input (the message says "
               "what to fix), 130 interrupted")
    parser.add_argument("--version", action="version", version=f"erasekit {_version()}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)

    def add(name, fn, help_, parents=(common,), **kw):
        p = sub.add_parser(name, help=help_, description=help_, parents=list(parents), epilog=EXAMPLES[name], **kw)
        p.set_defaults(func=fn)
        return p

    p = add("erase", cmd_erase, "erase concepts with a method and write an Edit file", (common, model),
            epilog_fn=_erase_epilog)
    p.add_argument("--method", required=True, help="uce, rece, esd, salun, advunlearn or sfd")
    p.add_argument("--concept", action="append", required=True, help="a concept to erase (repeatable)")
    p.add_argument("-o", "--option", action="append", metavar="NAME=VALUE", help="a method option (repeatable)")
    p.add_argument("--out", help="the Edit file to write (default: METHOD-CONCEPTS.safetensors)")
    p.add_argument("--overwrite", action="store_true", help="replace --out if it exists")

    p = add("attack", cmd_attack, "attack an erased model with adversarial prompts; write them and the ASR",
            (common, model), epilog_fn=_attack_epilog)
    p.add_argument("--edit", help="the Edit file to attack (default: attack the base model)")
    p.add_argument("--concept", help="the erased concept to bring back (default: the Edit's first concept)")
    p.add_argument("--prompt", action="append", help="a prompt to attack (repeatable)")
    p.add_argument("--prompts-file", help="a text file with one prompt per line")
    p.add_argument("--seed", action="append", type=int, help="a seed per prompt (repeatable; default 0, 1, ...)")
    p.add_argument("--attack", default="unlearndiffatk",
                   help="unlearndiffatk (default), none, seed_search or random_prefix")
    p.add_argument("-o", "--option", action="append", metavar="NAME=VALUE", help="an attack option (repeatable)")
    p.add_argument("--judge", default="canvas", help="canvas (default), nudenet, or a judge directory")
    p.add_argument("--out", default="attack", help="output folder (default ./attack)")

    p = add("eval", cmd_eval, "evaluate an Edit (UA/IRA/CRA, FID, CLIP, cost) and write the report", (common, model))
    p.add_argument("--edit", help="the Edit file to evaluate (default: the base model)")
    p.add_argument("--protocol", default="canvas-lite", help="evaluation protocol (default canvas-lite)")
    p.add_argument("--target", action="append", help="an erased concept (repeatable; default: the Edit's)")
    p.add_argument("--judge", default="canvas", help="canvas (default), nudenet, or a judge directory")
    p.add_argument("--out", default="report", help="output folder (default ./report)")

    p = add("demo", cmd_demo, "the main job end to end on canvas-mini: erase a style with RECE, attack it "
            "with UnlearnDiffAtk, evaluate it, write a report folder", (common, model))
    p.add_argument("--concept", default="Van_Gogh", help="the style or object to erase (default Van_Gogh)")
    p.add_argument("--method", default="rece", help="erasure method (default rece)")
    p.add_argument("--prompts", type=int, default=4, help="captions of the concept to attack (default 4)")
    p.add_argument("--out", default="erasekit-demo", help="output folder (default ./erasekit-demo)")

    p = add("preview", cmd_preview, "start the Gradio preview (original vs erased, attack on demand)")
    p.add_argument("--model", default=None, help="model to preview (default canvas-mini)")
    p.add_argument("--edit", help="an Edit file to preload")
    p.add_argument("--report", help="an evaluation report folder to show")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=7860, help="port (default 7860)")

    p = add("bench", cmd_bench, "run the benchmarks in benchmarks/ (all, or the named ones); arguments after "
            "`--` go to each benchmark script")
    p.add_argument("name", nargs="*", help="benchmark names (default: all)")
    p.add_argument("--list", action="store_true", help="list the benchmarks and exit")

    p = add("methods", cmd_methods, "list the erasure methods and their options")
    p.add_argument("name", nargs="?", help="show one method")

    add("env", cmd_env, "print versions and hardware for bug reports")
    return parser


def _version() -> str:
    from .. import __version__

    return __version__


def _fail(exc: BaseException, debug: bool) -> int:
    """The one place errors become output: one line (traceback with --debug) and an exit code."""
    if debug:
        traceback.print_exception(exc)
    if isinstance(exc, KeyboardInterrupt):
        print("erasekit: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    message = " ".join(str(exc).split()) or type(exc).__name__
    if isinstance(exc, (ErasekitError, UsageError)):
        print(f"erasekit: error: {message}", file=sys.stderr)
        return EXIT_USAGE
    hint = "" if debug else "; rerun with --debug for the traceback"
    print(f"erasekit: error: {type(exc).__name__}: {message} (unexpected failure{hint}; please report it "
          "with the output of `erasekit env`)", file=sys.stderr)
    return EXIT_FAILURE


def main(argv: list[str] | None = None) -> int:
    """Run the CLI; returns the exit code (the console script exits with it)."""
    argv = sys.argv[1:] if argv is None else list(argv)
    debug = "--debug" in argv
    argv, extra = (argv[:argv.index("--")], argv[argv.index("--") + 1:]) if "--" in argv else (argv, [])
    try:
        args = build_parser().parse_args(argv)
        args.extra = extra
        if not getattr(args, "command", None):
            build_parser().print_help()
            return EXIT_USAGE
        out = Output(quiet=getattr(args, "quiet", False), as_json=getattr(args, "json", False))
        return args.func(args, out)
    except SystemExit as e:  # --help and --version
        return e.code if isinstance(e.code, int) else EXIT_OK
    except BaseException as e:  # noqa: BLE001 -- the single place errors are reported
        return _fail(e, debug)


if __name__ == "__main__":
    sys.exit(main())
