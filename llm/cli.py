"""The LLM commands on the toolkit's command frame (``sbora/cli.py``): each one config dataclass, its
defaults from ``configs/llm/<name>.yaml`` (``--config``), every field an option, ``--help`` showing
the value each option will take and where it comes from, errors as one line."""

from __future__ import annotations

from collections.abc import Callable

from sbora.cli import Command, Invocation, Section

CONFIGS = "llm"  # configs/llm/<name>.yaml


def llm_command(cls: type, command: Callable[..., dict], prog: str, doc: str, config: str | None = None,
                report: Callable[[dict], None] | None = None, resumable: bool = False, sections: tuple[Section, ...] = ()) -> Command:
    """The command that runs ``command(config)`` (with ``resume=`` when `resumable`) on a `cls` config, then ``report(result)``.

    With `config` (a name under configs/llm/), ``--config`` names the YAML its defaults come from. The
    config's section is called "config"; `sections` follow it (the trainer's adapter options)."""
    main = Section("config", cls, title=f"{cls.__name__} options", option="config" if config else None, kind=CONFIGS, default=config,
                   option_help=f"YAML under configs/llm/ (a name) or a path, with {cls.__name__} fields")

    def run(invocation: Invocation) -> None:
        resolved = invocation.configs["config"]
        result = command(resolved, resume=invocation.resume) if resumable else command(resolved)
        if report is not None:
            report(result)

    return Command(prog, doc, run, sections=(main, *sections), resumable=resumable)
