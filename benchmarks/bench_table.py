"""The benchmark: every method erased, scored and attacked the same way on canvas-mini, with its cost.

    python benchmarks/bench_table.py                       # everything: 2 worker processes, resumable
    python benchmarks/bench_table.py --methods uce rece    # some methods (and the original row)
    python benchmarks/bench_table.py --render              # rebuild table.md / table.json from finished jobs
    erasekit bench table -- --out DIR                      # the same through the CLI

What it runs (every job seeded, each one's result written atomically to ``OUT/jobs/<job>.json`` as
soon as it finishes; a rerun skips finished jobs, and long erasures resume from their checkpoints in
``OUT/checkpoints/``):

- ``original``: the unedited model on the protocol (cached records reused by every other job) and its
  pre-ASR on the attack prompts.
- ``cell/<method>/<target>`` for each method and each of 4 styles and 4 objects: erase with the
  method's defaults (the budget below for SFD), save the Edit (its file size is the storage figure),
  evaluate on ``canvas-lite`` (UA / IRA / CRA by the canvas judge, FID and CLIP score on canvas-CLIP
  features, FID against held-out renders of the non-target cells), and attack with UnlearnDiffAtk
  (its default configuration) on the target's captions for the first 5 objects (or styles) at seed
  0, target images from the original model. ASR includes pre-ASR (UnlearnDiffAtk's definition).
- ``sequential/<method>``: the 5 styles of ``SEQUENCE`` erased one after another
  (:func:`erasekit.workflows.sequential`), scored after each step.
- ``ratio/closed_form`` (UCE / RECE edit time on the SD 1.4 architecture, random weights) and
  ``ratio/one_step`` (SFD one-step sampling against the teacher's DDIM 25): their own scripts.

SFD runs its default two-stage recipe (``SFD_STAGE1``, ``SFD_OPTIONS``) with stage 1 done once:
one plain one-step distillation of every caption (``sfd/stage1``, no forgetting, shared by every SFD
job, the counterpart of the SiD-LSG checkpoint the reference starts from), then the default
forgetting run per target from it. Every other method runs at its defaults. The budgets are in the JSON.

Erase time is the erasure's wall time and this process's CPU time; peak memory is the process's
peak resident set during the erasure (CPU) as recorded in the Edit's manifest.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FORMAT = "erasekit.bench-table/1"
METHODS = ("uce", "rece", "esd", "salun", "advunlearn", "sfd")
STYLES = ("Van_Gogh", "Pop_Art", "Ukiyoe", "Cubism")
OBJECTS = ("Flowers", "Cats", "Towers", "Fishes")
SEQUENCE = ("Van_Gogh", "Pop_Art", "Ukiyoe", "Cubism", "Watercolor")
PROTOCOL = "canvas-lite"
ATTACK_PROMPTS = 5       # captions per target: the first 5 objects (style target) or styles (object target)
SFD_STAGE1 = {"iterations": 400, "forget_batch_size": 0, "distill_iterations": 0}
SFD_OPTIONS = {"iterations": 200}
# rough CPU seconds of each job on one core, only to order the work (longest first)
COST = {"uce": 90, "rece": 110, "esd": 250, "salun": 190, "advunlearn": 320, "sfd": 360}


# -- jobs -------------------------------------------------------------------------------------------
def jobs(methods, styles=STYLES, objects=OBJECTS, sequence=SEQUENCE, sfd_stage1=None, sfd=None) -> dict[str, dict]:
    """Every job of the benchmark: name -> {kind, needs (jobs that must finish first), cost, ...}."""
    sfd_stage1, sfd = {**SFD_STAGE1, **(sfd_stage1 or {})}, {**SFD_OPTIONS, **(sfd or {})}
    out = {"original": {"kind": "original", "targets": [*styles, *objects], "needs": [], "cost": 60}}
    if "sfd" in methods:
        out["sfd/stage1"] = {"kind": "sfd_stage1", "needs": [], "cost": 10_000, "budget": sfd_stage1}
    for m in methods:
        extra = {"needs": ["original", "sfd/stage1"], "budget": sfd} if m == "sfd" else {"needs": ["original"]}
        for t in [*styles, *objects]:
            out[f"cell/{m}/{t}"] = {"kind": "cell", "method": m, "target": t, "cost": COST[m], **extra}
        if sequence:
            out[f"sequential/{m}"] = {"kind": "sequential", "method": m, "sequence": list(sequence),
                                      "cost": len(sequence) * COST[m], **extra}
    out["ratio/closed_form"] = {"kind": "script", "needs": [], "cost": 120,
                                "argv": ["bench_closed_form.py", "--threads", "1", "--repeats", "3"]}
    if "sfd" in methods:
        out["ratio/one_step"] = {"kind": "script", "needs": [], "cost": 60,
                                 "argv": ["bench_sfd.py", "speed", "--threads", "1"]}
    return out


def attack_prompts(target: str) -> list[str]:
    from erasekit.canvas.world import OBJECTS as ALL_OBJECTS, STYLES as ALL_STYLES, caption

    if target in ALL_STYLES:
        return [caption(o, target) for o in ALL_OBJECTS[:ATTACK_PROMPTS]]
    return [caption(target, s) for s in ALL_STYLES[:ATTACK_PROMPTS]]


def method_options(method: str, out: Path, job: str, budget: dict | None = None) -> dict:
    """The options a job erases with: the method's defaults, SFD's budget, a checkpoint folder."""
    from erasekit.erase.registry import get_method

    config_cls, _ = get_method(method)
    fields = {name for name, _, _ in config_cls.options()}
    options = dict(budget or {})
    if method == "sfd":
        options.setdefault("generator_init", str(out / "edits" / "sfd__stage1.safetensors"))
    if "checkpoint_dir" in fields:
        options["checkpoint_dir"] = str(out / "checkpoints" / job.replace("/", "__"))
    if "progress" in fields:
        options["progress"] = False
    return options


_STATE: dict = {}


def _context():
    """This worker's pipeline and judge, loaded once."""
    if not _STATE:
        import erasekit
        from erasekit.eval.judges import CanvasJudge

        _STATE["pipe"] = erasekit.load_pipeline("canvas-mini")
        _STATE["judge"] = CanvasJudge.load()
    return _STATE["pipe"], _STATE["judge"]


def _scores(report, target: str | None) -> dict:
    sc = report.scores
    row = {k: sc.get(k) for k in ("UA", "IRA", "CRA")} if target else {}
    fid, clip = sc.get("fid") or {}, sc.get("clip") or {}
    row.update(fid=fid.get("fid"), fid_vs_original=fid.get("fid_vs_original"),
               clip_retained=clip.get("retained"), clip_target=clip.get("target"))
    return row


def _attack_row(pipe, judge, target, edit, method="unlearndiffatk") -> dict:
    import erasekit

    prompts = attack_prompts(target)
    res = erasekit.attack(pipe, prompts, target, judge=judge, seeds=[0] * len(prompts), edit=edit,
                          method=method, progress=False)
    evals = [p.unet_evals for p in res.prompts]
    return {"pre_ASR": res.pre_asr, "ASR": res.asr, "attack_prompts": prompts, "attack_config": res.config,
            "attack_unet_evals_mean": sum(evals) / len(evals), "attack_wall_s": res.protocol["wall_time_s"]}


def _erase(pipe, method: str, concepts: list[str], options: dict, path: Path) -> tuple:
    """Erase (or load the Edit a killed run already saved) -> (edit, erase record)."""
    import erasekit
    from erasekit.pipelines import Edit

    record_path = path.with_suffix(".erase.json")
    if path.exists() and record_path.exists():
        return Edit.load(path, pipe), json.loads(record_path.read_text())
    cpu0 = time.process_time()
    edit = erasekit.erase(pipe, method, concepts, **options)
    record = {"erase_wall_s": edit.manifest.get("wall_time_s"), "erase_cpu_s": round(time.process_time() - cpu0, 2),
              "peak_memory_bytes": edit.manifest.get("peak_memory_bytes"),
              "memory_kind": edit.manifest.get("memory_kind")}
    path.parent.mkdir(parents=True, exist_ok=True)
    edit.save(path)
    record["edit_bytes"] = path.stat().st_size
    _write_json(record_path, record)
    return edit, record


def run_job(name: str, spec: dict, out: Path, cache: Path) -> dict:
    """Run one job in this process; returns its result (the caller writes it)."""
    import erasekit

    t0, cpu0 = time.perf_counter(), time.process_time()
    kind = spec["kind"]
    if kind == "script":
        result = _run_script(spec["argv"], out / "scripts" / f"{name.split('/')[-1]}.json")
    else:
        pipe, judge = _context()
        if kind == "original":
            result = {"targets": {}}
            for t in spec["targets"]:
                rep = erasekit.evaluate(pipe, None, PROTOCOL, targets=[t], judge=judge, progress=False,
                                        cache_dir=cache)
                result["targets"][t] = {**_scores(rep, t), **_attack_row(pipe, judge, t, None, method="none")}
            result["protocol"] = rep.protocol
        elif kind == "sfd_stage1":
            from erasekit.canvas.world import OBJECTS as ALL_OBJECTS, PARAPHRASES, STYLES as ALL_STYLES, caption

            every = [caption(o, s, tpl) for o in ALL_OBJECTS for s in ALL_STYLES for tpl in dict.fromkeys(PARAPHRASES)]
            options = {**method_options("sfd", out, name, spec["budget"]), "generator_init": None,
                       "retain_prompts": tuple(every)}   # distil every caption: nothing is forgotten yet
            _, record = _erase(pipe, "sfd", [ALL_STYLES[0]], options, out / "edits" / "sfd__stage1.safetensors")
            result = {"options": spec["budget"], **record}
        elif kind == "cell":
            m, t = spec["method"], spec["target"]
            options = method_options(m, out, name, spec.get("budget"))
            edit, record = _erase(pipe, m, [t], options, out / "edits" / f"{m}__{t}.safetensors")
            rep = erasekit.evaluate(pipe, edit, PROTOCOL, judge=judge, progress=False, cache_dir=cache)
            result = {"method": m, "target": t, "head": judge.find(t)[0], **_scores(rep, t), **record,
                      **_attack_row(pipe, judge, t, edit), "options": _public(options),
                      "preset": edit.manifest.get("preset") or edit.manifest.get("resolved"),
                      "edit_config": edit.manifest.get("config")}
        elif kind == "sequential":
            from erasekit.workflows import sequential

            m = spec["method"]
            options = method_options(m, out, name, spec.get("budget"))
            options.pop("checkpoint_dir", None)   # one folder per step would be needed; steps are short
            rep = sequential(pipe, m, spec["sequence"], PROTOCOL, judge=judge, progress=False,
                             method_options=options, cache_dir=cache)
            result = {"method": m, "sequence": spec["sequence"], "options": _public(options),
                      "steps": [{k: s[k] for k in ("step", "erased", "UA", "IRA", "CRA", "UA_per_target")}
                                for s in rep.sequential]}
        else:
            raise ValueError(f"unknown job kind {kind!r}")
    result.update(job=name, wall_s=round(time.perf_counter() - t0, 2), cpu_s=round(time.process_time() - cpu0, 2))
    return result


def _public(options: dict) -> dict:
    """Options as recorded: the machine-specific paths dropped."""
    return {k: (Path(v).name if k == "generator_init" and v else v) for k, v in options.items()
            if k not in ("checkpoint_dir", "progress")}


def _run_script(argv: list[str], out_json: Path) -> dict:
    """Run another benchmark script; its result is its --out file (bench_closed_form) or its last stdout line."""
    import subprocess

    out_json.parent.mkdir(parents=True, exist_ok=True)
    writes_file = argv[0] == "bench_closed_form.py"
    cmd = [sys.executable, str(ROOT / "benchmarks" / argv[0]), *argv[1:], *(["--out", str(out_json)] if writes_file else [])]
    done = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "TQDM_DISABLE": "1"})
    if done.returncode != 0:
        raise RuntimeError(f"{argv[0]} failed ({done.returncode}): {done.stderr[-2000:]}")
    result = json.loads(out_json.read_text() if writes_file else done.stdout.strip().splitlines()[-1])
    return {"result": result, "command": " ".join(["python", f"benchmarks/{argv[0]}", *argv[1:]])}


def _write_json(path: Path, data) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(data, indent=1, default=str))
    os.replace(tmp, path)


def _init_worker(threads: int) -> None:
    os.environ.setdefault("TQDM_DISABLE", "1")   # before anything imports tqdm
    import torch

    torch.set_num_threads(threads)


def _job_path(out: Path, name: str) -> Path:
    return out / "jobs" / f"{name.replace('/', '__')}.json"


def run_all(out: Path, plan: dict, workers: int, threads: int) -> list[str]:
    """Run every unfinished job, longest first as their inputs are ready; returns the failed ones."""
    from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
    from multiprocessing import get_context

    todo = {n: s for n, s in plan.items() if not _job_path(out, n).exists()}
    done = {n for n in plan if _job_path(out, n).exists()}
    cache = out / "cache"
    failed, running = [], {}
    print(f"{len(done)} jobs finished earlier, {len(todo)} to run on {workers} workers", flush=True)
    with ProcessPoolExecutor(workers, mp_context=get_context("spawn"), initializer=_init_worker,
                             initargs=(threads,)) as pool:
        while todo or running:
            ready = sorted((n for n, s in todo.items() if all(d in done for d in s["needs"])),
                           key=lambda n: -todo[n]["cost"])
            for n in ready[:max(workers - len(running), 0)]:
                running[pool.submit(run_job, n, todo.pop(n), out, cache)] = n
            if not running:
                blocked = sorted(todo)
                print(f"cannot run {blocked}: a job they need failed", flush=True)
                failed += blocked
                break
            finished, _ = wait(running, return_when=FIRST_COMPLETED)
            for fut in finished:
                n = running.pop(fut)
                try:
                    result = fut.result()
                except Exception as e:  # recorded, the rest of the benchmark goes on
                    print(f"FAILED {n}: {type(e).__name__}: {e}", flush=True)
                    failed.append(n)
                    continue
                _write_json(_job_path(out, n), result)
                done.add(n)
                print(f"done {n} in {result['wall_s']:.0f} s", flush=True)
    return failed


# -- the tables -------------------------------------------------------------------------------------
def collect(out: Path, styles=STYLES, objects=OBJECTS, sequence=SEQUENCE) -> dict:
    """Every finished job's result in one document (what gets committed and rendered)."""
    results = {}
    for p in sorted((out / "jobs").glob("*.json")):
        r = json.loads(p.read_text())
        results[r["job"]] = r
    runs = json.loads((out / "runs.json").read_text()) if (out / "runs.json").exists() else []
    return {"format": FORMAT, "styles": list(styles), "objects": list(objects), "sequence": list(sequence),
            "protocol": PROTOCOL, "attack_prompts_per_target": ATTACK_PROMPTS, "runs": runs, "jobs": results}


def _mean(values):
    values = [v for v in values if v is not None]
    return sum(values) / len(values) if values else None


def _fmt(v, digits=1, suffix=""):
    return "-" if v is None else f"{v:.{digits}f}{suffix}"


def summary_rows(doc: dict) -> list[dict]:
    """One row per method (and the original): means over the style and the object targets."""
    jobs_ = doc["jobs"]
    rows = []
    if "original" in jobs_:
        per = jobs_["original"]["targets"]
        rows.append(_summary("original", [per[t] for t in doc["styles"] if t in per],
                             [per[t] for t in doc["objects"] if t in per]))
    for m in METHODS:
        cells = {t: jobs_.get(f"cell/{m}/{t}") for t in doc["styles"] + doc["objects"]}
        if any(c is None for c in cells.values()):
            continue
        rows.append(_summary(m, [cells[t] for t in doc["styles"]], [cells[t] for t in doc["objects"]]))
    return rows


def _summary(name: str, styles: list[dict], objects: list[dict]) -> dict:
    both = styles + objects
    row = {"method": name}
    for kind, cells in (("style", styles), ("object", objects)):
        for k in ("UA", "IRA", "CRA"):
            row[f"{kind}_{k}"] = _mean([c.get(k) for c in cells])
    for k in ("fid", "clip_retained", "pre_ASR", "ASR", "attack_unet_evals_mean", "erase_wall_s", "erase_cpu_s",
              "peak_memory_bytes", "edit_bytes"):
        row[k] = _mean([c.get(k) for c in both])
    return row


def render(doc: dict) -> str:
    """The benchmark page's tables (docs/benchmark.md, Markdown) from a collected document."""
    lines = ["| method | style UA | style IRA | style CRA | object UA | object IRA | object CRA | FID | CLIP "
             "| pre-ASR | ASR | attack evals | erase wall / CPU | peak RSS | Edit size |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in summary_rows(doc):
        orig = r["method"] == "original"
        lines.append("| " + " | ".join([
            r["method"], *(_fmt(r[f"{k}_{m}"], 1, " %") for k in ("style", "object") for m in ("UA", "IRA", "CRA")),
            _fmt(r["fid"], 2), _fmt(r["clip_retained"], 2), _fmt(r["pre_ASR"], 1, " %"),
            "-" if orig else _fmt(r["ASR"], 1, " %"), "-" if orig else _fmt(r["attack_unet_evals_mean"], 0),
            "-" if orig else f"{_seconds(r['erase_wall_s'])} / {_seconds(r['erase_cpu_s'])} s",
            "-" if orig else _fmt(r["peak_memory_bytes"] and r["peak_memory_bytes"] / 2**30, 2, " GiB"),
            "-" if orig else _size(r["edit_bytes"])]) + " |")
    seq = [(m, doc["jobs"].get(f"sequential/{m}")) for m in METHODS]
    seq = [(m, s) for m, s in seq if s]
    if seq:
        lines += ["", "| method | UA after step 1 / 2 / 3 / 4 / 5 | IRA after step 1 / 2 / 3 / 4 / 5 | "
                  "CRA after step 5 |", "|---|---|---|---|"]
        for m, s in seq:
            steps = s["steps"]
            lines.append(f"| {m} | " + " / ".join(_fmt(x["UA"], 0) for x in steps) + " % | "
                         + " / ".join(_fmt(x["IRA"], 0) for x in steps) + f" % | {_fmt(steps[-1]['CRA'], 1, ' %')} |")
    lines += _ratio_lines(doc["jobs"])
    return "\n".join(lines) + "\n"


def _ratio_lines(jobs_: dict) -> list[str]:
    rows = []
    cf = (jobs_.get("ratio/closed_form") or {}).get("result")
    if cf:
        for case in ("uce nudity (last_word)", "uce artist (aligned_tail, 'art')", "rece nudity (3 epochs)"):
            c = cf["cases"].get(case)
            if c:
                rows.append(f"| {case}, SD 1.4 architecture (random weights) | {c['median_s']:.2f} s wall / "
                            f"{c['median_cpu_s']:.2f} s CPU, Edit {_size(c['file_bytes'])} | "
                            f"`{jobs_['ratio/closed_form']['command']}` |")
    one = (jobs_.get("ratio/one_step") or {}).get("result")
    if one:
        rows.append(f"| SFD one-step vs the teacher's DDIM 25 + CFG, {one['images']} images | {one['speedup']:.1f}x "
                    f"({one['one_step_s']:.2f} s vs {one['teacher_s']:.1f} s) | `{jobs_['ratio/one_step']['command']}` |")
    return ["", "| cost | figure | command |", "|---|---|---|", *rows] if rows else []


def _seconds(v) -> str:
    return _fmt(v, 1 if v is not None and v < 10 else 0)


def _size(n) -> str:
    if n is None:
        return "-"
    return f"{n / 2**20:.1f} MB" if n >= 2**20 else f"{n / 2**10:.0f} KB"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "table",
                    help="results folder (jobs/, edits/, checkpoints/, cache/, table.json, table.md)")
    ap.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    ap.add_argument("--workers", type=int, default=2, help="worker processes (one job each at a time)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads per worker")
    ap.add_argument("--styles", nargs="*", default=list(STYLES), help="style targets (the benchmark page's table: the default)")
    ap.add_argument("--objects", nargs="*", default=list(OBJECTS), help="object targets")
    ap.add_argument("--sequence", nargs="*", default=list(SEQUENCE), help="styles erased one after another "
                    "(none: no sequential jobs)")
    ap.add_argument("--sfd-stage1-iterations", type=int, default=SFD_STAGE1["iterations"],
                    help="SFD stage 1 (plain one-step distillation, shared by every SFD job)")
    ap.add_argument("--sfd-iterations", type=int, default=SFD_OPTIONS["iterations"],
                    help="SFD stage 2 (forgetting, per target and per sequential step)")
    ap.add_argument("--render", action="store_true", help="only rebuild table.json / table.md from finished jobs")
    a = ap.parse_args(argv)
    a.out.mkdir(parents=True, exist_ok=True)
    failed = []
    if not a.render:
        import erasekit

        start = time.time()
        plan = jobs(a.methods, a.styles, a.objects, a.sequence, {"iterations": a.sfd_stage1_iterations},
                    {"iterations": a.sfd_iterations})
        failed = run_all(a.out, plan, a.workers, a.threads)
        runs_path = a.out / "runs.json"
        runs = json.loads(runs_path.read_text()) if runs_path.exists() else []
        runs.append({"started": time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(start)),
                     "wall_s": round(time.time() - start, 1), "workers": a.workers, "threads": a.threads,
                     "methods": a.methods, "failed": failed, "erasekit_version": erasekit.__version__,
                     "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, {platform.platform()}",
                     "python": platform.python_version()})
        _write_json(runs_path, runs)
    doc = collect(a.out, a.styles, a.objects, a.sequence)
    _write_json(a.out / "table.json", doc)
    (a.out / "table.md").write_text(render(doc))
    print(render(doc))
    print(f"-> {a.out / 'table.json'}, {a.out / 'table.md'}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
