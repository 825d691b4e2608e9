"""Measure the shipped canvas assets: ``python -m erasekit.canvas.check [--seeds 5]``.

Prints and writes (``--json``) the figures their model cards quote:

- judge accuracy on held-out rendered images (seeds never used in training), overall and the worst
  (object, style) cell, for both heads;
- canvas-mini's own generations: every (object, style) prompt x ``--seeds`` seeds with the default
  sampler, the share in which the judge recognises the prompted style and the prompted object,
  overall and per cell;
- the wall time of generating one image per (object, style) prompt;
- the size of every asset folder.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

from .judge import load_judge_net
from .world import OBJECTS, STYLES, caption


def judge_heldout(judge_dir: Path | None = None, per_cell: int = 20) -> dict:
    from .data import build
    from .judge import accuracy_by_cell

    data = build(per_cell, heldout=True)
    net, _ = load_judge_net(judge_dir)
    acc = accuracy_by_cell(net, data.images, data.objects, data.styles)
    return {"n_images": len(data), "style": acc["style"], "object": acc["object"],
            "min_cell_style": acc["min_cell_style"], "min_cell_object": acc["min_cell_object"]}


def _classify(net, images, image_size: int) -> dict[str, np.ndarray]:
    """Top-1 style and object of each image, as the evaluation's canvas judge decides them."""
    from ..pipelines.images import images_to_tensor

    with torch.no_grad():
        style, obj = net(images_to_tensor(images, image_size))
    return {"style": style.argmax(1).numpy(), "object": obj.argmax(1).numpy()}


def generation_accuracy(pipe_path: str = "canvas-mini", judge_dir: Path | None = None,
                        seeds: int = 5, steps: int = 25, guidance: float = 7.5) -> dict:
    from ..pipelines import default_sampling, generate, load_pipeline

    pipe = load_pipeline(pipe_path)
    net, cfg = load_judge_net(judge_dir)
    cells = [(o, s) for o in range(len(OBJECTS)) for s in range(len(STYLES))]
    prompts = [caption(OBJECTS[o], STYLES[s]) for o, s in cells]
    # the pipeline's kind of sampler: DDIM on canvas-mini, flow-Euler on canvas-mini-mmdit
    sampling = default_sampling(pipe, steps=steps, guidance=guidance, batch_size=100)
    t0 = time.perf_counter()
    generate(pipe, prompts, [0] * len(prompts), sampling)
    one_per_prompt_s = time.perf_counter() - t0
    all_prompts = [p for p in prompts for _ in range(seeds)]
    all_seeds = [k for _ in prompts for k in range(seeds)]
    images = generate(pipe, all_prompts, all_seeds, sampling, progress=True)
    pred = _classify(net, images, cfg.get("image_size", 32))
    obj = np.repeat([o for o, _ in cells], seeds)
    sty = np.repeat([s for _, s in cells], seeds)
    ok_s, ok_o = pred["style"] == sty, pred["object"] == obj
    per_cell = {f"{OBJECTS[o]}|{STYLES[s]}": [float(ok_s[(obj == o) & (sty == s)].mean()),
                                               float(ok_o[(obj == o) & (sty == s)].mean())] for o, s in cells}
    return {"sampler": sampling.sampler, "steps": steps, "guidance": guidance, "seeds": list(range(seeds)),
            "n_images": len(images), "style": float(ok_s.mean()), "object": float(ok_o.mean()),
            "per_style": {STYLES[s]: float(ok_s[sty == s].mean()) for s in range(len(STYLES))},
            "per_object": {OBJECTS[o]: float(ok_o[obj == o].mean()) for o in range(len(OBJECTS))},
            "per_cell": per_cell, "time_one_image_per_prompt_s": one_per_prompt_s,
            "torch_threads": torch.get_num_threads()}


def asset_sizes() -> dict:
    from .._assets import ASSETS, asset_path

    folders = [asset_path(name, must_exist=False) for name in ASSETS]
    sizes = {d.name: sum(f.stat().st_size for f in d.rglob("*") if f.is_file()) for d in folders if d.is_dir()}
    return {"per_asset_bytes": sizes, "total_bytes": sum(sizes.values())}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m erasekit.canvas.check", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--pipeline", default="canvas-mini", help="canvas-mini or a pipeline directory")
    p.add_argument("--judge", type=Path, default=None, help="judge folder (default: the shipped one)")
    p.add_argument("--seeds", type=int, default=5)
    p.add_argument("--json", type=Path, default=None, help="write the figures here")
    p.add_argument("--skip-generation", action="store_true")
    a = p.parse_args(argv)
    out = {"judge_heldout": judge_heldout(a.judge)}
    print(json.dumps(out["judge_heldout"], indent=1), flush=True)
    if not a.skip_generation:
        gen = generation_accuracy(a.pipeline, a.judge, a.seeds)
        out["generation"] = gen
        print(json.dumps({k: v for k, v in gen.items() if k != "per_cell"}, indent=1), flush=True)
    out["assets"] = asset_sizes()
    if out["assets"]["per_asset_bytes"]:
        print(json.dumps(out["assets"], indent=1))
    if a.json:
        a.json.parent.mkdir(parents=True, exist_ok=True)
        a.json.write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
