"""DiffLoRA: a differential low-rank adapter (positive minus weighted negative branch).

    ΔY = s·(B_pos A_pos x' − τ·B_neg A_neg x'),   τ a learnable scalar per layer,

computed fused as one pair of matmuls: A_cat = [A_pos; A_neg] ∈ R^{2r×d_in},
B_cat = [B_pos, −τ·B_neg] ∈ R^{d_out×2r}, ΔY = s·B_cat(A_cat x').

Initialization (the public reference gives none): both A's Kaiming-uniform like LoRA, both
B's zero (a no-op at start), τ = 0.5 by default (``tau``). τ must start non-zero: with
B_neg = 0, τ = 0 would give B_neg a zero gradient and τ a zero gradient, a dead branch;
0.5 lets the negative branch learn at half the positive one's step from the first update.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .base import Core, kaiming_, layer_generator
from .config import AdapterConfig


class DiffLoRACore(Core):
    def __init__(self, d_in: int, d_out: int, config: AdapterConfig, path: str):
        super().__init__(d_in, d_out, config, path)
        self.A = nn.Parameter(kaiming_(torch.empty(2 * config.rank, d_in), layer_generator(config.seed, path, "difflora-A")))
        self.B = nn.Parameter(torch.zeros(d_out, 2 * config.rank))  # [B_pos, B_neg]
        self.tau = nn.Parameter(torch.tensor(float(config.tau)))

    def fused_B(self) -> torch.Tensor:
        r = self.rank
        signs = torch.cat([self.tau.new_ones(r), (-self.tau).expand(r)])  # (2r,) = [1.., -τ..]
        return self.B * signs  # (d_out, 2r) = B_cat

    def unscaled(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(F.linear(self.dropout(x), self.A), self.fused_B())  # (..., 2r) -> (..., d_out)

    def lora_factors(self) -> tuple[torch.Tensor, torch.Tensor, float]:
        return self.A, self.fused_B(), self.scale  # rank 2r, τ folded into B
