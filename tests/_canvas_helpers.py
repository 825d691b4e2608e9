"""Shared piece of the methods' behaviour tests on canvas-mini: how often the judge sees a style."""

from __future__ import annotations


def style_accuracy(pipe, judge, style: str, objects: int, seeds=(0,), steps: int = 10) -> float:
    """Share of the images of ``style`` (its captions with the first ``objects`` objects, each at every
    seed of ``seeds``; DDIM ``steps``) in which ``judge`` recognises the style."""
    from erasekit.canvas.world import OBJECTS, caption
    from erasekit.pipelines import Sampling, generate

    prompts = [caption(o, style) for o in OBJECTS[:objects] for _ in seeds]
    images = generate(pipe, prompts, list(seeds) * objects, Sampling(steps=steps))
    return float(judge.hits(images, style).mean())
