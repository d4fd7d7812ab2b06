"""Multi-task composition: several task adapters merged into one LLM (the LLM side of multi-concept).

    python -m llm.compose --out outputs/llm/composed \
        --adapter outputs/llm/math/sbora-fa/adapter.safetensors,outputs/llm/facts/sbora-fa/adapter.safetensors

Adapters trained with the same seed in different slots (``--slot 0``, ``--slot 1``) touch
disjoint columns (SBoRA-FA), rows (SBoRA-FB) or orthogonal basis rows (ortho) of every
weight, so in the merged model ``W + Σ_k w_k·ΔW_k`` each task's update sits in its own part of
W, exactly as trained (docs/architecture.md §4). That is a statement about the weights, not the outputs:
on task i's own activations X_i the merged layer still adds w_j·ΔW_j X_i of every other task
j, which disjoint slots do not make zero. Before merging, every pair is measured both ways.

**Weight overlap**, per layer, from the adapters' factors (``adapters.overlap``):

    interference(i, j) = min(‖ΔW_i ΔW_jᵀ‖, ‖ΔW_iᵀ ΔW_j‖) / (‖ΔW_i‖·‖ΔW_j‖)

which is 0 when the two updates read orthogonal input directions or write orthogonal
output directions (disjoint SBoRA slots, ortho slots), and is reported as a warning
otherwise (plain LoRA, or the same slot twice).

**Output cross-talk on calibration inputs**, per layer and per ordered pair:

    crosstalk(j on i) = ‖ΔW_j X_i‖ / ‖ΔW_i X_i‖

X_i the inputs each adapted layer sees while adapter i alone (weight 1) reads its
calibration examples: by default the first ``--calibration-examples`` (4) examples of the
task it was trained on (its held-out split, from the ``train_config`` in its file), or the
JSONL files of ``--calibration`` (one for all adapters, or one per adapter; each line
``{"instruction", "input"?, "output"?}`` rendered with the chat template, or ``{"text"}``
as is). It is a ratio of output changes, not of scores: ~1 means task j changes task i's
layer outputs as much as task i's own adapter does.

The merged model is a plain transformers folder; score it with
``sbora-llm-evaluate --model <out> --task ...``.

From Python::

    compose(config: ComposeConfig, model=None, tokenizer=None) -> dict

returns ``{"output", "adapters": {name: file}, "weights", "interference": {"a+b": max over
layers}, "crosstalk": {"pairs": {"b on a": {"median", "max", "worst_layer", "overall",
"layers"}}, "layers": [...], "calibration": {name: {"examples", "source"}}, "seconds"} or
None, "meaning": {...}}``; ``compose.json`` in the output folder holds the same.
"""

from __future__ import annotations

import json
import sys
import time
import warnings
from dataclasses import dataclass, field
from itertools import combinations
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import nn

from sbora.adapters import adapted_layers, read_adapter
from sbora.adapters.io import slot_layouts
from sbora.adapters.overlap import (
    CROSSTALK_MEANING,
    WEIGHT_OVERLAP_MEANING,
    calibration_energies,
    crosstalk_rows,
    crosstalk_summary,
)
from sbora.adapters.overlap import interference as layer_interference
from sbora.adapters.registry import composable_methods, or_list
from sbora.adapters.slots import slot_clashes
from sbora.configuration import ConfigError, check_fields
from sbora.fileio import write_json

from .cli import llm_command
from .data import Example, _user_turn, jsonl_lines, load_task
from .models import DEFAULT_BASE, load_adapters, load_base, save_merged

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

INTERFERENCE_TOLERANCE = 1e-6
CALIBRATION_EXAMPLES = 4  # default examples of each task's own split
CALIBRATION_MAX_TOKENS = 512  # a longer calibration text is cut (its first tokens are measured)


@dataclass
class ComposeConfig:
    model: str = field(default=DEFAULT_BASE, metadata={"help": f"base model: '{DEFAULT_BASE}' (embedded SmolLM2 GGUF), a local folder or .gguf file, or a hub id",
                                                       "aliases": ("base", "model-name-or-path")})
    adapter: list[str] = field(default_factory=list, metadata={"help": "two or more task adapter files to merge (comma-separated)"})
    weight: list[float] = field(default_factory=list, metadata={"help": "one weight per adapter (default: all 1.0)"})
    out: str = field(default="outputs/llm/composed", metadata={"help": "folder of the merged transformers model (plus compose.json)", "aliases": ("output",)})
    crosstalk: bool = field(default=True, metadata={"help": "also report the output cross-talk |dW_j X_i| / |dW_i X_i| on each task's calibration examples"})
    calibration: list[str] = field(default_factory=list, metadata={"help": "JSONL calibration inputs: one file for every adapter, or one per "
                                                                           "adapter (none: each adapter's own task split)"})
    calibration_examples: int = field(default=CALIBRATION_EXAMPLES, metadata={"help": "examples of each task's own split (default calibration)"})
    allow_overlap: bool = field(default=False, metadata={"help": "merge adapters whose slots share columns/rows (same method and seed, meeting "
                                                                 "slot positions or different index layouts) instead of refusing them"})

    def validate(self) -> None:
        if len(self.adapter) < 2:
            raise ConfigError("give at least two --adapter files to compose")
        if self.weight and len(self.weight) != len(self.adapter):
            raise ConfigError(f"{len(self.weight)} weights for {len(self.adapter)} adapters; give one weight per adapter or none")
        if len(self.calibration) not in (0, 1, len(self.adapter)):
            raise ConfigError(f"{len(self.calibration)} calibration files for {len(self.adapter)} adapters; give one for all, one per adapter, or none")
        check_fields(self, {"calibration_examples": (1, 10000)})


def interference(model: nn.Module, a: str, b: str) -> float:
    """Largest per-layer weight overlap of adapters `a` and `b` over the layers both adapt (see module docstring;
    the one measure of ``adapters.overlap``, from the factors)."""
    layers = adapted_layers(model, a).values()
    return max((layer_interference(layer.cores[a], layer.cores[b]) for layer in layers if b in layer.cores), default=0.0)


# ---------------------------------------------------------------------------- calibration inputs


def read_calibration(path: str | Path) -> list[dict]:
    """Calibration rows of a JSONL file: ``{"text": ...}`` (used as is) or ``{"instruction", "input"?, "output"?}``."""
    missing = 'no calibration file at {path}: give a JSONL file, one {{"instruction", "input", "output"}} or {{"text"}} a line'
    rows = []
    for n, row in jsonl_lines(path, missing):
        if not isinstance(row, dict) or not (isinstance(row.get("text"), str) or isinstance(row.get("instruction"), str)):
            raise ConfigError(f"{path}:{n} needs a string field 'text', or 'instruction' (and optionally 'input', 'output')")
        rows.append(row)
    if not rows:
        raise ConfigError(f"{path} holds no calibration example")
    return rows


def _text(tokenizer: PreTrainedTokenizerBase, row: dict) -> str:
    """What the model reads for one calibration row: the chat-formatted turn(s) (answer included when given), or its text."""
    if isinstance(row.get("text"), str):
        return row["text"]
    example = Example(row["instruction"], str(row.get("input") or ""), str(row.get("output") or ""), "")
    turns = [_user_turn(example)] + ([{"role": "assistant", "content": example.output}] if example.output else [])
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(turns, add_generation_prompt=not example.output, tokenize=False)
    return "\n\n".join(t["content"] for t in turns)


def task_examples(path: str, count: int) -> tuple[list[dict], str]:
    """The first `count` examples of the task adapter `path` was trained on (its test split, else its training set)
    and where they come from; ([], why) where the file does not say or the task's data is gone."""
    train_config = read_adapter(path).extra.get("train_config") or {}
    task = train_config.get("task")
    if not task:
        return [], "its file names no task: give --calibration"
    try:
        train, test = load_task(task, train_config.get("eval_data"), int(train_config.get("train_size", 2000)),
                                int(train_config.get("test_size", 200)), float(train_config.get("test_fraction", 0.1)))
    except (OSError, ValueError) as e:
        return [], f"its task {task} cannot be read ({e}): give --calibration"
    chosen = (test or train)[:count]
    rows = [{"instruction": ex.instruction, "input": ex.input, "output": ex.output} for ex in chosen]
    return rows, f"{'test' if test else 'training'} split of {task}"


def crosstalk_report(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, adapters: dict[str, str], config: ComposeConfig,
                     given: list[list[dict]] | None = None) -> dict:
    """Output cross-talk of every ordered pair of `adapters` ({name: file}) on their calibration inputs (module docstring).

    `given`: the rows of ``config.calibration``'s files, in its order, if already read."""
    names = list(adapters)
    given = given if given is not None else [read_calibration(f) for f in config.calibration]
    files = list(zip(config.calibration, given))
    files = files * len(names) if len(files) == 1 else files
    texts, calibration = {}, {}
    for k, (name, path) in enumerate(adapters.items()):
        if files:
            rows, source = files[k][1], f"file {files[k][0]}"
        else:
            rows, source = task_examples(path, config.calibration_examples)
        texts[name] = [_text(tokenizer, row) for row in rows]
        calibration[name] = {"examples": len(rows), "source": source}
    device = next(model.parameters()).device

    def run(name: str) -> None:
        for text in texts[name]:  # one example at a time: no padding among the inputs
            ids = tokenizer(text, return_tensors="pt", add_special_tokens=False, truncation=True, max_length=CALIBRATION_MAX_TOKENS)
            model(input_ids=ids["input_ids"].to(device))

    runs = {n: (1.0, lambda n=n: run(n)) for n in names if texts[n]}
    start = time.perf_counter()
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            energies = calibration_energies({"model": model}, runs, others=names)
    finally:
        model.train(was_training)
    rows = crosstalk_rows(energies, names)
    pairs = {f"{d['update']} on {d['inputs']}": {k: v for k, v in d.items() if k not in ("inputs", "update")} for d in crosstalk_summary(rows)}
    return {"pairs": pairs, "layers": rows, "calibration": calibration, "seconds": round(time.perf_counter() - start, 3)}


def report_lines(report: dict) -> list[str]:
    """The report as text: per pair its weight overlap, then the cross-talk in both directions."""
    lines = []
    for pair, value in report["interference"].items():
        lines.append(f"weight overlap {pair}: max interference {value:.3g}")
        a, b = pair.split("+", 1)
        for key in (f"{b} on {a}", f"{a} on {b}"):
            d = (report["crosstalk"] or {}).get("pairs", {}).get(key)
            if d:
                fmt = lambda v: "-" if v is None else f"{v:.3g}"  # noqa: E731
                update, inputs = key.split(" on ")
                lines.append(f"output cross-talk on calibration inputs, |dW_{update} X_{inputs}| / |dW_{inputs} X_{inputs}|: median "
                             f"{fmt(d['median'])}, max {fmt(d['max'])} ({d['worst_layer']}), overall {fmt(d['overall'])} over {d['layers']} layers")
    for name, c in ((report["crosstalk"] or {}).get("calibration") or {}).items():
        if not c["examples"]:
            lines.append(f"output cross-talk on {name}'s inputs not measured: {c['source']}")
    return lines


def check_slots(paths: list[str], allow_overlap: bool = False) -> None:
    """Refuse (before any model is loaded) adapter files whose slots would write the same columns/rows
    (``adapters.slots.slot_clash``: same method and seed, slot positions that meet under their ranks,
    or different index layouts), naming both files and the slot to retrain in; with
    `allow_overlap` they are merged anyway and the interference report warns."""
    loaded: list = []
    for path in paths:
        new = slot_layouts(path)
        clashes = slot_clashes(loaded, new)
        if clashes and not allow_overlap:
            raise ConfigError("; ".join(clashes) + " (or merge them anyway, overlapping, with --allow-overlap)")
        loaded += new


def compose(config: ComposeConfig, model: PreTrainedModel | None = None, tokenizer: PreTrainedTokenizerBase | None = None) -> dict:
    """Load every adapter of `config` side by side, check them pairwise, merge them and save the model.

    Signature: ``compose(config: ComposeConfig, model=None, tokenizer=None) -> dict``.
    Adapters are named after their task (see ``models.load_adapters``); `model` is changed in place.
    """
    config.validate()
    check_slots(config.adapter, config.allow_overlap)
    given = [read_calibration(f) for f in config.calibration] if config.crosstalk else []  # a bad file fails before the model loads
    if model is None or tokenizer is None:
        model, tokenizer = load_base(config.model)
    weights = config.weight or [1.0] * len(config.adapter)
    adapters = load_adapters(model, config.adapter, weights, config.model)
    scores = {f"{a}+{b}": interference(model, a, b) for a, b in combinations(adapters, 2)}
    for pair, value in scores.items():
        if value > INTERFERENCE_TOLERANCE:
            warnings.warn(
                f"adapters {pair} interfere (weight overlap up to {value:.3g} per layer): train them with the same --seed in different "
                f"--slot values of {or_list(composable_methods(), '/', '/')} so that their updates change disjoint parts of the weights", stacklevel=2,
            )
    talk = crosstalk_report(model, tokenizer, adapters, config, given) if config.crosstalk else None
    output = save_merged(model, tokenizer, config.out)
    report = {"output": str(output), "adapters": adapters, "weights": weights, "interference": scores, "crosstalk": talk,
              "meaning": {"weight_overlap": WEIGHT_OVERLAP_MEANING, "output_crosstalk": CROSSTALK_MEANING}}
    write_json(output / "compose.json", report)
    return report


def _print(report: dict) -> None:
    for line in report_lines(report):
        print(line)
    print(json.dumps({k: v for k, v in report.items() if k not in ("crosstalk", "meaning")}, indent=2))
    print(f"per-layer cross-talk and what each measure means: {Path(report['output']) / 'compose.json'}")


COMMAND = llm_command(ComposeConfig, compose, "sbora-llm-compose", __doc__, report=_print)
main = COMMAND.main


if __name__ == "__main__":
    sys.exit(main())
