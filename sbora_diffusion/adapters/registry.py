"""Method name -> core class. Everything (inject, tests, CLIs) goes through this table."""

from __future__ import annotations

from .base import Core
from .dense import DenseCore
from .difflora import DiffLoRACore
from .lora import LoRACore
from .ortho import OrthoCore
from .sbora import SBoRAFACore, SBoRAFBCore

METHODS: dict[str, type[Core]] = {
    "lora": LoRACore,
    "sbora-fa": SBoRAFACore,
    "sbora-fb": SBoRAFBCore,
    "ortho": OrthoCore,
    "difflora": DiffLoRACore,
    "custom-diffusion": DenseCore,
}
