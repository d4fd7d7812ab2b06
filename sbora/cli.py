"""The command frame: every command is declared once, then parsed, layered, explained and failed the same way.

A command (``Command``) names its config sections (``Section``: a config dataclass whose every
field is an option ``--field``, optionally loaded from a YAML under ``configs/<kind>/`` that an
option names: ``--config``, ``--method``, ``--concept``), its plain flags (``Flag``), other
names of its options and other tools' names it refuses, whether it resumes, and the function
that runs it. For every command alike the frame then

- reads the command line with every option in its canonical spelling: underscores as dashes
  (``--learning_rate``), each field's earlier and other tools' names (``metadata={"aliases":
  ...}``), the flags' and the command's own; a refused name is an error that says what to use;
- layers each section (``configuration.layered``): the dataclass's defaults, its YAML, the
  command's own defaults for it, the mapping an earlier section nests for it (the LLM trainer's
  ``adapter:``), then the command line; typed and validated;
- shows in ``--help`` the value each option will take and where it comes from:
  ``(default: 16; from configs/methods/sbora-fa.yaml)``, ``(default: 0.9; built in)``;
- adds ``--debug`` to every command and ``--resume`` to resumable ones, and runs the command in
  ``run_main``, which turns its errors into one line and an exit code:

    error: <what is wrong and what to do>      exit 2 (bad input, an unknown option, a missing file, a diverged run)
    error: <message> (<Type>; run with --debug or SBORA_DEBUG=1 for the traceback)    exit 1
    interrupted at step N; ... --resume          exit 130 (Ctrl-C)

The traceback of any error is shown with ``--debug`` or ``SBORA_DEBUG=1``.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import os
import sys
import textwrap
import typing
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .adapters import AdapterFileError
from .checkpoint import CheckpointError, TrainingInterrupted
from .configuration import (
    ConfigError,
    field_aliases,
    from_dict,
    known_fields,
    layered,
    load_yaml,
    override,
    resolve_named_config,
    shown_path,
    unwrap_optional,
)

DEBUG_ENV = "SBORA_DEBUG"
EXPECTED = (ConfigError, AdapterFileError, CheckpointError, FloatingPointError, OSError, ValueError)
BUILT_IN = "built in"
COMMAND_LINE = "from the command line"
DEBUG_HELP = f"show the full traceback of an error (or set {DEBUG_ENV}=1)"
RESUME_HELP = ("continue the run in the output folder from its newest checkpoint (or from the given step-N.pt file or folder; "
               "'latest' = the newest); with a larger --steps it trains on, the schedule stretched over the new total")


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


def debug_requested(argv: list[str]) -> bool:
    return "--debug" in argv or os.environ.get(DEBUG_ENV, "") not in ("", "0")


# ---------------------------------------------------------------------------- the description of a command


def dash(name: str) -> str:
    """An option's name as typed, without its ``--``: ``batch_size`` -> ``batch-size``."""
    return name.replace("_", "-")


class Flag:
    """A plain option of a command beside its config sections: ``Flag("prompt", "a prompt; repeat for several", action="append")``.

    `shown` words the default in ``--help`` where the value alone does not say it ("the adapter's
    base model"); `aliases` are other names of it; `required`: the command needs it; `options` go
    to argparse (action, type, metavar, choices)."""

    def __init__(self, name: str, help: str, default: Any = None, *, shown: str | None = None, aliases: tuple[str, ...] = (),
                 required: bool = False, **options):
        self.name, self.help, self.default, self.shown, self.aliases = dash(name), help, default, shown, tuple(aliases)
        self.required, self.options = required, options

    @property
    def dest(self) -> str:
        return self.name.replace("-", "_")


class Context:
    """What a section's YAML name may depend on: the options as given and the sections resolved before it."""

    def __init__(self, args: argparse.Namespace, configs: dict[str, Any], command: Command):
        self.args, self.configs, self.command = args, configs, command

    def value(self, option: str) -> Any:
        """The value of `option`: an earlier section's field of that name, else the flag as given (None if not)."""
        name = option.replace("-", "_")
        for section in self.command.sections:
            if section.name in self.configs and name in section.option_names():
                return getattr(self.configs[section.name], name)
        return getattr(self.args, name, None)


@dataclass(frozen=True)
class Section:
    """One config dataclass of a command: every field an option ``--field`` (but mappings and `skip`), its values
    layered as the dataclass's defaults < its YAML < `defaults` < the mapping an earlier section nests for it < the command line.

    Its YAML is named by `option` (a flag the frame adds, or a field of an earlier section, such as
    the LLM trainer's ``method``), else by `default` (a name, or a function of the ``Context``, whose
    rule `default_source` words for --help); a bare name is ``configs/<kind>/<name>.yaml``, or `load`
    reads it: name -> (values, where they come from). `defaults` are the command's own values over the
    YAML's (values, how --help names them). `nested_in` = (section, field): that earlier section's
    mapping field holds this section's values, the command line's included (the LLM trainer's
    ``adapter:``). `required`: a YAML must be named."""

    name: str
    cls: type
    title: str = ""
    option: str | None = None
    option_help: str = ""
    kind: str | None = None
    default: str | Callable[[Context], str | Path | None] | None = None
    default_source: str = BUILT_IN
    load: Callable[[str], tuple[dict[str, Any], str]] | None = None
    defaults: tuple[dict[str, Any], str] | None = None
    nested_in: tuple[str, str] | None = None
    skip: tuple[str, ...] = ()
    required: bool = False

    def options(self) -> list[dataclasses.Field]:
        """The fields that are options: all but `skip` and mappings (YAML only, or another section's values)."""
        types_ = typing.get_type_hints(self.cls)
        return [f for f in dataclasses.fields(self.cls) if f.name not in self.skip and not _is_mapping(types_[f.name])]

    def option_names(self) -> set[str]:
        return {f.name for f in self.options()}

    def read(self, name: str) -> tuple[dict[str, Any], str]:
        """(values, where from) of the YAML `name`."""
        if self.load is not None:
            return self.load(name)
        return yaml_layer(self.kind, name)


@dataclass(frozen=True)
class Command:
    """A command: its sections and flags, other names of its options (``{alias: option}``, dash forms) and the
    names it refuses (``{name: what to do instead}``, from the tool `refused_by`), a `note` for the end of --help,
    `prepare(args, overrides) -> overrides` (checks the flags and adjusts the command line's values before the
    configs are built), `run(invocation)` -> exit code or None; or `subcommands` instead (``sbora-evaluate score``)."""

    prog: str
    doc: str
    run: Callable[[Invocation], int | None] | None = None
    sections: tuple[Section, ...] = ()
    flags: tuple[Flag, ...] = ()
    aliases: dict[str, str] = field(default_factory=dict)
    refused: dict[str, str] = field(default_factory=dict)
    refused_by: str = ""
    note: str = ""
    resumable: bool = False
    prepare: Callable[[argparse.Namespace, dict[str, dict[str, Any]]], dict[str, dict[str, Any]]] | None = None
    subcommands: dict[str, Command] = field(default_factory=dict)

    @property
    def summary(self) -> str:
        return self.doc.strip().splitlines()[0] if self.doc.strip() else ""

    def main(self, argv: list[str] | None = None) -> int:
        """The command's entry point: parse `argv` (default: sys.argv), run it, return the exit code."""
        return run_command(self, argv)


@dataclass
class Invocation:
    """A parsed command line: each section's typed config, the command line's own values per section, every option as parsed."""

    command: Command
    configs: dict[str, Any]
    overrides: dict[str, dict[str, Any]]
    args: argparse.Namespace
    resume: bool | str = False


def yaml_layer(kind: str | None, name: str | Path) -> tuple[dict[str, Any], str]:
    """(values, "from configs/<kind>/<name>.yaml") of a YAML: a bare name under ``configs/<kind>/``, or a path (the only
    kind of name without a `kind`)."""
    path = resolve_named_config(kind, name) if kind else Path(name)
    return load_yaml(path), f"from {shown_path(path)}"


# ---------------------------------------------------------------------------- parsing


def run_command(command: Command, argv: list[str] | None = None) -> int:
    """Parse `argv` for `command` and run it, errors through ``run_main``; returns the exit code."""

    def body(args: list[str]) -> int | None:
        invocation = parse(command, args)
        return invocation.command.run(invocation)

    return run_main(body, argv)


def parse(command: Command, argv: list[str]) -> Invocation:
    """`argv` as `command` reads it: canonical names, argparse, `prepare`, then each section layered and validated.

    A bad option or value is a ConfigError (one line, exit 2 under ``run_main``); --help prints and exits 0."""
    if command.subcommands:
        command, argv = _subcommand(command, argv)
    args, overrides = read_command_line(command, argv)
    for flag in command.flags:
        if flag.required and getattr(args, flag.dest) in (None, []):
            raise ConfigError(f"give --{flag.name}{_also(command, flag.name)}: {flag.help} (see {command.prog} --help)")
    if command.prepare is not None:
        overrides = command.prepare(args, overrides)
    resolved = _resolve(command, args, overrides, strict=True)
    for section in _yaml_options(command):  # such an option holds the YAML name used (its default when not given)
        if getattr(args, section.option.replace("-", "_")) is None:
            setattr(args, section.option.replace("-", "_"), resolved.yamls[section.name][0])
    resume = getattr(args, "resume", False)
    return Invocation(command, resolved.configs, overrides, args, True if resume == "latest" else resume)


def read_command_line(command: Command, argv: list[str]) -> tuple[argparse.Namespace, dict[str, dict[str, Any]]]:
    """(every option as parsed, per section the fields the command line gives) of `argv`, its names made canonical first."""
    argv = canonical_argv(argv, command_aliases(command), command.refused, command.refused_by)
    args = build_parser(command, argv).parse_args(argv)
    return args, _command_line(command, args)


def build_parser(command: Command, argv: list[str] | None = None) -> argparse.ArgumentParser:
    """The parser of `command`, its --help showing the values this (canonical) `argv` will give each option and where from."""
    argv = list(argv or [])
    skeleton = _parser(command, None)
    try:
        known = skeleton.parse_known_args(argv)[0]
    except ConfigError:  # a malformed option: --help then shows the values without the command line's
        known = skeleton.parse_known_args([])[0]
    return _parser(command, _resolve(command, known, _command_line(command, known), strict=False))


def command_aliases(command: Command) -> dict[str, str]:
    """Every other name of the command's options (dash forms): the fields', the flags', HF's for --resume, the command's own."""
    aliases = field_aliases(*(s.cls for s in command.sections))
    for flag in command.flags:
        aliases.update({dash(a): flag.name for a in flag.aliases})
    if command.resumable:
        aliases["resume-from-checkpoint"] = "resume"  # transformers' Trainer and diffusers' scripts
    return {**aliases, **command.aliases}


def canonical_argv(argv: list[str], aliases: dict[str, str], refused: dict[str, str] | None = None, source: str = "") -> list[str]:
    """`argv` with every option in its canonical spelling: underscores as dashes, `aliases`
    (``{name: option}``, dash forms) replaced by the option they stand for (``--name=value`` too).

    An option named in `refused` (``{name: why}``) is an error that says it has no equivalent
    here and what to do instead; `source` names where such names come from (e.g. "diffusers").
    """
    out = []
    for token in argv:
        if token.startswith("--") and len(token) > 2:
            flag, eq, value = token[2:].partition("=")
            name = dash(flag)
            if refused and name in refused:
                raise ConfigError(f"--{flag}{f' ({source})' if source else ''} has no equivalent here: {refused[name]}")
            token = f"--{aliases.get(name, name)}{eq}{value}"
        out.append(token)
    return out


def _subcommand(command: Command, argv: list[str]) -> tuple[Command, list[str]]:
    """(the subcommand named first in `argv`, as `<prog> <name>`, and the rest of `argv`); --help or an error otherwise."""
    at = next((i for i, a in enumerate(argv) if not a.startswith("-")), None)
    if at is None or argv[at] not in command.subcommands:
        top = _Parser(prog=command.prog, description=command.doc, formatter_class=argparse.RawDescriptionHelpFormatter)
        top.add_argument("command", choices=list(command.subcommands), help="; ".join(f"{n}: {c.summary}" for n, c in command.subcommands.items()))
        top.add_argument("--debug", action="store_true", help=DEBUG_HELP)
        top.parse_args(argv)  # prints --help, or fails naming the subcommands
        raise ConfigError(f"give a subcommand: {', '.join(command.subcommands)} (see {command.prog} --help)")
    sub = dataclasses.replace(command.subcommands[argv[at]], prog=f"{command.prog} {argv[at]}")
    return sub, argv[:at] + argv[at + 1 :]


def _command_line(command: Command, args: argparse.Namespace) -> dict[str, dict[str, Any]]:
    """Per section, the fields given on the command line (a list option's every occurrence, each split on commas)."""
    out = {}
    for section in command.sections:
        given = {}
        for f in section.options():
            value = getattr(args, f.name, None)
            if value is not None:
                given[f.name] = [item.strip() for v in value for item in v.split(",") if item.strip()] if _is_list(section.cls, f.name) else value
        out[section.name] = given
    return out


@dataclass
class _Resolved:
    configs: dict[str, Any]
    sources: dict[str, dict[str, str]]  # section -> field -> where its value comes from
    notes: dict[str, str]  # section -> why its values could not be read (--help only)
    yamls: dict[str, tuple[str | None, str]]  # section -> (the YAML named, where that name comes from)


def _resolve(command: Command, args: argparse.Namespace, overrides: dict[str, dict[str, Any]], strict: bool) -> _Resolved:
    """Each section's config from its layers, in order (a later section's YAML may depend on an earlier one).

    A section that nests another holds, in that mapping field, its own YAMLs' mapping and the nested
    section's command-line values, so that it is validated once, with the values the run will use.
    Not `strict` (for --help): a section that cannot be read keeps its dataclass's values and a note why."""
    done = _Resolved({}, {}, {}, {})
    below: dict[tuple[str, str], tuple[dict, str]] = {}  # (section, mapping field) -> (the mapping its YAML layers give, where from)
    for section in command.sections:
        nests = [s for s in command.sections if s.nested_in and s.nested_in[0] == section.name]
        try:
            name, origin = _yaml_name(section, Context(args, done.configs, command))
            done.yamls[section.name] = (name, origin)
            if name is None and section.required and strict:  # --help shows it as required instead
                raise ConfigError(f"give --{dash(section.option)}{_also(command, section.option)}: {section.option_help} (see {command.prog} --help)")
            layers = [section.read(name)] if name is not None else []
            if section.defaults is not None:
                layers.append(section.defaults)
            if section.nested_in is not None and section.nested_in in below:
                layers.append(below[section.nested_in])
            layers = [(_known(command, section, values, label), label) for values, label in layers]
            for nested in nests:  # what the YAML layers give the mapping, for the nested section's own layers
                key = nested.nested_in[1]
                below[(section.name, key)] = (layered(*(v[key] for v, _ in layers if key in v)), next((l for v, l in reversed(layers) if key in v), BUILT_IN))
            given = {**overrides.get(section.name, {}), **{s.nested_in[1]: overrides[s.name] for s in nests if overrides.get(s.name)}}
            layers.append((given, COMMAND_LINE))
            config = from_dict(section.cls, layered(*(values for values, _ in layers)), source=section.title or section.name)
        except ConfigError as e:
            if strict:
                raise
            done.notes[section.name] = str(e)
            config, layers = section.cls(), []
        done.configs[section.name] = config
        done.sources[section.name] = {key: label for values, label in layers for key in values}
        if section.nested_in is not None and section.nested_in[0] in done.configs and overrides.get(section.name):
            parent, key = section.nested_in  # the command line's values, typed now, in the nesting section's mapping
            typed = {k: getattr(config, k) for k in known_fields(section.cls, overrides[section.name], COMMAND_LINE)}
            try:
                done.configs[parent] = override(done.configs[parent], {key: typed}, source=section.title or section.name)
            except ConfigError as e:
                if strict:
                    raise
                done.notes[section.name] = str(e)
    return done


def _known(command: Command, section: Section, values: dict[str, Any], label: str) -> dict[str, Any]:
    """`values` keyed by `section`'s fields (``configuration.known_fields``); an unknown key that belongs to a section
    nested in this one gets told where it goes (``rank`` of the LLM trainer: under ``adapter:``)."""
    try:
        return known_fields(section.cls, values, label.removeprefix("from "))
    except ConfigError as e:
        homes = [f"put {', '.join(sorted(set(values) & s.option_names()))} under {s.nested_in[1]}:" for s in command.sections
                 if s.nested_in and s.nested_in[0] == section.name and set(values) & s.option_names()]
        raise ConfigError("; ".join([str(e), *homes])) from None


def _also(command: Command, option: str) -> str:
    """" (or --other-name)" for an option that has other names, for messages."""
    others = [f"--{a}" for a, o in command_aliases(command).items() if o == dash(option)]
    return f" (or {', '.join(others)})" if others else ""


def _yaml_name(section: Section, context: Context) -> tuple[str | None, str]:
    """(the YAML name of `section`, where that name comes from)."""
    if section.option is None:
        return None, BUILT_IN
    value = context.value(section.option)
    if value is not None:
        return str(value), COMMAND_LINE
    default = section.default(context) if callable(section.default) else section.default
    return (None if default is None else str(default)), section.default_source


# ---------------------------------------------------------------------------- the parser and its --help


class _Parser(argparse.ArgumentParser):
    """argparse whose errors are one line through ``run_main`` (exit 2), with the closest option for a mistyped one."""

    option_names: list[str] = []

    def error(self, message: str):
        unknown = [t.split("=")[0] for t in message.partition("unrecognized arguments: ")[2].split() if t.startswith("--")]
        hints = "".join(f"; did you mean {close[0]}?" for u in unknown if (close := difflib.get_close_matches(u, self.option_names, n=1)))
        raise ConfigError(f"{message}{hints} (see {self.prog} --help)")


def shown_value(value: Any) -> str:
    """A value as --help shows it: lists comma-separated, none, on/off."""
    if value is None:
        return "none"
    if isinstance(value, bool):
        return "on" if value else "off"
    if isinstance(value, (list, tuple)):
        return ",".join(map(str, value))
    if value == "":
        return "''"
    return shown_path(value) if isinstance(value, Path) else str(value)


def _default_text(value: Any, source: str) -> str:
    return f"(default: {shown_value(value)}; {source})"


def _parser(command: Command, shown: _Resolved | None) -> _Parser:
    """The argparse parser of `command`; `shown` (None: a skeleton for reading the options given, without --help) puts each
    option's value and source into its help."""
    skeleton = shown is None
    parser = _Parser(prog=command.prog, description=command.doc, epilog=None if skeleton else _epilog(command),
                     formatter_class=argparse.RawDescriptionHelpFormatter, add_help=not skeleton)
    names = []

    def add(group, name: str, help_: str, **options) -> None:
        names.append(f"--{name}")
        group.add_argument(f"--{name}", help=help_.replace("%", "%%"), **options)

    for section in _yaml_options(command):
        name, origin = shown.yamls.get(section.name, (None, BUILT_IN)) if shown else (None, BUILT_IN)
        text = "(required)" if section.required and name is None else _default_text(name, origin)
        add(parser, dash(section.option), f"{section.option_help} {text}", dest=section.option.replace("-", "_"), default=None)
    for flag in command.flags:
        text = "(required)" if flag.required else _default_text(flag.shown or flag.default, BUILT_IN)
        add(parser, flag.name, f"{flag.help} {text}", dest=flag.dest, default=flag.default, **flag.options)
    if command.resumable:
        add(parser, "resume", f"{RESUME_HELP} {_default_text(False, BUILT_IN)}", nargs="?", const=True, default=False, metavar="CHECKPOINT")
    add(parser, "debug", f"{DEBUG_HELP} {_default_text(False, BUILT_IN)}", action="store_true")
    for section in command.sections:
        note = shown.notes.get(section.name) if shown else None
        if note:
            note = f"(its values could not be read: {note})"
        elif shown and section.required and shown.yamls.get(section.name, (None,))[0] is None:
            note = f"(give --{dash(section.option)} to see the values it sets)"
        group = parser.add_argument_group(section.title or f"{section.cls.__name__} options", note)
        config = shown.configs[section.name] if shown else section.cls()
        sources = shown.sources.get(section.name, {}) if shown else {}
        types_ = typing.get_type_hints(section.cls)
        for f in section.options():
            inner, _ = unwrap_optional(types_[f.name])
            help_ = f"{f.metadata.get('help', '')} {_default_text(getattr(config, f.name), sources.get(f.name, BUILT_IN))}"
            if inner is bool:
                add(group, dash(f.name), help_, dest=f.name, action=argparse.BooleanOptionalAction, default=None)
            elif _is_list(section.cls, f.name):
                add(group, dash(f.name), help_, dest=f.name, action="append", default=None, metavar="LIST")
            else:
                add(group, dash(f.name), help_, dest=f.name, default=None, metavar=getattr(inner, "__name__", "value").upper())
    parser.option_names = names
    return parser


def _yaml_options(command: Command) -> list[Section]:
    """The sections whose YAML-naming option the frame adds (one not already a field or a flag of the command)."""
    taken = {f.name for s in command.sections for f in s.options()} | {f.dest for f in command.flags}
    found = {}
    for section in command.sections:
        if section.option is not None and section.option.replace("-", "_") not in taken:
            found.setdefault(section.option.replace("-", "_"), section)
    return list(found.values())


def _epilog(command: Command) -> str | None:
    """The other names that work and the refused ones (then the command's note)."""
    aliases = command_aliases(command)
    example = next((n for n in (f.name for s in command.sections for f in s.options()) if "_" in n), None)
    parts = []
    if aliases:
        names = ", ".join(f"--{a} = --{o}" for a, o in sorted(aliases.items(), key=lambda kv: kv[1]))
        parts.append(f"Other names that work{f' (every option also with underscores, e.g. --{example})' if example else ''}: {names}.")
    if command.refused:
        parts.append(f"Refused{f' {command.refused_by}' if command.refused_by else ''} options, which have no equivalent here (the error says "
                     "what to use instead): " + ", ".join(f"--{n}" for n in sorted(command.refused)) + ".")
    text = "\n".join(textwrap.fill(part, width=100, break_on_hyphens=False) for part in [*parts, command.note] if part)
    return text or None


def _is_mapping(tp: Any) -> bool:
    inner, _ = unwrap_optional(tp)
    return inner is dict or typing.get_origin(inner) is dict


def _is_list(cls: type, name: str) -> bool:
    inner, _ = unwrap_optional(typing.get_type_hints(cls)[name])
    return typing.get_origin(inner) in (list, tuple)
