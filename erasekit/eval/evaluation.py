"""``erasekit.evaluate``: score an Edit (or a base model) on a protocol. Sequential unlearning, which
erases and scores in turn, builds on it in :func:`erasekit.workflows.sequential`.

The edited model is the pipeline with the Edit applied (and restored afterwards, also on error);
the original model's records come from the cache when this protocol, these weights and this judge
were evaluated before. Run it under ``accelerate launch`` or ``torchrun`` to shard the images across
processes: every process returns the same Report; the main process writes the files.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import ConfigError
from .grids import grid_items, target_grids
from .protocol import Protocol, for_pipeline, get_protocol
from .report import Report, environment
from .runner import Records, Runner, default_cache_dir
from .scoring import clip_scores, fid_scores, grid_scores, label_map, rate_scores


@dataclass
class _Setup:
    protocol: Protocol
    judge: object
    targets: list[tuple[str, int]]
    names: list[str]
    runner: Runner
    space: object = None
    encoder: object = None
    reference: tuple | None = None
    notes: list[str] = field(default_factory=list)
    cache_dir: Path | None = None


def evaluate(pipe, edit=None, protocol: str | Protocol = "canvas-lite", targets=None, judge=None, out_dir=None,
             progress: bool = True, *, baseline: bool = True, fid="auto", clip="auto", fid_reference=None,
             cache_dir="default", on_missing: str = "fail", edit_path=None, attack=None,
             save_images: bool = False) -> Report:
    """Evaluate ``pipe`` with ``edit`` applied on ``protocol``; returns a :class:`Report`.

    Args:
        pipe: the base pipeline (left unchanged).
        edit: an :class:`~erasekit.Edit`; None evaluates the base model itself.
        protocol: ``"canvas-lite"`` (default), ``"canvas"``, ``"unlearncanvas"``, or a Protocol. On a
            flow-matching pipeline (SD 3, Flux) its DDPM sampler is replaced by ``flow_euler`` at its steps
            and guidance (:func:`~erasekit.eval.protocol.for_pipeline`); the report records the sampler used.
        targets: the erased concepts (default: ``edit.manifest["concepts"]``).
        judge: default the canvas judge on canvas protocols; ``ClassifierJudge.unlearncanvas(...)``
            for ``unlearncanvas``; ``NudeNetJudge()`` for nudity prompt sets.
        out_dir: where to write report.json, report.md, grids/ (and images/ with ``save_images``).
        baseline: also score the original model (cached) for the baseline row and FID vs original.
        fid, clip: ``"auto"`` (the canvas CLIP on canvas protocols), False, or a ClipEncoder
            (``fid`` also ``("inception", weights_path)``).
        fid_reference: real images for FID on non-canvas protocols: a folder ``<theme>/<object>/<k>.png``.
        cache_dir: cache of original-model records (``"default"``: ~/.cache/erasekit/eval; None: off).
        on_missing: ``"fail"`` (default) or ``"count"`` a missing or degenerate image. A degenerate
            image (non-finite, or one flat colour: a broken model) raises
            :class:`~erasekit.errors.DegenerateOutputError` at the first batch that holds one; the
            edited model's images are made before the original's, so a broken Edit fails early.
        edit_path: the Edit's file, for its storage size on disk.
        attack: AttackResult(s) whose ASR to record.

    Example:
        >>> import erasekit
        >>> pipe = erasekit.load_pipeline("canvas-mini")
        >>> edit = erasekit.erase(pipe, "uce", ["Van Gogh"])
        >>> report = erasekit.evaluate(pipe, edit, protocol="canvas-lite", progress=False)
        >>> report.targets, report.scores["UA"] > report.baseline["UA"]
        (['Van_Gogh'], True)
        >>> print(report.to_markdown())  # doctest: +ELLIPSIS
        # erasekit evaluation: uce on Van_Gogh
        ...
    """
    t0 = time.perf_counter()
    protocol = get_protocol(protocol)
    if targets is None:   # the protocol's own target (nudity), else the Edit's concepts
        targets = list(protocol.targets) or (edit.manifest.get("concepts", []) if edit is not None else None)
    s = _setup(pipe, protocol, targets or [], judge, fid, clip, fid_reference, cache_dir, on_missing,
               Path(out_dir) / "images" if (out_dir and save_images) else None, progress)
    if edit is not None:
        _check_edit(edit, pipe)
    keep = grid_items(s.runner.items, s.targets) if s.protocol.is_grid else set()
    timing = {}
    edited = base = None
    if edit is not None:   # first, so that a broken Edit fails at its first batch, before the baseline's images
        t = time.perf_counter()
        with edit.sampled(pipe) as sampler:   # a one-step (SFD) generator through its own pipeline
            edited = s.runner.records(sampler, keep, "edited", None)
        timing["edited_s"] = time.perf_counter() - t
    if baseline or edit is None:
        t = time.perf_counter()
        base = s.runner.records(pipe, keep, "original", s.cache_dir)
        timing["original_s"] = time.perf_counter() - t
    if edit is None:
        edited = base
    report = Report(
        protocol=s.protocol.to_dict(), judge=s.judge.describe(), targets=s.names,
        method=edit.manifest.get("method", "edit") if edit is not None else "original",
        model={"hash_original": _pipe_id(pipe), "dtype": _dtype(pipe)},
        scores=_scores(s, edited, base if edit is not None else None),
        baseline=_scores(s, base, None) if (edit is not None and base is not None) else None,
        edit={k: edit.manifest.get(k) for k in ("method", "concepts", "config", "erasekit_version")} if edit else None,
        efficiency=_efficiency(edit, edit_path), asr=_asr(attack), notes=s.notes,
        environment=environment(s.runner.state.num_processes))
    timing["total_s"] = time.perf_counter() - t0
    report.timing = timing
    if out_dir is not None and s.runner.is_main:
        report.save(out_dir, grids=target_grids(s.runner.items, s.targets, s.names, base, edited)
                    if edit is not None else {})
    return report


# ---------------------------------------------------------------------------------------------
def _setup(pipe, protocol, targets, judge, fid, clip, fid_reference, cache_dir, on_missing, image_dir,
           progress) -> _Setup:
    protocol, sampler_note = for_pipeline(get_protocol(protocol), pipe)   # flow_euler on SD 3 / Flux
    if on_missing not in ("fail", "count"):
        raise ConfigError(f"on_missing must be 'fail' or 'count' but is {on_missing!r}")
    dtype = _dtype(pipe)
    if protocol.dtype is not None and protocol.dtype != dtype:
        raise ConfigError(f"protocol {protocol.name!r} runs in {protocol.dtype} but the pipeline is {dtype}: load it "
                          f"with load_pipeline(..., dtype={protocol.dtype!r}) or use protocol.with_(dtype=None)")
    judge = judge or _default_judge(protocol)
    resolved, names = _resolve_targets(judge, protocol, targets)
    notes = [sampler_note] if sampler_note else []
    encoder = _clip_encoder(clip, protocol, notes, "CLIP score")
    space = _feature_space(fid, protocol, encoder, notes)
    runner = Runner(protocol, judge, space, encoder, progress, on_missing, image_dir, cpu=_on_cpu(pipe))
    cache = default_cache_dir() if cache_dir == "default" else (Path(cache_dir) if cache_dir else None)
    s = _Setup(protocol, judge, resolved, names, runner, space, encoder, None, notes, cache)
    if space is not None:
        from .references import reference_features

        s.reference = reference_features(s, fid_reference)
    return s


def _on_cpu(pipe) -> bool:
    from ..pipelines.mmdit import denoiser

    param = next(iter(denoiser(pipe).parameters()), None)
    return param is None or param.device.type == "cpu"


def _dtype(pipe) -> str:
    """The dtype of the pipeline's denoiser (the UNet, or the transformer of SD 3 / Flux), e.g. ``float32``."""
    from ..pipelines.mmdit import denoiser

    return str(denoiser(pipe).dtype).replace("torch.", "")


def _default_judge(protocol: Protocol):
    from ..canvas.world import OBJECTS, STYLES
    from .judges import CanvasJudge

    if protocol.is_grid and set(protocol.themes) <= set(STYLES) and set(protocol.objects) <= set(OBJECTS):
        return CanvasJudge.load()
    if "nudity" in protocol.targets:   # the nudity protocol: NudeNet's detector (the RECE preset)
        from .judges import NudeNetJudge

        return NudeNetJudge()
    hint = ("ClassifierJudge.unlearncanvas(style_weights, object_weights)" if protocol.is_grid
            else "NudeNetJudge() or a ClassifierJudge")
    raise ConfigError(f"protocol {protocol.name!r} has no default judge: pass judge={hint}")


def _resolve_targets(judge, protocol: Protocol, targets) -> tuple[list[tuple[str, int]], list[str]]:
    if isinstance(targets, str):
        targets = [targets]
    resolved, names = [], []
    for name in targets:
        head, j = judge.find(name)
        label = judge.heads[head][j]
        if protocol.is_grid:
            if head not in ("style", "object"):
                raise ConfigError(f"target {name!r} is a {head!r} concept; protocol {protocol.name!r} scores "
                                  "styles and objects")
            axis = protocol.themes if head == "style" else protocol.objects
            j = int(label_map([label], axis)[0])
            if j < 0:
                raise ConfigError(f"target {name!r} is not one of protocol {protocol.name!r}'s {head}s: "
                                  f"{', '.join(axis)}")
        resolved.append((head, j))
        names.append(label)
    return resolved, names


def _clip_encoder(clip, protocol: Protocol, notes: list[str], what: str):
    from .clip_score import ClipEncoder

    if clip is False or clip is None:
        notes.append(f"{what}: not computed (disabled)")
        return None
    if isinstance(clip, ClipEncoder):
        return clip
    if clip != "auto":
        raise ConfigError(f"clip must be 'auto', False or a ClipEncoder, not {clip!r}")
    if protocol.model != "canvas-mini":
        notes.append(f"{what}: not computed (pass a ClipEncoder, e.g. ClipEncoder.from_open_clip(...))")
        return None
    from .clip_score import load_canvas_clip

    try:
        return load_canvas_clip()
    except ConfigError as e:
        notes.append(f"{what}: not computed ({e})")
        return None


def _feature_space(fid, protocol: Protocol, encoder, notes: list[str]):
    from .fid import FeatureSpace

    if fid is False or fid is None:
        notes.append("FID: not computed (disabled)")
        return None
    if fid == "auto":
        if encoder is None:
            encoder = _clip_encoder("auto", protocol, [], "FID")
        if encoder is None:
            notes.append("FID: not computed (no feature model; pass fid=ClipEncoder or ('inception', path))")
            return None
        return FeatureSpace.resolve(encoder)
    return FeatureSpace.resolve(fid)


def _scores(s: _Setup, rec: Records | None, original: Records | None) -> dict | None:
    if rec is None:
        return None
    if s.protocol.is_grid:
        out = grid_scores(s.runner, rec, s.targets)
    else:
        out = rate_scores(s.runner, rec, s.targets, s.names)
    if s.space is not None:
        out["fid"] = fid_scores(s.runner, rec, s.targets, s.reference, original, s.space)
    if s.encoder is not None:
        out["clip"] = clip_scores(s.runner, rec, s.targets, s.encoder)
    return out


def _check_edit(edit, pipe) -> None:
    if id(pipe) in getattr(edit, "_backups", {}):
        raise ConfigError("this Edit is already applied to the pipeline; evaluate() applies it itself: "
                          "call edit.remove(pipe) first")
    edit.check(pipe)


def _efficiency(edit, path) -> dict | None:
    if edit is None:
        return None
    from .efficiency import edit_efficiency

    return edit_efficiency(edit, path).to_dict()


def _asr(attack) -> list[dict] | None:
    """Scalar fields of AttackResult(s) (``asr``, ``pre_asr``, definition, cost) and their intervals
    (``asr_ci``, ``pre_asr_ci``), as recorded."""
    if attack is None:
        return None
    out = []
    for a in attack if isinstance(attack, (list, tuple)) else [attack]:
        d = a.summary() if hasattr(a, "summary") else dict(a) if isinstance(a, dict) else vars(a)
        out.append({k: v for k, v in d.items() if isinstance(v, (int, float, str, bool)) or v is None
                    or (k.endswith("_ci") and isinstance(v, dict))})
    return out


def _pipe_id(pipe) -> str:
    from .runner import pipeline_hash

    return pipeline_hash(pipe)
