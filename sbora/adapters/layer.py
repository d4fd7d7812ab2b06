"""AdaptedLinear: a frozen base linear layer plus any number of named adapter cores.

    y = base_layer(x) + Σ_k weight_k · ΔY_k(x)   over the active, unmerged cores k

Each name is one concept or task. Which cores are active, and at what weight, is the
call's choice when a scope says so (``scope.active_adapters``: a context variable, so
concurrent callers never see each other's selection); otherwise the per-name switch and
weight stored here apply. A core can be merged into the base weight (then it costs nothing
at inference) and unmerged again. Cores keep their own dtype (float32) on any base.
Kept as a wrapper around ``base_layer`` rather than a parametrization, so the full weight is
never rebuilt on a forward pass.
"""

from __future__ import annotations

import torch
from torch import nn

from .base import Core
from .scope import current_selection


class AdaptedLinear(nn.Module):
    def __init__(self, base_layer: nn.Linear):
        super().__init__()
        self.base_layer = base_layer
        self.cores = nn.ModuleDict()
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

    def add_core(self, name: str, core: Core, weight: float = 1.0, dtype: torch.dtype | None = None) -> None:
        """Add `core` under `name`, on the base's device; it keeps its dtype (float32) unless `dtype` is given."""
        if name in self.cores:
            raise ValueError(f"this layer already has an adapter named '{name}'")
        self.cores[name] = core.to(device=self.base_layer.weight.device, dtype=dtype)
        self.weights[name] = weight
        self.enabled[name] = True

    def remove_core(self, name: str) -> None:
        if name in self.merged:
            self.unmerge(name)
        del self.cores[name], self.weights[name], self.enabled[name]

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

    def active(self) -> list[tuple[str, float]]:
        """(name, weight) of the unmerged cores this call runs: the scope's selection, else the switches."""
        selection = current_selection()
        if selection is None:
            return [(n, self.weights[n]) for n in self.cores if self.enabled[n] and n not in self.merged]
        return [(n, w) for n, w in selection.items() if n in self.cores and n not in self.merged]

    def _fusable(self, name: str, x: torch.Tensor) -> bool:
        """Can base and branch run as the core's one fused op without changing what the layer does?"""
        core, base = self.cores[name], self.base_layer
        w, b = base.weight, base.bias
        return (
            core.fuses_base
            # a plain Linear whose forward nobody wraps or hooks (accelerate, quantizers, user hooks)
            and type(base) is nn.Linear and "forward" not in vars(base)
            and not (base._forward_hooks or base._forward_pre_hooks)
            and not (self.training and isinstance(core.dropout, nn.Dropout))
            and not w.requires_grad and (b is None or not b.requires_grad)
            and x.dtype == w.dtype == next(core.parameters()).dtype
            and not torch.is_autocast_enabled(x.device.type)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        active = self.active()
        if len(active) == 1 and self._fusable(active[0][0], x):
            name, weight = active[0]
            return self.cores[name].fused_linear(x, self.base_layer, weight)
        y = self.base_layer(x)  # (..., d_out)
        for name, weight in active:
            core = self.cores[name]
            # Full-precision adapters on a low-precision or quantized base compute in the core's
            # dtype; under autocast the matmuls pick their own dtype, so no copy is made.
            xa = x if torch.is_autocast_enabled(x.device.type) else x.to(next(core.parameters()).dtype)
            y = core.add_delta(y, xa, weight)
        return y

    def extra_repr(self) -> str:
        return ", ".join(
            f"{n}: {type(c).__name__}(r={c.rank}{', merged' if n in self.merged else ''}{'' if self.enabled[n] else ', off'})"
            for n, c in self.cores.items()
        )
