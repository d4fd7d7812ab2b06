"""Custom Diffusion's update (Kumari et al., "Multi-Concept Customization of Text-to-Image
Diffusion", CVPR 2023): the cross-attention key and value projections trained in full.

    ΔY = ΔW x',  ΔW ∈ R^{d_out×d_in} trained from zeros (no low-rank factorization, s = 1),

on ``attn2.to_k`` and ``attn2.to_v`` of the UNet (the method's YAML targets them; the paper's
modifier token is the trainer's concept token, its regularization images the trainer's prior
preservation). The file stores ΔW itself. ``lora_factors()`` is exact at full rank: A = I
(d_in×d_in), B = ΔW, s = 1; an exporter that wants a lower rank takes an SVD of ΔW and says so.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .base import Core
from .config import AdapterConfig


class DenseCore(Core):
    rank_bounded_by_both = False  # no rank: the whole ΔW trains

    def __init__(self, d_in: int, d_out: int, config: AdapterConfig, path: str):
        super().__init__(d_in, d_out, config, path)
        self.scale = 1.0  # ΔW is the update itself; alpha/rank do not apply
        self.delta_W = nn.Parameter(torch.zeros(d_out, d_in))

    def unscaled(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(self.dropout(x), self.delta_W)  # (..., d_out)

    def lora_factors(self) -> tuple[torch.Tensor, torch.Tensor, float]:
        return torch.eye(self.d_in, dtype=self.delta_W.dtype, device=self.delta_W.device), self.delta_W, 1.0

    def delta_weight(self) -> torch.Tensor:
        return self.delta_W
