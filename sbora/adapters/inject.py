"""Put adapter cores into a model's linear layers, take them out, merge them, list them.

Modules are matched by module-path suffix (``to_q`` matches ``...attn1.to_q``) or by a
regex on the full path (``AdapterConfig.target_regex``). Works on any torch model: the
diffusers UNet, the CLIP text encoder and transformers LLMs are just module trees here.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Iterable, Iterator, Mapping

from torch import nn

from ..configuration import ConfigError
from .config import AdapterConfig
from .delta import delta_core_class
from .layer import AdaptedLinear
from .registry import METHODS
from .scope import selection_scope


def _linear_paths(model: nn.Module) -> dict[str, nn.Module]:
    """Every adaptable layer: nn.Linear outside AdaptedLinear, plus the AdaptedLinear wrappers."""
    found: dict[str, nn.Module] = {}
    for path, module in model.named_modules():
        if any(path.startswith(p + ".") for p in found if isinstance(found[p], AdaptedLinear)):
            continue  # the base_layer inside a wrapper
        if isinstance(module, (nn.Linear, AdaptedLinear)):
            found[path] = module
    return found


def match_targets(model: nn.Module, config: AdapterConfig) -> list[str]:
    layers = _linear_paths(model)
    if config.target_regex:
        rx = re.compile(config.target_regex)
        return [p for p in layers if rx.fullmatch(p)]
    suffixes = config.target_suffixes()
    return [p for p in layers if any(p == s or p.endswith("." + s) for s in suffixes)]


def check_adapter_name(name: str) -> None:
    """Adapter names key torch ModuleDicts: no dots, and not an nn.Module attribute such as 'train'."""
    if not re.fullmatch(r"[A-Za-z0-9_-]+", name) or hasattr(AdaptedLinear, name):
        raise ValueError(
            f"adapter name {name!r} is not allowed: use letters, digits, '_' or '-' "
            "(and not a torch.nn.Module attribute like 'train' or 'double'), e.g. 'task_train'"
        )


def replace_module(model: nn.Module, path: str, new: nn.Module) -> None:
    parent_path, _, child = path.rpartition(".")
    setattr(model.get_submodule(parent_path) if parent_path else model, child, new)


def adapted_layers(model: nn.Module, name: str | None = None) -> dict[str, AdaptedLinear]:
    """Module path -> AdaptedLinear, optionally only those holding adapter `name`."""
    return {
        p: m for p, m in model.named_modules() if isinstance(m, AdaptedLinear) and (name is None or name in m.cores)
    }


def adapter_names(model: nn.Module) -> list[str]:
    return sorted({n for m in adapted_layers(model).values() for n in m.cores})


def build_cores(model: nn.Module, config: AdapterConfig, paths: list[str] | None = None) -> dict[str, nn.Module]:
    """One new core per targeted layer (`paths`, else the config's targets), without touching `model`.

    Every error (unknown method, no match, rank or slot that does not fit) surfaces here.
    """
    config.validate()
    layers = _linear_paths(model)
    if paths is None:
        paths = match_targets(model, config)
        if not paths:
            sample = ", ".join(list(layers)[:8]) or "(no nn.Linear layers at all)"
            what = f"target_regex '{config.target_regex}'" if config.target_regex else f"targets {config.targets}"
            raise ConfigError(f"{what} match no linear layer of {type(model).__name__}; some of its layers: {sample}")
    missing = [p for p in paths if p not in layers]
    if missing:
        raise ConfigError(f"{type(model).__name__} has no linear layer at {', '.join(missing[:5])}")
    core_cls = METHODS[config.method]
    if config.delta:
        core_cls = delta_core_class(core_cls)  # the same core plus Delta-LoRA's telescoped update
    cores = {}
    for p in paths:
        base = layers[p].base_layer if isinstance(layers[p], AdaptedLinear) else layers[p]
        cores[p] = core_cls(base.in_features, base.out_features, config, p)
    return cores


def inject(
    model: nn.Module, config: AdapterConfig, name: str = "default", paths: list[str] | None = None, weight: float = 1.0,
    cores: dict[str, nn.Module] | None = None,
) -> list[str]:
    """Add adapter `name` to every targeted linear layer of `model`; returns the wrapped paths.

    Touches no other parameter: the base and earlier adapters keep their ``requires_grad``
    (a trainer freezes the base itself, once, with ``model.requires_grad_(False)``). The new
    cores are float32 whatever the base's dtype. `paths` (exact module paths) overrides the
    config's targets, as when loading a file; `cores` (from ``build_cores``, filled) are used
    as given. Nothing is changed if anything is wrong.
    """
    check_adapter_name(name)
    if name in adapter_names(model):
        raise ValueError(f"the model already has an adapter named '{name}'; remove it first or pick another name")
    if cores is None:
        cores = build_cores(model, config, paths)  # every core first: a rank/slot error leaves the model untouched
    layers = _linear_paths(model)
    for p, core in cores.items():
        layer = layers[p]
        if not isinstance(layer, AdaptedLinear):
            layer = AdaptedLinear(layer)
            replace_module(model, p, layer)
        layer.add_core(name, core, weight=weight)
    return list(cores)


def remove(model: nn.Module, name: str, paths: Iterable[str] | None = None) -> list[str]:
    """Take adapter `name` out (of the layers at `paths` only, if given; unmerging it first); wrappers left empty become plain layers again."""
    layers = adapted_layers(model, name)
    if not layers:
        raise ValueError(f"the model has no adapter named '{name}'; it has: {', '.join(adapter_names(model)) or 'none'}")
    if paths is not None:
        paths = list(paths)
        missing = [p for p in paths if p not in layers]
        if missing:
            raise ValueError(f"adapter '{name}' is not at {', '.join(missing[:5])}")
        layers = {p: layers[p] for p in paths}
    for p, layer in layers.items():
        layer.remove_core(name)
        if not layer.cores:
            replace_module(model, p, layer.base_layer)
    return list(layers)


def merge(model: nn.Module, name: str | None = None) -> None:
    """Merge adapter `name` (or every adapter) into the base weights."""
    for layer in adapted_layers(model, name).values():
        for n in [name] if name else list(layer.cores):
            layer.merge(n)


def unmerge(model: nn.Module, name: str | None = None) -> None:
    for layer in adapted_layers(model, name).values():
        for n in [name] if name else list(layer.cores):
            layer.unmerge(n)


def merge_and_unload(model: nn.Module) -> nn.Module:
    """Merge every adapter and put the plain base layers back: a model any library can load."""
    for p, layer in adapted_layers(model).items():
        for n in list(layer.cores):
            layer.merge(n)
        replace_module(model, p, layer.base_layer)
    return model


def set_adapter_weight(model: nn.Module, name: str, weight: float) -> None:
    for layer in adapted_layers(model, name).values():
        layer.set_weight(name, weight)


def set_adapter_enabled(model: nn.Module, name: str, enabled: bool) -> None:
    for layer in adapted_layers(model, name).values():
        layer.set_enabled(name, enabled)


@contextlib.contextmanager
def active_adapters(models: nn.Module | Iterable[nn.Module], selection: Mapping[str, float] | Iterable[str]) -> Iterator[None]:
    """Run the block with exactly `selection` active ({name: weight}, or names at weight 1); see ``scope``.

    `models` (one module or several, e.g. a UNet and its text encoder) are only read, to
    check the names: an unknown name is a ValueError that lists the known ones. An empty
    selection runs the bare base. A merged adapter cannot be switched per call: a selection
    that leaves it out or changes its weight is refused.
    """
    models = [models] if isinstance(models, nn.Module) else list(models)
    chosen = dict(selection) if isinstance(selection, Mapping) else {n: 1.0 for n in selection}
    layers = [layer for model in models for layer in adapted_layers(model).values()]
    known = {n for layer in layers for n in layer.cores}
    unknown = sorted(set(chosen) - known)
    if unknown:
        raise ValueError(f"no adapter named {', '.join(map(repr, unknown))} in this model; it has: {', '.join(sorted(known)) or 'none'}")
    for layer in layers:
        for name in layer.merged:
            if chosen.get(name) != layer.weights[name]:
                raise RuntimeError(
                    f"adapter '{name}' is merged into the base weights at weight {layer.weights[name]}; "
                    "unmerge it to select it per call, or keep it in the selection at that weight"
                )
    with selection_scope(chosen):
        yield


def adapter_parameters(model: nn.Module, name: str | None = None) -> list[nn.Parameter]:
    """The trainable parameters of adapter `name` (or all adapters), in a stable order."""
    return [
        param
        for layer in adapted_layers(model, name).values()
        for n, core in layer.cores.items()
        if name is None or n == name
        for param in core.parameters()
    ]
