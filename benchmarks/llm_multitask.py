"""Multi-task merging: task adapters trained apart, merged into one model by ``llm.compose``, each task scored merged vs solo.

Tasks (seeded generators of ``llm.data``, written as JSONL files into the work folder and
trained from them, as a user's own task would be): ``addsub`` (one-step word problems),
``multistep`` (two-step word problems) and ``reverse`` (a text task: write a list of words
backwards; graded on the exact text). The two arithmetic tasks share their instruction and
vocabulary, so they compete for the same directions; the text task does not.

Per method, one adapter per task, trained by ``llm.train.train`` with the same seed: SBoRA-FA,
SBoRA-FB and Ortho put task k in slot k (disjoint columns, disjoint rows, orthogonal basis
rows of every weight); LoRA is the naive baseline (same seed, nothing keeps the updates apart,
which ``llm.compose`` warns about). Each adapter is scored alone on its own task (**solo**);
then ``llm.compose.compose`` merges all of the method's adapters into one copy of the base
(W + Σ_k ΔW_k, saved as a plain transformers folder) and that **merged** model is scored on
every task. Next to the accuracies, ``llm.compose``'s interference measure per pair of tasks:
max over layers of min(‖ΔW_i ΔW_jᵀ‖, ‖ΔW_iᵀ ΔW_j‖) / (‖ΔW_i‖·‖ΔW_j‖), 0 for disjoint slots.

Targets (issue 17): merged disjoint-slot tasks keep ≥ 95% of their solo accuracy, and beat the
naive LoRA sum.

Results: ``docs/benchmarks/llm_multitask.{json,md,png}`` (``llm_multitask_full.*`` with ``--preset full``).

    python -m benchmarks.llm_multitask --preset quick     # pipeline check: ~7 min on 2 shared CPU cores
    python -m benchmarks.llm_multitask --preset full      # on a CUDA GPU (device auto), see FULL_RUNTIME
"""

from __future__ import annotations

import copy
import math
import statistics
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from sbora_diffusion.configuration import ConfigError

from .accuracy import paired_difference
from .common import clone_sharing_weights, run_benchmark

TASKS = ("addsub", "multistep", "reverse")
DISJOINT = ("sbora-fa", "sbora-fb", "ortho")  # one slot per task
NAIVE = "lora"
LABELS = {"sbora-fa": "SBoRA-FA", "sbora-fb": "SBoRA-FB", "ortho": "Ortho", "lora": "LoRA (naive sum)"}
KEEP = 0.95
FULL_RUNTIME = ("≈ 10 min on one H100/H200-class GPU, estimated, not measured (no GPU here): 12 runs × 300 steps of 16 at "
                "~0.06 s ≈ 4 min, 13,500 greedy answers in batches of 128 ≈ 2 min, 4 merged models copied and saved ≈ 2 min; "
                "about 14 h on this machine's 2 CPU cores")


@dataclass
class MultitaskConfig:
    tasks: list[str] = field(default_factory=lambda: list(TASKS), metadata={"help": "generated tasks (llm.data.GENERATED_TASKS): " + ", ".join(TASKS)})
    methods: list[str] = field(default_factory=lambda: [*DISJOINT, NAIVE], metadata={"help": "methods: " + ", ".join([*DISJOINT, NAIVE])})
    rank: int = field(default=16, metadata={"help": "adapter rank (alpha = rank, so s = 1)"})
    lr: float = field(default=1e-3, metadata={"help": "peak learning rate of every run (warm-up, then cosine)"})
    steps: int = field(default=300, metadata={"help": "optimizer steps per task adapter"})
    batch_size: int = field(default=16, metadata={"help": "examples per step"})
    train_size: int = field(default=2000, metadata={"help": "training examples per task"})
    test_size: int = field(default=500, metadata={"help": "test examples per task"})
    seed: int = field(default=0, metadata={"help": "adapter seed and train seed of every adapter (the same for all: composable slots)"})
    max_new_tokens: int = field(default=48, metadata={"help": "greedy decoding length limit when scoring"})
    eval_batch_size: int = field(default=128, metadata={"help": "prompts generated at once when scoring"})
    cpu: bool = field(default=False, metadata={"help": "run on the CPU even where CUDA is present (default: CUDA when present)"})
    threads: int = field(default=1, metadata={"help": "torch CPU threads (0: torch's default)"})
    out_dir: str = field(default="", metadata={"help": "where llm_multitask.{json,md,png} go (llm_multitask_full.* for --preset full); empty: the repository's docs/benchmarks/"})
    work_dir: str = field(default="outputs/benchmarks/llm_multitask", metadata={"help": "task files, adapters and merged models (one folder per method)"})

    def validate(self) -> None:
        from llm.data import GENERATED_TASKS

        bad = sorted(set(self.tasks) - set(GENERATED_TASKS)) + sorted(set(self.methods) - {*DISJOINT, NAIVE})
        if bad:
            raise ConfigError(f"unknown task(s) or method(s) {', '.join(bad)}; tasks: {', '.join(GENERATED_TASKS)}; methods: {', '.join([*DISJOINT, NAIVE])}")
        if len(self.tasks) < 2 or len(set(self.tasks)) != len(self.tasks):
            raise ConfigError("give two or more different tasks to merge")
        if min(self.rank, self.steps, self.batch_size, self.train_size, self.test_size, self.max_new_tokens, self.eval_batch_size) < 1:
            raise ConfigError("rank, steps, batch_size, train_size, test_size, max_new_tokens and eval_batch_size must be >= 1")


PRESETS = {
    # 2 steps of 1 example, 6 test examples per task: every method trains, merges and scores end to end (~7 min here)
    "quick": {"steps": 2, "batch_size": 1, "train_size": 16, "test_size": 6, "max_new_tokens": 20, "eval_batch_size": 8},
    "full": {},  # the defaults above
}


def write_tasks(config: MultitaskConfig) -> dict[str, tuple[Path, list]]:
    """task -> (its training JSONL file, its test examples); the test examples also go to ``<task>-test.jsonl``."""
    from llm.data import generated_split, write_jsonl

    folder = Path(config.work_dir) / "tasks"
    out = {}
    for task in config.tasks:
        train_set, test_set = generated_split(task, config.train_size, config.test_size)
        out[task] = (write_jsonl(folder / f"{task}.jsonl", train_set), test_set)
        write_jsonl(folder / f"{task}-test.jsonl", test_set)
    return out


def sheet(model, tokenizer, examples, config: MultitaskConfig, desc: str) -> dict:
    from llm.evaluate import score

    scored = score(model, tokenizer, examples, max_new_tokens=config.max_new_tokens, batch_size=config.eval_batch_size, desc=desc)
    return {**{k: scored[k] for k in ("accuracy", "correct", "total", "per_problem")}, "samples": scored["samples"][:2]}


def run(config: MultitaskConfig, res: dict, save: Callable[[], None]) -> None:
    """Per method: train and score each task's adapter alone, then merge them all and score every task; `save` after each step."""
    from llm.compose import ComposeConfig, compose
    from llm.models import load_base
    from llm.train import TrainConfig, train

    config.validate()
    device = torch.device("cuda" if torch.cuda.is_available() and not config.cpu else "cpu")
    base, tokenizer = load_base()
    base.requires_grad_(False).to(device)
    tasks = write_tasks(config)
    res.update(device=torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU", zero_shot={}, methods={})
    for task, (_, test_set) in tasks.items():
        res["zero_shot"][task] = sheet(base, tokenizer, test_set, config, f"zero-shot {task}")
    save()
    for method in config.methods:
        row = res["methods"][method] = {"solo": {}, "merged": {}, "trainable_params": {}, "seconds": {}}
        files = []
        for slot, (task, (train_file, test_set)) in enumerate(tasks.items()):
            t0, model = time.time(), clone_sharing_weights(base)
            summary = train(TrainConfig(
                method=method, task=str(train_file), eval_data=str(train_file.with_name(f"{task}-test.jsonl")), adapter_name=task,
                slot=slot if method in DISJOINT else 0, seed=config.seed, train_seed=config.seed, rank=config.rank, alpha=float(config.rank),
                dropout=0.0, steps=config.steps, batch_size=config.batch_size, lr=config.lr, lr_schedule="cosine", warmup_steps=config.steps // 15,
                eval=False, cpu=config.cpu, checkpoint_every=0, overwrite=True, output_dir=str(Path(config.work_dir) / method / task),
            ), model=model, tokenizer=tokenizer)
            files.append(summary["adapter"])
            row["solo"][task] = sheet(model, tokenizer, test_set, config, f"solo {method} {task}")
            row["trainable_params"][task], row["seconds"][task] = summary["trainable_params"], time.time() - t0
            save()
        t0, merged = time.time(), copy.deepcopy(base)  # its own weights: compose folds the adapters into them
        with warnings.catch_warnings(record=True) as caught:  # LoRA's interference warning: recorded, expected
            warnings.simplefilter("always")
            report = compose(ComposeConfig(adapter=files, output=str(Path(config.work_dir) / method / "merged")), model=merged, tokenizer=tokenizer)
        row["interference"], row["warnings"] = report["interference"], [str(w.message) for w in caught if "interfere" in str(w.message)]
        for task, (_, test_set) in tasks.items():
            row["merged"][task] = sheet(merged, tokenizer, test_set, config, f"merged {method} {task}")
        row["seconds"]["merged"] = time.time() - t0
        save()
        del merged


# ---------------------------------------------------------------------------- reading the results


def kept(solo: dict, merged: dict) -> float:
    """Merged accuracy as a share of solo accuracy (nan when the solo adapter got nothing right)."""
    return merged["accuracy"] / solo["accuracy"] if solo["accuracy"] else math.nan


def targets_check(res: dict) -> list[tuple[str, bool, str]]:
    rows = {m: r for m, r in res.get("methods", {}).items() if len(r["merged"]) == len(r["solo"]) > 0}
    out = []
    for m in (m for m in DISJOINT if m in rows):
        shares = {t: kept(rows[m]["solo"][t], rows[m]["merged"][t]) for t in rows[m]["solo"]}
        out.append((f"{LABELS[m]} merged keeps ≥ {KEEP:.0%} of solo accuracy on every task", all(s >= KEEP for s in shares.values()),
                    ", ".join(f"{t} {s:.0%}" if s == s else f"{t} n/a (solo 0%)" for t, s in shares.items())))
        if NAIVE in rows:
            ours, naive = (statistics.fmean(rows[k]["merged"][t]["accuracy"] for t in rows[m]["merged"]) for k in (m, NAIVE))
            out.append((f"{LABELS[m]} merged beats the naive LoRA sum (mean over tasks)", ours > naive, f"{100 * ours:.1f}% vs {100 * naive:.1f}%"))
    return out


def markdown(payload: dict) -> str:
    res, cfg, env = payload["results"], payload["config"], payload["environment"]
    quick = cfg["preset"] == "quick"
    lines = [
        "# Multi-task merging: SmolLM2-135M-Instruct, task adapters merged by llm.compose",
        "",
        f"Command: `{payload['command']}` — {env['date']}, {res.get('device', '?')}, {env['torch_threads']} torch thread(s). "
        f"Tasks {', '.join(cfg['tasks'])}: {cfg['train_size']:,} training and {cfg['test_size']:,} test examples each; rank {cfg['rank']} "
        f"(s = 1) on q/k/v/o_proj, {cfg['steps']} steps of {cfg['batch_size']} at lr {cfg['lr']:g} (warm-up, cosine), seed {cfg['seed']} for "
        f"every adapter, task k in slot k (SBoRA, Ortho); greedy, exact match, ≤ {cfg['max_new_tokens']} new tokens. Run time "
        f"{payload['seconds'] / 60:.1f} min ({payload['cpu_seconds'] / 60:.1f} min CPU), load average {env['load_average'][0]:.1f} at the "
        f"start, {env['load_average_end'][0]:.1f} at the end" + ("." if payload.get("complete") else "; **partial: the run was still going or stopped early**."),
        "",
    ]
    if quick:
        lines += [f"**Pipeline check, not a measurement of merging.** With {cfg['steps']} steps the adapters barely move and "
                  f"{cfg['test_size']} examples per task make one answer {100 / cfg['test_size']:.0f} points, so the accuracies below "
                  "say nothing about retention; the interference column is exact at any size. The measurement is "
                  f"`python -m benchmarks.llm_multitask --preset full` on a CUDA GPU: {FULL_RUNTIME}.", ""]
    zs = res.get("zero_shot", {})
    lines += ["| method | task | # params | zero-shot base (%) | solo (%) | merged (%) | kept (merged / solo) | Δ merged − solo (points, paired 95%) |",
              "|---|---|---:|---:|---:|---:|---:|---:|"]
    for m, row in res.get("methods", {}).items():
        for task, solo in row["solo"].items():
            merged = row["merged"].get(task)
            cells = ["—", "—", "—"]
            if merged is not None:
                diff, half = paired_difference([merged["per_problem"]], [solo["per_problem"]])
                share = kept(solo, merged)
                cells = [f"{100 * merged['accuracy']:.1f}", "—" if share != share else f"{share:.0%}", f"{diff:+.1f} ± {half:.1f}"]
            lines.append(f"| {LABELS[m]} | {task} | {row['trainable_params'][task]:,} | {100 * zs[task]['accuracy']:.1f} | "
                         f"{100 * solo['accuracy']:.1f} | " + " | ".join(cells) + " |")
    lines += ["", "## Interference (llm.compose, max over layers)", "", "| method | " + " | ".join(f"{a}+{b}" for i, a in enumerate(cfg["tasks"]) for b in cfg["tasks"][i + 1:]) + " |",
              "|---|" + "---:|" * (len(cfg["tasks"]) * (len(cfg["tasks"]) - 1) // 2)]
    for m, row in res.get("methods", {}).items():
        if "interference" in row:
            lines.append(f"| {LABELS[m]} | " + " | ".join(f"{v:.3g}" for v in row["interference"].values()) + " |")
    lines += ["", "## Targets", ""]
    lines += [f"- {'met' if ok else '**missed**'}: {what} — {got}" for what, ok, got in targets_check(res)] or ["- not yet measured"]
    if quick:
        lines.append("- (quick preset: these lines only show that the check runs)")
    return "\n".join(lines) + "\n"


def figure(payload: dict):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    res, cfg = payload["results"], payload["config"]
    methods = [m for m, r in res.get("methods", {}).items() if r["merged"]]
    fig, axes = plt.subplots(1, len(cfg["tasks"]), figsize=(4 * len(cfg["tasks"]), 3.4), sharey=True)
    for ax, task in zip(axes, cfg["tasks"], strict=True):
        x = range(len(methods))
        ax.bar([i - 0.2 for i in x], [100 * res["methods"][m]["solo"][task]["accuracy"] for m in methods], width=0.4, label="solo")
        ax.bar([i + 0.2 for i in x], [100 * res["methods"][m]["merged"][task]["accuracy"] for m in methods], width=0.4, label="merged")
        if task in res.get("zero_shot", {}):
            ax.axhline(100 * res["zero_shot"][task]["accuracy"], color="grey", ls="--", lw=1, label="zero-shot")
        ax.set_xticks(list(x), [LABELS[m] for m in methods], fontsize=7, rotation=15)
        ax.set_title(task, fontsize=9)
    axes[0].set_ylabel("test accuracy (%)")
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    return fig


def main(argv: list[str] | None = None) -> None:
    run_benchmark("llm_multitask", __doc__, MultitaskConfig, PRESETS, argv, run, markdown, figure, targets_check)


if __name__ == "__main__":
    main()
