"""Sweep the options of an inference-time method (SLD, SAFREE) on canvas-mini; writes benchmarks/sweeps/<name>.json.

For each option set: UA on the target style (share of its captions the canvas judge no longer sees
as that style) and IRA on other styles (share still seen), on 5 objects x ``--seeds`` seeds, DDIM
``--steps`` steps, CFG 7.5, next to the unedited model's accuracies. One process, one option set
after another; a run of the default grid takes under 3 minutes on one CPU core.

    python benchmarks/sweep_inference.py sld --target Van_Gogh --keep Winter Pop_Art
    python benchmarks/sweep_inference.py sld-fine --target Van_Gogh --keep Winter Pop_Art
    python benchmarks/sweep_inference.py safree --target Winter --keep Van_Gogh Pop_Art
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

GRIDS = {
    "sld": [{"preset": p} for p in ("weak", "medium", "strong", "max")]
    + [{"preset": "max", "safety_concept": "{attr}"}, {"preset": "strong", "safety_concept": "{attr}"},
       {"preset": "medium", "safety_concept": "{attr}"}],
    "sld-fine": [{"preset": "max", "safety_concept": "{attr}", "warmup_steps": 7},
                 {"preset": "max", "safety_concept": "{attr}", "threshold": 0.025},
                 {"preset": "max", "safety_concept": "{attr}", "warmup_steps": 4},
                 {"preset": "strong", "safety_concept": "{attr}", "warmup_steps": 0}],
    "safree": [{"concept_prompts": ["{attr}"], "preset": "style"},
               {"concept_prompts": ["{attr}"], "self_validation": False},
               {"concept_prompts": ["{attr}"], "self_validation": False, "alpha": 0.1},
               {"concept_prompts": ["{attr}"], "svf_max_steps": 25, "svf_k": 2.5, "svf_t0": 3.5},
               {"concept_prompts": ["{attr}"], "svf_max_steps": 50, "svf_k": 2.5, "svf_t0": 3.5},
               {"concept_prompts": ["{concept}"], "svf_max_steps": 50, "svf_k": 2.5, "svf_t0": 3.5}],
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("grid", choices=sorted(GRIDS), help="the method, or <method>-<grid>")
    ap.add_argument("--target", default="Van_Gogh")
    ap.add_argument("--keep", nargs="+", default=["Winter", "Pop_Art"])
    ap.add_argument("--seeds", type=int, default=1)
    ap.add_argument("--steps", type=int, default=15)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()

    import erasekit
    from erasekit.canvas.world import OBJECTS, caption, style_text
    from erasekit.eval.judges import CanvasJudge
    from erasekit.pipelines import Sampling, generate

    pipe, judge = erasekit.load_pipeline("canvas-mini"), CanvasJudge.load()
    sampling = Sampling(steps=args.steps, guidance=7.5)
    objs, seeds = OBJECTS[:5], list(range(args.seeds))

    def accuracy(p, style):
        prompts = [caption(o, style) for o in objs for _ in seeds]
        return float(judge.hits(generate(p, prompts, seeds * len(objs), sampling), style).mean())

    def scores(p):
        return {"target": accuracy(p, args.target), "keep": [accuracy(p, s) for s in args.keep]}

    attr = f"{style_text(args.target)} style."
    rows = [{"name": "original", "options": {}, **scores(pipe)}]
    args.method = args.grid.split("-")[0]
    for grid in GRIDS[args.grid]:
        def fill(text):
            return text.replace("{attr}", attr).replace("{concept}", style_text(args.target))

        options = {k: (fill(v) if isinstance(v, str) else [fill(x) for x in v] if isinstance(v, list) else v)
                   for k, v in grid.items()}
        edit = erasekit.erase(pipe, args.method, [args.target], **options)
        t0 = time.perf_counter()
        with edit.sampled(pipe) as p:
            s = scores(p)
        rows.append({"name": json.dumps(options), "options": options, **s, "UA": 1 - s["target"],
                     "IRA": sum(s["keep"]) / len(s["keep"]), "sampling_s": round(time.perf_counter() - t0, 2),
                     "resolved": edit.manifest["resolved"]})
        print(rows[-1]["name"], "UA", round(rows[-1]["UA"], 2), "IRA", round(rows[-1]["IRA"], 2), flush=True)
    out = Path(args.out or Path(__file__).parent / "sweeps" / f"{args.grid}_canvas_{args.target}.json")
    out.write_text(json.dumps({"method": args.method, "target": args.target, "keep": args.keep, "objects": list(objs),
                               "seeds": seeds, "sampling": sampling.to_dict(), "rows": rows}, indent=1) + "\n")
    print("wrote", out)


if __name__ == "__main__":
    main()
