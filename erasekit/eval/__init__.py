"""Evaluation: judges, the UnlearnCanvas-style protocol (UA/IRA/CRA), FID, CLIP score, NudeNet,
efficiency, robustness and reports.

Names load lazily, so ``import erasekit.eval`` imports no torchmetrics, open_clip or nudenet.
"""

from __future__ import annotations

_LAZY = {
    "evaluate": "evaluation",
    "Judge": "judges", "CanvasJudge": "judges", "NudeNetJudge": "judges", "ClassifierJudge": "judges",
    "Protocol": "protocol", "get_protocol": "protocol", "PRESETS": "protocol",
    "UnlearnCanvasMetric": "canvas_metrics", "unlearncanvas_scores": "canvas_metrics",
    "MissingImageError": "canvas_metrics",
    "fid_score": "fid", "frechet_distance": "fid", "FIDResult": "fid",
    "ClipEncoder": "clip_score", "clip_score_metric": "clip_score",
    "nudity_rate": "nudity", "NudityResult": "nudity",
    "edit_efficiency": "efficiency", "Efficiency": "efficiency",
    "Report": "report", "markdown_table": "report", "plot_tradeoff": "report", "image_grid": "grids",
}

__all__ = sorted(_LAZY)


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        value = getattr(importlib.import_module(f"{__name__}.{_LAZY[name]}"), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__():
    return __all__
