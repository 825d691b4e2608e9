"""Which concept each attacked prompt is judged on.

An attack on a several-concept Edit must judge a Cubism prompt for Cubism and a Van Gogh prompt for
Van Gogh. Each prompt's concept is the one given for it, else the one given for all prompts, else
the Edit's concept whose name the prompt contains (case, ``_`` and punctuation ignored; an Edit of
one concept judges every prompt on it). A prompt that names none or several of the Edit's concepts
is a :class:`~erasekit.errors.ConfigError` that says how to give its concept.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

from ..errors import ConfigError

HOW = ("give each prompt's concept: concept=[...] (one per prompt) in Python; on the command line --concept "
       "NAME for every prompt, --concept once per prompt, or 'CONCEPT<TAB>PROMPT' lines in --prompts-file")


def words(text: str) -> str:
    """Lower-case words of ``text`` with ``_`` and punctuation as spaces: ``"Van_Gogh!"`` -> ``"van gogh"``."""
    return " ".join(re.findall(r"[^\W_]+", str(text).lower()))


def infer_concept(prompt: str, candidates: Sequence[str]) -> str:
    """The one of ``candidates`` (an Edit's concepts) that ``prompt`` names; the only one if there is one."""
    candidates = [c for c in dict.fromkeys(candidates or []) if str(c).strip()]
    if not candidates:
        raise ConfigError(f"no concept to judge {prompt!r} on: {HOW}")
    if len(candidates) == 1:
        return candidates[0]
    text = f" {words(prompt)} "
    named = [c for c in candidates if words(c) and f" {words(c)} " in text]
    if len(named) != 1:
        which = "none" if not named else f"several ({', '.join(named)})"
        raise ConfigError(f"the prompt {prompt!r} names {which} of the Edit's concepts ({', '.join(candidates)}), so "
                          f"its concept cannot be inferred: {HOW}")
    return named[0]


def prompt_concepts(prompts: list[str], concept, candidates: Sequence[str] | None) -> list[str]:
    """One concept per prompt.

    ``concept``: a name for every prompt, a list with one name (or None: infer it) per prompt, or
    None (infer every one from ``candidates``, the Edit's concepts).
    """
    if concept is None or isinstance(concept, str):
        given = [concept] * len(prompts)
    else:
        given = list(concept)
        if len(given) != len(prompts):
            raise ConfigError(f"concept must be one name, or one per prompt ({len(prompts)}), but {len(given)} "
                              f"were given: {HOW}")
    out = []
    for prompt, name in zip(prompts, given):
        if name is not None and not isinstance(name, str):
            raise ConfigError(f"a concept must be a string but is {name!r}")
        out.append(name.strip() if name is not None and name.strip() else infer_concept(prompt, candidates or []))
    return out
