"""Orthogonal Adaptation (Po et al., "Orthogonal Adaptation for Modular Customization of
Diffusion Models", CVPR 2024).

LoRA with a fixed A whose rows come from one random orthogonal basis Q ∈ R^{d_in×d_in}
shared by all concepts of a layer (seeded per (seed, module path)); concept k uses its own
r basis vectors, B is trained from zeros:

    ΔY = s·B(A_k x'),  A_k = Q[:, k·r:(k+1)·r]ᵀ,  so  A_i A_jᵀ = 0 for slots i ≠ j,

and several concepts merge as the plain sum W + Σ s·B_i A_i. Q's columns are exchangeable
(Haar measure), so taking slot k's block of consecutive columns is as random as taking
permuted ones, and a thin QR of the first (k+1)·r columns of the seeded Gaussian yields
exactly those columns of the full Q (Householder QR is column-causal) at O(d·m²) cost.

That needs G[:, :m] to be the same whatever m a slot draws. One seeded ``randn`` of m
columns does not guarantee it: torch's CPU sampler fills sizes that are not a multiple of
16 partly through another path, so the first columns of a draw depend on its size. Each
column therefore has its own generator, seeded from (seed, path, column), and is always
drawn at length d_in. The basis is also stored in the adapter file, so loading never
depends on re-deriving it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .base import Core, check_slot, layer_generator
from .config import AdapterConfig


def orthogonal_rows(config: AdapterConfig, d_in: int, path: str) -> torch.Tensor:
    """Slot k's r rows of the layer's shared orthogonal basis. # (r, d_in)"""
    check_slot(config, d_in, "basis vectors", path)
    m = (config.slot + 1) * config.rank
    columns = [torch.randn(d_in, generator=layer_generator(config.seed, path, f"ortho-basis/{j}"), dtype=torch.float64) for j in range(m)]
    Q, R = torch.linalg.qr(torch.stack(columns, dim=1))  # (d_in, m)
    Q = Q * torch.sign(torch.diagonal(R))  # unique QR: positive diag(R)
    return Q[:, config.slot * config.rank : m].T.contiguous().float()


class OrthoCore(Core):
    rank_bounded_by_both = False

    def __init__(self, d_in: int, d_out: int, config: AdapterConfig, path: str):
        super().__init__(d_in, d_out, config, path)
        self.register_buffer("A", orthogonal_rows(config, d_in, path))  # fixed, saved with the adapter
        self.B = nn.Parameter(torch.zeros(d_out, config.rank))

    def unscaled(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(F.linear(self.dropout(x), self.A), self.B)  # (..., r) -> (..., d_out)

    def lora_factors(self) -> tuple[torch.Tensor, torch.Tensor, float]:
        return self.A, self.B, self.scale
