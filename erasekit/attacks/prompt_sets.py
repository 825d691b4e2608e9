"""Attacking a prompt list whose rows carry their own guidance (an I2P-format CSV, docs/nudity.md).

:func:`~erasekit.attacks.attack` makes every image with one :class:`~erasekit.Sampling`. A prompt set
such as I2P gives each prompt its own seed and CFG scale, so :func:`attack_prompt_set` runs the attack
once per guidance value over that value's prompts and merges the rows into one
:class:`~erasekit.attacks.result.AttackResult` in the file's order. The merged protocol records each
prompt's guidance (``prompt_guidance``); ``sampling.guidance`` is the common value, or None when the
rows differ.
"""

from __future__ import annotations

import dataclasses


def attack_prompt_set(pipe, prompts: list[str], seeds: list[int], guidance: list[float] | None, concept, *,
                      judge, sampling=None, **kwargs):
    """``attack(pipe, prompts, concept, seeds=seeds, ...)`` with prompt i generated at ``guidance[i]``
    (None or empty: ``sampling.guidance`` for every prompt). ``kwargs`` go to :func:`attack`."""
    from ..errors import ConfigError
    from ..pipelines.generation import default_sampling
    from . import attack

    sampling = sampling or default_sampling(pipe)
    if not guidance:
        return attack(pipe, prompts, concept, judge=judge, seeds=seeds, sampling=sampling, **kwargs)
    if len(guidance) != len(prompts):
        raise ConfigError(f"guidance must hold one value per prompt ({len(prompts)}) but holds {len(guidance)}")
    concepts = concept if isinstance(concept, (list, tuple)) else [concept] * len(prompts)
    results, order = [], []
    for g in dict.fromkeys(guidance):
        pos = [i for i, x in enumerate(guidance) if x == g]
        results.append(attack(pipe, [prompts[i] for i in pos], [concepts[i] for i in pos], judge=judge,
                              seeds=[seeds[i] for i in pos], sampling=dataclasses.replace(sampling, guidance=g),
                              **kwargs))
        order += pos
    return _merge(results, order, list(guidance))


def _merge(results: list, order: list[int], guidance: list[float]):
    """One AttackResult from per-guidance runs: rows back in file order, costs and times summed."""
    from .result import AttackResult

    made = [row for res in results for row in res.prompts]   # in the order of ``order``
    rows = sorted((dataclasses.replace(row, index=i) for i, row in zip(order, made)), key=lambda r: r.index)
    first = results[0]
    protocol = dict(first.protocol)
    protocol["sampling"] = dict(first.protocol["sampling"],
                                guidance=guidance[0] if len(set(guidance)) == 1 else None)
    protocol["prompt_guidance"] = guidance
    protocol["wall_time_s"] = round(sum(r.protocol.get("wall_time_s", 0.0) for r in results), 4)
    protocol["runs"] = [{"guidance": r.protocol["sampling"]["guidance"], "n": r.n} for r in results]
    concept = ", ".join(dict.fromkeys(c for r in results for c in r.concept.split(", ")))
    return AttackResult(first.method, concept, rows, first.config, protocol)
