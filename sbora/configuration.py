"""Typed dataclass configs that load from YAML and take overrides.

One mechanism for every config in the project (adapter methods, concept training, LLM
training, composition, evaluation, the app, the benchmarks): a dataclass whose fields carry
``metadata={"help": ...}``, YAML files with a subset of its fields, and overrides in layers
(``layered``: later values win; a mapping field such as the LLM trainer's nested ``adapter``
merges into the one below it). The command frame (``sbora/cli.py``) turns every field into an
option ``--field`` and layers the YAMLs and the command line with these functions.

Other names of a field: a field may list earlier names or other tools' names under
``metadata={"aliases": (...)}`` (``max-train-steps`` and diffusers' ``max_train_steps`` for
``steps``, ``base`` for ``model``); they are accepted as YAML keys and as options alike
(``known_fields``), so renaming a field keeps its old name working.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

import yaml

T = TypeVar("T")

# One source of truth: configs/ at the repository's top. A built wheel carries a copy of it as
# sbora/configs/ (setup.py's build step), which a non-editable install reads instead.
_PACKAGED = Path(__file__).resolve().parent / "configs"
CONFIG_DIR = _PACKAGED if _PACKAGED.is_dir() else Path(__file__).resolve().parent.parent / "configs"


class ConfigError(ValueError):
    """A config file or a config value is wrong; the message says what to change."""


def unwrap_optional(tp: Any) -> tuple[Any, bool]:
    """``Optional[X]`` / ``X | None`` -> (X, True); anything else -> (tp, False)."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1 and len(typing.get_args(tp)) == 2:
            return args[0], True
    return tp, False


def coerce(value: Any, tp: Any, name: str) -> Any:
    """Convert a YAML or command-line value to the field's declared type."""
    inner, optional = unwrap_optional(tp)
    if value is None or (optional and isinstance(value, str) and value.lower() in ("none", "null")):
        return None
    if dataclasses.is_dataclass(inner):  # a nested config (e.g. one entry of a list in YAML)
        if isinstance(value, inner):
            return value
        if not isinstance(value, dict):
            raise ConfigError(f"config field '{name}' expects a mapping of {inner.__name__} fields, got {value!r}")
        return from_dict(inner, value, source=f"config field '{name}'")
    origin = typing.get_origin(inner)
    if origin is dict or inner is dict:  # a nested mapping of overrides (the LLM trainer's adapter)
        if not isinstance(value, dict):
            raise ConfigError(f"config field '{name}' expects a mapping of field: value, got {value!r}")
        return dict(value)
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
    """A copy of ``config`` with the fields in ``data`` replaced (values coerced to type; a mapping
    field's mapping merges into the current one), then validated."""
    data = known_fields(type(config), data, source)
    types_ = typing.get_type_hints(type(config))
    data = layered({k: getattr(config, k) for k in data}, data)
    new = dataclasses.replace(config, **{k: coerce(v, types_[k], k) for k, v in data.items()})
    validate = getattr(new, "validate", None)
    if validate is not None:
        validate()
    return new


def known_fields(cls: type, data: dict[str, Any], source: str) -> dict[str, Any]:
    """`data` keyed by ``cls``'s field names: dashes read as underscores, a field's aliases as the field;
    an unknown key, or one field given twice under two names, is a ConfigError naming `source`."""
    names = {f.name for f in dataclasses.fields(cls)}
    aliases = {alias.replace("-", "_"): option.replace("-", "_") for alias, option in field_aliases(cls).items()}
    out: dict[str, Any] = {}
    given: dict[str, str] = {}
    unknown = []
    for key, value in data.items():
        name = str(key).replace("-", "_")
        name = name if name in names else aliases.get(name, name)
        if name not in names:
            unknown.append(str(key))
        elif name in out:
            raise ConfigError(f"{source}: {given[name]} and {key} are one field ({name}); give it once")
        else:
            out[name], given[name] = value, str(key)
    if unknown:
        raise ConfigError(f"{source}: unknown field(s) {', '.join(sorted(unknown))}; "
                          f"valid fields of {cls.__name__}: {', '.join(sorted(names))}")
    return out


def layered(*layers: dict[str, Any]) -> dict[str, Any]:
    """The layers' values in one dict, later layers winning; a mapping value merges into a mapping below it."""
    out: dict[str, Any] = {}
    for layer in layers:
        for key, value in layer.items():
            below = out.get(key)
            out[key] = {**below, **value} if isinstance(value, dict) and isinstance(below, dict) else value
    return out


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


def field_aliases(*classes: type) -> dict[str, str]:
    """``{alias: option}`` (dash forms, no leading ``--``) from the fields' ``metadata["aliases"]``."""
    return {alias.replace("_", "-"): f.name.replace("_", "-") for cls in classes for f in dataclasses.fields(cls)
            for alias in f.metadata.get("aliases", ())}
