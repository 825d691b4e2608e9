"""What a faster setting would buy the canvas runs: the canvas-mini UNet's time per call, per setting.

    python benchmarks/bench_unet_settings.py              # the canvas protocol's shapes, 1 thread
    python benchmarks/bench_unet_settings.py --no-compile # leave out torch.compile (no C++ compiler)

The ``canvas`` protocol spends almost all of an evaluation in the UNet (25 DDIM steps x 2 guidance
branches for each of 500 images), and the methods' erasures and UnlearnDiffAtk in its forward and
backward passes. This script times one UNet call at the protocol's sampling batch (2 x ``batch_size``
latents, no gradient) and one training step (forward and backward at ``--train-batch``) under:

- ``eager``: float32, as the benchmark runs;
- ``channels_last``: float32, memory format NHWC;
- ``compile``: float32, ``torch.compile`` (inductor), first call's compile time reported apart;
- ``bf16``: ``torch.autocast`` to bfloat16, eager, and ``bf16+compile``.

For each: seconds per call (median of ``--repeats`` after a warm-up), speed-up over ``eager``, and the
largest absolute difference of the UNet's output from ``eager``'s (noise predictions of unit scale):
round-off (about 1e-6) leaves the benchmark's images and numbers as they are; a bf16 difference does
not. Writes ``benchmarks/results/unet_settings.json`` with the machine, torch version and threads.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from contextlib import nullcontext
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _timed(fn, repeats: int) -> tuple[float, float, object]:
    """(first call's seconds, median seconds of ``repeats`` later calls, last output)."""
    t = time.perf_counter()
    out = fn()
    first = time.perf_counter() - t
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t)
    return first, statistics.median(times), out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--threads", type=int, default=1, help="torch threads (the benchmark's workers use 1)")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--train-batch", type=int, default=8, help="latents per training step")
    p.add_argument("--no-compile", action="store_true", help="leave out the torch.compile settings")
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "unet_settings.json")
    a = p.parse_args()
    import torch

    torch.set_num_threads(a.threads)
    import erasekit
    from erasekit.eval.protocol import get_protocol

    pipe = erasekit.load_pipeline("canvas-mini")
    unet = pipe.unet.eval().requires_grad_(False)
    sampling = get_protocol("canvas").sampling
    cfg = unet.config
    g = torch.Generator().manual_seed(0)

    def inputs(n: int):
        return (torch.randn(n, cfg.in_channels, cfg.sample_size, cfg.sample_size, generator=g),
                torch.full((n,), 500), torch.randn(n, 77, cfg.cross_attention_dim, generator=g))

    sample_in, train_in = inputs(2 * sampling.batch_size), inputs(a.train_batch)
    settings = ["eager", "channels_last", "bf16"] + ([] if a.no_compile else ["compile", "bf16+compile"])
    rows, ref = {}, {}
    for name in settings:
        model = unet.to(memory_format=torch.channels_last if name == "channels_last" else torch.contiguous_format)
        call = torch.compile(model) if "compile" in name else model
        cast = (lambda: torch.autocast("cpu", dtype=torch.bfloat16)) if "bf16" in name else nullcontext

        def sample():
            with torch.no_grad(), cast():
                return call(*sample_in).sample.float()

        def train():
            model.requires_grad_(True)
            model.zero_grad(set_to_none=True)
            with cast():
                y = call(*train_in).sample
            y.float().pow(2).mean().backward()
            model.requires_grad_(False)
            return y.detach().float()

        row = {}
        for kind, fn in (("sample", sample), ("train", train)):
            first, sec, out = _timed(fn, a.repeats)
            ref.setdefault(kind, out)
            row[kind] = {"s_per_call": round(sec, 4), "first_call_s": round(first, 2),
                         "max_abs_diff": float((out - ref[kind]).abs().max())}
            print(f"{name:14s} {kind:6s} {sec:.4f} s/call (first {first:.1f} s), "
                  f"max |diff| {row[kind]['max_abs_diff']:.2g}", flush=True)
        rows[name] = row
        torch._dynamo.reset()
    for row in rows.values():
        for kind, r in row.items():
            r["speedup"] = round(rows["eager"][kind]["s_per_call"] / r["s_per_call"], 2)
    doc = {"model": "canvas-mini UNet", "sampling_batch": 2 * sampling.batch_size, "train_batch": a.train_batch,
           "threads": a.threads, "repeats": a.repeats, "torch": torch.__version__,
           "erasekit_version": erasekit.__version__,
           "machine": f"{platform.machine()}, {platform.processor() or '-'}, {platform.platform()}",
           "settings": rows}
    from erasekit._io import write_text_atomic

    a.out.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(a.out, json.dumps(doc, indent=1))
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
