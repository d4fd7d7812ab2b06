"""Training procedures: they change how training runs, not a layer's forward pass (docs/architecture.md §2-3).

    Delta-LoRA   delta_lora.py   --delta (any method) or --method delta-lora; --delta-lambda, --delta-start
    DiffoRA      diffora.py      --select diffora; --keep-ratio or --param-budget; --select-warmup, --gate-lr
    EMA          ema.py          an average of the trained weights (the pocket base's pretraining: sbora_diffusion/world/pretrain.py)

Each is implemented once, as a procedure of the shared engine (``engine.py``: ``setup``,
``after_optimizer_step``, ``log_values``, ``state_dict``/``load_state_dict``, ``fingerprint``),
so the concept trainer and the LLM trainer get the same behaviour, checkpoints and exact
resume, and the same options: both trainers' ``TrainConfig`` extend ``ProcedureConfig``. A
trainer calls, before its output folder is touched, ``cfg.adapter_with_procedures(adapter)``
(the adapter these options train; every option checked) and ``cfg.label_with_procedures``
(its output folder's method part); once the adapters are injected,
``build_procedures(cfg, adapter, models, name)`` for ``engine.setup``; and when it saves,
``adapter_metadata(engine.procedures)`` into the adapter file's metadata.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from torch import nn

from ..adapters import AdapterConfig
from ..configuration import ConfigError, check_fields, override
from ..engine import EngineConfig
from .common import resolve_steps
from .delta_lora import DeltaLoRA
from .diffora import DiffoRA
from .ema import EMA

SELECTIONS = ("none", "diffora")
STEP_HELP = "whole optimizer steps (>= 1) or a fraction of --steps (< 1)"


@dataclass
class ProcedureConfig(EngineConfig):
    """The engine's options plus the training procedures': one definition for both trainers."""

    delta: bool = field(default=False, metadata={"help": "Delta-LoRA (Zi et al.): from --delta-start on, the frozen weights also move by "
                                                         "λ·(ΔW_t − ΔW_K); any method, dropout 0 (--method delta-lora is LoRA with it)"})
    delta_lambda: float = field(default=2.0, metadata={"help": "Delta-LoRA's update ratio λ (the paper: 2 on E2E, 0.5 on GLUE)"})
    delta_start: float = field(default=0.1, metadata={"help": f"Delta-LoRA's start K: {STEP_HELP} (the paper: K = 500 of runs many thousands long)"})
    select: str = field(default="none", metadata={"help": "module selection: none, or diffora (a learned gate per adapted module, "
                                                          "then only the best modules keep their adapter)"})
    keep_ratio: float = field(default=0.5, metadata={"help": "DiffoRA: fraction of the adapted modules kept (rounded up)"})
    param_budget: int | None = field(default=None, metadata={"help": "DiffoRA: keep the best modules whose adapter parameters fit in this many "
                                                                     "(replaces --keep-ratio; none: use --keep-ratio)"})
    select_warmup: float = field(default=0.2, metadata={"help": f"DiffoRA: gates and adapters train together this long, then the cut: {STEP_HELP}"})
    gate_lr: float = field(default=1e-2, metadata={"help": "DiffoRA: learning rate of the gate logits (no weight decay)"})

    def validate(self) -> None:
        super().validate()
        check_fields(self, {"delta_lambda": (0, None, "open"), "delta_start": (0, None), "keep_ratio": (0, 1),
                            "param_budget": (1, None), "select_warmup": (0, None, "open"), "gate_lr": (0, None, "open")})
        if self.keep_ratio == 0:
            raise ConfigError("keep_ratio must satisfy 0 < keep_ratio <= 1, got 0")
        for name in ("delta_start", "select_warmup"):
            value = getattr(self, name)
            if value >= 1 and not float(value).is_integer():
                raise ConfigError(f"{name} must be {STEP_HELP}, got {value:g}")
        if self.select not in SELECTIONS:
            raise ConfigError(f"select must be one of {', '.join(SELECTIONS)}, got '{self.select}'")
        if self.select == "diffora":
            cut = resolve_steps(self.select_warmup, self.steps)
            if not 1 <= cut < self.steps:
                raise ConfigError(f"select_warmup {self.select_warmup:g} puts DiffoRA's cut at step {cut}: it must fall inside the run "
                                  f"(1 <= step < steps = {self.steps}); change --select-warmup or --steps")

    def adapter_with_procedures(self, adapter: AdapterConfig) -> AdapterConfig:
        """`adapter` as this run trains it: --delta makes it a Delta-LoRA adapter (of any method); its start checked against the run."""
        if self.delta and not adapter.delta:
            adapter = override(adapter, {"delta": True}, source="--delta")
        if adapter.delta:
            start = resolve_steps(self.delta_start, self.steps)
            if start >= self.steps:
                raise ConfigError(f"delta_start {self.delta_start:g} puts Delta-LoRA's start at step {start}, not before the run's end "
                                  f"(steps = {self.steps}): W would never move; lower --delta-start (e.g. 0.1, a tenth of the run)")
            cut = resolve_steps(self.select_warmup, self.steps)
            if self.select == "diffora" and start < cut:
                raise ConfigError(f"with --select diffora, Delta-LoRA must start at or after the cut (step {cut}), or the gates would "
                                  f"scale the weights' moves: set --delta-start to at least {cut}")
        return adapter

    def label_with_procedures(self, label: str, adapter: AdapterConfig) -> str:
        """The output folder's method part: `label` plus -delta / -diffora for what these options add to the method's `adapter`."""
        return label + ("-delta" if self.delta and not adapter.delta else "") + ("-diffora" if self.select == "diffora" else "")


def build_procedures(cfg: ProcedureConfig, adapter: AdapterConfig, models: dict[str, nn.Module], name: str) -> list:
    """The procedures `cfg` asks for over adapter `name` of `models` ({"unet": ..., "text_encoder": ...}, or {"": model}).

    In hook order: DiffoRA cuts before Delta-LoRA takes its step-K factors (when both act on one step).
    """
    procedures: list = []
    if cfg.select == "diffora":
        procedures.append(DiffoRA(models, name, cfg.keep_ratio, cfg.param_budget, cfg.select_warmup, cfg.gate_lr))
    if adapter.delta:
        procedures.append(DeltaLoRA(models, name, cfg.delta_lambda, cfg.delta_start))
    return procedures


def adapter_metadata(procedures: Sequence) -> dict:
    """What the procedures add to the adapter file's metadata: {"delta_lora": {...}, "diffora": {...}}."""
    out: dict = {}
    for proc in procedures:
        if hasattr(proc, "metadata"):
            out.update(proc.metadata())
    return out


__all__ = ["EMA", "SELECTIONS", "DeltaLoRA", "DiffoRA", "ProcedureConfig", "adapter_metadata", "build_procedures", "resolve_steps"]
