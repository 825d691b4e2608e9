"""SFD on canvas-mini: one-step vs teacher sampling speed, and forgetting one style (time, UA, IRA, CRA).

    python benchmarks/bench_sfd.py speed                 # canvas-mini (random weights if assets are absent)
    python benchmarks/bench_sfd.py speed --edit sfd.safetensors --images 50 --repeats 3 --threads 1
    python benchmarks/bench_sfd.py forget --style Van_Gogh --out /tmp/sfd-van-gogh [--options '{"iterations": 300}']
    python benchmarks/bench_sfd.py score --edit /tmp/sfd-van-gogh/sfd.safetensors --style Van_Gogh --seeds 5

``speed``: both sides run through :func:`erasekit.pipelines.generate` with the same prompts, seeds and batch:
the teacher with ``Sampling()`` (DDIM, 25 steps, guidance 7.5: 50 UNet evaluations per image), the
one-step pipeline with one UNet evaluation per image; text encoding and VAE decoding are included
on both sides. Without ``--edit`` the one-step side uses the teacher's own UNet as the generator,
which costs exactly what a distilled generator costs (same architecture). Without
erasekit/assets/canvas-mini the canvas-mini architecture is built with random weights (same compute).
Prints one JSON line.

``forget``: runs ``erase(pipe, "sfd", [style], **options)`` (defaults: canvas-mini's preset), records its wall
time, saves the Edit, then scores one-step samples of the 10 objects x 10 styles x ``--seeds`` seeds
("A {object} image in {style} style.") with the canvas judge: UA = 1 - style accuracy on the target
style, IRA = mean style accuracy over the other styles, CRA = mean object accuracy over all objects
(all styles; metrics.md section 1.4). ``--baseline`` scores the un-distilled starting point (the
teacher used as a one-step generator) the same way. Writes ``result.json`` next to the Edit.

``score``: the same scores for a saved SFD Edit (``--edit``, forgetting ``--style``) at ``--seeds`` seeds.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch



def canvas_architecture():
    """canvas-mini's components with random weights (for timing when the trained assets are absent)."""
    import tempfile

    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    from erasekit.canvas import configs as C
    from erasekit.canvas.tokenizer import write_clip_tokenizer

    torch.manual_seed(0)
    tokenizer = CLIPTokenizer.from_pretrained(write_clip_tokenizer(Path(tempfile.mkdtemp())))
    pipe = StableDiffusionPipeline(
        vae=AutoencoderKL(**C.VAE), text_encoder=CLIPTextModel(CLIPTextConfig(**C.TEXT_ENCODER)),
        tokenizer=tokenizer, unet=UNet2DConditionModel(**C.UNET), scheduler=DDIMScheduler(**C.SCHEDULER),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def timed_pair(slow_fn, fast_fn, repeats: int) -> tuple[list[float], list[float]]:
    """Wall times of both, interleaved run by run so that load changes on a shared machine hit both."""
    slow_fn(), fast_fn()  # warm-up (allocations, lazy imports)
    slow, fast = [], []
    for _ in range(repeats):
        for fn, out in ((slow_fn, slow), (fast_fn, fast)):
            t0 = time.perf_counter()
            fn()
            out.append(time.perf_counter() - t0)
    return slow, fast


def load_model(model: str):
    from erasekit._assets import asset_path
    from erasekit.pipelines import load_pipeline

    if model == "canvas-mini" and not (asset_path("canvas-mini", must_exist=False) / "model_index.json").exists():
        return canvas_architecture(), "random (canvas-mini architecture)"
    return load_pipeline(model), model


def speed(a) -> dict:
    from erasekit.canvas.world import OBJECTS, STYLES, caption
    from erasekit.pipelines import Edit, Sampling, generate, one_step_pipeline

    pipe, weights = load_model(a.model)
    edit = Edit.load(a.edit, pipe) if a.edit else None
    fast = one_step_pipeline(pipe, edit, t_init=None if edit else 625)
    prompts = [caption(OBJECTS[i % 10], STYLES[(i // 10) % 10]) for i in range(a.images)]
    seeds = list(range(a.images))
    teacher_sampling, batch = Sampling(batch_size=a.images), Sampling(batch_size=a.images)
    with torch.no_grad():
        slow, quick = timed_pair(lambda: generate(pipe, prompts, seeds, teacher_sampling),
                                 lambda: generate(fast, prompts, seeds, batch), a.repeats)
    return {
        "benchmark": "sfd_one_step_vs_teacher", "model": a.model, "weights": weights,
        "generator": str(a.edit) if a.edit else "teacher UNet (same cost)", "images": a.images,
        "threads": a.threads, "teacher_protocol": teacher_sampling.to_dict(),
        "teacher_s": round(statistics.median(slow), 4), "one_step_s": round(statistics.median(quick), 4),
        "speedup": round(statistics.median(slow) / statistics.median(quick), 2),
        "teacher_runs_s": [round(x, 4) for x in slow], "one_step_runs_s": [round(x, 4) for x in quick],
    }


def canvas_scores(fast, judge, seeds: list[int], target: str) -> dict:
    """UA / IRA / CRA (percent) of one-step samples of every (object, style) cell, per metrics.md 1.4."""
    import numpy as np

    from erasekit.canvas.world import OBJECTS, STYLES, caption
    from erasekit.pipelines import Sampling, generate

    cells = [(o, s) for s in STYLES for o in OBJECTS for _ in seeds]
    images = generate(fast, [caption(o, s) for o, s in cells], seeds * (len(cells) // len(seeds)),
                      Sampling(batch_size=100))
    pred = judge.classify(images)
    style_ok = np.array([judge.heads["style"][i] == s for i, (_, s) in zip(pred["style"], cells)])
    obj_ok = np.array([judge.heads["object"][i] == o for i, (o, _) in zip(pred["object"], cells)])
    acc_s = {s: float(style_ok[[c[1] == s for c in cells]].mean()) for s in STYLES}
    acc_o = {o: float(obj_ok[[c[0] == o for c in cells]].mean()) for o in OBJECTS}
    return {"UA": round(100 * (1 - acc_s[target]), 2),
            "IRA": round(100 * float(np.mean([v for s, v in acc_s.items() if s != target])), 2),
            "CRA": round(100 * float(np.mean(list(acc_o.values()))), 2),
            "object_acc_on_target_prompts": round(100 * float(obj_ok[[c[1] == target for c in cells]].mean()), 2),
            "style_acc": {k: round(100 * v, 1) for k, v in acc_s.items()},
            "images": len(images)}


def _setup(a):
    """(target style, pipeline, weights note, canvas judge) of a forget/score run."""
    from erasekit.canvas.world import STYLES, check_label
    from erasekit.eval.judges import CanvasJudge

    target = STYLES[check_label(a.style, STYLES, "style")]
    pipe, weights = load_model(a.model)
    pipe.to(a.device)
    return target, pipe, weights, CanvasJudge.load(a.judge) if a.judge else CanvasJudge.load()


def score(a) -> dict:
    """Score a saved SFD Edit again (other seeds, more images) without distilling."""
    from erasekit.pipelines import Edit, one_step_pipeline

    if a.edit is None:
        raise SystemExit("score needs --edit (an SFD Edit file)")
    target, pipe, weights, judge = _setup(a)
    edit = Edit.load(a.edit, pipe)
    seeds = list(range(a.seeds))
    return {"benchmark": "sfd_score", "model": a.model, "weights": weights, "edit": str(a.edit), "target": target,
            "threads": a.threads, "eval_seeds": seeds, "sampler": "one_step", "config": edit.manifest.get("config"),
            "sfd": canvas_scores(one_step_pipeline(pipe, edit), judge, seeds, target)}


def forget(a) -> dict:
    from erasekit.erase import erase
    from erasekit.pipelines import Edit, one_step_pipeline

    target, pipe, weights, judge = _setup(a)
    options = json.loads(a.options)
    seeds = list(range(a.seeds))
    out = {"benchmark": "sfd_forget_style", "model": a.model, "weights": weights, "target": target,
           "options": options, "threads": a.threads, "device": a.device, "eval_seeds": seeds, "sampler": "one_step"}
    if a.baseline:
        out["baseline_teacher_one_step"] = canvas_scores(one_step_pipeline(pipe, t_init=625), judge, seeds, target)
    cpu0 = time.process_time()
    edit = erase(pipe, "sfd", [target], **options)
    out["cpu_time_s"] = round(time.process_time() - cpu0, 1)  # robust to other jobs on a shared machine
    a.out.mkdir(parents=True, exist_ok=True)
    edit.save(a.out / "sfd.safetensors")
    out["wall_time_s"] = edit.manifest["wall_time_s"]
    out["peak_memory_bytes"] = edit.manifest["peak_memory_bytes"]
    out["config"] = edit.manifest["config"]
    fast = one_step_pipeline(pipe, Edit.load(a.out / "sfd.safetensors", pipe))
    out["sfd"] = canvas_scores(fast, judge, seeds, target)
    (a.out / "result.json").write_text(json.dumps(out, indent=1))
    return out


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("mode", choices=["speed", "forget", "score"], nargs="?", default="speed")
    p.add_argument("--model", default="canvas-mini", help="canvas-mini or a pipeline directory")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--device", default="cpu", help="forget: where to distil (cpu or cuda)")
    p.add_argument("--edit", type=Path, default=None, help="speed: an SFD Edit (default: teacher UNet as "
                   "generator); score: the SFD Edit to score")
    p.add_argument("--images", type=int, default=50, help="speed: images per call (one batch)")
    p.add_argument("--repeats", type=int, default=3, help="speed: timed runs of each side")
    p.add_argument("--style", default="Van_Gogh", help="forget: the style to forget; score: the style it forgot")
    p.add_argument("--options", default="{}", help="forget: SFD options as JSON")
    p.add_argument("--seeds", type=int, default=5, help="forget, score: evaluation seeds per (object, style)")
    p.add_argument("--judge", default=None, help="forget: canvas judge directory (default erasekit/assets/canvas-judge)")
    p.add_argument("--baseline", action="store_true", help="forget: also score the teacher as a one-step generator")
    p.add_argument("--out", type=Path, default=Path("sfd-bench"), help="forget: output folder")
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    result = {"speed": speed, "forget": forget, "score": score}[a.mode](a)
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
