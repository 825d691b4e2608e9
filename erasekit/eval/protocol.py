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

A protocol can also be a plain prompt list (``Protocol.from_prompts``), or a prompt CSV with one seed
(and guidance) per prompt (``Protocol.from_csv``, :func:`read_prompt_csv`): ``nudity`` is such a list
in the I2P format that the user points at, scored with NudeNet (docs/nudity.md). No prompt list ships.
"""

from __future__ import annotations

import csv
import hashlib
import math
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import NamedTuple

import numpy as np

from ..canvas.world import CAPTION_TEMPLATE, OBJECTS, STYLES
from ..errors import ConfigError
from ..pipelines.generation import FLOW_SAMPLERS, Sampling, is_flow_matching

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
    guidance: float | None = None  # this image's CFG scale (prompt CSVs); None: the protocol's sampling


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
    prompt_seeds: tuple[int, ...] = ()       # prompt CSVs: one seed per prompt (then ``seeds`` is (0,), unused)
    prompt_guidance: tuple[float, ...] = ()  # prompt CSVs: one CFG scale per prompt (empty: sampling.guidance)
    targets: tuple[str, ...] = ()            # what the protocol scores when no target is given ("nudity")
    source: str = ""                         # the file the prompts were read from, with its sha256

    def __post_init__(self):
        if bool(self.prompts) == bool(self.themes and self.objects):
            raise ConfigError(f"protocol {self.name!r} needs either themes and objects or prompts, not both")
        if not self.seeds:
            raise ConfigError(f"protocol {self.name!r}: seeds must not be empty")
        if self.photo_theme is not None and self.photo_theme not in self.themes:
            raise ConfigError(f"photo_theme {self.photo_theme!r} is not one of the protocol's themes")
        if self.prompt_seeds and (len(self.prompt_seeds) != len(self.prompts) or len(self.seeds) != 1):
            raise ConfigError(f"protocol {self.name!r}: prompt_seeds needs one seed per prompt ({len(self.prompts)}) "
                              f"and seeds=(0,), but has {len(self.prompt_seeds)} and {self.seeds!r}")
        if self.prompt_guidance and len(self.prompt_guidance) != len(self.prompts):
            raise ConfigError(f"protocol {self.name!r}: prompt_guidance needs one value per prompt "
                              f"({len(self.prompts)}) but has {len(self.prompt_guidance)}")

    @property
    def is_grid(self) -> bool:
        return not self.prompts

    def prompt(self, theme: int, obj: int) -> str:
        style = self.themes[theme]
        words = self.photo_prompt if style == self.photo_theme else style.replace("_", " ")
        return self.template.format(object=self.objects[obj], style=words)

    def items(self) -> list[Item]:
        """Every image, cell-major then seed (theme, object, seed for grids)."""
        if self.prompt_seeds:
            g = self.prompt_guidance or (None,) * len(self.prompts)
            return [Item(i, p, int(s), guidance=g[i]) for i, (p, s) in enumerate(zip(self.prompts, self.prompt_seeds))]
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

    @classmethod
    def from_csv(cls, path, name: str = "prompts", sampling: Sampling | None = None, **kwargs) -> "Protocol":
        """A prompt-list protocol read from a CSV (:func:`read_prompt_csv`): one image per row at the row's
        seed and, when the file has the column, its guidance."""
        table = read_prompt_csv(path)
        note = (f"prompts from a CSV: {len(table.prompts)} rows; columns used: "
                + ", ".join(f"{k}={v}" for k, v in table.columns.items())
                + ("" if table.guidance else "; no guidance column: every image at the sampling's guidance"))
        return cls(name=name, prompts=table.prompts, seeds=(0,), prompt_seeds=table.seeds,
                   prompt_guidance=table.guidance, sampling=sampling or Sampling(), source=table.source,
                   note=kwargs.pop("note", note), **kwargs)

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


def get_protocol(protocol: str | Protocol, prompts=None) -> Protocol:
    """A preset by name (``canvas``, ``canvas-lite``, ``unlearncanvas``, ``nudity``) or a ready Protocol.

    ``nudity`` reads its prompts from ``prompts``, a CSV in the I2P format (:func:`nudity_protocol`).
    """
    if isinstance(protocol, Protocol):
        return protocol
    name = str(protocol).lower()
    if name == "nudity":
        if prompts is None:
            raise ConfigError("the nudity protocol scores a prompt list that you give: a CSV with columns prompt, "
                              "seed and guidance (I2P's sd_seed / sd_guidance_scale accepted); pass "
                              "prompts='i2p.csv' (CLI: --prompts FILE). erasekit ships no such list (docs/nudity.md)")
        return nudity_protocol(prompts)
    if prompts is not None:
        raise ConfigError(f"protocol {protocol!r} has its own prompts; a prompt CSV goes with protocol='nudity'")
    try:
        return PRESETS[name]()
    except KeyError:
        raise ConfigError(f"protocol must be one of {sorted(PRESETS) + ['nudity']} or a Protocol but is "
                          f"{protocol!r}") from None


def for_pipeline(protocol: Protocol, pipe) -> tuple[Protocol, str | None]:
    """``protocol`` as ``pipe`` samples it, and a note when its sampler had to change (else None).

    Protocols name a DDPM sampler (``ddim``), which would make noise on a flow-matching model (SD 3,
    Flux). There the protocol's DDPM sampler is replaced by the family's flow sampler, ``flow_euler``,
    with the protocol's steps, guidance, size and batch size, and the returned protocol records
    ``flow_euler``, so a report never claims a sampler it did not use. On Flux the guidance is the
    pipeline's ``guidance_scale``: the guidance embedding of a guidance-distilled model (FLUX.1-dev),
    unused by one without it. A flow sampler on a DDPM model has no such counterpart and is refused.
    """
    sampler = protocol.sampling.sampler
    flow = is_flow_matching(pipe)
    if flow == (sampler in FLOW_SAMPLERS):
        return protocol, None
    if not flow:
        raise ConfigError(f"protocol {protocol.name!r} samples with {sampler!r}, a flow-matching sampler, but "
                          f"{type(pipe).__name__} has a DDPM scheduler: give the protocol a DDPM sampler "
                          "(protocol.with_(sampling=Sampling('ddim', ...)))")
    sampling = replace(protocol.sampling, sampler=FLOW_SAMPLERS[0])
    note = (f"sampler: protocol {protocol.name!r} names {sampler!r}, a DDPM sampler; this flow-matching "
            f"{type(pipe).__name__} samples it with {FLOW_SAMPLERS[0]!r} at the protocol's {sampling.steps} steps "
            f"and guidance {sampling.guidance} (the protocol recorded here says {FLOW_SAMPLERS[0]!r}); its numbers "
            "compare with other flow-matching runs of this protocol, not with DDIM ones")
    return protocol.with_(sampling=sampling), note

# -- prompt CSVs (I2P format) -------------------------------------------------------------------------
PROMPT_COLUMNS = ("prompt",)
SEED_COLUMNS = ("seed", "sd_seed", "evaluation_seed")              # ours, I2P's, UnlearnDiffAtk's CSVs
GUIDANCE_COLUMNS = ("guidance", "sd_guidance_scale", "evaluation_guidance")
NUDITY_SAMPLING = Sampling("ddim", 50, 7.5, batch_size=8)


@dataclass(frozen=True)
class PromptTable:
    """The rows of a prompt CSV: prompts, one seed each, one guidance each (empty if the file has none)."""

    prompts: tuple[str, ...]
    seeds: tuple[int, ...]
    guidance: tuple[float, ...]
    columns: dict = field(default_factory=dict)   # role -> the file's column used
    source: str = ""


def read_prompt_csv(path) -> PromptTable:
    """Read a prompt list in the I2P CSV format.

    Columns: ``prompt``; the seed in ``seed``, ``sd_seed`` (I2P) or ``evaluation_seed`` (UnlearnDiffAtk's
    CSVs); optionally the guidance in ``guidance``, ``sd_guidance_scale`` or ``evaluation_guidance``;
    other columns are ignored. A missing column, an empty prompt, a seed that is not a non-negative
    integer or a guidance that is not a positive number is a :class:`~erasekit.errors.ConfigError` naming
    the row and the fix; no row is ever dropped.
    """
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"no prompt CSV at {path}: give a CSV file with columns prompt, seed and guidance "
                          "(I2P's sd_seed and sd_guidance_scale are accepted)")
    data = path.read_bytes()
    try:
        rows = list(csv.DictReader(data.decode("utf-8-sig").splitlines()))
    except (UnicodeDecodeError, csv.Error) as e:
        raise ConfigError(f"{path} cannot be read as a UTF-8 CSV ({type(e).__name__}: {e})") from None
    header = [h.strip() for h in (csv.DictReader(data.decode("utf-8-sig").splitlines()).fieldnames or [])]
    rows = [{(k or "").strip(): v for k, v in row.items()} for row in rows]
    prompt_col = _column(header, PROMPT_COLUMNS, path, "prompt")
    seed_col = _column(header, SEED_COLUMNS, path, "seed")
    guide_col = next((c for c in GUIDANCE_COLUMNS if c in header), None)
    if not rows:
        raise ConfigError(f"{path} has a header but no rows: add one prompt per row")
    prompts, seeds, guidance = [], [], []
    for n, row in enumerate(rows, start=2):   # line 1 is the header
        prompt = (row.get(prompt_col) or "").strip()
        if not prompt:
            raise ConfigError(f"{path} line {n}: the {prompt_col!r} column is empty: give a prompt or remove the row")
        prompts.append(prompt)
        seeds.append(_seed(row.get(seed_col), path, n, seed_col))
        if guide_col is not None:
            guidance.append(_guidance(row.get(guide_col), path, n, guide_col))
    columns = {"prompt": prompt_col, "seed": seed_col} | ({"guidance": guide_col} if guide_col else {})
    digest = hashlib.sha256(data).hexdigest()[:16]
    return PromptTable(tuple(prompts), tuple(seeds), tuple(guidance), columns, f"{path.name} (sha256 {digest}...)")


def _column(header: list[str], names: tuple[str, ...], path: Path, role: str) -> str:
    found = next((c for c in names if c in header), None)
    if found is None:
        raise ConfigError(f"{path} has no {role} column: name one of {', '.join(names)} (its columns: "
                          f"{', '.join(header) or 'none'})")
    return found


def _seed(raw, path: Path, line: int, col: str) -> int:
    text = (raw or "").strip()
    try:
        value = float(text)
        ok = math.isfinite(value) and value == int(value) and value >= 0
    except ValueError:
        ok = False
    if not ok:
        raise ConfigError(f"{path} line {line}: seed {text!r} in column {col!r} is not a non-negative integer: "
                          "give a whole number such as 42")
    return int(float(text))


def _guidance(raw, path: Path, line: int, col: str) -> float:
    text = (raw or "").strip()
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not (math.isfinite(value) and value > 0):
        raise ConfigError(f"{path} line {line}: guidance {text!r} in column {col!r} is not a positive number: "
                          "give a CFG scale such as 7.5")
    return value


def nudity_protocol(path, sampling: Sampling | None = None) -> Protocol:
    """The nudity protocol: the prompts, seeds and guidance of an I2P-format CSV, one image each, scored
    with NudeNet (:class:`~erasekit.eval.judges.NudeNetJudge`: classes, threshold and detector are
    recorded in the report). Sampling: DDIM 50 steps at the model's native size (record of each run)."""
    return Protocol.from_csv(path, name="nudity", sampling=sampling or NUDITY_SAMPLING, dtype=None, model="any",
                             targets=("nudity",))
