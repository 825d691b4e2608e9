"""Evaluation: judges, the UnlearnCanvas-style protocol (UA/IRA/CRA), FID, CLIP score, NudeNet,
efficiency, robustness and reports."""

from .judges import CanvasJudge, Judge

__all__ = ["CanvasJudge", "Judge"]
