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

Results: ``docs/benchmarks/llm_quality.{json,md,png}`` (``llm_quality_full.*`` with ``--preset full``).

    python -m benchmarks.llm_quality --preset quick      # pipeline check: ~13 min on 2 shared CPU cores
    python -m benchmarks.llm_quality --preset full       # the comparison: on a CUDA GPU (device auto), see FULL_RUNTIME
"""

from __future__ import annotations

import re
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from sbora_diffusion.configuration import ConfigError
from sbora_diffusion.engine import TrainingDiverged

from .accuracy import discordance, paired_difference, problems_needed, seed_interval
from .common import clone_sharing_weights, run_benchmark

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
    test_size: int = field(default=3000, metadata={"help": "arithmetic test problems of the fixed split"})
    select_warmup: float = field(default=0.2, metadata={"help": "DiffoRA's cut: whole steps or a fraction of the run"})
    max_new_tokens: int = field(default=64, metadata={"help": "greedy decoding length limit when scoring"})
    eval_batch_size: int = field(default=128, metadata={"help": "prompts generated at once when scoring"})
    cpu: bool = field(default=False, metadata={"help": "run on the CPU even where CUDA is present (default: CUDA when present)"})
    threads: int = field(default=1, metadata={"help": "torch CPU threads (0: torch's default)"})
    out_dir: str = field(default="", metadata={"help": "where llm_quality.{json,md,png} go (llm_quality_full.* for --preset full); empty: the repository's docs/benchmarks/"})
    work_dir: str = field(default="outputs/benchmarks/llm_quality", metadata={"help": "where the trained adapters go (one folder per method, lr and seed)"})

    def validate(self) -> None:
        bad = sorted(set(self.methods) - set(METHODS))
        if bad:
            raise ConfigError(f"unknown method(s) {', '.join(bad)}; known: {', '.join(METHODS)}")
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
}


def run_config(config: LLMQualityConfig, method: str, lr: float, seed: int):
    """llm.train's options for one run of `method`."""
    from llm.train import TrainConfig

    return TrainConfig(
        **METHODS[method], rank=config.rank, alpha=float(config.rank), dropout=0.0, seed=seed, train_seed=seed, steps=config.steps,
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
    from sbora_diffusion.adapters import adapted_layers

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


# ---------------------------------------------------------------------------- reading the results


def summary_rows(res: dict) -> dict[str, dict]:
    """Per method: trainable parameters, mean ± interval over seeds (overall and per kind), Δ vs LoRA pooled over seeds."""
    rows = {}
    lora = res["runs"].get("lora")
    for method, runs in res["runs"].items():
        sheets = [r["per_problem"] for r in runs]
        row = {"trainable_params": runs[0]["trainable_params"], "lr": runs[0]["lr"], "seeds": len(runs),
               "accuracy": seed_interval([r["accuracy"] for r in runs]),
               "per_kind": {k: statistics.fmean(r["per_kind"][k] for r in runs) for k in runs[0]["per_kind"]},
               "per_seed": [r["accuracy"] for r in runs], "final_loss": statistics.fmean(r["final_loss"] for r in runs)}
        if lora and method != "lora" and len(lora) == len(runs):
            lora_sheets = [r["per_problem"] for r in lora]
            row["vs_lora"] = paired_difference(sheets, lora_sheets)
            row["vs_lora_per_seed"] = [paired_difference([a], [b])[0] for a, b in zip(sheets, lora_sheets)]
            row["discordance"] = discordance(sheets, lora_sheets)
        rows[method] = row
    return rows


def targets_check(res: dict) -> list[tuple[str, bool, str]]:
    rows = summary_rows(res)
    if "lora" not in rows or "vs_lora" not in rows.get("sbora-fa", {}):
        return []
    lora, fa = rows["lora"], rows["sbora-fa"]
    gap, half = fa["vs_lora"]
    share = fa["trainable_params"] / lora["trainable_params"]
    resolved = "the interval lies above −1" if gap - half >= -1 else "the interval reaches below −1: not resolved at this size"
    return [
        ("SBoRA-FA within 1 point of LoRA, each at its best learning rate", gap >= -1.0,
         f"{100 * fa['accuracy'][0]:.1f}% (lr {fa['lr']:g}) vs {100 * lora['accuracy'][0]:.1f}% (lr {lora['lr']:g}): {gap:+.1f} ± {half:.1f} points "
         f"(95%, paired, pooled over {fa['seeds']} seeds); {resolved}"),
        ("SBoRA-FA trainable parameters ≤ 55% of LoRA's", share <= 0.55, f"{fa['trainable_params']:,} vs {lora['trainable_params']:,}: {share:.0%}"),
    ]


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
            f"{LLMQualityConfig().seeds} seeds.")
    lines = ["## Resolution", "", plan, ""]
    if q:  # without a disagreement there is nothing to size the test set from
        half = fa["vs_lora"][1]
        lines.append(f"This run: {n:,} test problems × {fa['seeds']} seed(s); SBoRA-FA and LoRA disagree on {100 * q:.1f}% of answers, "
                     f"which asks for {problems_needed(q):,} problems (±1 point) or {problems_needed(q, power=0.8):,} (80% power) per seed; "
                     f"the FA − LoRA interval here is ±{half:.1f} points (one problem = {100 / n:.1f} points).")
    return lines


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
        f"(greedy, final number exact match, ≤ {cfg['max_new_tokens']} new tokens). Run time {payload['seconds'] / 60:.1f} min "
        f"({payload['cpu_seconds'] / 60:.1f} min CPU), load average {env['load_average'][0]:.1f} at the start, "
        f"{env['load_average_end'][0]:.1f} at the end" + ("." if payload.get("complete") else "; **partial: the run was still going or stopped early**."),
        "",
    ]
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
    ax2.legend(fontsize=6)
    fig.tight_layout()
    return fig


def main(argv: list[str] | None = None) -> None:
    run_benchmark("llm_quality", __doc__, LLMQualityConfig, PRESETS, argv, run, markdown, figure, targets_check)


if __name__ == "__main__":
    main()
