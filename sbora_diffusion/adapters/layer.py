"""AdaptedLinear: a frozen base linear layer plus any number of named adapter cores.

    y = base_layer(x) + Σ_k weight_k · ΔY_k(dropout_k(x))   over enabled, unmerged cores k

Each name is one concept or task. A core can be merged into the base weight (then it costs
nothing at inference) and unmerged again; its weight (scale) and on/off switch are per name.
Kept as a wrapper around ``base_layer`` rather than a parametrization, so the full weight is
never rebuilt on a forward pass.
"""

from __future__ import annotations

import torch
from torch import nn

from .base import Core


class AdaptedLinear(nn.Module):
    def __init__(self, base_layer: nn.Linear):
        super().__init__()
        self.base_layer = base_layer
        self.cores = nn.ModuleDict()
        self.dropouts = nn.ModuleDict()
        self.weights: dict[str, float] = {}
        self.enabled: dict[str, bool] = {}
        self.merged: set[str] = set()

    # Proxies so code that reads `layer.weight` / `layer.in_features` (diffusers, transformers) still works.
    @property
    def weight(self) -> torch.Tensor:
        return self.base_layer.weight

    @property
    def bias(self) -> torch.Tensor | None:
        return self.base_layer.bias

    @property
    def in_features(self) -> int:
        return self.base_layer.in_features

    @property
    def out_features(self) -> int:
        return self.base_layer.out_features

    def add_core(self, name: str, core: Core, dropout: float = 0.0, weight: float = 1.0) -> None:
        if name in self.cores:
            raise ValueError(f"this layer already has an adapter named '{name}'")
        w = self.base_layer.weight
        self.cores[name] = core.to(device=w.device, dtype=w.dtype if w.is_floating_point() else None)
        self.dropouts[name] = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.weights[name] = weight
        self.enabled[name] = True

    def remove_core(self, name: str) -> None:
        if name in self.merged:
            self.unmerge(name)
        del self.cores[name], self.dropouts[name], self.weights[name], self.enabled[name]

    def _check_unmerged(self, name: str, action: str) -> None:
        if name in self.merged:
            raise RuntimeError(f"adapter '{name}' is merged into the base weights; unmerge it before you {action}")

    def set_weight(self, name: str, weight: float) -> None:
        self._check_unmerged(name, "change its weight")
        self.weights[name] = weight

    def set_enabled(self, name: str, enabled: bool) -> None:
        self._check_unmerged(name, "switch it on or off")
        self.enabled[name] = enabled

    def merge(self, name: str) -> None:
        """W += weight·ΔW of `name`; its forward branch is then skipped."""
        if name not in self.merged:
            self.cores[name].merge_into(self._base_weight(), self.weights[name])
            self.merged.add(name)

    def unmerge(self, name: str) -> None:
        if name in self.merged:
            self.cores[name].unmerge_from(self._base_weight(), self.weights[name])
            self.merged.discard(name)

    def _base_weight(self) -> torch.Tensor:
        w = self.base_layer.weight
        if not w.is_floating_point():
            raise TypeError(
                f"cannot merge into a {type(self.base_layer).__name__} with {w.dtype} weights; "
                "keep the adapter unmerged or dequantize the base first"
            )
        return w.data

    def active(self) -> list[str]:
        return [n for n in self.cores if self.enabled[n] and n not in self.merged]

    def _fusable(self, name: str, x: torch.Tensor) -> bool:
        """Can base and branch run as the core's one fused op without changing what the layer does?"""
        core, base = self.cores[name], self.base_layer
        w, b = base.weight, base.bias
        return (
            core.fuses_base
            # a plain Linear whose forward nobody wraps or hooks (accelerate, quantizers, user hooks)
            and type(base) is nn.Linear and "forward" not in vars(base)
            and not (base._forward_hooks or base._forward_pre_hooks)
            and not (self.training and isinstance(self.dropouts[name], nn.Dropout))
            and not w.requires_grad and (b is None or not b.requires_grad)
            and x.dtype == w.dtype == next(core.parameters()).dtype
            and not torch.is_autocast_enabled(x.device.type)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        active = self.active()
        if len(active) == 1 and self._fusable(active[0], x):
            return self.cores[active[0]].fused_linear(x, self.base_layer, self.weights[active[0]])
        y = self.base_layer(x)  # (..., d_out)
        for name in active:
            core = self.cores[name]
            # Full-precision adapters on a low-precision or quantized base compute in the core's
            # dtype; under autocast the matmuls pick their own dtype, so no copy is made.
            xa = x if torch.is_autocast_enabled(x.device.type) else x.to(next(core.parameters()).dtype)
            y = core.add_delta(y, self.dropouts[name](xa), self.weights[name])
        return y

    def extra_repr(self) -> str:
        return ", ".join(
            f"{n}: {type(c).__name__}(r={c.rank}{', merged' if n in self.merged else ''}{'' if self.enabled[n] else ', off'})"
            for n, c in self.cores.items()
        )
