"""An adapter file's contents as read (``io.read_adapter``, ``formats.read_lora_file``): the
config, the adapted module paths, the tensors and metadata. The reader and the LoRA formats both
build these; neither imports the other's module for them."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .config import AdapterConfig

FORMAT = "sbora-adapter"
FORMAT_VERSION = "1"
EXTRA = "_extra."


class AdapterFileError(ValueError):
    """An adapter file is missing, corrupt, or does not fit the model; the message says which."""


@dataclass
class AdapterFile:
    config: AdapterConfig
    modules: list[str]
    tensors: dict[str, torch.Tensor]  # module tensors, keyed "<path>.<name>"
    extra_tensors: dict[str, torch.Tensor] = field(default_factory=dict)
    base_model: str | None = None
    package_version: str | None = None
    extra: dict = field(default_factory=dict)
    format: str = FORMAT  # or "diffusers", "kohya", "peft": an imported LoRA file
    module_configs: dict[str, AdapterConfig] = field(default_factory=dict)  # modules whose config differs from `config`
