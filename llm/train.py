"""Fine-tune a causal LM with the shared adapter cores (SBoRA, LoRA, ortho, DiffLoRA; QSBoRA on a quantized base).

    python -m llm.train --method sbora-fa --task arithmetic
    sbora-llm-train --method sbora-fb --quantize auto --steps 300     # QSBoRA
    sbora-llm-train --task data/tasks.jsonl --slot 1 --resume

Follows the SBoRA paper's LLM setting (instruction tuning on the chat template, loss on the
response only, adapters on the attention projections; ``--targets llama-mlp`` adds the MLP).
accelerate places the model and runs mixed precision on GPU. Every ``--checkpoint-every``
steps, and on Ctrl-C, a checkpoint is written; ``--resume`` continues from the newest one
exactly (same batches, same optimizer and RNG state).

Output folder (default ``outputs/llm/<task>/<method>/``): ``adapter.safetensors`` (the
foundation's adapter format), ``config.yaml`` (the resolved training and adapter configs),
``log.jsonl`` (step, loss, learning rate), ``results.json``/``results.md`` (adapted and
zero-shot accuracy), ``checkpoints/`` and, with ``--merge``, ``merged/`` (a plain
transformers model folder with the adapter folded in).

From Python::

    train(config: TrainConfig, model=None, tokenizer=None) -> dict

returns ``{"output_dir", "adapter", "adapter_name", "steps", "final_loss", "trainable_params",
"adapted_layers", "results" (as llm.evaluate.evaluate, or None with eval off), "merged" (path or None)}``.
A given `model`/`tokenizer` is used (and changed) in place of loading `config.base`.
"""

from __future__ import annotations

import json
import math
import sys
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import torch
import yaml
from accelerate.utils import set_seed
from tqdm.auto import tqdm
from transformers import PreTrainedModel, PreTrainedTokenizerBase, get_scheduler

from sbora_diffusion.adapters import AdapterConfig, adapter_parameters, inject, load_adapter_config, save_adapter
from sbora_diffusion.checkpoint import capture_rng, list_checkpoints, load_checkpoint, restore_rng, save_checkpoint
from sbora_diffusion.configuration import ConfigError, to_dict
from sbora_diffusion.fileio import write_text

from .data import InstructionDataset, collate, load_task, task_name
from .cli import run_command
from .evaluate import score_with_zero_shot, write_results
from .models import DEFAULT_BASE, MIXED_PRECISION, make_accelerator, prepare_base, save_merged
from .quant import QUANT_MODES


@dataclass
class TrainConfig:
    base: str = field(default=DEFAULT_BASE, metadata={"help": f"base model: '{DEFAULT_BASE}' (embedded SmolLM2-135M-Instruct GGUF), a local folder or .gguf file, or a hub id"})
    task: str = field(default="arithmetic", metadata={"help": "'arithmetic' (built-in word problems) or a JSONL file with instruction/input/output"})
    eval_data: str | None = field(default=None, metadata={"help": "JSONL test file (else the task's fixed test split)"})
    train_size: int = field(default=2000, metadata={"help": "arithmetic: number of training problems"})
    test_size: int = field(default=200, metadata={"help": "arithmetic: number of test problems of the fixed split"})
    test_fraction: float = field(default=0.1, metadata={"help": "JSONL task without eval_data: fraction held out for testing"})
    method: str = field(default="sbora-fa", metadata={"help": "adapter method (configs/methods/<method>.yaml): lora, sbora-fa, sbora-fb, ortho, difflora"})
    rank: int | None = field(default=None, metadata={"help": "adapter rank (default: the method's YAML)"})
    alpha: float | None = field(default=None, metadata={"help": "adapter scale numerator, s = alpha/r (default: the method's YAML)"})
    dropout: float | None = field(default=None, metadata={"help": "dropout on the adapter branch (default: the method's YAML)"})
    targets: list[str] = field(default_factory=lambda: ["llama"], metadata={"help": "module suffixes or presets: llama (q,k,v,o_proj), llama-mlp (+gate,up,down_proj)"})
    slot: int = field(default=0, metadata={"help": "SBoRA/ortho slot: adapters in different slots (same seed) touch disjoint columns/rows"})
    seed: int = field(default=0, metadata={"help": "seed of the batches, the adapter init and the per-layer index permutations"})
    adapter_name: str | None = field(default=None, metadata={"help": "name of the adapter inside the model and its file (default: the task name)"})
    steps: int = field(default=300, metadata={"help": "optimizer steps"})
    batch_size: int = field(default=8, metadata={"help": "examples per micro-batch"})
    grad_accum: int = field(default=1, metadata={"help": "micro-batches per optimizer step"})
    lr: float = field(default=1e-3, metadata={"help": "peak learning rate (AdamW)"})
    weight_decay: float = field(default=0.0, metadata={"help": "AdamW weight decay"})
    lr_schedule: str = field(default="cosine", metadata={"help": "transformers scheduler name: cosine, linear, constant_with_warmup, ..."})
    warmup_steps: int = field(default=20, metadata={"help": "learning-rate warm-up steps"})
    max_grad_norm: float = field(default=1.0, metadata={"help": "gradient clipping norm (0 = off)"})
    max_length: int = field(default=256, metadata={"help": "longest tokenized example (prompt + answer)"})
    quantize: str = field(default="none", metadata={"help": f"QSBoRA: quantize the base's linear layers: {', '.join(QUANT_MODES)} (auto: nf4 on CUDA, else int8)"})
    mixed_precision: str = field(default="auto", metadata={"help": f"{', '.join(MIXED_PRECISION)} (auto: bf16/fp16 on CUDA, off on CPU)"})
    cpu: bool = field(default=False, metadata={"help": "train on the CPU even where CUDA is present"})
    output_dir: str | None = field(default=None, metadata={"help": "output folder (default: outputs/llm/<task>/<method>)"})
    log_every: int = field(default=10, metadata={"help": "steps between log lines (log.jsonl and the progress bar)"})
    checkpoint_every: int = field(default=100, metadata={"help": "steps between checkpoints (0 = only on Ctrl-C)"})
    keep_checkpoints: int = field(default=2, metadata={"help": "newest checkpoints kept"})
    resume: bool = field(default=False, metadata={"help": "continue from the newest checkpoint in the output folder"})
    eval: bool = field(default=True, metadata={"help": "score the test split after training (adapted and zero-shot)"})
    eval_limit: int | None = field(default=None, metadata={"help": "score only the first N test examples"})
    eval_batch_size: int = field(default=16, metadata={"help": "prompts generated at once when scoring"})
    max_new_tokens: int = field(default=64, metadata={"help": "greedy decoding length limit when scoring"})
    zero_shot: bool = field(default=True, metadata={"help": "also score the base model alone (adapter off)"})
    merge: bool = field(default=False, metadata={"help": "also save merged/: the base with the adapter folded in (dequantized first under QSBoRA)"})

    def validate(self) -> None:
        for name in ("steps", "batch_size", "grad_accum", "max_length", "log_every", "eval_batch_size", "max_new_tokens"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"{name} must be positive, got {getattr(self, name)}")
        if self.lr <= 0:
            raise ConfigError(f"lr must be positive, got {self.lr}")

    def adapter_config(self) -> AdapterConfig:
        """``configs/methods/<method>.yaml`` with this run's overrides (targets default to the llama preset)."""
        fields = ("rank", "alpha", "dropout", "targets", "slot", "seed")
        return load_adapter_config(self.method, **{k: getattr(self, k) for k in fields if getattr(self, k) is not None})

    def resolved_output_dir(self) -> Path:
        return Path(self.output_dir) if self.output_dir else Path("outputs") / "llm" / task_name(self.task) / self.method


class StepBatches(torch.utils.data.Sampler):
    """Micro-batch `k` of the run is slice ``[k·B, (k+1)·B)`` of a stream of seeded epoch permutations.

    A pure function of (seed, k), so a resumed run sees exactly the batches it would have seen.
    """

    def __init__(self, n: int, batch_size: int, seed: int, start: int, stop: int):
        if n < batch_size:
            raise ValueError(f"{n} training examples are fewer than one batch of {batch_size}")
        self.n, self.batch_size, self.seed, self.start, self.stop = n, batch_size, seed, start, stop

    def __len__(self) -> int:
        return self.stop - self.start

    def _epoch(self, e: int) -> list[int]:
        return torch.randperm(self.n, generator=torch.Generator().manual_seed(self.seed * 100_003 + e)).tolist()

    def __iter__(self):
        order, epoch = [], -1
        for k in range(self.start, self.stop):
            batch = []
            for pos in range(k * self.batch_size, (k + 1) * self.batch_size):
                e, i = divmod(pos, self.n)
                if e != epoch:
                    order, epoch = self._epoch(e), e
                batch.append(order[i])
            yield batch


def _trainable(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


def _restore(state: dict, model, optimizer, scheduler, adapter_config: AdapterConfig, ckpt_dir: Path) -> tuple[int, list[dict]]:
    """Put a checkpoint's adapter weights, optimizer, scheduler and RNG state back; returns (step, log history)."""
    if state["adapter_config"] != to_dict(adapter_config):
        raise ConfigError(f"the checkpoint in {ckpt_dir} was trained with adapter config {state['adapter_config']}; this run has {to_dict(adapter_config)}")
    with torch.no_grad():
        for n, p in _trainable(model).items():
            p.copy_(state["trainable"][n])
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    restore_rng(state["rng"])
    return int(state["step"]), list(state["history"])


def train(config: TrainConfig, model: PreTrainedModel | None = None, tokenizer: PreTrainedTokenizerBase | None = None) -> dict:
    """Fine-tune one adapter; see the module docstring for the outputs and the returned dict.

    Signature: ``train(config: TrainConfig, model=None, tokenizer=None) -> dict``.
    """
    config.validate()
    adapter_config = config.adapter_config()
    out = config.resolved_output_dir()
    name = config.adapter_name or task_name(config.task)
    ckpt_dir = out / "checkpoints"
    if config.resume and not list_checkpoints(ckpt_dir):  # fail before the slow model load
        raise FileNotFoundError(f"no checkpoint to resume from in {ckpt_dir}; train without --resume first")
    train_set, test_set = load_task(config.task, config.eval_data, config.train_size, config.test_size, config.test_fraction)

    accelerator = make_accelerator(config.mixed_precision, config.cpu, config.grad_accum)
    set_seed(config.seed)
    model, tokenizer = prepare_base(config.base, config.quantize, accelerator, model, tokenizer)
    wrapped = inject(model, adapter_config, name=name)
    params = adapter_parameters(model, name)
    optimizer = torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)
    scheduler = get_scheduler(config.lr_schedule, optimizer, num_warmup_steps=config.warmup_steps, num_training_steps=config.steps)
    start, history = 0, []
    if config.resume:
        start, history = _restore(load_checkpoint(ckpt_dir), model, optimizer, scheduler, adapter_config, ckpt_dir)

    dataset = InstructionDataset(tokenizer, train_set, config.max_length)
    # Every process draws its own share of the global stream of micro-batches (accelerate shards them).
    per_step = config.grad_accum * accelerator.num_processes
    sampler = StepBatches(len(dataset), config.batch_size, config.seed, start * per_step, config.steps * per_step)
    loader = torch.utils.data.DataLoader(dataset, batch_sampler=sampler, collate_fn=partial(collate, pad_id=tokenizer.pad_token_id))
    model, optimizer, loader, scheduler = accelerator.prepare(model, optimizer, loader, scheduler)
    unwrapped = accelerator.unwrap_model(model)
    main_process = accelerator.is_main_process
    if main_process:
        write_text(out / "config.yaml", yaml.safe_dump({"train": to_dict(config), "adapter": to_dict(adapter_config)}, sort_keys=False))
    step = start

    def checkpoint() -> None:
        if not main_process:
            return
        save_checkpoint(ckpt_dir, {
            "step": step, "trainable": {n: p.detach().cpu() for n, p in _trainable(unwrapped).items()},
            "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(), "rng": capture_rng(),
            "history": history, "adapter_config": to_dict(adapter_config),
        }, keep=config.keep_checkpoints)
        write_text(out / "log.jsonl", "".join(json.dumps(h) + "\n" for h in history))

    model.train()
    bar = tqdm(total=config.steps, initial=start, desc=f"train {config.method}", disable=not accelerator.is_local_main_process)
    losses: list[float] = []
    try:
        for batch in loader:
            with accelerator.accumulate(model):
                loss = model(**batch).loss  # mean over the batch's answer tokens
                accelerator.backward(loss)
                if accelerator.sync_gradients and config.max_grad_norm > 0:
                    accelerator.clip_grad_norm_(params, config.max_grad_norm)
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad()
            losses.append(loss.item())
            if not accelerator.sync_gradients:
                continue
            step += 1
            bar.update(1)
            if not math.isfinite(losses[-1]):
                raise FloatingPointError(f"the loss became {losses[-1]} at step {step}; lower --lr")
            if step % config.log_every == 0 or step == config.steps:
                history.append({"step": step, "loss": sum(losses) / len(losses), "lr": scheduler.get_last_lr()[0]})
                bar.set_postfix(loss=f"{history[-1]['loss']:.4f}")
                losses = []
            if config.checkpoint_every and step % config.checkpoint_every == 0:
                checkpoint()
    except KeyboardInterrupt:
        bar.close()
        checkpoint()
        sys.exit(f"interrupted: checkpoint saved at step {step} in {ckpt_dir}; continue with --resume")
    bar.close()
    if step > start or not (out / "log.jsonl").exists():
        checkpoint()
    accelerator.wait_for_everyone()
    summary = {
        "output_dir": str(out), "adapter": str(out / "adapter.safetensors"), "adapter_name": name, "steps": step,
        "final_loss": history[-1]["loss"] if history else None, "trainable_params": sum(p.numel() for p in params),
        "adapted_layers": len(wrapped), "results": None, "merged": None,
    }
    if main_process:
        summary.update(_finish(config, unwrapped, tokenizer, accelerator, name, step, test_set))
    return summary


def _finish(config: TrainConfig, model, tokenizer, accelerator, name: str, step: int, test_set: list) -> dict:
    """Save the adapter, score it beside the base, and save the merged model if asked (main process only)."""
    out = config.resolved_output_dir()
    adapter_path = save_adapter(
        model, out / "adapter.safetensors", name=name, base_model=config.base,
        extra={"task": task_name(config.task), "steps": step, "train_config": to_dict(config)},
    )
    results = None
    test_set = test_set[: config.eval_limit] if config.eval_limit else test_set
    if config.eval and test_set:
        with accelerator.autocast():
            parts = score_with_zero_shot(
                model, tokenizer, test_set, [name], config.zero_shot, max_new_tokens=config.max_new_tokens, batch_size=config.eval_batch_size
            )
        results = {"task": task_name(config.task), "base": config.base, "adapters": [str(adapter_path)], "n": len(test_set), **parts}
        write_results(results, out)
    merged = save_merged(model, tokenizer, out / "merged") if config.merge else None
    return {"results": results, "merged": None if merged is None else str(merged)}


def main(argv: list[str] | None = None) -> None:
    result = run_command(TrainConfig, train, "sbora-llm-train", __doc__, argv, default_config="train")
    print(json.dumps({k: v for k, v in result.items() if k != "results"}, indent=2))
    if result["results"]:
        parts = result["results"]
        print(f"accuracy: adapted {parts['adapted']['accuracy']:.3f}" + (f", zero-shot {parts['zero_shot']['accuracy']:.3f}" if parts["zero_shot"] else ""))


if __name__ == "__main__":
    main()
