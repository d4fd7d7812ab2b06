"""SBoRA: Standard Basis LoRA (Po et al., "SBoRA: Low-Rank Adaptation with Regional Weight Updates").

One factor is a fixed set of standard-basis vectors, so only r columns (FA) or r rows (FB)
of W change, with half of LoRA's trainable parameters:

    SBoRA-FA:  A = rows e_i, i ∈ I (fixed);  ΔY = s·B x'[..., I];  ΔW = s·B in columns I.
    SBoRA-FB:  B = columns e_j, j ∈ J (fixed);  ΔY[..., J] += s·A x';  ΔW = s·A in rows J.

I and J are slot k's share of a per-layer permutation (base.slot_indices), so adapters in
different slots touch disjoint columns/rows. Everything is a gather or an ``index_add_``;
no one-hot matrix is ever built. For FA's training path (``add_delta``) a custom autograd
function (``_GatherLinearAdd``) keeps only the r-wide gathered input x'[..., I], adds
s·B x'[..., I] into the base output with one in-place ``addmm_`` (no output-sized
temporary), and in backward passes the output gradient straight through and writes the
input gradient with a single ``index_add_`` of the r-wide part (no autograd glue in
between); benchmarks/train_cost.py measures it against peft's LoRA.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .base import Core, slot_indices
from .config import AdapterConfig


class _GatherLinearAdd(torch.autograd.Function):
    """y += alpha·x[..., I] Bᵀ in place on the (fresh) base output y; saves only x[..., I]."""

    @staticmethod
    def forward(ctx, y: torch.Tensor, x: torch.Tensor, B: torch.Tensor, indices: torch.Tensor, alpha: float) -> torch.Tensor:
        r = indices.numel()
        xi = x.index_select(-1, indices).reshape(-1, r)  # (N, r)
        same_dtype = xi.dtype == B.dtype == y.dtype and not torch.is_autocast_enabled(y.device.type)
        if same_dtype and y.is_contiguous():
            y.view(-1, y.shape[-1]).addmm_(xi, B.t(), alpha=alpha)  # (N, d_out), fused multiply-add
        else:  # mixed dtypes or autocast: the matmul picks its dtype, the add casts into y's
            y.add_(F.linear(xi, B).view(*y.shape), alpha=alpha)
        ctx.mark_dirty(y)
        ctx.save_for_backward(xi, B, indices)
        ctx.alpha, ctx.x_shape, ctx.x_dtype = alpha, x.shape, x.dtype
        return y

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_y: torch.Tensor):
        xi, B, indices = ctx.saved_tensors
        g = grad_y.reshape(-1, grad_y.shape[-1]).to(B.dtype)  # (N, d_out)
        grad_x = grad_B = None
        if ctx.needs_input_grad[1]:  # only the r input columns I get a gradient
            grad_x = grad_y.new_zeros(ctx.x_shape, dtype=ctx.x_dtype)
            grad_x.view(-1, ctx.x_shape[-1]).index_add_(-1, indices, (g @ B).to(ctx.x_dtype), alpha=ctx.alpha)
        if ctx.needs_input_grad[2]:
            grad_B = torch.mm(g.t(), xi.to(B.dtype)).mul_(ctx.alpha)  # (d_out, r)
        return grad_y, grad_x, grad_B, None, None


class SBoRAFACore(Core):
    rank_bounded_by_both = False

    def __init__(self, d_in: int, d_out: int, config: AdapterConfig, path: str):
        super().__init__(d_in, d_out, config, path)
        self.register_buffer("indices", slot_indices(config, d_in, path, "input"))  # (r,) = I
        self.B = nn.Parameter(torch.zeros(d_out, config.rank))

    def unscaled(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x.index_select(-1, self.indices), self.B)  # (..., r) -> (..., d_out)

    def add_delta(self, y: torch.Tensor, x: torch.Tensor, weight: float) -> torch.Tensor:
        return _GatherLinearAdd.apply(y, x, self.B, self.indices, weight * self.scale)

    def delta_weight(self) -> torch.Tensor:
        return torch.zeros(self.d_out, self.d_in, dtype=self.B.dtype, device=self.B.device).index_add_(
            1, self.indices, self.B * self.scale
        )

    @torch.no_grad()
    def merge_into(self, W: torch.Tensor, weight: float = 1.0) -> None:
        W.index_add_(1, self.indices, (self.B * self.scale).to(W.dtype), alpha=weight)  # r columns only


class SBoRAFBCore(Core):
    rank_bounded_by_both = False

    def __init__(self, d_in: int, d_out: int, config: AdapterConfig, path: str):
        super().__init__(d_in, d_out, config, path)
        self.register_buffer("indices", slot_indices(config, d_out, path, "output"))  # (r,) = J
        self.A = nn.Parameter(torch.zeros(config.rank, d_in))

    def unscaled(self, x: torch.Tensor) -> torch.Tensor:
        h = F.linear(x, self.A)  # (..., r)
        return h.new_zeros(*h.shape[:-1], self.d_out).index_add_(-1, self.indices, h)

    def add_delta(self, y: torch.Tensor, x: torch.Tensor, weight: float) -> torch.Tensor:
        # Scatter the r-wide update straight into the base output: no (..., d_out) delta tensor.
        return y.index_add_(-1, self.indices, F.linear(x, self.A).to(y.dtype), alpha=weight * self.scale)

    def delta_weight(self) -> torch.Tensor:
        return torch.zeros(self.d_out, self.d_in, dtype=self.A.dtype, device=self.A.device).index_add_(
            0, self.indices, self.A * self.scale
        )

    @torch.no_grad()
    def merge_into(self, W: torch.Tensor, weight: float = 1.0) -> None:
        W.index_add_(0, self.indices, (self.A * self.scale).to(W.dtype), alpha=weight)  # r rows only
