"""Typed dataclass configs that load from YAML and take command-line overrides.

One mechanism for every config in the project (adapter methods, concept training, LLM
training): a dataclass whose fields carry ``metadata={"help": ...}``, a YAML file with a
subset of its fields, and an argparse parser generated from the fields so that every field
can be overridden as ``--field value`` and ``--help`` explains each of them.

Other spellings of an option (``canonical_argv``): every option is also accepted with
underscores (``--train_batch_size`` = ``--train-batch-size``), and a field may list earlier
names or other tools' names under ``metadata={"aliases": (...)}`` (``--max-train-steps`` and
diffusers' ``--max_train_steps`` for ``--steps``). Names of other tools' options that have no
equivalent here are refused with a message saying so.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import textwrap
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

import yaml

T = TypeVar("T")

# One source of truth: configs/ at the repository's top. A built wheel carries a copy of it as
# sbora_diffusion/configs/ (setup.py's build step), which a non-editable install reads instead.
_PACKAGED = Path(__file__).resolve().parent / "configs"
CONFIG_DIR = _PACKAGED if _PACKAGED.is_dir() else Path(__file__).resolve().parent.parent / "configs"


class ConfigError(ValueError):
    """A config file or a config value is wrong; the message says what to change."""


def _field_types(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _unwrap_optional(tp: Any) -> tuple[Any, bool]:
    """``Optional[X]`` / ``X | None`` -> (X, True); anything else -> (tp, False)."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1 and len(typing.get_args(tp)) == 2:
            return args[0], True
    return tp, False


def coerce(value: Any, tp: Any, name: str) -> Any:
    """Convert a YAML or command-line value to the field's declared type."""
    inner, optional = _unwrap_optional(tp)
    if value is None or (optional and isinstance(value, str) and value.lower() in ("none", "null")):
        return None
    if dataclasses.is_dataclass(inner):  # a nested config (e.g. one entry of a list in YAML)
        if isinstance(value, inner):
            return value
        if not isinstance(value, dict):
            raise ConfigError(f"config field '{name}' expects a mapping of {inner.__name__} fields, got {value!r}")
        return from_dict(inner, value, source=f"config field '{name}'")
    origin = typing.get_origin(inner)
    try:
        if origin in (list, tuple):
            (item_tp, *_) = typing.get_args(inner) or (str,)
            if isinstance(value, str):
                value = [v.strip() for v in value.split(",") if v.strip()]
            return [coerce(v, item_tp, name) for v in value]
        if inner is bool:
            if isinstance(value, bool):
                return value
            if str(value).lower() in ("1", "true", "yes", "on"):
                return True
            if str(value).lower() in ("0", "false", "no", "off"):
                return False
            raise ValueError(value)
        if inner is int:
            if isinstance(value, float) and not value.is_integer():
                raise ValueError(value)
            return int(value)
        if inner is float:
            number = float(value)
            if math.isfinite(number):
                return number
        if inner is str:
            return str(value)
    except ConfigError:
        raise  # already says what is wrong (a nested config, a non-finite number)
    except (TypeError, ValueError):
        raise ConfigError(f"config field '{name}' expects {getattr(inner, '__name__', inner)}, got {value!r}") from None
    if inner is float:
        raise ConfigError(f"config field '{name}' must be a finite number, got {value!r}")
    return value


def from_dict(cls: type[T], data: dict[str, Any], source: str = "config") -> T:
    """Build ``cls`` from a dict, refusing unknown keys (a typo must not pass silently)."""
    return override(cls(), data, source)


def override(config: T, data: dict[str, Any], source: str = "override") -> T:
    """A copy of ``config`` with the fields in ``data`` replaced (values coerced to type)."""
    types_ = _field_types(type(config))
    unknown = sorted(set(data) - set(types_))
    if unknown:
        raise ConfigError(
            f"{source}: unknown field(s) {', '.join(unknown)}; "
            f"valid fields of {type(config).__name__}: {', '.join(sorted(types_))}"
        )
    values = {k: coerce(v, types_[k], k) for k, v in data.items()}
    new = dataclasses.replace(config, **values)
    validate = getattr(new, "validate", None)
    if validate is not None:
        validate()
    return new


def check_fields(config: Any, ranges: dict[str, tuple]) -> None:
    """Validate numeric fields: finite, and within ``(low, high[, "open"|"right-open"])`` (None: unbounded).

    Bounds are inclusive unless marked: "open" excludes both ends, "right-open" the upper one.
    The error names the field, its value and the allowed range.
    """
    for name, (low, high, *kind) in ranges.items():
        value = getattr(config, name)
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise ConfigError(f"{name} must be a finite number, got {value!r}")
        open_low = kind == ["open"]
        open_high = kind in (["open"], ["right-open"])
        too_low = low is not None and (value <= low if open_low else value < low)
        too_high = high is not None and (value >= high if open_high else value > high)
        if too_low or too_high:
            lo = "" if low is None else f"{low} {'<' if open_low else '<='} "
            hi = "" if high is None else f" {'<' if open_high else '<='} {high}"
            raise ConfigError(f"{name} must satisfy {lo}{name}{hi}, got {value}")


def load_yaml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"config file {path} is not valid YAML: {e}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must hold a mapping of field: value")
    return data


def resolve_named_config(kind: str, name_or_path: str | Path) -> Path:
    """``configs/<kind>/<name>.yaml`` for a bare name, else the given path."""
    p = Path(name_or_path)
    if p.suffix in (".yaml", ".yml") or p.is_file():
        if not p.is_file():
            raise ConfigError(f"config file {p} does not exist")
        return p
    candidate = CONFIG_DIR / kind / f"{name_or_path}.yaml"
    if not candidate.is_file():
        known = sorted(f.stem for f in (CONFIG_DIR / kind).glob("*.yaml"))
        raise ConfigError(
            f"unknown {kind[:-1] if kind.endswith('s') else kind} '{name_or_path}': no {shown_path(candidate)}; "
            f"known: {', '.join(known) or '(none)'}; or pass a path to a YAML file"
        )
    return candidate


def shown_path(path: Path) -> str:
    """A config path as the user would type it: configs/<kind>/<name>.yaml for the shipped ones."""
    path = Path(path).resolve()
    return str(Path("configs") / path.relative_to(CONFIG_DIR)) if path.is_relative_to(CONFIG_DIR) else str(path)


def to_dict(config: Any) -> dict[str, Any]:
    return dataclasses.asdict(config)


def add_arguments(
    parser: argparse.ArgumentParser, cls: type, skip: tuple[str, ...] = (), defaults: Any = None, source: str | None = None,
    title: str | None = None,
) -> None:
    """One ``--field`` option per dataclass field, default None (= keep the YAML/dataclass value).

    The help of each option shows the value the run will use: the field's value in `defaults`
    (the config resolved from YAML for this command line), else the dataclass default, and
    `source` says where it comes from (e.g. "configs/train/tiny.yaml").
    """
    types_ = _field_types(cls)
    values = defaults if defaults is not None else cls()
    origin = f"; from {source}" if source else ""
    group = parser.add_argument_group(title or f"{cls.__name__} fields (override the YAML config)")
    for f in dataclasses.fields(cls):
        if f.name in skip:
            continue
        inner, _ = _unwrap_optional(types_[f.name])
        value = getattr(values, f.name)
        shown = ",".join(map(str, value)) if isinstance(value, (list, tuple)) else "none" if value is None else value
        help_ = f"{f.metadata.get('help', '')} (default: {shown}{origin})".replace("%", "%%")
        flag = "--" + f.name.replace("_", "-")
        if inner is bool:
            group.add_argument(flag, dest=f.name, action=argparse.BooleanOptionalAction, default=None, help=help_)
        else:
            kind = "comma-separated list" if typing.get_origin(inner) in (list, tuple) else getattr(inner, "__name__", "value")
            group.add_argument(flag, dest=f.name, default=None, metavar=kind.upper().replace("-", "_"), help=help_)


def field_aliases(*classes: type) -> dict[str, str]:
    """``{alias: option}`` (dash forms, no leading ``--``) from the fields' ``metadata["aliases"]``."""
    return {alias.replace("_", "-"): f.name.replace("_", "-") for cls in classes for f in dataclasses.fields(cls)
            for alias in f.metadata.get("aliases", ())}


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
            name = flag.replace("_", "-")
            if refused and name in refused:
                raise ConfigError(f"--{flag}{f' ({source})' if source else ''} has no equivalent here: {refused[name]}")
            token = f"--{aliases.get(name, name)}{eq}{value}"
        out.append(token)
    return out


def aliases_help(aliases: dict[str, str], refused: dict[str, str] | None = None, source: str = "", note: str = "") -> str:
    """A ``--help`` epilog listing the other names that work and the refused ones (then `note`)."""
    names = ", ".join(f"--{a} = --{o}" for a, o in sorted(aliases.items(), key=lambda kv: kv[1]))
    parts = [f"Other names that work (every option also with underscores, e.g. --max_train_steps): {names}."]
    if refused:
        parts.append(f"Refused{f' {source}' if source else ''} options, which have no equivalent here (the error says what to use "
                     "instead): " + ", ".join(f"--{n}" for n in sorted(refused)) + ".")
    return "\n".join(textwrap.fill(part, width=100, break_on_hyphens=False) for part in [*parts, note] if part)


def overrides_from_args(args: argparse.Namespace, cls: type) -> dict[str, Any]:
    """The dataclass fields given on the command line (those not left at None)."""
    names = {f.name for f in dataclasses.fields(cls)}
    return {k: v for k, v in vars(args).items() if k in names and v is not None}
