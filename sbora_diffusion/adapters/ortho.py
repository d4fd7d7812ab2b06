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
The basis is stored in the adapter file, so loading never depends on re-deriving it.
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
    # Drawn row by row, so G[:, :m] is the same whatever m a slot needs.
    G = torch.randn(m, d_in, generator=layer_generator(config.seed, path, "ortho-basis"), dtype=torch.float64).T
    Q, R = torch.linalg.qr(G)  # (d_in, m)
    Q = Q * torch.sign(torch.diagonal(R))  # unique QR: positive diag(R)
    return Q[:, config.slot * config.rank : m].T.contiguous().float()


class OrthoCore(Core):
    rank_bounded_by_both = False

    def __init__(self, d_in: int, d_out: int, config: AdapterConfig, path: str):
        super().__init__(d_in, d_out, config, path)
        self.register_buffer("A", orthogonal_rows(config, d_in, path))  # fixed, saved with the adapter
        self.B = nn.Parameter(torch.zeros(d_out, config.rank))

    def unscaled(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(F.linear(x, self.A), self.B)  # (..., r) -> (..., d_out)

    def delta_weight(self) -> torch.Tensor:
        return (self.B @ self.A) * self.scale
