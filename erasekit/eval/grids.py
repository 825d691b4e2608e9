"""Image grids per target: the target's prompts (rows) x seeds, original beside erased.

Up to 10 prompts and 5 seeds of each target's class are kept as thumbnails while the images are
made; an image that could not be made shows as a grey "missing" cell, never as a gap.
"""

from __future__ import annotations

import numpy as np

GRID_PROMPTS, GRID_SEEDS = 10, 5


def _class_of(it, head: str) -> int:
    return it.theme if head == "style" else it.object


def grid_items(items, targets: list[tuple[str, int]]) -> set[int]:
    """Indices of the items shown in the grids of ``targets`` = [(head, index)]."""
    keep = set()
    for head, j in targets:
        cells, seeds = [], []
        for it in items:
            if _class_of(it, head) != j:
                continue
            if it.seed not in seeds and len(seeds) < GRID_SEEDS:
                seeds.append(it.seed)
            if (it.theme, it.object) not in cells and len(cells) < GRID_PROMPTS:
                cells.append((it.theme, it.object))
            if it.seed in seeds and (it.theme, it.object) in cells:
                keep.add(it.index)
    return keep


def target_grids(items, targets, names, base, edited) -> dict:
    """{target name: PIL grid} from the thumbnails of the original (``base``) and edited records."""
    out = {}
    for (head, j), name in zip(targets, names):
        shown = [it for it in items if it.index in grid_items(items, [(head, j)])]
        if not shown:
            continue
        prompts = list(dict.fromkeys(it.prompt for it in shown))
        seeds = list(dict.fromkeys(it.seed for it in shown))
        index = {(it.prompt, it.seed): it.index for it in shown}
        rows = []
        for p in prompts:
            row = []
            for sd in seeds:
                i = index.get((p, sd))
                row += [base.thumbs.get(i) if base is not None else None, edited.thumbs.get(i)]
            rows.append(row)
        cols = [f"seed {sd} {kind}" for sd in seeds for kind in ("orig", "erased")]
        out[name] = image_grid(rows, prompts, cols)
    return out


def image_grid(rows: list[list], row_labels: list[str], col_labels: list[str], cell: int = 96):
    """A labelled grid of uint8 images (None -> a grey "missing" cell), upscaled to ``cell`` pixels."""
    from PIL import Image, ImageDraw

    label_w, head_h = 260, 18
    n_cols = max(len(r) for r in rows)
    grid = Image.new("RGB", (label_w + n_cols * cell, head_h + len(rows) * cell), "white")
    d = ImageDraw.Draw(grid)
    for c, text in enumerate(col_labels):
        d.text((label_w + c * cell + 4, 3), text, fill="black")
    for r, (row, text) in enumerate(zip(rows, row_labels)):
        d.text((4, head_h + r * cell + cell // 2 - 6), text[:42], fill="black")
        for c, im in enumerate(row):
            box = (label_w + c * cell, head_h + r * cell)
            if im is None:
                d.rectangle([box, (box[0] + cell - 1, box[1] + cell - 1)], fill=(200, 200, 200))
                d.text((box[0] + 4, box[1] + cell // 2 - 6), "missing", fill="black")
                continue
            grid.paste(Image.fromarray(np.asarray(im, dtype=np.uint8)).resize((cell, cell), Image.NEAREST), box)
    return grid
