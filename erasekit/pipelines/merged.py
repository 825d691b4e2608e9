"""Exporting an Edit as a merged pipeline folder with its provenance, and recognising such folders.

**Merged** (:func:`merge`): ``save_pretrained`` of the edited pipeline, plus ``README.md`` (a model
card naming the erasure: method, concepts, kind, preset, options, evaluation summary, erasekit
version, base model and fingerprint) and :data:`MANIFEST_FILE` (the Edit's manifest). Written into
a temporary folder beside the target and renamed into place. :func:`merged_provenance` reads that
file back, so an Edit checked against a pipeline loaded from such a folder says that the pipeline
is already edited, rather than that the Edit was made for another model.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import torch

from ..errors import ConfigError

MANIFEST_FILE = "erasekit_edit.json"
_MERGED = "_erasekit_merged"   # attribute load_pipeline sets on a pipeline read from a merged folder


# -- merged folder --------------------------------------------------------------------------------------
def merge(edit, pipe, out_dir: str | os.PathLike, evaluation: str | os.PathLike | None = None,
          overwrite: bool = False) -> Path:
    """Save ``pipe`` with ``edit`` in its weights (``save_pretrained``), a model card and the manifest.

    ``pipe`` is left as it was. A one-step generator (SFD) is saved with its generator as the UNet:
    it must be sampled in one step (``erasekit.load_pipeline(out_dir)`` returns its one-step
    sampler; the model card gives the formula), not with the folder's multi-step scheduler.
    ``evaluation``: a ``report.json`` of ``erasekit eval`` whose headline numbers go into the card.
    Written atomically: into a temporary folder beside ``out_dir``, then renamed.
    """
    out = Path(out_dir)
    if out.exists() and not (overwrite and out.is_dir()):
        raise ConfigError(f"{out} already exists: choose another folder, or pass overwrite=True (CLI --overwrite)"
                          + ("" if out.is_dir() else " after removing the file there"))
    summary = _evaluation_summary(evaluation) if evaluation is not None else None
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))
    try:
        with _weights_written(edit, pipe):
            pipe.save_pretrained(tmp, safe_serialization=True)
        manifest = {**edit.manifest, "export": {"evaluation": summary}}
        if not manifest.get("base_model") and _name_or_path(pipe):
            manifest["base_model"] = _name_or_path(pipe)
        (tmp / MANIFEST_FILE).write_text(json.dumps(manifest, indent=1, default=str))
        (tmp / "README.md").write_text(model_card(manifest, summary))
        old = None
        if out.exists():
            old = out.with_name(f".{out.name}.old-{os.getpid()}")
            os.replace(out, old)
        os.replace(tmp, out)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except OSError as e:
        from .._io import _write_error

        raise _write_error(out, e) from e
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return out


class _weights_written:
    """Context: ``pipe`` carries the Edit's weights (a one-step generator's too), restored on exit."""

    def __init__(self, edit, pipe):
        self.edit, self.pipe = edit, pipe

    def __enter__(self):
        from .edit import _param
        from .locking import pipeline_lock

        self.lock = pipeline_lock(self.pipe)
        self.lock.acquire()
        try:
            if self.edit.manifest.get("sampler") and not self.edit.one_step:   # inference-time: no weights
                self.edit.check(self.pipe)
                self.backup = {}
                return self.pipe
            if not self.edit.one_step:
                self.edit.apply(self.pipe)
                return self.pipe
            self.edit.check(self.pipe)
            self.backup = {k: _param(self.pipe, k).detach().clone() for k in self.edit.keys}
            with torch.no_grad():
                for k, w in self.backup.items():
                    _param(self.pipe, k).copy_(self.edit.new_weight(k, w))
        except BaseException:
            self.lock.release()
            raise
        return self.pipe

    def __exit__(self, *exc):
        from .edit import _param

        try:
            if not self.edit.manifest.get("sampler"):
                self.edit.remove(self.pipe)
            else:
                with torch.no_grad():
                    for k, w in self.backup.items():
                        _param(self.pipe, k).copy_(w)
        finally:
            self.lock.release()
        return False


def _evaluation_summary(path) -> dict:
    """Headline numbers of an ``erasekit eval`` report.json (or its folder): UA/IRA/CRA or rate, FID, CLIP."""
    path = Path(path)
    if path.is_dir():
        path = path / "report.json"
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise ConfigError(f"--evaluation {path} is not a readable report.json ({type(e).__name__}): give the "
                          "report.json (or its folder) written by `erasekit eval`") from None
    if not (isinstance(data, dict) and isinstance(data.get("scores"), dict) and isinstance(data.get("protocol"), dict)):
        raise ConfigError(f"--evaluation {path} is JSON but not an erasekit report (no scores and protocol): give the "
                          "report.json written by `erasekit eval`")
    sc = data["scores"]
    out = {"file": str(path), "protocol": data["protocol"].get("name")}
    out.update({k: sc[k] for k in ("UA", "IRA", "CRA", "rate") if isinstance(sc.get(k), (int, float))})
    fid, clip = sc.get("fid") or {}, sc.get("clip") or {}
    if isinstance(fid, dict) and fid.get("fid") is not None:
        out["FID"] = fid["fid"]
    if isinstance(clip, dict) and clip.get("retained") is not None:
        out["CLIP"] = clip["retained"]
    return out


def model_card(manifest: dict, evaluation: dict | None = None) -> str:
    """The README.md of a merged folder: what was erased, how, from which model, how to use it."""
    m = manifest
    concepts = ", ".join(m.get("concepts") or []) or "(none listed)"
    preset = m.get("preset") or {}
    fp = (m.get("fingerprint") or {}).get("id", "unknown")
    lines = ["---", "library_name: diffusers", "tags:", "- erasekit", "- concept-erasure",
             f"- {m.get('method', 'unknown')}", "---", "",
             f"# {concepts} erased with {m.get('method')} (erasekit)", "",
             f"This pipeline is `{m.get('base_model', 'its base model')}` with the concept(s) **{concepts}** erased by "
             f"**{m.get('method')}**, written by erasekit {m.get('erasekit_version', '?')}. Only the weights the "
             "method changed differ from the base model.", "",
             "| field | value |", "|---|---|",
             f"| method | {m.get('method')} |", f"| concepts | {concepts} |", f"| kind | {m.get('kind')} |",
             f"| preset | {preset.get('provider')}/{preset.get('name')} |" if preset else "| preset | - |",
             f"| base model | {m.get('base_model', '-')} ({m.get('family')}) |",
             f"| base model fingerprint | {fp} |", f"| erasekit version | {m.get('erasekit_version')} |",
             f"| changed tensors | {len(m.get('keys') or [])} |", "",
             "## Options", "", "As given:", "", "```json", json.dumps(m.get("config") or {}, indent=1, default=str),
             "```", ""]
    if m.get("resolved"):
        lines += ["As resolved (the values the method ran with):", "", "```json",
                  json.dumps(m["resolved"], indent=1, default=str), "```", ""]
    if evaluation:
        lines += ["## Evaluation", "", f"From `{evaluation.get('file')}` (protocol {evaluation.get('protocol')}):", ""]
        lines += [f"- {k}: {v:.2f}" if isinstance(v, float) else f"- {k}: {v}"
                  for k, v in evaluation.items() if k not in ("file", "protocol")]
        lines.append("")
    lines += ["## Use", ""]
    if m.get("sampler") == "one_step" and m.get("family") == "sd3":
        lines += [f"The transformer is a **one-step generator** (SFD) at timestep {m.get('generator_timestep')} "
                  f"(flow sigma `s = {m.get('generator_sigma')}`): do not sample it with the folder's multi-step "
                  "scheduler. `erasekit.load_pipeline(folder)` returns its one-step sampler; by hand: with "
                  "`z ~ N(0, I)` the latent is `s (z - transformer(s z, s, c))`, decoded by the VAE, with no "
                  "classifier-free guidance.", ""]
    elif m.get("sampler") == "one_step":
        lines += [f"The UNet is a **one-step generator** (SFD) at timestep {m.get('generator_timestep')}: do not "
                  "sample "
                  "it with the folder's multi-step scheduler. `erasekit.load_pipeline(folder)` returns its one-step "
                  "sampler; by hand: with `a = sqrt(abar_t)`, `b = sqrt(1 - abar_t)` and `z ~ N(0, I)`, the latent "
                  "is `(b z - b unet(b z, t, c)) / a`, decoded by the VAE, with no classifier-free guidance.", ""]
    elif m.get("sampler"):
        lines += [f"This erasure acts while sampling (sampler {m.get('sampler')!r}): the weights are the base "
                  "model's, and stock diffusers sampling of this folder does **not** erase. Sample it with erasekit:",
                  "", "```python", "import json, erasekit", "from erasekit.pipelines import Edit, generate", "",
                  "pipe = erasekit.load_pipeline('path/to/this/folder')",
                  f"edit = Edit({{}}, {{}}, json.load(open('path/to/this/folder/{MANIFEST_FILE}')))",
                  "with edit.sampled(pipe) as p:", "    images = generate(p, ['a prompt'], seeds=[0])", "```", ""]
    else:
        lines += ["```python", "from diffusers import DiffusionPipeline", "",
                  "pipe = DiffusionPipeline.from_pretrained('path/to/this/folder')", "```", ""]
    lines += [f"The Edit's full manifest is in `{MANIFEST_FILE}`.", ""]
    return "\n".join(lines)


# -- recognising a merged folder ----------------------------------------------------------------------
def read_merged(folder) -> dict | None:
    """The manifest of a folder written by :func:`merge`, or None if it is not one."""
    path = Path(folder) / MANIFEST_FILE
    if not path.is_file():
        return None
    try:
        manifest = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return {**manifest, "folder": str(folder)} if isinstance(manifest, dict) else None


def from_merged_folder(pipe, folder):
    """``pipe`` as loaded from ``folder``, marked as edited if :func:`merge` wrote that folder; a
    one-step generator's folder gives its one-step sampler (called by ``load_pipeline``)."""
    manifest = read_merged(folder)
    if manifest is None:
        return pipe
    object.__setattr__(pipe, _MERGED, manifest)
    if manifest.get("sampler") == "one_step":
        from .one_step import one_step_pipeline

        pipe = one_step_pipeline(pipe, t_init=int(manifest["generator_timestep"]))
        object.__setattr__(pipe, _MERGED, manifest)
    return pipe


def merged_provenance(pipe) -> dict | None:
    """The manifest of the erasure merged into ``pipe``'s weights, or None: from the tag that
    ``load_pipeline`` sets, else from the folder a stock ``from_pretrained`` read it from."""
    tagged = getattr(pipe, _MERGED, None)
    if tagged is not None:
        return tagged
    name = _name_or_path(pipe)
    if not name:
        return None
    try:
        return read_merged(name) if Path(name).is_dir() else None
    except OSError:
        return None


def _name_or_path(pipe) -> str | None:
    """Where diffusers' ``from_pretrained`` read ``pipe`` from (None for a pipeline built in memory)."""
    config = getattr(pipe, "config", None)
    name = getattr(config, "_name_or_path", None) if config is not None else None
    return str(name) if name else None


def already_edited(pipe) -> str | None:
    """``"this pipeline was already edited by <method> on <concepts> (merged folder <path>)"`` or None."""
    m = merged_provenance(pipe)
    if m is None:
        return None
    return (f"this pipeline was already edited by {m.get('method')} on {', '.join(m.get('concepts') or [])} "
            f"(merged folder {m.get('folder')}" + (f" made from {m['base_model']})" if m.get("base_model") else ")"))

