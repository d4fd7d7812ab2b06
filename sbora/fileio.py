"""Atomic, durable file writes: a crash, Ctrl-C or power loss never leaves a half-written output.

The data goes to a temporary file next to the target, is flushed to disk (fsync), renamed
over the target, and the folder entry is flushed too; so after a power loss the target is
either the old file or the whole new one, never a renamed but empty file. Temporary files
are named ``.<name>.<random>.tmp`` (folders too: ``atomic_folder`` publishes a whole folder
the same way); ``remove_stale_temp_files`` clears those a killed process left behind.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
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


@contextlib.contextmanager
def atomic_folder(path: str | Path, replace: bool = True) -> Iterator[Path]:
    """Yield a temporary folder next to `path`; it takes the place of `path` only if the block succeeds.

    An earlier `path` (file or folder) is moved aside first and deleted once the new folder
    is in place, so a failure at any point leaves either the old or the new one. With
    ``replace=False`` an earlier `path` is kept and the new folder dropped (a cache entry that
    another process published first, and may be reading).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp"))
    old = None
    try:
        umask = os.umask(0)
        os.umask(umask)
        tmp.chmod(0o777 & ~umask)  # mkdtemp makes it private; an output folder is meant to be shared
        yield tmp
        for f in tmp.rglob("*"):
            if f.is_file():
                _fsync(f)
        if not replace and (path.exists() or path.is_symlink()):
            return
        if path.exists() or path.is_symlink():
            old = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")) / path.name
            os.replace(path, old)
        try:
            os.replace(tmp, path)
        except BaseException:
            if old is not None:
                os.replace(old, path)
                old = None
            elif not replace and path.exists():
                return  # another process published it between the look above and the rename
            raise
        _fsync(path.parent)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        if old is not None:
            shutil.rmtree(old.parent, ignore_errors=True)


def cache_dir() -> Path:
    """Where built artefacts are kept (the CLIP tokenizer files, class images, converted GGUF models):
    $SBORA_CACHE, else $XDG_CACHE_HOME/sbora_diffusion, else ~/.cache/sbora_diffusion."""
    root = os.environ.get("SBORA_CACHE") or Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "sbora_diffusion"
    return Path(root)


def _fsync(path: str | Path) -> None:
    """Flush a file's (or a folder's entries') data to the disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def remove_stale_temp_files(folder: str | Path) -> list[Path]:
    """Delete the ``.*.tmp`` files (and folders) that interrupted atomic writes left in `folder`; returns them."""
    folder = Path(folder)
    stale = sorted(folder.glob(".*.tmp")) if folder.is_dir() else []
    for p in stale:
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p, ignore_errors=True)
        else:
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


def sha256(path: str | Path) -> str:
    """The file's sha256, hex (read in 1 MiB chunks)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()
