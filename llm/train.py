"""Fine-tune a causal LM with the shared adapter cores (SBoRA, LoRA, ortho, DiffLoRA; QSBoRA on a quantized base).

    python -m llm.train --method sbora-fa --task arithmetic
    sbora-llm-train --method sbora-fb --quantize auto --steps 300     # QSBoRA
    sbora-llm-train --task data/tasks.jsonl --slot 1 --resume
    sbora-llm-train --method lora --val-size 200 --lr 3e-4            # scored on 200 held-out training problems (lr sweeps)
    sbora-llm-train --method peft-dora                                # DoRA from peft on the same loop (llm/peft_dora.py)

Follows the SBoRA paper's LLM setting (instruction tuning on the chat template, loss on the response only, adapters on
the attention projections; ``--targets llama-mlp`` adds the MLP). This module brings the data and the loss; the loop,
checkpoints, resume and the output folder's rules are the shared engine's (``sbora/engine.py``), with the same options
as the concept trainer.

Output folder (default ``outputs/llm/<task>/<method>/``, ``<method>-<int8|nf4>`` under QSBoRA): ``adapter.safetensors``
(``--method peft-dora``: peft's ``adapter_model.safetensors`` + ``adapter_config.json``, loadable with
``PeftModel.from_pretrained``), ``config.yaml``, ``log.jsonl``, ``results.json``/``results.md`` (adapted and zero-shot
accuracy), ``checkpoints/`` and, with ``--merge``, ``merged/`` (a plain transformers folder with the adapter folded in).

From Python, ``train(config: TrainConfig, model=None, tokenizer=None) -> dict`` returns ``{"output_dir", "adapter",
"adapter_name", "steps", "final_loss", "trainable_params", "adapted_layers", "quantize", "results" (as llm.evaluate's,
None with eval off), "merged" (path or None)}``; a given `model`/`tokenizer` is used (and changed) instead of `config.model`.
"""

from __future__ import annotations

import json
import sys
from typing import TYPE_CHECKING

import torch

from sbora.adapters import AdapterConfig, adapted_layers, adapter_parameters, inject, save_adapter
from sbora.configuration import to_dict
from sbora.engine import Engine, Micro, RunState, Setup, Task, fit
from sbora.procedures import adapter_metadata, build_procedures

from .cli import llm_command
from .data import InstructionDataset, batch_indices, collate, task_name
from .evaluate import score_with_zero_shot, write_results
from .models import prepare_base, save_merged
from .options import ADAPTER, TrainConfig
from .peft_dora import PEFT_WEIGHTS, dora_layers, dora_off, inject_dora, save_dora
from .quant import resolve_mode

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase


class LLMTask(Task):
    """Instruction tuning as a task of the engine: the chat-template examples and the answer-token loss."""

    def __init__(self, config: TrainConfig, adapter_config: AdapterConfig, quantize: str, name: str, train_set: list, test_set: list,
                 model: PreTrainedModel | None, tokenizer: PreTrainedTokenizerBase | None):
        self.config, self.adapter_config, self.quantize, self.name = config, adapter_config, quantize, name
        self.train_set, self.test_set, self.model, self.tokenizer = train_set, test_set, model, tokenizer
        self.desc, self.dora, self.results, self.merged, self.layers = f"train {config.method}", config.peft_backed, None, None, None

    def setup(self, engine: Engine) -> Setup:
        config, name = self.config, self.name
        model, self.tokenizer = prepare_base(config.model, self.quantize, engine.accelerator, self.model, self.tokenizer)
        self.model = model
        self.dataset = InstructionDataset(self.tokenizer, self.train_set, config.max_length, truncate=config.truncate)
        config.check_context(model, self.tokenizer, self.test_set)
        model.requires_grad_(False)
        if self.dora:
            inject_dora(model, self.adapter_config, name, config.spec.peft_config)
        else:
            inject(model, self.adapter_config, name=name)
        (self.prepared,) = engine.prepare(model)
        self.device = engine.device
        named = {n: p for n, p in model.named_parameters() if p.requires_grad}
        self.procedures = build_procedures(config, self.adapter_config, {"": model}, name)
        params = list(named.values()) if self.dora else adapter_parameters(model, name)
        fingerprint = {"adapter": to_dict(self.adapter_config), "adapter_name": name, "quantize": self.quantize,
                       **({"peft": config.method} if self.dora else {})}
        self.resolved = {**to_dict(config), "quantize": self.quantize, "output_dir": str(config.resolved_output_dir())}
        return Setup(named, [{"params": params}], fingerprint, self.procedures, {"train": self.resolved, "adapter": to_dict(self.adapter_config)})

    def loss(self, micro: Micro) -> torch.Tensor:
        items = [self.dataset[i] for i in batch_indices(len(self.dataset), self.config.batch_size, self.config.train_seed, micro.index)]
        batch = {k: v.to(self.device) for k, v in collate(items, pad_id=self.tokenizer.pad_token_id).items()}
        return self.prepared(**batch).loss  # mean over the batch's answer tokens

    def save(self, engine: Engine, state: RunState) -> None:
        """The adapter, its score beside the base's, and the merged model if asked (into .partial/)."""
        config, model, name = self.config, self.model, self.name
        out, run_dir = config.resolved_output_dir(), engine.run_dir
        self.layers = self.adapted_layer_count()  # before --merge folds the adapters away
        if self.dora:
            save_dora(model, run_dir, self.adapter_config, name, base_model=config.model, options=config.spec.peft_config)
        else:
            save_adapter(model, run_dir / "adapter.safetensors", name=name, base_model=config.model,
                         extra={"task": task_name(config.task), "steps": state.step, "train_config": self.resolved,
                                **adapter_metadata(engine.procedures)})
        if config.eval and self.test_set:
            with engine.accelerator.autocast():
                parts = score_with_zero_shot(model, self.tokenizer, self.test_set, [name], config.zero_shot, off=dora_off(model) if self.dora else None,
                                             max_new_tokens=config.max_new_tokens, batch_size=config.eval_batch_size)
            self.results = {"task": task_name(config.task), "base": config.model, "adapters": [str(out / self.adapter_file)],
                            "split": "validation" if config.val_size else "test", "n": len(self.test_set), **parts}
            write_results(self.results, run_dir)
        if config.merge:
            save_merged(model, self.tokenizer, run_dir / "merged")
            self.merged = str(out / "merged")

    def adapted_layer_count(self) -> int:
        return len(dora_layers(self.model) if self.dora else adapted_layers(self.model, self.name))

    @property
    def adapter_file(self) -> str:
        return PEFT_WEIGHTS if self.dora else "adapter.safetensors"


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
    train_set, test_set = config.splits()
    task = LLMTask(config, adapter_config, quantize, config.adapter_name or task_name(config.task), train_set, test_set, model, tokenizer)
    state, engine = fit(task, config, out, resume=resume, stop_event=stop_event)
    return {
        "output_dir": str(out), "adapter": str(out / task.adapter_file), "adapter_name": task.name, "steps": state.step,
        "final_loss": state.losses[-1] if state.losses else None,
        "trainable_params": sum(p.numel() for p in engine.named_params.values()),  # after a DiffoRA cut: the kept modules
        "adapted_layers": task.layers if task.layers is not None else task.adapted_layer_count(), "quantize": quantize,
        "results": task.results, "merged": task.merged,
    }


def report(result: dict) -> None:
    print(json.dumps({k: v for k, v in result.items() if k != "results"}, indent=2))
    if result["results"]:
        parts = result["results"]
        print(f"accuracy: adapted {parts['adapted']['accuracy']:.3f}" + (f", zero-shot {parts['zero_shot']['accuracy']:.3f}" if parts["zero_shot"] else ""))


COMMAND = llm_command(TrainConfig, train, "sbora-llm-train", __doc__, config="train", report=report, resumable=True, sections=(ADAPTER,))
main = COMMAND.main


if __name__ == "__main__":
    sys.exit(main())
