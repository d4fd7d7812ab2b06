"""Inference cost of concepts kept unmerged, merged, or regional: one denoising step of the SD 1.5 UNet.

Unmerged concepts cost a branch per layer and per concept on every step; merged ones cost
nothing at inference (their update is in W) but must be merged and unmerged to switch
(``hot_swap``). This times one UNet forward (no gradients; 32×32 latents, batch 2 as with
classifier-free guidance, a 77-token context; random weights, which do not change the cost)
for, interleaved over ``repeats`` rounds:

- ``merged``: the plain UNet: what any number of merged concepts costs (their wrappers
  removed by ``merge_and_unload``);
- for SBoRA-FA, LoRA (ours) and peft LoRA: 1, 2, 4 and 8 concepts active and **unmerged**
  (SBoRA-FA in slots 0..7 of one seed; ours through ``active_adapters``, peft's through each
  layer's ``set_adapter([...])``);
- ``regional``: SBoRA-FA concepts through the regional attention processor with 2 and 4
  regions (each region's cross-attention computed with its own concept; ``regional.py``).

Reported: median process CPU time (one torch thread) and the per-round ratio to ``merged``.
Results: ``docs/benchmarks/inference.{json,md,png}`` (``inference_full.*`` with ``--preset full``).

    python -m benchmarks.inference --preset quick
"""

from __future__ import annotations

import contextlib
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from tqdm.auto import tqdm

from sbora.adapters import AdapterConfig, active_adapters, adapter_parameters, inject
from sbora.adapters.registry import METHOD_SPECS, REFERENCE_METHOD, label, labels, peft_baseline
from sbora.configuration import ConfigError, check_fields

from .common import clone_sharing_weights, run_benchmark, targets_table
from .hot_swap import randomize
from .train_cost import BUILDERS, TrainCostConfig

SUBJECT = "sbora-fa"  # the method whose unmerged and regional multi-concept inference this measures
METHODS = labels([SUBJECT, REFERENCE_METHOD, peft_baseline(REFERENCE_METHOD)])  # -> its label, beside our LoRA and peft's


@dataclass
class InferenceConfig:
    concepts: list[int] = field(default_factory=lambda: [1, 2, 4, 8], metadata={"help": "numbers of active concepts"})
    regions: list[int] = field(default_factory=lambda: [2, 4], metadata={"help": "numbers of regions (regional processor, SBoRA-FA)"})
    methods: list[str] = field(default_factory=lambda: list(METHODS), metadata={"help": "methods: " + ", ".join(METHODS)})
    rank: int = field(default=16, metadata={"help": "adapter rank"})
    latent_size: int = field(default=32, metadata={"help": "latent height and width (32 = 256x256 pixels)"})
    repeats: int = field(default=5, metadata={"help": "timed rounds; medians"})
    threads: int = field(default=1, metadata={"help": "torch CPU threads (0: torch's default)"})
    seed: int = field(default=0, metadata={"help": "seed of the random base, inputs and adapters"})
    out_dir: str = field(default="", metadata={"help": "where inference.{json,md,png} go; empty: the repository's docs/benchmarks/"})

    def validate(self) -> None:
        check_fields(self, {"rank": (1, 64), "latent_size": (8, 128), "repeats": (1, None)})
        if not self.concepts or min(self.concepts) < 1 or max(self.concepts + self.regions) * self.rank > 320:
            raise ConfigError("concepts and regions must be >= 1, and their count times the rank must fit SD's 320-wide layers")
        if sorted(set(self.methods) - set(METHODS)):
            raise ConfigError(f"unknown method(s); known: {', '.join(METHODS)}")


PRESETS = {"quick": {"concepts": [1, 8], "regions": [2], "repeats": 5}, "full": {"repeats": 9}}


def with_concepts(base, method: str, n: int, rank: int, targets: list[str], seed: int):
    """A shared-weight copy of `base` with `n` concepts of `method`; returns (model, context manager activating all)."""
    model = clone_sharing_weights(base)
    names = [f"c{k}" for k in range(n)]
    if METHOD_SPECS[method].peft_backed:
        from peft import LoraConfig, inject_adapter_in_model
        from peft.tuners.lora.layer import LoraLayer

        for k, name in enumerate(names):
            torch.manual_seed(seed + k)
            inject_adapter_in_model(LoraConfig(r=rank, lora_alpha=rank, target_modules=targets), model, adapter_name=name)
        randomize([p for n_, p in model.named_parameters() if "lora_" in n_], seed)
        for m in model.modules():
            if isinstance(m, LoraLayer):
                m.set_adapter(names)
        return model, contextlib.nullcontext
    for k, name in enumerate(names):
        slot = {"slot": k} if METHOD_SPECS[method].composable else {}  # disjoint slots; LoRA: one seed per concept
        inject(model, AdapterConfig(method=method, rank=rank, alpha=float(rank), targets=targets, seed=seed + (0 if slot else k), **slot), name=name)
        randomize(adapter_parameters(model, name), seed + k)
    return model, lambda: active_adapters(model, {name: 1.0 for name in names})


def regional_runner(base, n: int, rank: int, targets: list[str], seed: int, context: torch.Tensor, latent: int):
    """SBoRA-FA concepts in `n` side-by-side regions through the regional processor."""
    from sbora_diffusion.regional import RegionalPrompt, box_mask, install_regional_processors, regional_sampling

    model, activate = with_concepts(base, SUBJECT, n, rank, targets, seed)
    install_regional_processors(model)
    regions = [RegionalPrompt(selection={f"c{k}": 1.0}, cond=context[:1], uncond=context[1:], mask=box_mask([k / n, 0, (k + 1) / n, 1], latent, latent))
               for k in range(n)]

    @contextlib.contextmanager
    def scope():
        with activate(), regional_sampling(model, regions, latent_size=(latent, latent), cfg=True):
            yield
    return model, scope


def measure(config: InferenceConfig, results: dict, save: Callable[[], None]) -> None:
    base, _, targets = BUILDERS["sd15-unet"](TrainCostConfig(seed=config.seed, latent_size=config.latent_size))
    base.requires_grad_(False).eval()
    g = torch.Generator().manual_seed(config.seed)
    s = config.latent_size
    latents = torch.randn(2, 4, s, s, generator=g)  # (2, 4, s, s): negative + prompt, as with guidance
    context = torch.randn(2, 77, base.config.cross_attention_dim, generator=g)  # (2, 77, 768)
    t = torch.tensor([500, 500])
    runners: dict[str, tuple[str, torch.nn.Module, Callable]] = {"merged": ("merged (plain UNet)", base, contextlib.nullcontext)}
    for method in config.methods:
        for n in config.concepts:
            model, scope = with_concepts(base, method, n, config.rank, targets, config.seed)
            runners[f"{method}-{n}"] = (f"{METHODS[method]}, {n} unmerged", model, scope)
    for n in config.regions:
        model, scope = regional_runner(base, n, config.rank, targets, config.seed, context, s)
        runners[f"regional-{n}"] = (f"{label(SUBJECT)}, {n} regions", model, scope)
    times: dict[str, list[float]] = {k: [] for k in runners}
    order = list(runners)
    with torch.no_grad():
        for _, model, scope in runners.values():  # warm-up
            with scope():
                model(latents, t, encoder_hidden_states=context)
        for k in tqdm(range(config.repeats * len(order)), desc="inference"):
            name = order[(k + k // len(order)) % len(order)]  # every variant once per round, rotating
            _, model, scope = runners[name]
            with scope():
                t0 = time.process_time()
                model(latents, t, encoder_hidden_states=context)
                times[name].append(time.process_time() - t0)
    merged = times["merged"]
    results["variants"] = {
        name: {"label": label, "ms_median": 1e3 * statistics.median(times[name]),
               "x_merged_median": statistics.median([a / b for a, b in zip(times[name], merged, strict=True)]), "ms": [1e3 * x for x in times[name]]}
        for name, (label, _, _) in runners.items()
    }
    results["rank"] = config.rank
    save()


def targets_check(res: dict) -> list[tuple[str, bool, str]]:
    v = res["variants"]
    out = []
    one, eight = f"{SUBJECT}-1", f"{SUBJECT}-8"
    if one in v:
        x = v[one]["x_merged_median"]
        out.append(("one SBoRA concept unmerged ≤ 5% slower than merged", x <= 1.05, f"{x:.3f}× merged"))
    if eight in v and one in v:
        x = v[eight]["ms_median"] / v[one]["ms_median"]
        out.append(("8 SBoRA concepts unmerged ≤ 1.25× one", x <= 1.25, f"{x:.3f}× one"))
    return out


def markdown(payload: dict) -> str:
    env, res = payload["environment"], payload["results"]
    lines = [
        "# Inference: one denoising step of the SD 1.5-architecture UNet", "",
        f"Command: `{payload['command']}`: {env['date']}, {env['torch_threads']} torch thread(s), torch {env['torch']}, peft {env['peft']}; "
        f"run time {payload['seconds'] / 60:.1f} min" + ("." if payload.get("complete") else "; **partial**."), "",
        f"UNet forward, no gradients, batch 2 (classifier-free guidance), rank {res.get('rank')} on `to_q,to_k,to_v,to_out.0`. "
        "Median process CPU time over interleaved rounds; ratio per round to the plain (merged) UNet, median.", "",
        "| variant | ms per step | × merged |", "|---|---:|---:|",
    ]
    lines += [f"| {r['label']} | {r['ms_median']:.0f} | {r['x_merged_median']:.3f} |" for r in res.get("variants", {}).values()]
    if res.get("variants"):
        lines += ["", *targets_table(targets_check(res))]
    return "\n".join(lines) + "\n"


def figure(payload: dict):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = payload["results"].get("variants", {})
    fig, ax = plt.subplots(figsize=(8, 3.6))
    ax.barh([r["label"] for r in rows.values()], [r["x_merged_median"] for r in rows.values()])
    ax.axvline(1.0, color="k", lw=0.8)
    ax.set_xlabel("step time × merged (plain UNet)")
    ax.invert_yaxis()
    ax.set_title("One SD 1.5 UNet step (CPU, 1 thread)")
    return fig


def main(argv: list[str] | None = None) -> None:
    run_benchmark("inference", __doc__, InferenceConfig, PRESETS, argv, measure, markdown, figure)


if __name__ == "__main__":
    main()
