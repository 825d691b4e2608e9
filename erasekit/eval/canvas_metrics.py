"""UnlearnCanvas' UA / IRA / CRA (metrics.md section 1.4) as a metric over per-cell hit/total counts.

:class:`UnlearnCanvasMetric` follows the torchmetrics contract: ``update`` adds, for each judged
image, whether its style and its object were recognised to the counts of its (theme, object)
cell; every state reduces with a sum, so a prompt grid sharded across processes merges exactly.
:func:`unlearncanvas_scores` turns the counts into percentages:

- acc_S(s): share of the images of theme s whose style top-1 is s (all objects, all seeds).
- acc_O(o): share of the images of object o, over *all* themes (Seed_Images included), whose
  object top-1 is o (the reference per-class accuracy).
- style target s*: UA = 1 - acc_S(s*), IRA = mean acc_S over the other styles, CRA = mean acc_O.
- object target o*: UA = 1 - acc_O(o*), IRA = mean acc_O over the other objects, CRA = mean acc_S.

Open points of the source, both variants always computed and stored: IRA of a style target (and
CRA of an object target) over the styles without ``Seed_Images`` (default, "the other 49") or with
it (``*_photo_included``, "50"); CRA over all themes' images (default) or without the targets' own
images (``CRA_excluding_targets``). With several targets, UA is averaged over the targets and the
retained classes exclude every target. A missing image fails by default (metrics.md: a third-party
port skipped them and inflated object accuracy 2.55x); with ``on_missing="count"`` it stays in the
denominator as not recognised, and the count is reported.
"""

from __future__ import annotations

import numpy as np
import torch
from torchmetrics import Metric

from ..errors import ErasekitError


class MissingImageError(ErasekitError):
    """The answer set is incomplete: an accuracy over it would silently change its denominator."""


class UnlearnCanvasMetric(Metric):
    """Per-(theme, object) counts of images, style hits and object hits (all reduced by sum)."""

    full_state_update = False
    higher_is_better = None

    def __init__(self, n_themes: int, n_objects: int, **kwargs):
        super().__init__(**kwargs)
        shape = (n_themes, n_objects)
        self.add_state("count", torch.zeros(shape, dtype=torch.long), dist_reduce_fx="sum")
        self.add_state("style_hits", torch.zeros(shape, dtype=torch.long), dist_reduce_fx="sum")
        self.add_state("object_hits", torch.zeros(shape, dtype=torch.long), dist_reduce_fx="sum")

    def update(self, theme, obj, style_pred, object_pred) -> None:
        """Add images: their true theme and object indices and the judge's predictions (same indices)."""
        theme, obj, style_pred, object_pred = (torch.as_tensor(v, dtype=torch.long).reshape(-1)
                                               for v in (theme, obj, style_pred, object_pred))
        n_t, n_o = self.count.shape
        cell = theme * n_o + obj
        ones = torch.ones_like(cell)
        self.count += torch.bincount(cell, ones, n_t * n_o).view(n_t, n_o).long()
        self.style_hits += torch.bincount(cell, (style_pred == theme).long(), n_t * n_o).view(n_t, n_o).long()
        self.object_hits += torch.bincount(cell, (object_pred == obj).long(), n_t * n_o).view(n_t, n_o).long()

    def compute(self) -> dict[str, torch.Tensor]:
        return {"count": self.count.clone(), "style_hits": self.style_hits.clone(),
                "object_hits": self.object_hits.clone()}


def check_complete(count: np.ndarray, expected: np.ndarray, on_missing: str = "fail") -> int:
    """Number of missing images; raises :class:`MissingImageError` if any are missing and
    ``on_missing == "fail"``, or if a cell has more images than the protocol makes."""
    count, expected = np.asarray(count), np.asarray(expected)
    if on_missing not in ("fail", "count"):
        raise ValueError(f"on_missing must be 'fail' or 'count' but is {on_missing!r}")
    if (count > expected).any():
        t, o = np.argwhere(count > expected)[0]
        raise MissingImageError(f"cell (theme {t}, object {o}) has {count[t, o]} images but the protocol "
                                f"makes {expected[t, o]}: images were judged twice")
    missing = int((expected - count).sum())
    if missing and on_missing == "fail":
        t, o = np.argwhere(count < expected)[0]
        raise MissingImageError(
            f"{missing} of {int(expected.sum())} images are missing (first: theme {t}, object {o}); "
            "regenerate them, or pass on_missing='count' to count them as not recognised")
    return missing


def class_accuracy(hits: np.ndarray, expected: np.ndarray, axis: int, exclude=()) -> np.ndarray:
    """Per-class accuracy (percent) along ``axis`` (0: themes, 1: objects), the denominators being
    the protocol's expected counts; ``exclude`` drops those indices of the *other* axis."""
    hits, expected = np.asarray(hits, dtype=np.float64), np.asarray(expected, dtype=np.float64)
    keep = np.ones(hits.shape[1 - axis], dtype=bool)
    keep[list(exclude)] = False
    if axis == 0:
        h, n = hits[:, keep].sum(1), expected[:, keep].sum(1)
    else:
        h, n = hits[keep].sum(0), expected[keep].sum(0)
    return 100.0 * h / np.maximum(n, 1)


def unlearncanvas_scores(counts: dict, expected: np.ndarray, themes, objects, targets: list[tuple[str, int]],
                         photo_theme: str | None = None, on_missing: str = "fail") -> dict:
    """UA / IRA / CRA (percent) with their variants for ``targets`` = [(head, index)], head ``style``
    (an index into ``themes``) or ``object`` (into ``objects``); also the per-class accuracies."""
    count = np.asarray(counts["count"])
    missing = check_complete(count, expected, on_missing)
    s_hits, o_hits = np.asarray(counts["style_hits"]), np.asarray(counts["object_hits"])
    acc_s = class_accuracy(s_hits, expected, axis=0)
    acc_o = class_accuracy(o_hits, expected, axis=1)
    photo = [themes.index(photo_theme)] if photo_theme in themes else []
    t_styles = sorted({i for h, i in targets if h == "style"})
    t_objects = sorted({i for h, i in targets if h == "object"})

    def mean_over(acc, n, drop):
        rest = [i for i in range(n) if i not in drop]
        return float(np.mean(acc[rest])) if rest else float("nan")

    styles_kept = mean_over(acc_s, len(themes), set(t_styles) | set(photo))
    styles_kept_photo = mean_over(acc_s, len(themes), set(t_styles))
    objects_kept = mean_over(acc_o, len(objects), set(t_objects))
    # accuracies recomputed without the targets' own images (the CRA variant)
    acc_o_ex = class_accuracy(o_hits, expected, axis=1, exclude=t_styles)
    acc_s_ex = class_accuracy(s_hits, expected, axis=0, exclude=t_objects)
    per_target = {}
    for head, i in targets:
        if head == "style":
            per_target[themes[i]] = {
                "head": head, "UA": float(100.0 - acc_s[i]), "IRA": styles_kept, "IRA_photo_included": styles_kept_photo,
                "CRA": objects_kept, "CRA_excluding_targets": mean_over(acc_o_ex, len(objects), set(t_objects))}
        elif head == "object":
            per_target[objects[i]] = {
                "head": head, "UA": float(100.0 - acc_o[i]), "IRA": objects_kept, "CRA": styles_kept,
                "CRA_photo_included": styles_kept_photo,
                "CRA_excluding_targets": mean_over(acc_s_ex, len(themes), set(t_styles) | set(photo))}
        else:
            raise ValueError(f"target head must be 'style' or 'object' but is {head!r}")
    out = {"n_images": int(count.sum()), "n_expected": int(np.asarray(expected).sum()), "missing": missing,
           "on_missing": on_missing,
           "style_accuracy": {t: float(a) for t, a in zip(themes, acc_s)},
           "object_accuracy": {o: float(a) for o, a in zip(objects, acc_o)},
           "mean_style_accuracy": mean_over(acc_s, len(themes), set(photo)),
           "mean_object_accuracy": float(np.mean(acc_o)),
           "targets": per_target}
    if per_target:
        for key in ("UA", "IRA", "CRA"):
            out[key] = float(np.mean([v[key] for v in per_target.values()]))
        _add_intervals(out, counts, expected, themes, objects, targets, photo_theme)
    return out


def _cell_images(counts: dict, expected: np.ndarray):
    """The protocol's images, one entry each, from the per-cell counts: (cell, theme, object, style
    hit, object hit). A missing image is a miss, as in the accuracies."""
    expected = np.asarray(expected, dtype=np.int64)
    n_objects = expected.shape[1]
    n = expected.reshape(-1)
    cell = np.repeat(np.arange(n.size), n)
    rank = np.arange(cell.size) - np.repeat(np.cumsum(n) - n, n)   # position of the image within its cell
    s_hit = rank < np.repeat(np.asarray(counts["style_hits"]).reshape(-1), n)
    o_hit = rank < np.repeat(np.asarray(counts["object_hits"]).reshape(-1), n)
    return cell, cell // n_objects, cell % n_objects, s_hit, o_hit


def _add_intervals(out: dict, counts, expected, themes, objects, targets, photo_theme) -> None:
    """95 % intervals of UA / IRA / CRA as ``<key>_ci`` siblings (:mod:`erasekit.stats`).

    Images cluster by caption (a (theme, object) cell holds one image per seed), so captions are
    resampled whole: UA over the target's captions (stratified by target when there are several),
    IRA and CRA within each retained class, the statistic being the mean of per-class accuracies as
    in the point estimate. A rate at 0 or 100 % gets Wilson's interval over its captions.
    """
    from ..stats import cluster_bootstrap

    cell, theme, obj, s_hit, o_hit = _cell_images(counts, expected)
    photo = {themes.index(photo_theme)} if photo_theme in themes else set()
    t_styles = {i for h, i in targets if h == "style"}
    t_objects = {i for h, i in targets if h == "object"}
    # per head of the target: (the target's own images' axis, hit) and the retained classes
    retained = {
        "styles": (~np.isin(theme, list(t_styles | photo)), s_hit, theme),
        "objects": (~np.isin(obj, list(t_objects)), o_hit, obj)}
    cache: dict[str, dict] = {}

    def kept(which: str) -> dict:
        if which not in cache:
            sel, hit, stratum = retained[which]
            cache[which] = cluster_bootstrap(hit[sel], cell[sel], stratum[sel]).to_dict() if sel.any() else None
        return cache[which]

    ua_values, ua_clusters, ua_strata = [], [], []
    names = list(out["targets"])
    for k, ((head, i), name) in enumerate(zip(targets, names)):
        own = (theme == i) if head == "style" else (obj == i)
        miss = ~(s_hit if head == "style" else o_hit)
        t = out["targets"][name]
        t["UA_ci"] = cluster_bootstrap(miss[own], cell[own]).to_dict()
        t["IRA_ci"] = kept("styles" if head == "style" else "objects")
        t["CRA_ci"] = kept("objects" if head == "style" else "styles")
        ua_values.append(miss[own])
        ua_clusters.append(k * cell.size + cell[own])
        ua_strata.append(np.full(int(own.sum()), k))
    out["UA_ci"] = cluster_bootstrap(np.concatenate(ua_values), np.concatenate(ua_clusters),
                                     np.concatenate(ua_strata)).to_dict()
    heads = {h for h, _ in targets}
    for key in ("IRA", "CRA"):   # one retained set when every target has the same head
        out[f"{key}_ci"] = out["targets"][names[0]][f"{key}_ci"] if len(heads) == 1 else None
