"""Hot-swap: switching one concept on and off in the SD 1.5-architecture UNet by merge + unmerge.

The app's merged mode switches a concept by folding its update into the base weights and
taking it out again. SBoRA's update lives in r columns (FA) or rows (FB) of each weight, so
its merge is a sparse add of r·d_out (or r·d_in) numbers per layer and its unmerge puts the
kept columns back; LoRA's is a dense d_out×d_in product B·A added to, then subtracted from,
the whole weight. Timed here, on the UNet (random weights, 128 attention projections
``to_q,to_k,to_v,to_out.0``), for each rank:

- ``peft LoRA``: peft's own ``merge()`` / ``unmerge()`` on every LoRA layer (what
  ``merge_adapter`` / ``unmerge_adapter`` do);
- ``LoRA (ours)``, ``SBoRA-FA``, ``SBoRA-FB``, ``Ortho``: ``merge(model, name)`` then
  ``unmerge(model, name)``.

One switch = merge + unmerge of one concept over all layers; process CPU time of one torch
thread, the methods interleaved (rotating order) over ``repeats`` rounds, medians, and the
ratio to our LoRA's switch in the same round. **Bytes written per switch** are exact counts
from the layer shapes: the weight entries merge writes plus those unmerge writes (fp32).
Results: ``docs/benchmarks/hot_swap.{json,md,png}`` (``hot_swap_full.*`` with ``--preset full``).

    python -m benchmarks.hot_swap --preset quick
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from tqdm.auto import tqdm

from sbora_diffusion.adapters import adapted_layers, merge, unmerge
from sbora_diffusion.configuration import ConfigError

from .common import add_method, clone_sharing_weights, run_benchmark, targets_table
from .train_cost import BUILDERS, TrainCostConfig

METHODS = {"peft-lora": "peft LoRA", "lora": "LoRA (ours)", "sbora-fa": "SBoRA-FA", "sbora-fb": "SBoRA-FB", "ortho": "Ortho"}
BASELINE = "lora"  # ratios are to our own LoRA merge (and peft's is reported beside it)


@dataclass
class HotSwapConfig:
    ranks: list[int] = field(default_factory=lambda: [4, 16, 64], metadata={"help": "adapter ranks"})
    repeats: int = field(default=9, metadata={"help": "timed rounds (one switch per method per round); medians"})
    threads: int = field(default=1, metadata={"help": "torch CPU threads (0: torch's default)"})
    seed: int = field(default=0, metadata={"help": "seed of the random base weights and adapters"})
    out_dir: str = field(default="", metadata={"help": "where hot_swap.{json,md,png} go; empty: the repository's docs/benchmarks/"})

    def validate(self) -> None:
        if self.repeats < 1 or not self.ranks or any(r < 1 for r in self.ranks):
            raise ConfigError("repeats and every rank must be >= 1")


PRESETS = {"quick": {"ranks": [4, 16, 64], "repeats": 5}, "full": {"ranks": [4, 16, 64], "repeats": 15}}


def switch_fn(method: str, model: torch.nn.Module) -> Callable[[], None]:
    """One switch (merge + unmerge of the concept) for `method` on `model`."""
    if method.startswith("peft"):
        from peft.tuners.lora.layer import LoraLayer

        layers = [m for m in model.modules() if isinstance(m, LoraLayer)]

        def switch() -> None:
            for m in layers:
                m.merge()
            for m in layers:
                m.unmerge()
        return switch

    def switch() -> None:
        merge(model, "default")
        unmerge(model, "default")
    return switch


def bytes_per_switch(method: str, model: torch.nn.Module, rank: int) -> int:
    """Weight bytes written by one merge + one unmerge (fp32): r columns/rows for SBoRA, whole weights otherwise."""
    shapes = [(m.out_features, m.in_features) for m in model.modules() if hasattr(m, "base_layer") and isinstance(m.base_layer, torch.nn.Linear)]
    per_layer = {"sbora-fa": lambda o, i: rank * o, "sbora-fb": lambda o, i: rank * i}.get(method, lambda o, i: o * i)
    return 2 * 4 * sum(per_layer(o, i) for o, i in shapes)


def randomize(params: list[torch.nn.Parameter], seed: int) -> None:
    """Non-zero adapter weights (a trained concept), so merge does real arithmetic."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in params:
            p.copy_(torch.randn(p.shape, generator=g) * 0.01)


def measure(config: HotSwapConfig, results: dict, save: Callable[[], None]) -> None:
    base, _, targets = BUILDERS["sd15-unet"](TrainCostConfig(seed=config.seed))
    base.requires_grad_(False).eval()
    results.update(targets=targets, ranks={})
    for rank in config.ranks:
        models, switches, times = {}, {}, {m: [] for m in METHODS}
        for method in METHODS:
            models[method] = clone_sharing_weights(base)
            randomize(add_method(models[method], method, rank, targets, seed=config.seed), config.seed)
            switches[method] = switch_fn(method, models[method])
            switches[method]()  # warm-up: first-touch allocations
        order = list(METHODS)
        with torch.no_grad():
            for k in tqdm(range(config.repeats), desc=f"hot swap r={rank}"):
                for method in order[k % len(order):] + order[: k % len(order)]:
                    t0 = time.process_time()
                    switches[method]()
                    times[method].append(time.process_time() - t0)
        layers = len(adapted_layers(models["lora"]))
        rows = {}
        for method in METHODS:
            ratio = [t / b for t, b in zip(times[method], times[BASELINE], strict=True)]
            peft = [t / b for t, b in zip(times[method], times["peft-lora"], strict=True)]
            rows[method] = {
                "label": METHODS[method], "ms_median": 1e3 * statistics.median(times[method]),
                "x_lora_median": statistics.median(ratio), "x_peft_median": statistics.median(peft),
                "speedup_vs_lora": 1 / statistics.median(ratio), "bytes_written": bytes_per_switch(method, models[method], rank),
                "ms": [1e3 * t for t in times[method]],
            }
        results["ranks"][str(rank)] = {"layers": layers, "methods": rows}
        save()


def targets_check(res: dict) -> list[tuple[str, bool, str]]:
    """The issue's target: an SBoRA switch ≥ 10× faster than a LoRA merge of the same rank, at every rank."""
    out = []
    for method in ("sbora-fa", "sbora-fb"):
        speedups = {r: v["methods"][method]["speedup_vs_lora"] for r, v in res["ranks"].items()}
        out.append((f"{METHODS[method]} switch ≥ 10× faster than LoRA's", all(s >= 10 for s in speedups.values()),
                    ", ".join(f"r={r}: {s:.1f}×" for r, s in speedups.items())))
    return out


def markdown(payload: dict) -> str:
    env, res = payload["environment"], payload["results"]
    lines = [
        "# Hot-swap: one concept merged and unmerged in the SD 1.5-architecture UNet", "",
        f"Command: `{payload['command']}`: {env['date']}, {env['torch_threads']} torch thread(s), torch {env['torch']}, "
        f"peft {env['peft']}; run time {payload['seconds'] / 60:.1f} min" + ("." if payload.get("complete") else "; **partial**."), "",
        "One switch = merge + unmerge over every adapted layer (`to_q,to_k,to_v,to_out.0`, 128 layers). Median process CPU time "
        "over interleaved rounds; ratios per round to our LoRA's switch, medians. Bytes: weight entries written (fp32), exact.", "",
    ]
    for rank, r in res.get("ranks", {}).items():
        lines += [f"## rank {rank}", "", "| method | ms per switch | × LoRA (ours) | × peft LoRA | faster than LoRA | bytes written |",
                  "|---|---:|---:|---:|---:|---:|"]
        for row in r["methods"].values():
            lines.append(f"| {row['label']} | {row['ms_median']:.2f} | {row['x_lora_median']:.4f} | {row['x_peft_median']:.4f} | "
                         f"{row['speedup_vs_lora']:.1f}× | {row['bytes_written'] / 2**20:.2f} MiB |")
        lines.append("")
    if res.get("ranks"):
        lines += ["## Target", "", *targets_table(targets_check(res))]
    return "\n".join(lines) + "\n"


def figure(payload: dict):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ranks = payload["results"].get("ranks", {})
    fig, ax = plt.subplots(figsize=(8, 3.4))
    width = 0.8 / len(METHODS)
    for i, method in enumerate(METHODS):
        ax.bar([k + i * width for k in range(len(ranks))], [r["methods"][method]["ms_median"] for r in ranks.values()], width, label=METHODS[method])
    ax.set_xticks([k + 0.4 - width / 2 for k in range(len(ranks))], [f"rank {r}" for r in ranks])
    ax.set_yscale("log")
    ax.set_ylabel("ms per switch (merge + unmerge)")
    ax.legend(fontsize=8)
    ax.set_title("Hot-swap of one concept, SD 1.5 UNet (CPU, 1 thread)")
    return fig


def main(argv: list[str] | None = None) -> None:
    run_benchmark("hot_swap", __doc__, HotSwapConfig, PRESETS, argv, measure, markdown, figure)


if __name__ == "__main__":
    main()
