"""The adapter-core interface and the deterministic per-layer index scheme (DESIGN.md §2-3).

A core knows only shapes and tensors: it never imports diffusers or transformers. For a
frozen base ``y = W x`` with ``W ∈ R^{d_out×d_in}`` it provides

    lora_factors()    -> (A, B, s) with ΔW = s·B·A exactly   # A (k, d_in), B (d_out, k)
    delta(x)          -> ΔY = ΔW x'  for x of shape (..., d_in)   # (..., d_out)
    delta_weight()    -> ΔW = s·B·A    # (d_out, d_in), dense: for tests and reports
    merge_into(W, w)  :  W += w·ΔW     (in place; SBoRA touches only r columns/rows)
    unmerge_from(W, w):  W -= w·ΔW     (SBoRA: restores the r columns/rows bit-exactly)

where s = alpha/r (alpha/sqrt(r) with rsLoRA) and x' = dropout(x) is the core's own dropout
of the branch input (SBoRA-FA gathers its r columns first, then drops: the same per-element
result, without a full-width copy kept for backward). ``lora_factors`` is the one exact view
of every method as a LoRA: export, overlap reports and Delta-LoRA's compact file use it.

Cores are float32 whatever the base's dtype (a 1e-4 update vanishes in bf16); inputs are
cast to the core's dtype. A core with ``fuses_base`` also provides ``fused_linear(x, base, w)
= base(x) + w·ΔY`` as one op, which ``AdaptedLinear`` uses when it is the layer's only branch
on a frozen float base.
"""

from __future__ import annotations

import hashlib

import torch
from torch import nn

from ..configuration import ConfigError
from .config import AdapterConfig


def layer_generator(seed: int, path: str, role: str) -> torch.Generator:
    """A CPU generator seeded from (global seed, module path, role): same inputs, same draws."""
    digest = hashlib.sha256(f"{seed}/{path}/{role}".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") & ((1 << 63) - 1))


def check_slot(config: AdapterConfig, dim: int, what: str, path: str) -> None:
    needed = (config.slot + 1) * config.rank
    if needed > dim:
        fits = dim // config.rank
        hint = f"slots 0..{fits - 1} fit at rank {config.rank}" if fits else f"the rank must be at most {dim}"
        raise ConfigError(f"{path}: slot {config.slot} with rank {config.rank} needs {needed} {what} but the layer has {dim}; {hint}")


def slot_indices(config: AdapterConfig, dim: int, path: str, role: str) -> torch.Tensor:
    """Slot k's r indices out of a per-layer permutation P of range(dim): P[k·r:(k+1)·r], sorted.

    Different slots of the same layer (same seed, same path) are disjoint by construction.
    """
    check_slot(config, dim, f"{role} indices", path)
    perm = torch.randperm(dim, generator=layer_generator(config.seed, path, role))
    return perm[config.slot * config.rank : (config.slot + 1) * config.rank].sort().values


def kaiming_(tensor: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """LoRA's (and peft's) init for A: Kaiming-uniform with a=sqrt(5), seeded per layer."""
    return nn.init.kaiming_uniform_(tensor, a=5**0.5, generator=generator)


class Core(nn.Module):
    """Base class of every adapter core: subclasses define ``unscaled`` and ``delta_weight``."""

    def __init__(self, d_in: int, d_out: int, config: AdapterConfig, path: str):
        super().__init__()
        if config.rank > min(d_in, d_out) and self.rank_bounded_by_both:
            raise ConfigError(
                f"{path}: rank {config.rank} exceeds min(d_in={d_in}, d_out={d_out}); a {config.method} adapter "
                f"of that rank cannot be low-rank: lower --rank"
            )
        self.config = config
        self.d_in, self.d_out, self.rank, self.scale = d_in, d_out, config.rank, config.scale
        self.dropout = nn.Dropout(config.dropout) if config.dropout > 0 else nn.Identity()

    # LoRA-like cores have both factors of size r; SBoRA/ortho check their own dimension via slots.
    rank_bounded_by_both = True
    fuses_base = False

    def unscaled(self, x: torch.Tensor) -> torch.Tensor:
        """ΔY / s, dropout included. # (..., d_in) -> (..., d_out)"""
        raise NotImplementedError

    def lora_factors(self) -> tuple[torch.Tensor, torch.Tensor, float]:
        """(A, B, s) with ΔW = s·B·A exactly. # A (k, d_in), B (d_out, k)"""
        raise NotImplementedError

    def delta_weight(self) -> torch.Tensor:
        A, B, s = self.lora_factors()
        return (B @ A) * s  # (d_out, d_in)

    def delta(self, x: torch.Tensor) -> torch.Tensor:
        return self.unscaled(x) * self.scale

    def add_delta(self, y: torch.Tensor, x: torch.Tensor, weight: float) -> torch.Tensor:
        """y + weight·ΔY, in place on the (fresh) base output: no second output-sized tensor, s folded into alpha."""
        return y.add_(self.unscaled(x), alpha=weight * self.scale)

    @torch.no_grad()
    def merge_into(self, W: torch.Tensor, weight: float = 1.0) -> None:
        # Dense ΔW: unmerge subtracts the same rounded tensor, so it restores W within one
        # rounding of |ΔW| per entry (1e-6 relative in fp32; about |ΔW|·2⁻⁸ in bf16).
        W.add_(self.delta_weight().to(W.dtype), alpha=weight)

    @torch.no_grad()
    def unmerge_from(self, W: torch.Tensor, weight: float = 1.0) -> None:
        self.merge_into(W, -weight)

    @torch.no_grad()
    def scale_(self, factor: float) -> None:
        """ΔW ← factor·ΔW in place (DiffoRA folds a module's gate into its adapter with this).

        ΔW = s·B·A is linear in each factor, so scaling the one that is this core's own trained
        tensor scales ΔW: B for LoRA, ortho, SBoRA-FA; A for SBoRA-FB and DiffLoRA (τ is in B).
        """
        A, B, _ = self.lora_factors()
        for factor_tensor in (B, A):
            if any(factor_tensor is p for p in self.parameters()):
                factor_tensor.mul_(factor)
                return
        raise NotImplementedError(f"{type(self).__name__}: neither factor of lora_factors() is its trained tensor; give it its own scale_")
