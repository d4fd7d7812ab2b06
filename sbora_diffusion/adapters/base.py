"""The adapter-core interface and the deterministic per-layer index scheme (DESIGN.md §2-3).

A core knows only shapes and tensors: it never imports diffusers or transformers. For a
frozen base ``y = W x`` with ``W ∈ R^{d_out×d_in}`` it provides

    delta(x)          -> ΔY = s·(ΔW x)   for x of shape (..., d_in)   # (..., d_out)
    delta_weight()    -> ΔW·s            # (d_out, d_in), dense: for tests and export
    merge_into(W, w)  :  W += w·s·ΔW     (in place; SBoRA touches only r columns/rows)
    unmerge_from(W, w):  W -= w·s·ΔW

where s = alpha/r (alpha/sqrt(r) with rsLoRA) and x is already the dropout-applied input.
A core with ``fuses_base`` also provides ``fused_linear(x, base, w) = base(x) + w·ΔY`` as one
op, which ``AdaptedLinear`` uses when it is the layer's only branch on a frozen float base.
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

    # LoRA-like cores have both factors of size r; SBoRA/ortho check their own dimension via slots.
    rank_bounded_by_both = True
    fuses_base = False

    def unscaled(self, x: torch.Tensor) -> torch.Tensor:
        """ΔY / s. # (..., d_in) -> (..., d_out)"""
        raise NotImplementedError

    def delta_weight(self) -> torch.Tensor:
        raise NotImplementedError

    def delta(self, x: torch.Tensor) -> torch.Tensor:
        return self.unscaled(x) * self.scale

    def add_delta(self, y: torch.Tensor, x: torch.Tensor, weight: float) -> torch.Tensor:
        """y + weight·ΔY, in place on the (fresh) base output: no second output-sized tensor, s folded into alpha."""
        return y.add_(self.unscaled(x), alpha=weight * self.scale)

    @torch.no_grad()
    def merge_into(self, W: torch.Tensor, weight: float = 1.0) -> None:
        W.add_(self.delta_weight().to(W.dtype), alpha=weight)

    @torch.no_grad()
    def unmerge_from(self, W: torch.Tensor, weight: float = 1.0) -> None:
        self.merge_into(W, -weight)
