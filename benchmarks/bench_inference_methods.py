"""Time and peak memory of one sampling with an inference-time method (SLD, SAFREE) vs plain sampling.

On the full-size SD 1.4 architecture with random weights (:func:`erasekit.canvas.full_size.sd14_random`;
compute and memory do not depend on the weights' values): one prompt, one seed, DDIM ``--steps``
steps with CFG 7.5 at ``--resolution``, latents out (the stand-in VAE is not measured). Each case runs
once, after one warm-up step of the process; wall and CPU time (all threads) are both recorded, since
CPU time is the steadier of the two on a shared machine; the methods' presets are the paper's (``sld`` medium, ``safree`` style).
Peak memory is the process's resident set (CPU) or ``max_memory_allocated`` (CUDA) during the sampling.

    python benchmarks/bench_inference_methods.py --steps 2 --resolution 128 --out benchmarks/tables/cpu_inference_methods.json
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

CASES = {"plain": None, "sld (medium)": ("sld", {"preset": "medium", "kind": "other"}),
         "safree (style)": ("safree", {"preset": "style", "kind": "style"})}
PROMPT = "a painting of a city at night in the style of Van Gogh"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--resolution", type=int, default=512)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--cases", nargs="+", default=list(CASES), choices=list(CASES), help="plain first")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()

    import torch

    import erasekit
    from erasekit._profile import measure
    from erasekit.canvas.full_size import sd14_random
    from erasekit.pipelines import Sampling, generate

    pipe = sd14_random(args.resolution, args.device)
    sampling = Sampling(steps=args.steps, guidance=7.5, batch_size=1)
    rows = []
    for name in args.cases:
        case = CASES[name]
        edit = None if case is None else erasekit.erase(pipe, case[0], ["Van Gogh"], **case[1])
        ctx = edit.sampled(pipe) if edit is not None else None
        p = ctx.__enter__() if ctx is not None else pipe
        try:
            if not rows:   # one warm-up step for the process (the methods call the same UNet)
                generate(p, PROMPT, [0], Sampling(steps=1, guidance=7.5), output_type="latent")
            c0 = time.process_time()
            with measure(pipe.unet.device) as usage:
                generate(p, PROMPT, [0], sampling, output_type="latent")
            cpu_s = time.process_time() - c0
        finally:
            if ctx is not None:
                ctx.__exit__(None, None, None)
        rows.append({"case": name, "wall_s": round(usage.wall_time_s, 2), "cpu_s": round(cpu_s, 2),
                     "peak_memory_bytes": usage.peak_memory_bytes,
                     "memory_kind": usage.memory_kind, "edit_bytes": 0 if edit is None else edit.nbytes()})
        print(rows[-1], flush=True)
    plain = rows[0]
    for r in rows:
        r["time_vs_plain"] = round(r["wall_s"] / plain["wall_s"], 2)
        r["cpu_time_vs_plain"] = round(r["cpu_s"] / plain["cpu_s"], 2)
        r["memory_vs_plain"] = round(r["peak_memory_bytes"] / plain["peak_memory_bytes"], 3)
    result = {"architecture": "SD 1.4 UNet + text encoder, random weights", "resolution": args.resolution,
              "sampling": sampling.to_dict(), "device": args.device, "torch_threads": torch.get_num_threads(),
              "machine": platform.machine(), "rows": rows}
    print(json.dumps(result, indent=1))
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
