"""Evaluate a causal LM with or without adapters: greedy decoding, exact-match accuracy.

    python -m llm.evaluate --adapter outputs/llm/arithmetic/sbora-fa/adapter.safetensors
    sbora-llm-evaluate --model outputs/llm/composed --task arithmetic

The base model's zero-shot accuracy is measured beside the adapted one on the same test
problems (the adapters switched off for that call only, nothing reloaded). Several
``--adapter`` files are loaded side by side (multi-task composition, unmerged; ``--merge``
folds them in first). Results go to ``evaluation.json`` and ``evaluation.md`` (``--output-dir``,
default: the adapter's folder), beside a training run's own ``results.*``, never over them.
Greedy decoding of all 200 default test problems takes about 12 minutes for SmolLM2 on a
2-core CPU (twice that with the zero-shot pass); ``--limit`` scores fewer.

From Python::

    evaluate(config: EvalConfig, model=None, tokenizer=None) -> dict

returns ``{"task", "base", "adapters", "n", "zero_shot": {...} | None, "adapted": {...} | None}``,
each part ``{"accuracy", "correct", "total", "samples": [...]}``.
"""

from __future__ import annotations

import contextlib
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from tqdm.auto import tqdm

from sbora.adapters import active_adapters, merge
from sbora.configuration import ConfigError
from sbora.engine import MIXED_PRECISION, make_accelerator, resolve_mixed_precision
from sbora.fileio import write_json, write_text

from .cli import llm_command
from .data import Example, is_correct, load_task, prompt_text, task_name
from .models import DEFAULT_BASE, load_adapters, prepare_base
from .quant import QUANT_MODES

if TYPE_CHECKING:  # imported where used: transformers takes seconds to import, which `--help` should not wait for
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

SAMPLES_KEPT = 20  # generations stored in the results, for reading what the model does


@dataclass
class EvalConfig:
    model: str = field(default=DEFAULT_BASE, metadata={"help": f"base model: '{DEFAULT_BASE}' (embedded SmolLM2-135M-Instruct GGUF), a local folder or .gguf file, or a hub id",
                                                       "aliases": ("base", "model-name-or-path")})
    adapter: list[str] = field(default_factory=list, metadata={"help": "adapter file(s), comma-separated; several are loaded side by side (multi-task); none = base only"})
    task: str = field(default="arithmetic", metadata={"help": "'arithmetic' (built-in word problems) or a JSONL file with instruction/input/output"})
    eval_data: str | None = field(default=None, metadata={"help": "JSONL test file (else the task's fixed test split)"})
    test_size: int = field(default=200, metadata={"help": "arithmetic: number of test problems of the fixed split"})
    test_fraction: float = field(default=0.1, metadata={"help": "JSONL task without eval_data: fraction held out for testing"})
    limit: int | None = field(default=None, metadata={"help": "evaluate only the first N test examples", "aliases": ("eval-limit",)})
    batch_size: int = field(default=16, metadata={"help": "prompts generated at once", "aliases": ("eval-batch-size",)})
    max_new_tokens: int = field(default=64, metadata={"help": "greedy decoding length limit"})
    zero_shot: bool = field(default=True, metadata={"help": "also score the base model alone (adapters off)"})
    merge: bool = field(default=False, metadata={"help": "merge the adapters into the base weights before scoring"})
    quantize: str = field(default="none", metadata={"help": f"quantize the base's linear layers: {', '.join(QUANT_MODES)} (auto: nf4 on CUDA, else int8)"})
    mixed_precision: str = field(default="auto", metadata={"help": f"{', '.join(MIXED_PRECISION)} (auto: bf16/fp16 on CUDA, off on CPU)"})
    cpu: bool = field(default=False, metadata={"help": "run on the CPU even where CUDA is present"})
    output_dir: str | None = field(default=None, metadata={"help": "where evaluation.json/evaluation.md go (none: the adapter's folder, else outputs/llm/<task>/base)"})

    def validate(self) -> None:
        for name in ("batch_size", "max_new_tokens", "test_size"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"{name} must be positive, got {getattr(self, name)}")
        if self.limit is not None and self.limit <= 0:
            raise ConfigError(f"limit must be positive, got {self.limit}")
        if self.merge and self.quantize != "none":
            raise ConfigError("merging into a quantized base is refused; score the adapters unmerged on it, or merge with `sbora-llm-train --merge` (which dequantizes first)")
        if not self.adapter and (self.merge or not self.zero_shot):
            raise ConfigError("nothing to evaluate: give --adapter file(s), or keep --zero-shot to score the base alone")


@torch.no_grad()
def generate(
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, prompts: list[str], max_new_tokens: int = 64, batch_size: int = 16, desc: str = "generate"
) -> list[str]:
    """Greedy completions of chat-formatted `prompts` (left-padded batches), special tokens dropped."""
    from transformers import GenerationConfig

    device = next(model.parameters()).device
    gen = GenerationConfig(
        do_sample=False, max_new_tokens=max_new_tokens, pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id
    )
    side, tokenizer.padding_side = tokenizer.padding_side, "left"  # new tokens must follow every prompt directly
    was_training = model.training
    model.eval()
    texts: list[str] = []
    try:
        for i in tqdm(range(0, len(prompts), batch_size), desc=desc, leave=False):
            enc = tokenizer(prompts[i : i + batch_size], return_tensors="pt", padding=True, add_special_tokens=False).to(device)
            out = model.generate(**enc, generation_config=gen)  # (B, T_prompt + T_new)
            texts += tokenizer.batch_decode(out[:, enc["input_ids"].shape[1] :], skip_special_tokens=True)
    finally:
        tokenizer.padding_side = side
        model.train(was_training)
    return texts


def score(
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, examples: list[Example], max_new_tokens: int = 64, batch_size: int = 16, desc: str = "evaluate"
) -> dict:
    """Exact-match accuracy of greedy answers on `examples`, with the first generations for reading."""
    generated = generate(model, tokenizer, [prompt_text(tokenizer, ex) for ex in examples], max_new_tokens, batch_size, desc)
    correct = [is_correct(g, ex.answer) for g, ex in zip(generated, examples)]
    return {
        "accuracy": sum(correct) / len(examples),
        "correct": sum(correct),
        "total": len(examples),
        "per_problem": correct,  # for paired comparisons of two models on the same problems
        "samples": [
            {"question": ex.input or ex.instruction, "answer": ex.answer, "generated": g, "correct": c}
            for ex, g, c in list(zip(examples, generated, correct))[:SAMPLES_KEPT]
        ],
    }


def score_with_zero_shot(
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, examples: list[Example], names: list[str], zero_shot: bool,
    off: contextlib.AbstractContextManager | None = None, **kwargs
) -> dict:
    """``{"zero_shot": ..., "adapted": ...}``: the base alone (adapters `names` off), then with them on.

    `off` switches adapters that are not ours off (peft's DoRA: ``peft_dora.dora_off``)."""
    results = {"zero_shot": None, "adapted": None}
    if zero_shot:
        with off or (active_adapters(model, {}) if names else contextlib.nullcontext()):
            results["zero_shot"] = score(model, tokenizer, examples, desc="zero-shot", **kwargs)
    if names:
        results["adapted"] = score(model, tokenizer, examples, desc="adapted", **kwargs)
    return results


def _percent(part: dict | None) -> str:
    return "—" if part is None else f"{100 * part['accuracy']:.1f}% ({part['correct']}/{part['total']})"


def results_markdown(results: dict) -> str:
    lines = [
        f"# {results['task']}: exact-match accuracy",
        "",
        f"Base: `{results['base']}`; adapters: {', '.join(f'`{a}`' for a in results['adapters']) or 'none'}; greedy decoding.",
        "",
        "| model | accuracy |",
        "|---|---|",
        f"| base, zero-shot | {_percent(results['zero_shot'])} |",
        f"| adapted | {_percent(results['adapted'])} |",
        "",
    ]
    part = results["adapted"] or results["zero_shot"]
    if part:
        lines += ["## First generations", "", "| answer | generated | correct |", "|---|---|---|"]
        for s in part["samples"]:
            text = " ".join(s["generated"].split()).replace("|", "\\|")
            lines.append(f"| {s['answer']} | {text} | {'yes' if s['correct'] else 'no'} |")
    return "\n".join(lines) + "\n"


def write_results(results: dict, folder: str | Path, stem: str = "results") -> tuple[Path, Path]:
    """``<stem>.json`` and ``<stem>.md`` in `folder`, written atomically (training: results, evaluation: evaluation)."""
    folder = Path(folder)
    write_json(folder / f"{stem}.json", results)
    write_text(folder / f"{stem}.md", results_markdown(results))
    return folder / f"{stem}.json", folder / f"{stem}.md"


def default_output_dir(config: EvalConfig) -> Path:
    if len(config.adapter) == 1:
        return Path(config.adapter[0]).parent
    return Path("outputs") / "llm" / task_name(config.task) / ("composed" if config.adapter else "base")


def evaluate(config: EvalConfig, model: PreTrainedModel | None = None, tokenizer: PreTrainedTokenizerBase | None = None) -> dict:
    """Score `config.model` (or the given `model`/`tokenizer`) plus `config.adapter` files on the task's test split.

    Signature: ``evaluate(config: EvalConfig, model=None, tokenizer=None) -> dict``. Adapter
    files are loaded into `model` under their task names. Writes evaluation.json/evaluation.md.
    """
    config.validate()
    _, test = load_task(config.task, config.eval_data, train_size=0, test_size=config.test_size, test_fraction=config.test_fraction)
    test = test[: config.limit] if config.limit else test
    accelerator = make_accelerator(resolve_mixed_precision(config.mixed_precision, config.cpu), config.cpu)
    model, tokenizer = prepare_base(config.model, config.quantize, accelerator, model, tokenizer)
    names = list(load_adapters(model, config.adapter, base=config.model))
    kwargs = {"max_new_tokens": config.max_new_tokens, "batch_size": config.batch_size}
    with accelerator.autocast():
        if config.merge:  # merged adapters cannot be switched off: only the adapted score exists
            merge(model)  # a quantized base refuses this clearly
            parts = {"zero_shot": None, "adapted": score(model, tokenizer, test, desc="merged", **kwargs)}
        else:
            parts = score_with_zero_shot(model, tokenizer, test, names, config.zero_shot, **kwargs)
    results = {"task": task_name(config.task), "base": config.model, "adapters": list(config.adapter), "n": len(test), **parts}
    written = write_results(results, config.output_dir or default_output_dir(config), stem="evaluation")
    return {**results, "written": [str(p) for p in written]}


def report(results: dict) -> None:
    print(results_markdown(results).split("## First")[0].strip())
    print(f"\nwritten: {', '.join(results['written'])}")


COMMAND = llm_command(EvalConfig, evaluate, "sbora-llm-evaluate", __doc__, config="evaluate", report=report)
main = COMMAND.main


if __name__ == "__main__":
    sys.exit(main())
