"""AdapterConfig: the one typed config shared by every adapter method, plus target presets."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from ..configuration import ConfigError, check_fields, from_dict, load_yaml, override, resolve_named_config

# Module-path suffixes per model family (docs/architecture.md §2). A preset name may stand in `targets`.
TARGET_PRESETS: dict[str, list[str]] = {
    "sd-unet": ["to_q", "to_k", "to_v", "to_out.0"],
    "sd-unet-full": ["to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2"],
    "sd-unet-cross-kv": ["attn2.to_k", "attn2.to_v"],  # Custom Diffusion's trained projections
    # SDXL's UNet: the attention projections (attn1 and attn2) of every transformer block at every level,
    # as diffusers' SDXL DreamBooth-LoRA script targets; -full adds each block's proj_in/proj_out and
    # feed-forward, every linear layer of the transformer blocks as kohya's SDXL LoRAs. diffusers names
    # these layers as in SD 1.x, so the suffixes are SD's: the names say which base a file was made for.
    "sdxl-unet": ["to_q", "to_k", "to_v", "to_out.0"],
    "sdxl-unet-full": ["to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2"],
    "clip-text": ["q_proj", "k_proj", "v_proj", "out_proj"],
    "clip-text-mlp": ["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"],
    "llama": ["q_proj", "k_proj", "v_proj", "o_proj"],
    "llama-mlp": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
}

# SBoRA index layouts (base.layout_permutation), by name -> version. A file whose config has no
# layout was written before layouts were recorded: it is read as version 1, "scattered".
LAYOUTS: dict[str, int] = {"scattered": 1, "blocks": 2}
LEGACY_LAYOUT = "scattered"
# A config without a layout takes its method's default: scattered, the SBoRA paper's random
# indices, for every method. `blocks` is the fast hot-swap layout for SBoRA-FA (its r columns sit
# in every row of the row-major weight: runs of them cost ⌈r/16⌉ cache lines per row to merge,
# single columns up to r), opt-in until its quality is shown equal to the paper's layout: on the
# pocket base (robot, 5 seeds, 40 images each) blocks - scattered was -0.005 ± 0.088 CLIP-I, an
# interval far wider than any effect that matters (docs/benchmarks/hot_swap.md). SBoRA-FB's r rows
# are contiguous in memory whatever they are, so blocks gain it little (docs/architecture.md §3, issue #25).
DEFAULT_LAYOUTS: dict[str, str] = {}
# The core method names, which the registry (registry.py) declares and writes here when the package
# loads: a config checks its method without importing the registry, which imports the cores,
# which build on this module.
KNOWN_METHODS: set[str] = set()
DEFAULT_METHOD = "sbora-fa"  # what every command trains and composes unless told otherwise (one of adapters.registry.METHODS)


@dataclass
class AdapterConfig:
    method: str = field(default=DEFAULT_METHOD, metadata={"help": "adapter method: a core method of the registry (adapters/registry.py: METHODS)"})
    rank: int = field(default=16, metadata={"help": "rank r: indices per layer (SBoRA/ortho) or inner dimension (LoRA)"})
    alpha: float = field(default=16.0, metadata={"help": "scale numerator: s = alpha/r (alpha/sqrt(r) with --rslora)"})
    dropout: float = field(default=0.0, metadata={"help": "dropout on the adapter branch's input only"})
    rslora: bool = field(default=False, metadata={"help": "rank-stabilized scale alpha/sqrt(r)"})
    targets: list[str] = field(
        default_factory=lambda: ["sd-unet"],
        metadata={"help": "module-path suffixes to adapt, or presets: " + ", ".join(TARGET_PRESETS)},
    )
    target_regex: str | None = field(default=None, metadata={"help": "regex on full module paths (replaces targets)"})
    slot: int = field(default=0, metadata={"help": "slot k: SBoRA/ortho take indices P[k*r:(k+1)*r], disjoint across slots"})
    seed: int = field(default=0, metadata={"help": "seed of the per-layer index permutation (same seed => composable slots)"})
    layout: str | None = field(default=None, metadata={"help": "SBoRA index layout: blocks (slot k takes runs of 16-wide blocks of a per-layer block "
                                                                "permutation: a merge writes few cache lines) or scattered (single indices, as "
                                                                "adapters saved before layouts existed); none: scattered (blocks switches "
                                                                "SBoRA-FA concepts 10x+ faster). Slots of one layout compose"})
    tau: float = field(default=0.5, metadata={"help": "DiffLoRA: initial weight of the negative branch (learnable)"})
    delta: bool = field(default=False, metadata={"help": "Delta-LoRA: the core plus the telescoped update of the frozen weights "
                                                         "(adapters/delta.py; set by the trainers' --delta, on in delta-lora.yaml)"})

    @property
    def index_layout(self) -> str:
        """The SBoRA index layout in effect: ``layout``, else the method's default (``DEFAULT_LAYOUTS``)."""
        return self.layout or DEFAULT_LAYOUTS.get(self.method, LEGACY_LAYOUT)

    @property
    def scale(self) -> float:
        return self.alpha / (self.rank**0.5 if self.rslora else self.rank)

    def target_suffixes(self) -> list[str]:
        out: list[str] = []
        for t in self.targets:
            out.extend(TARGET_PRESETS.get(t, [t]))
        return out

    def validate(self) -> None:
        if self.method not in KNOWN_METHODS:
            raise ConfigError(f"unknown adapter method '{self.method}'; known: {', '.join(sorted(KNOWN_METHODS))}")
        if self.rank <= 0:
            raise ConfigError(f"rank must be a positive integer, got {self.rank}")
        check_fields(self, {"alpha": (0, None, "open"), "seed": (0, None)})
        if self.layout is not None and self.layout not in LAYOUTS:
            raise ConfigError(f"unknown index layout '{self.layout}'; known: {', '.join(LAYOUTS)}")
        if self.slot < 0:
            raise ConfigError(f"slot must be >= 0, got {self.slot}")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"dropout must be in [0, 1), got {self.dropout}")
        if self.delta and self.dropout > 0:
            raise ConfigError(f"Delta-LoRA needs dropout 0 on the adapter branch (W follows the branch's updates, as in the paper), "
                              f"got dropout {self.dropout}: pass --dropout 0")
        if not self.targets and not self.target_regex:
            raise ConfigError("no targets: give module-path suffixes, a preset, or target_regex")


def load_adapter_config(method: str | Path, **overrides) -> AdapterConfig:
    """``configs/methods/<method>.yaml`` (or a YAML path), then keyword overrides."""
    path = resolve_named_config("methods", method)
    config = from_dict(AdapterConfig, load_yaml(path), source=str(path))
    return override(config, overrides, source="overrides") if overrides else config
