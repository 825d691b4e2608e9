"""The canvas world: its objects, its styles and how they are captioned.

The world is modelled on UnlearnCanvas (arXiv 2402.11846): every image shows one object painted in
one style, and the caption template is UnlearnCanvas' ``"A {object} image in {style} style."``.
Names follow UnlearnCanvas' label spelling (plural object names, ``_`` in style names) so that the
same code paths serve the real benchmark and canvas-mini.
"""

from __future__ import annotations

OBJECTS: tuple[str, ...] = (
    "Architectures",
    "Butterfly",
    "Cats",
    "Fishes",
    "Flame",
    "Flowers",
    "Human",
    "Jellyfish",
    "Towers",
    "Trees",
)

STYLES: tuple[str, ...] = (
    "Cubism",
    "Mosaic",
    "Neon_Lines",
    "On_Fire",
    "Pencil_Drawing",
    "Pop_Art",
    "Ukiyoe",
    "Van_Gogh",
    "Watercolor",
    "Winter",
)

# The first template is UnlearnCanvas' own; the paraphrases keep the text encoder from
# memorising one sentence (they are used only in training).
CAPTION_TEMPLATE = "A {object} image in {style} style."
PARAPHRASES: tuple[str, ...] = (
    CAPTION_TEMPLATE,
    CAPTION_TEMPLATE,
    "{style} style painting of {object}.",
    "An image of {object} in {style} style",
    "{object}, {style} style",
    "A picture of {object}, painted in {style} style.",
)


def style_text(style: str) -> str:
    """The words a caption uses for a style label (``Van_Gogh`` -> ``Van Gogh``)."""
    return style.replace("_", " ")


def caption(obj: str, style: str, template: str = CAPTION_TEMPLATE) -> str:
    """Caption of one (object, style) cell, UnlearnCanvas template by default."""
    return template.format(object=obj, style=style_text(style))


def check_label(name: str, labels: tuple[str, ...], kind: str) -> int:
    """Index of ``name`` in ``labels`` (accepting spaces for underscores), or a ValueError."""
    key = name.strip().replace(" ", "_").lower()
    for i, label in enumerate(labels):
        if label.lower() == key:
            return i
    raise ValueError(f"unknown canvas {kind} {name!r}; choose one of: {', '.join(labels)}")
