"""UCE and RECE edit time and Edit size on the full-size SD 1.4 architecture (random weights, CPU).

    python benchmarks/bench_closed_form.py                    # 3 repeats, 1 thread
    python benchmarks/bench_closed_form.py --repeats 5 --threads 2

Builds SD 1.4's UNet2DConditionModel (block_out_channels 320/640/1280/1280, cross_attention_dim 768,
attention_head_dim 8, layers_per_block 2, sample_size 64) and CLIPTextModel (768 wide, 12 layers,
12 heads, intermediate 3072, vocabulary 49,408) from config with random weights: the same compute
as the trained model, no download. Building them is excluded from the timing; each row is the
median wall time and process CPU time of ``erasekit.erase(...)`` (prompt encoding + solve + Edit
construction) after one warm-up, plus the saved Edit's size. On a shared machine the CPU time of a
one-thread run is what the edit costs; the wall time also counts waiting for a core. Prints a table and writes JSON to benchmarks/results/.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
CASES = {  # name -> (method, concepts, options)
    "uce nudity (aligned_tail)": ("uce", ["nudity"], {"preset": "nudity"}),
    "uce nudity (last_word)": ("uce", ["nudity"], {"preset": "nudity", "token_policy": "last_word"}),
    "uce artist (aligned_tail, 'art')": ("uce", ["Van Gogh"], {"preset": "style"}),
    "uce nudity (aligned_tail, float32 solve)": ("uce", ["nudity"], {"preset": "nudity", "solve_dtype": "float32"}),
    "rece nudity (3 epochs)": ("rece", ["nudity"], {"preset": "nudity", "epochs": 3}),
}


def sd14_architecture():
    """SD 1.4's UNet and text encoder with random weights, a tiny VAE (unused), CLIP's tokenizer."""
    from erasekit.canvas.full_size import sd14_random

    return sd14_random()


def run_case(pipe, method, concepts, options, repeats: int) -> dict:
    import erasekit

    erasekit.erase(pipe, method, concepts, **options)   # warm-up
    times, cpu, edit = [], [], None
    for _ in range(repeats):
        t0, c0 = time.perf_counter(), time.process_time()
        edit = erasekit.erase(pipe, method, concepts, **options)
        times.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)
    with tempfile.TemporaryDirectory() as d:
        size = edit.save(Path(d) / "edit.safetensors").stat().st_size
    return {"method": method, "concepts": concepts, "options": options, "median_s": statistics.median(times),
            "times_s": [round(t, 4) for t in times], "median_cpu_s": statistics.median(cpu),
            "file_bytes": size, "tensor_bytes": edit.nbytes(),
            "delta_rank_bound": edit.manifest["delta_rank_bound"], "low_rank_keys": len(edit.deltas),
            "dense_keys": len(edit.weights)}


def encode_time(pipe, repeats: int) -> float:
    from erasekit.pipelines import FamilyAdapter

    adapter = FamilyAdapter(pipe)
    adapter.encode(["nudity", " ", ""])
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        adapter.encode(["nudity", " ", ""])
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def solve_precision(pipe) -> float:
    """Largest relative difference between float32 and float64 solutions of one UCE system."""
    from erasekit.erase.closed_form import kv_weights
    from erasekit.erase.uce import PromptEncoder, UCEConfig, resolve, uce_fitter
    from erasekit.pipelines import FamilyAdapter

    fitter = uce_fitter(PromptEncoder(FamilyAdapter(pipe)), resolve(UCEConfig(preset="nudity"), ["nudity"]))
    x64 = fitter.solve()
    fitter.dtype = torch.float32
    x32 = fitter.solve()
    worst = 0.0
    for w in kv_weights(pipe).values():
        a, b = x64.factors(w), x32.factors(w)
        d64, d32 = a[0].double() @ a[1].double(), b[0].double() @ b[1].double()
        worst = max(worst, float((d64 - d32).norm() / d64.norm()))
    return worst


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "closed_form.json")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    pipe = sd14_architecture()
    build_s = time.perf_counter() - t0
    rows = {name: run_case(pipe, *case, repeats=args.repeats) for name, case in CASES.items()}
    result = {
        "benchmark": "closed_form", "architecture": "SD 1.4 (random weights)", "device": "cpu",
        "threads": args.threads, "cpu_count": os.cpu_count(), "load_avg_1m": round(os.getloadavg()[0], 2),
        "platform": platform.platform(), "torch": torch.__version__, "build_s_excluded": round(build_s, 1),
        "encode_3_prompts_s": round(encode_time(pipe, args.repeats), 4),
        "float32_vs_float64_delta_rel_diff": solve_precision(pipe), "cases": rows,
    }
    print(f"{'case':44s} {'wall s':>8s} {'cpu s':>8s} {'file MB':>9s} {'rank<=':>7s} {'low-rank/dense':>15s}")
    for name, r in rows.items():
        print(f"{name:44s} {r['median_s']:8.3f} {r['median_cpu_s']:8.3f} {r['file_bytes'] / 1e6:9.3f} "
              f"{r['delta_rank_bound']:7d} "
              f"{r['low_rank_keys']:>8d}/{r['dense_keys']:<6d}")
    print(f"encode 3 prompts: {result['encode_3_prompts_s']:.3f} s; float32 vs float64 solve, relative "
          f"difference of the change: {result['float32_vs_float64_delta_rel_diff']:.2e}; "
          f"threads {args.threads}, load {result['load_avg_1m']}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()
