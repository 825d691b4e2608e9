"""Protocols: which prompts, seeds, sampler, steps, guidance and dtype make the images a metric scores.

Every report records its protocol, so two numbers are only compared when they were made the same
way (metrics.md section 1.2). Three presets:

- ``canvas``: every canvas-mini (style, object) cell, 10 x 10, with UnlearnCanvas' five seeds
  (188, 288, 588, 688, 888) -> 500 images; DDIM, 25 steps, guidance 7.5 (canvas-mini's defaults).
- ``canvas-lite``: the seed-188 slice of ``canvas`` (100 images, the same images ``canvas`` makes
  for that seed), for CI and previews. Not comparable with ``canvas`` numbers to the decimal.
- ``unlearncanvas``: the real benchmark's answer set for the fine-tuned SD 1.5, 51 themes x 20
  objects x 5 seeds = 5,100 images, DDIM (eta 0) 100 steps, CFG 9.0, 512 x 512, one seeded generator
  per (prompt, seed). ``Seed_Images`` is prompted as "Photo style." (the original-model sampler's
  wording; metrics.md 1.2), recorded as ``photo_prompt``.

A protocol can also be a plain prompt list (``Protocol.from_prompts``), e.g. for nudity rates.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace
from typing import NamedTuple

import numpy as np

from ..canvas.world import CAPTION_TEMPLATE, OBJECTS, STYLES
from ..errors import ConfigError
from ..pipelines.generation import Sampling

UNLEARNCANVAS_SEEDS = (188, 288, 588, 688, 888)
UNLEARNCANVAS_THEMES = (
    "Abstractionism", "Artist_Sketch", "Blossom_Season", "Bricks", "Byzantine", "Cartoon", "Cold_Warm",
    "Color_Fantasy", "Comic_Etch", "Crayon", "Cubism", "Dadaism", "Dapple", "Defoliation", "Early_Autumn",
    "Expressionism", "Fauvism", "French", "Glowing_Sunset", "Gorgeous_Love", "Greenfield", "Impressionism",
    "Ink_Art", "Joy", "Liquid_Dreams", "Magic_Cube", "Meta_Physics", "Meteor_Shower", "Monet", "Mosaic",
    "Neon_Lines", "On_Fire", "Pastel", "Pencil_Drawing", "Picasso", "Pop_Art", "Red_Blue_Ink", "Rust",
    "Seed_Images", "Sketch", "Sponge_Dabbed", "Structuralism", "Superstring", "Surrealism", "Ukiyoe",
    "Van_Gogh", "Vibrant_Flow", "Warm_Love", "Warm_Smear", "Watercolor", "Winter",
)
UNLEARNCANVAS_OBJECTS = (
    "Architectures", "Bears", "Birds", "Butterfly", "Cats", "Dogs", "Fishes", "Flame", "Flowers", "Frogs",
    "Horses", "Human", "Jellyfish", "Rabbits", "Sandwiches", "Sea", "Statues", "Towers", "Trees", "Waterfalls",
)


class Item(NamedTuple):
    """One image of a protocol: its position, prompt, seed and (for grid protocols) its labels."""

    index: int
    prompt: str
    seed: int
    theme: int = -1   # index into Protocol.themes, -1 for prompt-list protocols
    object: int = -1  # index into Protocol.objects


@dataclass(frozen=True)
class Protocol:
    """A recorded recipe for an answer set: a theme x object grid (or a prompt list) x seeds."""

    name: str
    themes: tuple[str, ...] = ()
    objects: tuple[str, ...] = ()
    seeds: tuple[int, ...] = UNLEARNCANVAS_SEEDS
    sampling: Sampling = field(default_factory=Sampling)
    dtype: str | None = "float32"  # None: whatever the pipeline was loaded in (recorded in the report)
    template: str = CAPTION_TEMPLATE
    photo_theme: str | None = None  # UnlearnCanvas' Seed_Images: excluded from the default IRA
    photo_prompt: str = "Photo"
    prompts: tuple[str, ...] = ()  # prompt-list protocols only
    model: str = "canvas-mini"
    seeding: str = "one CPU torch.Generator per (prompt, seed)"
    note: str = ""

    def __post_init__(self):
        if bool(self.prompts) == bool(self.themes and self.objects):
            raise ConfigError(f"protocol {self.name!r} needs either themes and objects or prompts, not both")
        if not self.seeds:
            raise ConfigError(f"protocol {self.name!r}: seeds must not be empty")
        if self.photo_theme is not None and self.photo_theme not in self.themes:
            raise ConfigError(f"photo_theme {self.photo_theme!r} is not one of the protocol's themes")

    @property
    def is_grid(self) -> bool:
        return not self.prompts

    def prompt(self, theme: int, obj: int) -> str:
        style = self.themes[theme]
        words = self.photo_prompt if style == self.photo_theme else style.replace("_", " ")
        return self.template.format(object=self.objects[obj], style=words)

    def items(self) -> list[Item]:
        """Every image, cell-major then seed (theme, object, seed for grids)."""
        if not self.is_grid:
            return [Item(i * len(self.seeds) + j, p, s) for i, p in enumerate(self.prompts)
                    for j, s in enumerate(self.seeds)]
        out = []
        for t in range(len(self.themes)):
            for o in range(len(self.objects)):
                for s in self.seeds:
                    out.append(Item(len(out), self.prompt(t, o), int(s), t, o))
        return out

    def __len__(self) -> int:
        cells = len(self.prompts) if not self.is_grid else len(self.themes) * len(self.objects)
        return cells * len(self.seeds)

    def expected(self) -> np.ndarray:
        """Images per (theme, object) cell the protocol must produce (themes x objects)."""
        return np.full((len(self.themes), len(self.objects)), len(self.seeds), dtype=np.int64)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["sampling"] = self.sampling.to_dict()
        d["n_images"] = len(self)
        return {k: list(v) if isinstance(v, tuple) else v for k, v in d.items()}

    @classmethod
    def from_dict(cls, d: dict) -> "Protocol":
        d = {k: v for k, v in d.items() if k != "n_images"}
        d["sampling"] = Sampling(**d["sampling"])
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in d.items()})

    @classmethod
    def from_prompts(cls, prompts: list[str], seeds=(0,), name: str = "prompts", **kwargs) -> "Protocol":
        """A prompt-list protocol (e.g. a nudity prompt set), one image per (prompt, seed)."""
        return cls(name=name, prompts=tuple(prompts), seeds=tuple(seeds), **kwargs)

    def with_(self, **changes) -> "Protocol":
        """A copy with some fields changed (e.g. ``sampling=Sampling(batch_size=10)``)."""
        return replace(self, **changes)


def _canvas(name: str, seeds: tuple[int, ...], note: str) -> Protocol:
    return Protocol(name=name, themes=STYLES, objects=OBJECTS, seeds=seeds,
                    sampling=Sampling("ddim", 25, 7.5, batch_size=50), note=note)


PRESETS = {
    "canvas": lambda: _canvas("canvas", UNLEARNCANVAS_SEEDS,
                              "canvas-mini analogue of UnlearnCanvas' answer set (10 styles x 10 objects x 5 seeds)"),
    "canvas-lite": lambda: _canvas("canvas-lite", UNLEARNCANVAS_SEEDS[:1],
                                   "seed-188 slice of `canvas` for CI and previews; not comparable to the decimal"),
    "unlearncanvas": lambda: Protocol(
        name="unlearncanvas", themes=UNLEARNCANVAS_THEMES, objects=UNLEARNCANVAS_OBJECTS,
        seeds=UNLEARNCANVAS_SEEDS, sampling=Sampling("ddim", 100, 9.0, 512, 512, batch_size=8), dtype=None,
        photo_theme="Seed_Images", model="UnlearnCanvas fine-tuned SD 1.5",
        note="UnlearnCanvas answer set (arXiv 2402.11846); judge with its ViT-L classifiers"),
}


def get_protocol(protocol: str | Protocol) -> Protocol:
    """A preset by name (``canvas``, ``canvas-lite``, ``unlearncanvas``) or a ready Protocol."""
    if isinstance(protocol, Protocol):
        return protocol
    try:
        return PRESETS[str(protocol).lower()]()
    except KeyError:
        raise ConfigError(f"protocol must be one of {sorted(PRESETS)} or a Protocol but is {protocol!r}") from None
