"""Low-rank adapters on a pipeline's layers, trained by MACE and SPM and stored as exact Edit factors.

An adapter adds ``scale * up @ down`` to a ``Linear`` weight (or a 1x1 ``Conv2d``'s), through a
forward hook that adds ``scale * up(down(x))`` to the layer's output: the layer itself is never
replaced or changed, and the hooks are removed in ``finally`` (:meth:`AdapterSet.attached`). A
trained set becomes an :class:`~erasekit.pipelines.Edit` whose change of each ``Linear`` weight is
stored as its exact factors ``(scale * up, down)`` (:func:`adapter_edit`), so the Edit holds the
adapters themselves and export to LoRA is exact.

A 1x1 convolution's change is stored as its dense new weight: the Edit stores factors of 2-D
weights only (Stable Diffusion 1.x's ``proj_in`` / ``proj_out`` are such convolutions).
"""

from __future__ import annotations

import math
from contextlib import contextmanager

import torch
from torch import nn

from ..errors import ConfigError


def _is_pointwise_conv(m: nn.Module) -> bool:
    return isinstance(m, nn.Conv2d) and m.kernel_size == (1, 1) and m.groups == 1 and m.stride == (1, 1)


class LowRankAdapter(nn.Module):
    """``delta W = scale * up @ down`` for one layer (``down``: r x in, ``up``: out x r)."""

    def __init__(self, layer: nn.Module, rank: int, scale: float = 1.0, init: str = "lora"):
        super().__init__()
        if isinstance(layer, nn.Linear):
            d_in, d_out = layer.in_features, layer.out_features
        elif _is_pointwise_conv(layer):
            d_in, d_out = layer.in_channels, layer.out_channels
        else:
            raise ConfigError(f"a low-rank adapter needs a Linear or 1x1 Conv2d layer, not {type(layer).__name__}")
        w = layer.weight
        self.conv = not isinstance(layer, nn.Linear)
        self.scale = float(scale)
        self.down = nn.Parameter(torch.empty(rank, d_in, device=w.device, dtype=torch.float32))
        self.up = nn.Parameter(torch.zeros(d_out, rank, device=w.device, dtype=torch.float32))
        if init == "kaiming":   # the kohya / LECO LoRA initialisation (SPM's reference)
            nn.init.kaiming_uniform_(self.down, a=math.sqrt(5))
        else:                   # diffusers' LoRALinearLayer (MACE's reference): N(0, 1/r)
            nn.init.normal_(self.down, std=1.0 / rank)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        down, up = self.down.to(x.dtype), self.up.to(x.dtype)
        if self.conv:   # channels first: B x C x H x W
            return torch.einsum("or,ri,bihw->bohw", up, down, x) * self.scale
        return (x @ down.T) @ up.T * self.scale

    def factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(U, V)`` with ``delta W = U @ V`` (float32, detached)."""
        return (self.up.detach() * self.scale).float(), self.down.detach().float()


class AdapterSet(nn.ModuleDict):
    """Adapters keyed by their layer's name in a component (``.`` written as ``__``)."""

    def __init__(self, component: str, layers: dict[str, nn.Module], rank: int, scale: float = 1.0,
                 init: str = "lora"):
        super().__init__({name.replace(".", "__"): LowRankAdapter(m, rank, scale, init) for name, m in layers.items()})
        self.component = component

    def names(self) -> list[str]:
        return [k.replace("__", ".") for k in self.keys()]

    @contextmanager
    def attached(self, module: nn.Module, multiplier: float = 1.0):
        """Add the adapters' outputs (times ``multiplier``) to their layers of ``module`` for the block."""
        handles = []
        try:
            for key, adapter in self.items():
                layer = module.get_submodule(key.replace("__", "."))
                handles.append(layer.register_forward_hook(
                    lambda mod, args, out, a=adapter: out + multiplier * a(args[0])))
            yield self
        finally:
            for h in handles:
                h.remove()


def adapter_edit(pipe, adapters: AdapterSet | list[AdapterSet], manifest: dict, weights: list[float] | None = None):
    """The Edit of the summed adapters ``sum_i w_i delta_i``: exact factors for Linear weights (the
    factors of several adapters side by side), dense new weights for 1x1 convolutions."""
    from ..pipelines import Edit, fingerprint

    sets = adapters if isinstance(adapters, list) else [adapters]
    weights = weights or [1.0] * len(sets)
    comp = sets[0].component
    module = getattr(pipe, comp)
    factors, dense = {}, {}
    for key in sets[0].keys():
        name = key.replace("__", ".")
        us, vs = zip(*[s[key].factors() for s in sets])
        U = torch.cat([w * u for w, u in zip(weights, us)], dim=1)
        V = torch.cat(vs, dim=0)
        param_key = f"{comp}/{name}.weight"
        base = module.get_submodule(name).weight.detach()
        if base.ndim == 2:
            factors[param_key] = (U, V)
        else:
            dense[param_key] = (base.float() + (U @ V).to(base.device).reshape(base.shape)).to(base.dtype)
    edit = Edit.from_factors(pipe, factors, manifest) if factors else Edit.from_weights(pipe, dense, manifest, False)
    if factors and dense:   # one Edit holding both kinds: its manifest lists every key and its base
        extra = Edit.from_weights(pipe, dense, manifest, low_rank=False)
        edit.weights.update(extra.weights)
        keys = sorted(set(edit.keys))
        base = {k: getattr(pipe, k.split("/", 1)[0]).get_parameter(k.split("/", 1)[1]).detach() for k in keys}
        edit.manifest.update({"keys": keys, "fingerprint": fingerprint(base)})
    return edit
