"""UnlearnDiffAtk on erased canvas-mini: ASR over pre-ASR, the default schedule's cost vs the reference's, batching.

    python benchmarks/bench_attack.py                                   # everything, defaults below
    python benchmarks/bench_attack.py --erasers uce --styles Van_Gogh Pop_Art Ukiyoe Cubism --objects 5
    python benchmarks/bench_attack.py --skip-efficacy                   # batching only
    python benchmarks/bench_attack.py --model runs/canvas/pipeline --judge runs/canvas/judge
    python benchmarks/bench_attack.py --edit-cache /tmp/edits          # erase once, reuse the Edits
    python benchmarks/bench_attack.py --erasers uce rece --runs none fast --skip-batching  # RECE vs UCE
    python benchmarks/bench_attack.py --erase-option esd:lr=5e-4 --baselines --baseline-rounds 5 --objects 5
    python benchmarks/bench_attack.py --variant wide 't_range=(0, 1000)' --runs none fast wide  # schedule variants

Efficacy and cost (one run): for each eraser (UCE, ESD) and style, erase the style from canvas-mini,
take the captions "A {object} image in {style} style." for the first ``--objects`` objects at seed 0,
make the target images once with the original model, and attack the erased model with

- ``none`` (pre-ASR: one judged generation per prompt),
- UnlearnDiffAtk with the ``fast`` schedule (the default) and with the ``reference`` schedule
  (t = 10, 30, ..., 990 ascending, 40 steps each, a full generation after every block),
- optionally the seed-search and random-prefix baselines (``--baselines``).

Success is the canvas judge's top-1 style; ASR includes pre-ASR (UnlearnDiffAtk's definition). Cost is
counted per prompt in UNet evaluations (one per latent; CFG counts two) and in UNet-forward equivalents
(a backward counts two, unlearndiffatk.md section 9), and printed with the ratio fast / reference.

Batching: the same 16 prompts attacked (a) in one batch of 16, (b) one ``attack()`` call per prompt,
(c) in one call with ``batch_size=1``, with a judge that never reports a hit so every prompt does the
same work (``--batch-blocks`` blocks of the fast schedule), timed in turn ``--batch-repeats`` times.
Median per-prompt wall time and the ratios are printed.

Results (with the protocol) go to benchmarks/results/attack.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_STYLES = ("Van_Gogh", "Pop_Art", "Ukiyoe", "Cubism")


def make_edit(pipe, eraser: str, style: str, options: dict, cache: str | None):
    """Erase ``style`` (or load the Edit an earlier run saved in ``cache``); returns (edit, seconds or None)."""
    import erasekit
    from erasekit.canvas.world import style_text
    from erasekit.pipelines import Edit

    path = Path(cache) / f"{eraser}_{style}.safetensors" if cache else None
    if path is not None and path.exists():
        edit = Edit.load(path, pipe)
        if edit.manifest.get("config", {}) | options == edit.manifest.get("config", {}):
            return edit, None
    t0 = time.perf_counter()
    edit = erasekit.erase(pipe, eraser, [style_text(style)], **options)
    seconds = time.perf_counter() - t0
    if path is not None:
        edit.save(path)
    return edit, seconds


def efficacy(pipe, judge, args) -> dict:
    """Per eraser: the attacks' results pooled over styles, plus per-style rows."""
    from erasekit.attacks import attack
    from erasekit.canvas.world import OBJECTS, caption
    from erasekit.pipelines import generate

    runs = {"none": {"method": "none"}, "fast": {"method": "unlearndiffatk", "schedule": "fast", "k": args.k},
            "reference": {"method": "unlearndiffatk", "schedule": "reference", "k": args.k}}
    if args.baselines:
        runs |= {"seed_search": {"method": "seed_search", "rounds": args.baseline_rounds},
                 "random_prefix": {"method": "random_prefix", "rounds": args.baseline_rounds, "k": args.k}}
    for name, *pairs in args.variant or []:
        base, _, name = name.rpartition(":")
        runs[name] = {**runs[base or "fast"], **_options(pairs, "")}
    if args.runs:
        runs = {name: kw for name, kw in runs.items() if name in args.runs}
    out = {}
    for eraser in args.erasers:
        rows, pooled = [], {name: [] for name in runs}
        for style in args.styles:
            edit, erase_s = make_edit(pipe, eraser, style, _options(args.erase_option, eraser), args.edit_cache)
            prompts = [caption(o, style) for o in OBJECTS[:args.objects]]
            seeds = [0] * len(prompts)
            targets = generate(pipe, prompts, seeds)  # the original model, shared by every attack below
            for name, kw in runs.items():
                kw = dict(kw)
                res = attack(pipe, prompts, style, judge=judge, seeds=seeds, edit=edit, target_images=targets,
                             progress=args.progress, **kw)
                pooled[name].extend(res.prompts)
                rows.append({"style": style, "attack": name, "erase_s": erase_s and round(erase_s, 2),
                             **res.summary()})
                print(f"  {eraser:4s} {style:14s} {name:13s} pre-ASR {res.pre_asr:5.1f}%  ASR {res.asr:5.1f}%  "
                      f"cost {res.summary()['mean_cost_unet_equiv']:8.0f}  {res.protocol['wall_time_s']:7.1f} s",
                      flush=True)
                if args.save_dir:
                    res.save(Path(args.save_dir) / f"{eraser}_{style}_{name}.json")
        out[eraser] = {"per_style": rows, "pooled": {name: _pool(ps) for name, ps in pooled.items()}}
        _print_pooled(eraser, out[eraser]["pooled"])
    return out


def _pool(prompts) -> dict:
    n = len(prompts)
    return {"n": n, "pre_asr": 100.0 * sum(p.pre_success for p in prompts) / n,
            "asr": 100.0 * sum(p.success for p in prompts) / n,
            "mean_unet_evals": sum(p.unet_evals for p in prompts) / n,
            "mean_cost_unet_equiv": sum(p.cost for p in prompts) / n,
            "mean_wall_time_s": sum(p.wall_time_s for p in prompts) / n}


def _print_pooled(eraser: str, pooled: dict) -> None:
    print(f"\n{eraser}: pooled over styles (ASR includes pre-ASR, UnlearnDiffAtk's definition)")
    print(f"  {'attack':13s} {'N':>4s} {'pre-ASR':>8s} {'ASR':>7s} {'UNet evals':>11s} {'UNet-equiv':>11s} {'s/prompt':>9s}")
    for name, p in pooled.items():
        print(f"  {name:13s} {p['n']:4d} {p['pre_asr']:7.1f}% {p['asr']:6.1f}% {p['mean_unet_evals']:11.0f} "
              f"{p['mean_cost_unet_equiv']:11.0f} {p['mean_wall_time_s']:9.2f}")
    if "fast" not in pooled or "reference" not in pooled:
        return
    f, r = pooled["fast"], pooled["reference"]
    print(f"  fast / reference: UNet evals {f['mean_unet_evals'] / r['mean_unet_evals']:.3f}, "
          f"UNet-equiv {f['mean_cost_unet_equiv'] / r['mean_cost_unet_equiv']:.3f}; "
          f"ASR {f['asr']:.1f}% vs {r['asr']:.1f}%; fast ASR - pre-ASR = {f['asr'] - f['pre_asr']:.1f} points\n")


def batching(pipe, judge, args) -> dict:
    """Per-prompt wall time of 16 prompts in one batch vs one at a time (same work: no early stop).

    The three ways are timed in turn, ``--batch-repeats`` times, and the medians are compared, so a
    change in the machine's load hits all of them alike.
    """
    import statistics

    from erasekit.attacks import attack
    from erasekit.canvas.world import OBJECTS, STYLES, caption

    never = NeverHits(judge)
    prompts = [caption(o, s) for s in STYLES[:2] for o in OBJECTS][:args.batch_prompts]
    kw = dict(judge=never, blocks=args.batch_blocks, k=args.k, progress=False)
    ways = {"one_batch": lambda: attack(pipe, prompts, STYLES[0], batch_size=len(prompts), **kw),
            "separate_calls": lambda: [attack(pipe, [p], STYLES[0], **kw) for p in prompts],
            "batch_size_1": lambda: attack(pipe, prompts, STYLES[0], batch_size=1, **kw)}
    times = {name: [] for name in ways}
    for _ in range(args.batch_repeats):
        for name, run in ways.items():
            t0 = time.perf_counter()
            run()
            times[name].append((time.perf_counter() - t0) / len(prompts))
    med = {name: statistics.median(v) for name, v in times.items()}
    res = {"prompts": len(prompts), "blocks": args.batch_blocks, "k": args.k, "s_per_prompt_runs": times,
           "s_per_prompt_median": med, "speedup_vs_separate_calls": med["separate_calls"] / med["one_batch"],
           "speedup_vs_batch_size_1": med["batch_size_1"] / med["one_batch"]}
    print(f"batching ({len(prompts)} prompts, {args.batch_blocks} fast blocks each, no early stop, median of "
          f"{args.batch_repeats}): s/prompt " + ", ".join(f"{k} {v:.2f}" for k, v in med.items())
          + f"; speed-up {res['speedup_vs_separate_calls']:.2f}x vs separate calls, "
          f"{res['speedup_vs_batch_size_1']:.2f}x vs batch_size=1")
    return res


class NeverHits:
    """Wraps a judge: classifies (same cost) but never reports a hit, so no prompt stops early."""

    def __init__(self, judge):
        self.judge, self.heads, self.name = judge, judge.heads, judge.name

    def find(self, concept):
        return self.judge.find(concept)

    def hits(self, images, concept):
        return self.judge.hits(images, concept) & False

    def describe(self):
        return {**self.judge.describe(), "wrapped": "never hits (benchmark)"}


def _options(pairs: list[str], eraser: str) -> dict:
    """``key=value`` (every eraser) or ``eraser:key=value`` (that eraser only) -> options dict."""
    import ast

    out = {}
    for pair in pairs or []:
        key, _, value = pair.partition("=")
        target, _, key = key.rpartition(":")
        if target and target != eraser:
            continue
        try:
            out[key] = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            out[key] = value
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="canvas-mini")
    ap.add_argument("--judge", default=None, help="canvas judge folder (default: the shipped one)")
    ap.add_argument("--erasers", nargs="+", default=["uce", "esd"])
    ap.add_argument("--erase-option", action="append",
                    help="key=value or eraser:key=value passed to erase() (repeatable), e.g. esd:lr=5e-4")
    ap.add_argument("--styles", nargs="+", default=list(DEFAULT_STYLES))
    ap.add_argument("--objects", type=int, default=10, help="prompts per style (first n canvas objects)")
    ap.add_argument("--k", type=int, default=5, help="prefix tokens of every prefix attack (canvas-mini's 64-d text "
                    "space needs more than the paper's 3 for styles against UCE)")
    ap.add_argument("--baselines", action="store_true", help="also run seed search and random prefix")
    ap.add_argument("--baseline-rounds", type=int, default=10)
    ap.add_argument("--runs", nargs="+", default=None,
                    help="attacks to run (none fast reference seed_search random_prefix); default: all enabled")
    ap.add_argument("--variant", nargs="+", action="append", metavar=("[BASE:]NAME", "KEY=VALUE"),
                    help="an extra attack run: BASE (default fast) with options changed, e.g. "
                         "--variant wide 't_range=(0, 1000)' (repeatable)")
    ap.add_argument("--skip-efficacy", action="store_true")
    ap.add_argument("--skip-batching", action="store_true")
    ap.add_argument("--batch-prompts", type=int, default=16)
    ap.add_argument("--batch-blocks", type=int, default=2)
    ap.add_argument("--batch-repeats", type=int, default=1)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--save-dir", default=None, help="also save every AttackResult (JSON) here")
    ap.add_argument("--edit-cache", default=None, help="reuse Edits saved here by an earlier run (same options)")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "attack.json"))
    ap.add_argument("--progress", action="store_true")
    args = ap.parse_args()

    import torch

    from erasekit._io import write_text_atomic
    from erasekit.eval.judges import CanvasJudge
    from erasekit.pipelines import Sampling, load_pipeline

    torch.set_num_threads(args.threads)
    pipe, judge = load_pipeline(args.model), CanvasJudge.load(args.judge)
    report = {"protocol": {"model": args.model, "judge": args.judge, "sampling": Sampling().to_dict(), "k": args.k,
                           "erasers": args.erasers, "erase_options": args.erase_option, "styles": args.styles,
                           "objects": args.objects,
                           "seed": 0, "threads": args.threads, "machine": platform.processor() or platform.machine(),
                           "cpus": os.cpu_count(), "torch": torch.__version__,
                           "asr_definition": "ASR includes pre-ASR (UnlearnDiffAtk's definition)"}}
    if not args.skip_efficacy:
        report["efficacy"] = efficacy(pipe, judge, args)
    if not args.skip_batching:
        report["batching"] = batching(pipe, judge, args)
    write_text_atomic(args.out, json.dumps(report, indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
