"""Multi-task composition: several task adapters merged into one LLM (the LLM side of multi-concept).

    python -m llm.compose --output outputs/llm/composed \
        --adapter outputs/llm/math/sbora-fa/adapter.safetensors,outputs/llm/facts/sbora-fa/adapter.safetensors

Adapters trained with the same seed in different slots (``--slot 0``, ``--slot 1``) touch
disjoint columns (SBoRA-FA), rows (SBoRA-FB) or orthogonal basis rows (ortho) of every
weight, so the merged model ``W + Σ_k w_k·ΔW_k`` applies each task's update without the
others interfering (DESIGN.md §4). Before merging, every pair is checked per layer:

    interference(i, j) = min(‖ΔW_i ΔW_jᵀ‖, ‖ΔW_iᵀ ΔW_j‖) / (‖ΔW_i‖·‖ΔW_j‖)

which is 0 when the two updates read orthogonal input directions or write orthogonal
output directions (disjoint SBoRA slots, ortho slots), and is reported as a warning
otherwise (plain LoRA, or the same slot twice). The merged model is a plain transformers
folder; score it with ``sbora-llm-evaluate --base <output> --task ...``.

From Python::

    compose(config: ComposeConfig, model=None, tokenizer=None) -> dict

returns ``{"output", "adapters": {name: file}, "interference": {"a+b": max over layers}}``.
"""

from __future__ import annotations

import json
import sys
import warnings
from dataclasses import dataclass, field
from itertools import combinations

from torch import nn
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from sbora_diffusion.adapters import adapted_layers
from sbora_diffusion.adapters.overlap import interference as layer_interference
from sbora_diffusion.configuration import ConfigError
from sbora_diffusion.fileio import write_json

from .cli import run_command
from .models import DEFAULT_BASE, load_adapters, load_base, save_merged

INTERFERENCE_TOLERANCE = 1e-6


@dataclass
class ComposeConfig:
    base: str = field(default=DEFAULT_BASE, metadata={"help": f"base model: '{DEFAULT_BASE}' (embedded SmolLM2 GGUF), a local folder or .gguf file, or a hub id"})
    adapter: list[str] = field(default_factory=list, metadata={"help": "two or more task adapter files to merge (comma-separated)"})
    weight: list[float] = field(default_factory=list, metadata={"help": "one weight per adapter (default: all 1.0)"})
    output: str = field(default="outputs/llm/composed", metadata={"help": "folder of the merged transformers model (plus compose.json)"})

    def validate(self) -> None:
        if len(self.adapter) < 2:
            raise ConfigError("give at least two --adapter files to compose")
        if self.weight and len(self.weight) != len(self.adapter):
            raise ConfigError(f"{len(self.weight)} weights for {len(self.adapter)} adapters; give one weight per adapter or none")


def interference(model: nn.Module, a: str, b: str) -> float:
    """Largest per-layer interference of adapters `a` and `b` over the layers both adapt (see module docstring;
    the one measure of ``adapters.overlap``, from the factors)."""
    layers = adapted_layers(model, a).values()
    return max((layer_interference(layer.cores[a], layer.cores[b]) for layer in layers if b in layer.cores), default=0.0)


def compose(config: ComposeConfig, model: PreTrainedModel | None = None, tokenizer: PreTrainedTokenizerBase | None = None) -> dict:
    """Load every adapter of `config` side by side, check them pairwise, merge them and save the model.

    Signature: ``compose(config: ComposeConfig, model=None, tokenizer=None) -> dict``.
    Adapters are named after their task (see ``models.load_adapters``); `model` is changed in place.
    """
    config.validate()
    if model is None or tokenizer is None:
        model, tokenizer = load_base(config.base)
    weights = config.weight or [1.0] * len(config.adapter)
    names = load_adapters(model, config.adapter, weights, config.base)
    scores = {f"{a}+{b}": interference(model, a, b) for a, b in combinations(names, 2)}
    for pair, value in scores.items():
        if value > INTERFERENCE_TOLERANCE:
            warnings.warn(
                f"adapters {pair} interfere (up to {value:.3g} per layer): train them with the same --seed in different --slot "
                "values of sbora-fa/sbora-fb/ortho for a clean composition", stacklevel=2,
            )
    output = save_merged(model, tokenizer, config.output)
    report = {"output": str(output), "adapters": names, "weights": weights, "interference": scores}
    write_json(output / "compose.json", report)
    return report


def main(argv: list[str] | None = None) -> int:
    return run_command(ComposeConfig, compose, "sbora-llm-compose", __doc__, argv, report=lambda r: print(json.dumps(r, indent=2)))


if __name__ == "__main__":
    sys.exit(main())
