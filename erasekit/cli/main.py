"""``erasekit``: erase a concept, attack the result, evaluate it, preview it, from the shell.

Every subcommand is one function (in :mod:`erasekit.cli.commands`) that calls the Python API; the
options every command shares
(``--quiet``, ``--json``, ``--debug``, the model options) are defined once; errors are formatted
in one place (:func:`_fail`): an :class:`~erasekit.errors.ErasekitError` or bad usage prints one
line naming the problem and the fix and exits 2, any other failure exits 1, and only ``--debug``
prints a traceback.
"""

from __future__ import annotations

import argparse
import sys
import traceback
import warnings
from contextlib import contextmanager

from ..errors import ErasekitError
from .commands import (cmd_attack, cmd_bench, cmd_demo, cmd_env, cmd_erase, cmd_eval, cmd_export, cmd_methods,
                       cmd_preview)
from .options import Output, describe_options

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
                   help="'canvas-mini' (built in, the default), 'canvas-mini-mmdit' (built in, SD 3), a diffusers "
                        "directory, or a hub id")
    g.add_argument("--dtype", default="float32", help="float32 (default), float16 or bfloat16")
    g.add_argument("--device", default="auto", help="cpu, cuda, cuda:1, ... (default: cuda if available)")
    return p


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
              "  erasekit attack --edit rece-Van_Gogh.safetensors   # 4 canvas captions of each erased concept\n"
              "  erasekit attack --edit rece-Van_Gogh.safetensors --prompt 'A Cats image in Van Gogh style.'\n"
              "  erasekit attack --edit vg.safetensors --concept Van_Gogh --prompts-file prompts.txt \\\n"
              "      --seed 0 --seed 1 -o blocks=5\n"
              "  erasekit attack --edit vg.safetensors --attack ring_a_bell -o generations=200\n"
              "  erasekit attack --model ./sd-1-4 --edit esd-nudity.safetensors --protocol nudity --prompts i2p.csv \\\n"
              "      --attack ring_a_bell -o length=16\n",
    "eval": "examples:\n  erasekit eval --edit rece-Van_Gogh.safetensors --out report/\n"
            "  erasekit eval --protocol canvas-lite --target Van_Gogh --out base-report/   # the base model\n"
            "  erasekit eval --model ./sd-1-4 --edit esd-nudity.safetensors --protocol nudity --prompts i2p.csv\n",
    "export": "examples:\n  erasekit export --edit uce-Van_Gogh.safetensors --lora vg-lora.safetensors\n"
              "  erasekit export --edit esd-Van_Gogh.safetensors --lora vg-lora.safetensors --rtol 0.05\n"
              "  erasekit export --edit esd-Van_Gogh.safetensors --merged vg-pipeline/ --evaluation report/report.json\n"
              "\nin diffusers (peft installed): pipe.load_lora_weights('vg-lora.safetensors'), or\n"
              "DiffusionPipeline.from_pretrained('vg-pipeline')\n",
    "demo": "examples:\n  erasekit demo\n  erasekit demo --concept Cubism --out cubism-demo/\n",
    "preview": "examples:\n  erasekit preview                      # http://127.0.0.1:7860\n"
               "  erasekit preview --edit rece-Van_Gogh.safetensors --report report/ --port 8000\n"
               "  erasekit preview --model canvas-mini --model ./my-sd15 --allow-root runs/\n",
    "bench": "examples:\n  erasekit bench --list\n  erasekit bench closed_form\n  erasekit bench sfd -- --help\n",
    "methods": "examples:\n  erasekit methods\n  erasekit methods rece --json\n",
    "env": "example:\n  erasekit env --json   # paste into bug reports\n",
}


PROMPTS_HELP = ("a prompt CSV in the I2P format for --protocol nudity: columns prompt, seed (or sd_seed, "
                "evaluation_seed) and optionally guidance (or sd_guidance_scale, evaluation_guidance); "
                "erasekit ships no such list (docs/nudity.md)")
UNSAFE_HELP = ("UNSAFE: use the Edit even though its base-model family or fingerprint is missing or differs from "
               "--model's (only if you know it fits, e.g. a fine-tuned copy); every other check still runs and "
               "a warning is printed")


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
    p.add_argument("--method", required=True, help="the erasure method (`erasekit methods` lists them all)")
    p.add_argument("--concept", action="append", required=True, help="a concept to erase (repeatable)")
    p.add_argument("-o", "--option", action="append", metavar="NAME=VALUE", help="a method option (repeatable)")
    p.add_argument("--out", help="the Edit file to write (default: METHOD-CONCEPTS.safetensors)")
    p.add_argument("--overwrite", action="store_true", help="replace --out if it exists")

    p = add("attack", cmd_attack, "attack an erased model with adversarial prompts; write them and the ASR",
            (common, model), epilog_fn=_attack_epilog)
    p.add_argument("--edit", help="the Edit file to attack (default: attack the base model)")
    p.add_argument("--unsafe-skip-base-check", action="store_true",
                   help=UNSAFE_HELP)
    p.add_argument("--concept", action="append",
                   help="the erased concept the judge looks for: once for every prompt, or once per prompt in "
                        "order (default: the one of the Edit's concepts that each prompt names)")
    p.add_argument("--prompt", action="append",
                   help="a prompt to attack (repeatable; default: 4 canvas captions per concept with --judge canvas)")
    p.add_argument("--prompts-file", help="a text file with one prompt per line; a 'CONCEPT<TAB>PROMPT' line gives "
                                          "its prompt's concept")
    p.add_argument("--seed", action="append", type=int, help="a seed per prompt (repeatable; default 0 for each)")
    from ..attacks import METHODS

    p.add_argument("--attack", "--method", dest="attack", default="unlearndiffatk",
                   help=f"{', '.join(METHODS)} (default unlearndiffatk)")
    p.add_argument("-o", "--option", action="append", metavar="NAME=VALUE", help="an attack option (repeatable)")
    p.add_argument("--protocol", choices=["nudity"], help="attack a prompt CSV: nudity (with --prompts FILE; judged "
                                                          "by NudeNet, each row at its own seed and guidance)")
    p.add_argument("--prompts", metavar="FILE", help=PROMPTS_HELP)
    p.add_argument("--judge", default=None, help="canvas (default), nudenet (default with --protocol nudity; "
                                                 "nudenet:strict or nudenet:0.45 for another preset or threshold), "
                                                 "or a judge directory")
    p.add_argument("--out", default="attack", help="output folder (default ./attack)")
    p.add_argument("--overwrite", action="store_true", help="replace attack.json/attack.csv in --out if they exist")

    p = add("eval", cmd_eval, "evaluate an Edit (UA/IRA/CRA, FID, CLIP, cost) and write the report", (common, model))
    p.add_argument("--edit", help="the Edit file to evaluate (default: the base model)")
    p.add_argument("--unsafe-skip-base-check", action="store_true",
                   help=UNSAFE_HELP)
    p.add_argument("--protocol", default="canvas-lite", help="evaluation protocol: canvas-lite (default), canvas, "
                                                             "unlearncanvas, or nudity (with --prompts FILE)")
    p.add_argument("--prompts", metavar="FILE", help=PROMPTS_HELP)
    p.add_argument("--target", action="append", help="an erased concept (repeatable; default: the protocol's "
                                                     "(nudity), else the Edit's)")
    p.add_argument("--judge", default=None, help="canvas (default), nudenet (default with --protocol nudity; "
                                                 "nudenet:strict or nudenet:0.45 for another preset or threshold), "
                                                 "or a judge directory")
    p.add_argument("--out", default="report", help="output folder (default ./report)")
    p.add_argument("--overwrite", action="store_true", help="replace report.json/report.md in --out if they exist")

    p = add("export", cmd_export, "export an Edit for use outside erasekit: a LoRA file for diffusers' "
            "load_lora_weights, or a merged pipeline folder with a model card", (common, model))
    p.add_argument("--edit", required=True, help="the Edit file to export")
    what = p.add_mutually_exclusive_group(required=True)
    what.add_argument("--lora", metavar="OUT.safetensors",
                      help="write a LoRA file (peft/diffusers keys); exact for low-rank Edits (UCE, RECE), a "
                           "truncated SVD for dense ones (ESD, SalUn, AdvUnlearn)")
    what.add_argument("--merged", metavar="DIR", help="write a diffusers pipeline folder with the Edit merged in, a "
                                                      "model card (README.md) and the manifest (erasekit_edit.json)")
    p.add_argument("--rank", type=int, help="--lora: factor dense changes at this rank (default: the smallest rank "
                                            "meeting --rtol)")
    p.add_argument("--rtol", type=float, help="--lora: relative Frobenius error allowed per dense tensor "
                                              "(default 0.01)")
    p.add_argument("--drop-unsupported", action="store_true",
                   help="--lora: leave out changed tensors with no LoRA form (norms, embeddings) instead of "
                        "refusing; their share of the change is reported")
    p.add_argument("--evaluation", metavar="REPORT.json",
                   help="--merged: an `erasekit eval` report.json (or its folder) whose scores go into the model card")
    p.add_argument("--overwrite", action="store_true", help="replace --lora / --merged if it exists")

    p = add("demo", cmd_demo, "the main job end to end on canvas-mini: erase a style with RECE, attack it "
            "with UnlearnDiffAtk, evaluate it, write a report folder", (common, model))
    p.add_argument("--concept", default="Van_Gogh", help="the style or object to erase (default Van_Gogh)")
    p.add_argument("--method", default="rece", help="erasure method (default rece)")
    p.add_argument("--prompts", type=int, default=4, help="captions of the concept to attack (default 4)")
    p.add_argument("--out", default="erasekit-demo", help="output folder (default ./erasekit-demo)")

    p = add("preview", cmd_preview, "start the Gradio preview (original vs erased, attack on demand)")
    p.add_argument("--model", action="append", default=None, help="a model visitors may load (repeat to offer "
                   "several; the first is shown first); canvas-mini is always offered, nothing else")
    p.add_argument("--edit", help="an Edit file to preload")
    p.add_argument("--report", help="an evaluation report folder to show (visitors may open folders inside it)")
    p.add_argument("--allow-root", action="append", default=[], metavar="DIR", help="a folder whose Edit files and "
                   "reports visitors may open (repeatable); by default they reach only uploads and the app's output")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=7860, help="port (default 7860)")

    p = add("bench", cmd_bench, "run the benchmarks in benchmarks/ (every bench_*.py, or the named ones); arguments after "
            "`--` go to each benchmark script")
    p.add_argument("name", nargs="*", help="benchmark names (default: every bench_*.py)")
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


@contextmanager
def _loud_unsafe_warnings():
    """Show each distinct skipped-base-check warning once, as one line on stderr (even with --quiet)."""
    from ..pipelines.edit import BaseCheckSkippedWarning

    shown, show = set(), warnings.showwarning

    def one_line(message, category, filename, lineno, file=None, line=None):
        if not issubclass(category, BaseCheckSkippedWarning):
            return show(message, category, filename, lineno, file, line)
        text = " ".join(str(message).split())
        if text not in shown:
            shown.add(text)
            print(f"erasekit: warning: {text}", file=sys.stderr, flush=True)

    with warnings.catch_warnings():
        warnings.simplefilter("always", BaseCheckSkippedWarning)
        warnings.showwarning = one_line
        yield


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
        if getattr(args, "unsafe_skip_base_check", False):
            with _loud_unsafe_warnings():
                return args.func(args, out)
        return args.func(args, out)
    except SystemExit as e:  # --help and --version
        return e.code if isinstance(e.code, int) else EXIT_OK
    except BaseException as e:  # noqa: BLE001 -- the single place errors are reported
        return _fail(e, debug)


if __name__ == "__main__":
    sys.exit(main())
