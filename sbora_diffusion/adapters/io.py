"""Adapter files: safetensors keyed by module path, plus JSON metadata. Never pickle.

    <module path>.<tensor>   e.g. "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.B"
    _extra.<key>             tensors a trainer adds (e.g. learned token embeddings)

Metadata (safetensors header, all strings): format, format_version, config (the
AdapterConfig as JSON: method, rank, alpha, targets, slot, seed, ...), modules (JSON list of
adapted paths), base_model, package_version, extra (JSON the trainer adds). The index sets
of SBoRA (``*.indices``) and ortho's fixed basis (``*.A``) are tensors of the file, so a
loaded adapter never depends on re-deriving them.
"""

from __future__ import annotations

import dataclasses
import json
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from .. import __version__
from ..configuration import ConfigError, from_dict
from ..fileio import atomic_path
from .config import AdapterConfig
from .inject import adapted_layers, inject, remove

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


def save_adapter(
    model: nn.Module,
    path: str | Path,
    name: str = "default",
    base_model: str | None = None,
    extra_tensors: dict[str, torch.Tensor] | None = None,
    extra: dict | None = None,
) -> Path:
    """Write adapter `name` of `model` to `path` (atomically)."""
    layers = adapted_layers(model, name)
    if not layers:
        raise ValueError(f"the model has no adapter named '{name}' to save")
    tensors, config = {}, None
    for p, layer in layers.items():
        core = layer.cores[name]
        config = core.config
        for k, t in core.state_dict().items():
            tensors[f"{p}.{k}"] = t.detach().cpu().contiguous()
    for k, t in (extra_tensors or {}).items():
        tensors[EXTRA + k] = t.detach().cpu().contiguous()
    metadata = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "config": json.dumps(dataclasses.asdict(config)),
        "modules": json.dumps(list(layers)),
        "base_model": base_model or "",
        "package_version": __version__,
        "extra": json.dumps(extra or {}),
    }
    path = Path(path)
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata=metadata)
    return path


def read_adapter(path: str | Path) -> AdapterFile:
    """Read and check an adapter file without touching any model."""
    path = Path(path)
    if not path.is_file():
        raise AdapterFileError(f"no adapter file at {path}")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:  # safetensors raises several types for truncated/garbled files
        raise AdapterFileError(f"{path} is not a readable safetensors file ({e}); it may be truncated or corrupt") from None
    if meta.get("format") != FORMAT:
        raise AdapterFileError(f"{path} is a safetensors file but not an adapter of this toolkit (format={meta.get('format')!r})")
    if meta.get("format_version") != FORMAT_VERSION:
        raise AdapterFileError(f"{path} has adapter format version {meta.get('format_version')}; this toolkit reads {FORMAT_VERSION}")
    try:
        config = from_dict(AdapterConfig, json.loads(meta["config"]), source=f"{path} metadata")
        modules = json.loads(meta["modules"])
        extra = json.loads(meta.get("extra", "{}"))
    except (KeyError, json.JSONDecodeError, ConfigError) as e:
        raise AdapterFileError(f"{path} has broken metadata: {e}") from None
    return AdapterFile(
        config=config,
        modules=modules,
        tensors={k: t for k, t in tensors.items() if not k.startswith(EXTRA)},
        extra_tensors={k[len(EXTRA) :]: t for k, t in tensors.items() if k.startswith(EXTRA)},
        base_model=meta.get("base_model") or None,
        package_version=meta.get("package_version"),
        extra=extra,
    )


def load_adapter(
    model: nn.Module, path: str | Path, name: str = "default", weight: float = 1.0, base_model: str | None = None
) -> AdapterFile:
    """Inject adapter `name` from `path` into `model` with the file's weights and index sets.

    Checks every module path and tensor shape first; on any mismatch the model is left as it
    was and the error lists what does not fit.
    """
    file = read_adapter(path)
    if base_model and file.base_model and base_model != file.base_model:
        warnings.warn(f"{path} was trained on '{file.base_model}', loading into '{base_model}'", stacklevel=2)
    origin = f" (trained on '{file.base_model}')" if file.base_model else ""
    try:
        inject(model, file.config, name=name, paths=file.modules, weight=weight)
    except ConfigError as e:
        raise AdapterFileError(f"{path} does not fit this model{origin}: {e}") from None
    problems, states, expected_keys = [], {}, set()
    for p, layer in adapted_layers(model, name).items():
        states[p] = {}
        for k, t in layer.cores[name].state_dict().items():
            expected_keys.add(f"{p}.{k}")
            got = file.tensors.get(f"{p}.{k}")
            if got is None:
                problems.append(f"{p}.{k}: missing from the file")
            elif got.shape != t.shape:
                problems.append(f"{p}.{k}: file has shape {tuple(got.shape)}, model needs {tuple(t.shape)}")
            else:
                states[p][k] = got
    problems += [f"{k}: in the file but not part of any adapted layer" for k in sorted(set(file.tensors) - expected_keys)]
    if problems:
        remove(model, name)
        shown = "\n  ".join(problems[:10]) + (f"\n  ... and {len(problems) - 10} more" if len(problems) > 10 else "")
        raise AdapterFileError(f"{path} does not fit this model{origin}:\n  {shown}")
    for p, layer in adapted_layers(model, name).items():
        layer.cores[name].load_state_dict(states[p])
    return file
