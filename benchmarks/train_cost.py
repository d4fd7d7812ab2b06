"""Training cost of every adapter method next to peft's LoRA: step time, parameters, memory.

Bases, weights irrelevant to cost: the Stable Diffusion 1.5-architecture UNet with random
weights (``configs/models/sd15-unet.json``, 860M parameters; 32×32 latents, batch 1, 77-token
text context; targets ``to_q,to_k,to_v,to_out.0``), SmolLM2-135M (the embedded GGUF,
sequence length 256, batch 1; targets ``q_proj,k_proj,v_proj,o_proj``), and, asked for by
``--bases sdxl-unet`` (``--preset sdxl``), the SDXL base-architecture UNet with random weights
(``configs/models/sdxl-unet.json``, 2.57B parameters; 64×64 latents (512 px), batch 1, a 77-token
context of width 2048, the pooled prompt and size/crop numbers of its add-embedding; targets
``sdxl-unet``: the attention projections of all 70 transformer blocks). ``--sdxl-width`` scales
its channels down (0.5: 728M parameters, every block, depth and head count kept) for
machines that cannot hold 10 GB of float32 weights plus activations (``--preset sdxl-cpu``).
Per base and rank, every method sits on its own shared-weight copy of the base with its own AdamW, and then

1. one untimed first step each, which also measures: trainable parameters, optimizer-state
   bytes, bytes autograd saves inside the adapter branches (``common.SavedTensorMeter``), and
   the peak allocation of forward+backward (torch CPU allocator, via the profiler);
2. ``repeats`` timed rounds, one step per method per round in rotating order; times are
   reported as the median over rounds of the ratio to peft LoRA's step in the same round,
   on process CPU time with one torch thread by default (see ``common``), wall time beside;
3. ``layer_repeats`` rounds of the adapted layers alone on the inputs the model gave them
   (``common.layer_step``), where a method's overhead over the floor is resolved.

Results: ``docs/benchmarks/train_cost.{json,md,png}`` (``train_cost_<preset>.*`` with another ``--preset``).

    python -m benchmarks.train_cost --preset quick
    python -m benchmarks.train_cost --preset sdxl          # SBoRA-FA vs peft LoRA on the SDXL UNet, 64x64 latents
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn
from tqdm.auto import tqdm

from sbora.adapters import TARGET_PRESETS
from sbora.adapters.registry import labels
from sbora.configuration import CONFIG_DIR, ConfigError

from .common import (
    COST_METHODS,
    FLOOR,
    REFERENCE,
    Variant,
    add_method,
    capture_layer_inputs,
    clone_sharing_weights,
    interleaved_times,
    layer_step,
    measure_step,
    mib,
    random_cotangents,
    run_benchmark,
    time_ratios,
    train_step,
)

BASES = ("sd15-unet", "smollm2", "sdxl-unet")
DEFAULT_BASES = ("sd15-unet", "smollm2")  # the SDXL UNet (10 GB of float32 weights) only when asked for


@dataclass
class TrainCostConfig:
    bases: list[str] = field(default_factory=lambda: list(DEFAULT_BASES), metadata={"help": "bases to measure: " + ", ".join(BASES)})
    ranks: list[int] = field(default_factory=lambda: [4, 16, 64], metadata={"help": "adapter ranks"})
    methods: list[str] = field(default_factory=lambda: list(COST_METHODS), metadata={"help": f"methods ({REFERENCE}, the reference, is always added)"})
    repeats: int = field(default=5, metadata={"help": "timed rounds (one step per method per round); medians over rounds"})
    layer_repeats: int = field(default=15, metadata={"help": "timed rounds of the adapted layers alone (cheap: they resolve the overhead)"})
    latent_size: int = field(default=32, metadata={"help": "SD: latent height and width (32 = 256×256 pixels)"})
    sdxl_latent_size: int = field(default=64, metadata={"help": "SDXL: latent height and width (64 = 512×512 pixels)"})
    sdxl_width: float = field(default=1.0, metadata={"help": "SDXL: scale of the UNet's channel widths, a multiple of 0.5 (1: SDXL base, "
                                                             "2.57B parameters; 0.5: 728M, same blocks, depths and heads, for small machines)"})
    seq_len: int = field(default=256, metadata={"help": "SmolLM2: tokens per training sequence"})
    threads: int = field(default=1, metadata={"help": "torch CPU threads (0: torch's default); 1 keeps CPU time a measure of work on a shared machine"})
    seed: int = field(default=0, metadata={"help": "seed of the random base weights, inputs and adapter inits"})
    out_dir: str = field(default="", metadata={"help": "where train_cost.{json,md,png} go (train_cost_full.* for --preset full); empty: the repository's docs/benchmarks/"})

    def validate(self) -> None:
        unknown = sorted(set(self.bases) - set(BASES))
        if unknown:
            raise ConfigError(f"unknown base(s) {', '.join(unknown)}; known: {', '.join(BASES)}")
        bad = sorted(set(self.methods) - set(COST_METHODS))
        if bad:
            raise ConfigError(f"unknown method(s) {', '.join(bad)}; known: {', '.join(COST_METHODS)}")
        if self.repeats < 1 or any(r < 1 for r in self.ranks):
            raise ConfigError("repeats and every rank must be >= 1")
        if "sdxl-unet" in self.bases:
            sdxl_channels(self.sdxl_width)
        if self.sdxl_latent_size < 8 or self.sdxl_latent_size % 4:
            raise ConfigError(f"sdxl_latent_size must be a multiple of 4 (the UNet halves it twice), at least 8; got {self.sdxl_latent_size}")


# quick: rank 16 only, so that train_cost + llm_quality stay under 15 minutes on 2 CPU cores;
# full: every rank of the issue, more rounds.
# sdxl: the SDXL row (SBoRA-FA vs peft LoRA at rank 16, 64x64 latents, the floor beside them; 10.3 GB of float32
# weights plus activations); sdxl-cpu: the same at half width and 32x32 latents, what 2 CPU cores and 24 GB can measure.
PRESETS = {
    "quick": {"ranks": [16], "repeats": 5, "layer_repeats": 10},
    "full": {"ranks": [4, 16, 64], "repeats": 9, "layer_repeats": 21},
    "sdxl": {"bases": ["sdxl-unet"], "methods": ["sbora-fa", FLOOR], "ranks": [16], "repeats": 5, "layer_repeats": 10},
    "sdxl-cpu": {"bases": ["sdxl-unet"], "methods": ["sbora-fa", FLOOR], "ranks": [16], "repeats": 3, "layer_repeats": 7,
                 "sdxl_width": 0.5, "sdxl_latent_size": 32},
}


def build_sd_unet(config: TrainCostConfig):
    """The SD 1.5 UNet architecture with random weights, and a denoising-loss closure."""
    from diffusers import UNet2DConditionModel

    torch.manual_seed(config.seed)
    unet = UNet2DConditionModel.from_config(json.loads((CONFIG_DIR / "models" / "sd15-unet.json").read_text()))
    g = torch.Generator().manual_seed(config.seed)
    s = config.latent_size
    latents, noise = torch.randn(1, 4, s, s, generator=g), torch.randn(1, 4, s, s, generator=g)  # (1, 4, s, s)
    context = torch.randn(1, 77, unet.config.cross_attention_dim, generator=g)  # (1, 77, 768)
    timestep = torch.tensor([500])

    def loss_fn(model: nn.Module) -> torch.Tensor:
        return nn.functional.mse_loss(model(latents, timestep, encoder_hidden_states=context).sample, noise)

    return unet, loss_fn, TARGET_PRESETS["sd-unet"]


def sdxl_channels(width: float) -> list[int]:
    """SDXL's block widths (320, 640, 1280) scaled by `width`, which must stay divisible by its 32 norm groups and by each
    block's head count (5, 10, 20), so that every head keeps a whole width."""
    arch = json.loads((CONFIG_DIR / "models" / "sdxl-unet.json").read_text())
    channels = [c * width for c in arch["block_out_channels"]]
    if width <= 0 or any(c != int(c) or c % math.lcm(arch["norm_num_groups"], h) for c, h in zip(channels, arch["attention_head_dim"])):
        raise ConfigError(f"sdxl_width {width} gives channel widths {channels}, not divisible by 32 norm groups and the heads (5, 10, 20): "
                          "use a multiple of 0.5")
    return [int(c) for c in channels]


def build_sdxl_unet(config: TrainCostConfig):
    """The SDXL base UNet architecture with random weights (channels scaled by --sdxl-width), and a denoising-loss closure
    with SDXL's whole conditioning: the two text encoders' context (width 2048), the pooled prompt, the size/crop numbers."""
    from diffusers import UNet2DConditionModel

    arch = json.loads((CONFIG_DIR / "models" / "sdxl-unet.json").read_text())
    arch["block_out_channels"] = sdxl_channels(config.sdxl_width)
    torch.manual_seed(config.seed)
    unet = UNet2DConditionModel.from_config(arch)
    g = torch.Generator().manual_seed(config.seed)
    s = config.sdxl_latent_size
    latents, noise = torch.randn(1, 4, s, s, generator=g), torch.randn(1, 4, s, s, generator=g)  # (1, 4, s, s)
    context = torch.randn(1, 77, unet.config.cross_attention_dim, generator=g)  # (1, 77, 2048)
    pooled_width = unet.config.projection_class_embeddings_input_dim - 6 * unet.config.addition_time_embed_dim  # 1280
    pixels = float(8 * s)
    added = {"text_embeds": torch.randn(1, pooled_width, generator=g),  # (1, 1280)
             "time_ids": torch.tensor([[pixels, pixels, 0.0, 0.0, pixels, pixels]])}  # (1, 6): original size, crop, target size
    timestep = torch.tensor([500])

    def loss_fn(model: nn.Module) -> torch.Tensor:
        return nn.functional.mse_loss(model(latents, timestep, encoder_hidden_states=context, added_cond_kwargs=added).sample, noise)

    return unet, loss_fn, TARGET_PRESETS["sdxl-unet"]


def build_smollm2(config: TrainCostConfig):
    """SmolLM2-135M from the embedded GGUF (llm.models), and a next-token-loss closure."""
    from llm.models import load_model

    model = load_model()
    g = torch.Generator().manual_seed(config.seed)
    ids = torch.randint(0, model.config.vocab_size, (1, config.seq_len), generator=g)  # (1, T)

    def loss_fn(m: nn.Module) -> torch.Tensor:
        return m(input_ids=ids, labels=ids).loss

    return model, loss_fn, TARGET_PRESETS["llama"]


BUILDERS = {"sd15-unet": build_sd_unet, "smollm2": build_smollm2, "sdxl-unet": build_sdxl_unet}


def measure_base(name: str, config: TrainCostConfig, result: dict, save: Callable[[], None]) -> None:
    """Fill `result` rank by rank, calling `save` after each (a crash keeps what was measured)."""
    t0 = time.time()
    base, loss_fn, targets = BUILDERS[name](config)
    base.requires_grad_(False).train()
    methods = [REFERENCE] + [m for m in config.methods if m != REFERENCE]
    result.update(targets=targets, parameters=sum(p.numel() for p in base.parameters()), ranks={}, rank_seconds={})
    for rank in config.ranks:
        t_rank = time.time()
        variants = []
        for method in methods:
            model = clone_sharing_weights(base)
            params = add_method(model, method, rank, targets, seed=config.seed)
            variants.append(Variant(method, model, params, torch.optim.AdamW(params, lr=1e-4)))
        counts = {v.name: measure_step(v, loss_fn) for v in tqdm(variants, desc=f"{name} r={rank} first step + counts")}
        interleaved_times(variants, lambda v: train_step(v, loss_fn), config.repeats, f"{name} r={rank} steps")
        inputs = capture_layer_inputs(variants[0], loss_fn)
        grads = random_cotangents(variants[0].model, inputs, config.seed)
        interleaved_times(variants, lambda v: layer_step(v, inputs, grads), config.layer_repeats, f"{name} r={rank} layers")
        times = time_ratios(variants)
        result["ranks"][str(rank)] = {m: {**counts[m], **times[m]} for m in methods}
        result["rank_seconds"][str(rank)] = time.time() - t_rank
        result["seconds"] = time.time() - t0
        del variants
        save()


# --------------------------------------------------------------------------- report

LABELS = {**labels([m for m in COST_METHODS if m != FLOOR]), FLOOR: "floor (bias only)"}  # the registry's labels


def targets_check(results: dict) -> list[tuple[str, bool, str]]:
    """The issue's targets, each as (statement, met, measured)."""
    out = []
    for base, res in results.items():
        ranks = res.get("ranks", {})
        if "16" in ranks and "sbora-fa" in ranks["16"]:
            fa, ref = ranks["16"]["sbora-fa"], ranks["16"][REFERENCE]
            share = fa["branch_saved_bytes"] / ref["branch_saved_bytes"]
            out.append((f"{base} r=16: SBoRA-FA branch-saved bytes ≤ 10% of peft LoRA's", share <= 0.10, f"{share:.1%}"))
            out.append((f"{base} r=16: SBoRA-FA peak training memory (fwd+bwd) < peft LoRA's", fa["peak_step_bytes"] < ref["peak_step_bytes"],
                        f"{mib(fa['peak_step_bytes'])} vs {mib(ref['peak_step_bytes'])} MiB"))
        for r in ("16", "64"):
            if r in ranks and "sbora-fa" in ranks[r]:
                fa = ranks[r]["sbora-fa"]
                out.append((f"{base} r={r}: SBoRA-FA step time ≤ 1.00× peft LoRA", fa["ratio_median"] <= 1.0, f"{fa['ratio_median']:.3f}×"))
                if "overhead_vs_peft" in fa:
                    out.append((f"{base} r={r}: SBoRA-FA overhead over the floor ≤ ½ of peft LoRA's (adapted layers alone)", fa["overhead_vs_peft"] <= 0.5,
                                f"{fa['overhead_vs_peft']:.2f}"))
        for r, rows in ranks.items():
            if "lora" in rows:
                out.append((f"{base} r={r}: our LoRA within 1.05× of peft LoRA", rows["lora"]["ratio_median"] <= 1.05,
                            f"{rows['lora']['ratio_median']:.3f}×"))
    return out


def input_size(base: str, config: dict) -> str:
    """What the SDXL row ran at (its size options); nothing for the other bases, whose sizes the text above states."""
    if base != "sdxl-unet":
        return ""
    s = config["sdxl_latent_size"]
    return f"; {s}×{s} latents ({8 * s} px), channel width ×{config['sdxl_width']:g} of SDXL's"


def markdown(payload: dict) -> str:
    env = payload["environment"]
    lines = [
        "# Training cost, side by side with peft LoRA",
        "",
        f"Command: `{payload['command']}` — {env['date']}, {env['cpu_count']} CPU cores ({env['torch_threads']} torch threads), "
        f"load average {env['load_average'][0]:.1f} at the start, {env['load_average_end'][0]:.1f} at the end; "
        f"torch {env['torch']}, peft {env['peft']}. Run time {payload['seconds'] / 60:.1f} min ({payload['cpu_seconds'] / 60:.1f} min CPU)"
        + ("." if payload.get("complete") else "; **partial: the run was still going or stopped early**."),
        "",
        "- **step ×peft**: median over rounds of a whole training step's process CPU time (forward + backward + AdamW "
        f"step, {env['torch_threads']} torch thread(s)) divided by peft LoRA's step in the same round, [min–max] over rounds; "
        "**wall ×peft**: the same on wall time. **layers ×peft**: the same for the adapted layers alone (forward + backward "
        "of every targeted layer on the inputs the model gave it, input gradients included, + AdamW step). **overhead**: "
        "(t − t_floor) / (t_peft − t_floor) per round, median, on the layers alone: the method's cost above the base's, "
        "relative to peft LoRA's (on a whole SD step that difference is ~1% and below the noise).",
        "- **saved in branch**: bytes of the storages autograd saves for backward inside the adapter branches "
        "(`saved_tensors_hooks` on while inside an adapter wrapper; weights excluded, so the frozen base layer adds nothing); "
        "**branch-only**: those not also saved by another op of the model.",
        "- **peak fwd+bwd**: peak of torch's CPU allocator during forward+backward of the first step, above its level at the "
        "start (profiler allocation events; deterministic): activations, gradients and temporaries; AdamW's state is the "
        "optimizer-state column.",
        "",
    ]
    for base, res in payload["results"].items():
        if not res.get("ranks"):
            continue
        lines += [f"## {base} ({res['parameters'] / 1e6:.1f}M parameters{input_size(base, payload['config'])}; targets {', '.join(res['targets'])})", ""]
        for rank, rows in res["ranks"].items():
            lines += [
                f"### rank {rank}",
                "",
                "| method | trainable | optimizer state MiB | saved in branch MiB | branch-only MiB | peak fwd+bwd MiB | step ×peft [min–max] | wall ×peft | layers ×peft | overhead |",
                "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
            ]
            for m, row in rows.items():
                lines.append(
                    f"| {LABELS[m]} | {row['trainable_parameters']:,} | {mib(row['optimizer_state_bytes'])} | "
                    f"{mib(row['branch_saved_bytes'])} | {mib(row['branch_only_saved_bytes'])} | {mib(row['peak_step_bytes'])} | "
                    f"{row['ratio_median']:.3f} [{row['ratio_min']:.2f}–{row['ratio_max']:.2f}] | {row['wall_ratio_median']:.2f} | "
                    f"{row.get('layer_ratio_median', float('nan')):.3f} | {row.get('overhead_vs_peft', float('nan')):.2f} |"
                )
            ref = rows[REFERENCE]
            lines += ["", f"peft LoRA (medians): step {ref['cpu_seconds_median']:.2f} s CPU, {ref['wall_seconds_median']:.2f} s wall; "
                      f"adapted layers alone {ref.get('layer_cpu_seconds_median', float('nan')):.3f} s CPU. "
                      f"Measuring this rank took {res['rank_seconds'][rank] / 60:.1f} min.", ""]
    lines += ["## Targets", ""]
    lines += [f"- {'met' if ok else '**missed**'}: {what} — {got}" for what, ok, got in targets_check(payload["results"])]
    return "\n".join(lines) + "\n"


def figure(payload: dict):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    results = {b: r for b, r in payload["results"].items() if r.get("ranks")}
    fig, axes = plt.subplots(len(results), 2, figsize=(12, 3.6 * len(results)), squeeze=False)
    for (base, res), (ax_t, ax_m) in zip(results.items(), axes, strict=True):
        ranks = list(res["ranks"])
        methods = list(res["ranks"][ranks[0]])
        width = 0.8 / len(methods)
        for i, m in enumerate(methods):
            xs = [k + i * width for k in range(len(ranks))]
            rows = [res["ranks"][r][m] for r in ranks]
            ax_t.bar(xs, [row.get("layer_ratio_median", float("nan")) for row in rows], width, label=LABELS[m])
            ax_t.plot(xs, [row["ratio_median"] for row in rows], "k.", label="whole step" if i == 0 else None)
            ax_m.bar(xs, [row["branch_saved_bytes"] / 2**20 for row in rows], width, label=LABELS[m])
        for ax, title in ((ax_t, "time / peft LoRA: adapted layers (bars), whole step (dots)"), (ax_m, "saved for backward in adapter branches (MiB)")):
            ax.set_xticks([k + 0.4 - width / 2 for k in range(len(ranks))], [f"r={r}" for r in ranks])
            ax.set_title(f"{base}: {title}", fontsize=10)
        ax_t.axhline(1.0, color="grey", lw=0.8, ls="--")
        ax_t.set_ylim(bottom=min(0.5, ax_t.get_ylim()[0]))
        ax_m.set_yscale("symlog", linthresh=0.1)
    axes[0][0].legend(fontsize=7, ncol=2)
    fig.tight_layout()
    return fig


def measure(config: TrainCostConfig, results: dict, save: Callable[[], None]) -> None:
    for base in config.bases:
        measure_base(base, config, results.setdefault(base, {}), save)


def main(argv: list[str] | None = None) -> None:
    run_benchmark("train_cost", __doc__, TrainCostConfig, PRESETS, argv, measure, markdown, figure, targets_check)


if __name__ == "__main__":
    main()
