"""Score many erasure configurations on canvas-mini in one process (for choosing presets).

    python benchmarks/sweep_erasure.py sweep.json --out runs/sweep.jsonl --device cuda --budget 500

``sweep.json`` is a list of ``{"name": ..., "method": ..., "concept": ..., "options": {...}}``.
Each configuration is erased from the base model, the 10 x 10 caption grid is generated with the
Edit applied (``--seeds`` seeds per caption, DDIM 25, guidance 7.5) and scored with the canvas judge
exactly as in ``canvas_erasure.py`` (UA, IRA, CRA). One JSON line per configuration is appended to
``--out`` as soon as it is scored, so a run cut short keeps what it finished; configurations already
in ``--out`` are skipped (resume). ``--budget`` stops starting new configurations after that many
seconds. Preset choices in the method modules cite the sweep file and the line they came from.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from canvas_erasure import edited_images, grid, score   # this script's folder is on sys.path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("configs", type=Path)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--seeds", type=int, default=1)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--budget", type=float, default=None, help="seconds after which no new config starts")
    args = ap.parse_args()

    import torch

    import erasekit
    from erasekit.eval.judges import CanvasJudge
    from erasekit.pipelines import Sampling, generate

    t_start = time.perf_counter()
    torch.set_num_threads(args.threads)
    configs = json.loads(args.configs.read_text())
    done = set()
    if args.out.exists():
        done = {json.loads(line)["name"] for line in args.out.read_text().splitlines() if line.strip()}
    pipe = erasekit.load_pipeline("canvas-mini", device=args.device)
    judge = CanvasJudge.load()
    cells, prompts, seeds = grid(args.seeds)
    sampling = Sampling()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    if "base" not in done:
        base = score(judge, generate(pipe, prompts, seeds, sampling), cells, None)
        with args.out.open("a") as f:
            f.write(json.dumps({"name": "base", **base, "device": args.device}) + "\n")
    for cfg in configs:
        if cfg["name"] in done:
            continue
        if args.budget is not None and time.perf_counter() - t_start > args.budget:
            print("budget spent; stopping before", cfg["name"], flush=True)
            break
        try:
            edit = erasekit.erase(pipe, cfg["method"], [cfg["concept"]], **cfg.get("options", {}))
            images = edited_images(pipe, edit, prompts, seeds, sampling)
            row = {**cfg, **score(judge, images, cells, cfg["concept"]), "erase_s": edit.manifest["wall_time_s"],
                   "peak_memory_bytes": edit.manifest["peak_memory_bytes"], "device": args.device}
        except Exception as e:  # noqa: BLE001 - a sweep records failures and goes on
            row = {**cfg, "error": f"{type(e).__name__}: {e}"}
        with args.out.open("a") as f:
            f.write(json.dumps(row) + "\n")
        print(json.dumps({k: row.get(k) for k in ("name", "UA", "IRA", "CRA", "erase_s", "error")}), flush=True)


if __name__ == "__main__":
    main()
