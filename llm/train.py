"""Fine-tune a causal LM with the shared adapter cores (SBoRA, LoRA, ortho, DiffLoRA; QSBoRA on a quantized base).

    python -m llm.train --method sbora-fa --task arithmetic
    sbora-llm-train --method sbora-fb --quantize auto --steps 300     # QSBoRA
    sbora-llm-train --task data/tasks.jsonl --slot 1 --resume
    sbora-llm-train --method lora --val-size 200 --lr 3e-4            # scored on 200 held-out training problems (lr sweeps)
    sbora-llm-train --method peft-dora                                # DoRA from peft on the same loop (llm/peft_dora.py)

Follows the SBoRA paper's LLM setting (instruction tuning on the chat template, loss on the
response only, adapters on the attention projections; ``--targets llama-mlp`` adds the MLP).
This module brings the data and the loss; the loop (optimizer, schedule, precision,
checkpoints, exact resume, Ctrl-C, logs, the output folder's rules) is the shared engine's
(``sbora_diffusion/engine.py``), with the same options as the concept trainer.

Output folder (default ``outputs/llm/<task>/<method>/``, ``<method>-<int8|nf4>`` under
QSBoRA): ``adapter.safetensors``, ``config.yaml`` (the resolved training and adapter configs),
``log.jsonl`` (step, loss, learning rate), ``results.json``/``results.md`` (adapted and
zero-shot accuracy), ``checkpoints/`` and, with ``--merge``, ``merged/`` (a plain
transformers model folder with the adapter folded in). Under ``--method peft-dora`` the adapter
is peft's ``adapter_model.safetensors`` + ``adapter_config.json`` instead (the folder loads
with ``PeftModel.from_pretrained``).

From Python::

    train(config: TrainConfig, model=None, tokenizer=None) -> dict

returns ``{"output_dir", "adapter", "adapter_name", "steps", "final_loss", "trainable_params",
"adapted_layers", "quantize", "results" (as llm.evaluate.evaluate, or None with eval off),
"merged" (path or None)}``. A given `model`/`tokenizer` is used (and changed) in place of
loading `config.base`.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path

import torch
import yaml
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from sbora_diffusion.adapters import AdapterConfig, MethodSpec, adapted_layers, adapter_parameters, inject, load_adapter_config, save_adapter
from sbora_diffusion.adapters.config import DEFAULT_METHOD
from sbora_diffusion.adapters.registry import LLM, METHOD_SPECS, check_trained_method, trained_methods
from sbora_diffusion.configuration import ConfigError, check_fields, to_dict
from sbora_diffusion.engine import Engine, Micro
from sbora_diffusion.fileio import write_text
from sbora_diffusion.procedures import ProcedureConfig, adapter_metadata, build_procedures

from .cli import run_command
from .data import InstructionDataset, carve_validation, collate, load_task, prompt_text, task_name
from .evaluate import score_with_zero_shot, write_results
from .models import DEFAULT_BASE, context_length, prepare_base, save_merged
from .peft_dora import PEFT_WEIGHTS, REFUSED, dora_layers, dora_off, inject_dora, save_dora
from .quant import QUANT_MODES, resolve_mode


def _method_help() -> str:
    """--method's help: the registry's methods this trainer trains, its peft baselines apart."""
    ours = [m for m in trained_methods(LLM) if not METHOD_SPECS[m].peft_backed]
    peft = [METHOD_SPECS[m] for m in trained_methods(LLM) if METHOD_SPECS[m].peft_backed]
    return "; ".join([f"adapter method (configs/methods/<method>.yaml) or a YAML path: {', '.join(ours)}",
                      *(f"{s.name}: {s.label}, peft's own layers with {METHOD_SPECS[s.base].label}'s settings (a baseline)" for s in peft)])


@dataclass
class TrainConfig(ProcedureConfig):
    base: str = field(default=DEFAULT_BASE, metadata={"help": f"base model: '{DEFAULT_BASE}' (embedded SmolLM2-135M-Instruct GGUF), a local folder or .gguf file, or a hub id",
                                                      "aliases": ("model-name-or-path", "pretrained-model-name-or-path")})
    task: str = field(default="arithmetic", metadata={"help": "'arithmetic' (built-in word problems) or a JSONL file with instruction/input/output"})
    eval_data: str | None = field(default=None, metadata={"help": "JSONL test file (none: the task's fixed test split)"})
    train_size: int = field(default=2000, metadata={"help": "arithmetic: number of training problems"})
    test_size: int = field(default=200, metadata={"help": "arithmetic: number of test problems of the fixed split"})
    test_fraction: float = field(default=0.1, metadata={"help": "JSONL task without eval_data: fraction held out for testing"})
    val_size: int = field(default=0, metadata={"help": "hold this many training examples out (fixed by the data, not --train-seed) and score "
                                                       "them after training instead of the test split: for choosing learning rates"})
    method: str = field(default=DEFAULT_METHOD, metadata={"help": _method_help()})
    rank: int | None = field(default=None, metadata={"help": "adapter rank (none: the method's YAML)"})
    alpha: float | None = field(default=None, metadata={"help": "adapter scale numerator, s = alpha/r (none: the method's YAML)"})
    dropout: float | None = field(default=None, metadata={"help": "dropout on the adapter branch (none: the method's YAML)"})
    targets: list[str] = field(default_factory=lambda: ["llama"], metadata={"help": "module suffixes or presets: llama (q,k,v,o_proj), llama-mlp (+gate,up,down_proj)"})
    slot: int = field(default=0, metadata={"help": "SBoRA/ortho slot: adapters in different slots (same --seed) touch disjoint columns/rows"})
    seed: int = field(default=0, metadata={"help": "seed of the adapter: its init and per-layer index permutations (the same for composable slots)"})
    layout: str | None = field(default=None, metadata={"help": "SBoRA index layout: blocks or scattered (none: the method's default; "
                                                                "compose only adapters of one layout)"})
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
            "train_size": (1, None), "test_size": (1, None), "test_fraction": (0, 1, "open"), "val_size": (0, None), "rank": (1, None),
            "alpha": (0, None, "open"), "dropout": (0, 1, "right-open"), "slot": (0, None), "seed": (0, None),
            "max_length": (8, None), "eval_limit": (1, None), "eval_batch_size": (1, None), "max_new_tokens": (1, None),
        })
        resolve_mode(self.quantize)
        if self.peft_backed:
            used = [flag for key, flag in REFUSED.items() if getattr(self, key) not in (False, "none")]
            if used:
                raise ConfigError(f"--method {self.method} trains peft's own layers, which {', '.join(used)} cannot act on; drop it or use one of our methods")

    @property
    def spec(self) -> MethodSpec | None:
        """The registry's spec of --method (a method this trainer trains; a ConfigError otherwise), None for a YAML path."""
        return check_trained_method(self.method, LLM)

    @property
    def peft_backed(self) -> bool:
        """--method is a peft baseline (peft-dora): peft's own layers on the same loop (``peft_dora.py``)."""
        return bool(self.spec and self.spec.peft_backed)

    def adapter_config(self) -> AdapterConfig:
        """``configs/methods/<method>.yaml`` with this run's overrides (targets default to the llama preset); a peft baseline's
        base method's (LoRA's for peft-dora)."""
        fields = ("rank", "alpha", "dropout", "targets", "slot", "seed", "layout")
        method = self.spec.yaml if self.spec else self.method
        return self.adapter_with_procedures(load_adapter_config(method, **{k: getattr(self, k) for k in fields if getattr(self, k) is not None}))

    def resolved_output_dir(self) -> Path:
        """``outputs/llm/<task>/<method>`` (``-delta``/``-diffora`` added for --delta/--select); quantized runs apart in ``<method>-<int8|nf4>``."""
        if self.output_dir:
            return Path(self.output_dir)
        mode = resolve_mode(self.quantize)
        method = self.label_with_procedures(self.method, self.adapter_config())
        return Path("outputs") / "llm" / task_name(self.task) / (method if mode == "none" else f"{method}-{mode}")


@functools.lru_cache(maxsize=4)
def _epoch_order(n: int, seed: int, epoch: int) -> tuple[int, ...]:
    return tuple(torch.randperm(n, generator=torch.Generator().manual_seed(seed * 100_003 + epoch)).tolist())


def batch_indices(n: int, batch_size: int, seed: int, k: int) -> list[int]:
    """Micro-batch `k` of the run: slice ``[k·B, (k+1)·B)`` of a stream of seeded epoch permutations.

    A pure function of (seed, k), so a resumed run, or any process of several, sees exactly
    the batches an uninterrupted single stream would.
    """
    if n < batch_size:
        raise ConfigError(f"{n} training examples are fewer than one batch of {batch_size}; lower --batch-size")
    return [_epoch_order(n, seed, e)[i] for e, i in (divmod(pos, n) for pos in range(k * batch_size, (k + 1) * batch_size))]


def check_context(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, config: TrainConfig, dataset: InstructionDataset, test_set: list) -> None:
    """Every training example and every scored prompt plus its answer budget must fit the model's positions."""
    limit = context_length(model)
    if limit is None:
        return
    if config.max_length > limit:
        raise ConfigError(f"--max-length {config.max_length} exceeds the model's context of {limit} positions; lower --max-length to at most {limit}")
    if config.eval and test_set:
        longest = max(len(tokenizer(prompt_text(tokenizer, ex), add_special_tokens=False)["input_ids"]) for ex in test_set)
        if longest + config.max_new_tokens > limit:
            raise ConfigError(f"a test prompt has {longest} tokens: with --max-new-tokens {config.max_new_tokens} it exceeds the model's "
                              f"context of {limit} positions; lower --max-new-tokens to at most {limit - longest}")


def train(config: TrainConfig, model: PreTrainedModel | None = None, tokenizer: PreTrainedTokenizerBase | None = None, *,
          resume: bool | str = False, stop_event=None) -> dict:
    """Fine-tune one adapter; see the module docstring for the outputs and the returned dict.

    `resume`: continue the run in the output folder (True) or from a checkpoint file/folder;
    `stop_event` (a threading.Event) stops at the next step boundary like Ctrl-C."""
    config.validate()
    adapter_config = config.adapter_config()
    quantize = resolve_mode(config.quantize)
    if quantize != "none":
        print(f"QSBoRA: the base's linear layers are quantized to {quantize} (--quantize {config.quantize})", file=sys.stderr)
    out = config.resolved_output_dir()
    name = config.adapter_name or task_name(config.task)
    train_set, test_set = load_task(config.task, config.eval_data, config.train_size, config.test_size, config.test_fraction)
    if config.val_size:  # the validation problems replace the test split in the score: the test split stays unseen
        train_set, test_set = carve_validation(train_set, config.val_size)
    test_set = test_set[: config.eval_limit] if config.eval_limit else test_set
    engine = Engine(config, out, resume=resume, desc=f"train {config.method}", stop_event=stop_event)
    try:
        model, tokenizer = prepare_base(config.base, quantize, engine.accelerator, model, tokenizer)
        dataset = InstructionDataset(tokenizer, train_set, config.max_length, truncate=config.truncate)
        check_context(model, tokenizer, config, dataset, test_set)
        model.requires_grad_(False)
        dora = config.peft_backed
        if dora:
            inject_dora(model, adapter_config, name, config.spec.peft_config)
        else:
            inject(model, adapter_config, name=name)
        (prepared,) = engine.prepare(model)
        named = {n: p for n, p in model.named_parameters() if p.requires_grad}
        fingerprint = {"adapter": to_dict(adapter_config), "adapter_name": name, "quantize": quantize, **({"peft": config.method} if dora else {})}
        procedures = build_procedures(config, adapter_config, {"": model}, name)
        params = list(named.values()) if dora else adapter_parameters(model, name)
        engine.setup(named, [{"params": params}], fingerprint=fingerprint, procedures=procedures)
        resolved = {**to_dict(config), "quantize": quantize, "output_dir": str(out)}
        if engine.is_main:
            write_text(engine.run_dir / "config.yaml", yaml.safe_dump({"train": resolved, "adapter": to_dict(adapter_config)}, sort_keys=False))

        def loss_fn(micro: Micro) -> torch.Tensor:
            items = [dataset[i] for i in batch_indices(len(dataset), config.batch_size, config.train_seed, micro.index)]
            batch = {k: v.to(engine.device) for k, v in collate(items, pad_id=tokenizer.pad_token_id).items()}
            return prepared(**batch).loss  # mean over the batch's answer tokens

        state = engine.run(loss_fn)
        summary = {
            "output_dir": str(out), "adapter": str(out / (PEFT_WEIGHTS if dora else "adapter.safetensors")), "adapter_name": name, "steps": state.step,
            "final_loss": state.losses[-1] if state.losses else None,
            "trainable_params": sum(p.numel() for p in engine.named_params.values()),  # after a DiffoRA cut: the kept modules
            "adapted_layers": len(dora_layers(model) if dora else adapted_layers(model, name)), "quantize": quantize, "results": None, "merged": None,
        }
        if engine.is_main:
            summary.update(_finish(config, resolved, adapter_config, model, tokenizer, engine, name, state.step, test_set))
        engine.finish()
    except BaseException as e:
        engine.abort(e)  # a Ctrl-C after the last step: TrainingInterrupted (finish with --resume)
        raise
    return summary


def _finish(config: TrainConfig, resolved: dict, adapter_config: AdapterConfig, model, tokenizer, engine: Engine, name: str, step: int,
            test_set: list) -> dict:
    """Save the adapter, score it beside the base, and save the merged model if asked (main process, into .partial/)."""
    out, run_dir = config.resolved_output_dir(), engine.run_dir
    dora = config.peft_backed
    if dora:
        save_dora(model, run_dir, adapter_config, name, base_model=config.base, options=config.spec.peft_config)
    else:
        save_adapter(model, run_dir / "adapter.safetensors", name=name, base_model=config.base,
                     extra={"task": task_name(config.task), "steps": step, "train_config": resolved, **adapter_metadata(engine.procedures)})
    results = None
    if config.eval and test_set:
        with engine.accelerator.autocast():
            parts = score_with_zero_shot(model, tokenizer, test_set, [name], config.zero_shot, off=dora_off(model) if dora else None,
                                         max_new_tokens=config.max_new_tokens, batch_size=config.eval_batch_size)
        results = {"task": task_name(config.task), "base": config.base, "adapters": [str(out / (PEFT_WEIGHTS if dora else "adapter.safetensors"))],
                   "split": "validation" if config.val_size else "test", "n": len(test_set), **parts}
        write_results(results, run_dir)
    merged = save_merged(model, tokenizer, run_dir / "merged") if config.merge else None
    return {"results": results, "merged": None if merged is None else str(out / "merged")}


def main(argv: list[str] | None = None) -> int:
    def report(result: dict) -> None:
        print(json.dumps({k: v for k, v in result.items() if k != "results"}, indent=2))
        if result["results"]:
            parts = result["results"]
            print(f"accuracy: adapted {parts['adapted']['accuracy']:.3f}" + (f", zero-shot {parts['zero_shot']['accuracy']:.3f}" if parts["zero_shot"] else ""))

    return run_command(TrainConfig, train, "sbora-llm-train", __doc__, argv, default_config="train", report=report, resumable=True)


if __name__ == "__main__":
    sys.exit(main())
