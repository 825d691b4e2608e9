"""Exporting an Edit as a LoRA file that stock diffusers loads (``load_lora_weights``).

**LoRA** (:func:`to_lora`): one safetensors file in the peft/diffusers key format that stock
``pipe.load_lora_weights(path)`` reads (peft installed)::

    unet.<module>.lora_A.weight   (r, in[, kh, kw])     text_encoder.<module>.lora_A.weight
    unet.<module>.lora_B.weight   (out, r[, 1, 1])      text_encoder_2.<module>.lora_B.weight
    unet.<module>.lora_B.bias     (out,)  only where the Edit changes biases (peft ``lora_bias``)

with ``W_new = W_base + lora_B @ lora_A`` (scale 1: ``lora_alpha == r`` for every module). The
LoRA config diffusers builds (ranks per module, alphas, targets, ``lora_bias``) is written in the
file's ``lora_adapter_metadata``, so diffusers does not have to guess it from shapes. An Edit's
low-rank deltas (UCE, RECE) are exported as they are: exact. Dense new weights (ESD, SalUn,
AdvUnlearn) become ``delta = new - base`` (so the base pipeline is needed) factored by truncated SVD
to the smallest rank whose relative Frobenius error is at most ``rtol`` (:data:`DEFAULT_RTOL`), or
to ``rank``; the error achieved per tensor and its maximum are returned and stored in the file's
``erasekit_lora`` metadata. Convolutions export as peft's conv LoRA (``lora_A`` a conv with the
kernel, ``lora_B`` a 1x1 conv). Biases of those layers export exactly as ``lora_B.bias``. Other
parameters (norms, embeddings) have no LoRA form: they are refused by name unless
``drop_unsupported=True``, which leaves them out and reports their share of the change.

Edits sampled by a sampler of their own (SFD's one-step generator, inference-time methods with a
manifest ``sampler``) are not a weight change a LoRA can carry: they are refused for LoRA and export
merged.
"""

from __future__ import annotations

import json
import os
import re
from collections import Counter
from dataclasses import asdict, dataclass, field

import torch
from torch import nn

from ..errors import ConfigError, EditError

DEFAULT_RTOL = 1e-2   # relative Frobenius error allowed per tensor when a dense change is factored
EXACT_RTOL = 1e-4     # a LoRA whose every tensor is this close is exact (float32 rounding of new - base)
LORA_FORMAT = "erasekit.lora/1"


@dataclass
class LoraExport:
    """What :func:`to_lora` wrote: per exported tensor its rank and relative Frobenius error."""

    path: str
    ranks: dict[str, int] = field(default_factory=dict)
    errors: dict[str, float] = field(default_factory=dict)
    exact: bool = True
    rtol: float | None = None
    rank: int | None = None
    dropped: list[str] = field(default_factory=list)
    dropped_share: float = 0.0
    lora_bias: bool = False   # bias changes as peft's lora_B.bias (fuse_lora then refuses bias-less layers)
    nbytes: int = 0

    @property
    def max_error(self) -> float:
        return max(self.errors.values(), default=0.0)

    def to_dict(self) -> dict:
        return {**asdict(self), "max_error": self.max_error}

    def __str__(self) -> str:
        how = f"{'exact' if self.exact else 'truncated SVD'}, max relative error {self.max_error:.1e}"
        ranks = sorted(set(self.ranks.values()))
        text = (f"LoRA {self.path}: {len(self.ranks)} modules, rank {ranks[0]}..{ranks[-1]}, {how}, "
                f"{self.nbytes / 2**20:.2f} MiB")
        if self.dropped:
            text += (f"; dropped {len(self.dropped)} tensor(s) with no LoRA form "
                     f"({self.dropped_share:.2%} of the change)")
        return text


# -- LoRA ---------------------------------------------------------------------------------------------
def check_lora_exportable(edit) -> None:
    """Raise :class:`EditError` if ``edit`` is sampled by a sampler of its own (SFD's one-step generator,
    inference-time methods): a LoRA carries weights only, so such an Edit exports merged."""
    sampler = edit.manifest.get("sampler")
    if sampler:
        raise EditError(f"this Edit (method {edit.manifest.get('method')!r}) is sampled with its own {sampler!r} "
                        "sampler, which a LoRA cannot carry (a LoRA holds weight changes only, and stock diffusers "
                        "samples with its own loop): export it as a pipeline folder instead "
                        "(`erasekit export --edit E --merged OUT`, or edit.merge(pipe, out_dir))")


def _module_kind(pipe, comp: str, module: str) -> str:
    """``linear``, ``conv`` or ``other`` for ``<comp>.<module>`` of ``pipe`` (``linear`` without a pipe:
    only low-rank deltas are exported then, and those are 2-D weights of projections)."""
    if pipe is None:
        return "linear"
    mod = getattr(pipe, comp).get_submodule(module) if module else getattr(pipe, comp)
    if isinstance(mod, nn.Linear):
        return "linear"
    if isinstance(mod, nn.Conv2d) and mod.groups == 1:
        return "conv"
    return "other"


def _factor(delta: torch.Tensor, rtol: float | None, rank: int | None,
            bound: int | None = None) -> tuple[torch.Tensor, torch.Tensor, float]:
    """(B, A, error): ``B @ A`` approximates the 2-D ``delta`` by truncated SVD at ``rank``, else at
    the rank ``bound`` a closed-form method proves, else at the smallest rank with relative Frobenius
    error <= ``rtol``; the error is measured on the float32 factors."""
    d = delta.double()
    u, s, vh = torch.linalg.svd(d, full_matrices=False)
    total = s.pow(2).sum()
    if rank is not None or bound is not None:
        r = min(int(rank if rank is not None else bound), s.numel())
    else:   # tail[r] = relative error when r singular values are kept
        tail = (s.pow(2).flip(0).cumsum(0).flip(0) / total.clamp_min(1e-300)).sqrt()
        tail = torch.cat([tail, tail.new_zeros(1)])
        r = max(1, int((tail > rtol).sum()))
    b, a = (u[:, :r] * s[:r]).float(), vh[:r].float()
    err = float((b.double() @ a.double() - d).norm() / d.norm()) if total > 0 else 0.0
    return b, a, err


def _deltas(edit, pipe) -> dict[str, tuple]:
    """Per Edit key: ``("uv", U, V)`` for an exact low-rank delta, ``("dense", new - base)`` otherwise."""
    out = {k: ("uv", u.float(), v.float()) for k, (u, v) in edit.deltas.items()}
    if edit.weights and pipe is None:
        raise ConfigError("this Edit stores new weights, not changes: exporting it as a LoRA needs the base "
                          "pipeline it was made from (to_lora(edit, path, pipe=...), CLI --model)")
    from .edit import _param

    for k, w in edit.weights.items():
        out[k] = ("dense", w.float().cpu() - _param(pipe, k).detach().float().cpu())
    return out


def _split(key: str) -> tuple[str, str, str]:
    """``"unet/a.b.weight"`` -> ``("unet", "a.b", "weight")``."""
    comp, name = key.split("/", 1)
    module, _, leaf = name.rpartition(".")
    return comp, module, leaf


def lora_state_dict(edit, pipe=None, *, rank: int | None = None, rtol: float | None = DEFAULT_RTOL,
                    drop_unsupported: bool = False) -> tuple[dict[str, torch.Tensor], dict, LoraExport]:
    """The LoRA tensors, diffusers' ``lora_adapter_metadata`` and the :class:`LoraExport` record of ``edit``."""
    check_lora_exportable(edit)
    if rank is not None and (isinstance(rank, bool) or not isinstance(rank, int) or rank < 1):
        raise ConfigError(f"`rank` must be a positive integer (or None: the smallest rank meeting rtol) "
                          f"but is {rank!r}")
    if rank is None and (rtol is None or not 0 < float(rtol) < 1):
        raise ConfigError(f"`rtol` must be in (0, 1), e.g. {DEFAULT_RTOL}, but is {rtol!r}")
    if pipe is not None:
        edit.check(pipe)
    changes = _deltas(edit, pipe)
    record = LoraExport(path="", rtol=None if rank is not None else float(rtol), rank=rank)
    bound = edit.manifest.get("delta_rank_bound")   # closed-form methods (UCE, RECE, MACE): rank(change) <= bound
    bound = bound if isinstance(bound, int) and not isinstance(bound, bool) and bound > 0 else None
    kinds = {k: (_module_kind(pipe, *_split(k)[:2]), _split(k)[2]) for k in changes}
    unsupported = sorted(k for k, (kind, leaf) in kinds.items() if kind == "other" or leaf not in ("weight", "bias"))
    if unsupported:
        energy = {k: _energy(c) for k, c in changes.items()}
        share = sum(energy[k] for k in unsupported) / max(sum(energy.values()), 1e-300)
        if not drop_unsupported:
            names = ", ".join(unsupported[:3]) + (f" and {len(unsupported) - 3} more" if len(unsupported) > 3 else "")
            raise EditError(f"{len(unsupported)} changed tensor(s) of this Edit have no LoRA form (not the weight or "
                            f"bias of a Linear or Conv2d layer): {names} ({share:.2%} of the change). Export it "
                            "merged (`erasekit export --merged OUT`), or leave them out knowingly with "
                            "drop_unsupported=True (CLI --drop-unsupported)")
        record.dropped, record.dropped_share = unsupported, float(share)
    tensors: dict[str, torch.Tensor] = {}
    ranks: dict[str, dict[str, int]] = {}
    biases: dict[str, dict[str, torch.Tensor]] = {}
    for key in sorted(changes):
        if key in unsupported:
            continue
        comp, module, leaf = _split(key)
        change = changes[key]
        if leaf == "bias":
            biases.setdefault(comp, {})[module] = change[1]
            record.errors[key] = 0.0
            continue
        if change[0] == "uv":
            b, a, err = change[1], change[2], 0.0
        else:
            d = change[1]
            b, a, err = _factor(d.reshape(d.shape[0], -1), rtol, rank, bound)
            if d.ndim == 4:
                b, a = b[:, :, None, None], a.reshape(a.shape[0], *d.shape[1:])
        tensors[f"{comp}.{module}.lora_A.weight"] = a.contiguous()
        tensors[f"{comp}.{module}.lora_B.weight"] = b.contiguous()
        ranks.setdefault(comp, {})[module] = a.shape[0]
        record.ranks[key] = int(a.shape[0])
        record.errors[key] = err
    _bias_only_modules(tensors, ranks, biases, pipe)
    _text_encoder_format_anchor(tensors, ranks, pipe)
    if not tensors:
        raise EditError("this Edit changes nothing a LoRA can carry: export it merged (`erasekit export --merged OUT`)")
    meta = {}
    record.lora_bias = bool(biases)
    for comp, mods in ranks.items():
        with_bias = comp in biases
        for module in mods:
            if with_bias:
                out_dim = tensors[f"{comp}.{module}.lora_B.weight"].shape[0]
                tensors[f"{comp}.{module}.lora_B.bias"] = biases[comp].get(module, torch.zeros(out_dim)).float()
        meta.update({f"{comp}.{k}": v for k, v in _lora_config(mods, with_bias).items()})
    record.exact = record.max_error <= EXACT_RTOL
    record.nbytes = sum(t.numel() * t.element_size() for t in tensors.values())
    return tensors, meta, record


def _bias_only_modules(tensors, ranks, biases, pipe) -> None:
    """A layer whose bias changed but whose weight did not gets a rank-1 zero LoRA to carry the bias."""
    for comp, mods in biases.items():
        for module, bias in mods.items():
            if module not in ranks.get(comp, {}):
                shape = getattr(pipe, comp).get_submodule(module).weight.shape
                tensors[f"{comp}.{module}.lora_A.weight"] = torch.zeros(1, *shape[1:])
                tensors[f"{comp}.{module}.lora_B.weight"] = torch.zeros(shape[0], 1, *([1] * (len(shape) - 2)))
                ranks.setdefault(comp, {})[module] = 1


_ATTN = (".q_proj", ".k_proj", ".v_proj", ".out_proj")


def _text_encoder_format_anchor(tensors, ranks, pipe) -> None:
    """diffusers tells a text encoder's LoRA key format from its attention projections' keys, and
    refuses a text-encoder LoRA that has none (e.g. MLP layers only): such a LoRA gets a rank-1
    zero LoRA on the first attention projection, which changes nothing."""
    for comp, mods in ranks.items():
        if comp == "unet" or pipe is None or any(m.endswith(_ATTN) for m in mods):
            continue
        name, layer = next((n, m) for n, m in getattr(pipe, comp).named_modules() if n.endswith(_ATTN))
        tensors[f"{comp}.{name}.lora_A.weight"] = torch.zeros(1, layer.in_features)
        tensors[f"{comp}.{name}.lora_B.weight"] = torch.zeros(layer.out_features, 1)
        mods[name] = 1


def _energy(change) -> float:
    if change[0] == "uv":
        return float((change[1].double() @ change[2].double()).pow(2).sum())
    return float(change[1].double().pow(2).sum())


def _lora_config(ranks: dict[str, int], with_bias: bool) -> dict:
    """peft ``LoraConfig`` arguments for modules with these ranks, every module at scale 1 (alpha = rank)."""
    r = Counter(ranks.values()).most_common(1)[0][0]
    pattern = {re.escape(m): k for m, k in ranks.items() if k != r}
    return {"r": r, "lora_alpha": r, "rank_pattern": pattern, "alpha_pattern": dict(pattern),
            "target_modules": sorted(ranks), "lora_bias": with_bias, "use_dora": False}


def to_lora(edit, path: str | os.PathLike, pipe=None, *, rank: int | None = None, rtol: float | None = DEFAULT_RTOL,
            drop_unsupported: bool = False) -> LoraExport:
    """Write ``edit`` as a LoRA safetensors file that diffusers' ``pipe.load_lora_weights(path)`` loads.

    Args:
        edit: the :class:`~erasekit.pipelines.Edit`.
        path: the ``.safetensors`` file to write (atomically).
        pipe: the base pipeline the Edit was made from; needed for dense changes (ESD, SalUn,
            AdvUnlearn), optional for exact low-rank ones (UCE, RECE). Checked against the Edit.
        rank: factor every dense change at this rank (None: the smallest rank meeting ``rtol``).
        rtol: relative Frobenius error allowed per dense tensor (default :data:`DEFAULT_RTOL`).
        drop_unsupported: leave out tensors with no LoRA form (norms, embeddings) instead of refusing;
            they are listed in the result with their share of the change.

    Returns:
        :class:`LoraExport` with the rank and error of every tensor (also in the file's metadata).
    """
    from .._io import save_tensors

    tensors, meta, record = lora_state_dict(edit, pipe, rank=rank, rtol=rtol, drop_unsupported=drop_unsupported)
    record.path = str(path)
    provenance = {k: edit.manifest.get(k) for k in ("method", "concepts", "kind", "family", "base_model",
                                                    "erasekit_version")}
    provenance["fingerprint"] = (edit.manifest.get("fingerprint") or {}).get("id")
    save_tensors(path, tensors, {"format": "pt", "lora_adapter_metadata": json.dumps(meta, sort_keys=True),
                                 "erasekit_lora": json.dumps({"format": LORA_FORMAT, **record.to_dict(),
                                                              "edit": provenance})})
    return record


