"""The command-line frame shared by the LLM commands: dataclass fields as options, YAML defaults, clean errors."""

from __future__ import annotations

import argparse
import sys
from typing import Callable, TypeVar

from sbora_diffusion.configuration import ConfigError, add_arguments, from_dict, load_yaml, overrides_from_args, resolve_named_config

T = TypeVar("T")


def load_config(cls: type[T], name: str | None, overrides: dict) -> T:
    """``configs/llm/<name>.yaml`` (or a YAML path; none if `name` is None) for `cls`, then `overrides`."""
    if name is None:
        return from_dict(cls, overrides, source="command line")
    path = resolve_named_config("llm", name)
    return from_dict(cls, {**load_yaml(path), **overrides}, source=str(path))


def run_command(cls: type[T], command: Callable[[T], dict], prog: str, doc: str, argv: list[str] | None, default_config: str | None = None) -> dict:
    """Parse `argv` into a `cls` config (every field an option) and run `command` on it.

    Expected failures (bad config, missing files, bad data) end the program with a one-line
    ``error: ...`` instead of a traceback.
    """
    parser = argparse.ArgumentParser(prog=prog, description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    if default_config:
        parser.add_argument("--config", default=default_config, help=f"YAML under configs/llm/ (name) or a path, with {cls.__name__} fields (default: {default_config})")
    add_arguments(parser, cls)
    args = parser.parse_args(argv)
    try:
        return command(load_config(cls, getattr(args, "config", None), overrides_from_args(args, cls)))
    except (ConfigError, OSError, ValueError, FloatingPointError) as e:
        sys.exit(f"error: {e}")
