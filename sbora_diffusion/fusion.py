r"""Gradient fusion (Gu et al., "Mix-of-Show: Decentralized Low-Rank Adaptation for Multi-Concept
Customization of Diffusion Models", NeurIPS 2023), solved in closed form.

    python -m sbora_diffusion.compose --config configs/compositions/robot_duck.yaml --fusion gradient

Given N single-concept adapters, every layer that any of them adapts (UNet and text encoder)
gets one fused weight that reproduces each concept's outputs on that concept's own inputs:

    W* = argmin_W Σ_i ‖W X_i − W_i X_i‖²_F,     W_i = W0 + w_i·ΔW_i   (concept i alone, at its weight)

X_i (d_in × n_i) is every input the layer sees while concept i alone renders its own prompts
(its file's eval prompts, else "a photo of {token} {class_word}"; one image per prompt, seed
0, with the composition's steps, guidance, size and negative prompt, guidance's unconditional
half included). A forward pre-hook on each adapted layer adds every batch to two running sums
(float64), so no activation is kept:

    S = Σ_i X_i X_iᵀ   (d_in × d_in)          T = Σ_i w_i·ΔW_i X_i X_iᵀ   (d_out × d_in)

and the normal equations ΔW* S = T give the fused update

    ΔW* = W* − W0 = T (S + λI)⁻¹,      λ = 1e-6 · tr(S)/d_in.

Mix-of-Show minimizes the same objective by gradient descent (L-BFGS from W0, layer by
layer); this is its exact minimizer. Gradient steps from W0 move W only along the captured
inputs, so they converge to the minimizer nearest W0, the λ → 0 limit of this solve: the small
ridge keeps W0 in directions no captured input visits and makes the solve well posed.

**When fusion equals the plain sum.** W_sum = W0 + Σ_j w_j·ΔW_j gives
W_sum X_i = W_i X_i + Σ_{j≠i} w_j·ΔW_j X_i, so W_sum has zero error, and is a minimizer,
exactly when ΔW_j X_i = 0 for every j ≠ i; then W* = W_sum if S is nonsingular (else the two
agree on every captured input and W* is the one nearest W0). Disjoint slots do not give this
by themselves: for SBoRA-FA ΔW_j X_i = ΔW_j[:, I_j] X_i[I_j], zero only where concept i's
inputs vanish on concept j's columns, which real activations do not (ortho: only where X_i ⊥
A_j's rows). So on real activations fusion departs from the orthogonal sum even for disjoint
slots, by removing those cross terms; for overlapping LoRAs the cross terms are large and
fusion removes most of them. ``Fused.rows`` reports both per layer.

Unlike Mix-of-Show's script, which fuses in three stages (the text encoder; then the
cross-attention keys and values on the fused text encoder's features of the concept tokens;
then the other UNet layers on features sampled with each concept's own layers), every layer's
inputs here come from one pass per concept in which concept i alone runs in every layer.

The fused update is an adapter of ``DenseCore`` (the ``custom-diffusion`` core: a dense ΔW per
layer) named ``fused-<hash of the concepts, weights and settings>``; the composition selects it
alone, at weight 1. Regions run it with their own prompts, as Mix-of-Show's regionally
controllable sampling runs its fused model. ``save_fused`` writes it as a concept adapter file
with every concept's token embeddings: ``Composer.load``, ``generate --adapter`` and
``sbora-export --merge-into`` (a merged diffusers pipeline) take it.

Cost per fused layer: S and T in float64, 8·d_in·(d_in + d_out) bytes while capturing; per
captured batch of n inputs 2·n·d_in·(d_in + d_out) more flops beside the layer's own; one
d_in³ solve; the fused file stores a dense d_out × d_in ΔW* in float32.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from sbora.adapters import AdapterConfig, active_adapters, adapted_layers, inject
from sbora.adapters.dense import DenseCore
from sbora.configuration import ConfigError

from .concept.adapter import save_concept_adapter
from .tokens import ConceptTokenEmbedding, resolve_token_ids

# λ relative to S's mean eigenvalue: far below the input directions that matter, far above float64 round-off.
RIDGE = 1e-6
METHOD = "gradient-fusion"  # the method fused files record
# The fused cores' config: the dense core (custom-diffusion's), whatever the concepts' methods.
FUSED_CONFIG = AdapterConfig(method="custom-diffusion")


class FusionError(ConfigError):
    """A fusion that cannot run as asked; the message says what to do."""


class LayerFit:
    """One layer's running sums: S = Σ_i X_i X_iᵀ, T = Σ_i w_iΔW_i X_i X_iᵀ, energy = Σ_i ‖w_iΔW_i X_i‖²."""

    def __init__(self, d_in: int, d_out: int, device: torch.device):
        self.S = torch.zeros(d_in, d_in, dtype=torch.float64, device=device)
        self.T = torch.zeros(d_out, d_in, dtype=torch.float64, device=device)
        self.energy = torch.zeros((), dtype=torch.float64, device=device)

    def add(self, x: torch.Tensor, dy: torch.Tensor | None) -> None:
        """A batch of inputs x (..., d_in) and the concept's own update of the outputs dy = w_iΔW_i x (..., d_out), None where it has none."""
        x = x.reshape(-1, x.shape[-1]).to(self.S)  # (n, d_in)
        self.S.addmm_(x.T, x)
        if dy is not None:
            dy = dy.reshape(-1, dy.shape[-1]).to(self.T)  # (n, d_out)
            self.T.addmm_(dy.T, x)
            self.energy += dy.square().sum()

    def solve(self, ridge: float = RIDGE) -> torch.Tensor:
        """ΔW* = T (S + λI)⁻¹ with λ = ridge·tr(S)/d_in; zero for a layer no input reached. # (d_out, d_in) float32"""
        d_in, trace = self.S.shape[0], self.S.trace()
        if trace == 0:
            return torch.zeros_like(self.T, dtype=torch.float32)
        A = self.S + ridge * trace / d_in * torch.eye(d_in, dtype=self.S.dtype, device=self.S.device)
        return torch.linalg.solve(A, self.T.T).T.float()  # A is symmetric: ΔW*·A = T  <=>  A·ΔW*ᵀ = Tᵀ

    def error(self, dW: torch.Tensor) -> float:
        """Σ_i ‖(W0 + ΔW) X_i − W_i X_i‖² from the sums alone: tr(ΔW S ΔWᵀ) − 2·tr(ΔW Tᵀ) + energy."""
        dW = dW.to(self.S)
        return max(((dW @ self.S) * dW).sum().item() - 2 * (dW * self.T).sum().item() + self.energy.item(), 0.0)


def capture(models: Mapping[str, nn.Module], runs: Mapping[str, tuple[float, Callable[[], object]]]) -> dict[tuple[str, str], LayerFit]:
    """One ``LayerFit`` per layer that any concept of `runs` adapts, keyed (part, module path).

    `models`: part name -> model (e.g. "unet", "text_encoder"); `runs`: concept -> (weight,
    run). Each run() is called with only its concept selected at its weight, while a forward
    pre-hook on every such layer adds the layer's inputs and the concept's own update of its
    outputs (none where the concept has no core).
    """
    layers = {(part, path): layer for part, model in models.items() for path, layer in adapted_layers(model).items()
              if any(name in layer.cores for name in runs)}
    fits = {key: LayerFit(layer.in_features, layer.out_features, layer.weight.device) for key, layer in layers.items()}
    current: dict[str, object] = {}

    def hook_for(key: tuple[str, str]):
        def hook(layer, args):
            name, weight = current["name"], current["weight"]
            x = args[0]
            core = layer.cores[name] if name in layer.cores else None
            dy = core.delta(x.to(next(core.parameters()).dtype)) * weight if core is not None else None  # (..., d_out)
            fits[key].add(x, dy)
        return hook

    handles = [layer.register_forward_pre_hook(hook_for(key)) for key, layer in layers.items()]
    try:
        with torch.no_grad():
            for name, (weight, run) in runs.items():
                current.update(name=name, weight=weight)
                with active_adapters(list(models.values()), {name: weight}):
                    run()
    finally:
        for handle in handles:
            handle.remove()
    return fits


def fused_cores(models: Mapping[str, nn.Module], runs: Mapping[str, tuple[float, Callable[[], object]]],
                ridge: float = RIDGE) -> tuple[dict[str, dict[str, DenseCore]], list[dict]]:
    """Capture (``capture``) and solve: {part: {path: DenseCore holding ΔW*}} and one report row per layer.

    A row holds the layer's energy Σ_i ‖w_iΔW_i X_i‖² and, relative to its square root, the
    output error on the concepts' own inputs of the plain sum (``sum_error``) and of the fused
    weight (``fused_error``); both None where the concepts do not change the layer's outputs.
    """
    fits = capture(models, runs)
    cores: dict[str, dict[str, DenseCore]] = {part: {} for part in models}
    rows = []
    for (part, path), fit in fits.items():
        layer = models[part].get_submodule(path)
        dW = fit.solve(ridge)  # (d_out, d_in)
        plain = sum(w * layer.cores[n].delta_weight().detach() for n, (w, _) in runs.items() if n in layer.cores)
        core = DenseCore(layer.in_features, layer.out_features, FUSED_CONFIG, path)
        with torch.no_grad():
            core.delta_W.copy_(dW)
        cores[part][path] = core
        energy = fit.energy.item()
        rows.append({"part": part, "layer": path, "energy": energy,
                     "sum_error": (fit.error(plain) / energy) ** 0.5 if energy > 0 else None,
                     "fused_error": (fit.error(dW) / energy) ** 0.5 if energy > 0 else None})
    return cores, rows


# ------------------------------------------------------------------------------------ on a composer


@dataclass
class Fused:
    """A fused adapter on a composer's pipeline."""

    name: str  # its adapter name in the pipeline
    members: dict[str, float]  # the concepts and weights it reproduces
    rows: list[dict] = field(repr=False)  # per layer, see ``fused_cores``
    seconds: float = 0.0  # capture and solve

    def summary(self) -> dict:
        """Layers, time, and the mean (over layers) relative output error of the plain sum and of the fused weights."""
        rated = [r for r in self.rows if r["energy"] > 0]
        worst = max(rated, key=lambda r: r["fused_error"], default=None)
        return {"name": self.name, "layers": len(self.rows), "seconds": round(self.seconds, 2),
                "sum_error": sum(r["sum_error"] for r in rated) / len(rated) if rated else 0.0,
                "fused_error": sum(r["fused_error"] for r in rated) / len(rated) if rated else 0.0,
                "worst_layer": f"{worst['part']}.{worst['layer']}" if worst else None}

    def to_json(self) -> dict:
        return {**self.summary(), "concepts": self.members, "ridge": RIDGE, "layers": self.rows}


def concept_prompts(concept) -> list[str]:
    """A loaded concept's own prompts: its eval prompts with its token and class word, else its regional prompt."""
    prompts = []
    for template in concept.eval_prompts:
        try:
            prompts.append(template.format(token=concept.token or "", class_word=concept.class_word or ""))
        except (KeyError, IndexError, ValueError):
            continue  # a hand-edited file's broken template: the others still serve
    return prompts or [concept.regional_prompt()]


def _token_table(concepts: list) -> tuple[str, str, list[torch.Tensor]] | None:
    """(token, mode, vectors per text encoder) holding every concept's learned token embeddings at once, or None if none has any."""
    learned = [c for c in concepts if c.vectors is not None]
    if not learned:
        return None
    modes = {c.token_mode for c in learned}
    if len(modes) > 1:
        raise FusionError(f"the concepts learned their tokens in different modes ({', '.join(sorted(modes))}); a fused adapter holds "
                          "one token table: compose concepts trained with one --token-mode")
    # Token pieces (new) or words (rare) tokenize one by one, so the joined token keeps each concept's vectors in order.
    return " ".join(c.token for c in learned), modes.pop(), [torch.cat(table) for table in zip(*(c.vectors for c in learned), strict=True)]


def fuse(composer, weights: Mapping[str, float], *, negative_prompt: str = "", steps: int = 50, guidance_scale: float = 7.5,
         height: int | None = None, width: int | None = None, images_per_prompt: int = 1, ridge: float = RIDGE) -> Fused:
    """Gradient-fuse the concepts `weights` ({name: weight}) of `composer` (a ``compose.Composer``) into one adapter on its pipeline.

    The keyword arguments are the sampler settings the concepts render their prompts with
    while their layers' inputs are captured. A fusion of the same concepts, weights and
    settings is reused; any other fused adapter is taken off first (one dense update per
    layer is as large as the layer). Changes the model: call it while no render runs.
    """
    if composer.merged:
        raise FusionError("a composition is merged into the weights: unmerge it before fusing")
    weights = dict(composer.selection(weights))
    if set(weights) - set(composer.concepts):
        raise FusionError(f"fuse loaded concepts, not fused adapters: {', '.join(sorted(set(weights) - set(composer.concepts)))}")
    members = [composer.concepts[n] for n in weights]
    _token_table(members)  # refused now, not after minutes of capture
    settings = dict(negative_prompt=negative_prompt, steps=steps, guidance_scale=guidance_scale, height=height, width=width)
    key = json.dumps([sorted(weights.items()), sorted(settings.items()), images_per_prompt, ridge])
    name = "fused-" + hashlib.sha256(key.encode()).hexdigest()[:10]
    if name in composer.fused:
        return composer.fused[name]
    for other in list(composer.fused):
        composer.unload(other)
    seeds = list(range(images_per_prompt))
    runs = {c.name: (weights[c.name], lambda c=c: [composer.render(p, seeds, {c.name: weights[c.name]}, batch_size=len(seeds), **settings)
                                                    for p in concept_prompts(c)])
            for c in members}
    start = time.perf_counter()
    models = composer.part_models
    cores, rows = fused_cores(models, runs, ridge)
    for part, model in models.items():
        if cores[part]:
            inject(model, FUSED_CONFIG, name=name, cores=cores[part])
    fused = Fused(name=name, members=weights, rows=rows, seconds=time.perf_counter() - start)
    composer.fused[name] = fused
    return fused


def save_fused(composer, fused: Fused, path: str | Path, concept: str = "fused") -> Path:
    """Write `fused` as a concept adapter file (``concept.adapter``): its dense ΔW* per layer and every member's token embeddings.

    `concept` is the name the file loads as. ``<path stem>.text_encoder<suffix>`` (SDXL: and
    ``.text_encoder_2``) holds the text-encoder layers when the concepts adapted any.
    """
    members = [composer.concepts[n] for n in fused.members]
    table = _token_table(members)
    prompts = [p for c in members for p in concept_prompts(c)]
    info = {"concept": concept, "method": METHOD, "fused_from": fused.members, "eval_prompts": [p.replace("{", "{{").replace("}", "}}") for p in prompts],
            "class_word": None, "token": table[0] if table else None}
    tokens = None
    if table is not None:
        token, mode, vectors = table
        pipe, kind = composer.pipe, composer.kind
        tokens = [ConceptTokenEmbedding(te.get_input_embeddings(), resolve_token_ids(tokenizer, token, mode), v)
                  for tokenizer, te, v in zip(kind.tokenizers(pipe), kind.text_encoders(pipe), vectors, strict=True)]
    return save_concept_adapter(composer.pipe, path, fused.name, base_model=composer.base_model, info=info, tokens=tokens,
                                token_mode=table[1] if table else "none")
