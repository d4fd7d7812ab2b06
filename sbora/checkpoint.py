"""Training checkpoints: written atomically, resumed exactly, never unpickled unsafely.

A checkpoint is one file ``<dir>/step-<N>.pt`` holding a dict of tensors and plain values:

    {"step": N, "trainable": {name: tensor}, "optimizer": opt.state_dict(),
     "scheduler": sched.state_dict(), "rng": capture_rng(), ...anything else plain}

It is written with ``torch.save`` to a temp file, fsynced and renamed (a crash, Ctrl-C or
power loss never leaves half a checkpoint), and read back with
``torch.load(weights_only=True)``, which refuses arbitrary pickled objects. Resuming takes
the newest checkpoint that can be read and falls back to older ones with a warning. The
training engine (``engine.py``) is the only writer.
"""

from __future__ import annotations

import random
import re
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .fileio import atomic_path, remove_stale_temp_files

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


class CheckpointError(ValueError):
    """No usable checkpoint; the message says where it looked and what to do."""


def save_checkpoint(directory: str | Path, state: dict[str, Any], keep: int = 2) -> Path:
    """Write ``state`` as ``step-<state['step']>.pt`` atomically; keep only the newest `keep`."""
    directory = Path(directory)
    path = directory / f"step-{int(state['step']):08d}.pt"
    remove_stale_temp_files(directory)
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


def checkpoint_step(path: str | Path) -> int | None:
    """N for a file named ``step-<N>.pt``, else None."""
    m = _NAME.search(Path(path).name)
    return int(m.group(1)) if m else None


def read_checkpoint(path: str | Path) -> dict[str, Any]:
    """One checkpoint file, loaded with ``weights_only=True`` (pickled objects are refused)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"no checkpoint at {path}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        reason = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
        raise CheckpointError(f"checkpoint {path} cannot be read ({reason}); it may be corrupt or not a checkpoint of this toolkit") from None
    if not isinstance(state, dict) or "step" not in state:
        raise CheckpointError(f"checkpoint {path} is not a training checkpoint of this toolkit (no step)")
    return state


def load_checkpoint(path: str | Path) -> tuple[dict[str, Any], Path]:
    """A checkpoint file, or the newest readable one in a folder: ``(state, its path)``.

    In a folder, an unreadable newest checkpoint (cut short by a crash, or corrupt) is
    skipped with a warning and the previous one is used.
    """
    path = Path(path)
    if not path.is_dir():
        return read_checkpoint(path), path
    found = list_checkpoints(path)
    if not found:
        raise CheckpointError(f"no checkpoint (step-*.pt) in {path}; train without --resume first")
    errors = []
    for candidate in reversed(found):
        try:
            state = read_checkpoint(candidate)
        except CheckpointError as e:
            errors.append(str(e))
            continue
        for e in errors:
            warnings.warn(f"{e}; resuming from the older {candidate.name} instead", stacklevel=2)
        return state, candidate
    raise CheckpointError(f"no readable checkpoint in {path}: " + "; ".join(errors))


# The two ways a run ends early; here, not in the engine, so that the command frame (cli.py)
# handles them without loading the training loop.


class TrainingInterrupted(KeyboardInterrupt):
    """Ctrl-C (or a stop request): a checkpoint of the last step boundary was written."""

    def __init__(self, step: int, checkpoint: Path | None):
        super().__init__(step, checkpoint)
        self.step, self.checkpoint = step, checkpoint

    def __str__(self) -> str:
        where = f"; checkpoint {self.checkpoint}" if self.checkpoint else ""
        return f"interrupted at step {self.step}{where}; continue with the same command plus --resume"


class TrainingDiverged(FloatingPointError):
    """The loss or a parameter stopped being finite; nothing was published."""
