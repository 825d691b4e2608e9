"""Evaluation on canvas-mini: the unedited model's baseline row and the cost of evaluating one Edit.

    python benchmarks/bench_eval.py --protocol canvas-lite --method uce --concept Van_Gogh
    python benchmarks/bench_eval.py --protocol canvas --method uce --concept Van_Gogh --clip runs/canvas-clip-run/clip

Runs ``erasekit.evaluate`` twice: first with an empty cache of original-model records (the
original model's images are made, then the edited model's: the cold cost of one Edit), then again
with the filled cache (the warm cost). Prints wall time and this process's CPU time (which does
not grow when other jobs share the machine), and the baseline: UA / IRA / CRA of the unedited
model with each style and each object as the target (UnlearnCanvas' definitions, metrics.md 1.4).
Results go to benchmarks/results/eval_<protocol>.json.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def timed(fn):
    w, c = time.perf_counter(), time.process_time()
    out = fn()
    return out, {"wall_s": round(time.perf_counter() - w, 1), "cpu_s": round(time.process_time() - c, 1)}


def baseline_rows(scores: dict, protocol) -> dict:
    """UA/IRA/CRA of the unedited model for every style and every object as the target."""
    import numpy as np

    from erasekit.eval.canvas_metrics import unlearncanvas_scores

    counts = {k: np.asarray(v) for k, v in scores["counts"].items()}
    rows = {}
    for head, axis in (("style", protocol.themes), ("object", protocol.objects)):
        for i, name in enumerate(axis):
            t = unlearncanvas_scores(counts, protocol.expected(), list(protocol.themes), list(protocol.objects),
                                     [(head, i)], protocol.photo_theme)["targets"][name]
            rows[name] = {k: round(v, 1) if isinstance(v, float) else v for k, v in t.items()}
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--protocol", default="canvas-lite", choices=["canvas-lite", "canvas"])
    p.add_argument("--method", default="uce")
    p.add_argument("--concept", default="Van_Gogh")
    p.add_argument("--clip", default=None, help="canvas CLIP folder (default: erasekit/assets/canvas-clip)")
    p.add_argument("--threads", type=int, default=1)
    a = p.parse_args()
    import torch

    torch.set_num_threads(a.threads)
    import erasekit
    from erasekit._assets import asset_path
    from erasekit.eval.clip_score import load_canvas_clip
    from erasekit.eval.protocol import get_protocol

    (pipe, edit), t_setup = timed(lambda: _pipe_and_edit(a))
    clip = load_canvas_clip(a.clip) if a.clip else "auto"
    protocol = get_protocol(a.protocol)
    with tempfile.TemporaryDirectory() as cache:
        run = lambda: erasekit.evaluate(pipe, edit, protocol=protocol, clip=clip, fid=clip,  # noqa: E731
                                        cache_dir=cache, progress=False, out_dir=ROOT / "benchmarks/results" /
                                        f"eval_{a.protocol}_{a.method}")
        report, cold = timed(run)
        again, warm = timed(run)
    result = {"protocol": report.protocol, "method": a.method, "concept": a.concept,
              "base_model_step": json.loads((asset_path("canvas-mini") / "training_step.json").read_text()),
              "torch_threads": a.threads, "load_and_erase": t_setup, "evaluate_cold_cache": cold,
              "evaluate_warm_cache": warm, "edited": report.summary(), "baseline_summary": {
                  k: report.baseline.get(k) for k in ("mean_style_accuracy", "mean_object_accuracy")},
              "baseline_accuracy": {"style": report.baseline["style_accuracy"],
                                    "object": report.baseline["object_accuracy"]},
              "baseline_rows": baseline_rows(report.baseline, protocol),
              "fid": report.scores.get("fid"), "clip": report.scores.get("clip"),
              "baseline_fid": report.baseline.get("fid"), "notes": report.notes}
    out = ROOT / "benchmarks/results" / f"eval_{a.protocol}.json"
    out.write_text(json.dumps(result, indent=1, default=str))
    print(json.dumps({k: result[k] for k in ("load_and_erase", "evaluate_cold_cache", "evaluate_warm_cache",
                                             "edited", "baseline_summary")}, indent=1))
    for name, r in result["baseline_rows"].items():
        print(f"{name:16s} {r['head']:6s} UA {r['UA']:5.1f}  IRA {r['IRA']:5.1f}  CRA {r['CRA']:5.1f}")
    print(f"wrote {out}")


def _pipe_and_edit(a):
    import erasekit

    pipe = erasekit.load_pipeline("canvas-mini")
    return pipe, erasekit.erase(pipe, a.method, [a.concept])


if __name__ == "__main__":
    main()
