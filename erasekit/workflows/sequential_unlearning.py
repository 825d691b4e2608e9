"""Sequential unlearning (metrics.md 1.5): erase targets one after another, score after each step.

Each step starts from the previous unlearned model and is scored with the same setup as
:func:`erasekit.evaluate` (protocol, judge, CLIP/FID, cache of the original model's records).
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

from ..erase.registry import erase
from ..eval.evaluation import _efficiency, _pipe_id, _scores, _setup, _Setup
from ..eval.protocol import Protocol
from ..eval.report import Report, environment


def sequential(pipe, method: str, targets: list[str], protocol: str | Protocol = "canvas-lite", judge=None,
               out_dir=None, progress: bool = True, method_options: dict | None = None, *, fid="auto",
               clip="auto", fid_reference=None, cache_dir="default", on_missing: str = "fail") -> Report:
    """Sequential unlearning (metrics.md 1.5): erase ``targets`` one after another with ``method``,
    each step starting from the previous unlearned model, and after step i report UA on every
    target erased so far and retention (IRA/CRA) on the rest. The order is recorded; the pipeline
    is restored at the end, also on error.

    A one-step generator (SFD) is not a denoiser the next erasure could start from, so its steps
    continue the distillation instead: step i starts the generator from step i-1's
    (``generator_init``) and forgets every target so far, against the original teacher. An
    inference-time method (SLD, SAFREE) changes no weights, so step i samples one Edit made for every
    target so far."""
    t0 = time.perf_counter()
    s = _setup(pipe, protocol, list(targets), judge, fid, clip, fid_reference, cache_dir, on_missing, None, progress)
    base = s.runner.records(pipe, set(), "original", s.cache_dir)
    applied, steps, previous = [], [], None
    scratch = tempfile.TemporaryDirectory(prefix="erasekit-sequential-")
    try:
        for i, name in enumerate(targets):
            options, concepts = dict(method_options or {}), [name]
            if previous is not None and previous.one_step:   # continue the generator, forget all so far
                options["generator_init"] = str(previous.save(Path(scratch.name) / f"step{i}.safetensors"))
                concepts = list(targets[:i + 1])
            elif previous is not None and previous.inference_time:   # no weights to build on: every target so far
                concepts = list(targets[:i + 1])
            edit = previous = erase(pipe, method, concepts, **options)
            if edit.one_step or edit.inference_time:
                with edit.sampled(pipe) as sampler:
                    rec = s.runner.records(sampler, set(), f"step {i + 1}", None)
            else:
                edit.apply(pipe)
                applied.append(edit)
                rec = s.runner.records(pipe, set(), f"step {i + 1}", None)
            sub = _Setup(**{**s.__dict__, "targets": s.targets[:i + 1], "names": s.names[:i + 1]})
            sc = _scores(sub, rec, base)
            steps.append({"step": i + 1, "erased": name, "UA_per_target": {k: v["UA"] for k, v in
                                                                          sc.get("targets", {}).items()},
                          **{k: sc.get(k) for k in ("UA", "IRA", "CRA")}, "scores": sc,
                          "efficiency": _efficiency(edit, None)})
    finally:
        for edit in reversed(applied):
            edit.remove(pipe)
        scratch.cleanup()
    report = Report(protocol=s.protocol.to_dict(), judge=s.judge.describe(), targets=list(targets),
                    method=f"{method} (sequential)", model={"hash_original": _pipe_id(pipe)},
                    scores=steps[-1]["scores"] if steps else {}, baseline=_scores(s, base, None),
                    sequential=steps, notes=s.notes + [f"sequence order: {list(targets)}"],
                    environment=environment(s.runner.state.num_processes),
                    timing={"total_s": time.perf_counter() - t0})
    if out_dir is not None and s.runner.is_main:
        report.save(out_dir)
    return report
