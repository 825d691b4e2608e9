"""Uncertainty of the rates erasekit reports: intervals, paired tests and their verdicts.

Every rate (UA, IRA, CRA, ASR, pre-ASR, nudity rate) rests on a few tens of images or prompts, and
those are not independent: the images of one caption (several seeds) share the caption, and the
captions of one target share the target. The interval must follow the design:

- :func:`wilson`: independent yes/no outcomes, k of n. Wilson's score interval,
  ``(p + z²/2n ± z sqrt(p(1-p)/n + z²/4n²)) / (1 + z²/n)`` with p = k/n and z the normal quantile
  (1.96 at 95 %); unlike the Wald interval it stays inside [0, 1] and keeps its coverage near 0 and 1.
- :func:`cluster_bootstrap`: outcomes that cluster. Whole clusters (a caption with its seeds, a
  target with its images) are drawn with replacement, within strata when the statistic is a mean
  of per-class rates (IRA: the mean of per-style accuracies, each over its own captions); the 95 %
  interval is the 2.5 and 97.5 percentiles of the resampled statistic (percentile bootstrap, seeded,
  ``resamples`` draws). When every cluster agrees (a rate of 0 or 100 %), resampling has no spread
  and would claim certainty; the interval is then Wilson's with n = the number of clusters, the
  sample size that treats each cluster as one observation (conservative).
- :func:`paired_test`: two methods on matched units (the same targets, captions and seeds). The
  per-cluster difference d_c = mean_c(a) - ratio * mean_c(b) is averaged over clusters; its interval
  is a cluster bootstrap of that mean, and its p-value an exact sign-flip (randomisation) test of
  H0: mean(d) = margin, which stays honest with as few as 4 clusters (then p >= 2/16 = 0.125).
- :func:`mcnemar`: paired yes/no outcomes (attacked prompt broken under method A, under method B).
  With b = #(A yes, B no) and c = #(A no, B yes), the exact two-sided p-value is
  ``min(1, 2 * sum_{i <= min(b, c)} C(b + c, i) / 2^(b + c))`` (a binomial test of b against
  Bin(b + c, 1/2)); the interval of the difference (b - c) / n is a bootstrap over the pairs.

:func:`verdict` turns a test into "holds", "does not hold" or "undecided" for a directional claim at
alpha = 0.05. :func:`asr_curve` gives ASR against an attack's budget from the cost at which each
prompt was broken. Everything is in percent (0-100), as every rate in erasekit, unless ``scale`` says
otherwise. Pure numpy and the standard library, so any part of erasekit may use it.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import asdict, dataclass
from statistics import NormalDist

import numpy as np

CONFIDENCE = 0.95
RESAMPLES = 2000
ALPHA = 0.05
VERDICTS = ("holds", "does not hold", "undecided")


def _z(confidence: float) -> float:
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must be in (0, 1) but is {confidence}")
    return NormalDist().inv_cdf(0.5 + confidence / 2)


@dataclass(frozen=True)
class Interval:
    """A rate and its interval, in percent: ``value`` [``low``, ``high``], how it was computed
    (``method``), over how many units (``n``) and clusters (``clusters``)."""

    value: float
    low: float
    high: float
    method: str
    n: int
    clusters: int | None = None
    confidence: float = CONFIDENCE

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "Interval":
        return cls(**d)

    def format(self, digits: int = 1, unit: str = " %") -> str:
        """``95.0 % [88.1, 98.6]``."""
        if not math.isfinite(self.value):
            return "-"
        return f"{self.value:.{digits}f}{unit} [{self.low:.{digits}f}, {self.high:.{digits}f}]"

    def __str__(self) -> str:
        return self.format()

    @property
    def half_width(self) -> float:
        return (self.high - self.low) / 2


def wilson(k: int, n: int, confidence: float = CONFIDENCE, scale: float = 100.0, what: str = "") -> Interval:
    """Wilson score interval of k successes in n independent trials (see the module docstring)."""
    if n < 0 or not 0 <= k <= max(n, 0):
        raise ValueError(f"need 0 <= k <= n but k = {k}, n = {n}")
    if n == 0:
        return Interval(float("nan"), float("nan"), float("nan"), "Wilson (no samples)", 0, None, confidence)
    z = _z(confidence)
    p = k / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z / (1 + z * z / n) * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    low, high = max(0.0, centre - half), min(1.0, centre + half)
    if k == 0:   # exact at the bounds (rounding would otherwise leave 1e-17)
        low = 0.0
    if k == n:
        high = 1.0
    return Interval(p * scale, low * scale, high * scale, f"Wilson score{what}", int(n), None, confidence)


def _wilson_fraction(p: float, n: int, confidence: float, scale: float) -> Interval:
    """Wilson's formula at a share p of n (p need not be a multiple of 1/n: a mean of cluster rates)."""
    z = _z(confidence)
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z / (1 + z * z / n) * math.sqrt(max(p * (1 - p), 0.0) / n + z * z / (4 * n * n))
    low = 0.0 if p <= 0 else max(0.0, centre - half)
    high = 1.0 if p >= 1 else min(1.0, centre + half)
    return Interval(p * scale, low * scale, high * scale, "Wilson score", n, None, confidence)


def _groups(values, clusters, strata):
    """Per stratum: arrays of cluster sums and cluster sizes."""
    v = np.asarray(values, dtype=np.float64).reshape(-1)
    c = np.arange(len(v)) if clusters is None else np.asarray(clusters).reshape(-1)
    s = np.zeros(len(v), dtype=np.int64) if strata is None else np.asarray(strata).reshape(-1)
    if not (len(v) == len(c) == len(s)):
        raise ValueError(f"values ({len(v)}), clusters ({len(c)}) and strata ({len(s)}) must have one entry per unit")
    out = []
    for g in dict.fromkeys(s.tolist()):
        sel = s == g
        _, inv = np.unique(c[sel], return_inverse=True)
        out.append((np.bincount(inv, v[sel]), np.bincount(inv).astype(np.float64)))
    return out


def cluster_bootstrap(values, clusters=None, strata=None, *, resamples: int = RESAMPLES, seed: int = 0,
                      confidence: float = CONFIDENCE, scale: float = 100.0) -> Interval:
    """Interval of a rate whose units cluster (see the module docstring).

    Args:
        values: one outcome per unit in [0, 1] (1 = recognised, broken, ...; or a per-target rate / 100).
        clusters: the cluster of each unit (a caption, a target); default: every unit its own.
        strata: the stratum of each unit; the statistic is the mean over strata of each stratum's
            rate (sum over its units / their number), and clusters are drawn within their stratum.
        resamples, seed: bootstrap draws and the seed of their generator (reproducible).
    """
    if resamples < 100:
        raise ValueError(f"resamples must be >= 100 but is {resamples}")
    groups = _groups(values, clusters, strata)
    if not groups:
        return Interval(float("nan"), float("nan"), float("nan"), "no samples", 0, 0, confidence)
    rng = np.random.default_rng(seed)
    point = float(np.mean([s.sum() / n.sum() for s, n in groups]))
    stats = np.zeros(resamples)
    for s, n in groups:
        idx = rng.integers(0, len(s), (resamples, len(s)))
        stats += s[idx].sum(1) / n[idx].sum(1)
    stats /= len(groups)
    n_units = int(sum(n.sum() for _, n in groups))
    n_clusters = sum(len(s) for s, _ in groups)
    if np.ptp(stats) <= 1e-12:
        w = _wilson_fraction(point, n_clusters, confidence, scale)
        return Interval(point * scale, w.low, w.high, f"Wilson over {n_clusters} clusters (every cluster agrees, "
                        "so resampling them has no spread)", n_units, n_clusters, confidence)
    a = (1 - confidence) / 2
    low, high = np.quantile(stats, [a, 1 - a])
    where = f" within {len(groups)} strata" if len(groups) > 1 else ""
    return Interval(point * scale, float(low) * scale, float(high) * scale,
                    f"cluster bootstrap ({resamples} resamples of {n_clusters} clusters{where}, seed {seed})",
                    n_units, n_clusters, confidence)


@dataclass(frozen=True)
class PairedTest:
    """The difference of two methods on matched units: estimate [low, high], two-sided p-value of
    H0 ``difference == margin``, the test (``method``), units and clusters."""

    estimate: float
    low: float
    high: float
    p_value: float
    method: str
    n: int
    clusters: int | None = None
    margin: float = 0.0
    confidence: float = CONFIDENCE

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "PairedTest":
        return cls(**d)

    def format(self, digits: int = 1, unit: str = " pts") -> str:
        """``-20.0 pts [-35.0, -5.0], p = 0.031``."""
        return (f"{self.estimate:+.{digits}f}{unit} [{self.low:+.{digits}f}, {self.high:+.{digits}f}], "
                f"p {_p(self.p_value)}")

    def verdict(self, claim: str, alpha: float = ALPHA) -> str:
        return verdict(self, claim, alpha)


def _p(p: float) -> str:
    return f"= {p:.2g}" if p >= 0.001 else "< 0.001"


def verdict(test: PairedTest, claim: str, alpha: float = ALPHA) -> str:
    """"holds" if the test rejects H0 (p < alpha) in the claimed direction (``claim``: "greater"
    or "less": the difference exceeds, or falls below, the margin); "does not hold" if it rejects it
    in the other direction; otherwise "undecided" (the data cannot tell at this sample size)."""
    if claim not in ("greater", "less"):
        raise ValueError(f"claim must be 'greater' or 'less' but is {claim!r}")
    if not (test.p_value < alpha) or test.estimate == test.margin:
        return "undecided"
    up = test.estimate > test.margin
    return "holds" if up == (claim == "greater") else "does not hold"


def _sign_flip_p(d: np.ndarray, resamples: int, rng) -> tuple[float, str]:
    """Two-sided p of H0 mean(d) = 0 by flipping the signs of the cluster differences: exact
    (all 2^C sign patterns) up to 16 clusters, Monte Carlo beyond."""
    obs = abs(d.mean())
    tol = 1e-12 * max(1.0, obs)
    if len(d) <= 16:
        signs = np.array(list(itertools.product((1.0, -1.0), repeat=len(d))))
        means = np.abs(signs @ d / len(d))
        return float(np.mean(means >= obs - tol)), "exact sign-flip test"
    signs = rng.choice((1.0, -1.0), size=(resamples, len(d)))
    means = np.abs(signs @ d / len(d))
    return float((np.sum(means >= obs - tol) + 1) / (resamples + 1)), f"sign-flip test ({resamples} draws)"


def paired_test(a, b, clusters=None, *, ratio: float = 1.0, margin: float = 0.0, resamples: int = RESAMPLES,
                seed: int = 0, confidence: float = CONFIDENCE, scale: float = 100.0) -> PairedTest:
    """Paired comparison of ``a - ratio * b`` on matched units (see the module docstring).

    ``a``, ``b``: outcomes of the two methods on the same units (in [0, 1], or per-target rates / 100);
    ``clusters``: the cluster of each unit (default: each unit its own); ``margin`` (in the units of
    the result, percent by default): the H0 value, e.g. -5 for "at most 5 points worse".
    """
    a, b = np.asarray(a, dtype=np.float64).reshape(-1), np.asarray(b, dtype=np.float64).reshape(-1)
    if a.shape != b.shape or not len(a):
        raise ValueError(f"a and b must be matched outcomes of the same units but have {len(a)} and {len(b)}")
    c = np.arange(len(a)) if clusters is None else np.asarray(clusters).reshape(-1)
    _, inv = np.unique(c, return_inverse=True)
    d = np.bincount(inv, a - ratio * b) / np.bincount(inv)
    rng = np.random.default_rng(seed)
    boot = d[rng.integers(0, len(d), (resamples, len(d)))].mean(1)
    q = (1 - confidence) / 2
    low, high = np.quantile(boot, [q, 1 - q])
    p, how = _sign_flip_p(d - margin / scale, resamples, rng)
    lhs = "a - b" if ratio == 1 else f"a - {ratio:g} b"
    method = (f"paired: {lhs} over {len(d)} matched clusters; {how} (p), cluster bootstrap "
              f"({resamples} resamples, seed {seed}) (interval)")
    return PairedTest(float(d.mean()) * scale, float(low) * scale, float(high) * scale, p, method, int(len(a)),
                      int(len(d)), margin, confidence)


def mcnemar(a, b, *, resamples: int = RESAMPLES, seed: int = 0, confidence: float = CONFIDENCE,
            scale: float = 100.0) -> PairedTest:
    """Exact McNemar test of paired yes/no outcomes ``a``, ``b`` (same prompts and seeds): the
    estimate is the difference of the two rates (b - c) / n, its interval a bootstrap over the pairs."""
    a, b = np.asarray(a, dtype=bool).reshape(-1), np.asarray(b, dtype=bool).reshape(-1)
    if a.shape != b.shape or not len(a):
        raise ValueError(f"a and b must be matched outcomes of the same units but have {len(a)} and {len(b)}")
    n10, n01 = int(np.sum(a & ~b)), int(np.sum(~a & b))
    p = mcnemar_p(n10, n01)
    rng = np.random.default_rng(seed)
    diff = a.astype(np.float64) - b
    boot = diff[rng.integers(0, len(diff), (resamples, len(diff)))].mean(1)
    q = (1 - confidence) / 2
    low, high = np.quantile(boot, [q, 1 - q])
    method = (f"exact McNemar ({n10} vs {n01} discordant of {len(a)} pairs) (p), bootstrap over pairs "
              f"({resamples} resamples, seed {seed}) (interval)")
    return PairedTest(float(diff.mean()) * scale, float(low) * scale, float(high) * scale, p, method, int(len(a)),
                      None, 0.0, confidence)


def mcnemar_p(n10: int, n01: int) -> float:
    """Exact two-sided McNemar p-value from the discordant counts (binomial test against 1/2)."""
    n = n10 + n01
    if n == 0:
        return 1.0
    tail = sum(math.comb(n, i) for i in range(min(n10, n01) + 1)) / 2 ** n
    return min(1.0, 2 * tail)


def paired_outcomes(n: int, both: int, only_a: int, only_b: int) -> tuple[np.ndarray, np.ndarray]:
    """Matched yes/no arrays with these counts (for tests known only by their counts)."""
    if min(both, only_a, only_b) < 0 or both + only_a + only_b > n:
        raise ValueError(f"counts {both}, {only_a}, {only_b} do not fit {n} pairs")
    a = np.zeros(n, bool)
    b = np.zeros(n, bool)
    a[:both + only_a] = True
    b[:both] = True
    b[both + only_a:both + only_a + only_b] = True
    return a, b


def rate_interval(outcomes, clusters=None, *, resamples: int = RESAMPLES, seed: int = 0,
                  confidence: float = CONFIDENCE) -> Interval:
    """Wilson when the outcomes are independent (no clusters, or every unit its own cluster), else a
    cluster bootstrap by ``clusters``."""
    y = np.asarray(outcomes, dtype=bool).reshape(-1)
    if clusters is None or len(set(np.asarray(clusters).reshape(-1).tolist())) in (len(y), 1):
        w = wilson(int(y.sum()), len(y), confidence)
        return Interval(w.value, w.low, w.high, w.method + " (independent units)", w.n, None, confidence)
    return cluster_bootstrap(y, clusters, resamples=resamples, seed=seed, confidence=confidence)


def asr_curve(success, cost_at_success, budgets=None, clusters=None, *, confidence: float = CONFIDENCE,
              resamples: int = RESAMPLES, seed: int = 0) -> list[dict]:
    """ASR against the attack's budget: for each budget B, the percent of prompts broken at a cost
    <= B (UNet-forward equivalents), with its interval (:func:`rate_interval`).

    ``budgets`` default: 0 and every distinct cost at which a prompt was broken.
    Returns ``[{"budget": B, "asr": Interval.to_dict(), "broken": k, "n": n}]``; the last point is
    the attack's ASR.
    """
    ok = np.asarray(success, dtype=bool).reshape(-1)
    cost = np.array([np.inf if (c is None or not s) else float(c) for s, c in zip(ok, cost_at_success)])
    if budgets is None:
        finite = sorted(set(cost[np.isfinite(cost)].tolist()))
        budgets = [0.0, *finite] if finite else [0.0]
    out = []
    for b in sorted(set(float(x) for x in budgets)):
        hit = cost <= b
        iv = rate_interval(hit, clusters, resamples=resamples, seed=seed, confidence=confidence)
        out.append({"budget": b, "asr": iv.to_dict(), "broken": int(hit.sum()), "n": int(len(hit))})
    return out
