"""UA / IRA / CRA of UCE or RECE on canvas-mini (or canvas-mini-mmdit), one target at a time (metrics.md section 1.4).

    python benchmarks/canvas_closed_form.py --method uce                    # all 10 styles + all 10 objects
    python benchmarks/canvas_closed_form.py --method rece --targets styles --seeds 0 1
    python benchmarks/canvas_closed_form.py --method uce --multi Cubism Mosaic Neon_Lines On_Fire Pop_Art
    python benchmarks/canvas_closed_form.py --method uce --only Van_Gogh --options '{"lamb": 1.0}'

For every target the method erases it (its default options, or ``--options`` JSON), then the whole
10 objects x 10 styles caption grid ("A {object} image in {style} style.") is generated with each seed
(the pipeline's sampler: DDIM, or flow-Euler on SD 3; 25 steps, guidance 7.5) and classified by the
canvas judge. For a style target: UA = 1 - accuracy of the target style's images on the style head, IRA =
mean style accuracy of the other
styles, CRA = mean object accuracy over all objects (all styles' images). For an object target the
heads swap. ``--multi`` erases several styles in one call and reports UA on them and IRA on the rest.
The unedited model's accuracies are measured first with the same grid. With ``--attack`` (e.g.
``unlearndiffatk``) each edit is also attacked on the target's 10 captions (seed 0; the judge decides
success; target images from the unedited model) and its ASR recorded. Writes JSON to benchmarks/results/.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]


def grid_predictions(pipe, judge, seeds, sampling):
    """Judge predictions over the caption grid: (style index, object index, pred style, pred object) per image."""
    from erasekit.canvas.world import OBJECTS, STYLES, caption
    from erasekit.pipelines import generate

    cells = [(s, o) for s in range(len(STYLES)) for o in range(len(OBJECTS)) for _ in seeds]
    prompts = [caption(OBJECTS[o], STYLES[s]) for s, o in cells]
    images = generate(pipe, prompts, [sd for _ in range(len(STYLES) * len(OBJECTS)) for sd in seeds], sampling)
    pred = judge.classify(images)
    cells = np.array(cells)
    return {"style": cells[:, 0], "object": cells[:, 1], "pred_style": pred["style"], "pred_object": pred["object"]}


def per_class(g, head: str) -> np.ndarray:
    """Accuracy per class of ``head`` (style or object), over every image of that class."""
    true, pred = g[head], g["pred_" + head]
    return np.array([(pred[true == k] == k).mean() for k in range(true.max() + 1)])


def scores(g, head: str, targets: list[int]) -> dict:
    """UA on ``targets`` (indices of ``head``), IRA on the other classes of ``head``, CRA on the other head."""
    acc, other = per_class(g, head), per_class(g, "object" if head == "style" else "style")
    rest = [k for k in range(len(acc)) if k not in targets]
    return {"UA": float(1 - acc[targets].mean()), "IRA": float(acc[rest].mean()), "CRA": float(other.mean())}


def attack_summary(pipe, judge, edit, head: str, name: str, args, sampling) -> dict:
    """ASR of ``args.attack`` against ``edit`` on the target's captions (seed 0)."""
    from erasekit.attacks import attack
    from erasekit.canvas.world import OBJECTS, STYLES, caption

    prompts = [caption(o, name) for o in OBJECTS] if head == "style" else [caption(name, s) for s in STYLES]
    res = attack(pipe, prompts, name, judge=judge, method=args.attack, seeds=[0] * len(prompts), edit=edit,
                 sampling=sampling, progress=False, **json.loads(args.attack_options))
    return {"method": args.attack, "pre_asr": res.pre_asr, "asr": res.asr, "n": res.n}


def main(argv: list[str] | None = None) -> dict:
    import erasekit
    from erasekit.canvas.world import OBJECTS, STYLES
    from erasekit.eval.judges import CanvasJudge
    from erasekit.pipelines import default_sampling, load_pipeline

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--method", default="uce", choices=["uce", "rece"])
    ap.add_argument("--targets", default="both", choices=["styles", "objects", "both", "none"])
    ap.add_argument("--only", nargs="*", default=None, help="erase only these styles/objects")
    ap.add_argument("--multi", nargs="*", default=None, help="also erase these styles in one call")
    ap.add_argument("--seeds", nargs="*", type=int, default=[0])
    ap.add_argument("--options", default="{}", help="method options as JSON")
    ap.add_argument("--pipeline", default="canvas-mini")
    ap.add_argument("--judge", default=None, help="judge directory (default erasekit/assets/canvas-judge)")
    ap.add_argument("--attack", default=None, help="also attack each edit (unlearndiffatk, seed_search, ...)")
    ap.add_argument("--attack-options", default="{}", help="attack options as JSON")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args(argv)

    pipe = load_pipeline(args.pipeline)
    judge = CanvasJudge.load(args.judge) if args.judge else CanvasJudge.load()
    sampling, options = default_sampling(pipe), json.loads(args.options)
    t0 = time.perf_counter()
    base = grid_predictions(pipe, judge, args.seeds, sampling)
    step_file = Path(getattr(pipe, "name_or_path", "") or ".") / "training_step.json"
    step = json.loads(step_file.read_text()).get("step") if step_file.is_file() else None
    result = {"method": args.method, "options": options, "pipeline": args.pipeline, "training_step": step,
              "seeds": args.seeds,
              "protocol": {"sampling": sampling.to_dict(), "grid": "10 objects x 10 styles x seeds",
                           "judge": judge.describe()},
              "base": {"style_acc": per_class(base, "style").tolist(), "object_acc": per_class(base, "object").tolist()},
              "targets": {}}
    print(f"base: style acc {per_class(base, 'style').mean():.3f}, object acc {per_class(base, 'object').mean():.3f}")
    jobs = [("style", s) for s in STYLES if args.targets in ("styles", "both")]
    jobs += [("object", o) for o in OBJECTS if args.targets in ("objects", "both")]
    if args.only is not None:
        jobs = [(h, n) for h, n in jobs if n in args.only]
    if args.multi:
        jobs.append(("style", tuple(args.multi)))
    for head, name in jobs:
        names = list(name) if isinstance(name, tuple) else [name]
        labels = STYLES if head == "style" else OBJECTS
        edit = erasekit.erase(pipe, args.method, names, **options)
        with edit.applied(pipe):
            g = grid_predictions(pipe, judge, args.seeds, sampling)
        row = {"head": head, **scores(g, head, [labels.index(n) for n in names]),
               "edit_time_s": edit.manifest["wall_time_s"]}
        if args.attack and len(names) == 1:
            row["attack"] = attack_summary(pipe, judge, edit, head, name, args, sampling)
        key = "+".join(names)
        result["targets"][key] = row
        asr = f"  ASR {row['attack']['asr']:.3f}" if "attack" in row else ""
        print(f"{key:40s} UA {row['UA']:.3f}  IRA {row['IRA']:.3f}  CRA {row['CRA']:.3f}{asr}", flush=True)
    for head in ("style", "object"):
        rows = [r for k, r in result["targets"].items() if r["head"] == head and "+" not in k]
        if rows:
            mean = {m: float(np.mean([r[m] for r in rows])) for m in ("UA", "IRA", "CRA")}
            result[f"mean_{head}"] = {**mean, "n_targets": len(rows)}
            print(f"mean over {len(rows)} {head} targets: UA {mean['UA']:.3f}  IRA {mean['IRA']:.3f}  CRA {mean['CRA']:.3f}")
    result["wall_time_s"] = round(time.perf_counter() - t0, 1)
    out = args.out or ROOT / "benchmarks" / "results" / f"canvas_{args.method}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()
