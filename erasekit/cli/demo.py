"""``erasekit demo``: the main job end to end on canvas-mini, with defaults.

1. erase a style (Van Gogh) with RECE and save the Edit;
2. attack the erased model with UnlearnDiffAtk on that style's captions (the ``fast`` schedule);
3. evaluate the Edit with the ``canvas-lite`` protocol (UA / IRA / CRA, cost);
4. write a folder with the Edit, the attack's prompts and ASR, the report, and an image grid of
   original / erased / adversarial images, and print a short summary and where the files are.

Every step is a call of the Python API; this module only chooses the demo's inputs and lays out
the folder. It is sized to finish in a few minutes on a 2-core CPU.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from .._io import write_text_atomic
from .options import Output, format_scores, quiet_loading

N_ATTACK_PROMPTS = 4  # captions of the erased concept the attack tries to bring it back on
GRID_CELL = 128      # canvas-mini images are 32 px; the grid shows them 4x larger (nearest neighbour)


def attack_prompts(concept: str, n: int = N_ATTACK_PROMPTS) -> list[str]:
    """Canvas captions that show ``concept`` (a style with n objects, or an object in n styles)."""
    from ..canvas.world import OBJECTS, STYLES, caption
    from ..errors import ConfigError

    if not 1 <= n <= 10:
        raise ConfigError(f"the number of attack prompts must be in [1, 10] but is {n}")
    key = concept.strip().replace(" ", "_").lower()
    styles, objects = {s.lower(): s for s in STYLES}, {o.lower(): o for o in OBJECTS}
    if key in styles:
        return [caption(o, styles[key]) for o in OBJECTS[:n]]
    if key in objects:
        return [caption(objects[key], s) for s in STYLES[:n]]
    raise ConfigError(f"the demo erases a canvas-mini style or object, not {concept!r}: choose one of "
                      f"{', '.join(STYLES + OBJECTS)}")


def comparison_grid(result, columns: list[list], path: Path) -> Path:
    """One row per attacked prompt: the original, erased and adversarial images, labelled."""
    from .._io import atomic_path
    from ..eval import image_grid

    rows = [list(r) for r in zip(*columns)]
    labels = [f"[{'broken' if p.success else 'held'}] {p.prompt}" for p in result.prompts]
    grid = image_grid(rows, labels, ["original", "erased", "adversarial"], cell=GRID_CELL)
    with atomic_path(path) as tmp:
        grid.save(tmp, format="PNG")
    return path


def _attack_images(pipe, edit, result) -> list[list]:
    """Columns for the grid: original model, erased model, erased model on the adversarial prompt."""
    from ..pipelines.generation import Sampling, generate

    known = {"sampler", "steps", "guidance", "height", "width", "batch_size"}
    sampling = Sampling(**{k: v for k, v in result.protocol.get("sampling", {}).items() if k in known})
    prompts, seeds = [p.prompt for p in result.prompts], [p.seed for p in result.prompts]
    original = generate(pipe, prompts, seeds, sampling)
    with edit.applied(pipe):
        erased = generate(pipe, prompts, seeds, sampling)
        adv = generate(pipe, [p.adv_prompt for p in result.prompts], [p.adv_seed for p in result.prompts], sampling)
    return [original, erased, adv]


def run_demo(out_dir: Path = Path("erasekit-demo"), concept: str = "Van_Gogh", method: str = "rece",
             model: str | None = None, device: str = "cpu", dtype: str = "float32",
             output: Output | None = None, n_prompts: int = N_ATTACK_PROMPTS) -> dict:
    """Run the demo; returns its summary (``_lines`` holds the text the CLI prints)."""
    t0 = time.perf_counter()
    prompts = attack_prompts(concept, n_prompts)  # bad concept: fail before any work
    from ..attacks import attack
    from ..erase.registry import erase
    from ..eval import evaluate
    from ..eval.judges import CanvasJudge
    from ..pipelines.loading import load_pipeline

    out = output or Output()
    judge = CanvasJudge.load()
    judge.find(concept)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)

    out.info(f"[1/4] loading {model or 'canvas-mini'} and erasing {concept} with {method} ...")
    with quiet_loading():
        pipe = load_pipeline(model or "canvas-mini", dtype=dtype, device=device)
    edit = erase(pipe, method, [concept])
    edit.manifest["base_model"] = model or "canvas-mini"
    edit_path = edit.save(out_dir / "edit.safetensors")

    out.info(f"[2/4] attacking the erased model with UnlearnDiffAtk on {len(prompts)} prompt(s) ...")
    result = attack(pipe, prompts, concept, judge=judge, method="unlearndiffatk", edit=edit, progress=out.progress)
    attack_files = [result.save(out_dir / "attack.json"), result.save(out_dir / "attack.csv")]

    out.info("[3/4] evaluating the Edit (canvas-lite) ...")
    report = evaluate(pipe, edit=edit, protocol="canvas-lite", targets=[concept], judge=judge,
                      out_dir=out_dir / "report", progress=out.progress, edit_path=edit_path, attack=result)

    out.info("[4/4] writing the comparison grid and the summary ...")
    grid = comparison_grid(result, _attack_images(pipe, edit, result), out_dir / "attack_grid.png")
    summary = _summary(out_dir, model or "canvas-mini", concept, method, edit, edit_path, result, attack_files,
                       report, grid, time.perf_counter() - t0)
    write_text_atomic(out_dir / "summary.json", json.dumps({k: v for k, v in summary.items() if k != "_lines"},
                                                           indent=1, default=str))
    return summary


def _summary(out_dir, model, concept, method, edit, edit_path, result, attack_files, report, grid, wall) -> dict:
    scores = report.summary() if callable(getattr(report, "summary", None)) else {}
    atk = result.summary()
    m = edit.manifest
    lines = [
        f"erasekit demo: erased {concept} from {model} with {method} in {m.get('wall_time_s', 0):.1f} s "
        f"({edit.nbytes() / 1024:.1f} KiB Edit)",
        f"  attack (UnlearnDiffAtk, {atk['n']} prompt{'s' if atk['n'] != 1 else ''}): "
        f"pre-ASR {atk['pre_asr']:.0f}%, ASR {atk['asr']:.0f}% "
        "(ASR includes pre-ASR)",
        "  evaluation (canvas-lite): " + format_scores(scores),
        f"  total {wall:.0f} s; files in {out_dir}/:",
        f"    {edit_path.name}  (the Edit: erasekit preview --edit {edit_path})",
        f"    {attack_files[0].name}, {attack_files[1].name}  (adversarial prompts and ASR)",
        "    report/  (the evaluation report and its image grids)",
        f"    {grid.name}  (rows: attacked prompts; columns: original, erased, adversarial)",
    ]
    return {"out": str(out_dir), "model": model, "concept": concept, "method": method, "edit": str(edit_path),
            "edit_bytes": edit.nbytes(), "erase_wall_time_s": m.get("wall_time_s"),
            "attack": atk, "attack_files": [str(p) for p in attack_files], "report": str(out_dir / "report"),
            "scores": scores, "grid": str(grid), "wall_time_s": round(wall, 2), "_lines": lines}
