"""Does a cheap screening generation flag what the full sampler's generation shows? (UnlearnDiffAtk ``fast``)

    python benchmarks/attack_screen_agreement.py                     # screens of 5, 8, 10, 12 steps
    python benchmarks/attack_screen_agreement.py --steps 8 --edit-cache runs/esd_edits

For each of the styles, erase it from canvas-mini with ESD (or load the Edit from ``--edit-cache``),
build prompts "<5 random words> A {object} image in {style} style." (4 per object, the kind of
prompt the attack judges), generate each at seed 0 with the full sampler (DDIM 25) and with the
screen (DDIM n, same seed), and count, per n, the full sampler's hits the screen flags (recall:
the attack can only lose a success where this is below 1) and the screen's flags the full sampler
confirms (precision: each unconfirmed flag costs one full generation). Writes JSON.
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
WORDS = ("and", "ads", "bright", "blue", "swirl", "paint", "art", "old", "red", "night", "star", "wave", "pop",
         "color", "dot", "line", "sharp", "soft", "cube", "print", "ink", "sea", "sky", "gold")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", nargs="+", type=int, default=[5, 8, 10, 12], help="screen sampler steps")
    ap.add_argument("--styles", nargs="+", default=["Van_Gogh", "Pop_Art", "Ukiyoe", "Cubism"])
    ap.add_argument("--per-object", type=int, default=4, help="random prefixes per caption")
    ap.add_argument("--edit-cache", default=None, help="reuse ESD Edits saved here (esd_<style>.safetensors)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "attack_screen_agreement.json"))
    args = ap.parse_args()

    import torch

    import erasekit
    from bench_attack import make_edit
    from erasekit._io import write_text_atomic
    from erasekit.canvas.world import OBJECTS, caption
    from erasekit.eval.judges import CanvasJudge
    from erasekit.pipelines import Sampling, generate

    torch.set_num_threads(args.threads)
    pipe, judge, rng = erasekit.load_pipeline("canvas-mini"), CanvasJudge.load(), random.Random(0)
    counts = {n: {"both": 0, "full_only": 0, "screen_only": 0, "neither": 0} for n in args.steps}
    for style in args.styles:
        edit, _ = make_edit(pipe, "esd", style, {}, args.edit_cache)
        prompts = [" ".join(rng.choice(WORDS) for _ in range(5)) + " " + caption(o, style)
                   for o in OBJECTS for _ in range(args.per_object)]
        seeds = [0] * len(prompts)
        with edit.applied(pipe):
            full = judge.hits(generate(pipe, prompts, seeds, Sampling(), progress=False), style)
            for n in args.steps:
                screen = judge.hits(generate(pipe, prompts, seeds, Sampling(steps=n), progress=False), style)
                for f, c in zip(full, screen):
                    counts[n][("both" if c else "full_only") if f else ("screen_only" if c else "neither")] += 1
        print(f"{style}: {int(sum(full))} full-sampler hits of {len(prompts)}", flush=True)
    rows = {}
    for n, c in counts.items():
        recall = c["both"] / max(1, c["both"] + c["full_only"])
        precision = c["both"] / max(1, c["both"] + c["screen_only"])
        rows[n] = {**c, "recall": recall, "precision": precision}
        print(f"screen DDIM {n:2d}: recall {recall:.2f} ({c['both']}/{c['both'] + c['full_only']}), "
              f"precision {precision:.2f} ({c['both']}/{c['both'] + c['screen_only']})")
    report = {"protocol": {"full": Sampling().to_dict(), "styles": args.styles, "per_object": args.per_object,
                           "eraser": "esd (defaults)", "seed": 0}, "screens": rows}
    write_text_atomic(args.out, json.dumps(report, indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
