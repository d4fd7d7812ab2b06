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
  ``unmerge(model, name)``, each SBoRA side in both index layouts: ``scattered`` (v1, the
  default: single random indices, the SBoRA paper's) and ``blocks`` (v2, ``--layout blocks``:
  a slot's indices are runs of 16-wide blocks).

One switch = merge + unmerge of one concept over all layers; process CPU time of one torch
thread, the methods interleaved (rotating order) over ``repeats`` rounds, medians, and the
ratio to our LoRA's switch in the same round. Counted exactly from the layer shapes and the
index sets, per switch (what merge writes plus what unmerge writes, fp32):

- **bytes written**: the weight entries themselves;
- **cache lines written**: distinct 64-byte lines of each row of W that hold a written entry
  (rows start line-aligned), and the traffic they stand for (lines × 64 bytes). A line is
  the unit memory moves in: r scattered columns of a 320-wide row touch up to r of its 20
  lines, so scattered columns cannot be much cheaper than rewriting the row; the blocks
  layout touches ⌈r/16⌉.

Each CPU kernel set in ``capabilities`` (``native``: torch's choice for this CPU; ``avx2``,
``default``: ``ATEN_CPU_CAPABILITY``) runs in its own process, side by side in one run.
Results: ``docs/benchmarks/hot_swap.{json,md,png}`` (``hot_swap_full.*`` with ``--preset full``).

    python -m benchmarks.hot_swap --preset quick
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm

from sbora.adapters import AdapterConfig, adapted_layers, inject, merge, unmerge
from sbora.adapters.base import cache_lines
from sbora.adapters.config import DEFAULT_LAYOUTS, LEGACY_LAYOUT
from sbora.adapters.registry import METHOD_SPECS, REFERENCE_METHOD, composable_methods, label, labels, layout_label, peft_baseline
from sbora.configuration import ConfigError

from .common import add_method, clone_sharing_weights, run_benchmark, targets_table
from .train_cost import BUILDERS, TrainCostConfig

BASELINE = REFERENCE_METHOD  # ratios are to our own LoRA merge (and peft's is reported beside it)
PEFT = peft_baseline(BASELINE)


def _variants() -> dict[str, str]:
    """key -> label: peft's LoRA, ours, and every method with slots (the registry's), a method with index layouts once per
    layout (``method@layout``, its fastest-switching layout first; the default is scattered: adapters.config.DEFAULT_LAYOUTS)."""
    out = labels([PEFT, BASELINE])
    for m in composable_methods():
        out.update({f"{m}@{layout}": layout_label(m, layout) for layout in METHOD_SPECS[m].layouts} or {m: label(m)})
    return out


METHODS = _variants()
# the fast layout of each side: FA's runs, FB's rows (contiguous either way)
TARGETED = tuple(f"{m}@{METHOD_SPECS[m].fast_layout}" for m in composable_methods() if METHOD_SPECS[m].layouts)
CAPABILITIES = ("native", "avx2", "default")  # native: torch's own choice for this CPU (AVX-512 where it has it)
CHILD = "SBORA_HOT_SWAP_CHILD"  # set in the per-capability processes
LINE = 64  # bytes per cache line


@dataclass
class HotSwapConfig:
    ranks: list[int] = field(default_factory=lambda: [4, 16, 64], metadata={"help": "adapter ranks"})
    repeats: int = field(default=9, metadata={"help": "timed rounds (one switch per method per round); medians"})
    threads: int = field(default=1, metadata={"help": "torch CPU threads (0: torch's default)"})
    seed: int = field(default=0, metadata={"help": "seed of the random base weights and adapters"})
    capabilities: list[str] = field(default_factory=lambda: list(CAPABILITIES), metadata={
        "help": "CPU kernel sets, each measured in its own process: native (torch's choice), or an ATEN_CPU_CAPABILITY value (avx2, default, avx512)"})
    out_dir: str = field(default="", metadata={"help": "where hot_swap.{json,md,png} go; empty: the repository's docs/benchmarks/"})

    def validate(self) -> None:
        if self.repeats < 1 or not self.ranks or any(r < 1 for r in self.ranks):
            raise ConfigError("repeats and every rank must be >= 1")
        if not self.capabilities or len(set(self.capabilities)) != len(self.capabilities):
            raise ConfigError("capabilities: one or more distinct kernel sets, e.g. native,avx2,default")


PRESETS = {"quick": {"ranks": [4, 16, 64], "repeats": 5}, "full": {"ranks": [4, 16, 64], "repeats": 15}}


def add(model: torch.nn.Module, key: str, rank: int, targets: list[str], seed: int) -> list[torch.nn.Parameter]:
    """`key` is a method name, or ``method@layout`` for an SBoRA index layout."""
    method, _, layout = key.partition("@")
    if not layout:
        return add_method(model, method, rank, targets, seed=seed)
    model.requires_grad_(False)
    inject(model, AdapterConfig(method=method, rank=rank, alpha=float(rank), targets=targets, seed=seed, layout=layout))
    return [p for p in model.parameters() if p.requires_grad]


def _spec(key: str):
    """The registry's spec of a key (``method`` or ``method@layout``)."""
    return METHOD_SPECS[key.partition("@")[0]]


def switch_fn(method: str, model: torch.nn.Module) -> Callable[[], None]:
    """One switch (merge + unmerge of the concept) for `method` on `model`."""
    if _spec(method).peft_backed:
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


def written(method: str, model: torch.nn.Module, rank: int) -> dict[str, int]:
    """What one merge + one unmerge writes (fp32), from the shapes and index sets: entries' bytes and 64-byte lines.

    SBoRA-FA: r columns of every row (lines: those of the row holding the columns); SBoRA-FB: r
    whole rows; everything else: the whole weight.
    """
    per_line = LINE // 4
    entries = lines = 0
    side = _spec(method).slot_side
    if _spec(method).peft_backed:
        shapes = [(m.out_features, m.in_features, None) for m in model.modules() if hasattr(m, "base_layer") and isinstance(m.base_layer, torch.nn.Linear)]
    else:
        shapes = [(layer.out_features, layer.in_features, layer.cores["default"]) for layer in adapted_layers(model).values()]
    for d_out, d_in, core in shapes:
        row_lines = -(-d_in // per_line)
        if side == "columns":  # SBoRA-FA
            entries += rank * d_out
            lines += d_out * cache_lines(core.indices, d_in)
        elif side == "rows":  # SBoRA-FB
            entries += rank * d_in
            lines += rank * row_lines
        else:
            entries += d_out * d_in
            lines += d_out * row_lines
    return {"bytes_written": 2 * 4 * entries, "lines_written": 2 * lines, "line_bytes": 2 * lines * LINE}


def randomize(params: list[torch.nn.Parameter], seed: int) -> None:
    """Non-zero adapter weights (a trained concept), so merge does real arithmetic."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in params:
            p.copy_(torch.randn(p.shape, generator=g) * 0.01)


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    import platform

    return platform.processor() or platform.machine()


def measure_here(config: HotSwapConfig, results: dict, save: Callable[[], None]) -> None:
    """Every rank and method in this process, under its kernels."""
    base, _, targets = BUILDERS["sd15-unet"](TrainCostConfig(seed=config.seed))
    base.requires_grad_(False).eval()
    results.update(targets=targets, ranks={}, cpu=cpu_name(), kernels=torch.backends.cpu.get_cpu_capability(),
                   aten_cpu_capability=os.environ.get("ATEN_CPU_CAPABILITY"))
    for rank in config.ranks:
        models, switches, times = {}, {}, {m: [] for m in METHODS}
        for method in METHODS:
            models[method] = clone_sharing_weights(base)
            randomize(add(models[method], method, rank, targets, config.seed), config.seed)
            switches[method] = switch_fn(method, models[method])
            switches[method]()  # warm-up: first-touch allocations
        order = list(METHODS)
        with torch.no_grad():
            for k in tqdm(range(config.repeats), desc=f"hot swap r={rank} ({results['kernels']})"):
                for method in order[k % len(order):] + order[: k % len(order)]:
                    t0 = time.process_time()
                    switches[method]()
                    times[method].append(time.process_time() - t0)
        layers = len(adapted_layers(models[BASELINE]))
        rows = {}
        for method in METHODS:
            ratio = [t / b for t, b in zip(times[method], times[BASELINE], strict=True)]
            peft = [t / b for t, b in zip(times[method], times[PEFT], strict=True)]
            rows[method] = {
                "label": METHODS[method], "ms_median": 1e3 * statistics.median(times[method]),
                "x_lora_median": statistics.median(ratio), "x_peft_median": statistics.median(peft),
                "speedup_vs_lora": 1 / statistics.median(ratio), **written(method, models[method], rank),
                "ms": [1e3 * t for t in times[method]],
            }
        results["ranks"][str(rank)] = {"layers": layers, "methods": rows}
        save()


def measure(config: HotSwapConfig, results: dict, save: Callable[[], None]) -> None:
    """Each kernel set of ``config.capabilities`` in its own process (the kernels are chosen when torch starts)."""
    if os.environ.get(CHILD):
        measure_here(config, results, save)
        return
    results["cpus"] = {}
    for capability in config.capabilities:
        env = {**os.environ, CHILD: "1", "OMP_NUM_THREADS": str(config.threads or os.cpu_count())}
        env.pop("ATEN_CPU_CAPABILITY", None)
        if capability != "native":
            env["ATEN_CPU_CAPABILITY"] = capability
        with tempfile.TemporaryDirectory() as tmp:
            args = ["--ranks", ",".join(map(str, config.ranks)), "--repeats", str(config.repeats), "--threads", str(config.threads),
                    "--seed", str(config.seed), "--capabilities", capability, "--out-dir", tmp]
            subprocess.run([sys.executable, "-m", "benchmarks.hot_swap", *args], env=env, check=True,
                           cwd=Path(__file__).resolve().parent.parent)
            child = json.loads(next(Path(tmp).glob("hot_swap*.json")).read_text())
        results["cpus"][capability] = {**child["results"], "seconds": child["seconds"], "complete": child.get("complete", False)}
        save()


def _cpus(res: dict) -> dict:
    """{capability: results}: a parent run's per-process results, or a single process's own."""
    return res.get("cpus") or ({"native": res} if res.get("ranks") else {})


def targets_check(res: dict) -> list[tuple[str, bool, str]]:
    """The issue's target: an SBoRA switch ≥ 10× faster than a LoRA merge of the same rank, at every rank, on every kernel set."""
    out = []
    for method in TARGETED:
        for cap, r in _cpus(res).items():
            speedups = {k: v["methods"][method]["speedup_vs_lora"] for k, v in r.get("ranks", {}).items()}
            if speedups:
                out.append((f"{METHODS[method]} switch ≥ 10× faster than LoRA's ({cap}: {r.get('kernels')})", all(s >= 10 for s in speedups.values()),
                            ", ".join(f"r={k}: {s:.1f}×" for k, s in speedups.items())))
    return out


def _column(key: str) -> str:
    """A summary column's head: "SBoRA-FA (blocks)", "SBoRA-FB (scattered, default)", "Ortho"."""
    method, _, layout = key.partition("@")
    if not layout:
        return _spec(key).label
    default = ", default" if layout == DEFAULT_LAYOUTS.get(method, LEGACY_LAYOUT) else ""
    return f"{_spec(key).label} ({layout}{default})"


def markdown(payload: dict) -> str:
    env, res = payload["environment"], payload["results"]
    cpus = _cpus(res)
    lines = [
        "# Hot-swap: one concept merged and unmerged in the SD 1.5-architecture UNet", "",
        f"Command: `{payload['command']}`: {env['date']}, torch {env['torch']}, peft {env['peft']}, "
        f"{payload['config']['threads']} torch thread(s) per kernel set, each kernel set in its own process; "
        f"run time {payload['seconds'] / 60:.1f} min" + ("." if payload.get("complete") else "; **partial**."), "",
        "One switch = merge + unmerge over every adapted layer (`to_q,to_k,to_v,to_out.0`, 128 layers). Median process CPU time "
        "over interleaved rounds; ratios per round to our LoRA's switch, medians. Written per switch, counted exactly (fp32): "
        "bytes = weight entries; lines = distinct 64-byte cache lines of each weight row holding a written entry, "
        "and their traffic (lines × 64 B). Each SBoRA side in both index layouts: `scattered` (v1, the default: single random "
        "indices, as the SBoRA paper) and `blocks` (v2, `--layout blocks`: runs of 16-wide blocks).", "",
    ]
    if cpus:
        slotted = [k for k in METHODS if k not in (PEFT, BASELINE)]
        lines += ["## Speed-up of a switch over LoRA's (ours), per kernel set", "",
                  "| kernels | rank | " + " | ".join(_column(k) for k in slotted) + f" | {_spec(BASELINE).label} ms |",
                  "|---|---:|" + "---:|" * (len(slotted) + 1)]
        for cap, r in cpus.items():
            for rank, v in r.get("ranks", {}).items():
                m = v["methods"]
                lines.append(f"| {cap} ({r.get('kernels')}) | {rank} | " + "".join(f"{m[k]['speedup_vs_lora']:.1f}× | " for k in slotted)
                             + f"{m[BASELINE]['ms_median']:.0f} |")
        lines.append("")
    for cap, r in cpus.items():
        lines += [f"## Kernels: {cap} ({r.get('kernels')}; ATEN_CPU_CAPABILITY={r.get('aten_cpu_capability') or 'unset'}), {r.get('cpu', '')}", ""]
        for rank, v in r.get("ranks", {}).items():
            lines += [f"### rank {rank}", "",
                      f"| method | ms per switch | × {METHODS[BASELINE]} | × {METHODS[PEFT]} | faster than LoRA | bytes written | lines written | line traffic |",
                      "|---|---:|---:|---:|---:|---:|---:|---:|"]
            for row in v["methods"].values():
                lines.append(f"| {row['label']} | {row['ms_median']:.2f} | {row['x_lora_median']:.4f} | {row['x_peft_median']:.4f} | "
                             f"{row['speedup_vs_lora']:.1f}× | {row['bytes_written'] / 2**20:.2f} MiB | {row['lines_written'] / 1e3:,.0f} k | "
                             f"{row['line_bytes'] / 2**20:.2f} MiB |")
            lines.append("")
    if cpus:
        lines += ["## Target", "", *targets_table(targets_check(res))]
    return "\n".join(lines) + "\n"


def figure(payload: dict):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cpus = {cap: r for cap, r in _cpus(payload["results"]).items() if r.get("ranks")}
    fig, axes = plt.subplots(1, max(1, len(cpus)), figsize=(5 * max(1, len(cpus)), 3.6), squeeze=False, sharey=True)
    for ax, (cap, r) in zip(axes[0], cpus.items()):
        ranks = r["ranks"]
        width = 0.8 / len(METHODS)
        for i, method in enumerate(METHODS):
            ax.bar([k + i * width for k in range(len(ranks))], [v["methods"][method]["ms_median"] for v in ranks.values()], width,
                   label=METHODS[method])
        ax.set_xticks([k + 0.4 - width / 2 for k in range(len(ranks))], [f"rank {k}" for k in ranks])
        ax.set_yscale("log")
        ax.set_title(f"{cap} kernels ({r.get('kernels')})", fontsize=10)
    axes[0][0].set_ylabel("ms per switch (merge + unmerge)")
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=len(METHODS), fontsize=8, frameon=False, bbox_to_anchor=(0.5, -0.06))
    fig.suptitle("Hot-swap of one concept, SD 1.5 UNet (CPU, 1 thread)")
    return fig


def main(argv: list[str] | None = None) -> None:
    run_benchmark("hot_swap", __doc__, HotSwapConfig, PRESETS, argv, measure, markdown, figure, targets=targets_check)


if __name__ == "__main__":
    main()
