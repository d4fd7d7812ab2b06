"""Atomic, durable file writes: a crash, Ctrl-C or power loss never leaves a half-written output.

The data goes to a temporary file next to the target, is flushed to disk (fsync), renamed
over the target, and the folder entry is flushed too; so after a power loss the target is
either the old file or the whole new one, never a renamed but empty file. Temporary files
are named ``.<name>.<random>.tmp``; ``remove_stale_temp_files`` clears those a killed
process left behind.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path next to `path`; rename it onto `path` only if the block succeeds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        yield Path(tmp)
        # mkstemp makes the file private (0600); give it the mode a plain open() would.
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        _fsync(tmp)
        os.replace(tmp, path)
        _fsync(path.parent)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _fsync(path: str | Path) -> None:
    """Flush a file's (or a folder's entries') data to the disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def remove_stale_temp_files(folder: str | Path) -> list[Path]:
    """Delete the ``.*.tmp`` files that interrupted atomic writes left in `folder`; returns them."""
    folder = Path(folder)
    stale = sorted(folder.glob(".*.tmp")) if folder.is_dir() else []
    for p in stale:
        p.unlink(missing_ok=True)
    return stale


def write_text(path: str | Path, text: str) -> Path:
    """Write `text` to `path` atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(text)
    return Path(path)


def write_json(path: str | Path, data, indent: int = 2) -> Path:
    """Write `data` as JSON (plus a final newline) to `path` atomically."""
    return write_text(path, json.dumps(data, indent=indent) + "\n")
