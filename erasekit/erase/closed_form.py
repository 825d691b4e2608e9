"""The closed-form cross-attention solver shared by UCE and RECE, streamed (closed-form.md section 2).

For every cross-attention projection ``W`` (d_out x d) UCE (Gandikota et al., arXiv 2308.14761, eq. 7
with a ridge) solves

    min_W  s_e sum_E ||W c_i - v_i*||^2 + s_p sum_P ||W c_j - W_ref c_j||^2 + lam ||W - W_ref||_F^2

whose normal equations are ``W B = A`` with

    B = lam I + s_e sum_E c_i c_i^T + s_p sum_P c_j c_j^T
    A = lam W_ref + s_e sum_E v_i* c_i^T + s_p sum_P (W_ref c_j) c_j^T.

The keys ``c`` are text-encoder outputs, the same for every layer, so ``B`` is layer-independent and
is factorised once. Every target erasekit builds is a "replace" target ``v_i* = W_ref g_i`` (``g_i``
the guide row paired with ``c_i``: UCE, and RECE's edit step), so ``A = W_ref M`` with
``M = lam I + s_e sum g_i c_i^T + s_p sum c_j c_j^T`` and every layer's solution is ``W = W_ref T``,
``T = M B^-1``. Moreover ``T - I = (M - B) B^-1 = P Q`` with ``P = s_e (G - C)^T`` (d x n_e) and
``Q = C B^-1`` (n_e x d): the change of each matrix, ``(W_ref P) Q``, has rank at most the number of
erase rows n_e and is stored exactly as those two factors (no SVD).

``A`` and ``B`` are accumulated in float64 on the CPU and the d x d solve runs in ``dtype`` (float64
by default: ``B`` sums hundreds of rows of norm ~30, so its condition number reaches 1e5-1e6 and
would use up most of float32's digits; the spec's default is float32, selectable). Only the
per-layer products ``W_ref P`` touch the pipeline's device, in float32 whatever the pipeline's dtype.

Whether ``B`` can be solved is decided from its eigenvalues (``eigvalsh`` in float64), never from a
factorisation's pivots, so the answer does not depend on the CPU, its vector units or the thread
count (:func:`solvability`). ``B`` is the Gram matrix of the stacked rows ``[sqrt(s) C; sqrt(lam) I]``,
so its eigenvalues are their squared singular values, and the rank rule of numpy's ``matrix_rank``
(singular value <= dimension x eps x largest) applies with the precision of the key rows (text
encoders compute in float32 or lower): ``B`` is singular when
``lambda_min <= lambda_max * max((d eps_keys)^2, d eps_float64)``. A solve in float32 also needs
``B`` rounded to float32 to stay positive definite: its rounding error is at most
``eps_float32 ||B||_F / 2`` in the 2-norm, so ``lambda_min <= eps_float32 ||B||_F`` is refused
(with a factor 2 to spare).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..errors import ConfigError, EditError

SOLVE_DTYPES = {"float32": torch.float32, "float64": torch.float64}


@dataclass(frozen=True)
class RightUpdate:
    """``X = I + P @ Q``: the shared right factor of a closed-form edit, ``W_new = W_ref @ X``."""

    P: torch.Tensor  # d x r
    Q: torch.Tensor  # r x d

    @property
    def rank(self) -> int:
        return self.P.shape[1]

    def dense(self) -> torch.Tensor:
        return torch.eye(self.P.shape[0], dtype=self.P.dtype) + self.P @ self.Q

    def then(self, other: "RightUpdate") -> "RightUpdate":
        """The update that applies ``self`` and then ``other``: ``(I + P1 Q1)(I + P2 Q2) = I + P' Q'``."""
        P2 = other.P.to(self.P.dtype)
        P = torch.cat([self.P, P2 + self.P @ (self.Q @ P2)], dim=1)
        Q = torch.cat([self.Q, other.Q.to(self.Q.dtype)], dim=0)
        if P.shape[1] >= P.shape[0]:   # no longer low rank: X - I as a dense d x d factor
            return RightUpdate(P @ Q, torch.eye(P.shape[0], dtype=P.dtype))
        return RightUpdate(P, Q)

    @staticmethod
    def identity(dim: int, dtype: torch.dtype = torch.float64) -> "RightUpdate":
        return RightUpdate(torch.zeros(dim, 0, dtype=dtype), torch.zeros(0, dim, dtype=dtype))

    def factors(self, W_ref: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Exact factors ``(U, V)`` of the change ``W_new - W_ref = U @ V`` for one weight (float32)."""
        P = self.P.to(device=W_ref.device, dtype=torch.float32)
        return W_ref.float() @ P, self.Q.to(device=W_ref.device, dtype=torch.float32)

    def weight(self, W_ref: torch.Tensor) -> torch.Tensor:
        """The new weight ``W_ref + (W_ref P) Q`` in ``W_ref``'s dtype."""
        U, V = self.factors(W_ref)
        return (W_ref.float() + U @ V).to(W_ref.dtype)


class UCEFitter:
    """Accumulates the normal equations of the objective above row by row (``update``), then ``solve``s.

    Example:
        >>> import torch
        >>> fitter = UCEFitter(dim=4, lam=0.5)
        >>> fitter.update(torch.eye(4)[:1], guides=torch.zeros(1, 4))   # erase e_0 towards 0
        >>> fitter.update(torch.eye(4)[1:3])                              # preserve e_1, e_2
        >>> W_ref = torch.ones(3, 4)
        >>> (fitter.solve().weight(W_ref) @ torch.eye(4)[0]).abs().max().item() < 0.35
        True
    """

    def __init__(self, dim: int, lam: float, dtype: torch.dtype = torch.float64):
        self.dim, self.lam, self.dtype = dim, float(lam), dtype
        self.key_eps = torch.finfo(torch.float32).eps   # precision of the rows: float32 or coarser
        eye = torch.eye(dim, dtype=torch.float64)
        self.B = lam * eye          # lam I + s_e C^T C + s_p sum c_j c_j^T
        self.M = lam * eye          # lam I + s_e G^T C + s_p sum c_j c_j^T  (A = W_ref M)
        self.n_rows = 0
        self._P: list[torch.Tensor] = []   # s_e (G - C)^T blocks
        self._C: list[torch.Tensor] = []   # erase keys

    def _rows(self, x: torch.Tensor, what: str) -> torch.Tensor:
        if x.is_floating_point():   # float16 / bfloat16 rows carry fewer digits than float32 ones
            self.key_eps = max(self.key_eps, torch.finfo(x.dtype).eps)
        x = x.detach().to("cpu", torch.float64).reshape(-1, self.dim)
        if not torch.isfinite(x).all():
            raise EditError(f"the {what} embeddings contain NaN or Inf (text encoder overflow?): load the "
                            "pipeline in float32 or bfloat16 and retry")
        return x

    def update(self, keys: torch.Tensor, guides: torch.Tensor | None = None, scale: float = 1.0) -> None:
        """Add key rows (n x d). With ``guides`` (n x d, row k paired with key row k) they are erase rows
        with targets ``W_ref g``; without, preserve rows (targets ``W_ref c``). ``scale`` is s_e or s_p."""
        C = self._rows(keys, "key")
        CtC = C.T @ C
        self.B += scale * CtC
        self.n_rows += C.shape[0]
        if guides is None:
            self.M += scale * CtC
            return
        G = self._rows(guides, "guide")
        if G.shape != C.shape:
            raise ConfigError(f"got {G.shape[0]} guide rows for {C.shape[0]} erase rows; they pair row by row")
        self.M += scale * (G.T @ C)
        moved = (G != C).any(dim=1)   # rows whose guide equals the key (BOS, shared prefixes) add no rank
        self._P.append(scale * (G - C)[moved].T)
        self._C.append(C[moved])

    def update_gram(self, CtC: torch.Tensor, n_rows: int, scale: float = 1.0) -> None:
        """Add preserve rows given by their Gram matrix ``C^T C`` (reused across solves, e.g. by RECE)."""
        if CtC.is_floating_point():
            self.key_eps = max(self.key_eps, torch.finfo(CtC.dtype).eps)
        CtC = CtC.detach().to("cpu", torch.float64)
        self.B += scale * CtC
        self.M += scale * CtC
        self.n_rows += n_rows

    def A(self, W_ref: torch.Tensor) -> torch.Tensor:
        """The right-hand side of the normal equations for one weight: ``A = W_ref M``."""
        return W_ref.double().cpu() @ self.M

    def solvability(self) -> tuple[float, float, float]:
        """``(lambda_min, singular tolerance, solve tolerance)`` of ``B`` (module docstring).

        ``B`` is singular when ``lambda_min <= singular tolerance``; a solve in ``dtype`` also needs
        ``lambda_min > solve tolerance`` (``eps(dtype) ||B||_F``; implied by the first in float64). Both
        come from ``eigvalsh`` in float64, so the decision is the same on every CPU and thread count
        for any ``B`` not within round-off of a threshold.
        """
        if not torch.isfinite(self.B).all():
            return float("nan"), float("inf"), float("inf")
        ev = torch.linalg.eigvalsh(self.B)
        lam_min, lam_max = float(ev[0]), float(ev[-1].clamp_min(0))
        d, eps64 = self.dim, torch.finfo(torch.float64).eps
        singular_tol = lam_max * max((d * self.key_eps) ** 2, d * eps64)
        solve_tol = torch.finfo(self.dtype).eps * float(ev.norm())   # ||B||_F = ||eigenvalues||_2
        return lam_min, singular_tol, solve_tol

    def solve(self) -> RightUpdate:
        """Decide solvability from B's eigenvalues, factorise B once (Cholesky) and return ``T = I + P Q``."""
        if self.lam == 0 and self.n_rows < self.dim:
            raise ConfigError(f"the UCE system is singular: `lamb` is 0 and there are only {self.n_rows} key "
                              f"rows for a {self.dim}-d context (need >= {self.dim}); set `lamb` > 0 or add "
                              "preserve concepts")
        lam_min, singular_tol, solve_tol = self.solvability()
        if not lam_min > singular_tol:   # also NaN
            raise ConfigError("the UCE system B is singular (its smallest eigenvalue "
                              f"{lam_min:.3g} is within round-off of 0, tolerance {singular_tol:.3g}: the key rows "
                              f"are linearly dependent with `lamb` = {self.lam}): set `lamb` > 0 (e.g. 0.5) or "
                              "add preserve concepts")
        if not lam_min > solve_tol:
            raise ConfigError(f"the UCE system B is too ill-conditioned for a {_name(self.dtype)} solve (smallest "
                              f"eigenvalue {lam_min:.3g}, up to {solve_tol:.3g} is lost to rounding B): set "
                              "`solve_dtype` to 'float64' or raise `lamb`")
        L, info = torch.linalg.cholesky_ex(self.B.to(self.dtype))
        if info.item() != 0:   # rounding inside the factorisation itself (B passed the checks above)
            raise ConfigError(f"the Cholesky factorisation of the UCE system B failed in {_name(self.dtype)}: "
                              "set `solve_dtype` to 'float64' or raise `lamb`")
        if sum(c.shape[0] for c in self._C) == 0:   # nothing to erase: the weights stay as they are
            return RightUpdate.identity(self.dim, self.dtype)
        C = torch.cat(self._C).to(self.dtype)
        Q = torch.cholesky_solve(C.T, L).T          # C B^-1 (B symmetric): a solve, no explicit inverse
        P = torch.cat(self._P, dim=1).to(self.dtype)
        if not (torch.isfinite(P).all() and torch.isfinite(Q).all()):
            raise EditError("the closed-form solution contains NaN or Inf; lower `erase_scale` or raise `lamb`")
        if P.shape[1] >= self.dim:   # more erase rows than dimensions: T - I as a dense d x d factor
            return RightUpdate(P @ Q, torch.eye(self.dim, dtype=self.dtype))
        return RightUpdate(P, Q)


def _name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def kv_weights(pipe) -> dict[str, torch.Tensor]:
    """``{"unet/<name>.weight": weight}`` of every cross-attention to_k / to_v (detached, not copied)."""
    from ..pipelines import cross_attention_kv

    return {f"unet/{name}.weight": m.weight.detach() for name, m in cross_attention_kv(pipe.unet).items()}


def text_input_weights(pipe) -> dict[str, torch.Tensor]:
    """The weights that read the text encoder's rows directly (detached, not copied): every cross-attention
    to_k / to_v of a UNet (:func:`kv_weights`), the ``context_embedder`` of an SD 3 / Flux transformer
    (the one map of an MMDiT whose closed form is exact, :mod:`erasekit.erase.uce_mmdit`)."""
    if getattr(pipe, "transformer", None) is not None:
        from ..pipelines.mmdit import text_projections

        return {"transformer/context_embedder.weight": text_projections(pipe.transformer)["context_embedder"]
                .weight.detach()}
    return kv_weights(pipe)


def build_edit(pipe, W_ref: dict[str, torch.Tensor], update: RightUpdate, manifest: dict):
    """The :class:`~erasekit.pipelines.Edit` of ``W_new = W_ref @ (I + P Q)`` for every weight in ``W_ref``.

    ``W_ref`` must be the pipeline's current weights (the Edit's base); changes are stored as exact
    low-rank factors where smaller than the dense weight; NaN or Inf is refused there.
    """
    from ..pipelines import Edit

    return Edit.from_factors(pipe, {key: update.factors(w) for key, w in W_ref.items()}, manifest)
