"""What every command does around its work: a --debug flag, one-line errors, exit codes.

    error: <what is wrong and what to do>      exit 2 (bad input, a missing file, a diverged run)
    error: <message> (<Type>; run with --debug or SBORA_DEBUG=1 for the traceback)    exit 1
    interrupted at step N; ... --resume          exit 130 (Ctrl-C)

The traceback of any error is shown with ``--debug`` or ``SBORA_DEBUG=1``.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable

from .adapters import AdapterFileError
from .checkpoint import CheckpointError
from .configuration import ConfigError
from .engine import TrainingInterrupted

DEBUG_ENV = "SBORA_DEBUG"
EXPECTED = (ConfigError, AdapterFileError, CheckpointError, FloatingPointError, OSError, ValueError)


def add_debug_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--debug", action="store_true", help=f"show the full traceback of an error (or set {DEBUG_ENV}=1)")


def debug_requested(argv: list[str]) -> bool:
    return "--debug" in argv or os.environ.get(DEBUG_ENV, "") not in ("", "0")


def run_main(body: Callable[[list[str]], int | None], argv: list[str] | None = None) -> int:
    """Run a command's `body(argv)`; turn its errors into one line on stderr and an exit code."""
    argv = sys.argv[1:] if argv is None else list(argv)
    try:
        return body(argv) or 0
    except TrainingInterrupted as e:
        print(f"\n{e}", file=sys.stderr)
        return 130
    except KeyboardInterrupt:
        print("\ninterrupted; nothing was written", file=sys.stderr)
        return 130
    except Exception as e:
        if debug_requested(argv):
            raise
        message = str(e).strip() or type(e).__name__
        if isinstance(e, EXPECTED):
            print(f"error: {message}", file=sys.stderr)
            return 2
        print(f"error: {message} ({type(e).__name__}; run with --debug or {DEBUG_ENV}=1 for the traceback)", file=sys.stderr)
        return 1
