"""SBoRA: Standard Basis LoRA (Po et al., "SBoRA: Low-Rank Adaptation with Regional Weight Updates").

One factor is a fixed set of standard-basis vectors, so only r columns (FA) or r rows (FB)
of W change, with half of LoRA's trainable parameters:

    SBoRA-FA:  A = rows e_i, i ∈ I (fixed);  ΔY = s·B x'[..., I];  ΔW = s·B in columns I.
    SBoRA-FB:  B = columns e_j, j ∈ J (fixed);  ΔY[..., J] += s·A x';  ΔW = s·A in rows J.

I and J are slot k's share of a per-layer permutation (base.slot_indices), so adapters in
different slots touch disjoint columns/rows. Everything is a gather or an ``index_add_``;
no one-hot matrix is ever built. For FA, autograd keeps only the r-wide gathered input
x'[..., I] (index_select's backward needs just the index and the input's shape).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .base import Core, slot_indices
from .config import AdapterConfig


class _StandardBasisCore(Core):
    """Shared by FA and FB: ΔW is the trained factor placed along `axis` at `indices`."""

    rank_bounded_by_both = False
    axis: int  # 1: columns I (FA), 0: rows J (FB)

    def trained(self) -> torch.Tensor:
        raise NotImplementedError

    def delta_weight(self) -> torch.Tensor:
        t = self.trained()
        return t.new_zeros(self.d_out, self.d_in).index_add_(self.axis, self.indices, t * self.scale)

    @torch.no_grad()
    def merge_into(self, W: torch.Tensor, weight: float = 1.0) -> None:
        # Touches r columns (FA) or rows (FB) only: a sparse add, never a dense B@A.
        W.index_add_(self.axis, self.indices, (self.trained() * self.scale).to(W.dtype), alpha=weight)


class SBoRAFACore(_StandardBasisCore):
    axis = 1

    def __init__(self, d_in: int, d_out: int, config: AdapterConfig, path: str):
        super().__init__(d_in, d_out, config, path)
        self.register_buffer("indices", slot_indices(config, d_in, path, "input"))  # (r,) = I
        self.B = nn.Parameter(torch.zeros(d_out, config.rank))

    def trained(self) -> torch.Tensor:
        return self.B  # (d_out, r), placed in columns I

    def unscaled(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x.index_select(-1, self.indices), self.B)  # (..., r) -> (..., d_out)


class SBoRAFBCore(_StandardBasisCore):
    axis = 0

    def __init__(self, d_in: int, d_out: int, config: AdapterConfig, path: str):
        super().__init__(d_in, d_out, config, path)
        self.register_buffer("indices", slot_indices(config, d_out, path, "output"))  # (r,) = J
        self.A = nn.Parameter(torch.zeros(config.rank, d_in))

    def trained(self) -> torch.Tensor:
        return self.A  # (r, d_in), placed in rows J

    def unscaled(self, x: torch.Tensor) -> torch.Tensor:
        h = F.linear(x, self.A)  # (..., r)
        return h.new_zeros(*h.shape[:-1], self.d_out).index_add_(-1, self.indices, h)

    def add_delta(self, y: torch.Tensor, x: torch.Tensor, weight: float) -> torch.Tensor:
        # Scatter the r-wide update straight into the base output: no (..., d_out) delta tensor.
        return y.index_add_(-1, self.indices, F.linear(x, self.A).to(y.dtype), alpha=weight * self.scale)
