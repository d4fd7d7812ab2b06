"""Should SBoRA-FA's fused op run under autocast? A measurement on one SD-UNet-sized layer.

``AdaptedLinear`` trains SBoRA-FA through ``sbora.BaseWithColumnBranch`` on a frozen float
base without autocast; under autocast it takes the plain path (autocast's bf16/fp16 base
matmul, then the fp32 branch added in place). To decide whether the fused op should also run
under autocast, this script times, interleaved, on one layer (x: batch 2 × 1024 tokens × 320,
W 320×320, rank 16; SD's 32×32-latent attention projections):

- ``fp32 plain`` / ``fp32 fused``: no autocast, the two paths as shipped;
- ``bf16 autocast plain``: the shipped path under ``torch.autocast("cpu", bf16)``;
- ``bf16 autocast fused``: the fused op on bf16-cast x and W (B cast to bf16 in the op, its
  gradient back to fp32): what supporting autocast in the op would cost.

Reported: median process CPU time of forward + backward (one torch thread) and the bytes the
branch saves for backward (saved_tensors_hooks). Results: ``docs/benchmarks/fa_autocast.{json,md}``.

    python -m benchmarks.fa_autocast
"""

from __future__ import annotations

import json
import statistics
import time
from pathlib import Path

import torch

from sbora.adapters import AdapterConfig, adapted_layers, inject
from sbora.adapters.sbora import BaseWithColumnBranch

OUT = Path(__file__).resolve().parents[1] / "docs" / "benchmarks"


def layer(seed: int = 0):
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(320, 320))
    model.requires_grad_(False)
    inject(model, AdapterConfig(method="sbora-fa", rank=16, alpha=16, targets=["0"]), name="c")
    wrapped = adapted_layers(model)["0"]
    with torch.no_grad():
        wrapped.cores["c"].B.normal_(0, 0.02)
    return wrapped


def fused_bf16(wrapped, x):
    """The fused op on bf16 operands (what an autocast-aware version would run)."""
    core, base = wrapped.cores["c"], wrapped.base_layer
    B16 = core.B.to(torch.bfloat16)  # differentiable cast: B's gradient comes back as fp32
    return BaseWithColumnBranch.apply(x.to(torch.bfloat16), base.weight.to(torch.bfloat16), base.bias.to(torch.bfloat16),
                                      B16, core.indices, core.scale)


def variants(wrapped):
    def plain(x):
        return wrapped.base_layer(x) + wrapped.cores["c"].delta(x)

    def autocast_plain(x):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return wrapped(x)

    return {"fp32 plain": plain, "fp32 fused": wrapped, "bf16 autocast plain": autocast_plain, "bf16 autocast fused": lambda x: fused_bf16(wrapped, x)}


def saved_bytes(fn, x, own) -> int:
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        fn(x)
    return sum(t.numel() * t.element_size() for t in saved if t.untyped_storage().data_ptr() not in own)


def main(rounds: int = 15) -> dict:
    torch.set_num_threads(1)
    wrapped = layer()
    x = torch.randn(2, 1024, 320, requires_grad=True)
    own = {t.untyped_storage().data_ptr() for t in [*wrapped.parameters(), *wrapped.buffers()]}
    fns = variants(wrapped)
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            t0 = time.process_time()
            y = fn(x)
            y.float().square().mean().backward()
            times[name].append(time.process_time() - t0)
            x.grad = None
            wrapped.cores["c"].B.grad = None
    ref = statistics.median(times["fp32 plain"])
    rows = {k: {"ms": 1e3 * statistics.median(v), "x_fp32_plain": statistics.median(v) / ref, "saved_MiB": saved_bytes(fns[k], x, own) / 2**20}
            for k, v in times.items()}
    payload = {"date": time.strftime("%Y-%m-%d"), "torch": torch.__version__, "rounds": rounds, "shape": "x (2, 1024, 320), W 320x320, r 16", "results": rows}
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "fa_autocast.json").write_text(json.dumps(payload, indent=2) + "\n")
    lines = [f"# SBoRA-FA fused op under autocast ({payload['date']}, torch {payload['torch']}, CPU, 1 thread, {rounds} interleaved rounds)", "",
             f"One layer: {payload['shape']}; forward + backward; saved = bytes kept for backward beyond the layer's own tensors.", "",
             "| path | median ms | × fp32 plain | saved for backward |", "|---|---:|---:|---:|"]
    lines += [f"| {k} | {r['ms']:.2f} | {r['x_fp32_plain']:.3f} | {r['saved_MiB']:.2f} MiB |" for k, r in rows.items()]
    (OUT / "fa_autocast.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return payload


if __name__ == "__main__":
    main()
