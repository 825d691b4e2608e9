"""One attack on one saved canvas-mini Edit, printed as one JSON line plus one line per prompt.

    python benchmarks/measure_attack.py EDIT STYLE N_OBJECTS METHOD [OPTION=VALUE ...]
    python benchmarks/measure_attack.py uce-Van_Gogh.safetensors Van_Gogh 5 p4d steps=200 eval_every=50
    python benchmarks/measure_attack.py uce-Van_Gogh.safetensors Van_Gogh 5 concept_inversion steps=100 eval_every=25

The prompts are the captions "A {object} image in {STYLE} style." of the first N_OBJECTS objects at seed 0;
target images come from canvas-mini without the Edit; the canvas judge decides success. OPTION values are
Python literals (``variant='n'``). The numbers in docs/methods/p4d.md and concept_inversion.md come from it.
"""

from __future__ import annotations

import ast
import json
import sys
import time


def main(argv: list[str]) -> None:
    import erasekit
    from erasekit.attacks import attack
    from erasekit.canvas.world import OBJECTS, caption
    from erasekit.eval.judges import CanvasJudge
    from erasekit.pipelines import Edit

    path, style, n, method = argv[0], argv[1], int(argv[2]), argv[3]
    options = {k: ast.literal_eval(v) for k, v in (a.split("=", 1) for a in argv[4:])}
    pipe, judge = erasekit.load_pipeline("canvas-mini"), CanvasJudge.load()
    edit = Edit.load(path, pipe)
    prompts = [caption(o, style) for o in OBJECTS[:n]]
    t0, c0 = time.time(), time.process_time()
    res = attack(pipe, prompts, style, judge=judge, method=method, edit=edit, progress=False, **options)
    s = res.summary()
    print(json.dumps({"edit": path, "method": method, "options": options, "n": s["n"], "pre_asr": s["pre_asr"],
                      "asr": s["asr"], "asr_ci": s.get("asr_ci"), "mean_cost_unet_equiv": s["mean_cost_unet_equiv"],
                      "mean_unet_evals": s["mean_unet_evals"], "mean_grad_steps": s["mean_grad_steps"],
                      "broken_at": [p.step for p in res.prompts], "wall_s": round(time.time() - t0, 1),
                      "cpu_s": round(time.process_time() - c0, 1)}))
    for p in res.prompts:
        print(" ", p.success, p.step, p.cost, repr(p.adv_prompt))


if __name__ == "__main__":
    main(sys.argv[1:])
