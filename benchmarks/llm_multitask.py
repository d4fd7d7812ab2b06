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

Retention is reported with 95% intervals over the test problems: merged / solo per task and
pooled over the tasks (``benchmarks.accuracy.ratio_interval``, delta method), and each
disjoint-slot method's retention minus the naive LoRA sum's, paired on the same problems
(``ratio_difference``).

Results: ``docs/benchmarks/llm_multitask.{json,md,png}`` (``llm_multitask_<preset>.*`` with ``--preset full`` or ``cpu``).

    python -m benchmarks.llm_multitask --preset quick     # pipeline check: ~7 min on 2 shared CPU cores
    python -m benchmarks.llm_multitask --preset full      # on a CUDA GPU (device auto), see FULL_RUNTIME
    python -m benchmarks.llm_multitask --preset cpu --worker 0/2 &    # sized for 2 CPU cores, resumable,
    python -m benchmarks.llm_multitask --preset cpu --worker 1/2 &    # two workers at one thread each
    python -m benchmarks.llm_multitask --preset cpu --merge           # -> docs/benchmarks/llm_multitask_cpu.*, any time

**Resumable runs in units** (``--worker K/N``, as ``benchmarks/llm_quality.py``): the zero-shot
base on every task; per method its task adapters (train, score solo: one unit each), then its
merge (compose and score every task: waits for that method's task units). Each finished unit
is one JSON file in ``--work-dir/units``; the same command continues a stopped run; ``--merge``
builds the report from whatever is done. **The cpu preset**: 150 steps of 8 examples per task
adapter at lr 3e-3 (the learning rate the LLM-quality sweep at this budget favoured), 300 test
examples per task; every task must reach ≥ 50% solo for its retention to mean something.
"""

from __future__ import annotations

import copy
import gc
import math
import statistics
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from sbora.configuration import ConfigError

from .accuracy import paired_difference, ratio_difference, ratio_interval
from .common import UnitStore, clone_sharing_weights, llm_start, parse_worker, run_benchmark, run_resumable

TASKS = ("addsub", "multistep", "reverse")
DISJOINT = ("sbora-fa", "sbora-fb", "ortho")  # one slot per task
NAIVE = "lora"
LABELS = {"sbora-fa": "SBoRA-FA", "sbora-fb": "SBoRA-FB", "ortho": "Ortho", "lora": "LoRA (naive sum)"}
KEEP = 0.95
SOLO_FLOOR = 0.5  # a task's solo accuracy below this leaves too little to keep for its retention to mean much
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
    work_dir: str = field(default="outputs/benchmarks/llm_multitask", metadata={"help": "task files, adapters and merged models (one folder per method); "
                                                                                           "with --worker also the finished units (units/)"})
    worker: str = field(default="", metadata={"help": "K/N: run worker K's share (every N-th unit, from the K-th) of the resumable schedule; "
                                                      "the same command continues a stopped run; empty: everything in one pass, not resumable"})
    merge: bool = field(default=False, metadata={"help": "only build the report from the finished units in --work-dir (no model is loaded)"})

    def validate(self) -> None:
        from llm.data import GENERATED_TASKS

        bad = sorted(set(self.tasks) - set(GENERATED_TASKS)) + sorted(set(self.methods) - {*DISJOINT, NAIVE})
        if bad:
            raise ConfigError(f"unknown task(s) or method(s) {', '.join(bad)}; tasks: {', '.join(GENERATED_TASKS)}; methods: {', '.join([*DISJOINT, NAIVE])}")
        if len(self.tasks) < 2 or len(set(self.tasks)) != len(self.tasks):
            raise ConfigError("give two or more different tasks to merge")
        if min(self.rank, self.steps, self.batch_size, self.train_size, self.test_size, self.max_new_tokens, self.eval_batch_size) < 1:
            raise ConfigError("rank, steps, batch_size, train_size, test_size, max_new_tokens and eval_batch_size must be >= 1")
        if self.worker:
            parse_worker(self.worker)


PRESETS = {
    # 2 steps of 1 example, 6 test examples per task: every method trains, merges and scores end to end (~7 min here)
    "quick": {"steps": 2, "batch_size": 1, "train_size": 16, "test_size": 6, "max_new_tokens": 20, "eval_batch_size": 8},
    "full": {},  # the defaults above
    # sized for 2 CPU cores (one thread per worker): 12 runs × 150 steps of 8 and ≈ 8,000 greedy answers, ≈ 1.5-2 h with two workers
    "cpu": {"steps": 150, "batch_size": 8, "lr": 3e-3, "train_size": 2000, "test_size": 300, "max_new_tokens": 40, "eval_batch_size": 64,
            "cpu": True, "worker": "0/1", "work_dir": "outputs/benchmarks/llm_multitask_cpu"},
}


def write_tasks(config: MultitaskConfig, folder: Path | None = None) -> dict[str, tuple[Path, list]]:
    """task -> (its training JSONL file, its test examples); the test examples also go to ``<task>-test.jsonl``
    (in `folder`, default ``<work_dir>/tasks``)."""
    from llm.data import generated_split, write_jsonl

    folder = folder or Path(config.work_dir) / "tasks"
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


def task_config(config: MultitaskConfig, method: str, task: str, slot: int, train_file: Path):
    """llm.train's options for the adapter of `task` (task k in slot k for the disjoint methods)."""
    from llm.train import TrainConfig

    return TrainConfig(
        method=method, task=str(train_file), eval_data=str(train_file.with_name(f"{task}-test.jsonl")), adapter_name=task,
        adapter={"slot": slot if method in DISJOINT else 0, "seed": config.seed, "rank": config.rank, "alpha": float(config.rank), "dropout": 0.0},
        train_seed=config.seed, steps=config.steps, batch_size=config.batch_size, lr=config.lr, lr_schedule="cosine", warmup_steps=config.steps // 15,
        eval=False, cpu=config.cpu, checkpoint_every=0, overwrite=True, output_dir=str(Path(config.work_dir) / method / task),
    )


def run(config: MultitaskConfig, res: dict, save: Callable[[], None]) -> None:
    """Per method: train and score each task's adapter alone, then merge them all and score every task; `save` after each step."""
    from llm.compose import ComposeConfig, compose
    from llm.models import load_base
    from llm.train import train

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
            summary = train(task_config(config, method, task, slot, train_file), model=model, tokenizer=tokenizer)
            files.append(summary["adapter"])
            row["solo"][task] = sheet(model, tokenizer, test_set, config, f"solo {method} {task}")
            row["trainable_params"][task], row["seconds"][task] = summary["trainable_params"], time.time() - t0
            save()
        t0, merged = time.time(), copy.deepcopy(base)  # its own weights: compose folds the adapters into them
        with warnings.catch_warnings(record=True) as caught:  # LoRA's interference warning: recorded, expected
            warnings.simplefilter("always")
            report = compose(ComposeConfig(adapter=files, out=str(Path(config.work_dir) / method / "merged")), model=merged, tokenizer=tokenizer)
        row["interference"], row["warnings"] = report["interference"], [str(w.message) for w in caught if "interfere" in str(w.message)]
        for task, (_, test_set) in tasks.items():
            row["merged"][task] = sheet(merged, tokenizer, test_set, config, f"merged {method} {task}")
        row["seconds"]["merged"] = time.time() - t0
        save()
        del merged


# ---------------------------------------------------------------------------- resumable runs in units (--worker, --merge)


def protocol(config: MultitaskConfig) -> dict:
    """The settings every unit of one resumable run shares; methods may be added between runs."""
    keys = ("tasks", "rank", "lr", "steps", "batch_size", "train_size", "test_size", "seed", "max_new_tokens", "eval_batch_size")
    return {k: getattr(config, k) for k in keys}


def schedule(config: MultitaskConfig) -> list[tuple]:
    """The zero-shot base, then per method its task adapters and its merge (which needs them all)."""
    return [("zero-shot",), *(u for m in config.methods for u in [*(("solo", m, t) for t in config.tasks), ("merged", m)])]


def unit_key(unit: tuple) -> str:
    return "-".join(unit)


class Schedule:
    def __init__(self, config: MultitaskConfig):
        self.config, self.units = config, schedule(config)
        self.store = UnitStore(Path(config.work_dir) / "units", protocol(config))

    def is_done(self, unit: tuple) -> bool:
        return self.store.load(unit_key(unit)) is not None

    def ready(self, unit: tuple) -> bool:
        return unit[0] != "merged" or all(self.is_done(("solo", unit[1], t)) for t in self.config.tasks)


class Worker:
    """Runs units on one loaded base; each unit's result goes to the store when it ends."""

    def __init__(self, config: MultitaskConfig, sched: Schedule, base, tokenizer, device: str, worker: int):
        self.config, self.sched, self.base, self.tokenizer, self.device = config, sched, base, tokenizer, device
        self.tasks = write_tasks(config, Path(config.work_dir) / "tasks" / f"worker{worker}")  # one writer per file

    def do(self, unit: tuple) -> None:
        from llm.compose import ComposeConfig, compose
        from llm.train import train

        t0, c0 = time.time(), time.process_time()
        print(f"worker {self.config.worker}: unit {unit_key(unit)}", flush=True)
        result: dict = {"worker": self.config.worker, "started": t0, "device": self.device}
        if unit[0] == "zero-shot":
            result["sheets"] = {t: sheet(self.base, self.tokenizer, test, self.config, f"zero-shot {t}") for t, (_, test) in self.tasks.items()}
        elif unit[0] == "solo":
            _, method, task = unit
            train_file, test_set = self.tasks[task]
            model = clone_sharing_weights(self.base)
            summary = train(task_config(self.config, method, task, self.config.tasks.index(task), train_file), model=model, tokenizer=self.tokenizer)
            result.update(adapter=summary["adapter"], trainable_params=summary["trainable_params"], final_loss=summary["final_loss"],
                          steps=summary["steps"], train_seconds=time.time() - t0)
            result["sheet"] = sheet(model, self.tokenizer, test_set, self.config, f"solo {method} {task}")
            del model
        else:
            method = unit[1]
            files = [self.sched.store.load(unit_key(("solo", method, t)))["adapter"] for t in self.config.tasks]
            merged = copy.deepcopy(self.base)  # its own weights: compose folds the adapters into them
            with warnings.catch_warnings(record=True) as caught:  # LoRA's interference warning: recorded, expected
                warnings.simplefilter("always")
                report = compose(ComposeConfig(adapter=files, out=str(Path(self.config.work_dir) / method / "merged")), model=merged,
                                 tokenizer=self.tokenizer)
            result.update(interference=report["interference"], warnings=[str(w.message) for w in caught if "interfere" in str(w.message)])
            talk = report.get("crosstalk") or {}  # llm.compose's output cross-talk on calibration inputs, where it reports one
            result["crosstalk"] = {pair: {k: v.get(k) for k in ("median", "max", "overall")} for pair, v in talk.get("pairs", {}).items()}
            result["sheets"] = {t: sheet(merged, self.tokenizer, test, self.config, f"merged {method} {t}") for t, (_, test) in self.tasks.items()}
            del merged
        result.update(seconds=time.time() - t0, cpu_seconds=time.process_time() - c0, finished=time.time())
        self.sched.store.save(unit_key(unit), result)
        gc.collect()


def collect(config: MultitaskConfig) -> dict:
    """The results in the shape ``run`` fills, from the finished units (no model needed), plus
    ``units`` (done / total), ``pending`` and ``timing``."""
    sched = Schedule(config)
    records = {u: sched.store.load(unit_key(u)) for u in sched.units}
    found = [r for r in records.values() if r is not None]
    res: dict = {"device": next((r["device"] for r in found), "?"), "zero_shot": {}, "methods": {}}
    if records[("zero-shot",)]:
        res["zero_shot"] = records[("zero-shot",)]["sheets"]
    for method in config.methods:
        solos = {t: records[("solo", method, t)] for t in config.tasks if records[("solo", method, t)]}
        if not solos:
            continue
        row = res["methods"][method] = {"solo": {t: r["sheet"] for t, r in solos.items()}, "merged": {},
                                        "trainable_params": {t: r["trainable_params"] for t, r in solos.items()},
                                        "seconds": {t: r["seconds"] for t, r in solos.items()}}
        merged = records[("merged", method)]
        if merged:
            row.update(merged=merged["sheets"], interference=merged["interference"], warnings=merged["warnings"], crosstalk=merged.get("crosstalk", {}))
            row["seconds"]["merged"] = merged["seconds"]
    pending = [unit_key(u) for u, r in records.items() if r is None]
    steps = [r["train_seconds"] / r["steps"] for r in found if r.get("steps")]
    answers = sum(len(s["per_problem"]) for r in found for s in ([r["sheet"]] if "sheet" in r else r["sheets"].values()))
    timing = {} if not found else {
        "step_seconds_median": statistics.median(steps) if steps else math.nan, "training_runs": len(steps), "answers": answers,
        "worker_seconds": sum(r["seconds"] for r in found), "worker_cpu_seconds": sum(r["cpu_seconds"] for r in found),
        "wall_seconds": max(r["finished"] for r in found) - min(r["started"] for r in found), "workers": sorted({r["worker"] for r in found})}
    res.update(units={"done": len(found), "total": len(sched.units)}, pending=pending, timing=timing)
    return res


def measure(config: MultitaskConfig, res: dict, save: Callable[[], None]) -> None:
    if config.worker or config.merge:
        run_resumable(config, res, save, collect, Schedule, llm_start(Worker))
    else:
        run(config, res, save)


# ---------------------------------------------------------------------------- reading the results


def kept(solo: dict, merged: dict) -> float:
    """Merged accuracy as a share of solo accuracy (nan when the solo adapter got nothing right)."""
    return merged["accuracy"] / solo["accuracy"] if solo["accuracy"] else math.nan


def pooled(row: dict, part: str, tasks: list[str]) -> list[bool]:
    """One method's answer sheets of every task, end to end (solo or merged)."""
    return [x for t in tasks for x in row[part][t]["per_problem"]]


def retention_rows(res: dict) -> dict[str, dict]:
    """Per method with a merge: kept share (merged / solo) ± 95% per task and pooled over tasks, and
    the pooled share minus the naive LoRA sum's (paired on the same problems)."""
    rows = {m: r for m, r in res.get("methods", {}).items() if r["merged"] and set(r["merged"]) == set(r["solo"])}
    out = {}
    for m, row in rows.items():
        tasks = list(row["solo"])
        entry = out[m] = {"per_task": {t: ratio_interval(row["merged"][t]["per_problem"], row["solo"][t]["per_problem"]) for t in tasks},
                          "pooled": ratio_interval(pooled(row, "merged", tasks), pooled(row, "solo", tasks)),
                          "solo": statistics.fmean(pooled(row, "solo", tasks)), "merged": statistics.fmean(pooled(row, "merged", tasks))}
        if m != NAIVE and NAIVE in rows and list(rows[NAIVE]["solo"]) == tasks:
            entry["vs_naive"] = ratio_difference(pooled(row, "merged", tasks), pooled(row, "solo", tasks),
                                                 pooled(rows[NAIVE], "merged", tasks), pooled(rows[NAIVE], "solo", tasks))
    return out


def _share(value: tuple[float, float]) -> str:
    r, half = value
    return "—" if r != r else f"{r:.1%}" + ("" if half != half else f" ± {half:.1%}")


def run_time(payload: dict) -> str:
    res, env = payload["results"], payload["environment"]
    t = res.get("timing")
    if not t:
        return (f"Run time {payload['seconds'] / 60:.1f} min ({payload['cpu_seconds'] / 60:.1f} min CPU), load average "
                f"{env['load_average'][0]:.1f} at the start, {env['load_average_end'][0]:.1f} at the end")
    return (f"Units done: {res['units']['done']} of {res['units']['total']}, by worker(s) {', '.join(t['workers'])}: "
            f"{t['wall_seconds'] / 3600:.2f} h from the first unit's start to the last one's end, {t['worker_seconds'] / 3600:.2f} h of worker time "
            f"({t['worker_cpu_seconds'] / 3600:.2f} h CPU); measured costs: a training step {t['step_seconds_median']:.2f} s (median over "
            f"{t['training_runs']} runs), {t['answers']:,} greedy answers")


def targets_check(res: dict) -> list[tuple[str, bool, str]]:
    rows = {m: r for m, r in res.get("methods", {}).items() if len(r["merged"]) == len(r["solo"]) > 0}
    out = []
    for m in (m for m in DISJOINT if m in rows):
        shares = {t: kept(rows[m]["solo"][t], rows[m]["merged"][t]) for t in rows[m]["solo"]}
        out.append((f"{LABELS[m]} merged keeps ≥ {KEEP:.0%} of solo accuracy on every task", all(s >= KEEP for s in shares.values()),
                    ", ".join(f"{t} {s:.0%}" if s == s else f"{t} n/a (solo 0%)" for t, s in shares.items())))
        if NAIVE in rows:
            ours, naive = (statistics.fmean(rows[k]["merged"][t]["accuracy"] for t in rows[m]["merged"]) for k in (m, NAIVE))
            vs = retention_rows(res).get(m, {}).get("vs_naive")
            kept_text = "" if not vs or vs[1] != vs[1] else f"; kept share {vs[0]:+.1%} ± {vs[1]:.1%} vs the LoRA sum's (95%, paired)"
            # Met only when the paired interval of the kept share lies above the LoRA sum's: a higher mean alone is not a result.
            out.append((f"{LABELS[m]} merged keeps more than the naive LoRA sum (paired 95% interval above 0)",
                        bool(vs) and vs[0] - vs[1] > 0, f"mean accuracy over tasks {100 * ours:.1f}% vs {100 * naive:.1f}%{kept_text}"))
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
        f"every adapter, task k in slot k (SBoRA, Ortho); greedy, exact match, ≤ {cfg['max_new_tokens']} new tokens. " + run_time(payload)
        + ("." if payload.get("complete") else "; **partial: the run was still going or stopped early**."),
        "",
    ]
    if cfg["preset"] == "cpu":
        lines += ["**Sized for 2 CPU cores** (`--preset cpu`: resumable units, two workers at one thread each, tables by `--merge`); "
                  f"`--preset full` on a CUDA GPU remains the reference ({FULL_RUNTIME}).", ""]
    if quick:
        lines += [f"**Pipeline check, not a measurement of merging.** With {cfg['steps']} steps the adapters barely move and "
                  f"{cfg['test_size']} examples per task make one answer {100 / cfg['test_size']:.0f} points, so the accuracies below "
                  "say nothing about retention; the interference column is exact at any size. The measurement is "
                  f"`python -m benchmarks.llm_multitask --preset full` on a CUDA GPU: {FULL_RUNTIME}.", ""]
    zs = res.get("zero_shot", {})
    retention = retention_rows(res)
    lines += ["| method | task | # params | zero-shot base (%) | solo (%) | merged (%) | kept (merged / solo, 95%) | Δ merged − solo (points, paired 95%) |",
              "|---|---|---:|---:|---:|---:|---:|---:|"]
    for m, row in res.get("methods", {}).items():
        for task, solo in row["solo"].items():
            merged = row["merged"].get(task)
            cells = ["—", "—", "—"]
            if merged is not None:
                diff, half = paired_difference([merged["per_problem"]], [solo["per_problem"]])
                share = retention[m]["per_task"][task] if m in retention else (kept(solo, merged), math.nan)
                cells = [f"{100 * merged['accuracy']:.1f}", _share(share), f"{diff:+.1f} ± {half:.1f}"]
            lines.append(f"| {LABELS[m]} | {task} | {row['trainable_params'][task]:,} | {100 * zs[task]['accuracy']:.1f} | "
                         f"{100 * solo['accuracy']:.1f} | " + " | ".join(cells) + " |")
    if retention:
        lines += ["", "## Retention pooled over the tasks", "", "| method | solo (%) | merged (%) | kept (merged / solo, 95%) | kept − naive LoRA sum's (95%, paired) |",
                  "|---|---:|---:|---:|---:|"]
        for m, r in retention.items():
            d, half = r.get("vs_naive", (math.nan, math.nan))
            vs = "—" if d != d else f"{d:+.1%}" + ("" if half != half else f" ± {half:.1%}")
            lines.append(f"| {LABELS[m]} | {100 * r['solo']:.1f} | {100 * r['merged']:.1f} | {_share(r['pooled'])} | {vs} |")
        lines += ["", "Kept: merged accuracy / solo accuracy on the same test examples, 95% interval over examples (delta method, "
                  "`benchmarks.accuracy.ratio_interval`); pooled: every task's examples together. The difference to the naive LoRA sum "
                  "pairs the two methods on the same examples (`ratio_difference`)."]
    low = [f"{LABELS[m]} {t} {100 * s['accuracy']:.0f}%" for m, row in res.get("methods", {}).items() for t, s in row["solo"].items()
           if s["accuracy"] < SOLO_FLOOR]
    if res.get("methods"):
        lines += ["", f"Solo accuracy ≥ {SOLO_FLOOR:.0%} on every task (enough to keep for retention to mean something): "
                  + ("yes." if not low else "**no**: " + ", ".join(low) + ".")]
    lines += ["", "## Interference (llm.compose, max over layers)", "", "| method | " + " | ".join(f"{a}+{b}" for i, a in enumerate(cfg["tasks"]) for b in cfg["tasks"][i + 1:]) + " |",
              "|---|" + "---:|" * (len(cfg["tasks"]) * (len(cfg["tasks"]) - 1) // 2)]
    for m, row in res.get("methods", {}).items():
        if "interference" in row:
            lines.append(f"| {LABELS[m]} | " + " | ".join(f"{v:.3g}" for v in row["interference"].values()) + " |")
    talks = {m: row["crosstalk"] for m, row in res.get("methods", {}).items() if row.get("crosstalk")}
    if talks:
        pairs = list(next(iter(talks.values())))
        lines += ["", "## Output cross-talk on calibration inputs (llm.compose: ‖ΔW_j X_i‖ / ‖ΔW_i X_i‖, overall)", "",
                  "| method | " + " | ".join(pairs) + " |", "|---|" + "---:|" * len(pairs)]
        for m, talk in talks.items():
            lines.append(f"| {LABELS[m]} | " + " | ".join("—" if talk.get(p, {}).get("overall") is None else f"{talk[p]['overall']:.3g}" for p in pairs) + " |")
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
    methods = [m for m, r in res.get("methods", {}).items() if len(r["merged"]) == len(cfg["tasks"]) == len(r["solo"])]
    fig, axes = plt.subplots(1, len(cfg["tasks"]) + 1, figsize=(4 * (len(cfg["tasks"]) + 1), 3.4))
    retention = retention_rows(res)
    kept_methods = [m for m in methods if m in retention]
    axes[-1].bar(range(len(kept_methods)), [100 * retention[m]["pooled"][0] for m in kept_methods],
                 yerr=[0 if retention[m]["pooled"][1] != retention[m]["pooled"][1] else 100 * retention[m]["pooled"][1] for m in kept_methods],
                 capsize=3, color="C2")
    axes[-1].axhline(100 * KEEP, color="grey", ls="--", lw=1)
    axes[-1].set_xticks(range(len(kept_methods)), [LABELS[m] for m in kept_methods], fontsize=7, rotation=15)
    axes[-1].set_title("kept: merged / solo, pooled over tasks (95%)", fontsize=9)
    axes[-1].set_ylabel("%")
    for ax, task in zip(axes[:-1], cfg["tasks"], strict=True):
        ax.set_ylim(0, 100)
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


def main(argv: list[str] | None = None) -> dict:
    return run_benchmark("llm_multitask", __doc__, MultitaskConfig, PRESETS, argv, measure, markdown, figure, targets_check)


if __name__ == "__main__":
    main()
