"""LLM quality: SmolLM2-135M-Instruct on the built-in arithmetic task, every method side by side.

Rows as in the SBoRA paper's LLM tables (method, trainable parameters and their share of the
base, test accuracy): the zero-shot base, then LoRA, SBoRA-FA, SBoRA-FB, Ortho and DiffLoRA
trained by ``llm.train.train`` (our cores) and DoRA from peft (``LoraConfig(use_dora=True)``
through peft's own ``inject_adapter_in_model``), all with the same rank, scale s = alpha/r = 1,
steps, batches (same seed), learning rate and schedule, and scored by ``llm.evaluate.score``
(greedy decoding, exact match of the final number) on the same test problems.

DoRA cannot go through ``llm.train`` (which injects our cores), so ``train_peft`` repeats its
optimization exactly (AdamW, warm-up + cosine schedule, gradient clipping, the same seeded
batches from ``llm.train.StepBatches``) around the peft-adapted model.

Results: ``docs/benchmarks/llm_quality.{json,md,png}`` (``llm_quality_full.*`` with ``--preset full``).

    python -m benchmarks.llm_quality --preset quick
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm

from sbora_diffusion.adapters import TARGET_PRESETS
from sbora_diffusion.configuration import ConfigError

from .common import OUR_METHODS, add_method, clone_sharing_weights, run_benchmark

PEFT_DORA = "peft-dora"
QUALITY_METHODS = [*OUR_METHODS, PEFT_DORA]
LABELS = {"zero-shot": "zero-shot base", "lora": "LoRA", "sbora-fa": "SBoRA-FA", "sbora-fb": "SBoRA-FB",
          "ortho": "Ortho", "difflora": "DiffLoRA", PEFT_DORA: "DoRA (peft)"}


@dataclass
class LLMQualityConfig:
    methods: list[str] = field(default_factory=lambda: list(QUALITY_METHODS), metadata={"help": "methods: " + ", ".join(QUALITY_METHODS)})
    rank: int = field(default=16, metadata={"help": "adapter rank of every method (alpha = rank, so s = 1)"})
    steps: int = field(default=200, metadata={"help": "optimizer steps of every method"})
    batch_size: int = field(default=8, metadata={"help": "examples per step"})
    lr: float = field(default=1e-3, metadata={"help": "peak learning rate (AdamW, warm-up then cosine)"})
    train_size: int = field(default=2000, metadata={"help": "arithmetic training problems"})
    test_size: int = field(default=200, metadata={"help": "arithmetic test problems of the fixed split"})
    eval_limit: int | None = field(default=None, metadata={"help": "score only the first N test problems"})
    max_new_tokens: int = field(default=64, metadata={"help": "greedy decoding length limit when scoring"})
    threads: int = field(default=1, metadata={"help": "torch CPU threads (0: torch's default)"})
    seed: int = field(default=0, metadata={"help": "seed of batches, adapter inits and index sets"})
    out_dir: str = field(default="", metadata={"help": "where llm_quality.{json,md,png} go (llm_quality_full.* for --preset full); empty: the repository's docs/benchmarks/"})
    work_dir: str = field(default="outputs/benchmarks/llm_quality", metadata={"help": "where the trained adapters go (one folder per method)"})

    def validate(self) -> None:
        bad = sorted(set(self.methods) - set(QUALITY_METHODS))
        if bad:
            raise ConfigError(f"unknown method(s) {', '.join(bad)}; known: {', '.join(QUALITY_METHODS)}")
        if min(self.rank, self.steps, self.batch_size, self.max_new_tokens) < 1:
            raise ConfigError("rank, steps, batch_size and max_new_tokens must be >= 1")

    @property
    def warmup_steps(self) -> int:
        return max(1, self.steps // 15)  # llm.train's warm-up share: 20 of its default 300 steps


PRESETS = {
    "quick": {"steps": 8, "eval_limit": 12, "max_new_tokens": 32},  # a smoke run of the whole pipeline
    "full": {},  # the defaults above: 200 steps of 8 problems, 200 test problems
}


def train_ours(method: str, config: LLMQualityConfig, base, tokenizer) -> dict:
    """One of our cores, trained and scored by the LLM trainer on a shared-weight copy of the base."""
    from llm.train import TrainConfig, train

    summary = train(
        TrainConfig(
            method=method, rank=config.rank, alpha=float(config.rank), dropout=0.0, seed=config.seed, train_seed=config.seed, steps=config.steps,
            batch_size=config.batch_size, lr=config.lr, warmup_steps=config.warmup_steps, train_size=config.train_size,
            test_size=config.test_size, eval_limit=config.eval_limit, max_new_tokens=config.max_new_tokens,
            zero_shot=False, cpu=True, checkpoint_every=0, output_dir=str(Path(config.work_dir) / method),
        ),
        model=clone_sharing_weights(base), tokenizer=tokenizer,
    )
    return {"trainable_params": summary["trainable_params"], "final_loss": summary["final_loss"], **_accuracy(summary["results"]["adapted"])}


def train_peft(method: str, config: LLMQualityConfig, base, tokenizer, train_set, test_set) -> dict:
    """peft's DoRA with llm.train's optimization (see the module docstring), then the same scoring."""
    from accelerate.utils import set_seed
    from transformers import get_scheduler

    from llm.data import InstructionDataset, collate
    from llm.evaluate import score
    from llm.train import TrainConfig, batch_indices

    defaults = TrainConfig()
    model = clone_sharing_weights(base)
    params = add_method(model, method, config.rank, TARGET_PRESETS["llama"], seed=config.seed)
    set_seed(config.seed)
    optimizer = torch.optim.AdamW(params, lr=config.lr, weight_decay=defaults.weight_decay)
    scheduler = get_scheduler(defaults.lr_schedule, optimizer, num_warmup_steps=config.warmup_steps, num_training_steps=config.steps)
    dataset = InstructionDataset(tokenizer, train_set, defaults.max_length)
    model.train()
    losses = []
    for k in tqdm(range(config.steps), desc=f"train {method}"):
        batch = collate([dataset[i] for i in batch_indices(len(dataset), config.batch_size, config.seed, k)], pad_id=tokenizer.pad_token_id)
        loss = model(**batch).loss  # mean over the batch's answer tokens
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, defaults.max_grad_norm)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    scored = score(model, tokenizer, test_set, max_new_tokens=config.max_new_tokens, batch_size=defaults.eval_batch_size, desc=f"score {method}")
    tail = losses[-defaults.log_every :]
    return {"trainable_params": sum(p.numel() for p in params), "final_loss": sum(tail) / len(tail), **_accuracy(scored)}


def _accuracy(scored: dict) -> dict:
    keep = ("accuracy", "correct", "total", "per_problem")
    return {**{k: scored[k] for k in keep}, "samples": scored["samples"][:3]}


def paired_difference(a: list[bool], b: list[bool]) -> tuple[float, float]:
    """Accuracy difference a − b on the same problems, in points, and the half-width of its 95%
    interval from the per-problem differences (normal approximation; paired, so problems both
    get right or both get wrong add no noise)."""
    d = [int(x) - int(y) for x, y in zip(a, b, strict=True)]
    mean = sum(d) / len(d)
    var = sum((x - mean) ** 2 for x in d) / max(len(d) - 1, 1)
    return 100 * mean, 100 * 1.96 * (var / len(d)) ** 0.5


def run(config: LLMQualityConfig, res: dict, save: Callable[[], None]) -> None:
    """Fill `res` method by method, calling `save` after each (a long run keeps what it measured)."""
    from llm.data import load_task
    from llm.evaluate import score
    from llm.models import load_base

    base, tokenizer = load_base()
    base.requires_grad_(False)
    train_set, test_set = load_task("arithmetic", None, config.train_size, config.test_size)
    test_set = test_set[: config.eval_limit] if config.eval_limit else test_set
    res.update(base_parameters=sum(p.numel() for p in base.parameters()), test_problems=len(test_set), methods={})
    for method in ["zero-shot", *config.methods]:
        t0 = time.time()
        if method == "zero-shot":
            row = {"trainable_params": 0, **_accuracy(score(base, tokenizer, test_set, max_new_tokens=config.max_new_tokens, desc="zero-shot"))}
        elif method == PEFT_DORA:
            row = train_peft(method, config, base, tokenizer, train_set, test_set)
        else:
            row = train_ours(method, config, base, tokenizer)
        res["methods"][method] = {**row, "seconds": time.time() - t0}
        save()


def targets_check(res: dict) -> list[tuple[str, bool, str]]:
    rows = res["methods"]
    if "lora" not in rows or "sbora-fa" not in rows:
        return []
    lora, fa = rows["lora"], rows["sbora-fa"]
    gap, half = paired_difference(fa["per_problem"], lora["per_problem"])
    share = fa["trainable_params"] / lora["trainable_params"]
    return [
        ("SBoRA-FA accuracy within 1 point of LoRA's", gap >= -1.0,
         f"{100 * fa['accuracy']:.1f}% vs {100 * lora['accuracy']:.1f}% ({gap:+.1f} ± {half:.1f} points, 95% paired interval)"),
        ("SBoRA-FA trainable parameters ≤ 55% of LoRA's", share <= 0.55, f"{share:.0%}"),
    ]


def markdown(payload: dict) -> str:
    res, cfg, env = payload["results"], payload["config"], payload["environment"]
    lines = [
        "# LLM quality: SmolLM2-135M-Instruct on the arithmetic task",
        "",
        f"Command: `{payload['command']}` — {env['date']}, CPU, {env['torch_threads']} torch thread(s); "
        f"rank {cfg['rank']} (s = 1) on q/k/v/o_proj, {cfg['steps']} steps of {cfg['batch_size']} problems, lr {cfg['lr']}, "
        f"seed {cfg['seed']}; test accuracy on {res['test_problems']} problems (greedy, final number exact match). "
        f"Run time {payload['seconds'] / 60:.1f} min ({payload['cpu_seconds'] / 60:.1f} min CPU), load average "
        f"{env['load_average'][0]:.1f} at the start, {env['load_average_end'][0]:.1f} at the end"
        + ("." if payload.get("complete") else "; **partial: the run was still going or stopped early**."),
        "",
        "| method | # params | % of base | accuracy (%) | Δ vs LoRA (points, 95% paired) | final train loss |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    lora = res["methods"].get("lora")
    for m, row in res["methods"].items():
        delta = "—"
        if lora and m != "zero-shot":
            diff, half = paired_difference(row["per_problem"], lora["per_problem"])
            delta = f"{diff:+.1f} ± {half:.1f}"
        loss = f"{row['final_loss']:.3f}" if row.get("final_loss") is not None else "—"
        lines.append(
            f"| {LABELS[m]} | {row['trainable_params']:,} | {100 * row['trainable_params'] / res['base_parameters']:.3f} | "
            f"{100 * row['accuracy']:.1f} ({row['correct']}/{row['total']}) | {delta} | {loss} |"
        )
    lines += ["", "## Targets", ""]
    lines += [f"- {'met' if ok else '**missed**'}: {what} — {got}" for what, ok, got in targets_check(res)]
    full = LLMQualityConfig()
    if res["test_problems"] < full.test_size or cfg["steps"] < full.steps:
        lines += ["", f"With {cfg['steps']} steps and {res['test_problems']} test problems (one problem = "
                  f"{100 / res['test_problems']:.1f} points) this run checks the pipeline, not a 1-point difference; "
                  f"`--preset full` ({full.steps} steps, {full.test_size} problems) is the comparison."]
    return "\n".join(lines) + "\n"


def figure(payload: dict):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = payload["results"]["methods"]
    fig, ax = plt.subplots(figsize=(8, 3.6))
    names = list(rows)
    bars = ax.bar([LABELS[m] for m in names], [100 * rows[m]["accuracy"] for m in names], color=["grey"] + ["C0"] * (len(names) - 1))
    for bar, m in zip(bars, names, strict=True):
        ax.annotate(f"{rows[m]['trainable_params'] / 1e6:.2f}M", (bar.get_x() + bar.get_width() / 2, bar.get_height()),
                    ha="center", va="bottom", fontsize=8)
    ax.set_ylabel("test accuracy (%)")
    ax.set_title(f"SmolLM2-135M-Instruct, arithmetic ({payload['results']['test_problems']} problems); labels: trainable parameters", fontsize=9)
    ax.tick_params(axis="x", labelsize=8)
    fig.tight_layout()
    return fig


def main(argv: list[str] | None = None) -> None:
    payload = run_benchmark("llm_quality", __doc__, LLMQualityConfig, PRESETS, argv, run, markdown, figure)
    for what, ok, got in targets_check(payload["results"]):
        print(f"{'met   ' if ok else 'MISSED'} {what}: {got}")


if __name__ == "__main__":
    main()
