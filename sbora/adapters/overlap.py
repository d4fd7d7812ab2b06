"""What two adapters of one layer share: their weights (overlap) and their outputs (cross-talk) (docs/architecture.md §4).

**Weight overlap**, from ``lora_factors()`` alone. For two adapters a, b of one layer,
ΔW_a = s_a·B_a A_a and ΔW_b = s_b·B_b A_b:

    interference(a, b) = min(‖ΔW_a ΔW_bᵀ‖, ‖ΔW_aᵀ ΔW_b‖) / (‖ΔW_a‖·‖ΔW_b‖)   ∈ [0, 1]   (Frobenius norms)

It is 0 when the two updates read orthogonal input directions (A_a A_bᵀ = 0: SBoRA-FA or ortho
in different slots) or write orthogonal output directions (B_aᵀ B_b = 0: SBoRA-FB in different
slots). Then the two updates live in disjoint parts of W: merging one never changes the
other's entries, and the composition W + ΔW_a + ΔW_b holds each update exactly as trained.
That is all it guarantees. It does **not** mean the outputs leave each other alone: on
concept a's inputs x the composed layer adds ΔW_b x beside ΔW_a x, and ΔW_b x is zero only if
x has nothing in the input directions b reads (SBoRA-FA: x[I_b] = 0), which real activations
do not satisfy. For ortho and LoRA the first term is ‖A_a A_bᵀ‖ seen through the trained B's;
two LoRAs from the same seed start from the same A and score high. Everything is computed in
factor space (k×k Gram matrices, float64), never as a d_out×d_in product, so a report over a
whole UNet is cheap. An adapter whose update is zero (untrained, or weight 0) interferes with
nothing: 0.

``shared_indices`` counts the columns (SBoRA-FA) or rows (SBoRA-FB) two standard-basis
adapters of the same kind both write: 0 for different slots of one seed, r for the same slot.

**Output cross-talk on calibration inputs** measures what the weight overlap cannot: how large
adapter j's output is on the inputs adapter i is used on, relative to i's own output there.
With X_i the (n × d_in) inputs a layer sees while adapter i alone runs on its own calibration
inputs (a concept's prompts, a task's examples) and G_i = X_iᵀ X_i their Gram matrix:

    crosstalk(j on i) = ‖ΔW_j X_iᵀ‖ / ‖ΔW_i X_iᵀ‖ = sqrt(tr(ΔW_j G_i ΔW_jᵀ) / tr(ΔW_i G_i ΔW_iᵀ))

and tr(ΔW G ΔWᵀ) = s²·tr((BᵀB)(A G Aᵀ)): k×d_in and k×k products, never d_out×d_in. It is 0
exactly when ΔW_j vanishes on every input i's layer saw (e.g. SBoRA-FA j reads only columns
that are zero in all of X_i); ≈1 means the composed layer adds, on i's own inputs, an output
change of j as large as i's own. Disjoint slots keep the weight overlap at 0 but not this:
for two LLM task adapters in different slots, ‖ΔW_b X_a‖/‖ΔW_a X_a‖ on task a's inputs was
1.15 (SBoRA-FA), 1.07 (FB), 0.96 (ortho) and 1.27 (LoRA). The ratio is for the updates at weight 1; at composition weights w it scales by w_j/w_i.
It is directed (j on i differs from i on j) and, being measured on the layers' own inputs,
says how much each layer's output changes, not how the image or the answer changes after the
layers that follow. ``calibration_energies`` collects the G_i with forward pre-hooks on the
adapted layers (``AdaptedLinear``'s base input, float64 sums; one d_in×d_in matrix per layer
at a time, reduced to a number per adapter as soon as i's run ends), ``crosstalk_rows`` turns
them into per-layer rows and ``crosstalk_summary`` into one line per directed pair.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping
from itertools import combinations

import torch
from torch import nn

from .base import Core
from .inject import active_adapters, adapted_layers

# What each measure guarantees, in words for reports (JSON "meaning", Markdown under the tables).
WEIGHT_OVERLAP_MEANING = (
    "Weight overlap (interference, 0..1, from the adapters' factors): how much two adapters' updates share the same parts "
    "of the weights. 0 (different slots of one seed) guarantees that each update sits in its own columns, rows or "
    "orthogonal directions of W, exactly as trained, and that merging one never changes the other's entries. It says "
    "nothing about the outputs."
)
CROSSTALK_MEANING = (
    "Output cross-talk on calibration inputs: |dW_j X_i| / |dW_i X_i| per layer, X_i the inputs the layer sees while "
    "adapter i alone runs on its calibration inputs: how large adapter j's change of the layer's output is on i's own "
    "inputs, relative to i's own change (updates at weight 1; at weights w it scales by w_j/w_i). 0 means j leaves i's "
    "outputs alone on those inputs; about 1 means j changes them as much as i does. Disjoint slots do not make it 0: "
    "real activations have something in every input direction."
)


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


# ------------------------------------------------------------------------------ output cross-talk


@torch.no_grad()
def output_energy(core: Core, gram: torch.Tensor) -> float:
    """‖ΔW Xᵀ‖²_F = tr(ΔW G ΔWᵀ) = s²·tr((BᵀB)(A G Aᵀ)) for G = XᵀX (d_in × d_in), from the factors."""
    A, B, s = core.lora_factors()  # A (k, d_in), B (d_out, k)
    A, B, s = A.detach().to(gram.device, torch.float64), B.detach().to(gram.device, torch.float64), float(s)
    inner = (A @ gram.to(torch.float64)) @ A.T  # (k, k)
    return s * s * max(((B.T @ B) * inner).sum().item(), 0.0)  # both k×k matrices symmetric: tr(PQ) = Σ P∘Q


def crosstalk(own: Core, other: Core, gram: torch.Tensor) -> float | None:
    """‖ΔW_other X‖ / ‖ΔW_own X‖ on inputs with Gram matrix `gram` (None where `own` changes nothing there)."""
    mine = output_energy(own, gram)
    return math.sqrt(output_energy(other, gram) / mine) if mine > 0 else None


class GramHooks:
    """Forward pre-hooks that add every input batch x (..., d_in) of `layers` to G = XᵀX (float64) and count the rows.

    ``with GramHooks(layers) as grams:`` ... ``grams.grams[key]``, ``grams.rows[key]``; the hooks
    are removed on exit. A layer never reached keeps G = 0 and 0 rows.
    """

    def __init__(self, layers: Mapping[object, nn.Module]):
        self.layers = dict(layers)
        self.grams: dict[object, torch.Tensor] = {}
        self.rows: dict[object, int] = {}
        self._handles: list = []

    def _hook(self, key):
        def hook(layer, args):
            x = args[0].detach().reshape(-1, args[0].shape[-1]).to(torch.float64)  # (n, d_in)
            gram = self.grams.get(key)
            if gram is None:
                gram = self.grams[key] = torch.zeros(x.shape[1], x.shape[1], dtype=torch.float64, device=x.device)
            gram.addmm_(x.T, x)
            self.rows[key] = self.rows.get(key, 0) + x.shape[0]
        return hook

    def __enter__(self) -> GramHooks:
        self._handles = [layer.register_forward_pre_hook(self._hook(key)) for key, layer in self.layers.items()]
        return self

    def __exit__(self, *exc) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []


def calibration_energies(models: Mapping[str, nn.Module], runs: Mapping[str, tuple[float, Callable[[], object]]],
                         others: Iterable[str] | None = None) -> dict[str, dict[tuple[str, str], dict]]:
    """Run each adapter i of `runs` on its calibration inputs and measure every adapter's output energy on them.

    `models`: part name -> model (e.g. "unet", "text_encoder"; or one LLM); `runs`: adapter i ->
    (weight, run): run() is called with only i selected at that weight (``active_adapters``)
    while forward pre-hooks collect G_i = X_iᵀX_i on every layer where i has a core. Right after
    i's run each G_i is reduced to ‖ΔW_j X_iᵀ‖² for every adapter j of the layer (`others`:
    only those, plus i) and dropped, so at most one run's Gram matrices exist at a time.

    Returns ``{i: {(part, path): {"input_rows": n, "energy": {j: ‖ΔW_j X_iᵀ‖²}}}}`` (weight 1 updates).
    """
    wanted = None if others is None else set(others)
    out: dict[str, dict[tuple[str, str], dict]] = {}
    parts = list(models.values())
    for name, (weight, run) in runs.items():
        layers = {(part, path): layer for part, model in models.items() for path, layer in adapted_layers(model, name).items()}
        with torch.no_grad(), GramHooks(layers) as hooks, active_adapters(parts, {name: weight}):
            run()
        result = {}
        for key, layer in layers.items():
            gram = hooks.grams.pop(key, None)
            if gram is None:
                continue
            names = [j for j in layer.cores if j == name or wanted is None or j in wanted]
            result[key] = {"input_rows": hooks.rows[key], "energy": {j: output_energy(layer.cores[j], gram) for j in names}}
            del gram
        out[name] = result
    return out


def crosstalk_rows(energies: Mapping[str, Mapping[tuple[str, str], dict]], names: Iterable[str]) -> list[dict]:
    """One row per (layer, ordered pair i ≠ j of `names` measured on that layer): ``{"part", "layer", "inputs": i,
    "update": j, "crosstalk": ‖ΔW_j X_i‖/‖ΔW_i X_i‖ (None where ΔW_i X_i = 0), "own_rms", "cross_rms", "input_rows"}``;
    the rms values are the norms per input row (‖ΔW X_iᵀ‖/sqrt(n)). Pairs ordered as `names`, layers as collected."""
    names = list(dict.fromkeys(names))
    rows = []
    for a, b in combinations(names, 2):
        for i, j in ((a, b), (b, a)):
            for (part, path), layer in (energies.get(i) or {}).items():
                if j not in layer["energy"] or i not in layer["energy"]:
                    continue
                own, cross, n = layer["energy"][i], layer["energy"][j], max(layer["input_rows"], 1)
                rows.append({"part": part, "layer": path, "inputs": i, "update": j,
                             "crosstalk": math.sqrt(cross / own) if own > 0 else None,
                             "own_rms": math.sqrt(own / n), "cross_rms": math.sqrt(cross / n), "input_rows": layer["input_rows"]})
    return rows


def crosstalk_summary(rows: Iterable[dict]) -> list[dict]:
    """Per directed pair (inputs i, update j): ``{"inputs", "update", "layers", "median", "max", "worst_layer", "overall"}``.

    median and max are over the layers where the ratio is defined; overall is
    sqrt(Σ_layers ‖ΔW_j X_i‖² / Σ_layers ‖ΔW_i X_i‖²) (layers with larger outputs weigh more);
    all None where i's update is zero on every layer.
    """
    groups: dict[tuple[str, str], list[dict]] = {}
    for row in rows:
        groups.setdefault((row["inputs"], row["update"]), []).append(row)
    out = []
    for (i, j), group in groups.items():
        rated = sorted((r for r in group if r["crosstalk"] is not None), key=lambda r: r["crosstalk"])
        own = sum(r["own_rms"] ** 2 * r["input_rows"] for r in group)
        cross = sum(r["cross_rms"] ** 2 * r["input_rows"] for r in group)
        mid = len(rated) // 2
        median = None if not rated else (rated[mid]["crosstalk"] if len(rated) % 2 else (rated[mid - 1]["crosstalk"] + rated[mid]["crosstalk"]) / 2)
        worst = rated[-1] if rated else None
        out.append({"inputs": i, "update": j, "layers": len(group), "median": median,
                    "max": worst["crosstalk"] if worst else None, "worst_layer": f"{worst['part']}.{worst['layer']}" if worst else None,
                    "overall": math.sqrt(cross / own) if own > 0 else None})
    return out
