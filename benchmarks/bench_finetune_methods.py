"""Time and peak memory of FMN and CA on the full-size SD 1.4 architecture (random weights), extrapolated.

    python benchmarks/bench_finetune_methods.py                       # fmn (xattn) and ca (kv), 512 px
    python benchmarks/bench_finetune_methods.py --runs fmn-full --force   # FMN's reference set, whole UNet

Each run is one subprocess on ``erasekit.canvas.full_size.sd14_random`` (SD 1.4's UNet and text
encoder, random weights: the same compute and memory as the trained model). A full erasure on a CPU
takes hours, so the script measures its parts and extrapolates:

- ``data_s_per_image_step``: drawing the method's images, per image and DDIM step (one CFG UNet call
  of batch 2), from ``generate_set`` with one image at 2 steps;
- ``train_s_per_step``: one optimizer step, from two erasures of 1 and 2 steps (the difference);
- ``peak_memory_bytes``: the peak of the 2-step erasure (CPU: resident set size, CUDA: allocated);
- ``estimate_s``: images x data steps x the first + steps x the second, with the method's defaults
  on real models (FMN: 10 images at 25 steps, 35 steps; CA: 1000 images at 25 steps, 200 steps at batch 4).

Options as ESD's memory benchmark: ``mixed_precision="bf16"`` on CUDA only, gradient checkpointing
on. Results go to benchmarks/results/finetune_methods.json. ``fmn-full`` trains the whole UNet
(fp32 Adam: about five UNets of memory) and is skipped when the machine has less free memory.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RUNS = {  # name -> (method, options, (images, data steps, train steps) of the real-model default)
    "fmn": ("fmn", {"param_set": "xattn", "batch_size": 1}, (10, 25, 35)),
    "fmn-full": ("fmn", {"param_set": "full", "batch_size": 1}, (10, 25, 35)),
    "ca": ("ca", {"kind": "style", "batch_size": 4, "anchor_prompts": ["a painting of a harbour"]}, (1000, 25, 200)),
    # CA at batch 1 (a quarter of the reference's step), for a machine too slow for batch 4 in the time box
    "ca-b1": ("ca", {"kind": "style", "batch_size": 1, "anchor_prompts": ["a painting of a harbour"]}, (1000, 25, 200)),
}


def child(name: str, args) -> dict:
    import torch

    import erasekit
    from erasekit._profile import measure
    from erasekit.canvas.full_size import sd14_random
    from erasekit.erase.data import generate_set
    from erasekit.pipelines import Sampling

    try:
        Path("/proc/self/oom_score_adj").write_text("1000")
    except OSError:
        pass
    torch.set_num_threads(args.threads)
    device = "cuda" if torch.cuda.is_available() and not args.cpu else "cpu"
    pipe = sd14_random(args.resolution).to(device)
    method, options, (images, data_steps, steps) = RUNS[name]
    t = time.perf_counter()
    generate_set(pipe, ["a painting of a harbour"], 1, 0, Sampling(steps=2))
    data_step = (time.perf_counter() - t) / 2
    common = dict(options, images_per_prompt=1, data_steps=1, progress=False, gradient_checkpointing=True,
                  mixed_precision="bf16" if device == "cuda" else "no", checkpoint_dir=None)
    walls = {}
    for n in (1, 2):
        with measure(device) as usage:
            edit = erasekit.erase(pipe, method, ["Van Gogh"], steps=n, **common)
        walls[n] = usage.wall_time_s
    per_step = walls[2] - walls[1]
    return {"run": name, "method": method, "options": options, "device": device, "resolution": args.resolution,
            "threads": args.threads, "data_s_per_image_step": round(data_step, 2),
            "train_s_per_step": round(per_step, 2), "peak_memory_bytes": usage.peak_memory_bytes,
            "memory_kind": usage.memory_kind, "changed_parameters": sum(w.numel() for w in edit.weights.values()),
            "defaults": {"images": images, "data_steps": data_steps, "steps": steps},
            "estimate_s": round(images * data_steps * data_step + steps * per_step)}


def available_bytes() -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) * 1024
    return 0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", default="fmn,ca", help=f"comma-separated, of {', '.join(RUNS)}")
    ap.add_argument("--resolution", type=int, default=512)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--cpu", action="store_true")
    ap.add_argument("--force", action="store_true", help="run fmn-full even with little free memory")
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--child-out", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        Path(args.child_out).write_text(json.dumps(child(args.child, args)))
        return
    results = {}
    for name in args.runs.split(","):
        need = 5 * 860_000_000 * 4 + 3 * 2**30
        if name == "fmn-full" and not args.force and available_bytes() < need:
            results[name] = {"skipped": f"needs about {need / 2**30:.0f} GiB, {available_bytes() / 2**30:.1f} GiB free"}
            print(name, results[name], flush=True)
            continue
        with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as f:
            out = f.name
        cmd = [sys.executable, __file__, "--child", name, "--child-out", out, "--resolution", str(args.resolution),
               "--threads", str(args.threads)] + (["--cpu"] if args.cpu else [])
        proc = subprocess.run(cmd, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)})
        results[name] = json.loads(Path(out).read_text()) if proc.returncode == 0 else {"error": proc.returncode}
        os.unlink(out)
        print(json.dumps(results[name]), flush=True)
    dest = ROOT / "benchmarks" / "results" / "finetune_methods.json"
    dest.parent.mkdir(parents=True, exist_ok=True)
    dest.write_text(json.dumps({"machine": platform.machine(), "python": platform.python_version(),
                                "results": results}, indent=2))
    print("wrote", dest)


if __name__ == "__main__":
    main()
