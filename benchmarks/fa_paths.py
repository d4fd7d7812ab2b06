"""SBoRA-FA's training paths side by side, on the adapted layers alone (an ablation of the fused op).

``AdaptedLinear`` trains an SBoRA-FA adapter through ``sbora.BaseWithColumnBranch``, which
adds the branch in place (``addmm_`` into the base output, ``index_add_`` into the base's input
gradient) or, on layers with many tokens per input feature (``sbora.merges_weight``), merges
s·B into a copy of W.
This script times, interleaved in the same rounds on the same captured layer inputs:

- ``peft LoRA`` (the reference) and the ``floor`` of ``train_cost`` (a trainable zero bias);
- ``bare``: the base layers alone, no trainable parameter (input gradients only): the true
  "base forward + backward", against which the bias floor itself is an overhead;
- ``FA unfused``: the plain autograd path (``index_select`` + ``linear`` + in-place add);
- ``FA in place``: the fused op, never merging;
- ``FA shipped``: the fused op as shipped (merging where ``merges_weight`` says so).

Reported per variant: median CPU time of the layers' forward + backward + AdamW step, its
ratio to peft LoRA's, and the overhead (t − t_f) / (t_peft − t_f) over the floor and over the
bare base, per round, medians. Results: ``docs/benchmarks/fa_paths.{json,md,png}``
(``fa_paths_full.*`` with ``--preset full``).

    python -m benchmarks.fa_paths --preset quick
"""

from __future__ import annotations

import statistics
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch

from sbora.adapters import adapted_layers, sbora
from sbora.adapters.registry import label
from sbora.configuration import ConfigError

from .common import (
    FLOOR,
    REFERENCE,
    BiasFloor,
    Variant,
    add_method,
    capture_layer_inputs,
    clone_sharing_weights,
    interleaved_times,
    layer_step,
    random_cotangents,
    run_benchmark,
)
from .train_cost import BUILDERS, TrainCostConfig

# variant name -> (method put on the base, label)
VARIANTS = {
    REFERENCE: (REFERENCE, label(REFERENCE)),
    "fa-unfused": ("sbora-fa", "FA unfused (autograd)"),
    "fa-in-place": ("sbora-fa", "FA fused, in place"),
    "fa-shipped": ("sbora-fa", "FA fused, shipped (merges where cheaper)"),
    FLOOR: (FLOOR, "floor (bias only)"),
    "bare": (FLOOR, "bare base layers"),
}


@dataclass
class FAPathsConfig:
    base: str = field(default="sd15-unet", metadata={"help": "base: " + ", ".join(BUILDERS)})
    ranks: list[int] = field(default_factory=lambda: [16, 64], metadata={"help": "adapter ranks"})
    layer_repeats: int = field(default=21, metadata={"help": "timed rounds (one layers-alone step per variant per round); medians"})
    threads: int = field(default=1, metadata={"help": "torch CPU threads (0: torch's default)"})
    seed: int = field(default=0, metadata={"help": "seed of the random base weights, inputs and adapter inits"})
    out_dir: str = field(default="", metadata={"help": "where fa_paths.{json,md,png} go (fa_paths_full.* for --preset full); empty: the repository's docs/benchmarks/"})

    def validate(self) -> None:
        if self.base not in BUILDERS:
            raise ConfigError(f"unknown base {self.base}; known: {', '.join(BUILDERS)}")
        if self.layer_repeats < 1 or any(r < 1 for r in self.ranks):
            raise ConfigError("layer_repeats and every rank must be >= 1")


PRESETS = {"quick": {"ranks": [16], "layer_repeats": 11}, "full": {"ranks": [4, 16, 64], "layer_repeats": 31}}


@contextmanager
def merge_ratio(value: float):
    """Set sbora.MERGE_RATIO for the block (inf: never merge)."""
    saved, sbora.MERGE_RATIO = sbora.MERGE_RATIO, value
    try:
        yield
    finally:
        sbora.MERGE_RATIO = saved


def build_variant(name: str, base: torch.nn.Module, rank: int, targets: list[str], seed: int) -> Variant:
    model = clone_sharing_weights(base)
    params = add_method(model, VARIANTS[name][0], rank, targets, seed=seed)
    if name == "fa-unfused":
        for layer in adapted_layers(model).values():
            for core in layer.cores.values():
                core.fuses_base = False  # this instance only: AdaptedLinear takes the plain path
    if name == "bare":
        for module in model.modules():
            if isinstance(module, BiasFloor):
                module.forward = module.base_layer.forward  # the bias gets no gradient; AdamW skips it
    return Variant(name, model, params, torch.optim.AdamW(params, lr=1e-4))


def measure_rank(base, loss_fn, targets: list[str], rank: int, config: FAPathsConfig) -> dict:
    variants = [build_variant(name, base, rank, targets, config.seed) for name in VARIANTS]
    inputs = capture_layer_inputs(variants[0], loss_fn)
    grads = random_cotangents(variants[0].model, inputs, config.seed)

    def step(v: Variant) -> None:
        with merge_ratio(float("inf") if v.name == "fa-in-place" else sbora.MERGE_RATIO):
            layer_step(v, inputs, grads)

    interleaved_times(variants, step, 2, f"r={rank} warm-up")
    for v in variants:
        v.layer_cpu.clear()
    interleaved_times(variants, step, config.layer_repeats, f"r={rank} layers")
    t = {v.name: v.layer_cpu for v in variants}

    def overhead(name: str, under: str) -> float:
        return statistics.median((a - f) / (p - f) for a, f, p in zip(t[name], t[under], t[REFERENCE], strict=True))

    merged = sum(sbora.merges_weight(x, rank, variants[0].model.get_submodule(p).base_layer.weight) for p, x in inputs.items())
    rows = {
        name: {"layer_cpu_seconds_median": statistics.median(t[name]),
               "layer_ratio_median": statistics.median(a / p for a, p in zip(t[name], t[REFERENCE], strict=True)),
               "overhead_vs_peft_over_floor": overhead(name, FLOOR), "overhead_vs_peft_over_bare": overhead(name, "bare"),
               "layer_cpu_seconds": t[name]}
        for name in VARIANTS
    }
    return {"layers": len(inputs), "merged_layers": merged, "variants": rows}


def markdown(payload: dict) -> str:
    env, res = payload["environment"], payload["results"]
    lines = [
        "# SBoRA-FA training paths on the adapted layers alone",
        "",
        f"Command: `{payload['command']}` — {env['date']}, {env['torch_threads']} torch thread(s), load average "
        f"{env['load_average'][0]:.1f} at the start, {env['load_average_end'][0]:.1f} at the end; torch {env['torch']}, "
        f"peft {env['peft']}. Base {res['base']} ({res['layers']} adapted layers), merge rule tokens·(r + {res['pass_ranks']}) ≥ {res['merge_ratio']}·d_in. "
        f"Run time {payload['seconds'] / 60:.1f} min.",
        "",
        "Forward + backward (input gradients included) of every adapted layer on the inputs the model gave it, plus the "
        "AdamW step; medians over interleaved rounds. **overhead** = (t − t_f) / (t_peft − t_f) per round, median, with "
        "t_f the bias floor or the bare base layers.",
        "",
    ]
    for rank, r in res["ranks"].items():
        lines += [f"## rank {rank} ({r['merged_layers']} of {r['layers']} layers take the merged-weight path)", "",
                  "| variant | layers CPU s | ×peft | overhead over floor | overhead over bare base |", "|---|---:|---:|---:|---:|"]
        for name, row in r["variants"].items():
            lines.append(f"| {VARIANTS[name][1]} | {row['layer_cpu_seconds_median']:.4f} | {row['layer_ratio_median']:.3f} | "
                         f"{row['overhead_vs_peft_over_floor']:.2f} | {row['overhead_vs_peft_over_bare']:.2f} |")
        lines.append("")
    return "\n".join(lines)


def figure(payload: dict):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ranks = payload["results"]["ranks"]
    fig, ax = plt.subplots(figsize=(9, 3.6))
    names = [n for n in VARIANTS if n not in (REFERENCE, "bare")]
    width = 0.8 / len(names)
    for i, name in enumerate(names):
        ax.bar([k + i * width for k in range(len(ranks))], [r["variants"][name]["overhead_vs_peft_over_bare"] for r in ranks.values()],
               width, label=VARIANTS[name][1])
    ax.axhline(0.5, color="grey", lw=0.8, ls="--")
    ax.set_xticks([k + 0.4 - width / 2 for k in range(len(ranks))], [f"r={r}" for r in ranks])
    ax.set_ylabel("overhead over the bare base / peft LoRA's")
    ax.set_title(f"{payload['results']['base']}: adapted layers alone", fontsize=10)
    ax.legend(fontsize=7)
    fig.tight_layout()
    return fig


def measure(config: FAPathsConfig, results: dict, save: Callable[[], None]) -> None:
    base, loss_fn, targets = BUILDERS[config.base](TrainCostConfig(seed=config.seed))
    base.requires_grad_(False).train()
    results.update(base=config.base, merge_ratio=sbora.MERGE_RATIO, pass_ranks=sbora.PASS_RANKS, ranks={})
    for rank in config.ranks:
        results["ranks"][str(rank)] = measure_rank(base, loss_fn, targets, rank, config)
        results["layers"] = results["ranks"][str(rank)]["layers"]
        save()


def main(argv: list[str] | None = None) -> None:
    run_benchmark("fa_paths", __doc__, FAPathsConfig, PRESETS, argv, measure, markdown, figure)


if __name__ == "__main__":
    main()
