"""RECE: Reliable and Efficient Concept Erasure (Gong et al., ECCV 2024, arXiv 2407.12383).

RECE starts from a UCE edit (:mod:`erasekit.erase.uce`, paper-era settings) and then, for each
epoch k and each concept prompt c (all 77 token rows; closed-form.md section 5):

1. derives the embedding that makes the edited model reproduce what the ORIGINAL model did with c
   (the paper's eq. 8, "regzero"), one system summed over every K and V matrix l jointly:
   ``c' = (lam_r I + sum_l W_l^T W_l)^-1 (sum_l W_l^T W_l^old) c``;
2. erases it with the UCE solver against the CURRENT weights W_k (eq. 5 with policy ``all_77``):
   ``W_{k+1} = (lam2 W_k + s_e sum_t W_k g_t c'_t^T + lam1 sum_r sum_t W_k r_t r_t^T)
              (lam2 I + s_e sum_t c'_t c'_t^T + lam1 sum_r sum_t r_t r_t^T)^-1``,
   with g the guide rows and r the rows of the retain prompts ("" plus the preserve concepts);
3. with a ``judge`` (or a ``validation`` callback), scores the epoch and keeps the best one.

Every edited weight is ``W_l = W_l^old X`` with one d x d matrix ``X = I + P Q`` shared by all layers
(:mod:`~erasekit.erase.closed_form`), so ``sum_l W_l^T W_l = X^T H X`` and ``sum_l W_l^T W_l^old = X^T H``
with ``H = sum_l W_l^old^T W_l^old`` computed once: each epoch costs a few d x d solves.

Defaults (RECE README and scripts): lam1 = lam2 = 0.1, s_e = 1; lam_r = 0.1 and 3 epochs for nudity,
lam_r = 1e-3 and 1 epoch for artistic styles, lam_r = 0.1 and 1 epoch otherwise. Deviations: the
validation selects among epochs 1..E by the lowest judge hit rate on the concepts' own prompts
(ties go to the earlier epoch) and stops early at 0 %; the reference uses task-specific validators
(nudity rate, Q16, ResNet-50 with a retain guard). The retain prompts are templated like UCE's
preserve concepts.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch

from ..errors import ConfigError
from .closed_form import SOLVE_DTYPES, RightUpdate, UCEFitter, text_input_weights
from .registry import check, register
from ..presets import concept_context
from .uce import PromptEncoder, UCEConfig, preserve_prompts, prompt_pairs, resolve, uce_fitter
from .uce_mmdit import closed_form_edit

# UCE preset -> (lam_r, epochs); closed-form.md section 5. A model's provider may name its own presets'.
RECE_DEFAULTS = {"nudity": (0.1, 3), "style": (1e-3, 1), "artist": (1e-3, 1), "object": (0.1, 1),
                 "default": (0.1, 1)}


@dataclass
class RECEConfig(UCEConfig):
    """UCE's options (for the starting edit, the guides and the retain prompts) plus RECE's own."""

    regular_scale: float | None = field(default=None, metadata={
        "help": "lam_r, regulariser of the adversarial-embedding derivation (preset: 0.1 or 1e-3)"})
    epochs: int | None = field(default=None, metadata={"help": "derive-and-erase rounds (preset: 3 nudity, else 1)"})
    ridge: float = field(default=0.1, metadata={"help": "lam2, ridge toward the current weights"})
    retain_scale: float = field(default=0.1, metadata={"help": "lam1, weight of the retain prompts"})
    judge: object | None = field(default=None, metadata={
        "help": "a Judge: keep the epoch whose images of the concepts it recognises least"})
    validation: Callable | None = field(default=None, metadata={
        "help": "callback(pipe) -> score (lower is better), run with each epoch's edit applied; "
                "takes precedence over judge"})
    validation_seeds: tuple[int, ...] = field(default=(0, 1), metadata={"help": "seeds of the judge's images"})

    def validate(self) -> None:
        super().validate()
        check(self.regular_scale is None or self.regular_scale > 0,
              f"`regular_scale` must be > 0 but is {self.regular_scale}")
        check(self.epochs is None or (isinstance(self.epochs, int) and self.epochs >= 0),
              f"`epochs` must be an integer >= 0 but is {self.epochs!r}")
        check(self.mmdit_option("mmdit_maps") == "context_embedder", "`mmdit_maps` must be 'context_embedder' for RECE (its "
              f"adversarial rows live in the encoder-row space) but is {self.mmdit_maps!r}")
        check(self.ridge > 0, f"`ridge` must be > 0 but is {self.ridge}")
        check(self.retain_scale >= 0, f"`retain_scale` must be >= 0 but is {self.retain_scale}")
        check(self.judge is None or hasattr(self.judge, "hits"),
              f"`judge` must be an erasekit Judge but is {type(self.judge).__name__}")
        check(self.validation is None or callable(self.validation), "`validation` must be callable")
        check(len(self.validation_seeds) > 0, "`validation_seeds` must name at least one seed")

    def to_dict(self) -> dict:
        out = {k: v for k, v in vars(self).items() if k not in ("judge", "validation")}
        out["judge"] = self.judge.describe() if self.judge is not None else None
        out["validation"] = getattr(self.validation, "__qualname__", repr(self.validation)) if self.validation else None
        out["validation_seeds"] = list(self.validation_seeds)
        return out


def derive(H: torch.Tensor, X: torch.Tensor, C: torch.Tensor, lam_r: float) -> torch.Tensor:
    """Adversarial embeddings (eq. 8, regzero) as rows: ``C' = C H X (lam_r I + X^T H X)^-1``."""
    XtH = X.T @ H                                  # sum_l W_l^T W_l^old
    L, info = torch.linalg.cholesky_ex(lam_r * torch.eye(H.shape[0], dtype=H.dtype) + XtH @ X)
    if info.item() != 0:
        raise ConfigError(f"the RECE derivation system is singular: raise `regular_scale` (is {lam_r})")
    return torch.cholesky_solve(XtH @ C.T, L).T


def judge_score(pipe, judge, concepts: list[str], prompts: list[list[str]], seeds) -> float:
    """Mean share of each concept's validation images in which ``judge`` still sees the concept."""
    from ..pipelines import generate

    rates = []
    for concept, ps in zip(concepts, prompts):
        images = generate(pipe, [p for p in ps for _ in seeds], [s for _ in ps for s in seeds])
        rates.append(float(judge.hits(images, concept).mean()))
    return sum(rates) / len(rates)


@register("rece", RECEConfig, components=("unet", "transformer"), families=("sd1", "sd2", "sdxl", "sd3", "flux"))
def rece(pipe, concepts: list[str], config: RECEConfig):
    """Erase ``concepts`` with RECE; returns an Edit of every cross-attention to_k / to_v.

    On SD 3 / Flux the same steps edit the transformer's ``context_embedder``, the map that reads the
    encoder rows (the rows ``c`` and ``c'`` of eq. 8 are its inputs; docs/backbones.md); with
    ``edit_pooled`` the pooled-text projection carries UCE's closed form (the epochs refine the sequence rows).

    Example:
        >>> import erasekit
        >>> from erasekit.eval.judges import CanvasJudge
        >>> pipe = erasekit.load_pipeline("canvas-mini")
        >>> edit = erasekit.erase(pipe, "rece", ["Van Gogh"], judge=CanvasJudge.load(), epochs=2)
        >>> edit.manifest["best_epoch"] in (1, 2)
        True
    """
    from ..pipelines import FamilyAdapter

    ctx = concept_context(pipe, concepts, config)
    s = resolve(config, concepts, ctx=ctx)
    lam_r, epochs = ctx.ask("rece_defaults", s.preset) or RECE_DEFAULTS[s.preset]
    lam_r = config.regular_scale if config.regular_scale is not None else lam_r
    epochs = config.epochs if config.epochs is not None else epochs
    if config.judge is not None:
        for c in s.concepts:
            config.judge.find(c)   # unknown concept: a clear error before any work
    enc, W_old = PromptEncoder(FamilyAdapter(pipe)), text_input_weights(pipe)
    X = uce_fitter(enc, s).solve()                        # the UCE edit RECE starts from
    concept_prompts, guide_prompts = prompt_pairs(s)
    C, G = enc.rows(concept_prompts)[0].flatten(0, 1), enc.rows(guide_prompts)[0].flatten(0, 1)
    RtR, n_r = enc.gram(preserve_prompts(s) if "" in s.preserve else [""] + preserve_prompts(s))
    H = sum((w.float().T @ w.float()).double().cpu() for w in W_old.values())   # sum_l W_l^old^T W_l^old
    by_concept = [concept_prompts[i * len(s.templates):(i + 1) * len(s.templates)] for i in range(len(s.concepts))]
    history, best = [], (float("inf"), X, 0)
    for epoch in range(1, epochs + 1):
        C_adv = derive(H, X.dense(), C, lam_r)
        fitter = UCEFitter(C.shape[1], config.ridge, SOLVE_DTYPES[s.solve_dtype])
        fitter.update(C_adv, G, s.erase_scale)
        fitter.update_gram(RtR, n_r, config.retain_scale)
        X = X.then(fitter.solve())
        score = _score(pipe, enc, X, config, s, by_concept)
        history.append({"epoch": epoch, "score": score})
        if score is None or score < best[0]:
            best = (score if score is not None else float("inf"), X, epoch)
        if score == 0:
            break
    _, X, best_epoch = best
    resolved = {**s.to_dict(), "regular_scale": lam_r, "epochs": epochs}
    manifest = {"resolved": resolved, "history": history, "best_epoch": best_epoch, "delta_rank_bound": X.rank,
                **ctx.record(s.preset, {k: v for k, v in resolved.items() if k not in ("preset", "concepts")})}
    return closed_form_edit(pipe, enc, s, X, manifest, config.mmdit_option("edit_pooled"))


def _score(pipe, enc, X: RightUpdate, config: RECEConfig, s, prompts) -> float | None:
    """Validation score of the edit ``W_old X`` (lower is better), or None without a judge or callback."""
    if config.judge is None and config.validation is None:
        return None
    edit = closed_form_edit(pipe, enc, s, X, {"method": "rece (validation)"}, config.mmdit_option("edit_pooled"))
    with edit.applied(pipe):
        if config.validation is not None:
            return float(config.validation(pipe))
        return judge_score(pipe, config.judge, s.concepts, prompts, config.validation_seeds)
