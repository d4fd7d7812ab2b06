"""The output folder of one training run: nothing earlier is lost, nothing half-done is published.

    outputs/robot/sbora-fa/            the run's folder (a trainer's --output-dir)
        adapter.safetensors, config.yaml, log.jsonl, checkpoints/, ...   a finished run
        .partial/                      the run in progress: same layout, moved up when it ends
        .lock                          held while a run writes here

Rules (the same for every trainer):

- A folder that already holds a run (finished, or interrupted in ``.partial``) is refused
  unless the user says ``--resume`` (continue it) or ``--overwrite`` (replace it); the
  error says so, and suggests another ``--output-dir``.
- A run writes only into ``.partial/``. Only when it has finished are its files moved up,
  each with an atomic rename, replacing the earlier run's (with ``--overwrite`` the earlier
  run's other files go too). A run that fails or is interrupted leaves the earlier result
  exactly as it was; its checkpoints stay in ``.partial/`` for ``--resume``.
- ``--resume`` continues from the newest readable checkpoint of ``.partial/`` (an
  interrupted run), else of the finished run; ``--resume FILE`` from that checkpoint.
- One run at a time per folder: a second process gets a clear error instead of mixing files.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import shutil
from pathlib import Path

from .checkpoint import list_checkpoints
from .configuration import ConfigError
from .fileio import remove_stale_temp_files, write_text

PARTIAL = ".partial"
LOCK = ".lock"
REPLACED = ".replaced"  # the earlier run's files while they are being replaced
LOG = "log.jsonl"


class OutputFolderError(ConfigError):
    """The output folder cannot be used as asked; the message says what to do instead."""


def _entries(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.name not in (PARTIAL, LOCK, REPLACED)) if folder.is_dir() else []


class RunDir:
    """Staging, locking and publishing of one run's folder (see the module docstring).

    Only the main process of a multi-process run writes (`writer=False` elsewhere): it makes
    no folder and takes no lock, but knows the same paths.
    """

    def __init__(self, out: str | Path, *, resume: bool | str = False, overwrite: bool = False, writer: bool = True):
        self.out, self.resume, self.overwrite, self.writer = Path(out), resume, overwrite, writer
        self.staging = self.out / PARTIAL
        self._lock_fd: int | None = None

    # -- before anything is written -------------------------------------------------------

    def check(self) -> None:
        """Refuse a folder that holds a run unless --resume/--overwrite says what to do with it."""
        if self.resume and self.overwrite:
            raise OutputFolderError("--resume continues a run and --overwrite replaces it: pass only one of them")
        if self.resume or self.overwrite:
            return
        partial = list_checkpoints(self.staging / "checkpoints")
        if partial:
            raise OutputFolderError(
                f"{self.out} holds an interrupted run (checkpoint at step {int(partial[-1].stem.split('-')[1])}): "
                f"add --resume to continue it, --overwrite to start over, or pass another --output-dir"
            )
        held = _entries(self.out)
        if held:
            names = ", ".join(p.name for p in held[:4]) + (", ..." if len(held) > 4 else "")
            raise OutputFolderError(
                f"{self.out} already holds a run ({names}): add --resume to continue it (e.g. with more steps), "
                f"--overwrite to replace it (the old files stay until the new run has finished), or pass another --output-dir"
            )

    def checkpoint_source(self) -> Path:
        """Where --resume reads from: the given file or folder, else .partial's checkpoints, else the finished run's."""
        if isinstance(self.resume, (str, Path)) and not isinstance(self.resume, bool):
            given = Path(self.resume)
            if given.is_dir() and not list_checkpoints(given) and list_checkpoints(given / "checkpoints"):
                return given / "checkpoints"
            if not given.exists():
                raise OutputFolderError(f"--resume {given}: no such checkpoint file or folder")
            return given
        for folder in (self.staging / "checkpoints", self.out / "checkpoints"):
            if list_checkpoints(folder):
                return folder
        raise OutputFolderError(f"--resume: no checkpoint (step-*.pt) in {self.out}; train without --resume first")

    # -- while running --------------------------------------------------------------------

    def open(self, resumed_from: Path | None = None, step: int = 0) -> Path:
        """Lock the folder and prepare .partial/ (the staging folder the run writes into); returns it.

        Resuming from a checkpoint: the staging log keeps the lines up to its step, so the
        log never repeats steps. Starting over: a leftover .partial/ is cleared.
        """
        if not self.writer:
            return self.staging
        self.out.mkdir(parents=True, exist_ok=True)
        self._lock()
        source_run = resumed_from.parent.parent if resumed_from is not None else None
        if source_run != self.staging and self.staging.exists():
            shutil.rmtree(self.staging)  # an older interrupted attempt that this run does not continue
        self.staging.mkdir(exist_ok=True)
        for folder in (self.staging, self.staging / "checkpoints"):
            remove_stale_temp_files(folder)  # what writes cut short by a crash left behind
        if source_run is not None:
            log = source_run / LOG
            kept = []
            if log.is_file():
                for line in log.read_text().splitlines():
                    try:
                        if json.loads(line).get("step", 0) <= step:
                            kept.append(line + "\n")
                    except json.JSONDecodeError:
                        break  # a line cut short by a crash: the rest is not trusted
            write_text(self.staging / LOG, "".join(kept))
        return self.staging

    def _lock(self) -> None:
        fd = os.open(self.out / LOCK, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            os.close(fd)
            if e.errno in (errno.EAGAIN, errno.EACCES):
                raise OutputFolderError(f"another run is writing to {self.out} right now: wait for it to end, or pass another --output-dir") from None
            raise
        self._lock_fd = fd

    def close(self) -> None:
        """Release the lock (the staging folder stays, for --resume)."""
        if self._lock_fd is not None:
            fcntl.flock(self._lock_fd, fcntl.LOCK_UN)
            os.close(self._lock_fd)
            self._lock_fd = None

    # -- at the end -----------------------------------------------------------------------

    def publish(self) -> Path:
        """Move the finished run's files up into the output folder; returns it.

        Each file or folder replaces its namesake with one rename (the old one is moved aside
        first and deleted after). With --overwrite, files of the earlier run that this run
        did not write are removed too; otherwise they stay.
        """
        if not self.writer:
            return self.out
        trash = self.out / REPLACED
        if trash.exists():
            shutil.rmtree(trash)
        trash.mkdir()
        new = {p.name for p in self.staging.iterdir()}
        for old in _entries(self.out):
            if old.name in new or self.overwrite:
                old.rename(trash / old.name)
        for p in sorted(self.staging.iterdir()):
            p.rename(self.out / p.name)
        self.staging.rmdir()
        shutil.rmtree(trash)
        self.close()
        return self.out
