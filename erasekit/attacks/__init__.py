"""Attacks on erased models: UnlearnDiffAtk and cheap baselines, judged by the evaluation's judges."""
