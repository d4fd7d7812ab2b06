"""What both procedures need: step options (whole steps or a fraction of the run) and the adapted modules of the trained models."""

from __future__ import annotations

from torch import nn

from ..adapters import AdaptedLinear, adapted_layers


def resolve_steps(value: float, steps: int) -> int:
    """A step option: whole optimizer steps (value >= 1), or a fraction of a run of `steps` steps (value < 1, rounded)."""
    return int(value) if value >= 1 else round(value * steps)


def adapted_modules(models: dict[str, nn.Module], name: str) -> dict[str, tuple[str, str, AdaptedLinear]]:
    """key -> (part, module path, layer) for every layer holding adapter `name`, in model order.

    `models` names the trained parts ({"unet": ..., "text_encoder": ...}; {"": model} for one);
    a key is "part.path" (just the path for the unnamed part): stable across runs, so it keys
    checkpoint state and the adapter's metadata.
    """
    return {
        f"{part}.{path}" if part else path: (part, path, layer)
        for part, model in models.items()
        for path, layer in adapted_layers(model, name).items()
    }
