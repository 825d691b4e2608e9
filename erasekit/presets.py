"""Presets chosen by the model, never by the concept's name.

A method's defaults depend on two things: the model and the kind of concept (``style``,
``object``, ``nudity``, ``other``). The model picks a *preset provider* (:func:`provider_for`):

- a model that carries its own provider is recognised by its identity, a marker written into its
  text encoder's config (``erasekit_world``), which diffusers and transformers keep on load and on
  ``save_pretrained``, however the pipeline was loaded. canvas-mini carries ``"canvas-mini"``; its
  provider (:mod:`erasekit.canvas.presets`) knows the world's concepts, their captions and the presets
  measured on it;
- every other model gets the ``paper`` provider: each method's defaults from its paper or reference
  code, chosen by the concept's kind only (the tables live in the method modules and in
  ``docs/presets.md``).

A provider answers *hooks* (``uce_preset``, ``esd_preset``, ``prompts``, ...); a hook it does not
have, or that returns None, means "the method's paper default". Methods ask through a
:class:`ConceptContext`, so they never see which provider answered.

The kind is an explicit option of every method (``kind=``); without it the provider guesses: on
canvas-mini from its world's labels, elsewhere ``nudity`` when the concept holds a nudity word and
``other`` otherwise (a style or an object cannot be told from its words alone, so give
``kind="style"`` for an artist). The guess is logged and, with the provider, the preset and every
resolved value, recorded in the Edit's manifest (:meth:`ConceptContext.record`).

Unknown concepts: a provider with a closed world (canvas-mini) refuses a concept outside it with a
:class:`~erasekit.errors.ConfigError` listing its concepts, unless ``allow_unknown_concept=True``.
On other models a concept whose every word the tokenizer breaks into many short pieces (so the
text encoder most likely never saw it whole) gets a warning; see :func:`fragmented_words`.
"""

from __future__ import annotations

import importlib
import logging
import re
from dataclasses import dataclass

from .errors import ConfigError

log = logging.getLogger("erasekit.presets")

KINDS = ("style", "object", "nudity", "other")

MARKER = "erasekit_world"   # key of the text encoder's config that names the model's world
# World name -> module whose ``PROVIDER`` serves it (imported on first use).
WORLDS = {"canvas-mini": "erasekit.canvas.presets", "canvas-mini-mmdit": "erasekit.canvas.mmdit_presets"}
# Words that make the paper provider guess ``nudity`` (whole words, case-insensitive).
_NUDITY = re.compile(r"\b(nud(e|es|ity)|naked|nsfw|porn\w*|sexual\w*|explicit|topless)\b", re.IGNORECASE)


class PaperPresets:
    """The provider of every model without its own: no hook, so each method uses its paper defaults."""

    name = "paper"

    def knows(self, concept: str) -> bool:
        return True

    def guess_kind(self, concept: str) -> str:
        """``nudity`` when the concept holds a nudity word, else ``other`` (module docstring)."""
        return "nudity" if _NUDITY.search(concept.replace("_", " ")) else "other"

    def check_kind(self, concept: str, kind: str) -> None:
        """Any kind may be given for any concept on a model without a world of its own."""


PAPER = PaperPresets()


def world_of(pipe) -> str | None:
    """The world a pipeline's model files declare (``erasekit_world`` in its text encoder's config)."""
    config = getattr(getattr(pipe, "text_encoder", None), "config", None)
    world = getattr(config, MARKER, None)
    return world if isinstance(world, str) else None


def provider_for(pipe):
    """The preset provider of ``pipe``: its world's provider, or :data:`PAPER` (no pipeline: paper)."""
    world = world_of(pipe) if pipe is not None else None
    if world is None:
        return PAPER
    if world not in WORLDS:
        raise ConfigError(f"the model declares the world {world!r} ({MARKER} in its text encoder's config), "
                          f"which this erasekit does not know (known: {', '.join(WORLDS)}): remove the key "
                          "to use the papers' defaults, or update erasekit")
    return importlib.import_module(WORLDS[world]).PROVIDER


def world_preset_names(method: str) -> tuple[str, ...]:
    """Names that some world's provider gives ``method``'s presets (``uce-templates``: UCE's template sets),
    so that a config can refuse a misspelt name when it is built, before any model is known."""
    names: list[str] = []
    for module in WORLDS.values():
        names += importlib.import_module(module).PROVIDER.preset_names(method)
    return tuple(names)


@dataclass
class ConceptContext:
    """The concepts of one erase call with their kinds and the provider that answers for the model."""

    provider: object
    concepts: list[str]
    kinds: list[str]
    guessed: bool

    @property
    def kind(self) -> str:
        """The concepts' common kind, or ``mixed``."""
        return self.kinds[0] if len(set(self.kinds)) == 1 else "mixed"

    def kind_of(self, concept: str) -> str:
        return self.kinds[self.concepts.index(concept)]

    def ask(self, hook: str, *args, **kwargs):
        """The provider's answer to ``hook`` (``self`` first), or None: use the method's paper default."""
        fn = getattr(self.provider, hook, None)
        return None if fn is None else fn(self, *args, **kwargs)

    def prompts(self, concept: str) -> list[str]:
        """Prompts that carry ``concept`` on this model (canvas-mini: its captions), else the concept itself."""
        return self.ask("prompts", concept) or [concept]

    def attribute(self, concept: str) -> str | None:
        """The concept's short text inside its prompts ("Van Gogh style."), or None."""
        return self.ask("attribute", concept)

    def record(self, preset: str, values: dict) -> dict:
        """Manifest entries: ``kind``, ``kinds``, ``kind_guessed`` and ``preset`` (provider, name, values)."""
        return {"kind": self.kind, "kinds": dict(zip(self.concepts, self.kinds)), "kind_guessed": self.guessed,
                "preset": {"provider": self.provider.name, "name": preset, "values": _plain(values)}}


def _plain(value):
    """JSON-friendly copy (tuples as lists) of a resolved-values dict."""
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def concept_context(pipe, concepts: list[str], config=None) -> ConceptContext:
    """Provider, unknown-concept check and kinds for ``concepts`` on ``pipe`` (options from ``config``).

    ``config.kind`` (one of :data:`KINDS`) sets every concept's kind; None lets the provider guess.
    ``config.allow_unknown_concept`` lets a closed world erase a concept it does not know.
    """
    provider = provider_for(pipe)
    kind = getattr(config, "kind", None)
    unknown = [c for c in concepts if not provider.knows(c)]
    if unknown and not getattr(config, "allow_unknown_concept", False):
        raise ConfigError(f"{provider.name} does not know the concept {unknown[0]!r}; its concepts are: "
                          f"{', '.join(provider.concepts())}. Pass allow_unknown_concept=True "
                          "(CLI: -o allow_unknown_concept=true) to erase it anyway")
    if unknown:
        log.warning("%s does not know %s: erasing anyway (allow_unknown_concept), with the papers' defaults",
                    provider.name, ", ".join(map(repr, unknown)))
    if kind is None:
        kinds = [PAPER.guess_kind(c) if c in unknown else provider.guess_kind(c) for c in concepts]
        log.info("concept kind guessed by the %s provider: %s (set kind= to choose)", provider.name,
                 ", ".join(f"{c!r}: {k}" for c, k in zip(concepts, kinds)))
    else:
        kinds = [kind] * len(concepts)
        for c in concepts:
            if c not in unknown:
                provider.check_kind(c, kind)
    if pipe is not None and provider is PAPER:
        warn_unknown_words(pipe, concepts)
    return ConceptContext(provider, list(concepts), kinds, kind is None)


def fragmented_words(tokenizer, concept: str) -> list[str]:
    """Words of ``concept`` that the tokenizer breaks into many short pieces (at least 3, and more than
    one piece per two letters: "zqxvbnm" -> z q x v bn m), the mark of a word its text encoder never saw
    whole. Known but rare words ("nudity" -> nu dity, "ukiyoe" -> uki yo e) stay below that line."""
    out = []
    for word in re.findall(r"[a-z0-9]+", concept.lower().replace("_", " ")):
        pieces = len(tokenizer.tokenize(word))
        if pieces >= 3 and 2 * pieces > len(word):
            out.append(word)
    return out


def warn_unknown_words(pipe, concepts: list[str]) -> list[str]:
    """Log a warning for each concept all of whose words are fragmented (:func:`fragmented_words`)."""
    tokenizer = getattr(pipe, "tokenizer", None)
    if tokenizer is None or not hasattr(tokenizer, "tokenize"):
        return []
    weak = []
    for concept in concepts:
        words = re.findall(r"[a-z0-9]+", concept.lower().replace("_", " "))
        broken = fragmented_words(tokenizer, concept)
        if words and len(broken) == len(words):
            weak.append(concept)
            log.warning("the concept %r splits into many short tokens (%s), so the model most likely does not "
                        "know it: check its images before trusting the erasure", concept, ", ".join(broken))
    return weak
