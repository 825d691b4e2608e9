"""UA / IRA / CRA of a fine-tuning erasure on canvas-mini, one concept at a time (UnlearnCanvas protocol).

    python benchmarks/canvas_erasure.py --method esd --concepts Van_Gogh Pop_Art Cubism Winter
    python benchmarks/canvas_erasure.py --method salun --concepts Van_Gogh Cats --seeds 2
    python benchmarks/canvas_erasure.py --method esd --concepts Mosaic --option steps=200 --option lr=2e-4

For each concept: erase it from the base model (wall time and peak memory from the Edit's manifest),
generate the 10 x 10 grid ``"A {object} image in {style} style."`` x ``--seeds`` seeds with the Edit
applied (DDIM 25 steps, guidance 7.5; an SFD generator through its one-step sampler), and classify
with the canvas judge:

- UA  = 1 - accuracy of the target's head on the target's own images,
- IRA = mean accuracy of the same head over the other labels' images (in-domain retain),
- CRA = mean accuracy of the other head over all images (cross-domain retain).

Erase time is reported as wall time (``erase_s``, from the Edit's manifest) and as this process's
CPU time (``erase_cpu_s``), which does not grow when other jobs share the machine.

The unedited model's accuracies are measured once with the same protocol as the reference line.
Results (with the protocol) go to benchmarks/results/canvas_<method>.json.
"""

from __future__ import annotations

import argparse
import ast
import json
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]


def grid(seeds: int):
    from erasekit.canvas.world import OBJECTS, STYLES, caption

    cells = [(o, s) for s in STYLES for o in OBJECTS for _ in range(seeds)]
    prompts = [caption(o, s) for o, s in cells]
    return cells, prompts, [i % seeds + 1000 * (i // seeds) for i in range(len(cells))]


def score(judge, images, cells, target: str | None) -> dict:
    """Per-head accuracies and, for a target, UA / IRA / CRA."""
    pred = judge.classify(images)
    truth = {"style": np.array([judge.find(s)[1] for _, s in cells]),
             "object": np.array([judge.find(o)[1] for o, _ in cells])}
    out = {f"{h}_accuracy": float((pred[h] == truth[h]).mean()) for h in truth}
    if target is None:
        return out
    head, idx = judge.find(target)
    other = "object" if head == "style" else "style"
    own = truth[head] == idx
    out.update(head=head, UA=float(1 - (pred[head][own] == idx).mean()),
               IRA=float((pred[head][~own] == truth[head][~own]).mean()),
               CRA=float((pred[other] == truth[other]).mean()))
    return out


def edited_images(pipe, edit, prompts, seeds, sampling):
    """The grid with ``edit``: applied to ``pipe``, or through the one-step sampler for an SFD generator."""
    from erasekit.pipelines import generate

    with edit.sampled(pipe) as sampler:
        return generate(sampler, prompts, seeds, sampling)


def mask_check(pipe, edit, concept: str, options: dict) -> dict:
    """SalUn: weights outside the (recomputed, identical-seed) saliency mask must be bitwise unchanged."""
    from erasekit.erase.salun import SalUnConfig, saliency

    mask = saliency(pipe, [concept], SalUnConfig(**options))
    outside_changed = kept = total = 0
    for key, m in mask.items():
        kept, total = kept + int(m.sum()), total + m.numel()
        if key in edit.weights:
            base = pipe.unet.get_parameter(key.split("/", 1)[1]).detach()
            outside_changed += int((edit.weights[key] != base)[~m].sum())
    return {"mask_density": kept / total, "changed_outside_mask": outside_changed,
            "changed_inside_mask": sum(int((w != pipe.unet.get_parameter(k.split("/", 1)[1]).detach()).sum())
                                       for k, w in edit.weights.items()) - outside_changed}


def parse_option(text: str):
    key, _, value = text.partition("=")
    try:
        return key, ast.literal_eval(value)
    except (ValueError, SyntaxError):
        return key, value


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--method", required=True)
    ap.add_argument("--concepts", nargs="+", required=True)
    ap.add_argument("--seeds", type=int, default=1)
    ap.add_argument("--pipeline", default="canvas-mini")
    ap.add_argument("--judge", default=None)
    ap.add_argument("--option", action="append", default=[], help="method option key=value")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default=None)
    ap.add_argument("--check-mask", action="store_true",
                    help="salun: recompute the saliency mask and count changed weights outside it")
    args = ap.parse_args()

    import torch

    import erasekit
    from erasekit.eval.judges import CanvasJudge
    from erasekit.pipelines import Sampling, generate

    torch.set_num_threads(args.threads)
    pipe = erasekit.load_pipeline(args.pipeline)
    judge = CanvasJudge.load(args.judge) if args.judge else CanvasJudge.load()
    options = dict(parse_option(o) for o in args.option)
    cells, prompts, seeds = grid(args.seeds)
    sampling = Sampling()
    out_path = Path(args.out or ROOT / "benchmarks" / "results" / f"canvas_{args.method}.json")
    report = {"method": args.method, "options": options, "pipeline": args.pipeline,
              "protocol": {"prompts": "10 objects x 10 styles, 'A {object} image in {style} style.'",
                           "seeds_per_prompt": args.seeds, "sampling": sampling.to_dict(),
                           "judge": judge.describe(), "threads": args.threads}, "rows": []}
    t0 = time.perf_counter()
    report["base"] = score(judge, generate(pipe, prompts, seeds, sampling), cells, None)
    report["base"]["generate_s"] = round(time.perf_counter() - t0, 1)
    print("base", report["base"], flush=True)
    for concept in args.concepts:
        cpu0 = time.process_time()
        edit = erasekit.erase(pipe, args.method, [concept], **options)
        cpu_s = time.process_time() - cpu0
        t0 = time.perf_counter()
        images = edited_images(pipe, edit, prompts, seeds, sampling)
        row = {"concept": concept, **score(judge, images, cells, concept),
               "erase_s": edit.manifest["wall_time_s"], "erase_cpu_s": round(cpu_s, 1),
               "peak_memory_bytes": edit.manifest["peak_memory_bytes"],
               "generate_s": round(time.perf_counter() - t0, 1), "edit_bytes": edit.nbytes(),
               "training": edit.manifest.get("training")}
        if args.check_mask:
            row.update(mask_check(pipe, edit, concept, options))
        report["rows"].append(row)
        print(json.dumps({k: v for k, v in row.items() if k != "training"}), flush=True)
    rows = report["rows"]
    report["mean"] = {k: float(np.mean([r[k] for r in rows])) for k in ("UA", "IRA", "CRA", "erase_s", "erase_cpu_s")}
    for head in ("style", "object"):
        sel = [r for r in rows if r["head"] == head]
        if sel:
            report[f"mean_{head}"] = {k: float(np.mean([r[k] for r in sel])) for k in ("UA", "IRA", "CRA")}
    out_path.parent.mkdir(parents=True, exist_ok=True)
    out_path.write_text(json.dumps(report, indent=2))
    print("mean", report["mean"], "->", out_path)


if __name__ == "__main__":
    main()
