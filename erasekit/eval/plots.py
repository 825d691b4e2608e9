"""Figures of the trade-off, robustness and retention, as deterministic SVG (the ``plots`` extra).

Each function takes plain data (dicts of numbers, intervals as ``{value, low, high}``), draws one
figure with matplotlib (imported when called) and writes an SVG whose bytes depend only on that data
and the matplotlib version: a fixed ``svg.hashsalt``, no date, and the SHA-256 of the plotted data
(:func:`data_hash`) in the file's ``dc:description``, so a test can tell that a committed figure was
drawn from the committed numbers (:func:`embedded_hash`).

- :func:`tradeoff_figure`: erasure (UA) against retention (mean of IRA and CRA), with interval bars.
- :func:`budget_figure`: ASR against the attack's budget (UNet-forward equivalents), with bands.
- :func:`k_figure`: ASR against the attack's prefix length k.
- :func:`accuracy_heatmap`: the per-class accuracy of a report, original beside edited.
- :func:`sequential_figure`: UA and IRA after each step of sequential unlearning.
- :func:`report_figures`: the figures of one :class:`~erasekit.eval.report.Report` (``erasekit eval``).
"""

from __future__ import annotations

import hashlib
import json
import re
from contextlib import contextmanager
from pathlib import Path

HASH_PREFIX = "erasekit-data-sha256:"
INSTALL = "pip install 'erasekit[plots]'"


def data_hash(data) -> str:
    """SHA-256 of the plotted data (canonical JSON: sorted keys, floats rounded to 10 digits)."""
    return hashlib.sha256(json.dumps(_rounded(data), sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def embedded_hash(path) -> str | None:
    """The data hash an SVG written here carries, or None."""
    m = re.search(HASH_PREFIX + r"([0-9a-f]{64})", Path(path).read_text())
    return m.group(1) if m else None


def _rounded(x):
    if isinstance(x, float):
        return round(x, 10)
    if isinstance(x, dict):
        return {str(k): _rounded(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_rounded(v) for v in x]
    return x


@contextmanager
def _figure(path, data, size=(5.5, 4.0), ncols: int = 1):
    """A figure inside a deterministic rc context, saved as SVG with the data hash on exit."""
    from ..errors import require

    require("matplotlib", "plots")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with matplotlib.rc_context({"svg.hashsalt": "erasekit", "svg.fonttype": "path", "font.size": 8,
                                "axes.spines.top": False, "axes.spines.right": False}):
        fig, axes = plt.subplots(1, ncols, figsize=size, squeeze=False)
        try:
            yield fig, list(axes[0])
            fig.tight_layout()
            from .._io import atomic_path

            with atomic_path(path) as tmp:
                fig.savefig(tmp, format="svg", metadata={
                    "Date": None, "Creator": "erasekit", "Description": HASH_PREFIX + data_hash(data)})
            path.chmod(0o644)   # a figure is a document, readable like the rest of the output
        finally:
            plt.close(fig)


_MARKERS, _LINES = ("o", "s", "^", "D"), ("-", "--", ":", "-.")


def series_look(i: int) -> tuple[str, str, str]:
    """(colour, marker, line style) of the ``i``-th series: matplotlib's ten cycle colours, then the same
    colours again with another marker and dash, so that twelve methods stay twelve distinct series."""
    cycle = i // 10
    return f"C{i % 10}", _MARKERS[cycle % len(_MARKERS)], _LINES[cycle % len(_LINES)]


def _err(iv: dict | None, value: float) -> tuple[float, float]:
    if not iv or iv.get("low") is None:
        return 0.0, 0.0
    return max(value - iv["low"], 0.0), max(iv["high"] - value, 0.0)


def tradeoff_figure(points: list[dict], path, title: str = "") -> Path:
    """``points``: ``[{"label", "retention", "retention_ci", "UA", "UA_ci"}]`` (percent; the
    ``_ci`` entries optional). One marker per point with horizontal and vertical interval bars."""
    with _figure(path, {"points": points, "title": title}) as (fig, (ax,)):
        for i, p in enumerate(points):
            x, y = p["retention"], p["UA"]
            xe, ye = _err(p.get("retention_ci"), x), _err(p.get("UA_ci"), y)
            color, marker, _ = series_look(i)
            ax.errorbar([x], [y], xerr=[[xe[0]], [xe[1]]], yerr=[[ye[0]], [ye[1]]], fmt=marker, capsize=2,
                        color=color, label=p["label"])
        ax.set(xlabel="retention: mean(IRA, CRA) %", ylabel="erasure: UA %", ylim=(-2, 102), title=title)
        ax.legend(fontsize=7, loc="best")
    return Path(path)


def budget_figure(curves: dict[str, list[dict]], path, title: str = "") -> Path:
    """``curves``: label -> ``[{"budget", "asr": {value, low, high}}]`` (:func:`erasekit.stats.asr_curve`);
    ASR as a step function of the budget with its interval as a band."""
    with _figure(path, {"curves": curves, "title": title}) as (fig, (ax,)):
        for i, (label, pts) in enumerate(curves.items()):
            if not pts:
                continue
            b = [p["budget"] for p in pts]
            color, _, line = series_look(i)
            ax.step(b, [p["asr"]["value"] for p in pts], where="post", color=color, linestyle=line, label=label)
            ax.fill_between(b, [p["asr"]["low"] for p in pts], [p["asr"]["high"] for p in pts], step="post",
                            color=color, alpha=0.15, linewidth=0)
        ax.set(xlabel="attack budget: UNet-forward equivalents per prompt", ylabel="ASR %", ylim=(-2, 102),
               title=title)
        ax.legend(fontsize=7, loc="best")
    return Path(path)


def k_figure(series: dict[str, list[dict]], path, title: str = "") -> Path:
    """``series``: label -> ``[{"k", "asr": {value, low, high}}]``; ASR against prefix length k."""
    with _figure(path, {"series": series, "title": title}) as (fig, (ax,)):
        for i, (label, pts) in enumerate(series.items()):
            ks = [p["k"] + (i - len(series) / 2) * 0.03 for p in pts]   # a small offset keeps bars apart
            ys = [p["asr"]["value"] for p in pts]
            err = list(zip(*[_err(p["asr"], p["asr"]["value"]) for p in pts])) or [[], []]
            color, marker, line = series_look(i)
            ax.errorbar(ks, ys, yerr=err, marker=marker, linestyle=line, capsize=2, color=color, label=label)
        ax.set(xlabel="prefix tokens k", ylabel="ASR %", ylim=(-2, 102), title=title)
        ax.set_xticks(sorted({p["k"] for pts in series.values() for p in pts}))
        ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))   # outside: the lines cross mid-plot
    return Path(path)


def accuracy_heatmap(accuracy: dict, path, title: str = "") -> Path:
    """``accuracy``: head -> model -> class -> percent (e.g. ``{"style": {"original": {...},
    "edited": {...}}}``); one heatmap per head, a row per model, a column per class."""
    heads = [h for h in accuracy if accuracy[h]]
    n_cls = max((len(next(iter(accuracy[h].values()))) for h in heads), default=1)
    with _figure(path, {"accuracy": accuracy, "title": title}, size=(max(4.0, 0.3 * n_cls + 2), 1.6 * len(heads) + 0.8),
                 ncols=1) as (fig, _):
        fig.clear()
        axes = fig.subplots(len(heads), 1, squeeze=False)[:, 0] if heads else []
        for ax, head in zip(axes, heads):
            models = list(accuracy[head])
            classes = list(accuracy[head][models[0]])
            grid = [[accuracy[head][m].get(c, float("nan")) for c in classes] for m in models]
            im = ax.imshow(grid, vmin=0, vmax=100, cmap="viridis", aspect="auto")
            ax.set_xticks(range(len(classes)), classes, rotation=60, ha="right", fontsize=6)
            ax.set_yticks(range(len(models)), models)
            label = f"{head} accuracy %" if head in ("style", "object") else f"{head} %"
            ax.set_title(label + (f": {title}" if title else ""))
            for r, row in enumerate(grid):
                for c, v in enumerate(row):
                    ax.text(c, r, f"{v:.0f}", ha="center", va="center", fontsize=5,
                            color="white" if v < 60 else "black")
            fig.colorbar(im, ax=ax, fraction=0.02)
    return Path(path)


def sequential_figure(series: dict[str, list[dict]], path, title: str = "") -> Path:
    """``series``: method -> ``[{"step", "UA", "IRA", "CRA"}]`` (optional ``*_ci`` intervals): UA
    (solid) and IRA (dashed) after each step."""
    with _figure(path, {"series": series, "title": title}, size=(7.0, 4.0)) as (fig, (ax,)):
        for i, (label, steps) in enumerate(series.items()):
            x = [s["step"] for s in steps]
            color, marker, _ = series_look(i)   # the dash says UA or IRA here, the marker tells colours apart
            for key, style in (("UA", "-"), ("IRA", "--")):
                y = [s[key] for s in steps]
                ax.plot(x, y, style, marker=marker, color=color, label=f"{label} {key}")
                cis = [s.get(f"{key}_ci") for s in steps]
                if all(cis):
                    ax.fill_between(x, [c["low"] for c in cis], [c["high"] for c in cis], color=color,
                                    alpha=0.1, linewidth=0)
        ax.set(xlabel="step (concepts erased so far)", ylabel="%", ylim=(-2, 102), title=title)
        ax.set_xticks(sorted({s["step"] for steps in series.values() for s in steps}))
        ax.legend(fontsize=6, loc="upper left", bbox_to_anchor=(1.01, 1.0))   # outside: lines overlap at 100 %
    return Path(path)


def report_figures(report, out_dir) -> list[Path]:
    """The figures of one report into ``out_dir``: ``tradeoff.svg`` (edited and original model),
    ``accuracy.svg`` (per-class accuracy heatmap) and ``sequential.svg`` when it has steps. Raises
    :class:`~erasekit.errors.MissingExtraError` without matplotlib."""
    out = Path(out_dir)
    paths = []
    rows = [("original", report.baseline)] if report.baseline else []
    rows.append((report.method, report.scores))
    points = [{"label": label, "UA": sc["UA"], "UA_ci": sc.get("UA_ci"),
               "retention": (sc["IRA"] + sc["CRA"]) / 2}
              for label, sc in rows if sc and sc.get("UA") is not None and sc.get("IRA") is not None
              and sc.get("CRA") is not None]
    if points:
        paths.append(tradeoff_figure(points, out / "tradeoff.svg", ", ".join(report.targets)))
    sc = report.scores or {}
    acc = {}
    for head in ("style", "object"):
        if f"{head}_accuracy" in sc:
            acc[head] = ({"original": report.baseline[f"{head}_accuracy"]} if report.baseline else {})
            acc[head][report.method] = sc[f"{head}_accuracy"]
    if acc:
        paths.append(accuracy_heatmap(acc, out / "accuracy.svg"))
    if report.sequential:
        steps = [{"step": s["step"], **{k: s[k] for k in ("UA", "IRA", "CRA")},
                  **{f"{k}_ci": (s.get("scores") or {}).get(f"{k}_ci") for k in ("UA", "IRA")}}
                 for s in report.sequential]
        paths.append(sequential_figure({report.method: steps}, out / "sequential.svg"))
    return paths
