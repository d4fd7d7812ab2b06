"""Adapter files: safetensors keyed by module path, plus JSON metadata. Never pickle.

    <module path>.<tensor>   e.g. "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.B"
    _extra.<key>             tensors a trainer adds (e.g. learned token embeddings)

Metadata (safetensors header, all strings): format, format_version, config (the
AdapterConfig as JSON: method, rank, alpha, targets, slot, seed, layout, ...), modules (JSON
list of adapted paths), base_model, package_version, extra (JSON the trainer adds),
layout_version (the version of the index layout: 1 scattered, 2 blocks; the config records
the layout in effect, its method's default when none was asked for). The index sets of
SBoRA (``*.indices``) and ortho's fixed basis (``*.A``) are tensors of the file, so a loaded
adapter never depends on re-deriving them. A file whose config has no ``layout`` was written
before layouts were recorded and is read as layout 1 (``scattered``): its saved indices are
those of that layout. ``slot_layouts`` reads (method, rank, slot, seed, layout, modules) from
the metadata alone, for the slot check of compositions (``slots.slot_clashes``).

Loading checks the content, not only the shapes, before the model changes at all: every
module path exists, every tensor has the expected shape and dtype kind, every value is
finite, index sets are unique and within the layer; a problem is an ``AdapterFileError``
naming the key. Modules whose config differs from the adapter's (an imported LoRA's
per-module ranks and alphas) are listed in the ``module_configs`` metadata.

Standard LoRA files (diffusers, kohya, peft; ``formats.py``) are read too, recognized by
their keys: ``read_adapter`` returns their LoRA cores under the file's module names, and
``load_adapter`` fits them to the model (the UNet or text-encoder part) first.

``sibling_file`` resolves a file name found in metadata (e.g. the text-encoder adapter) and
refuses anything that is not a plain file name in the same folder.
"""

from __future__ import annotations

import dataclasses
import json
import warnings
from collections.abc import Mapping
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from .. import __version__
from ..configuration import ConfigError, from_dict
from ..fileio import atomic_path
from .config import LAYOUTS, LEGACY_LAYOUT, AdapterConfig
from .file import EXTRA, FORMAT, FORMAT_VERSION, AdapterFile, AdapterFileError
from .formats import PEFT_WEIGHTS, fit_to_model, read_lora_file
from .inject import adapted_layers, build_cores, inject
from .slots import SlotLayout

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
    tensors, configs = {}, {}
    for p, layer in layers.items():
        core = layer.cores[name]
        configs[p] = core.config
        for k, t in core.state_dict().items():
            tensors[f"{p}.{k}"] = t.detach().cpu().contiguous()
    for k, t in (extra_tensors or {}).items():
        tensors[EXTRA + k] = t.detach().cpu().contiguous()
    # Files record the index layout in effect (a config without one takes its method's default).
    configs = {p: dataclasses.replace(c, layout=c.index_layout) for p, c in configs.items()}
    config = next(iter(configs.values()))
    module_configs = {p: dataclasses.asdict(c) for p, c in configs.items() if c != config}
    metadata = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "config": json.dumps(dataclasses.asdict(config)),
        "modules": json.dumps(list(layers)),
        "base_model": base_model or "",
        "package_version": __version__,
        "extra": json.dumps(extra or {}),
        "layout_version": str(LAYOUTS[config.index_layout]),
        **({"module_configs": json.dumps(module_configs)} if module_configs else {}),
    }
    path = Path(path)
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata=metadata)
    return path


def sibling_file(path: str | Path, name: object, what: str) -> Path:
    """`name` (from an adapter's metadata) as a file next to `path`: a plain file name, never a path elsewhere."""
    path = Path(path)
    if not isinstance(name, str) or not name or Path(name).name != name or name in (".", "..") or "\\" in name:
        raise AdapterFileError(f"{path}: its metadata names the {what} {name!r}, which is not a plain file name in the adapter's folder")
    target = path.parent / name
    if not target.resolve().is_relative_to(path.parent.resolve()):
        raise AdapterFileError(f"{path}: its {what} {name!r} points outside the adapter's folder")
    return target


def check_values(tensors: dict[str, torch.Tensor], source: str) -> None:
    """Every float tensor finite; index sets integer, non-negative and unique."""
    for key, t in tensors.items():
        if t.is_floating_point():
            if not torch.isfinite(t).all():
                raise AdapterFileError(f"{source}: tensor {key} holds NaN or infinite values; the adapter is broken (retrain it or use another file)")
        elif key.endswith("indices"):
            if t.ndim != 1 or t.numel() and (t.min() < 0 or t.unique().numel() != t.numel()):
                raise AdapterFileError(f"{source}: index set {key} has negative or repeated indices; the file is corrupt")


def read_adapter(path: str | Path) -> AdapterFile:
    """Read and check an adapter file (format, metadata, finite values, index sets) without touching any model.

    Also reads a diffusers, kohya or peft LoRA file, or a peft adapter folder (see ``formats``).
    """
    path = Path(path)
    if path.is_dir():
        if not (path / PEFT_WEIGHTS).is_file():
            raise AdapterFileError(f"{path} is a folder without {PEFT_WEIGHTS}; pass an adapter file, or a peft adapter folder saved with safetensors")
        path = path / PEFT_WEIGHTS
    if not path.is_file():
        raise AdapterFileError(f"no adapter file at {path}")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:  # safetensors raises several types for truncated/garbled files
        raise AdapterFileError(f"{path} is not a readable safetensors file ({e}); it may be truncated or corrupt") from None
    if meta.get("format") != FORMAT:
        check_values(tensors, str(path))
        imported = read_lora_file(path, tensors, meta)
        if imported is None:
            raise AdapterFileError(
                f"{path} is a safetensors file but not an adapter of this toolkit (format={meta.get('format')!r}), "
                "nor a diffusers, kohya or peft LoRA file"
            )
        return imported
    config, modules, extra, module_configs = _parse_metadata(meta, path)
    check_values(tensors, str(path))
    return AdapterFile(
        config=config,
        modules=modules,
        tensors={k: t for k, t in tensors.items() if not k.startswith(EXTRA)},
        extra_tensors={k[len(EXTRA) :]: t for k, t in tensors.items() if k.startswith(EXTRA)},
        base_model=meta.get("base_model") or None,
        package_version=meta.get("package_version"),
        extra=extra,
        module_configs=module_configs,
    )


def _config(data: object, source: str) -> AdapterConfig:
    """An AdapterConfig from a file's JSON; no ``layout`` (a file older than layouts) means the legacy layout."""
    if isinstance(data, dict) and "layout" not in data:
        data = {**data, "layout": LEGACY_LAYOUT}
    return from_dict(AdapterConfig, data, source=source)  # validates: an unknown layout is an error


def _parse_metadata(meta: dict, path: Path) -> tuple[AdapterConfig, list[str], dict, dict[str, AdapterConfig]]:
    """(config, modules, extra, module_configs) of one of our files' metadata; AdapterFileError if broken."""
    if meta.get("format_version") != FORMAT_VERSION:
        raise AdapterFileError(f"{path} has adapter format version {meta.get('format_version')}; this toolkit reads {FORMAT_VERSION}")
    try:
        config = _config(json.loads(meta["config"]), f"{path} metadata")
        modules = json.loads(meta["modules"])
        extra = json.loads(meta.get("extra", "{}"))
        overrides = json.loads(meta.get("module_configs", "{}"))
        module_configs = {p: _config(c, f"{path} metadata ({p})") for p, c in overrides.items()}
    except (KeyError, json.JSONDecodeError, ConfigError, AttributeError, TypeError) as e:
        raise AdapterFileError(f"{path} has broken metadata: {e}") from None
    if not isinstance(modules, list) or not all(isinstance(m, str) for m in modules) or not isinstance(extra, dict):
        raise AdapterFileError(f"{path} has broken metadata: modules must be a list of module paths and extra a mapping")
    return config, modules, extra, module_configs


def slot_layouts(path: str | Path, label: str | None = None) -> list[SlotLayout]:
    """The slot layouts of the adapter at `path`, one per distinct config, from its metadata alone (no tensor is read).

    Empty for imported LoRA files (diffusers, kohya, peft); methods without slots (LoRA,
    DiffLoRA, ...) give layouts whose ``space`` is None. `label` names the adapter in messages
    (default: the path).
    """
    path = Path(path)
    if path.is_dir():  # a peft adapter folder: LoRA, no slots
        return []
    if not path.is_file():
        raise AdapterFileError(f"no adapter file at {path}")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
    except Exception as e:
        raise AdapterFileError(f"{path} is not a readable safetensors file ({e}); it may be truncated or corrupt") from None
    if meta.get("format") != FORMAT:
        return []
    config, modules, _, module_configs = _parse_metadata(meta, path)
    groups: dict[tuple, set[str]] = {}
    for p in modules:
        c = module_configs.get(p, config)
        groups.setdefault((c.method, c.rank, c.slot, c.seed, c.index_layout), set()).add(p)
    return [SlotLayout(label or str(path), *key, modules=frozenset(paths)) for key, paths in groups.items()]


def load_adapter(
    model: nn.Module, path: str | Path, name: str = "default", weight: float = 1.0, base_model: str | None = None,
    part: str | None = None, aliases: Mapping[str, str] | None = None,
) -> AdapterFile:
    """Inject adapter `name` from `path` into `model` with the file's weights and index sets.

    `part`: which part of a diffusers/kohya LoRA file `model` is (``formats.PARTS``; none: the
    part whose layer names fit it); `aliases`: other paths such a file may name its layers by
    (see ``formats.fit_to_model``).

    Builds and fills every core first and checks every module path, tensor shape and index
    range; only when all of it fits is the model changed. Otherwise the model is left as it
    was and the error lists what does not fit.
    """
    file = read_adapter(path)
    if file.format != FORMAT:
        file = fit_to_model(file, model, str(path), part=part, aliases=aliases)
    if base_model and file.base_model and base_model != file.base_model:
        warnings.warn(f"{path} was trained on '{file.base_model}', loading into '{base_model}'", stacklevel=2)
    origin = f" (trained on '{file.base_model}')" if file.base_model else ""
    try:
        groups: dict[str, tuple[AdapterConfig, list[str]]] = {}  # one build per distinct config
        for p in file.modules:
            config = file.module_configs.get(p, file.config)
            groups.setdefault(json.dumps(dataclasses.asdict(config), sort_keys=True), (config, []))[1].append(p)
        built = {p: c for config, paths in groups.values() for p, c in build_cores(model, config, paths).items()}
        cores = {p: built[p] for p in file.modules}
    except ConfigError as e:
        raise AdapterFileError(f"{path} does not fit this model{origin}: {e}") from None
    problems, expected_keys = [], set()
    for p, core in cores.items():
        state = {}
        for k, t in core.state_dict().items():
            key = f"{p}.{k}"
            expected_keys.add(key)
            got = file.tensors.get(key)
            if got is None:
                problems.append(f"{key}: missing from the file")
            elif got.shape != t.shape or got.is_floating_point() != t.is_floating_point():
                problems.append(f"{key}: file has {got.dtype} {tuple(got.shape)}, model needs {t.dtype} {tuple(t.shape)}")
            elif k == "indices" and got.numel() and got.max() >= (core.d_in if getattr(core, "axis", 1) == 1 else core.d_out):
                problems.append(f"{key}: index {int(got.max())} is out of range for a layer of width {core.d_in if core.axis == 1 else core.d_out}")
            else:
                state[k] = got
        if len(state) == len(core.state_dict()):
            core.load_state_dict(state)
    problems += [f"{k}: in the file but not part of any adapted layer" for k in sorted(set(file.tensors) - expected_keys)]
    if problems:
        shown = "\n  ".join(problems[:10]) + (f"\n  ... and {len(problems) - 10} more" if len(problems) > 10 else "")
        raise AdapterFileError(f"{path} does not fit this model{origin}:\n  {shown}")
    inject(model, file.config, name=name, paths=file.modules, weight=weight, cores=cores)
    return file
