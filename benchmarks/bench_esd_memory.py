"""Peak memory of one ESD training step on the full-size SD 1.4 architecture: erasekit vs the reference design.

    python benchmarks/bench_esd_memory.py                          # 512 px, ESD-x, both designs
    python benchmarks/bench_esd_memory.py --resolution 256 --param-set esd-u

Each design runs in its own subprocess, one after the other, on SD 1.4's UNet2DConditionModel
(block_out_channels 320/640/1280/1280, cross_attention_dim 768, layers_per_block 2) and CLIP text
encoder (768 wide, 12 layers) built from config with random weights (same memory and compute as the
trained model, no download):

- ``reference``: the paper-era design (esd.md section 5): a second fp32 UNet as the frozen copy,
  Adam over every UNet parameter, fp32 throughout, no gradient checkpointing.
- ``ours``: ``erasekit.erase(pipe, "esd", ...)`` with ``mixed_precision="bf16"``,
  ``gradient_checkpointing=True``: one UNet, originals of the trained subset only (functional
  frozen call), Adam over the trained subset, trained weights fp32 master copies.

Both do the same step: DDIM x_t sampling partway (``--ddim-steps`` schedule), the two frozen
predictions, one forward + backward of the trained UNet, one optimizer step. On CPU the number is
the peak resident set size of the child process during the step (sampled by
``erasekit._profile.measure``; it includes the resident model), on CUDA ``max_memory_allocated``.
Prints the ratio and writes JSON to benchmarks/results/esd_memory.json. The reference design needs
about five fp32 UNets of memory (weights, frozen copy, gradients, two Adam moments); it is skipped
with a message when the machine's available memory is lower (``--force`` runs it anyway). Children
raise their own OOM score so that the kernel would stop them before anything else.
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


def sd14_pipeline(resolution: int):
    from erasekit.canvas.full_size import sd14_random

    return sd14_random(resolution)


def reference_step(pipe, ddim_steps: int, seed: int = 0) -> None:
    """The reference design's step: frozen deep copy, fp32, Adam over every parameter."""
    import copy

    import torch
    import torch.nn.functional as F

    from erasekit.erase.esd import _ddim, esd_target, sample_partway
    from erasekit.pipelines import FamilyAdapter

    unet = pipe.unet
    frozen = copy.deepcopy(unet).requires_grad_(False)
    unet.requires_grad_(True)
    opt = torch.optim.Adam(unet.parameters(), lr=1e-5)
    ctx = FamilyAdapter(pipe).encode(["", "Van Gogh"])
    sched, gen = _ddim(pipe, ddim_steps), torch.Generator().manual_seed(seed)
    k = int(torch.randint(ddim_steps, (1,), generator=gen))
    z = torch.randn(1, 4, unet.config.sample_size, unet.config.sample_size, generator=gen).to(unet.device)

    def predict(x, t, c):
        with torch.no_grad():
            return unet(x, t, encoder_hidden_states=c.embeds).sample

    z = sample_partway(predict, z, sched, k, ctx, 3.0)
    t = sched.timesteps[k]
    with torch.no_grad():
        e_0, e_p = frozen(torch.cat([z, z]), t, encoder_hidden_states=ctx.embeds).sample.chunk(2)
    loss = F.mse_loss(unet(z, t, encoder_hidden_states=ctx.embeds[1:]).sample, esd_target(e_0, e_p, e_p, 1.0))
    loss.backward()
    opt.step()


def child(design: str, args) -> dict:
    import torch

    import erasekit
    from erasekit._profile import _rss_bytes, measure

    try:
        Path("/proc/self/oom_score_adj").write_text("1000")
    except OSError:
        pass
    torch.set_num_threads(args.threads)
    device = "cuda" if torch.cuda.is_available() and not args.cpu else "cpu"
    pipe = sd14_pipeline(args.resolution).to(device)
    n_unet = sum(p.numel() for p in pipe.unet.parameters())
    base = _rss_bytes()
    with measure(device) as usage:
        if design == "reference":
            reference_step(pipe, args.ddim_steps)
            trained = n_unet
        else:
            edit = erasekit.erase(pipe, "esd", ["Van Gogh"], steps=1, ddim_steps=args.ddim_steps,
                                  param_set=args.param_set, mixed_precision="bf16", gradient_checkpointing=True,
                                  progress=False)
            trained = sum(w.numel() for w in edit.weights.values())
    return {"design": design, "peak_memory_bytes": usage.peak_memory_bytes, "memory_kind": usage.memory_kind,
            "rss_before_step_bytes": base, "wall_time_s": round(usage.wall_time_s, 1), "device": device,
            "unet_parameters": n_unet, "trained_parameters": trained}


def available_bytes() -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) * 1024
    return 0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--resolution", type=int, default=512)
    ap.add_argument("--param-set", default="esd-x")
    ap.add_argument("--ddim-steps", type=int, default=2, help="x_t schedule (memory does not depend on it)")
    ap.add_argument("--designs", default="ours,reference")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--cpu", action="store_true")
    ap.add_argument("--force", action="store_true", help="run the reference even with little free memory")
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--child-out", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        Path(args.child_out).write_text(json.dumps(child(args.child, args)))
        return
    results = {}
    for design in args.designs.split(","):
        need = 5 * 860_000_000 * 4 + 3 * 2**30
        if design == "reference" and not args.force and available_bytes() < need:
            results[design] = {"skipped": f"needs about {need / 2**30:.0f} GiB, "
                                          f"{available_bytes() / 2**30:.1f} GiB available"}
            print(design, results[design], flush=True)
            continue
        with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as f:
            out = f.name
        cmd = [sys.executable, __file__, "--child", design, "--child-out", out] + [
            a for a in sys.argv[1:] if a != "--force"]
        t0 = time.perf_counter()
        res = subprocess.run(cmd, capture_output=True, text=True)
        if res.returncode != 0:
            results[design] = {"failed": res.stderr[-2000:], "returncode": res.returncode}
        else:
            results[design] = json.loads(Path(out).read_text())
        results[design]["process_wall_s"] = round(time.perf_counter() - t0, 1)
        os.unlink(out)
        print(design, {k: v for k, v in results[design].items() if k != "failed"}, flush=True)
    report = {"resolution": args.resolution, "param_set": args.param_set, "ddim_steps": args.ddim_steps,
              "threads": args.threads, "platform": platform.platform(), "results": results}
    ours, ref = results.get("ours", {}), results.get("reference", {})
    if "peak_memory_bytes" in ours and "peak_memory_bytes" in ref:
        report["ratio_ours_over_reference"] = ours["peak_memory_bytes"] / ref["peak_memory_bytes"]
        print(f"peak memory: ours {ours['peak_memory_bytes'] / 2**30:.2f} GiB, reference "
              f"{ref['peak_memory_bytes'] / 2**30:.2f} GiB, ratio {report['ratio_ours_over_reference']:.3f}")
    path = ROOT / "benchmarks" / "results" / "esd_memory.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=2))
    print("->", path)


if __name__ == "__main__":
    main()
