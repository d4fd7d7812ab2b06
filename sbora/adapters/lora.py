"""LoRA (Hu et al., "LoRA: Low-Rank Adaptation of Large Language Models", arXiv 2106.09685).

    ΔY = s·B(A x'),  A ∈ R^{r×d_in} Kaiming-uniform (a=√5),  B ∈ R^{d_out×r} zeros,  s = α/r.

The same op order as peft's ``lora_B(lora_A(dropout(x))) * scaling``, so given the same A
and B the outputs are bit-identical to peft's LoRA (tests/test_adapters.py checks this).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .base import Core, kaiming_, layer_generator
from .config import AdapterConfig


class LoRACore(Core):
    def __init__(self, d_in: int, d_out: int, config: AdapterConfig, path: str):
        super().__init__(d_in, d_out, config, path)
        self.A = nn.Parameter(kaiming_(torch.empty(config.rank, d_in), layer_generator(config.seed, path, "lora-A")))
        self.B = nn.Parameter(torch.zeros(d_out, config.rank))

    def unscaled(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(F.linear(self.dropout(x), self.A), self.B)  # (..., r) -> (..., d_out)

    def lora_factors(self) -> tuple[torch.Tensor, torch.Tensor, float]:
        return self.A, self.B, self.scale
