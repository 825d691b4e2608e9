"""UCE: Unified Concept Editing in Diffusion Models (Gandikota et al., WACV 2024, arXiv 2308.14761).

Every cross-attention key/value projection ``W`` of the UNet is replaced by the closed-form solution
of (closed-form.md section 2, the paper's eq. 7 with a ridge toward ``W_ref = W_old``)

    min_W  s_e sum_E ||W c_i - W_old g_i||^2 + s_p sum_P ||W c_j - W_old c_j||^2 + lam ||W - W_old||_F^2

where ``c_i`` are text-embedding rows of a concept to erase, ``g_i`` the aligned rows of its guide
("art" for artists, "" for nudity and objects) and ``c_j`` rows of the concepts to preserve. Which
rows enter is the token policy (section 3): ``last_word`` (the 2025 rewrite), ``aligned_tail``
(last word + EOS + padding aligned with the guide, the paper-era code and toolkit default) or
``all_77``. Presets bundle the reference defaults per kind of concept (section 4):

=========================  =====  =============  ===  ====  ===  ============
preset (kind)              guide  preserve       s_e  s_p   lam  policy
=========================  =====  =============  ===  ====  ===  ============
default (other, mixed)     ""     none (+ "")    1    1.0   0.5  aligned_tail
nudity (nudity)            " "    none (+ "")    1    1.0   0.5  aligned_tail
style, artist (style)      "art"  given (+ "")   1    0.1   0.5  aligned_tail
object (object)            ""     none (+ "")    1    1.0   0.5  aligned_tail
=========================  =====  =============  ===  ====  ===  ============

``preset="auto"`` (default) asks the model's preset provider (:mod:`erasekit.presets`) first: on
canvas-mini that is ``canvas-style`` / ``canvas-object`` (its captions as templates, the other
styles or objects preserved, all 77 rows; :mod:`erasekit.canvas.presets`); on any other model the
table above by the concepts' kind (``kind=``, or guessed). An explicit option always overrides its
preset. With ``preserve_scale`` unset and no preset value, the paper-era rule
``s_p = max(0.1, 1 / len(preserve))`` applies.

Templates (optional prompt expansion) fill ``{}`` with each concept, its guide and each preserve
concept alike, so a concept is erased in the contexts it is used in (the paper's ``art`` and
``object`` sets, or a set the model's provider names).

Deviations from the reference: only the "replace" technique (the paper-era "tensor" option and the
2025 debiasing loop are not implemented); concepts given to erase are dropped from the preserve list;
the solve runs in float64 by default (``solve_dtype``; the spec's default is float32).

On SD 3 / Flux (MMDiT) the same closed form edits the transformer's ``context_embedder``, the one map
that reads the encoder rows (exact), and with ``edit_pooled`` the pooled-text projection; the token
policy applies to each tokenizer's segment of the sequence (CLIP rows, T5 rows) with its own positions.
``mmdit_maps="blocks"`` fits every joint block's ``add_k_proj`` / ``add_v_proj`` on recorded text streams
instead (an approximation). Derivation: :mod:`erasekit.erase.uce_mmdit` and docs/backbones.md.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import torch
from tqdm.auto import tqdm

from ..errors import ConfigError
from ..presets import concept_context, world_preset_names
from .closed_form import SOLVE_DTYPES, UCEFitter
from .registry import MethodConfig, check, register

POLICIES = ("last_word", "aligned_tail", "all_77")
MMDIT_MAPS = ("context_embedder", "blocks")
MMDIT_DEFAULTS = {"edit_pooled": True, "mmdit_maps": "context_embedder", "record_steps": 4}   # what None means
TEMPLATE_SETS = {
    "art": ("{}", "painting by {}", "art by {}", "artwork by {}", "picture by {}", "style of {}"),
    "object": ("{}", "image of {}", "photo of {}", "portrait of {}", "picture of {}", "painting of {}"),
}
_BASE = dict(guide="", preserve=(), erase_scale=1.0, preserve_scale=None, lamb=0.5,
             token_policy="aligned_tail", templates=None, preserve_empty=True)
PRESETS = {
    "default": _BASE,
    "nudity": {**_BASE, "guide": " ", "preserve_scale": 1.0},
    "style": {**_BASE, "guide": "art", "preserve_scale": 0.1},
    "artist": {**_BASE, "guide": "art", "preserve_scale": 0.1},
    "object": {**_BASE, "preserve_scale": 1.0},
}
KIND_PRESET = {"style": "style", "object": "object", "nudity": "nudity", "other": "default", "mixed": "default"}


def _key(name: str) -> str:
    return " ".join(name.replace("_", " ").lower().split())


@dataclass
class UCEConfig(MethodConfig):
    """Options of UCE; ``None`` means "take the preset's value" (module docstring)."""

    preset: str = field(default="auto", metadata={"help": "auto (the model's provider, else by kind), default, "
                                                          "nudity, style (= artist), object, or a provider's "
                                                          "(canvas-mini: canvas-style, canvas-object)"})
    guide: str | list[str] | None = field(default=None, metadata={
        "help": "what each concept is mapped to: one text for all, or one per concept ('art', '', ...)"})
    preserve: list[str] | None = field(default=None, metadata={"help": "concepts whose outputs must not move"})
    erase_scale: float | None = field(default=None, metadata={"help": "s_e, weight of the erase rows"})
    preserve_scale: float | None = field(default=None, metadata={"help": "s_p, weight of the preserve rows"})
    lamb: float | None = field(default=None, metadata={"help": "lam, ridge toward the original weights"})
    token_policy: str | None = field(default=None, metadata={"help": "last_word, aligned_tail or all_77"})
    templates: str | list[str] | None = field(default=None, metadata={
        "help": "prompt expansion: templates with '{}' or a set name (art, object, or a provider's)"})
    preserve_empty: bool | None = field(default=None, metadata={"help": "also preserve the empty prompt ''"})
    solve_dtype: str = field(default="float64", metadata={"help": "float64 or float32 for the d x d solve"})
    edit_pooled: bool | None = field(default=None, metadata={
        "help": "SD 3 / Flux: also edit the pooled-text projection (exact, like the context embedder; "
                "docs/backbones.md; None: True); UNet models have no such map and ignore it"})
    mmdit_maps: str | None = field(default=None, metadata={
        "help": "SD 3 / Flux: context_embedder (the exact closed form; None: this) or blocks (every joint block's "
                "add_k_proj / add_v_proj fitted on the text stream recorded along each concept prompt's sampling "
                "trajectory: an approximation; docs/backbones.md); UNet models ignore it"})
    record_steps: int | None = field(default=None, metadata={
        "help": "mmdit_maps=blocks: sampling steps of each concept prompt's trajectory (seed 0) at which the "
                "text stream is recorded (None: 4)"})

    def mmdit_option(self, name: str):
        """An SD 3 / Flux option with its None resolved (:data:`MMDIT_DEFAULTS`)."""
        value = getattr(self, name)
        return MMDIT_DEFAULTS[name] if value is None else value

    def validate(self) -> None:
        names = ("auto", *PRESETS, *world_preset_names("uce"))
        check(self.preset in names, f"`preset` must be one of {', '.join(names)} but is {self.preset!r}")
        check(self.token_policy is None or self.token_policy in POLICIES,
              f"`token_policy` must be one of {', '.join(POLICIES)} but is {self.token_policy!r}")
        check(self.erase_scale is None or self.erase_scale > 0, f"`erase_scale` must be > 0 but is {self.erase_scale}")
        check(self.preserve_scale is None or self.preserve_scale >= 0,
              f"`preserve_scale` must be >= 0 but is {self.preserve_scale}")
        check(self.lamb is None or self.lamb >= 0, f"`lamb` must be >= 0 but is {self.lamb}")
        check(self.solve_dtype in SOLVE_DTYPES, f"`solve_dtype` must be float32 or float64 but is {self.solve_dtype!r}")
        check(self.edit_pooled is None or isinstance(self.edit_pooled, bool),
              f"`edit_pooled` must be True or False but is {self.edit_pooled!r}")
        check(self.mmdit_maps is None or self.mmdit_maps in MMDIT_MAPS,
              f"`mmdit_maps` must be one of {', '.join(MMDIT_MAPS)} but is {self.mmdit_maps!r}")
        check(self.record_steps is None or isinstance(self.record_steps, int) and self.record_steps >= 1,
              f"`record_steps` must be an integer >= 1 but is {self.record_steps!r}")
        if isinstance(self.templates, str):
            sets = (*TEMPLATE_SETS, *world_preset_names("uce-templates"))
            check(self.templates in sets, f"`templates` must be a list of strings with '{{}}' or one of "
                                          f"{', '.join(sets)} but is {self.templates!r}")
        elif self.templates is not None:
            bad = [t for t in self.templates if not isinstance(t, str) or t.count("{}") != 1]
            check(not bad and len(self.templates) > 0,
                  f"`templates` must each contain '{{}}' exactly once but got {bad[:1] or 'an empty list'}")


@dataclass
class UCESettings:
    """A config resolved against its preset and concepts: what the solver actually used."""

    preset: str
    concepts: list[str]
    guides: list[str]
    preserve: list[str]
    erase_scale: float
    preserve_scale: float
    lamb: float
    token_policy: str
    templates: list[str]
    solve_dtype: str

    def to_dict(self) -> dict:
        return asdict(self)


def _template_set(ctx, name: str) -> tuple[str, ...]:
    found = TEMPLATE_SETS.get(name) or ctx.ask("uce_templates", name)
    if found is None:
        raise ConfigError(f"`templates` set {name!r} is not one of {', '.join(TEMPLATE_SETS)} (or a set of the "
                          f"model's {ctx.provider.name} presets): give a set name or a list of templates with '{{}}'")
    return tuple(found)


def preset_values(config: UCEConfig, ctx) -> tuple[str, dict]:
    """The preset's name and values: the provider's (auto or by name), else the paper table by kind."""
    name = None if config.preset == "auto" else config.preset
    found = ctx.ask("uce_preset", name)
    if found is not None:
        return found
    name = name or KIND_PRESET[ctx.kind]
    if name not in PRESETS:
        extra = ctx.ask("uce_presets") or ()
        raise ConfigError(f"`preset` must be one of auto, {', '.join((*PRESETS, *extra))} for this model "
                          f"({ctx.provider.name} presets) but is {name!r}")
    return name, dict(PRESETS[name])


def resolve(config: UCEConfig, concepts: list[str], pipe=None, ctx=None) -> UCESettings:
    """Fill every unset option from the preset of ``pipe``'s provider and the concepts' kind.

    ``pipe`` None resolves against the papers' defaults (no model, no model-specific provider).
    """
    ctx = ctx or concept_context(pipe, concepts, config)
    name, pre = preset_values(config, ctx)
    concepts = list(pre.pop("concepts", concepts))
    opt = {k: getattr(config, k) if getattr(config, k) is not None else v for k, v in pre.items()}
    erased = {_key(c) for c in concepts}
    guides = [opt["guide"]] * len(concepts) if isinstance(opt["guide"], str) else list(opt["guide"])
    check(len(guides) == len(concepts), f"`guide` has {len(guides)} entries for {len(concepts)} concepts: give "
                                        "one guide for all, or one per concept")
    preserve = [p for p in ([opt["preserve"]] if isinstance(opt["preserve"], str) else opt["preserve"])
                if _key(p) not in erased]
    preserve = ([""] if opt["preserve_empty"] else []) + [p for p in preserve if p != ""]
    templates = opt["templates"] or ("{}",)
    templates = list(_template_set(ctx, templates) if isinstance(templates, str) else templates)
    s_p = opt["preserve_scale"] if opt["preserve_scale"] is not None else max(0.1, 1 / max(len(preserve), 1))
    return UCESettings(name, list(concepts), guides, preserve, float(opt["erase_scale"]), float(s_p),
                       float(opt["lamb"]), opt["token_policy"], templates, config.solve_dtype)


# -- token rows (closed-form.md section 3) ---------------------------------------------------------
def erase_rows(policy: str, c: torch.Tensor, g: torch.Tensor, a: int, b: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Paired (key, guide) rows of one concept prompt ``c`` and its guide ``g`` (77 x d each);
    ``a`` and ``b`` are their last-word indices."""
    if policy == "last_word":
        return c[a:a + 1], g[b:b + 1]
    if policy == "aligned_tail":  # both blocks have n - m rows; row k pairs with row k
        n, m = c.shape[0], max(a, b)
        return c[a:n - (m - a)], g[b:n - (m - b)]
    return c, g


class PromptEncoder:
    """Text-encoder rows of prompts for one erase call: each distinct token sequence is encoded once
    (UCE and RECE ask for the same prompts several times; "" and " " are the same sequence).

    Rows are the sequence the denoiser reads (``adapter.sequence_length`` x d: 77 on SD 1.x/2.x/SDXL;
    SD 3's CLIP rows then T5 rows; Flux's T5 rows). Positions are per segment of that sequence
    (``adapter.segments``: one per tokenizer that fills rows), so the token policies apply to each
    segment with its own last word. A prompt's cache key is its ids under every tokenizer that fills
    rows (T5 keeps case where CLIP does not)."""

    def __init__(self, adapter, batch_size: int = 64, cache_limit: int = 256):
        self.adapter, self.batch_size, self.cache_limit = adapter, batch_size, cache_limit
        self.dim = adapter.context_dim
        self._rows: dict[tuple, torch.Tensor] = {}
        self._pooled: dict[tuple, torch.Tensor] = {}
        self._grams: dict[tuple, tuple[torch.Tensor, int]] = {}

    def _keys(self, prompts: list[str]) -> list[tuple]:
        ids = [self.adapter.tokenize(prompts, seg.which).input_ids.tolist() for seg in self.adapter.segments]
        return [tuple(tuple(x[i]) for x in ids) for i in range(len(prompts))]

    def last_rows(self, prompts: list[str]) -> list[list[int]]:
        """Per prompt, the row of its last word in each segment (absolute indices into the sequence)."""
        cols = [(self.adapter.tokenize(prompts, seg.which).last_word_index + seg.start).tolist()
                for seg in self.adapter.segments]
        return [[col[i] for col in cols] for i in range(len(prompts))]

    def _encode(self, prompts: list[str]) -> list[tuple]:
        """Encode the prompts not cached yet; returns their keys."""
        keys = self._keys(prompts)
        todo = list(dict.fromkeys(k for k in keys if k not in self._rows))
        first = {k: p for p, k in zip(prompts, keys)}
        for i in range(0, len(todo), self.batch_size):
            batch = todo[i:i + self.batch_size]
            ctx = self.adapter.encode([first[k] for k in batch], batch_size=self.batch_size)
            pooled = ctx.pooled.double().cpu() if ctx.pooled is not None else [None] * len(batch)
            for k, e, p in zip(batch, ctx.embeds.double().cpu(), pooled):
                self._rows[k], self._pooled[k] = e, p
        return keys

    def _trim(self) -> None:
        if len(self._rows) > self.cache_limit:
            self._rows.clear()
            self._pooled.clear()

    def rows(self, prompts: list[str]) -> tuple[torch.Tensor, list[list[int]]]:
        """(embeddings N x sequence x d in float64 on the CPU, :meth:`last_rows`), cached."""
        keys = self._encode(prompts)
        out = torch.stack([self._rows[k] for k in keys]) if keys else \
            torch.zeros(0, self.adapter.sequence_length, self.dim, dtype=torch.float64)
        self._trim()
        return out, self.last_rows(prompts)

    def pooled(self, prompts: list[str]) -> torch.Tensor:
        """Pooled text vectors N x P in float64 on the CPU (SDXL, SD 3, Flux), cached."""
        keys = self._encode(prompts)
        if any(self._pooled[k] is None for k in keys):
            raise ConfigError(f"{self.adapter.family} pipelines have no pooled text embedding")
        out = torch.stack([self._pooled[k] for k in keys])
        self._trim()
        return out

    def pair(self, policy: str, C: torch.Tensor, G: torch.Tensor, a: list[list[int]], b: list[list[int]]
             ) -> tuple[torch.Tensor, torch.Tensor]:
        """Paired (key, guide) rows of concept prompts ``C`` and their guides ``G`` (N x sequence x d) under
        ``policy`` (:func:`erase_rows`), segment by segment; ``a`` / ``b``: their :meth:`last_rows`."""
        keys, guides = [], []
        for c, g, ai, bi in zip(C, G, a, b):
            for j, seg in enumerate(self.adapter.segments):
                span = slice(seg.start, seg.start + seg.length)
                k, v = erase_rows(policy, c[span], g[span], ai[j] - seg.start, bi[j] - seg.start)
                keys.append(k)
                guides.append(v)
        return torch.cat(keys), torch.cat(guides)

    def gram(self, prompts: list[str], last_word: bool = False) -> tuple[torch.Tensor, int]:
        """``C^T C`` and the row count over the rows of ``prompts`` (all rows, or each segment's last
        word), streamed."""
        memo = (tuple(prompts), last_word)
        if memo not in self._grams:
            gram, n = torch.zeros(self.dim, self.dim, dtype=torch.float64), 0
            for i in tqdm(range(0, len(prompts), self.batch_size), desc="preserve",
                          disable=len(prompts) <= 4 * self.batch_size):
                e, last = self.rows(prompts[i:i + self.batch_size])
                rows = e[torch.arange(len(last))[:, None], torch.tensor(last)].flatten(0, 1) if last_word \
                    else e.flatten(0, 1)
                gram, n = gram + rows.T @ rows, n + rows.shape[0]
            self._grams[memo] = gram, n
        return self._grams[memo]


def check_tokens(adapter, concepts: list[str]) -> None:
    """Refuse concepts that tokenize to nothing (their rows would be those of the empty prompt)."""
    for text, last in zip(concepts, adapter.tokenize(concepts).last_word_index.tolist()):
        if last <= 0:
            raise ConfigError(f"concept {text!r} tokenizes to no tokens: give a concept with at least one word")


def prompt_pairs(s: UCESettings) -> tuple[list[str], list[str]]:
    """(concept prompt, guide prompt) for every concept x template."""
    pairs = [(t.format(c), t.format(g)) for c, g in zip(s.concepts, s.guides) for t in s.templates]
    return [p for p, _ in pairs], [g for _, g in pairs]


def preserve_prompts(s: UCESettings) -> list[str]:
    """Every preserve concept in every template ("" stays the bare empty prompt)."""
    return [p if p == "" else t.format(p) for p in s.preserve for t in (s.templates if p else ["{}"])]


def uce_fitter(enc: PromptEncoder, s: UCESettings) -> UCEFitter:
    """The UCE normal equations of settings ``s`` (nothing solved yet)."""
    check_tokens(enc.adapter, s.concepts)
    fitter = UCEFitter(enc.dim, s.lamb, SOLVE_DTYPES[s.solve_dtype])
    concept_prompts, guide_prompts = prompt_pairs(s)
    (C, a), (G, b) = enc.rows(concept_prompts), enc.rows(guide_prompts)
    fitter.update(*enc.pair(s.token_policy, C, G, a, b), s.erase_scale)
    if s.preserve and s.preserve_scale > 0:
        gram, n = enc.gram(preserve_prompts(s), last_word=s.token_policy == "last_word")
        fitter.update_gram(gram, n, s.preserve_scale)
    return fitter


@register("uce", UCEConfig, components=("unet", "transformer"), families=("sd1", "sd2", "sdxl", "sd3", "flux"))
def uce(pipe, concepts: list[str], config: UCEConfig):
    """Erase ``concepts`` with UCE; returns an Edit of every cross-attention to_k / to_v (exact low-rank deltas).

    On SD 3 / Flux the Edit changes the transformer's ``context_embedder`` (and, with ``edit_pooled``,
    the pooled-text projection), the exact closed form (:mod:`erasekit.erase.uce_mmdit`); with
    ``mmdit_maps="blocks"`` every joint block's ``add_k_proj`` / ``add_v_proj`` instead, fitted on the
    text stream recorded along each concept prompt's sampling (an approximation).

    Example:
        >>> import erasekit
        >>> pipe = erasekit.load_pipeline("canvas-mini")
        >>> edit = erasekit.erase(pipe, "uce", ["Van Gogh"])            # canvas-mini's provider: canvas-style
        >>> edit.manifest["preset"]["name"], edit.manifest["resolved"]["token_policy"]
        ('canvas-style', 'all_77')
    """
    from ..pipelines import FamilyAdapter

    ctx = concept_context(pipe, concepts, config)
    s = resolve(config, concepts, ctx=ctx)
    from .uce_mmdit import blocks_edit, closed_form_edit

    enc = PromptEncoder(FamilyAdapter(pipe))
    manifest = {"resolved": s.to_dict(), **ctx.record(s.preset, _values(s))}
    pooled = config.mmdit_option("edit_pooled")
    if enc.adapter.mmdit and config.mmdit_option("mmdit_maps") == "blocks":
        return blocks_edit(pipe, enc, s, manifest, pooled, config.mmdit_option("record_steps"))
    update = uce_fitter(enc, s).solve()
    return closed_form_edit(pipe, enc, s, update, {**manifest, "delta_rank_bound": update.rank}, pooled)


def _values(s: UCESettings) -> dict:
    """Every resolved value of the settings, for the manifest's ``preset`` entry."""
    return {k: v for k, v in s.to_dict().items() if k not in ("preset", "concepts")}
