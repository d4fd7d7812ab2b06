"""SBoRA: Standard Basis LoRA (Po et al., "SBoRA: Low-Rank Adaptation with Regional Weight Updates").

One factor is a fixed set of standard-basis vectors, so only r columns (FA) or r rows (FB)
of W change, with half of LoRA's trainable parameters:

    SBoRA-FA:  A = rows e_i, i ∈ I (fixed);  ΔY = s·B x'[..., I];  ΔW = s·B in columns I.
    SBoRA-FB:  B = columns e_j, j ∈ J (fixed);  ΔY[..., J] += s·A x';  ΔW = s·A in rows J.

I and J are slot k's share of a per-layer permutation (base.slot_indices), so adapters in
different slots of one rank (and seed and layout) touch disjoint columns/rows. With the
default ``blocks`` layout the permutation moves 16-wide blocks, so I and J are runs of
consecutive indices, and a merge on CPU copies and adds whole runs (strided slices of W)
instead of single entries: a switch writes ⌈r/16⌉ 64-byte lines of each row of W for FA
rather than up to r. Everything is a gather, an ``index_add_`` or a slice; no one-hot matrix
is ever built. For FA, autograd keeps only the r-wide gathered input x'[..., I]
(index_select's backward needs just the index and the input's shape).

On a frozen float base FA runs base and branch as one fused op (``BaseWithColumnBranch``):
the branch's share of the input gradient goes straight into the r columns I of the base's
input gradient, instead of autograd building a full-size zero gradient for the gather and
then adding two full-size gradients; on layers with many tokens per input feature the
branch is merged into a copy of W instead, so base and branch are one matmul each way.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd.function import once_differentiable

from .base import Core, index_runs, slot_indices
from .config import AdapterConfig


class _StandardBasisCore(Core):
    """Shared by FA and FB: ΔW is the trained factor placed along `axis` at `indices`."""

    rank_bounded_by_both = False
    axis: int  # 1: columns I (FA), 0: rows J (FB)

    def trained(self) -> torch.Tensor:
        raise NotImplementedError

    def one_hot(self) -> torch.Tensor:
        """The fixed factor as a dense one-hot matrix: (r, d_in) rows e_i (FA) or (d_out, r) columns e_j (FB)."""
        t = self.trained()
        dim = self.d_in if self.axis == 1 else self.d_out
        eye = t.new_zeros(self.rank, dim)
        eye[torch.arange(self.rank, device=t.device), self.indices] = 1.0
        return eye if self.axis == 1 else eye.T

    def lora_factors(self) -> tuple[torch.Tensor, torch.Tensor, float]:
        # s·B·A with a one-hot factor sums one non-zero product per entry: equal to delta_weight() bit for bit.
        return (self.one_hot(), self.B, self.scale) if self.axis == 1 else (self.A, self.one_hot(), self.scale)

    def delta_weight(self) -> torch.Tensor:
        t = self.trained()
        return t.new_zeros(self.d_out, self.d_in).index_add_(self.axis, self.indices, t * self.scale)

    def _swap_state(self) -> dict:
        """Plain per-core state of merges (kept out of nn.Module's attribute machinery: a switch is a hot path)."""
        state = self.__dict__.get("_swap")
        if state is None:
            state = self.__dict__["_swap"] = {}
        return state

    def _runs(self, W: torch.Tensor) -> list[tuple[int, int, int]] | None:
        """The index set as runs of consecutive indices (start, length, position), when slicing beats indexing.

        On CPU with runs of 4 or more on average (the ``blocks`` layout: one run per 16-wide
        block), each run is a strided slice of W that plain copies and adds stream through;
        ``index_select``/``index_copy_`` instead visit every element through the index. Cached
        per index tensor (a reload or ``.to`` makes a new one).
        """
        if W.device.type != "cpu":
            return None
        state = self._swap_state()
        key = (self.indices.data_ptr(), self.indices._version)
        if state.get("runs_key") != key:
            runs = index_runs(self.indices)
            state["runs_key"], state["runs"] = key, runs if 4 * len(runs) <= self.rank else None
        return state["runs"]

    def _update(self, dtype: torch.dtype) -> torch.Tensor:
        """s·(trained factor) in `dtype`: (d_out, r) for columns I (FA), (r, d_in) for rows J (FB). s = 1 costs no pass."""
        t = self.trained()
        return (t if self.scale == 1 else t * self.scale).to(dtype)

    @torch.no_grad()
    def merge_into(self, W: torch.Tensor, weight: float = 1.0) -> None:
        """W += weight·ΔW in r columns (FA) or rows (FB) only: a sparse add, never a dense B@A.

        The touched slices before and after are kept, so that ``unmerge_from`` can put the
        original values back bit-exactly (any dtype) as long as nobody changed them since.
        """
        update = self._update(W.dtype)
        runs = self._runs(W)
        if runs is None:
            before = W.index_select(self.axis, self.indices)  # the r slices: strided for FA
            after = before.add(update, alpha=weight)
            W.index_copy_(self.axis, self.indices, after)  # one gather and one scatter
        else:  # one slice per run of consecutive indices: before, after and the write stream through memory
            before, after, axis = [], [], self.axis
            for start, n, pos in runs:
                view = W.narrow(axis, start, n)
                b = view.clone()
                a = b.add(update if n == self.rank else update.narrow(axis, pos, n), alpha=weight)
                view.copy_(a)
                before.append(b)
                after.append(a)
        self._swap_state()["merged"] = (before, after, runs)

    @torch.no_grad()
    def unmerge_from(self, W: torch.Tensor, weight: float = 1.0) -> None:
        saved = self._swap_state().pop("merged", None)
        if saved is not None and saved[2] is None:
            if torch.equal(W.index_select(self.axis, self.indices), saved[1]):
                W.index_copy_(self.axis, self.indices, saved[0])
                return
        elif saved is not None:
            before, after, runs = saved
            views = [W.narrow(self.axis, start, n) for start, n, _ in runs]
            if all(torch.equal(v, a) for v, a in zip(views, after)):
                for v, b in zip(views, before):
                    v.copy_(b)
                return
        # Not merged by this core, or the slices changed since (another adapter merged on top): subtract.
        W.index_add_(self.axis, self.indices, self._update(W.dtype), alpha=-weight)


# Where to merge s·B into a copy of W instead of adding the branch in place. Merging costs two
# d_out×d_in weight copies per step; the in-place branch costs passes over y and g (on CPU as
# much as ~PASS_RANKS ranks of matmul work) plus its r-wide matmuls, all ∝ tokens·d_out. So merge
# when tokens·(r + PASS_RANKS) ≥ MERGE_RATIO·d_in: measured on CPU, merging wins from about there
# (SD UNet 32×32-level layers at ranks 4-64, 16×16 at rank 64) and loses well below.
PASS_RANKS = 16
MERGE_RATIO = 32


def merges_weight(x: torch.Tensor, rank: int, W: torch.Tensor) -> bool:
    """Whether BaseWithColumnBranch merges the branch into a copy of W for input x: tokens·(r +
    PASS_RANKS) ≥ MERGE_RATIO·d_in, and W in full precision (s·B added to a half-precision W
    would round away)."""
    tokens = x.numel() // x.shape[-1]
    return tokens * (rank + PASS_RANKS) >= MERGE_RATIO * x.shape[-1] and W.dtype in (torch.float32, torch.float64)


class BaseWithColumnBranch(torch.autograd.Function):
    """y = x Wᵀ + b + c·x[..., I] Bᵀ as one autograd node, for a frozen base (W, b get no gradient).

    Saves only x[..., I] (W, B and I are the layer's own tensors). Backward puts the branch's
    input gradient c·g B into columns I of the base's g W (in place, or through the merged
    weight W + c·B in columns I, whichever is cheaper; the same sum either way).
    """

    @staticmethod
    def forward(ctx, x, W, b, B, indices, c: float):
        x_i = x.index_select(-1, indices)  # (..., r)
        ctx.merge = merges_weight(x, B.shape[1], W)
        if ctx.merge:
            y = F.linear(x, W.index_add(1, indices, B, alpha=c), b)  # (..., d_out)
        else:
            y = F.linear(x, W, b)  # (..., d_out), a fresh contiguous tensor
            y.view(-1, y.shape[-1]).addmm_(x_i.reshape(-1, x_i.shape[-1]), B.t(), alpha=c)
        ctx.save_for_backward(x_i, W, B, indices)
        ctx.c, ctx.x_shape = c, x.shape
        return y

    @staticmethod
    @once_differentiable  # a second derivative through this op is refused with torch's clear error
    def backward(ctx, g):
        x_i, W, B, indices = ctx.saved_tensors
        g2 = g.reshape(-1, g.shape[-1])  # (N, d_out)
        grad_x = grad_B = None
        if ctx.needs_input_grad[0]:
            if ctx.merge:
                grad_x = g2 @ W.index_add(1, indices, B, alpha=ctx.c)  # (N, d_in)
            else:
                grad_x = (g2 @ W).index_add_(1, indices, g2 @ B, alpha=ctx.c)
            grad_x = grad_x.view(ctx.x_shape)
        if ctx.needs_input_grad[3]:
            grad_B = torch.mm(g2.t(), x_i.reshape(-1, x_i.shape[-1])).mul_(ctx.c)  # (d_out, r)
        return grad_x, None, None, grad_B, None, None


class SBoRAFACore(_StandardBasisCore):
    axis = 1
    fuses_base = True

    def __init__(self, d_in: int, d_out: int, config: AdapterConfig, path: str):
        super().__init__(d_in, d_out, config, path)
        self.register_buffer("indices", slot_indices(config, d_in, path, "input"))  # (r,) = I
        self.B = nn.Parameter(torch.zeros(d_out, config.rank))

    def trained(self) -> torch.Tensor:
        return self.B  # (d_out, r), placed in columns I

    def unscaled(self, x: torch.Tensor) -> torch.Tensor:
        # Gather, then drop: autograd keeps only the r-wide columns, never a full-width mask or copy.
        return F.linear(self.dropout(x.index_select(-1, self.indices)), self.B)  # (..., r) -> (..., d_out)

    def fused_linear(self, x: torch.Tensor, base: nn.Linear, weight: float) -> torch.Tensor:
        return BaseWithColumnBranch.apply(x, base.weight, base.bias, self.B, self.indices, weight * self.scale)


class SBoRAFBCore(_StandardBasisCore):
    axis = 0

    def __init__(self, d_in: int, d_out: int, config: AdapterConfig, path: str):
        super().__init__(d_in, d_out, config, path)
        self.register_buffer("indices", slot_indices(config, d_out, path, "output"))  # (r,) = J
        self.A = nn.Parameter(torch.zeros(config.rank, d_in))

    def trained(self) -> torch.Tensor:
        return self.A  # (r, d_in), placed in rows J

    def unscaled(self, x: torch.Tensor) -> torch.Tensor:
        h = F.linear(self.dropout(x), self.A)  # (..., r)
        return h.new_zeros(*h.shape[:-1], self.d_out).index_add_(-1, self.indices, h)

    def add_delta(self, y: torch.Tensor, x: torch.Tensor, weight: float) -> torch.Tensor:
        # Scatter the r-wide update straight into the base output: no (..., d_out) delta tensor.
        return y.index_add_(-1, self.indices, F.linear(self.dropout(x), self.A).to(y.dtype), alpha=weight * self.scale)
