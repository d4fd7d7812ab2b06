"""The LLM trainer's options (``TrainConfig``: the engine's and the procedures' plus the base,
the task, the adapter and the scoring) and where a run's files go.

The adapter is a nested config, not fields of its own: ``TrainConfig.adapter`` holds overrides of
the method's ``configs/methods/<method>.yaml`` (rank, alpha, dropout, targets, slot, seed,
layout, ...), over this trainer's own default targets (``ADAPTER_DEFAULTS``: the LLaMA-family
attention projections); on the command line they are the options of the ``ADAPTER`` section
(``--rank 8 --slot 1``), in a YAML a mapping ``adapter: {rank: 16, alpha: 32}``.

Also what follows from the options alone: the run's examples (``splits``) and whether they fit
the model's positions (``check_context``)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sbora.adapters import AdapterConfig, MethodSpec, load_adapter_config
from sbora.adapters.config import DEFAULT_METHOD
from sbora.adapters.registry import LLM, METHOD_SPECS, check_trained_method, trained_methods
from sbora.cli import Section, yaml_layer
from sbora.configuration import ConfigError, check_fields
from sbora.procedures import ProcedureConfig

from .data import carve_validation, load_task, prompt_text, task_name
from .models import DEFAULT_BASE, context_length
from .peft_dora import REFUSED
from .quant import QUANT_MODES, resolve_mode

# This trainer's adapter defaults over the method's YAML (whose targets are the SD UNet's): the attention projections.
ADAPTER_DEFAULTS: dict[str, Any] = {"targets": ["llama"]}
NOT_IN_ADAPTER = {"method": "set the method with --method (method: in a YAML)", "delta": "turn Delta-LoRA on with --delta (delta: true)"}


def _method_help() -> str:
    """--method's help: the registry's methods this trainer trains, its peft baselines apart."""
    ours = [m for m in trained_methods(LLM) if not METHOD_SPECS[m].peft_backed]
    peft = [METHOD_SPECS[m] for m in trained_methods(LLM) if METHOD_SPECS[m].peft_backed]
    return "; ".join([f"adapter method (configs/methods/<method>.yaml) or a YAML path: {', '.join(ours)}",
                      *(f"{s.name}: {s.label}, peft's own layers with {METHOD_SPECS[s.base].label}'s settings (a baseline)" for s in peft)])


@dataclass
class TrainConfig(ProcedureConfig):
    model: str = field(default=DEFAULT_BASE, metadata={"help": f"base model: '{DEFAULT_BASE}' (embedded SmolLM2-135M-Instruct GGUF), a local folder or .gguf file, or a hub id",
                                                       "aliases": ("base", "model-name-or-path", "pretrained-model-name-or-path")})
    task: str = field(default="arithmetic", metadata={"help": "'arithmetic' (built-in word problems) or a JSONL file with instruction/input/output"})
    eval_data: str | None = field(default=None, metadata={"help": "JSONL test file (none: the task's fixed test split)"})
    train_size: int = field(default=2000, metadata={"help": "arithmetic: number of training problems"})
    test_size: int = field(default=200, metadata={"help": "arithmetic: number of test problems of the fixed split"})
    test_fraction: float = field(default=0.1, metadata={"help": "JSONL task without eval_data: fraction held out for testing"})
    val_size: int = field(default=0, metadata={"help": "hold this many training examples out (fixed by the data, not --train-seed) and score "
                                                       "them after training instead of the test split: for choosing learning rates"})
    method: str = field(default=DEFAULT_METHOD, metadata={"help": _method_help()})
    adapter: dict[str, Any] = field(default_factory=dict, metadata={"help": "the adapter: fields of configs/methods/<method>.yaml to override "
                                                                            "(rank, alpha, dropout, targets, slot, seed, layout, ...); the "
                                                                            "command line's --rank, --slot, ... go here"})
    adapter_name: str | None = field(default=None, metadata={"help": "name of the adapter inside the model and its file (none: the task name)"})
    max_length: int = field(default=256, metadata={"help": "longest tokenized example (prompt + answer); must fit the model's context"})
    truncate: bool = field(default=False, metadata={"help": "cut answers longer than max_length (else such an example is an error)"})
    quantize: str = field(default="none", metadata={"help": f"QSBoRA: quantize the base's linear layers: {', '.join(QUANT_MODES)} (auto: nf4 on CUDA, else int8)"})
    eval: bool = field(default=True, metadata={"help": "score the test split after training (adapted and zero-shot)"})
    eval_limit: int | None = field(default=None, metadata={"help": "score only the first N test examples (none: all)"})
    eval_batch_size: int = field(default=16, metadata={"help": "prompts generated at once when scoring"})
    max_new_tokens: int = field(default=64, metadata={"help": "greedy decoding length limit when scoring"})
    zero_shot: bool = field(default=True, metadata={"help": "also score the base model alone (adapter off)"})
    merge: bool = field(default=False, metadata={"help": "also save merged/: the base with the adapter folded in (dequantized first under QSBoRA)"})

    def validate(self) -> None:
        super().validate()
        check_fields(self, {
            "train_size": (1, None), "test_size": (1, None), "test_fraction": (0, 1, "open"), "val_size": (0, None),
            "max_length": (8, None), "eval_limit": (1, None), "eval_batch_size": (1, None), "max_new_tokens": (1, None),
        })
        resolve_mode(self.quantize)
        if self.peft_backed:
            used = [flag for key, flag in REFUSED.items() if getattr(self, key) not in (False, "none")]
            if used:
                raise ConfigError(f"--method {self.method} trains peft's own layers, which {', '.join(used)} cannot act on; drop it or use one of our methods")
        for key in set(self.adapter) & set(NOT_IN_ADAPTER):
            raise ConfigError(f"adapter: {key} is not an adapter override here: {NOT_IN_ADAPTER[key]}")
        self.adapter_config()  # the adapter's own checks (rank, dropout, slot, ...), before anything runs

    @property
    def spec(self) -> MethodSpec | None:
        """The registry's spec of --method (a method this trainer trains; a ConfigError otherwise), None for a YAML path."""
        return check_trained_method(self.method, LLM)

    @property
    def peft_backed(self) -> bool:
        """--method is a peft baseline (peft-dora): peft's own layers on the same loop (``peft_dora.py``)."""
        return bool(self.spec and self.spec.peft_backed)

    def adapter_config(self) -> AdapterConfig:
        """The adapter this run trains: ``configs/methods/<method>.yaml`` (a peft baseline: its base method's, LoRA's for
        peft-dora), this trainer's ``ADAPTER_DEFAULTS``, then `adapter`; with the procedures' options (--delta)."""
        overrides = {**ADAPTER_DEFAULTS, **self.adapter}
        return self.adapter_with_procedures(load_adapter_config(method_yaml(self.method), **overrides))

    def resolved_output_dir(self) -> Path:
        """``outputs/llm/<task>/<method>`` (``-delta``/``-diffora`` added for --delta/--select); quantized runs apart in ``<method>-<int8|nf4>``."""
        if self.output_dir:
            return Path(self.output_dir)
        mode = resolve_mode(self.quantize)
        method = self.label_with_procedures(self.method, self.adapter_config())
        return Path("outputs") / "llm" / task_name(self.task) / (method if mode == "none" else f"{method}-{mode}")

    def splits(self) -> tuple[list, list]:
        """(training examples, scored examples). With --val-size the validation problems replace the test split in the
        score: the test split stays unseen."""
        train_set, test_set = load_task(self.task, self.eval_data, self.train_size, self.test_size, self.test_fraction)
        if self.val_size:
            train_set, test_set = carve_validation(train_set, self.val_size)
        return train_set, test_set[: self.eval_limit] if self.eval_limit else test_set

    def check_context(self, model, tokenizer, test_set: list) -> None:
        """Every training example and every scored prompt plus its answer budget must fit the model's positions."""
        limit = context_length(model)
        if limit is None:
            return
        if self.max_length > limit:
            raise ConfigError(f"--max-length {self.max_length} exceeds the model's context of {limit} positions; lower --max-length to at most {limit}")
        if self.eval and test_set:
            longest = max(len(tokenizer(prompt_text(tokenizer, ex), add_special_tokens=False)["input_ids"]) for ex in test_set)
            if longest + self.max_new_tokens > limit:
                raise ConfigError(f"a test prompt has {longest} tokens: with --max-new-tokens {self.max_new_tokens} it exceeds the model's "
                                  f"context of {limit} positions; lower --max-new-tokens to at most {limit - longest}")


def method_yaml(method: str) -> str:
    """The YAML name (or path) of a --method this trainer trains: a peft baseline's is its base method's."""
    spec = check_trained_method(method, LLM)
    return spec.yaml if spec else method


# The adapter's options on the command line: its YAML named by --method (a field of TrainConfig), its values nested in TrainConfig.adapter.
ADAPTER = Section(
    "adapter", AdapterConfig, title="adapter options (override configs/methods/<method>.yaml; in a YAML: adapter: {rank: 16, ...})",
    option="method", load=lambda method: yaml_layer("methods", method_yaml(method)), defaults=(ADAPTER_DEFAULTS, "the LLM trainer's default"),
    nested_in=("config", "adapter"), skip=("method", "delta"),
)
