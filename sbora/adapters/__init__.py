"""Adapter cores, the AdaptedLinear wrapper, injection and adapter files (docs/architecture.md §2-3)."""

from .base import Core
from .config import TARGET_PRESETS, AdapterConfig, load_adapter_config
from .file import AdapterFile, AdapterFileError
from .inject import (
    active_adapters,
    adapted_layers,
    adapter_names,
    adapter_parameters,
    inject,
    match_targets,
    merge,
    merge_and_unload,
    remove,
    set_adapter_enabled,
    set_adapter_weight,
    unmerge,
)
from .io import load_adapter, read_adapter, save_adapter
from .layer import AdaptedLinear
from .registry import METHOD_SPECS, METHODS, MethodSpec, method_spec

__all__ = [
    "METHODS",
    "METHOD_SPECS",
    "TARGET_PRESETS",
    "AdaptedLinear",
    "AdapterConfig",
    "AdapterFile",
    "AdapterFileError",
    "Core",
    "MethodSpec",
    "active_adapters",
    "adapted_layers",
    "adapter_names",
    "adapter_parameters",
    "inject",
    "load_adapter",
    "load_adapter_config",
    "match_targets",
    "merge",
    "merge_and_unload",
    "method_spec",
    "read_adapter",
    "remove",
    "save_adapter",
    "set_adapter_enabled",
    "set_adapter_weight",
    "unmerge",
]
