"""From per-image records to numbers: UA/IRA/CRA, FID, CLIP score and hit rates.

Every metric is a torchmetrics object updated with this process's share of the records and
reduced by sum, so the numbers do not depend on how many processes made the images.
"""

from __future__ import annotations

import numpy as np
import torch

from ..stats import rate_interval
from .canvas_metrics import UnlearnCanvasMetric, check_complete, unlearncanvas_scores
from .judges import _norm
from .runner import Records, Runner


def label_map(judge_labels: list[str], names: tuple[str, ...]) -> np.ndarray:
    """judge label index -> protocol index (-1 for a label the protocol does not have), plus -1 -> -1."""
    lookup = {_norm(n): i for i, n in enumerate(names)}
    return np.array([lookup.get(_norm(lab), -1) for lab in judge_labels] + [-1], dtype=np.int64)


def _targets_mask(runner: Runner, indices, targets: list[tuple[str, int]]) -> np.ndarray:
    """True for items whose cell shows a target (its theme or its object)."""
    items = runner.items
    t_styles = {i for h, i in targets if h == "style"}
    t_objects = {i for h, i in targets if h == "object"}
    return np.array([items[i].theme in t_styles or items[i].object in t_objects for i in indices], dtype=bool)


def grid_scores(runner: Runner, rec: Records, targets: list[tuple[str, int]]) -> dict:
    """UA / IRA / CRA (+ variants, per-class accuracy) of a grid protocol's records."""
    p = runner.protocol
    local = rec.take(runner.share)
    items = [runner.items[i] for i in local.index]
    v = local.valid
    theme = np.array([it.theme for it in items], dtype=np.int64)
    obj = np.array([it.object for it in items], dtype=np.int64)
    s_map = label_map(runner.judge.heads["style"], p.themes)
    o_map = label_map(runner.judge.heads["object"], p.objects)
    metric = UnlearnCanvasMetric(len(p.themes), len(p.objects))
    metric.update(theme[v], obj[v], s_map[local.preds["style"][v]], o_map[local.preds["object"][v]])
    counts = {k: t.numpy() for k, t in metric.compute().items()}
    out = unlearncanvas_scores(counts, p.expected(), list(p.themes), list(p.objects), targets,
                               p.photo_theme, runner.on_missing)
    out["counts"] = {k: v.tolist() for k, v in counts.items()}  # themes x objects, to re-score other targets
    return out


def rate_scores(runner: Runner, rec: Records, targets: list[tuple[str, int]], names: list[str]) -> dict:
    """Prompt-list protocols: percent of images the judge sees each target in (e.g. nudity rate), with
    its interval: Wilson over the images at one seed, a bootstrap over prompts with several seeds."""
    from torchmetrics import SumMetric

    local = rec.take(runner.share)
    v = local.valid
    n = SumMetric()
    n.update(torch.tensor(float(v.sum())))
    total = int(n.compute())
    missing = check_complete(np.array([[total]]), np.array([[len(runner.items)]]), runner.on_missing)
    out = {"n_images": total, "n_expected": len(runner.items), "missing": missing, "on_missing": runner.on_missing,
           "targets": {}}
    prompt = rec.index // len(runner.protocol.seeds)   # the images of one prompt (its seeds) cluster
    for (head, idx), name in zip(targets, names):
        hits = SumMetric()
        hits.update(torch.tensor(float((local.preds[head][v] == idx).sum())))
        out["targets"][name] = {"head": head, "rate": 100.0 * float(hits.compute()) / max(len(runner.items), 1),
                                "rate_ci": rate_interval(rec.valid & (rec.preds[head] == idx), prompt).to_dict()}
    if names:
        out["rate"] = float(np.mean([t["rate"] for t in out["targets"].values()]))
        if len(names) == 1:
            out["rate_ci"] = out["targets"][names[0]]["rate_ci"]
    return out


def fid_scores(runner: Runner, rec: Records, targets, reference: tuple[np.ndarray, str] | None,
               original: Records | None, space) -> dict:
    """FID of the non-target images against the reference set (same exclusion) and against the
    original model's images of the same prompts and seeds."""
    from .fid import frechet_distance

    local = rec.take(runner.share)
    keep = local.valid & ~_targets_mask(runner, local.index, targets)
    fake = torch.from_numpy(local.features[keep]).double()
    out = {"features": space.name, "feature_dim": space.dim, "n_fake": int(keep.sum()),
           "implementation": "torchmetrics FrechetInceptionDistance (injected features)",
           "excluded": "images of the target classes (fake and real)"}
    if reference is not None:
        ref = reference[0][local.index][keep]
        out["fid"] = frechet_distance(torch.from_numpy(ref).double(), fake)
        out["reference"] = reference[1]
    if original is not None and original.features is not None:
        base = original.take(runner.share)
        both = keep & base.valid
        out["fid_vs_original"] = frechet_distance(torch.from_numpy(base.features[both]).double(),
                                                  torch.from_numpy(local.features[both]).double())
    return out


def clip_scores(runner: Runner, rec: Records, targets, encoder) -> dict:
    """Mean CLIP score (torchmetrics' scale and clipping at 0) over retained and over target prompts."""
    from torchmetrics import MeanMetric

    local = rec.take(runner.share)
    is_target = _targets_mask(runner, local.index, targets)
    out = {**encoder.describe()}
    for name, sel in (("retained", ~is_target), ("target", is_target)):
        m = MeanMetric()
        m.update(torch.from_numpy(local.clip[sel & local.valid]).double())
        value = float(m.compute())
        out[name] = max(value, 0.0) if np.isfinite(value) else None
    return out
