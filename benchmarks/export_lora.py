"""How close a LoRA export of an Edit is on canvas-mini: rank, error, size, images, UA / IRA (docs/export.md).

    erasekit erase --method esd --concept Van_Gogh --out esd-vg.safetensors
    python benchmarks/export_lora.py esd-vg.safetensors --rtol 0.01 0.05 0.2

The Edit is applied by erasekit; each LoRA (``Edit.to_lora`` at each ``--rtol``) is loaded into a
fresh canvas-mini with diffusers' ``load_lora_weights``. 15 captions (5 objects in Van_Gogh, Pop_Art
and Cubism; seed = index), DDIM 20 steps, guidance 7.5. UA: Van_Gogh captions not judged Van_Gogh
(of 5); IRA: other-style captions judged as their style (of 10). Image error:
||LoRA images - Edit images|| / ||Edit images - base images|| on the first 3 captions. Prints JSON lines.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np

from erasekit.canvas.world import OBJECTS, caption
from erasekit.eval.judges import CanvasJudge
from erasekit.pipelines import Edit, Sampling, generate, load_pipeline

STYLES = ("Van_Gogh", "Pop_Art", "Cubism")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("edit", help="an Edit file of canvas-mini that erases Van_Gogh")
    ap.add_argument("--rtol", type=float, nargs="+", default=[0.01])
    args = ap.parse_args()
    pipe, judge = load_pipeline("canvas-mini"), CanvasJudge.load()
    edit = Edit.load(args.edit, pipe)
    prompts = [caption(o, s) for s in STYLES for o in OBJECTS[:5]]
    seeds, sampling = list(range(len(prompts))), Sampling("ddim", 20, 7.5, batch_size=15)
    want = np.array([judge.find(s)[1] for s in STYLES for _ in range(5)])

    def run(p):
        images = generate(p, prompts, seeds, sampling, output_type="np")
        styles = judge.classify([(np.asarray(x) * 255).round().astype(np.uint8) for x in images])["style"]
        return int((styles[:5] != want[:5]).sum()), int((styles[5:] == want[5:]).sum()), np.asarray(images[:3])

    base = run(pipe)
    with edit.applied(pipe):
        edited = run(pipe)
    print(json.dumps({"edit": args.edit, "method": edit.manifest.get("method"), "edit_bytes": edit.nbytes(),
                      "base_UA_IRA": base[:2], "edit_UA_IRA": edited[:2]}))
    with tempfile.TemporaryDirectory() as tmp:
        for rtol in args.rtol:
            path = Path(tmp) / f"lora-{rtol}.safetensors"
            t0 = time.perf_counter()
            rec = edit.to_lora(path, pipe, rtol=rtol)
            took = time.perf_counter() - t0
            fresh = load_pipeline("canvas-mini")
            fresh.load_lora_weights(str(path))
            got = run(fresh)
            ranks = sorted(rec.ranks.values())
            err = float(np.linalg.norm(got[2] - edited[2]) / np.linalg.norm(edited[2] - base[2]))
            print(json.dumps({"rtol": rtol, "export_s": round(took, 2), "modules": len(ranks),
                              "rank_min_median_max": [ranks[0], ranks[len(ranks) // 2], ranks[-1]],
                              "max_error": rec.max_error, "exact": rec.exact, "lora_bytes": rec.nbytes,
                              "lora_UA_IRA": got[:2], "image_error": err}))


if __name__ == "__main__":
    main()
