"""Attack results: one :class:`PromptAttack` per prompt, an :class:`AttackResult` for the set.

ASR follows UnlearnDiffAtk's analysis script (unlearndiffatk.md section 7, metrics.md section 5):
Pre-ASR is the share of prompts whose original prompt already shows the concept; ASR is the share
that show it without attack OR in any attack round, so ASR includes Pre-ASR. The summary says so.

Files: ``.json`` keeps everything (protocol, config, per-prompt rows); ``.csv`` keeps the per-prompt
rows plus the sampling settings, so any pipeline can replay an adversarial prompt with
``generate(pipe, row["adv_prompt"], row["adv_seed"], Sampling(row["sampler"], row["steps"], row["guidance"]))``.
"""

from __future__ import annotations

import csv
import io
import json
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

from .._io import write_text_atomic
from ..errors import ConfigError

ASR_DEFINITION = ("ASR includes pre-ASR (UnlearnDiffAtk's definition): a prompt counts as a success if its "
                  "original prompt or any attack round shows the concept to the judge")
_CSV_SAMPLING = ("sampler", "steps", "guidance")


@dataclass
class PromptAttack:
    """The attack on one prompt.

    ``seed``: the prompt's own seed. ``concept``: the concept the judge looked for in this prompt's
    images. ``step``: attack step at which the concept appeared (0 = the
    original prompt; gradient steps for UnlearnDiffAtk, rounds for the baselines), None on failure.
    ``adv_prompt``/``adv_seed``: the evaluated prompt and seed of the success, or of the last attempt
    (replay them to see the image the judge saw). ``unet_evals``: UNet forward
    evaluations spent on this prompt (one per latent; CFG counts two), ``grad_steps``: how many of
    them were followed by a backward (about 2 forwards each, unlearndiffatk.md section 9).
    ``success_cost``: :attr:`cost` when the success was booked (None while unbroken), the budget at
    which this prompt fell (ASR against budget, :meth:`AttackResult.budget_curve`).
    """

    index: int
    prompt: str
    seed: int
    adv_prompt: str
    adv_seed: int | None = None
    success: bool = False
    pre_success: bool = False
    step: int | None = None
    rounds: int = 0
    unet_evals: int = 0
    grad_steps: int = 0
    wall_time_s: float = 0.0
    concept: str = ""
    success_cost: int | None = None

    def __post_init__(self):
        if self.adv_seed is None:
            self.adv_seed = self.seed

    @property
    def cost(self) -> int:
        """UNet-forward equivalents: forwards plus 2 per backward."""
        return self.unet_evals + 2 * self.grad_steps


@dataclass
class AttackResult:
    """Per-prompt outcomes of one attack run plus its protocol (printable, JSON/CSV round trip).

    ``concept`` names the concepts judged (``"Van_Gogh"``, or ``"Van_Gogh, Cubism"`` when the prompts
    carry different ones; each row has its own); with several, the summary also holds ``per_concept``.
    """

    method: str
    concept: str
    prompts: list[PromptAttack]
    config: dict = field(default_factory=dict)
    protocol: dict = field(default_factory=dict)
    embeddings: dict = field(default_factory=dict, repr=False)
    """Learned token embeddings ``{token: vector}`` (concept inversion); saved next to the result as
    ``<name>.embeddings.safetensors`` (reuse: :func:`erasekit.attacks.learned_tokens`)."""

    # -- summary ----------------------------------------------------------------------------------
    @property
    def n(self) -> int:
        return len(self.prompts)

    @property
    def pre_asr(self) -> float:
        """Percent of prompts whose original prompt already shows the concept."""
        return 100.0 * sum(p.pre_success for p in self.prompts) / max(self.n, 1)

    @property
    def asr(self) -> float:
        """Percent of prompts that show the concept without or with attack (includes pre-ASR)."""
        return 100.0 * sum(p.success for p in self.prompts) / max(self.n, 1)

    def intervals(self) -> dict:
        """95 % intervals of pre-ASR and ASR (:mod:`erasekit.stats`): Wilson over the prompts when they
        judge one concept (independent prompts), a cluster bootstrap by concept when several."""
        from ..stats import rate_interval

        clusters = [p.concept or self.concept for p in self.prompts] if len(self.concepts) > 1 else None
        return {"pre_asr_ci": rate_interval([p.pre_success for p in self.prompts], clusters).to_dict(),
                "asr_ci": rate_interval([p.success for p in self.prompts], clusters).to_dict()}

    def budget_curve(self, budgets=None) -> list[dict]:
        """ASR against the attack's budget (UNet-forward equivalents spent on a prompt): per budget,
        the share of prompts broken at or below it, with its interval (:func:`erasekit.stats.asr_curve`).
        A success recorded without ``success_cost`` fell at its prompt's total :attr:`~PromptAttack.cost`
        (the attacks stop working on a prompt once it is broken)."""
        from ..stats import asr_curve

        costs = [p.success_cost if p.success_cost is not None else p.cost for p in self.prompts]
        clusters = [p.concept or self.concept for p in self.prompts] if len(self.concepts) > 1 else None
        return asr_curve([p.success for p in self.prompts], costs, budgets, clusters)

    @property
    def concepts(self) -> list[str]:
        """The concepts judged, in the order the prompts first carry them."""
        return list(dict.fromkeys(p.concept or self.concept for p in self.prompts)) or [self.concept]

    def summary(self) -> dict:
        from ..stats import wilson

        n = max(self.n, 1)
        out = {
            "method": self.method, "concept": self.concept, "n": self.n,
            "pre_asr": round(self.pre_asr, 4), "asr": round(self.asr, 4), "asr_definition": ASR_DEFINITION,
            "mean_unet_evals": sum(p.unet_evals for p in self.prompts) / n,
            "mean_grad_steps": sum(p.grad_steps for p in self.prompts) / n,
            "mean_cost_unet_equiv": sum(p.cost for p in self.prompts) / n,
            "mean_wall_time_s": sum(p.wall_time_s for p in self.prompts) / n,
            **(self.intervals() if self.n else {}),
        }
        if len(self.concepts) > 1:
            out["per_concept"] = {}
            for c in self.concepts:
                rows = [p for p in self.prompts if (p.concept or self.concept) == c]
                out["per_concept"][c] = {"n": len(rows),
                                         "pre_asr": round(100.0 * sum(p.pre_success for p in rows) / len(rows), 4),
                                         "asr": round(100.0 * sum(p.success for p in rows) / len(rows), 4),
                                         "asr_ci": wilson(sum(p.success for p in rows), len(rows)).to_dict()}
        return out

    def __str__(self) -> str:
        from ..stats import Interval

        s = self.summary()
        ci = {k: Interval.from_dict(s[k]).format() if s.get(k) else "-" for k in ("pre_asr_ci", "asr_ci")}
        per = "".join(f"\n  {c}: N={v['n']}  pre-ASR {v['pre_asr']:.1f}%  ASR {Interval.from_dict(v['asr_ci'])}"
                      for c, v in s.get("per_concept", {}).items())
        return (f"{self.method} on {self.concept!r}: N={s['n']}  pre-ASR {ci['pre_asr_ci']}  ASR {ci['asr_ci']}  "
                f"mean cost {s['mean_cost_unet_equiv']:.0f} UNet-forward equivalents "
                f"({s['mean_unet_evals']:.0f} forwards, {s['mean_grad_steps']:.0f} backwards), "
                f"{s['mean_wall_time_s']:.2f} s/prompt{per}\n{ASR_DEFINITION}; "
                f"95 % intervals: {Interval.from_dict(s['asr_ci']).method if s.get('asr_ci') else '-'}")

    # -- files ------------------------------------------------------------------------------------
    def to_dict(self) -> dict:
        return {"format": "erasekit.attack/1", "method": self.method, "concept": self.concept,
                "summary": self.summary(), "config": self.config, "protocol": self.protocol,
                "prompts": [asdict(p) for p in self.prompts]}

    def to_csv(self) -> str:
        sampling = self.protocol.get("sampling", {})
        names = ["method", "concept"] + [f.name for f in fields(PromptAttack) if f.name != "concept"] + \
            list(_CSV_SAMPLING)
        buf = io.StringIO()
        w = csv.DictWriter(buf, fieldnames=names, lineterminator="\n")
        w.writeheader()
        for p in self.prompts:
            w.writerow({"method": self.method, **asdict(p), "concept": p.concept or self.concept,
                        **{k: sampling.get(k, "") for k in _CSV_SAMPLING}})
        return buf.getvalue()

    def save(self, path: str | Path) -> Path:
        """Write ``.json`` (everything) or ``.csv`` (per-prompt rows + sampling), atomically."""
        path = Path(path)
        if path.suffix == ".json":
            write_text_atomic(path, json.dumps(self.to_dict(), indent=1))
        elif path.suffix == ".csv":
            write_text_atomic(path, self.to_csv())
        else:
            raise ConfigError(f"attack results are saved as .json or .csv, not {path.suffix or 'no suffix'!r} "
                              f"({path}): change the file name")
        if self.embeddings:
            from .._io import save_tensors

            save_tensors(embeddings_path(path), dict(self.embeddings), {"format": "erasekit.tokens/1"})
        return path

    @classmethod
    def load(cls, path: str | Path) -> "AttackResult":
        """Read a file written by :meth:`save` (CSV files carry no config; protocol keeps the sampling)."""
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"no attack result at {path}: check the path")
        if path.suffix == ".json":
            d = json.loads(path.read_text())
            if d.get("format") != "erasekit.attack/1":
                raise ConfigError(f"{path} is not an erasekit attack result (no format 'erasekit.attack/1')")
            emb = {}
            if embeddings_path(path).is_file():
                from .._io import load_tensors

                emb = load_tensors(embeddings_path(path))[0]
            return cls(d["method"], d["concept"], [PromptAttack(**p) for p in d["prompts"]],
                       d.get("config", {}), d.get("protocol", {}), emb)
        if path.suffix == ".csv":
            return cls._from_csv(path)
        raise ConfigError(f"attack results are .json or .csv files, not {path.suffix!r} ({path})")

    @classmethod
    def _from_csv(cls, path: Path) -> "AttackResult":
        rows = list(csv.DictReader(io.StringIO(path.read_text())))
        kinds = {f.name: f.type for f in fields(PromptAttack)}
        if rows and not {"prompt", "adv_prompt", "seed"} <= set(rows[0]):
            raise ConfigError(f"{path} is not an erasekit attack CSV (needs columns prompt, adv_prompt, seed)")
        prompts = [PromptAttack(**{k: _parse(v, kinds[k]) for k, v in row.items() if k in kinds}) for row in rows]
        first = rows[0] if rows else {}
        sampling = {}
        if first.get("sampler"):
            sampling = {"sampler": first["sampler"], "steps": int(first["steps"]),
                        "guidance": float(first["guidance"])}
        concept = ", ".join(dict.fromkeys(p.concept for p in prompts)) or "unknown"
        return cls(first.get("method", "unknown"), concept, prompts, {}, {"sampling": sampling, "source": str(path)})


def embeddings_path(path: str | Path) -> Path:
    """Where the learned embeddings of the result saved at ``path`` go: ``<stem>.embeddings.safetensors``."""
    path = Path(path)
    return path.with_name(f"{path.stem}.embeddings.safetensors")


def _parse(value: str, kind: str):
    if "bool" in kind:
        return value == "True"
    if "None" in kind and value == "":
        return None
    if kind.startswith("int"):
        return int(value)
    if kind.startswith("float"):
        return float(value)
    return value
