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


def style_hits(pipe, judge, styles: tuple[str, ...], objects: int = 5, steps: int = 10) -> list[bool]:
    """For each caption of each of ``styles`` with the first ``objects`` objects (in that order, seed =
    the caption's index; DDIM ``steps``): whether ``judge`` sees the prompted style."""
    from erasekit.canvas.world import OBJECTS, caption
    from erasekit.pipelines import Sampling, generate

    prompts = [caption(o, s) for s in styles for o in OBJECTS[:objects]]
    got = judge.classify(generate(pipe, prompts, list(range(len(prompts))), Sampling(steps=steps)))["style"]
    truth = [judge.find(s)[1] for s in styles for _ in range(objects)]
    return [g == y for g, y in zip(got, truth)]
