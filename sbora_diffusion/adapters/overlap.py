"""How much two adapters on one layer can interfere, from their ``lora_factors()`` alone (DESIGN.md §4).

For two adapters a, b of one layer, ΔW_a = s_a·B_a A_a and ΔW_b = s_b·B_b A_b:

    interference(a, b) = min(‖ΔW_a ΔW_bᵀ‖, ‖ΔW_aᵀ ΔW_b‖) / (‖ΔW_a‖·‖ΔW_b‖)   ∈ [0, 1]   (Frobenius norms)

It is 0 when the two updates read orthogonal input directions (A_a A_bᵀ = 0: SBoRA-FA or ortho
in different slots) or write orthogonal output directions (B_aᵀ B_b = 0: SBoRA-FB in different
slots): then W + ΔW_a + ΔW_b applies each update as if the other were absent. For ortho and
LoRA the first term is ‖A_a A_bᵀ‖ seen through the trained B's; two LoRAs from the same seed
start from the same A and score high. Everything is computed in factor space (k×k Gram
matrices, float64), never as a d_out×d_in product, so a report over a whole UNet is cheap.
An adapter whose update is zero (untrained, or weight 0) interferes with nothing: 0.

``shared_indices`` counts the columns (SBoRA-FA) or rows (SBoRA-FB) two standard-basis
adapters of the same kind both write: 0 for different slots of one seed, r for the same slot.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from itertools import combinations

import torch
from torch import nn

from .base import Core
from .inject import adapted_layers


def _factors(core: Core, device: torch.device | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    A, B, _ = core.lora_factors()  # A (k, d_in), B (d_out, k)
    return A.detach().to(device or A.device, torch.float64), B.detach().to(device or A.device, torch.float64)


@torch.no_grad()
def interference(a: Core, b: Core) -> float:
    """min(‖ΔW_a ΔW_bᵀ‖, ‖ΔW_aᵀ ΔW_b‖) / (‖ΔW_a‖·‖ΔW_b‖), from the factors (see the module docstring)."""
    A1, B1 = _factors(a)
    A2, B2 = _factors(b, A1.device)
    K1, K2 = A1 @ A1.T, A2 @ A2.T  # (k1, k1), (k2, k2): Gram matrices of the input factors
    G1, G2 = B1.T @ B1, B2.T @ B2  # (k1, k1), (k2, k2): Gram matrices of the output factors
    # ‖s·B A‖² = s²·tr(G K); the factors' scales cancel in the ratio, so they are left out.
    norm = ((G1 * K1).sum().clamp_min(0) * (G2 * K2).sum().clamp_min(0)).sqrt()
    if norm == 0:
        return 0.0
    X = B1 @ (A1 @ A2.T)  # (d_out, k2):  ΔW_a ΔW_bᵀ = X B2ᵀ,  ‖X B2ᵀ‖² = tr(X G2 Xᵀ)
    Y = (B1.T @ B2) @ A2  # (k1, d_in):   ΔW_aᵀ ΔW_b = A1ᵀ Y,  ‖A1ᵀ Y‖² = tr(Yᵀ K1 Y)
    rows = ((X @ G2) * X).sum().clamp_min(0).sqrt()
    cols = ((K1 @ Y) * Y).sum().clamp_min(0).sqrt()
    return (torch.minimum(rows, cols) / norm).item()


def shared_indices(a: Core, b: Core) -> int | None:
    """Columns (FA) or rows (FB) both adapters write; None unless both are standard-basis cores of the same kind."""
    axis = getattr(a, "axis", None)
    if axis is None or axis != getattr(b, "axis", None):
        return None
    return int(torch.isin(a.indices, b.indices.to(a.indices.device)).sum())


def overlap_rows(models: Mapping[str, nn.Module], names: Iterable[str]) -> list[dict]:
    """One row per (model part, layer, pair of `names` both on that layer):
    ``{"part", "layer", "pair": (a, b), "interference", "shared_indices"}``, in model order."""
    names = list(dict.fromkeys(names))
    rows = []
    for part, model in models.items():
        for path, layer in adapted_layers(model).items():
            present = [n for n in names if n in layer.cores]
            for a, b in combinations(present, 2):
                ca, cb = layer.cores[a], layer.cores[b]
                rows.append({"part": part, "layer": path, "pair": (a, b), "interference": interference(ca, cb),
                             "shared_indices": shared_indices(ca, cb)})
    return rows
