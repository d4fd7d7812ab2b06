"""The method registry: the one place that says what a method is and what it can do (docs/architecture.md §2).

Every command line (its ``--method`` choices and help), the app, export, composition and every
benchmark's method and label tables read ``METHOD_SPECS``; nothing else lists methods. A method
(``--method NAME``) is one of:

- a **core method**: a core class of its own (``METHODS``, the name ``AdapterConfig.method``
  takes), with ``configs/methods/<name>.yaml``;
- a **procedure method**: a core method plus a training procedure its YAML turns on
  (``delta-lora``: LoRA with Delta-LoRA, ``delta: true``);
- a **peft baseline**: peft's own layers with a core method's settings (``peft-dora``: the LLM
  trainer's DoRA baseline; ``peft-lora``: the benchmarks' reference), trained and measured
  beside ours, never one of our files.

A ``MethodSpec`` gives its core class, its YAML, its display label, the side its slots partition
(input columns, output rows, basis vectors, or none), its index layouts, which trainers train
it, which export formats its adapters go to, whether ``--delta`` applies, whether it is
peft-backed and the target preset it needs. ``tests/test_methods.py`` walks the registry and
checks each capability through the real entry points.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..configuration import ConfigError
from .base import Core
from .config import DEFAULT_METHOD, KNOWN_METHODS, LAYOUTS, AdapterConfig
from .dense import DenseCore
from .difflora import DiffLoRACore
from .lora import LoRACore
from .ortho import OrthoCore
from .sbora import SBoRAFACore, SBoRAFBCore

CONCEPT, LLM = "concept", "llm"  # the trainers: train_concept.py (sbora_diffusion.concept) and llm.train
TRAINER_NAMES = {CONCEPT: "the concept trainer (train_concept.py)", LLM: "the LLM trainer (sbora-llm-train)"}
REFERENCE_METHOD = "lora"  # what comparisons are made to: LoRA, the standard (its peft twin where times are compared)
EXPORT_FORMATS = ("diffusers", "kohya", "peft")  # sbora-export --format (sbora_diffusion.export)
# What a method's slots partition: ``slot_side`` -> the words messages use, and the layer dimension it cuts.
SLOT_SPACES = {"columns": "input columns", "rows": "output rows", "basis": "basis vectors"}
SLOT_DIMS = {"columns": "in", "rows": "out", "basis": "in"}  # ortho's basis vectors span the input space


@dataclass(frozen=True)
class MethodSpec:
    """What one method is and can do."""

    name: str  # its --method value
    label: str  # its display label (benchmark tables, plots)
    core: type[Core] | None  # its core class; None: peft's own layers
    base: str | None = None  # the core method it builds on (a procedure method, a peft baseline); None: a core method itself
    delta: bool = False  # its YAML turns Delta-LoRA on (delta: true)
    slot_side: str | None = None  # what its slots partition: columns, rows, basis (``SLOT_SPACES``); None: no slots
    layouts: tuple[str, ...] = ()  # the index layouts its slots can take (``LAYOUTS``), the fastest to switch (merge) first; ()
    # when its indices do not depend on a layout
    low_rank: bool = True  # rank and alpha apply (Custom Diffusion's dense ΔW has none)
    targets: str | None = None  # the target preset its YAML sets and its method needs (None: any, the trainer's default)
    trainers: tuple[str, ...] = (CONCEPT, LLM)  # which trainers train it (``CONCEPT``, ``LLM``); (): measured by the benchmarks only
    export_formats: tuple[str, ...] = EXPORT_FORMATS  # what sbora-export writes its adapters as
    peft_options: tuple[tuple[str, Any], ...] = ()  # peft-backed: the LoraConfig options that make it (use_dora, ...)
    peft_backed: bool = False  # peft's own layers, not one of our cores
    baseline_of: str | None = None  # peft's implementation of this one of ours: beside it, ours is labelled "(ours)"

    @property
    def config_method(self) -> str:
        """The ``AdapterConfig.method`` (core) it trains: its own name, or the core method it builds on."""
        return self.base or self.name

    @property
    def yaml(self) -> str:
        """The ``configs/methods/<yaml>.yaml`` its settings come from (a peft baseline takes its base's)."""
        return self.base if self.peft_backed else self.name

    @property
    def composable(self) -> bool:
        """Adapters in different slots (one rank, seed and layout) change disjoint parts of the weights: zero weight overlap."""
        return self.slot_side is not None

    @property
    def slot_space(self) -> str | None:
        """What its slots partition, in words ("input columns", ...); None without slots."""
        return SLOT_SPACES.get(self.slot_side)

    @property
    def slot_dim(self) -> str | None:
        """The layer dimension its slots cut: "in" (columns, basis) or "out" (rows); None without slots."""
        return SLOT_DIMS.get(self.slot_side)

    @property
    def fast_layout(self) -> str | None:
        """The index layout whose merge writes the fewest cache lines (a concept switch); None without layouts."""
        return self.layouts[0] if self.layouts else None

    @property
    def delta_capable(self) -> bool:
        """``--delta`` (Delta-LoRA on its core) applies: every core has exact ``lora_factors``; peft's layers do not."""
        return self.core is not None

    @property
    def peft_config(self) -> dict[str, Any]:
        return dict(self.peft_options)

    def trained_by(self, trainer: str) -> bool:
        return trainer in self.trainers


METHOD_SPECS: dict[str, MethodSpec] = {s.name: s for s in (
    MethodSpec("lora", "LoRA", LoRACore),
    MethodSpec("sbora-fa", "SBoRA-FA", SBoRAFACore, slot_side="columns", layouts=("blocks", "scattered")),
    MethodSpec("sbora-fb", "SBoRA-FB", SBoRAFBCore, slot_side="rows", layouts=("scattered", "blocks")),  # its r rows are contiguous either way
    MethodSpec("ortho", "Ortho", OrthoCore, slot_side="basis"),
    MethodSpec("difflora", "DiffLoRA", DiffLoRACore),
    MethodSpec("delta-lora", "Delta-LoRA", LoRACore, base="lora", delta=True),
    MethodSpec("custom-diffusion", "Custom Diffusion", DenseCore, low_rank=False, targets="sd-unet-cross-kv", trainers=(CONCEPT,)),
    MethodSpec("peft-dora", "DoRA (peft)", None, base="lora", trainers=(LLM,), export_formats=(), peft_backed=True,
               peft_options=(("use_dora", True),)),
    MethodSpec("peft-lora", "peft LoRA", None, base="lora", trainers=(), peft_backed=True, baseline_of="lora"),  # its files are plain LoRA
)}

# Core method name -> core class: what ``AdapterConfig.method`` takes and ``inject`` builds.
METHODS: dict[str, type[Core]] = {s.name: s.core for s in METHOD_SPECS.values() if s.base is None}
KNOWN_METHODS.update(METHODS)  # what AdapterConfig.validate accepts

assert DEFAULT_METHOD in METHODS and REFERENCE_METHOD in METHODS and all(set(s.layouts) <= set(LAYOUTS) for s in METHOD_SPECS.values())


def method_spec(name: str) -> MethodSpec:
    spec = METHOD_SPECS.get(name)
    if spec is None:
        raise ConfigError(f"unknown method '{name}'; known: {', '.join(METHOD_SPECS)}")
    return spec


def spec_of(config: AdapterConfig) -> MethodSpec:
    """The spec of what an adapter config trains: its core method, or the procedure method it is (LoRA + delta: delta-lora)."""
    if config.delta:
        procedure = [s for s in METHOD_SPECS.values() if s.delta and s.base == config.method]
        if procedure:
            return procedure[0]
    return method_spec(config.method)


def methods_where(**capabilities) -> list[str]:
    """The methods whose spec has every given attribute value, e.g. ``methods_where(composable=True)``, in registry order."""
    return [s.name for s in METHOD_SPECS.values() if all(getattr(s, k) == v for k, v in capabilities.items())]


def trained_methods(trainer: str) -> list[str]:
    """The methods `trainer` (``CONCEPT``, ``LLM``) trains, in registry order."""
    return [s.name for s in METHOD_SPECS.values() if s.trained_by(trainer)]


def composable_methods() -> list[str]:
    """The methods whose adapters compose in disjoint slots (zero weight overlap), in registry order."""
    return methods_where(composable=True)


def is_yaml_path(method: str | Path) -> bool:
    """Whether `method` names a YAML file (a method of one's own) rather than a method of the registry."""
    p = Path(method)
    return p.suffix in (".yaml", ".yml") or p.is_file()  # as configuration.resolve_named_config reads it


def check_trained_method(method: str | Path, trainer: str) -> MethodSpec | None:
    """The spec of `method` if `trainer` trains it; None for a YAML path (its ``method:`` is checked when it loads);
    a ConfigError naming the methods `trainer` trains otherwise."""
    if is_yaml_path(method):
        return None
    spec = METHOD_SPECS.get(str(method))
    known = trained_methods(trainer)
    if spec is None:
        raise ConfigError(f"unknown method '{method}'; known: {', '.join(known)}; or pass a path to a YAML file")
    if not spec.trained_by(trainer):
        by = " and ".join(TRAINER_NAMES[t] for t in spec.trainers) or "no trainer (the benchmarks measure it)"
        raise ConfigError(f"method '{spec.name}' ({spec.label}) is trained by {by}, not by {TRAINER_NAMES[trainer]}; "
                          f"its methods: {', '.join(known)}")
    return spec


def method_help(trainer: str) -> str:
    """The methods `trainer` trains, for a --method help line."""
    return ", ".join(trained_methods(trainer))


def or_list(names: list[str], sep: str = ", ", last: str = " or ") -> str:
    """"a, b or c" (``sep="/"``, ``last="/"``: "a/b/c")."""
    return names[0] if len(names) == 1 else sep.join(names[:-1]) + last + names[-1]


def label(name: str, beside: list[str] | tuple[str, ...] = ()) -> str:
    """The display label of method `name`; "(ours)" added when `beside` (the table it sits in) holds peft's implementation of it."""
    spec = method_spec(name)
    ours = any(METHOD_SPECS[o].baseline_of == name for o in beside if o in METHOD_SPECS)
    return spec.label + (" (ours)" if ours else "")


def labels(names: list[str] | tuple[str, ...]) -> dict[str, str]:
    """Method -> display label for a table of `names` (see ``label``)."""
    return {n: label(n, names) for n in names}


def layout_label(name: str, layout: str) -> str:
    """A method in one index layout: "SBoRA-FA (blocks, v2)"."""
    return f"{method_spec(name).label} ({layout}, v{LAYOUTS[layout]})"


def composition_label(name: str) -> str:
    """A method in a multi-concept table: "SBoRA-FA, slots" (disjoint slots) or "LoRA, naive sum"."""
    return f"{method_spec(name).label}, {'slots' if method_spec(name).composable else 'naive sum'}"


def peft_baseline(name: str) -> str | None:
    """The peft baseline that implements our method `name` (``peft-lora`` for ``lora``), if any."""
    return next((s.name for s in METHOD_SPECS.values() if s.baseline_of == name), None)
