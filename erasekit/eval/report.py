"""Reports: JSON for machines, a Markdown table for people, image grids, and the UA-vs-retention plot.

Every rate carries its 95 % interval as a sibling ``<key>_ci`` ({value, low, high, method, n,
clusters}; :mod:`erasekit.stats`), and the Markdown shows it in brackets.

A :class:`Report` carries its protocol (sampler, steps, guidance, dtype, seeding), its judge, the
scores of the edited model and of the original one (the baseline row), FID/CLIP with their feature
models and scales, the efficiency triplet, ASR if given, and notes on anything not computed.
All percentages are in percent (0-100).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np


@dataclass
class Report:
    protocol: dict
    judge: dict
    targets: list[str]
    method: str
    model: dict = field(default_factory=dict)
    scores: dict = field(default_factory=dict)         # the edited model (the base model when no Edit)
    baseline: dict | None = None                       # the original model, same keys
    edit: dict | None = None
    efficiency: dict | None = None
    asr: list | None = None
    sequential: list | None = None
    notes: list[str] = field(default_factory=list)
    environment: dict = field(default_factory=dict)
    timing: dict = field(default_factory=dict)
    files: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=1, default=_jsonable)

    @classmethod
    def from_json(cls, text_or_path) -> "Report":
        """From a report.json path or its text."""
        text = str(text_or_path)
        if not text.lstrip().startswith("{"):
            text = Path(text_or_path).read_text()
        return cls(**json.loads(text))

    def summary(self) -> dict:
        """Headline numbers: UA/IRA/CRA (or hit rate), FID, CLIP score, image counts."""
        sc = self.scores or {}
        out = {k: sc[k] for k in ("UA", "IRA", "CRA", "rate") if sc.get(k) is not None}
        out.update({f"{k}_ci": sc[f"{k}_ci"] for k in ("UA", "IRA", "CRA", "rate") if sc.get(f"{k}_ci")})
        fid, clip = sc.get("fid") or {}, sc.get("clip") or {}
        if fid.get("fid") is not None:
            out["FID"] = fid["fid"]
        if clip.get("retained") is not None:
            out["CLIP"] = clip["retained"]
        out.update({"images": sc.get("n_images"), "missing": sc.get("missing")})
        return out

    def row(self, baseline: bool = False) -> dict[str, str]:
        """One table row (``baseline``: the original model's row)."""
        sc = (self.baseline if baseline else self.scores) or {}
        fid, clip = sc.get("fid", {}), sc.get("clip", {})
        eff = None if baseline or not self.efficiency else self.efficiency
        row = {"method": "original" if baseline else self.method}
        for key in ("UA", "IRA", "CRA"):
            row[key] = _pct(sc.get(key), sc.get(f"{key}_ci"))
        if "rate" in sc:
            row["rate"] = _pct(sc.get("rate"), sc.get("rate_ci"))
        row["FID"] = _num(fid.get("fid"))
        row["FID vs orig"] = _num(fid.get("fid_vs_original"))
        row["CLIP"] = _num(clip.get("retained"))
        if eff:
            from .efficiency import Efficiency

            row.update(Efficiency(**eff).row())
        return row

    def to_markdown(self) -> str:
        p = self.protocol
        s = p["sampling"]
        lines = [f"# erasekit evaluation: {self.method} on {', '.join(self.targets) or 'no target'}", "",
                 f"Protocol `{p['name']}` ({p['n_images']} images): {s['sampler']} {s['steps']} steps, guidance "
                 f"{s['guidance']}, dtype {self.model.get('dtype', p.get('dtype'))}, seeds {p['seeds']}, "
                 f"{p['seeding']}. Judge: {self.judge.get('name')}.", ""]
        sc = self.scores or {}
        if sc.get("missing"):
            lines += [f"**{sc['missing']} of {sc['n_expected']} images missing** (on_missing='{sc['on_missing']}': "
                      "counted as not recognised).", ""]
        lines += markdown_table([self]).splitlines()
        per_target = (self.scores or {}).get("targets", {})
        if per_target:
            lines += ["", "| target | head | UA | IRA | CRA |", "|---|---|---|---|---|"]
            lines += [f"| {t} | {v.get('head', '-')} | " + " | ".join(
                _pct(v.get(k), v.get(f"{k}_ci")) for k in ("UA", "IRA", "CRA")) + " |" for t, v in per_target.items()]
        lines += self._accuracy_table()
        if self.sequential:
            lines += ["", "| step | erased | UA (all erased so far) | IRA | CRA |", "|---|---|---|---|---|"]
        for step in self.sequential or []:
            ci = step.get("scores") or {}
            lines.append(f"| {step['step']} | {step['erased']} | " + " | ".join(
                _pct(step[k], ci.get(f"{k}_ci")) for k in ("UA", "IRA", "CRA")) + " |")
        lines += self._asr_table()
        lines += [""] + [f"- {n}" for n in self.notes + self._interval_notes()]
        return "\n".join(lines) + "\n"

    def _asr_table(self) -> list[str]:
        if not self.asr:
            return []
        out = ["", "| attack | concept | N | pre-ASR | ASR |", "|---|---|---|---|---|"]
        for a in self.asr:
            out.append(f"| {a.get('method', '-')} | {a.get('concept', '-')} | {a.get('n', '-')} | "
                       f"{_pct(a.get('pre_asr'), a.get('pre_asr_ci'))} | {_pct(a.get('asr'), a.get('asr_ci'))} |")
        return out

    def _interval_notes(self) -> list[str]:
        """One line per interval method used (the brackets of the tables)."""
        cis = [v for sc in (self.scores, self.baseline) for k, v in (sc or {}).items() if k.endswith("_ci") and v]
        cis += [a[k] for a in self.asr or [] for k in ("pre_asr_ci", "asr_ci") if a.get(k)]
        methods = dict.fromkeys(_method_kind(c["method"]) for c in cis)
        return [f"95 % intervals in brackets: {', '.join(methods)} (docs/statistics.md)"] if methods else []

    def _accuracy_table(self) -> list[str]:
        """Per-class accuracy (%) of the judge's heads, the original model beside the edited one."""
        sc, base = self.scores or {}, self.baseline or {}
        if "style_accuracy" not in sc:
            return []
        cols = "| class | head | accuracy |" if not base else "| class | head | original | edited |"
        out = ["", cols, "|---|---|---|" + ("---|" if base else "")]
        for head in ("style", "object"):
            for name, acc in sc[f"{head}_accuracy"].items():
                ref = base.get(f"{head}_accuracy", {}).get(name)
                out.append(f"| {name} | {head} | " + (f"{_pct(ref)} | " if base else "") + f"{_pct(acc)} |")
        return out

    def save(self, out_dir, grids: dict | None = None) -> dict:
        """Write report.json, report.md and grids/<target>.png into ``out_dir`` (atomically)."""
        from .._io import atomic_path, write_text_atomic

        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        for name, img in (grids or {}).items():
            path = out / "grids" / f"{name.replace(' ', '_')}.png"
            with atomic_path(path) as tmp:
                img.save(tmp, format="PNG")
            self.files[f"grid:{name}"] = str(path)
        self.files.update({"json": str(out / "report.json"), "markdown": str(out / "report.md")})
        write_text_atomic(out / "report.md", self.to_markdown())
        write_text_atomic(out / "report.json", self.to_json())
        return self.files


def markdown_table(reports: Sequence[Report]) -> str:
    """One Markdown table: the original model's row first (from the first report with a baseline),
    then one row per report."""
    rows = []
    base = next((r for r in reports if r.baseline is not None), None)
    if base is not None:
        rows.append(base.row(baseline=True))
    rows += [r.row() for r in reports]
    cols = list(dict.fromkeys(k for r in rows for k in r))
    out = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    out += ["| " + " | ".join(r.get(c, "-") for c in cols) + " |" for r in rows]
    return "\n".join(out)


def tradeoff_points(reports: Sequence[Report]) -> list[tuple[str, float, float]]:
    """(label, retention, UA) per method; retention = mean of IRA and CRA. Sequential reports give
    one point per step."""
    pts = []
    base = next((r for r in reports if r.baseline is not None), None)
    for label, sc in ([("original", base.baseline)] if base else []) + [(r.method, r.scores) for r in reports]:
        if sc and sc.get("UA") is not None:
            pts.append((label, (sc["IRA"] + sc["CRA"]) / 2, sc["UA"]))
    for r in reports:
        for st in r.sequential or []:
            pts.append((f"{r.method} step {st['step']}", (st["IRA"] + st["CRA"]) / 2, st["UA"]))
    return pts


def plot_tradeoff(reports: Sequence[Report], path) -> Path:
    """UA (higher = more forgetting) against retention (higher = less damage), one point per method;
    matplotlib if installed, else a plain PIL drawing."""
    pts = tradeoff_points(reports)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        import matplotlib
    except ImportError:
        _pil_plot(pts).save(path)
        return path
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 4))
    for label, x, y in pts:
        ax.scatter([x], [y])
        ax.annotate(label, (x, y), fontsize=7)
    ax.set(xlabel="retention: mean(IRA, CRA) %", ylabel="UA %", xlim=(0, 100), ylim=(0, 100))
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def _pil_plot(pts, size: int = 400, pad: int = 40):
    from PIL import Image, ImageDraw

    img = Image.new("RGB", (size, size), "white")
    d = ImageDraw.Draw(img)
    span = size - 2 * pad
    d.rectangle([pad, pad, size - pad, size - pad], outline="black")
    d.text((size // 2 - 70, size - pad + 12), "retention: mean(IRA, CRA) %", fill="black")
    d.text((4, pad - 16), "UA %", fill="black")
    for v in (0, 50, 100):
        d.text((pad - 22, size - pad - v / 100 * span - 5), str(v), fill="black")
        d.text((pad + v / 100 * span - 6, size - pad + 2), str(v), fill="black")
    for label, x, y in pts:
        cx, cy = pad + x / 100 * span, size - pad - y / 100 * span
        d.ellipse([cx - 4, cy - 4, cx + 4, cy + 4], fill=(31, 119, 180))
        d.text((cx + 6, cy - 6), label, fill="black")
    return img


def environment(processes: int = 1) -> dict:
    import platform

    import diffusers
    import torch
    import transformers

    from .. import __version__

    return {"erasekit": __version__, "torch": torch.__version__, "diffusers": diffusers.__version__,
            "transformers": transformers.__version__, "python": platform.python_version(),
            "device": "cuda" if torch.cuda.is_available() else "cpu", "torch_threads": torch.get_num_threads(),
            "processes": processes}


def _jsonable(x):
    if isinstance(x, (np.integer,)):
        return int(x)
    if isinstance(x, (np.floating,)):
        return float(x)
    if isinstance(x, np.ndarray):
        return x.tolist()
    return str(x)


def _pct(x, ci: dict | None = None) -> str:
    """``60.0`` or, with its interval, ``60.0 [41.2, 77.3]``."""
    if x is None or (isinstance(x, float) and not np.isfinite(x)):
        return "-"
    if ci and np.isfinite(ci.get("low", np.nan)):
        return f"{x:.1f} [{ci['low']:.1f}, {ci['high']:.1f}]"
    return f"{x:.1f}"


def _method_kind(method: str) -> str:
    """An interval's method without its counts (``cluster bootstrap (2000 resamples, seed 0)``)."""
    import re

    return re.sub(r" of \d+ clusters( within \d+ strata)?| over \d+ clusters", "", method)


def _num(x) -> str:
    return "-" if x is None else f"{x:.3g}"
