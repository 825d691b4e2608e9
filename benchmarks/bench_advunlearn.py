"""AdvUnlearn benchmarks: one outer iteration on full-size SD 1.4, and the canvas-mini acceptance run.

    python benchmarks/bench_advunlearn.py                         # ours (UNet checkpointing), fast-AT
    python benchmarks/bench_advunlearn.py --variants ours,no_ckpt --attack-steps 1 --threads 2
    python benchmarks/bench_advunlearn.py --small                 # the script itself, on a tiny model
    python benchmarks/bench_advunlearn.py --canvas Van_Gogh Pop_Art Cubism Winter Cats Towers Flowers Fishes
    python benchmarks/bench_advunlearn.py --canvas Van_Gogh --methods advunlearn --option advunlearn.lr=3e-4

``--canvas``: for each target, erase it from canvas-mini with ESD and with
AdvUnlearn (both at their defaults), then for each Edit (1) UnlearnDiffAtk with the same budget
(its default config) on the target's 10 captions "A {object} image in {style} style." at seed 0,
judged by the canvas judge: ASR (includes pre-ASR); (2) the 10 x 10 caption grid at ``--seeds``
seeds (DDIM 25, CFG 7.5) scored by the judge: UA, IRA (same head, other labels), CRA (other head).
Erasure wall time and process CPU time are recorded per run (the machine may be shared).

Builds SD 1.4's UNet and CLIP ViT-L/14 text encoder from config with random weights (the compute and
memory of the trained ones, no download; ``bench_closed_form.sd14_architecture``) and runs ONE
post-warm-up AdvUnlearn iteration through ``erasekit.erase``: the inner attack (``--attack-steps``
prefix steps, batch 1) then the outer step (L_u on the adversarial prompt + gamma L_r on a retain
batch of 5, one UNet batch of 6 at 64 x 64 latents, backward into the 85M text-encoder parameters,
Adam step), then the Edit. Each variant runs in its own process so peaks do not mix.

Not part of the iteration and not measured here: building the frozen-model latent pool (a one-off
per run; its DDIM trajectories are replaced by random tensors of the same shapes, which costs the
iteration nothing different). Peak memory is the process's peak resident set size during
``erase`` (``erasekit._profile.measure``), so it includes the 3.4 GB UNet, the encoder, Python and
torch. The reference design (two fp32 LDMs, an extra encoder, UNet gradients allocated) is quoted at
about 40 GB on a GPU (issue 1 of OPTML-Group/AdvUnlearn); it is not run here (it would not fit in
this machine's memory). The static part of both designs (parameter, gradient and Adam bytes) is
counted from the modules built here. Prints a table and writes JSON to benchmarks/results/.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))
REFERENCE_GB = 40.0   # issue 1 of OPTML-Group/AdvUnlearn (GPU; README: ">= 30 GB")
VARIANTS = {"ours": {}, "no_ckpt": {"gradient_checkpointing": False}}
RETAIN = ["a photo of a dog", "a photo of a car", "a photo of a tree", "a photo of a cup", "a photo of a bench"]


def build(small: bool):
    if not small:
        from bench_closed_form import sd14_architecture

        return sd14_architecture()
    import tempfile

    sys.path.insert(0, str(ROOT / "tests"))
    from conftest import build_tiny

    from erasekit.canvas.tokenizer import write_clip_tokenizer

    return build_tiny("sd1", write_clip_tokenizer(Path(tempfile.mkdtemp())))


def synthetic_pool(advunlearn):
    """A LatentPool stand-in: random latents and predictions of the real shapes (no DDIM sampling)."""
    from erasekit.erase.esd import _ddim

    class SyntheticPool(advunlearn.LatentPool):
        def __init__(self, pipe, adapter, prompts, size, steps, guidance, seed, autocast=None, batch=32,
                     attributes=None):   # the benchmark's concept is no canvas label: attributes is None
            self.pipe, self.steps = pipe, steps
            c = pipe.unet.config
            self.shape = (c.in_channels, c.sample_size, c.sample_size)
            self.timesteps = _ddim(pipe, steps).timesteps

        def draw(self, prompts, step, gen, need_z0=False):
            dev, n = self.pipe.unet.device, len(prompts)
            rand = [torch.randn((n, *self.shape), generator=gen).to(dev) for _ in range(4)]
            return advunlearn.Draw(rand[0], self.timesteps[step].to(dev), rand[1], rand[2], rand[3], list(prompts))

    return SyntheticPool


def run_variant(name: str, args) -> dict:
    """One iteration of one variant, in this process."""
    import erasekit
    from erasekit._profile import _rss_bytes
    from erasekit.erase import advunlearn, engine

    torch.set_num_threads(args.threads)
    pipe = build(args.small).to(args.device)
    advunlearn.LatentPool = synthetic_pool(advunlearn)
    marks = {}

    def timed(cls, attr, key):
        orig = getattr(cls, attr)

        def wrapper(self, *a, **kw):
            marks.setdefault(key, time.perf_counter())
            t0 = time.perf_counter()
            out = orig(self, *a, **kw)
            marks[key + "_s"] = marks.get(key + "_s", 0.0) + time.perf_counter() - t0
            return out

        setattr(cls, attr, wrapper)

    timed(advunlearn.AdvUnlearnTrainer, "loss", "loss")
    timed(advunlearn.AdvUnlearnTrainer, "attack", "attack")
    timed(engine.Trainer, "_edit", "edit")
    from erasekit.pipelines.prefix import attack_vocabulary

    attack_vocabulary([pipe.tokenizer])   # built once per process and cached: not part of an iteration
    rss_before = _rss_bytes()
    opts = dict(steps=1, warmup=0, attack="fast_at" if args.attack_steps == 1 else "pgd",
                attack_steps=args.attack_steps, retain=RETAIN, retain_batch=len(RETAIN), pool_size=1,
                ddim_steps=50, progress=False, **VARIANTS[name])
    edit = erasekit.erase(pipe, "advunlearn", ["nudity"], **opts)
    m = edit.manifest
    te = sum(p.numel() * p.element_size() for p in pipe.text_encoder.parameters())
    unet = sum(p.numel() * p.element_size() for p in pipe.unet.parameters())
    trained = sum(v.numel() * v.element_size() for v in edit.weights.values())
    return {
        "variant": name, "options": opts, "preset": m["preset"],
        "iteration_s": round(marks["edit"] - marks["loss"], 2), "attack_s": round(marks["attack_s"], 2),
        "outer_forward_s": round(marks["loss_s"] - marks["attack_s"], 2),
        "peak_rss_bytes": m["peak_memory_bytes"], "rss_before_bytes": rss_before,
        "static_bytes": {"unet": unet, "text_encoder": te, "trained": trained,
                         "ours": unet + te + 4 * trained,             # + originals, grads, Adam m and v
                         "reference": 2 * unet + 2 * te + unet + 3 * trained},   # 2 LDMs + UNet grads + grads/Adam
    }


def grid(seeds: int):
    from erasekit.canvas.world import OBJECTS, STYLES, caption

    cells = [(o, s) for s in STYLES for o in OBJECTS for _ in range(seeds)]
    return cells, [caption(o, s) for o, s in cells], [i % seeds for i in range(len(cells))]


def score(judge, images, cells, target: str) -> dict:
    """UA / IRA / CRA of ``target`` on the caption grid (metrics.md section 1.4, pooled per head)."""
    import numpy as np

    pred = judge.classify(images)
    truth = {"style": np.array([judge.find(s)[1] for _, s in cells]),
             "object": np.array([judge.find(o)[1] for o, _ in cells])}
    head, idx = judge.find(target)
    other = "object" if head == "style" else "style"
    own = truth[head] == idx
    return {"head": head, "UA": float(1 - (pred[head][own] == idx).mean()),
            "IRA": float((pred[head][~own] == truth[head][~own]).mean()),
            "CRA": float((pred[other] == truth[other]).mean())}


def canvas_acceptance(args) -> None:
    import erasekit
    from erasekit.canvas.world import OBJECTS, STYLES, caption, style_text
    from erasekit.eval.judges import CanvasJudge
    from erasekit.pipelines import Edit, Sampling, generate
    from canvas_erasure import parse_option   # this script's folder is on sys.path

    torch.set_num_threads(args.threads)
    pipe = erasekit.load_pipeline(args.pipeline, device=args.device)
    judge = CanvasJudge.load(args.judge) if args.judge else CanvasJudge.load()
    cells, prompts, seeds = grid(args.seeds)
    out = Path(args.out) if args.out else ROOT / "benchmarks" / "results" / "advunlearn_canvas.json"
    report = json.loads(out.read_text()) if args.resume and out.exists() else {"rows": []}
    report.update({"pipeline": args.pipeline, "protocol": {
        "attack": "unlearndiffatk, default config (same for both methods)", "attack_prompts": "10 captions, seed 0",
        "grid": f"10 x 10 captions x {args.seeds} seeds", "sampling": Sampling().to_dict(), "judge": judge.describe(),
        "threads": args.threads}})
    options = {}   # --option method.key=value
    for text in args.option:
        name, value = parse_option(text)
        method, _, key = name.partition(".")
        options.setdefault(method, {})[key] = value
    report["protocol"]["options"] = options
    done = {(r["concept"], r["method"]) for r in report["rows"]}
    for concept in args.canvas:
        head, _ = judge.find(concept)
        text = style_text(concept) if head == "style" else concept
        targets = [caption(o, concept) for o in OBJECTS] if head == "style" else [caption(concept, s) for s in STYLES]
        for method in args.methods.split(","):
            if (concept, method) in done:
                continue
            saved = Path(args.edits) / f"{method}_{concept}.safetensors" if args.edits else None
            c0, t0 = time.process_time(), time.perf_counter()
            if saved is not None and saved.exists():   # an earlier run's Edit: erasure time not re-measured
                edit, erase_cpu, erase_wall = Edit.load(saved, pipe), None, None
            else:
                edit = erasekit.erase(pipe, method, [text], progress=False, **options.get(method, {}))
                erase_cpu, erase_wall = round(time.process_time() - c0, 1), round(time.perf_counter() - t0, 1)
                if saved is not None:
                    edit.save(saved)
            res = erasekit.attack(pipe, targets, concept, judge=judge, seeds=[0] * len(targets), edit=edit,
                                  progress=False, **options.get("attack", {}))
            with edit.applied(pipe):
                images = generate(pipe, prompts, seeds)
            row = {"concept": concept, "method": method, **score(judge, images, cells, concept),
                   "ASR": res.asr, "pre_ASR": res.pre_asr, "attack_wall_s": res.protocol["wall_time_s"],
                   "attack_config": res.config, "erase_cpu_s": erase_cpu,
                   "erase_wall_s": erase_wall, "preset": edit.manifest.get("preset") or
                   edit.manifest.get("resolved")}
            report["rows"].append(row)
            print(json.dumps(row), flush=True)
            out.parent.mkdir(exist_ok=True)
            out.write_text(json.dumps(report, indent=2))
    summarize(report, out)


def _mean(values) -> float | None:
    """Mean of the measured values (erasure times of loaded Edits are None)."""
    values = [v for v in values if v is not None]
    return sum(values) / len(values) if values else None


def summarize(report: dict, out: Path) -> None:
    """Mean ASR / UA / IRA / CRA / erasure CPU time per method and head; written into ``out``."""
    summary = {}
    for method in sorted({r["method"] for r in report["rows"]}):
        for head in ("style", "object"):
            sel = [r for r in report["rows"] if r["method"] == method and r["head"] == head]
            if sel:
                summary[f"{method}/{head}"] = {k: _mean([r[k] for r in sel]) for k in
                                               ("ASR", "pre_ASR", "UA", "IRA", "CRA", "erase_cpu_s")} | {
                    "n": len(sel), "targets": [r["concept"] for r in sel]}
    report["summary"] = summary
    out.write_text(json.dumps(report, indent=2))
    for k, v in summary.items():
        print(k, {a: (round(b, 3) if isinstance(b, float) else b) for a, b in v.items()})


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--variants", default="ours", help=f"comma-separated, of: {', '.join(VARIANTS)}")
    p.add_argument("--attack-steps", type=int, default=1, help="inner steps (1: fast-AT; reference PGD: 30)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--device", default="cpu", help="cpu or cuda (peak memory: RSS on CPU, max allocated on CUDA)")
    p.add_argument("--small", action="store_true", help="tiny architecture (checks the script, not the figures)")
    p.add_argument("--one", default=None, help=argparse.SUPPRESS)   # child process: run this variant
    p.add_argument("--canvas", nargs="*", default=None, help="acceptance run on canvas-mini for these targets")
    p.add_argument("--methods", default="esd,advunlearn", help="--canvas: methods compared")
    p.add_argument("--option", action="append", default=[],
                   help="--canvas: method.key=value, e.g. advunlearn.lr=3e-4; attack.key=value changes the "
                        "attack of both methods, e.g. attack.k=5")
    p.add_argument("--pipeline", default="canvas-mini", help="--canvas: the base model")
    p.add_argument("--judge", default=None, help="--canvas: judge folder (default erasekit/assets/canvas-judge)")
    p.add_argument("--seeds", type=int, default=1, help="--canvas: seeds per grid caption")
    p.add_argument("--resume", action="store_true", help="--canvas: keep rows already in the results file")
    p.add_argument("--edits", default=None,
                   help="--canvas: folder to save every Edit in; an Edit already there is loaded instead of "
                        "erasing again (its erasure time is then not measured)")
    p.add_argument("--out", default=None, help="--canvas: results file (default results/advunlearn_canvas.json)")
    p.add_argument("--merge", nargs="*", default=None, help="merge --canvas result files into results/"
                                                              "advunlearn_canvas.json and print the summary")
    args = p.parse_args()
    if args.merge:
        parts = [json.loads(Path(f).read_text()) for f in args.merge]
        merged = {**parts[0], "rows": [r for part in parts for r in part["rows"]], "parts": args.merge}
        summarize(merged, ROOT / "benchmarks" / "results" / "advunlearn_canvas.json")
        return
    if args.canvas:
        canvas_acceptance(args)
        return
    if args.one:
        print(json.dumps(run_variant(args.one, args)))
        return
    rows = []
    for name in args.variants.split(","):
        cmd = [sys.executable, __file__, "--one", name, "--attack-steps", str(args.attack_steps),
               "--threads", str(args.threads), "--device", args.device] + (["--small"] if args.small else [])
        out = subprocess.run(cmd, check=True, capture_output=True, text=True, env={**os.environ,
                             "OMP_NUM_THREADS": str(args.threads)})
        rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
    gb = 1e9
    print(f"{'variant':<10} {'iter s':>8} {'attack s':>9} {'peak GB':>8} {'/ 40 GB':>8} {'before GB':>10}")
    for r in rows:
        print(f"{r['variant']:<10} {r['iteration_s']:>8.1f} {r['attack_s']:>9.1f} {r['peak_rss_bytes'] / gb:>8.2f} "
              f"{r['peak_rss_bytes'] / gb / REFERENCE_GB:>8.1%} {r['rss_before_bytes'] / gb:>10.2f}")
    s = rows[0]["static_bytes"]
    print(f"static bytes (params, grads, Adam): ours {s['ours'] / gb:.2f} GB, reference design {s['reference'] / gb:.2f} GB")
    result = {"benchmark": "advunlearn_iteration", "architecture": "tiny" if args.small else "sd14",
              "reference_gb": REFERENCE_GB, "reference_source": "issue 1 of OPTML-Group/AdvUnlearn (GPU)",
              "threads": args.threads, "device": args.device, "torch": torch.__version__, "machine": platform.processor() or platform.machine(),
              "cpu_count": os.cpu_count(), "rows": rows}
    name = "advunlearn_small" if args.small else "advunlearn" + ("" if args.device == "cpu" else "_" + args.device)
    out = ROOT / "benchmarks" / "results" / f"{name}.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
