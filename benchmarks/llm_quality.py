"""LLM quality: SmolLM2-135M-Instruct on the built-in arithmetic task, each method at its own best learning rate.

Protocol:

1. A validation split is carved from the training problems (``llm.data.carve_validation``,
   fixed by the data, never the test split); every run trains on the rest (``--val-size``).
2. **Sweep**: each method trains at every ``--lrs`` value (seed 0) and is scored on the
   validation split. Its best learning rate has the highest validation accuracy (ties: the
   lower final training loss).
3. **Seeds**: at its best learning rate each method trains with seeds 0..S−1 (``train_seed``
   = adapter ``seed`` = k: data order and initialization / index sets; seed 0 is the sweep's
   own run, kept) and is scored on the test split.

Every method trains through ``llm.train.train`` on the shared engine: LoRA, SBoRA-FA,
SBoRA-FB, Ortho and DiffLoRA (our cores), Delta-LoRA (``--method delta-lora``: λ = 2 from a
tenth of the run), DiffoRA selection over LoRA (``--select diffora``: gates for the first
fifth, then the best half of the 120 modules keep their adapter) and DoRA from peft
(``--method peft-dora``: peft's layers on the same loop). All with the same rank, s =
alpha/r = 1, no dropout, steps, batches, AdamW and schedule (warm-up, then cosine), scored
by ``llm.evaluate.score`` (greedy, exact match of the final number).

Reported in the shape of the SBoRA paper's table: trainable parameters and their share of
the base, test accuracy per problem kind (AddSub, MultiArith, SingleEq: the templates that
imitate the paper's arithmetic sets) and overall as mean ± 95% interval over the seeds, and
the difference to LoRA on the same problems, pooled over seeds (``benchmarks/accuracy.py``).
Also the sweep, the test-set size a 1-point difference needs (from the SBoRA-FA–LoRA
discordance) and where each core's update went (‖ΔW‖/‖W‖ per projection and depth).

Results: ``docs/benchmarks/llm_quality.{json,md,png}`` (``llm_quality_<preset>.*`` with ``--preset full`` or ``cpu``).

    python -m benchmarks.llm_quality --preset quick      # pipeline check: ~13 min on 2 shared CPU cores
    python -m benchmarks.llm_quality --preset full       # the comparison: on a CUDA GPU (device auto), see FULL_RUNTIME
    python -m benchmarks.llm_quality --preset cpu        # the comparison sized for 2 CPU cores, resumable (below)

**Resumable, seed-major runs in units** (``--worker K/N``; the cpu preset's default is ``0/1``).
The protocol is cut into units, in this order: the zero-shot base on test; every method's
sweep (one unit per method and learning rate: train seed 0, score validation, keep the
adapter); then seed 0 of every method on test (scored from the sweep's saved adapter), then
seed 1 of every method (train and score), and so on. Each finished unit is one JSON file in
``--work-dir/units`` (``benchmarks.common.UnitStore``, written atomically), so the same
command run again skips what is done, and a run stopped early still compares every method
at the seeds it finished. Two processes side by side take alternate units (``--worker 0/2``
and ``--worker 1/2``, one torch thread each); a unit whose inputs the other worker has not
finished yet (a method's test seeds need its whole sweep) waits. Each worker writes its
progress report to ``--work-dir/report-worker<K>/``; ``--merge`` builds the published
tables from whatever units are done (no model loaded) and says in the JSON whether the run
is complete. Raising ``--test-limit`` later scores only the added test problems, from the
saved adapters (scoring is cheaper than training); the test pool (``--test-size``) is fixed
up front so that the training problems never change.

**The cpu preset** (2 CPU cores, one torch thread per process; costs measured here: a training
step of 8 problems ≈ 6–8 s, a greedy answer ≈ 0.3–0.4 s in batches of 64): LoRA, SBoRA-FA,
SBoRA-FB and Ortho; 150 steps of 8 problems (1,200 of the 1,700 training problems, under one
epoch; the earlier one-seed run reached 88% for LoRA at 200 steps of 8 and lr 1e-3, from 12%
zero-shot, so 150 steps are enough for the methods to learn the task); learning rates 1e-3,
3e-3, 1e-2 on 300 validation problems. The sweep runs at the full step count, so the best
learning rate is picked at the length it is used at (no short-run proxy whose ranking would
need checking) and seed 0 at the best rate is the sweep's own run. 800 test problems per seed
(of a fixed pool of 3,000): ``problems_needed`` at the planning discordance of 8% asks 765 for a
±2-point interval from one seed, and the difference is pooled over 3 seeds. 20 training runs,
≈ 10,000 greedy answers: about 3.5–4 h with two workers.

    python -m benchmarks.llm_quality --preset cpu --worker 0/2 &    # one thread each
    python -m benchmarks.llm_quality --preset cpu --worker 1/2 &
    python -m benchmarks.llm_quality --preset cpu --merge          # -> docs/benchmarks/llm_quality_cpu.*, any time
"""

from __future__ import annotations

import gc
import json
import math
import re
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from sbora.configuration import ConfigError
from sbora.engine import TrainingDiverged

from .accuracy import discordance, paired_difference, problems_needed, seed_interval
from .common import UnitStore, clone_sharing_weights, llm_start, parse_worker, run_benchmark, run_resumable

# name -> llm.train options of the method (beyond those every run shares)
METHODS = {
    "lora": {"method": "lora"}, "sbora-fa": {"method": "sbora-fa"}, "sbora-fb": {"method": "sbora-fb"}, "ortho": {"method": "ortho"},
    "difflora": {"method": "difflora"}, "peft-dora": {"method": "peft-dora"}, "delta-lora": {"method": "delta-lora"},
    "diffora": {"method": "lora", "select": "diffora"},
}
LABELS = {"zero-shot": "zero-shot base", "lora": "LoRA", "sbora-fa": "SBoRA-FA", "sbora-fb": "SBoRA-FB", "ortho": "Ortho",
          "difflora": "DiffLoRA", "peft-dora": "DoRA (peft)", "delta-lora": "Delta-LoRA", "diffora": "DiffoRA (LoRA, best 50%)"}
KINDS = ("AddSub", "MultiArith", "SingleEq")
PLANNING_DISCORDANCE = 0.08  # SBoRA-FA vs LoRA disagreed on 16 of 200 problems in the first full run (one seed, lr 1e-3)
CPU_POINTS = 2.0  # the cpu preset's resolution: half-width of the paired 95% interval it is sized for
CPU_TEST = -(-problems_needed(PLANNING_DISCORDANCE, CPU_POINTS) // 100) * 100  # 765 -> 800 test problems per seed
# Methods a resumable run can score from their saved adapter files (llm.train saves peft-dora in peft's format, and
# Delta-LoRA / DiffoRA carry training procedures): seed 0's test score and added test problems are read back from the file.
UNIT_METHODS = ("lora", "sbora-fa", "sbora-fb", "ortho", "difflora")
TRAIN_RECORD = "benchmark-train.json"  # beside a unit's adapter: its training summary (a stopped unit reuses a finished training)
FULL_RUNTIME = ("≈ 1 h on one H100/H200-class GPU, estimated, not measured (no GPU here): 48 runs × 400 steps of 16 problems at "
                "~0.06 s ≈ 20 min, 57,000 greedy test answers plus 16,000 validation ones in batches of 128 at ~1 s ≈ 10 min, "
                "model set-up and saving ≈ 5 min; on this machine's 2 CPU cores it would take weeks")


@dataclass
class LLMQualityConfig:
    methods: list[str] = field(default_factory=lambda: list(METHODS), metadata={"help": "methods: " + ", ".join(METHODS)})
    lrs: list[float] = field(default_factory=lambda: [3e-4, 1e-3, 3e-3, 1e-2], metadata={"help": "learning rates of the sweep (every method)"})
    seeds: int = field(default=3, metadata={"help": "seeds at each method's best learning rate (train_seed = adapter seed = 0..N-1)"})
    rank: int = field(default=16, metadata={"help": "adapter rank of every method (alpha = rank, so s = 1)"})
    steps: int = field(default=400, metadata={"help": "optimizer steps of every run"})
    batch_size: int = field(default=16, metadata={"help": "problems per step"})
    train_size: int = field(default=4000, metadata={"help": "arithmetic training problems, validation included"})
    val_size: int = field(default=500, metadata={"help": "of those, held out for the sweep (llm.data.carve_validation)"})
    test_size: int = field(default=3000, metadata={"help": "arithmetic test problems of the fixed split (the training problems exclude all of them)"})
    test_limit: int = field(default=0, metadata={"help": "score the first N of the test problems (0: all); a resumable run (--worker) "
                                                         "given a larger N later scores only the added ones, from the saved adapters"})
    select_warmup: float = field(default=0.2, metadata={"help": "DiffoRA's cut: whole steps or a fraction of the run"})
    max_new_tokens: int = field(default=64, metadata={"help": "greedy decoding length limit when scoring"})
    eval_batch_size: int = field(default=128, metadata={"help": "prompts generated at once when scoring"})
    cpu: bool = field(default=False, metadata={"help": "run on the CPU even where CUDA is present (default: CUDA when present)"})
    threads: int = field(default=1, metadata={"help": "torch CPU threads (0: torch's default)"})
    out_dir: str = field(default="", metadata={"help": "where llm_quality.{json,md,png} go (llm_quality_full.* for --preset full); empty: the repository's docs/benchmarks/"})
    work_dir: str = field(default="outputs/benchmarks/llm_quality", metadata={"help": "where the trained adapters go (one folder per method, lr and seed); "
                                                                                         "with --worker also the finished units (units/) and each worker's progress report"})
    worker: str = field(default="", metadata={"help": "K/N: run worker K's share (every N-th unit, from the K-th) of the resumable, seed-major "
                                                      "schedule; the same command continues a stopped run; empty: the whole protocol in one pass, not resumable"})
    merge: bool = field(default=False, metadata={"help": "only build the report from the finished units in --work-dir (no model is loaded); "
                                                         "the JSON's 'complete' says whether every unit is done"})

    def validate(self) -> None:
        bad = sorted(set(self.methods) - set(METHODS))
        if bad:
            raise ConfigError(f"unknown method(s) {', '.join(bad)}; known: {', '.join(METHODS)}")
        if self.worker:
            parse_worker(self.worker)
        if (self.worker or self.merge) and set(self.methods) - set(UNIT_METHODS):
            raise ConfigError(f"a resumable run (--worker, --merge) reads adapters back from their files, which it can for "
                              f"{', '.join(UNIT_METHODS)}; drop {', '.join(sorted(set(self.methods) - set(UNIT_METHODS)))} or run without --worker")
        if not 0 <= self.test_limit <= self.test_size:
            raise ConfigError(f"--test-limit must be in 0..--test-size ({self.test_size}), got {self.test_limit}")
        if not self.lrs or min(self.lrs) <= 0:
            raise ConfigError("give one or more positive learning rates (--lrs)")
        if min(self.seeds, self.rank, self.steps, self.batch_size, self.val_size, self.test_size, self.max_new_tokens, self.eval_batch_size) < 1:
            raise ConfigError("seeds, rank, steps, batch_size, val_size, test_size, max_new_tokens and eval_batch_size must be >= 1")

    @property
    def warmup_steps(self) -> int:
        return self.steps // 15  # llm.train's share: 20 of its default 300 steps


PRESETS = {
    # 2 steps of 1 problem, 4 validation and 8 test problems: every method, sweep and seed runs end to end (~13 min here)
    "quick": {"lrs": [3e-4, 1e-3, 3e-3], "steps": 2, "batch_size": 1, "train_size": 64, "val_size": 4, "test_size": 8,
              "select_warmup": 1, "max_new_tokens": 20, "eval_batch_size": 8},
    "full": {},  # the defaults above
    # the comparison on 2 CPU cores, resumable in units (see the module docstring): ≈ 3.5-4 h with two workers
    "cpu": {"methods": ["lora", "sbora-fa", "sbora-fb", "ortho"], "lrs": [1e-3, 3e-3, 1e-2], "steps": 150, "batch_size": 8,
            "train_size": 2000, "val_size": 300, "test_size": 3000, "test_limit": CPU_TEST, "max_new_tokens": 40, "eval_batch_size": 64,
            "cpu": True, "worker": "0/1", "work_dir": "outputs/benchmarks/llm_quality_cpu"},
}


def run_config(config: LLMQualityConfig, method: str, lr: float, seed: int):
    """llm.train's options for one run of `method`."""
    from llm.train import TrainConfig

    return TrainConfig(
        **METHODS[method], adapter={"rank": config.rank, "alpha": float(config.rank), "dropout": 0.0, "seed": seed}, train_seed=seed, steps=config.steps,
        batch_size=config.batch_size, lr=lr, lr_schedule="cosine", warmup_steps=config.warmup_steps, train_size=config.train_size,
        test_size=config.test_size, val_size=config.val_size, select_warmup=config.select_warmup, eval=False, cpu=config.cpu,
        checkpoint_every=0, overwrite=True, output_dir=str(Path(config.work_dir) / method / f"lr{lr:g}-seed{seed}"),
    )


def score_sheet(model, tokenizer, examples, config: LLMQualityConfig, desc: str) -> dict:
    """Accuracy on `examples`, the per-problem answer sheet, per-kind accuracy and the first generations."""
    from llm.data import arithmetic_kind
    from llm.evaluate import score

    scored = score(model, tokenizer, examples, max_new_tokens=config.max_new_tokens, batch_size=config.eval_batch_size, desc=desc)
    kinds = [arithmetic_kind(ex.input) for ex in examples]
    per_kind = {k: statistics.fmean(c for c, kk in zip(scored["per_problem"], kinds) if kk == k) for k in KINDS if k in kinds}
    return {**{k: scored[k] for k in ("accuracy", "correct", "total", "per_problem")}, "per_kind": per_kind, "samples": scored["samples"][:3]}


def update_profile(model, name: str) -> dict[str, dict[str, float]]:
    """Mean ‖ΔW‖_F / ‖W‖_F of adapter `name` per projection (q/k/v/o_proj) and per third of the depth."""
    from sbora.adapters import adapted_layers

    rows = []
    for path, layer in adapted_layers(model, name).items():
        with torch.no_grad():
            ratio = (layer.cores[name].delta_weight().norm() / layer.base_layer.weight.float().norm()).item()
        rows.append((path.rsplit(".", 1)[-1], int(re.search(r"layers\.(\d+)\.", path).group(1)), ratio))
    depth = max(d for _, d, _ in rows) + 1
    third = [("first third", "middle third", "last third")[3 * d // depth] for _, d, _ in rows]
    return {
        "projection": {p: statistics.fmean(r for q, _, r in rows if q == p) for p in dict.fromkeys(q for q, _, _ in rows)},
        "depth": {t: statistics.fmean(r for (_, _, r), tt in zip(rows, third) if tt == t) for t in dict.fromkeys(third)},
    }


def run(config: LLMQualityConfig, res: dict, save: Callable[[], None]) -> None:
    """Fill `res` method by method (sweep, then seeds), calling `save` after each run (a long run keeps what it measured)."""
    from llm.data import carve_validation, load_task
    from llm.models import load_base
    from llm.train import train

    config.validate()
    device = torch.device("cuda" if torch.cuda.is_available() and not config.cpu else "cpu")
    base, tokenizer = load_base()
    base.requires_grad_(False).to(device)
    train_set, test_set = load_task("arithmetic", None, config.train_size, config.test_size)
    train_set, val_set = carve_validation(train_set, config.val_size)  # as llm.train carves it with --val-size
    test_set = test_set[: config.test_limit or None]
    res.update(device=torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU", base_parameters=sum(p.numel() for p in base.parameters()),
               problems={"train": len(train_set), "validation": len(val_set), "test": len(test_set)}, sweep={}, best_lr={}, runs={}, profile={})
    t0 = time.time()
    res["zero_shot"] = {**score_sheet(base, tokenizer, test_set, config, "zero-shot"), "seconds": time.time() - t0}
    save()
    for method in config.methods:
        res["sweep"][method], best = {}, None
        for lr in config.lrs:
            t0, model = time.time(), clone_sharing_weights(base)
            try:
                summary = train(run_config(config, method, lr, seed=0), model=model, tokenizer=tokenizer)
            except TrainingDiverged as e:
                res["sweep"][method][f"{lr:g}"] = {"diverged": str(e), "seconds": time.time() - t0}
                save()
                continue
            val = score_sheet(model, tokenizer, val_set, config, f"validation {method} lr {lr:g}")
            res["sweep"][method][f"{lr:g}"] = {"accuracy": val["accuracy"], "correct": val["correct"], "total": val["total"],
                                               "final_loss": summary["final_loss"], "seconds": time.time() - t0}
            save()
            if best is None or (val["accuracy"], -summary["final_loss"]) > best[0]:
                best = ((val["accuracy"], -summary["final_loss"]), lr, model, summary, time.time() - t0)
        if best is None:
            continue  # every learning rate diverged: the sweep table says so
        _, lr, model, summary, seconds = best
        res["best_lr"][method], res["runs"][method] = lr, []
        for seed in range(config.seeds):
            t0 = time.time()
            if seed:
                model = clone_sharing_weights(base)
                summary = train(run_config(config, method, lr, seed), model=model, tokenizer=tokenizer)
            elif method not in ("peft-dora", "diffora"):  # profiled on seed 0 (DiffoRA: LoRA's profile minus the cut modules)
                res["profile"][method] = update_profile(model, summary["adapter_name"])
            test = score_sheet(model, tokenizer, test_set, config, f"test {method} seed {seed}")
            res["runs"][method].append({"seed": seed, "lr": lr, **test, "final_loss": summary["final_loss"],
                                        "trainable_params": summary["trainable_params"], "seconds": time.time() - t0 + (0 if seed else seconds)})
            save()
        del model, best


# ---------------------------------------------------------------------------- resumable runs in units (--worker, --merge)


def protocol(config: LLMQualityConfig) -> dict:
    """The settings every unit of one resumable run shares (the data, the training, the decoding);
    methods, learning rates, seeds and --test-limit may grow between runs (they only add units)."""
    keys = ("rank", "steps", "batch_size", "train_size", "val_size", "test_size", "select_warmup", "max_new_tokens", "eval_batch_size")
    return {k: getattr(config, k) for k in keys}


def schedule(config: LLMQualityConfig) -> list[tuple]:
    """The units, seed-major: the zero-shot base and every method's sweep (seed 0), then seed 0 of
    every method on test (from the sweep's adapter at its best lr), then seed 1 of every method..."""
    return [("zero-shot",), *(("val", m, lr) for m in config.methods for lr in config.lrs),
            *(("test", m, seed) for seed in range(config.seeds) for m in config.methods)]


def unit_key(unit: tuple) -> str:
    """File name (without .json) of a unit's result in the store."""
    if unit[0] == "zero-shot":
        return "zero-shot"
    if unit[0] == "val":
        return f"val-{unit[1]}-lr{unit[2]:g}"
    return f"test-{unit[1]}-seed{unit[2]}"


def choose_lr(sweep: dict[float, dict]) -> float | None:
    """The best learning rate of a finished sweep: highest validation accuracy, ties to the lower
    final training loss (None when every rate diverged)."""
    fine = {lr: r for lr, r in sweep.items() if "diverged" not in r}
    return max(fine, key=lambda lr: (fine[lr]["accuracy"], -fine[lr]["final_loss"])) if fine else None


class Schedule:
    """What is done, what is ready and what each unit needs, read from the store (another
    worker's finished units included) every time it is asked."""

    def __init__(self, config: LLMQualityConfig):
        self.config = config
        self.store = UnitStore(Path(config.work_dir) / "units", protocol(config))
        self.units = schedule(config)
        self.n_test = config.test_limit or config.test_size

    def sweep(self, method: str) -> dict[float, dict | None]:
        return {lr: self.store.load(unit_key(("val", method, lr))) for lr in self.config.lrs}

    def best(self, method: str) -> tuple[bool, float | None]:
        """(sweep finished, its best learning rate or None when every rate diverged)."""
        sweep = self.sweep(method)
        if any(r is None for r in sweep.values()):
            return False, None
        return True, choose_lr(sweep)

    def ready(self, unit: tuple) -> bool:
        return unit[0] != "test" or self.best(unit[1])[0]

    def test_record(self, unit: tuple) -> dict | None:
        """The stored result of a test unit if it belongs to the method's current best lr."""
        finished, lr = self.best(unit[1])
        record = self.store.load(unit_key(unit)) if finished and lr is not None else None
        return record if record is not None and record["lr"] == lr else None

    def is_done(self, unit: tuple) -> bool:
        if unit[0] == "val":
            return self.store.load(unit_key(unit)) is not None
        if unit[0] == "test":
            finished, lr = self.best(unit[1])
            if not finished:
                return False
            if lr is None:
                return True  # every learning rate diverged: nothing to test (the sweep table says so)
            record = self.test_record(unit)
        else:
            record = self.store.load(unit_key(unit))
        return record is not None and ("diverged" in record or len(record["per_problem"]) >= self.n_test)


def _split(config: LLMQualityConfig):
    from llm.data import carve_validation, load_task

    train_set, test_set = load_task("arithmetic", None, config.train_size, config.test_size)
    train_set, val_set = carve_validation(train_set, config.val_size)
    return train_set, val_set, test_set


class Worker:
    """Runs units on one loaded base (`do`), writing each unit's result to the store when it ends."""

    def __init__(self, config: LLMQualityConfig, sched: Schedule, base, tokenizer, device: str):
        self.config, self.sched, self.base, self.tokenizer, self.device = config, sched, base, tokenizer, device
        self.train_set, self.val_set, self.test_set = _split(config)
        self.base_parameters = sum(p.numel() for p in base.parameters())

    def trained(self, method: str, lr: float, seed: int) -> tuple[torch.nn.Module, dict]:
        """A copy of the base with the adapter of (method, lr, seed): read from its folder when a
        finished training is there, else trained (which may raise TrainingDiverged)."""
        from llm.train import train
        from sbora.adapters import load_adapter
        from sbora.fileio import write_json

        cfg = run_config(self.config, method, lr, seed)
        folder, model = Path(cfg.output_dir), clone_sharing_weights(self.base)
        if (folder / TRAIN_RECORD).is_file() and (folder / "adapter.safetensors").is_file():
            record = json.loads((folder / TRAIN_RECORD).read_text())
            load_adapter(model, folder / "adapter.safetensors", name=record["adapter_name"])
            return model, {**record, "loaded": True}  # its training time counts once, in the unit that trained it
        t0, c0 = time.time(), time.process_time()
        summary = train(cfg, model=model, tokenizer=self.tokenizer)
        record = {"adapter_name": summary["adapter_name"], "final_loss": summary["final_loss"], "trainable_params": summary["trainable_params"],
                  "steps": summary["steps"], "train_seconds": time.time() - t0, "train_cpu_seconds": time.process_time() - c0}
        write_json(folder / TRAIN_RECORD, record)
        return model, record

    def score(self, model, examples, desc: str) -> tuple[dict, float]:
        from llm.evaluate import score

        t0 = time.time()
        scored = score(model, self.tokenizer, examples, max_new_tokens=self.config.max_new_tokens, batch_size=self.config.eval_batch_size, desc=desc)
        return scored, time.time() - t0

    def do(self, unit: tuple) -> None:
        t0, c0 = time.time(), time.process_time()
        stamp = {"worker": self.config.worker, "started": t0, "device": self.device, "base_parameters": self.base_parameters}
        key = unit_key(unit)
        print(f"worker {self.config.worker}: unit {key}", flush=True)
        if unit[0] == "val":
            _, method, lr = unit
            try:
                model, record = self.trained(method, lr, 0)
            except TrainingDiverged as e:
                self.sched.store.save(key, {**stamp, "method": method, "lr": lr, "seed": 0, "diverged": str(e), "seconds": time.time() - t0,
                                            "finished": time.time()})
                return
            profile = update_profile(model, record["adapter_name"])
            scored, secs = self.score(model, self.val_set, f"validation {method} lr {lr:g}")
            result = {**stamp, **record, "method": method, "lr": lr, "seed": 0, "profile": profile, "per_problem": scored["per_problem"],
                      "accuracy": scored["accuracy"], "correct": scored["correct"], "total": scored["total"], "samples": scored["samples"][:3],
                      "score_seconds": secs, "answers": len(self.val_set)}
        else:  # zero-shot or test: score the test problems not scored yet (all of them the first time)
            if unit[0] == "zero-shot":
                method, lr, seed, prev = "zero-shot", None, None, self.sched.store.load(key)
            else:
                _, method, seed = unit
                lr, prev = self.sched.best(method)[1], self.sched.test_record(unit)
            have = len(prev["per_problem"]) if prev else 0
            try:
                model, record = (self.base, {}) if lr is None else self.trained(method, lr, seed)
                if prev and record:  # adding test problems: the unit's training is the one it first ran (or read back)
                    record["loaded"] = prev.get("loaded", False)
            except TrainingDiverged as e:
                self.sched.store.save(key, {**stamp, "method": method, "lr": lr, "seed": seed, "diverged": str(e), "seconds": time.time() - t0,
                                            "finished": time.time()})
                return
            scored, secs = self.score(model, self.test_set[have : self.sched.n_test], f"test {key}")
            prev = prev or {"per_problem": [], "samples": [], "score_seconds": 0.0, "answers": 0, "seconds": 0.0, "cpu_seconds": 0.0}
            result = {**stamp, **record, "method": method, "lr": lr, "seed": seed, "per_problem": prev["per_problem"] + scored["per_problem"],
                      "samples": prev["samples"] or scored["samples"][:3], "score_seconds": prev["score_seconds"] + secs,
                      "answers": prev["answers"] + len(scored["per_problem"]), "started": prev.get("started", t0)}
            result["seconds_before"], result["cpu_seconds_before"] = prev["seconds"], prev["cpu_seconds"]
        result.update(seconds=time.time() - t0 + result.pop("seconds_before", 0.0),
                      cpu_seconds=time.process_time() - c0 + result.pop("cpu_seconds_before", 0.0), finished=time.time())
        self.sched.store.save(key, result)
        del model
        gc.collect()


def sheet_summary(record: dict, n: int, kinds: list[str]) -> dict:
    """A stored answer sheet cut to the first `n` problems (the ones every sheet has): accuracy, per kind."""
    sheet = record["per_problem"][:n]
    per_kind = {k: statistics.fmean(c for c, kk in zip(sheet, kinds) if kk == k) for k in KINDS if k in kinds[:n]}
    return {"accuracy": statistics.fmean(sheet) if sheet else math.nan, "correct": sum(sheet), "total": len(sheet), "per_problem": sheet,
            "per_kind": per_kind, "samples": record["samples"]}


def collect(config: LLMQualityConfig) -> dict:
    """The results in the shape ``run`` fills, built from the finished units of the store (no model
    needed), plus ``units`` (done / total), ``pending`` (what is left) and ``timing``."""
    from llm.data import arithmetic_kind

    sched = Schedule(config)
    train_set, val_set, test_set = _split(config)
    records = {u: sched.store.load(unit_key(u)) if u[0] != "test" else sched.test_record(u) for u in sched.units}
    found = [r for r in records.values() if r is not None]
    sheets = [r for u, r in records.items() if r is not None and u[0] != "val" and "diverged" not in r]
    n = min([sched.n_test, *(len(r["per_problem"]) for r in sheets)])  # pairing needs the same problems in every sheet
    kinds = [arithmetic_kind(ex.input) for ex in test_set[:n]]
    res: dict = {"device": next((r["device"] for r in found), "?"), "base_parameters": next((r["base_parameters"] for r in found), 0),
                 "problems": {"train": len(train_set), "validation": len(val_set), "test": n}, "sweep": {}, "best_lr": {}, "runs": {}, "profile": {}}
    if records[("zero-shot",)] is not None:
        res["zero_shot"] = {**sheet_summary(records[("zero-shot",)], n, kinds), "seconds": records[("zero-shot",)]["seconds"]}
    for method in config.methods:
        sweep = sched.sweep(method)
        res["sweep"][method] = {f"{lr:g}": ({"diverged": r["diverged"], "seconds": r["seconds"]} if "diverged" in r else
                                            {k: r[k] for k in ("accuracy", "correct", "total", "final_loss", "seconds")})
                                for lr, r in sweep.items() if r is not None}
        finished, lr = sched.best(method)
        if not finished or lr is None:
            continue
        res["best_lr"][method], res["profile"][method] = lr, sweep[lr]["profile"]
        runs = [records[("test", method, seed)] for seed in range(config.seeds)]
        runs = [r for r in runs if r is not None and "diverged" not in r]
        if runs:
            res["runs"][method] = [{"seed": r["seed"], "lr": r["lr"], **sheet_summary(r, n, kinds), "final_loss": r["final_loss"],
                                    "trainable_params": r["trainable_params"], "seconds": r["seconds"]} for r in runs]
    pending = [unit_key(u) for u in sched.units if not sched.is_done(u)]
    res.update(units={"done": len(sched.units) - len(pending), "total": len(sched.units)}, pending=pending, timing=unit_timing(found))
    return res


def unit_timing(records: list[dict]) -> dict:
    """Measured costs of the finished units: seconds per training step and per greedy answer,
    the workers' total time and the wall time from the first unit's start to the last one's end."""
    steps = [r["train_seconds"] / r["steps"] for r in records if r.get("steps") and not r.get("loaded")]
    answers = sum(r.get("answers", 0) for r in records)
    if not records:
        return {}
    return {"step_seconds_median": statistics.median(steps) if steps else math.nan,
            "answer_seconds": sum(r.get("score_seconds", 0.0) for r in records) / answers if answers else math.nan,
            "worker_seconds": sum(r["seconds"] for r in records), "worker_cpu_seconds": sum(r.get("cpu_seconds", 0.0) for r in records),
            "wall_seconds": max(r["finished"] for r in records) - min(r["started"] for r in records),
            "workers": sorted({r["worker"] for r in records}), "training_runs": len(steps), "answers": answers}


def measure(config: LLMQualityConfig, res: dict, save: Callable[[], None]) -> None:
    if config.worker or config.merge:
        run_resumable(config, res, save, collect, Schedule, llm_start(lambda config, sched, base, tokenizer, device, k: Worker(config, sched, base, tokenizer, device)))
    else:
        run(config, res, save)


# ---------------------------------------------------------------------------- reading the results


def summary_rows(res: dict) -> dict[str, dict]:
    """Per method: trainable parameters, mean ± interval over seeds (overall and per kind), Δ vs LoRA pooled over seeds."""
    rows = {}
    lora = {r["seed"]: r for r in res["runs"].get("lora", [])}
    for method, runs in res["runs"].items():
        row = {"trainable_params": runs[0]["trainable_params"], "lr": runs[0]["lr"], "seeds": len(runs),
               "accuracy": seed_interval([r["accuracy"] for r in runs]),
               "per_kind": {k: statistics.fmean(r["per_kind"][k] for r in runs) for k in runs[0]["per_kind"]},
               "per_seed": [r["accuracy"] for r in runs], "final_loss": statistics.fmean(r["final_loss"] for r in runs)}
        paired = [r for r in runs if r["seed"] in lora]  # seed k against LoRA's seed k (a stopped run may lack some)
        if method != "lora" and paired:
            sheets, lora_sheets = [r["per_problem"] for r in paired], [lora[r["seed"]]["per_problem"] for r in paired]
            row["vs_lora"] = paired_difference(sheets, lora_sheets)
            row["vs_lora_per_seed"] = [paired_difference([a], [b])[0] for a, b in zip(sheets, lora_sheets)]
            row["discordance"] = discordance(sheets, lora_sheets)
            row["paired_seeds"] = len(paired)
        rows[method] = row
    return rows


def targets_check(res: dict) -> list[tuple[str, bool, str]]:
    rows = summary_rows(res)
    if "lora" not in rows or "vs_lora" not in rows.get("sbora-fa", {}):
        return []
    lora, fa = rows["lora"], rows["sbora-fa"]
    gap, half = fa["vs_lora"]
    share = fa["trainable_params"] / lora["trainable_params"]
    return [
        ("SBoRA-FA within 1 point of LoRA, each at its best learning rate", gap >= -1.0,
         f"{100 * fa['accuracy'][0]:.1f}% (lr {fa['lr']:g}) vs {100 * lora['accuracy'][0]:.1f}% (lr {lora['lr']:g}): {gap:+.1f} ± {half:.1f} points "
         f"(95%, paired, pooled over {fa['paired_seeds']} seeds); {verdict(gap, half)}"),
        ("SBoRA-FA trainable parameters ≤ 55% of LoRA's", share <= 0.55, f"{fa['trainable_params']:,} vs {lora['trainable_params']:,}: {share:.0%}"),
    ]


def verdict(gap: float, half: float, points: float = 1.0) -> str:
    """What a paired difference (points, 95% half-width) says about 'within `points` of LoRA'."""
    lo, hi = gap - half, gap + half
    if lo > 0:
        return f"above LoRA, not merely within {points:g} point of it: the whole interval [{lo:+.1f}, {hi:+.1f}] lies above 0"
    if lo >= -points:
        return f"within {points:g} point of LoRA: the whole interval [{lo:+.1f}, {hi:+.1f}] lies above −{points:g}"
    if hi < -points:
        return f"more than {points:g} point below LoRA: the whole interval [{lo:+.1f}, {hi:+.1f}] lies below −{points:g}"
    return f"not resolved: the interval [{lo:+.1f}, {hi:+.1f}] contains −{points:g}"


def meaning_lines(res: dict) -> list[str]:
    """The comparison in a user's terms: each method against LoRA at their own best learning rates."""
    rows = summary_rows(res)
    if "lora" not in rows:
        return []
    lora = rows["lora"]
    lines = ["## What it means", ""]
    for m, row in rows.items():
        if "vs_lora" not in row:
            continue
        gap, half = row["vs_lora"]
        lines.append(f"- **{LABELS[m]}** ({row['trainable_params'] / lora['trainable_params']:.0%} of LoRA's trainable parameters, lr {row['lr']:g} "
                     f"vs LoRA's {lora['lr']:g}): {gap:+.1f} ± {half:.1f} points over {row['paired_seeds']} paired seed(s), {verdict(gap, half)}.")
    return [*lines, ""]


def _pm(mean: float, half: float, scale: float = 100) -> str:
    return f"{scale * mean:.1f}" + ("" if half != half else f" ± {scale * half:.1f}")  # half is nan for one seed


def _kinds(per_kind: dict[str, float]) -> str:
    return " | ".join(f"{100 * per_kind[k]:.1f}" if k in per_kind else "—" for k in KINDS)  # a small test set may lack a kind


def resolution_lines(res: dict, cfg: dict) -> list[str]:
    """How many test problems a 1-point difference needs, and what this run resolves."""
    rows = summary_rows(res)
    fa = rows.get("sbora-fa", {})
    q = fa.get("discordance")
    n = res["problems"]["test"]
    plan = (f"At the discordance of the first full run ({PLANNING_DISCORDANCE:.0%} of problems answered differently by SBoRA-FA and "
            f"LoRA), one seed needs {problems_needed(PLANNING_DISCORDANCE):,} test problems for a 95% interval of ±1 point and "
            f"{problems_needed(PLANNING_DISCORDANCE, power=0.8):,} to detect a true 1-point difference 4 times in 5 "
            f"(`benchmarks.accuracy.problems_needed`); the full preset scores {LLMQualityConfig().test_size:,} per seed, pooled over "
            f"{LLMQualityConfig().seeds} seeds. The cpu preset is sized for ±{CPU_POINTS:g} points: "
            f"{problems_needed(PLANNING_DISCORDANCE, CPU_POINTS):,} problems from one seed, so it scores {CPU_TEST:,} per seed, pooled over 3 seeds.")
    lines = ["## Resolution", "", plan, ""]
    if q:  # without a disagreement there is nothing to size the test set from
        half = fa["vs_lora"][1]
        target = CPU_POINTS if cfg["preset"] == "cpu" else 1.0
        lines.append(f"This run: {n:,} test problems × {fa['paired_seeds']} paired seed(s); SBoRA-FA and LoRA disagree on {100 * q:.1f}% of answers, "
                     f"which asks for {problems_needed(q):,} problems (±1 point), {problems_needed(q, 2.0):,} (±2 points) or "
                     f"{problems_needed(q, power=0.8):,} (80% power for 1 point) per seed; the FA − LoRA interval here is ±{half:.1f} points "
                     f"(one problem = {100 / n:.1f} points)" + (f": within the ±{target:g} this run is sized for." if half <= target else
                     f", wider than the ±{target:g} this run is sized for: raise --test-limit (a resumable run scores only the added "
                     "problems, from the saved adapters)."))
    return lines


def run_time(payload: dict) -> str:
    """The run's time: the process's own, or for a resumable run its units' (first start to last end, and summed over workers)."""
    res, env = payload["results"], payload["environment"]
    t = res.get("timing")
    if not t:
        return (f"Run time {payload['seconds'] / 60:.1f} min ({payload['cpu_seconds'] / 60:.1f} min CPU), load average "
                f"{env['load_average'][0]:.1f} at the start, {env['load_average_end'][0]:.1f} at the end")
    return (f"Units done: {res['units']['done']} of {res['units']['total']}, by worker(s) {', '.join(t['workers'])}: "
            f"{t['wall_seconds'] / 3600:.2f} h from the first unit's start to the last one's end, {t['worker_seconds'] / 3600:.2f} h of worker time "
            f"({t['worker_cpu_seconds'] / 3600:.2f} h CPU); measured costs: a training step {t['step_seconds_median']:.2f} s (median over "
            f"{t['training_runs']} runs), a greedy answer {t['answer_seconds']:.2f} s ({t['answers']:,} answers)")


def markdown(payload: dict) -> str:
    res, cfg, env = payload["results"], payload["config"], payload["environment"]
    quick = cfg["preset"] == "quick"
    probs = res.get("problems", {"train": 0, "validation": 0, "test": 0})
    lines = [
        "# LLM quality: SmolLM2-135M-Instruct on the arithmetic task, each method at its best learning rate",
        "",
        f"Command: `{payload['command']}` — {env['date']}, {res.get('device', '?')}, {env['torch_threads']} torch thread(s). "
        f"Rank {cfg['rank']} (s = 1) on q/k/v/o_proj, {cfg['steps']} steps of {cfg['batch_size']} problems (warm-up, cosine); "
        f"{probs['train']:,} training, {probs['validation']:,} validation (carved from training) and {probs['test']:,} test problems; "
        f"sweep over lr {', '.join(f'{x:g}' for x in cfg['lrs'])} on validation, then {cfg['seeds']} seeds at the best on test "
        f"(greedy, final number exact match, ≤ {cfg['max_new_tokens']} new tokens). " + run_time(payload)
        + ("." if payload.get("complete") else "; **partial: the run was still going or stopped early**."),
        "",
    ]
    if cfg["preset"] == "cpu":
        lines += [f"**The comparison sized for 2 CPU cores** (`--preset cpu`; `--preset full` on a CUDA GPU remains the reference: "
                  f"{FULL_RUNTIME}). Each method has its own best learning rate from a sweep at the full step count on validation "
                  "problems (so no short-run proxy whose ranking would need checking; seed 0 at the best rate is the sweep's own run), "
                  f"then {cfg['seeds']} seeds at that rate on test. Resumable units, two workers side by side at one thread each "
                  "(`--worker 0/2`, `--worker 1/2`), tables built by `--merge`.", ""]
    if quick:
        lines += [f"**Pipeline check, not a comparison.** {cfg['steps']} steps and {probs['test']} test problems (one problem = "
                  f"{100 / max(probs['test'], 1):.1f} points) exercise every method, the sweep, the seeds and the statistics end to end; "
                  "the adapters barely move from the base in so few steps, so no difference below here means anything. "
                  f"The comparison is `python -m benchmarks.llm_quality --preset full` on a CUDA GPU: {FULL_RUNTIME}.", ""]
    rows = summary_rows(res)
    zs = res.get("zero_shot")
    lines += [
        f"| method | # params | % of base | best lr | {' | '.join(KINDS)} | accuracy (%, mean ± 95% over seeds) | Δ vs LoRA (points, paired 95%, pooled over seeds) |",
        "|---|---:|---:|---:|" + "---:|" * len(KINDS) + "---:|---:|",
    ]
    if zs:
        lines.append(f"| {LABELS['zero-shot']} | 0 | 0.000 | — | {_kinds(zs['per_kind'])} | {100 * zs['accuracy']:.1f} | — |")
    for m, row in rows.items():
        delta = "—" if "vs_lora" not in row else f"{row['vs_lora'][0]:+.1f} ± {row['vs_lora'][1]:.1f}"
        lines.append(f"| {LABELS[m]} | {row['trainable_params']:,} | {100 * row['trainable_params'] / res['base_parameters']:.3f} | {row['lr']:g} | "
                     f"{_kinds(row['per_kind'])} | {_pm(*row['accuracy'])} | {delta} |")
    lines += ["", "Per-kind columns: means over seeds. DiffoRA's parameters are those it keeps after the cut; Delta-LoRA also moves the "
              "frozen weights (no optimizer state). Δ vs LoRA: per problem, each method's answers averaged over its seeds (seed k vs "
              "LoRA's seed k), then a 95% interval over problems (`benchmarks/accuracy.py`).", ""]
    if rows:
        lines += ["| method | accuracy per seed (%) | Δ vs LoRA per seed (points) | answers differing from LoRA | final train loss (mean) |", "|---|---|---|---:|---:|"]
        for m, row in rows.items():
            per_seed = " / ".join(f"{100 * a:.1f}" for a in row["per_seed"])
            deltas = " / ".join(f"{d:+.1f}" for d in row.get("vs_lora_per_seed", [])) or "—"
            disc = f"{100 * row['discordance']:.1f}%" if "discordance" in row else "—"
            lines.append(f"| {LABELS[m]} | {per_seed} | {deltas} | {disc} | {row['final_loss']:.3f} |")
        lines.append("")
    if res.get("sweep"):
        lrs = [f"{x:g}" for x in cfg["lrs"]]
        lines += ["## Learning-rate sweep (validation accuracy, %, seed 0)", "", "| method | " + " | ".join(f"lr {x}" for x in lrs) + " |",
                  "|---|" + "---:|" * len(lrs)]
        for m, sweep in res["sweep"].items():
            cells = []
            for x in lrs:
                r = sweep.get(x)
                cell = "—" if r is None else "diverged" if "diverged" in r else f"{100 * r['accuracy']:.1f} (loss {r['final_loss']:.3f})"
                cells.append(f"**{cell}**" if res["best_lr"].get(m) is not None and f"{res['best_lr'][m]:g}" == x else cell)
            lines.append(f"| {LABELS[m]} | " + " | ".join(cells) + " |")
        edge = [LABELS[m] for m, lr in res["best_lr"].items() if len(cfg["lrs"]) > 1 and lr in (min(cfg["lrs"]), max(cfg["lrs"]))]
        lines += ["", "Best learning rate at the edge of the grid (the optimum may lie beyond it): " + (", ".join(edge) if edge else "none") + ".", ""]
    if res.get("profile"):
        lines += ["## Where the updates go (‖ΔW‖ / ‖W‖, mean over layers, seed 0 at the best lr)", ""]
        first = next(iter(res["profile"].values()))
        cols = [*first["projection"], *first["depth"]]
        lines += ["| method | " + " | ".join(cols) + " |", "|---|" + "---:|" * len(cols)]
        for m, prof in res["profile"].items():
            values = {**prof["projection"], **prof["depth"]}
            lines.append(f"| {LABELS[m]} | " + " | ".join(f"{values[c]:.4f}" for c in cols) + " |")
        lines.append("")
    if res.get("problems"):
        lines += resolution_lines(res, cfg) + [""]
    lines += meaning_lines(res)
    lines += ["## Targets", ""]
    checks = targets_check(res)
    lines += [f"- {'met' if ok else '**missed**'}: {what} — {got}" for what, ok, got in checks] or ["- not yet measured (LoRA or SBoRA-FA missing)"]
    if quick and checks:
        lines.append("- (quick preset: these lines only show that the check runs)")
    return "\n".join(lines) + "\n"


def figure(payload: dict):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    res, cfg = payload["results"], payload["config"]
    rows = summary_rows(res) if res.get("runs") else {}
    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(12, 3.8), gridspec_kw={"width_ratios": [3, 2]})
    names = list(rows)
    means = [100 * rows[m]["accuracy"][0] for m in names]
    errs = [0 if rows[m]["accuracy"][1] != rows[m]["accuracy"][1] else 100 * rows[m]["accuracy"][1] for m in names]
    bars = ax.bar([LABELS[m] for m in names], means, yerr=errs, capsize=3, color="C0")
    for bar, m in zip(bars, names, strict=True):
        ax.annotate(f"{rows[m]['trainable_params'] / 1e6:.2f}M", (bar.get_x() + bar.get_width() / 2, 0), ha="center", va="bottom", fontsize=7, color="white")
    if res.get("zero_shot"):
        ax.axhline(100 * res["zero_shot"]["accuracy"], color="grey", ls="--", lw=1, label="zero-shot")
        ax.legend(fontsize=8)
    ax.set_ylabel("test accuracy (%)")
    ax.set_title(f"best lr per method, {cfg['seeds']} seeds (95% over seeds); {res.get('problems', {}).get('test', 0)} test problems", fontsize=9)
    ax.tick_params(axis="x", labelsize=7, rotation=20)
    for m, sweep in res.get("sweep", {}).items():
        pts = [(float(x), 100 * r["accuracy"]) for x, r in sweep.items() if "accuracy" in r]
        if pts:
            ax2.plot(*zip(*pts), marker="o", label=LABELS[m])
    ax2.set_xscale("log")
    ax2.set_xlabel("learning rate")
    ax2.set_ylabel("validation accuracy (%)")
    ax2.set_title("sweep (seed 0)", fontsize=9)
    if ax2.lines:
        ax2.legend(fontsize=6)
    fig.tight_layout()
    return fig


def main(argv: list[str] | None = None) -> dict:
    return run_benchmark("llm_quality", __doc__, LLMQualityConfig, PRESETS, argv, measure, markdown, figure, targets_check)


if __name__ == "__main__":
    main()
