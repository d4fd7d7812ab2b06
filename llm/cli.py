"""The command-line frame of the LLM commands: dataclass fields as options, YAML defaults, clean errors.

``--help`` shows, for every option, the value this command line will use and where it comes
from (``configs/llm/<config>.yaml``, or the dataclass). Errors go through the toolkit's one
error handler (``sbora_diffusion.cli``): one line, an exit code, the traceback with --debug.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from typing import TypeVar

from sbora_diffusion.cli import add_debug_flag, run_main
from sbora_diffusion.configuration import (
    ConfigError,
    add_arguments,
    aliases_help,
    canonical_argv,
    field_aliases,
    from_dict,
    load_yaml,
    overrides_from_args,
    resolve_named_config,
    shown_path,
)

T = TypeVar("T")


def load_config(cls: type[T], name: str | None, overrides: dict) -> T:
    """``configs/llm/<name>.yaml`` (or a YAML path; none if `name` is None) for `cls`, then `overrides`."""
    if name is None:
        return from_dict(cls, overrides, source="command line")
    path = resolve_named_config("llm", name)
    return from_dict(cls, {**load_yaml(path), **overrides}, source=str(path))


def command_aliases(cls: type, resumable: bool) -> dict[str, str]:
    """Other names of the options: the fields' own, and HF Trainer's --resume_from_checkpoint for --resume."""
    return {**field_aliases(cls), **({"resume-from-checkpoint": "resume"} if resumable else {})}


def build_parser(cls: type, prog: str, doc: str, argv: list[str], default_config: str | None, resumable: bool) -> argparse.ArgumentParser:
    aliases = command_aliases(cls, resumable)
    parser = argparse.ArgumentParser(prog=prog, description=doc, formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog=aliases_help(aliases) if aliases else None)
    defaults, source = None, None
    if default_config:
        parser.add_argument("--config", default=default_config, help=f"YAML under configs/llm/ (name) or a path, with {cls.__name__} fields (default: {default_config})")
        pre = argparse.ArgumentParser(add_help=False)
        pre.add_argument("--config", default=default_config)
        name = pre.parse_known_args(argv)[0].config
        try:
            path = resolve_named_config("llm", name)
            defaults, source = from_dict(cls, load_yaml(path), source=str(path)), shown_path(path)
        except ConfigError:
            source = "the --config YAML"
    if resumable:
        parser.add_argument("--resume", nargs="?", const=True, default=False, metavar="CHECKPOINT",
                            help="continue the run in the output folder from its newest checkpoint (or from the given step-N.pt file or folder); "
                            "with a larger --steps it trains on, the schedule stretched over the new total")
    add_debug_flag(parser)
    add_arguments(parser, cls, defaults=defaults, source=source)
    return parser


def run_command(cls: type[T], command: Callable[..., dict], prog: str, doc: str, argv: list[str] | None, default_config: str | None = None,
                report: Callable[[dict], None] | None = None, resumable: bool = False) -> int:
    """Parse `argv` into a `cls` config (every field an option) and run `command` on it; returns the exit code."""

    def body(args_list: list[str]) -> int:
        args_list = canonical_argv(args_list, command_aliases(cls, resumable))  # earlier names and underscores (--learning_rate) too
        args = build_parser(cls, prog, doc, args_list, default_config, resumable).parse_args(args_list)
        config = load_config(cls, getattr(args, "config", None), overrides_from_args(args, cls))
        result = command(config, resume=True if args.resume == "latest" else args.resume) if resumable else command(config)
        if report is not None:
            report(result)
        return 0

    return run_main(body, argv)
