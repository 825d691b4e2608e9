"""A quick preset sweep on canvas-mini: UA / IRA / CRA on a subset of the caption grid, few DDIM steps.

    python benchmarks/quick_sweep.py fmn Van_Gogh '{"lr": 3e-4}' '{"lr": 1e-4, "use_pooler": false}'

For each JSON options object: erase the target with ``method`` (the canvas preset fills the rest),
generate the 10 objects x 5 styles sub-grid (the target and the first four of Pop_Art, Cubism, Winter,
Mosaic, Ukiyoe that are not the target; one seed
per caption, DDIM ``--steps`` (10), guidance 7.5) with the Edit applied, and score it with the canvas
judge exactly as ``canvas_erasure.py`` does (UA on the target's captions, IRA / CRA on the rest). One
JSON line per options object goes to stdout and, with ``--out``, is appended to that file. Cheaper
than ``sweep_erasure.py`` (50 images at 10 steps instead of 100 at 25), for choosing among a few
values on a CPU; confirm the choice with ``canvas_erasure.py``.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from canvas_erasure import edited_images, grid, score   # this script's folder is on sys.path

OTHERS = ("Pop_Art", "Cubism", "Winter", "Mosaic", "Ukiyoe")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("method")
    ap.add_argument("target")
    ap.add_argument("options", nargs="+", help="JSON objects of options")
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()

    import torch

    import erasekit
    from erasekit.eval.judges import CanvasJudge
    from erasekit.pipelines import Sampling

    torch.set_num_threads(args.threads)
    pipe, judge = erasekit.load_pipeline("canvas-mini"), CanvasJudge.load()
    cells, prompts, seeds = grid(1)
    others = [s for s in OTHERS if s != args.target][:4]
    keep = [i for i, (o, s) in enumerate(cells) if s in (args.target, *others) or o == args.target]
    cells, prompts, seeds = [cells[i] for i in keep], [prompts[i] for i in keep], [seeds[i] for i in keep]
    for options in map(json.loads, args.options):
        t = time.perf_counter()
        edit = erasekit.erase(pipe, args.method, [args.target], progress=False, **options)
        erase_s = time.perf_counter() - t
        r = score(judge, edited_images(pipe, edit, prompts, seeds, Sampling(steps=args.steps)), cells, args.target)
        row = {"method": args.method, "target": args.target, "options": options, "erase_s": round(erase_s, 1),
               **{k: round(r[k], 3) for k in ("UA", "IRA", "CRA")},
               "final_loss": edit.manifest["training"]["final_loss"],
               "protocol": {"styles": [args.target, *others], "seeds": 1, "ddim_steps": args.steps, "guidance": 7.5}}
        print(json.dumps(row), flush=True)
        if args.out is not None:
            with args.out.open("a") as f:
                f.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
