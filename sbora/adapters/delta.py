"""Delta-LoRA (Zi et al., "Delta-LoRA: Fine-Tuning High-Rank Parameters with the Delta of Low-Rank
Matrices", arXiv 2309.02411) on any core: the adapter the training procedure leaves behind.

The paper moves the frozen weight after every optimizer step t > K (no gradient, no optimizer
state for W, no dropout on the branch, so that W follows the branch's own updates):

    W ← W + λ·s·(B_{t+1}A_{t+1} − B_t A_t)

The sum telescopes: after step T, W_T = W_0 + λ·s·(B_T A_T − B_K A_K). Here W is never
written. The core keeps (A_K, B_K), its ``lora_factors()`` at step K (so any core works; the
one-hot A of SBoRA-FA keeps the update inside its r columns), and adds the telescoped update
as a branch whose current factors are detached:

    ΔY = s·B(A x) + λ·s·(sg(B) sg(A) − B_K A_K) x          # (..., d_out)

These are the in-place form's outputs and gradients (x gets the gradient of both terms, A and B
only that of the first), without a dense d_out×d_in write per step, without bf16 round-off
piling up in W, on a quantized base too, and with nothing but (A_K, B_K, λ) to checkpoint.
Before K the branch is off: λ is stored as 0. The adapter file holds the core's tensors plus
A_K, B_K and λ; the whole update ΔW = (1+λ)·s·B A − λ·s·B_K A_K has rank ≤ 2k (k: the core's
factor rank, r for LoRA) and is what ``lora_factors()`` returns, never a dense ΔW. Loading a
file runs this very forward, so it reproduces the trained model's outputs exactly.

``delta_core_class(LoRACore)`` is the core class with Delta-LoRA (``AdapterConfig.delta``):
the same tensors under the same names plus three buffers, so files, index checks and
exporters treat it as its core.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .base import Core


def _sync_lambda(module: DeltaLoRAMixin, incompatible_keys) -> None:
    module._lambda = float(module.delta_lambda)


class DeltaLoRAMixin:
    """Put before a core class: ``class DeltaLoRACore(DeltaLoRAMixin, LoRACore)``."""

    fuses_base = False  # the telescoped branch runs beside the core's own op

    def __init__(self, d_in: int, d_out: int, config, path: str):
        super().__init__(d_in, d_out, config, path)
        k = super().lora_factors()[0].shape[0]
        self.register_buffer("A_K", torch.zeros(k, d_in))  # the factors at step K
        self.register_buffer("B_K", torch.zeros(d_out, k))
        self.register_buffer("delta_lambda", torch.zeros(()))  # λ from step K on; 0 before (branch off)
        self._lambda = 0.0  # its value on the host: the forward never waits on the device to read it
        self.register_load_state_dict_post_hook(_sync_lambda)

    @torch.no_grad()
    def start_delta(self, lam: float, A_K: torch.Tensor | None = None, B_K: torch.Tensor | None = None) -> None:
        """Step K: the current factors (or the given ones, on resume) become (A_K, B_K); the branch turns on with λ."""
        A, B, _ = super().lora_factors()
        self.A_K.copy_(A if A_K is None else A_K)
        self.B_K.copy_(B if B_K is None else B_K)
        self.delta_lambda.fill_(lam)
        self._lambda = float(lam)

    @torch.no_grad()
    def weight_shift(self) -> float:
        """‖λ·s·(B A − B_K A_K)‖_F: how far the frozen weight has moved, from the factors' Gram matrices
        (‖M N‖² = Σ (MᵀM) ∘ (N Nᵀ), no d_out×d_in product)."""
        if not self._lambda:
            return 0.0
        A, B, s = super().lora_factors()
        M, N = torch.cat([B, -self.B_K], dim=1), torch.cat([A, self.A_K])  # (d_out, 2k), (2k, d_in)
        return abs(self._lambda * s) * float(((M.T @ M) * (N @ N.T)).sum().clamp(min=0).sqrt())

    def _branch(self, x: torch.Tensor) -> torch.Tensor:
        """(sg(B A) − B_K A_K) x as one rank-2k product. # (..., d_in) -> (..., d_out)"""
        A, B, _ = super().lora_factors()
        return F.linear(F.linear(x, torch.cat([A.detach(), self.A_K])), torch.cat([B.detach(), -self.B_K], dim=1))

    def unscaled(self, x: torch.Tensor) -> torch.Tensor:
        y = super().unscaled(x)
        return y + self._branch(x) * self._lambda if self._lambda else y

    def lora_factors(self) -> tuple[torch.Tensor, torch.Tensor, float]:
        A, B, s = super().lora_factors()
        if not self._lambda:
            return A, B, s
        lam = self._lambda
        return torch.cat([A, self.A_K]), torch.cat([B * (1 + lam), self.B_K * -lam], dim=1), s  # (2k, d_in), (d_out, 2k)

    # ΔY and ΔW include λ's telescoped part: through ``unscaled`` and ``lora_factors`` (a core's own
    # shortcuts, e.g. SBoRA-FB's scatter into y or SBoRA's sparse merge, know only its own factor).
    add_delta = Core.add_delta
    delta_weight = Core.delta_weight
    merge_into = Core.merge_into
    unmerge_from = Core.unmerge_from


_CLASSES: dict[type, type] = {}


def delta_core_class(core_cls: type[Core]) -> type[Core]:
    """`core_cls` with Delta-LoRA: one class per core class, ``Delta<Core>`` in this module."""
    cls = _CLASSES.get(core_cls)
    if cls is None:
        name = f"Delta{core_cls.__name__}"
        cls = type(name, (DeltaLoRAMixin, core_cls), {"__module__": __name__, "__qualname__": name})
        globals()[name] = cls  # found by name like any module-level class (pickle looks it up so)
        _CLASSES[core_cls] = cls
    return cls
