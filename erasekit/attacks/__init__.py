"""Attacks on erased models: UnlearnDiffAtk, Ring-A-Bell, P4D, concept inversion and cheap baselines,
judged by the evaluation's judges.

One entry point, :func:`attack`, runs any of the methods on a batch of prompts and returns an
:class:`~erasekit.attacks.result.AttackResult` (per-prompt adversarial prompt, success, step of
success, UNet evaluations, wall time; pre-ASR and ASR, where ASR includes pre-ASR as in
UnlearnDiffAtk). The prefix-token machinery that UnlearnDiffAtk shares with AdvUnlearn's inner
attack is :class:`~erasekit.pipelines.prefix.PrefixPrompts` (re-exported here).

This package imports torch-heavy modules only when they are used.
"""

from __future__ import annotations

import importlib
from contextlib import nullcontext

# name -> (module, config class, function, needs target images)
METHODS = {
    "unlearndiffatk": ("unlearndiffatk", "UnlearnDiffAttackConfig", "unlearndiffatk", True),
    "none": ("baselines", "NoAttackConfig", "no_attack", False),
    "seed_search": ("baselines", "SeedSearchConfig", "seed_search", False),
    "random_prefix": ("baselines", "RandomPrefixConfig", "random_prefix", False),
    "p4d": ("p4d", "P4DConfig", "p4d", True),
    "concept_inversion": ("concept_inversion", "ConceptInversionConfig", "concept_inversion", True),
    "ring_a_bell": ("ring_a_bell", "RingABellConfig", "ring_a_bell", False),
}
MMDIT_ATTACKS = ("unlearndiffatk", "none", "seed_search", "random_prefix", "p4d", "concept_inversion", "ring_a_bell")
"""The attacks that run on SD 3 / Flux (docs/backbones.md); any other is refused there with a ConfigError."""
_LAZY = {"AttackResult": "result", "PromptAttack": "result", "ASR_DEFINITION": "result",
         "PrefixPrompts": "erasekit.pipelines.prefix", "attack_vocabulary": "erasekit.pipelines.prefix",
         "UnlearnDiffAttackConfig": "unlearndiffatk",
         "NoAttackConfig": "baselines", "SeedSearchConfig": "baselines", "RandomPrefixConfig": "baselines",
         "RingABellConfig": "ring_a_bell",
         "P4DConfig": "p4d", "ConceptInversionConfig": "concept_inversion",
         "learned_tokens": "concept_inversion"}

__all__ = ["attack", "get_attack", "METHODS", *_LAZY]


def __getattr__(name: str):
    if name in _LAZY:
        module = _LAZY[name]
        return getattr(importlib.import_module(module if "." in module else f"{__name__}.{module}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def get_attack(method: str):
    """(config class, function, needs target images) of an attack method by name."""
    from ..errors import ConfigError

    key = str(method).lower().strip()
    if key not in METHODS:
        raise ConfigError(f"unknown attack method {method!r}; choose one of: {', '.join(METHODS)}")
    module, cfg, fn, needs_targets = METHODS[key]
    mod = importlib.import_module(f"{__name__}.{module}")
    return getattr(mod, cfg), getattr(mod, fn), needs_targets


def _check_prompts(prompts, seeds) -> tuple[list[str], list[int]]:
    from ..errors import ConfigError

    prompts = [prompts] if isinstance(prompts, str) else list(prompts or [])
    if not prompts or not all(isinstance(p, str) for p in prompts):
        raise ConfigError("prompts must be a non-empty list of strings, e.g. ['A Cats image in Van Gogh style.']")
    seeds = [0] * len(prompts) if seeds is None else ([seeds] if isinstance(seeds, int) else list(seeds))
    if len(seeds) != len(prompts) or not all(isinstance(s, int) and not isinstance(s, bool) for s in seeds):
        raise ConfigError(f"seeds must be one integer per prompt ({len(prompts)}) but got {seeds!r:.80}")
    return prompts, seeds


def attack(pipe, prompts: list[str], concept=None, *, judge, method: str = "unlearndiffatk", seeds=None,
           edit=None, target_images=None, sampling=None, progress: bool = True, **options):
    """Attack ``prompts`` so that ``judge`` sees each prompt's concept in the images of ``pipe``.

    Args:
        pipe: a Stable Diffusion pipeline (SD 1.x/2.x, SDXL, SD 3 / 3.5, Flux, or SFD's one-step pipeline).
            Without ``edit`` it is attacked as it is (an Edit may already be applied). Every method of
            :data:`MMDIT_ATTACKS` runs on SD 3 and Flux (docs/backbones.md); its ``unet_evals`` count
            transformer evaluations there.
        prompts: prompts that should show the concept (one image per prompt and seed).
        concept: the concept the judge must see (e.g. ``"Van_Gogh"``): one name for every prompt, a list
            with one name per prompt (None entries are inferred), or None: inferred from ``edit``'s
            concepts, the one the prompt names (see :mod:`erasekit.attacks.concepts`; an Edit of one
            concept judges every prompt on it). Checked against the judge before any work.
        judge: the :class:`~erasekit.eval.judges.Judge` that decides success (``judge.hits``).
        method: ``unlearndiffatk`` (default), ``none`` (pre-ASR only), ``seed_search``, ``random_prefix``,
            ``ring_a_bell``, ``p4d``, ``concept_inversion``, or any other name in :data:`METHODS`.
        seeds: one image seed per prompt (default 0 for every prompt).
        edit: an :class:`~erasekit.Edit` not yet applied to ``pipe``. The target images come from
            ``pipe`` WITHOUT it (the original model); the attack runs with it applied and the
            pipeline is restored afterwards, also on error. P4D needs it: its loss compares the
            erased model with the original one.
        target_images: one image per prompt that shows the concept (the attacks that use target
            images: UnlearnDiffAtk, P4D, concept inversion). Default:
            generated from the same prompt and seed by the original model (``pipe`` without ``edit``;
            with no ``edit``, by ``pipe`` as it is).
        sampling: :class:`~erasekit.Sampling` of the target and judged images (default DDIM 25, CFG 7.5;
            on SD 3 / Flux flow Euler, :func:`~erasekit.pipelines.default_sampling`).
        options: the method's config fields (e.g. ``k=3, schedule="reference"``).

    Every generated batch is checked: a degenerate image (non-finite, or one flat colour) raises
    :class:`~erasekit.errors.DegenerateOutputError`, so a broken model is never reported as held.
    With ``edit`` and generated targets, one image of the edited model is made first, so a broken
    Edit fails before the targets are made.

    Example:
        >>> import erasekit
        >>> from erasekit.eval import CanvasJudge
        >>> pipe = erasekit.load_pipeline("canvas-mini")
        >>> edit = erasekit.erase(pipe, "uce", ["Van Gogh"])
        >>> res = erasekit.attack(pipe, ["A Cats image in Van Gogh style."], "Van_Gogh",
        ...                       judge=CanvasJudge.load(), edit=edit)
        >>> res.summary()["asr_definition"].startswith("ASR includes pre-ASR")
        True
    """
    from .._profile import measure
    from ..errors import ConfigError
    from ..config import make_config
    from ..pipelines.generation import default_sampling, generate
    from ..pipelines.mmdit import denoiser, mmdit_family
    from .concepts import prompt_concepts
    from .result import AttackResult

    config_cls, fn, needs_targets = get_attack(method)
    family = mmdit_family(pipe)
    if family is not None and str(method).lower().strip() not in MMDIT_ATTACKS:
        raise ConfigError(f"attack {method!r} runs on sd1, sd2, sdxl pipelines, but this one is {family}: choose one "
                          f"of {', '.join(MMDIT_ATTACKS)}")
    config = make_config(config_cls, options)
    prompts, seeds = _check_prompts(prompts, seeds)
    if hasattr(config, "check_edit"):   # attacks that need the original model (P4D) refuse before any work
        config.check_edit(edit)
    concepts = prompt_concepts(prompts, concept, (edit.manifest.get("concepts") or []) if edit is not None else [])
    found = [judge.find(name) for name in concepts]   # an unknown concept fails here, before any work
    concepts = [judge.heads[head][j] for head, j in found]   # the judge's own spelling
    heads = {name: head for name, (head, _) in zip(concepts, found)}
    sampling = sampling or default_sampling(pipe)
    if getattr(config, "k", None):
        from ..pipelines.prefix import PrefixPrompts

        PrefixPrompts(pipe, prompts, config.k)  # refuses prompts that do not fit, before any work
    if edit is not None and id(pipe) in getattr(edit, "_backups", {}):
        raise ConfigError("the edit is already applied to this pipeline: pass the original pipeline; attack() "
                          "makes the target images without the edit and applies it itself")
    targets, target_source = None, None
    if needs_targets:
        if target_images is not None:
            targets, target_source = list(target_images), "given"
            if len(targets) != len(prompts):
                raise ConfigError(f"target_images must hold one image per prompt ({len(prompts)}) but holds "
                                  f"{len(targets)}")
        else:
            if edit is not None:   # one image of the edited model: a broken Edit fails before the targets
                with edit.sampled(pipe) as probed:
                    generate(probed, prompts[:1], seeds[:1], sampling)
            targets = generate(pipe, prompts, seeds, sampling, progress=progress)
            target_source = "original model, same prompt and seed" if edit is not None else \
                "the pipeline as given (no edit passed), same prompt and seed"
    prepare = getattr(importlib.import_module(fn.__module__), "prepare_on_original", None)
    with measure(denoiser(pipe).device) as usage:
        # a text-only search (Ring-A-Bell) runs on the original model, before the Edit is applied
        prepared = prepare(pipe, prompts, seeds, concepts, config=config, progress=progress) if prepare else None
        with (edit.sampled(pipe) if edit is not None else nullcontext(pipe)) as attacked:
            # a one-step (SFD) Edit is attacked through its own pipeline
            rows = fn(attacked, prompts, seeds, concepts, judge=judge, sampling=sampling, config=config,
                      targets=targets, progress=progress, edit=edit, prepared=prepared)
    rows, embeddings = rows if isinstance(rows, tuple) else (rows, {})   # learned tokens (concept inversion)
    protocol = {"sampling": sampling.to_dict(), "judge": judge.describe(), "concept_heads": heads,
                "targets": target_source, "edit": None if edit is None else _edit_summary(edit),
                "wall_time_s": round(usage.wall_time_s, 4), "peak_memory_bytes": usage.peak_memory_bytes,
                "memory_kind": usage.memory_kind, "dtype": str(denoiser(pipe).dtype).replace("torch.", "")}
    if hasattr(config, "plan"):   # the schedule with every None resolved
        protocol["schedule"] = config.plan()
    if prepared is not None and "record" in prepared:   # what a prepared search resolved and spent
        protocol["search"] = prepared["record"]
    return AttackResult(str(method).lower().strip(), ", ".join(heads), rows, {"method": method, **config.to_dict()},
                        protocol, embeddings)


def _edit_summary(edit) -> dict:
    m = edit.manifest
    return {k: m.get(k) for k in ("method", "concepts", "erasekit_version")} | \
        {"fingerprint": (m.get("fingerprint") or {}).get("id")}
