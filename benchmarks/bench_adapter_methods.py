"""Time and peak memory of one MACE and one SPM erasure on the full-size SD 1.4 architecture (random weights).

    python benchmarks/bench_adapter_methods.py                       # 128 px, both methods, CPU
    python benchmarks/bench_adapter_methods.py --resolution 512 --device cuda

The pipeline is :func:`erasekit.canvas.full_size.sd14_random` (SD 1.4's UNet and text encoder from
config, random weights: the same compute and memory as the trained model). A run at the papers'
settings (MACE: 50 LoRA steps and 8 generated images of 30 CFG steps; SPM: 3000 iterations, each
sampling x_t for k ~ U{1..29} DDIM steps) takes hours on a CPU, so each method is erased twice with
few steps and the cheapest sampling (after one untimed warm-up erasure that pays the one-time set-up
costs), and the time is extrapolated linearly:

- ``t_cfg``: one classifier-free-guidance sampling step (a batch-2 UNet call), from generating one
  image of 2 steps;
- per step = (t_long - t_short) / (long - short); fixed = t_short - short * per step;
- MACE (``images_per_concept`` 1, ``sample_steps`` 1) at the paper's settings
  = fixed + 50 * per step + (8 * 30 - 1) * t_cfg;
- SPM (``ddim_steps`` 2, so every step samples exactly one DDIM step) at the paper's settings
  = fixed + 3000 * (per step + 14 * t_cfg) (on average 15 sampling steps instead of 1).

Peak memory is the erasure's own measurement (``manifest["peak_memory_bytes"]``: the process's peak
resident set on CPU, including the resident model; ``max_memory_allocated`` on CUDA); it does not
grow with the step count, but it does with the resolution. Writes JSON to
``benchmarks/results/adapter_methods.json``.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run(pipe, method: str, steps: int, **options) -> dict:
    import erasekit

    t = time.perf_counter()
    edit = erasekit.erase(pipe, method, ["Van Gogh"], kind="style", steps=steps, progress=False,
                          checkpoint_dir=None, **options)
    return {"steps": steps, "wall_s": time.perf_counter() - t, "peak_memory_bytes": edit.manifest["peak_memory_bytes"],
            "memory_kind": edit.manifest["memory_kind"], "edit_bytes": edit.nbytes()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--resolution", type=int, default=128)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--methods", nargs="+", default=["mace", "spm"])
    ap.add_argument("--short", type=int, default=1)
    ap.add_argument("--long", type=int, default=2)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "adapter_methods.json")
    args = ap.parse_args()

    import torch

    from erasekit.canvas.full_size import sd14_random

    if args.threads:
        torch.set_num_threads(args.threads)
    pipe = sd14_random(args.resolution).to(args.device)
    result = {"resolution": args.resolution, "device": args.device, "torch": torch.__version__,
              "threads": torch.get_num_threads(), "machine": platform.machine(), "methods": {}}
    from erasekit.pipelines import Sampling, generate

    for _ in range(2):   # the second call is timed: the first pays one-time set-up costs
        t = time.perf_counter()
        generate(pipe, ["a photo in the style of Van Gogh"], [0], Sampling(steps=2), output_type="latent")
        t_cfg = (time.perf_counter() - t) / 2
    result["t_cfg_s"] = t_cfg
    for method in args.methods:
        if method == "mace":
            opts = dict(images_per_concept=1, sample_steps=1, mask_source="attention")
        else:
            opts = dict(ddim_steps=2)
        run(pipe, method, args.short, **opts)   # warm-up (one-time set-up costs), not counted
        short, long = run(pipe, method, args.short, **opts), run(pipe, method, args.long, **opts)
        per_step = (long["wall_s"] - short["wall_s"]) / (args.long - args.short)
        fixed = short["wall_s"] - args.short * per_step
        if method == "mace":
            total = fixed + 50 * per_step + (8 * 30 - 1) * t_cfg
        else:
            total = fixed + 3000 * (per_step + 14 * t_cfg)
        result["methods"][method] = {
            "runs": [short, long], "per_step_s": per_step, "fixed_s": fixed, "extrapolated_s": total,
            "peak_memory_gib": max(short["peak_memory_bytes"], long["peak_memory_bytes"]) / 2 ** 30}
        print(json.dumps({method: result["methods"][method]}, indent=1), flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
