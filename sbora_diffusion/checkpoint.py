"""Training checkpoints: written atomically, resumed exactly, never unpickled unsafely.

A checkpoint is one file ``<dir>/step-<N>.pt`` holding a dict of tensors and plain values:

    {"step": N, "trainable": {name: tensor}, "optimizer": opt.state_dict(),
     "scheduler": sched.state_dict(), "rng": capture_rng(), ...anything else plain}

It is written with ``torch.save`` to a temp file and renamed (a crash or Ctrl-C never
leaves half a checkpoint), and read back with ``torch.load(weights_only=True)``, which
refuses arbitrary pickled objects. Both trainers (diffusion and LLM) use this module.
"""

from __future__ import annotations

import random
import re
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .fileio import atomic_path

_NAME = re.compile(r"step-(\d+)\.pt$")


def capture_rng() -> dict[str, Any]:
    """Every RNG a training loop draws from, as weights_only-loadable values."""
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "python": list(random.getstate()[1]),
        "python_pos": random.getstate()[2],
        "numpy": np.random.get_state()[1].tolist(),
        "numpy_pos": int(np.random.get_state()[2]),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate((3, tuple(state["python"]), state["python_pos"]))
    np.random.set_state(("MT19937", np.array(state["numpy"], dtype=np.uint32), state["numpy_pos"], 0, 0.0))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(directory: str | Path, state: dict[str, Any], keep: int = 2) -> Path:
    """Write ``state`` as ``step-<state['step']>.pt`` atomically; keep only the newest `keep`."""
    directory = Path(directory)
    path = directory / f"step-{int(state['step']):08d}.pt"
    with atomic_path(path) as tmp:
        torch.save(state, tmp)
    for old in list_checkpoints(directory)[:-keep] if keep > 0 else []:
        old.unlink()
    return path


def list_checkpoints(directory: str | Path) -> list[Path]:
    """Checkpoints in `directory`, oldest first."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in directory.iterdir() if (m := _NAME.search(p.name))]
    return [p for _, p in sorted(found)]


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """Read a checkpoint file, or the newest one in a folder; clear error if there is none."""
    path = Path(path)
    if path.is_dir():
        found = list_checkpoints(path)
        if not found:
            raise FileNotFoundError(f"no checkpoint (step-*.pt) in {path}; train without --resume first")
        path = found[-1]
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint at {path}")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise ValueError(f"checkpoint {path} cannot be read ({e}); it may be corrupt: delete it to resume from an older one") from None
