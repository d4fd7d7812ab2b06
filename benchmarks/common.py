"""Measuring helpers shared by the benchmark scripts (not tests: nothing here asserts a time).

The machines these run on are shared and noisy, so times are only ever reported as ratios
against peft's LoRA measured in the same round, with the methods interleaved and the median
over rounds; everything that can be counted exactly (parameters, optimizer-state bytes,
bytes saved for backward, bytes allocated) is counted instead of timed.

- ``add_method`` puts one method on a model: ``peft-lora`` / ``peft-dora`` through peft's
  own ``inject_adapter_in_model``, ``floor`` (a zero trainable bias on each targeted layer:
  what the base forward+backward costs with no adapter work at all), or any of our cores.
- ``SavedTensorMeter`` counts the storages autograd saves for backward *inside the adapter
  branches only*: pack hooks are always on, and a depth counter driven by forward hooks on
  each adapter wrapper says whether a saved tensor was saved inside one. Parameter and buffer
  storages are not activations and are skipped, so a frozen base layer inside the wrapper
  adds nothing (its linear saves only its weight); each storage counts once, at its full size
  (a saved view keeps its whole storage). No hook goes on the base layers themselves: a
  hooked base layer must be called, which would turn off SBoRA-FA's fused base+branch op.
- ``peak_step_bytes`` is the peak of torch's CPU allocator during one call, relative to its
  start, read from the profiler's allocation events (deterministic, unlike RSS).
- ``capture_layer_inputs`` + ``layer_step`` isolate the adapted layers: forward and backward
  of every targeted layer (base + branch, input gradient included) on the inputs the model
  gave them, plus the optimizer step. On the SD UNet peft LoRA adds ~1-2% to a whole step,
  below the whole-step noise; on the layers alone the difference is resolved.
- ``interleaved_times`` runs one step per variant per round, rotating the order each round,
  and records both the process CPU time and the wall time of each step. With one torch
  thread the CPU time is the work the step did, nearly blind to other processes on the
  machine; the wall time of a 2-thread step on 2 shared cores swung by 4× here.
"""

from __future__ import annotations

import copy
import gc
import json
import math
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

from sbora.adapters import AdaptedLinear, AdapterConfig, inject, match_targets
from sbora.adapters.registry import METHOD_SPECS, REFERENCE_METHOD, methods_where, peft_baseline
from sbora.cli import Command, Section, parse, run_main
from sbora.configuration import ConfigError
from sbora.fileio import atomic_path, write_json, write_text

REFERENCE = peft_baseline(REFERENCE_METHOD)  # peft-lora: every time is a ratio to this method, measured in the same round
FLOOR = "floor"
OUR_METHODS = methods_where(base=None, low_rank=True)  # the registry's low-rank cores: lora, sbora-fa, sbora-fb, ortho, difflora
COST_METHODS = [REFERENCE, *OUR_METHODS, FLOOR]
DOCS_DIR = Path(__file__).resolve().parent.parent / "docs" / "benchmarks"
FIGURE_EVERY = 60.0  # seconds between redraws of a running benchmark's figure (its JSON and markdown: every save)


class BiasFloor(nn.Module):
    """The cheapest possible trainable branch: ``base_layer(x) + b`` with b a zero vector.

    Training only these biases makes autograd run the whole base backward (input gradients
    down to the first targeted layer) but no adapter math: the floor under every method."""

    def __init__(self, base_layer: nn.Linear):
        super().__init__()
        self.base_layer = base_layer
        self.bias = nn.Parameter(torch.zeros(base_layer.out_features, device=base_layer.weight.device, dtype=base_layer.weight.dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base_layer(x) + self.bias  # (..., d_out)


def _is_branch_wrapper(module: nn.Module) -> bool:
    from peft.tuners.lora.layer import LoraLayer

    return isinstance(module, (AdaptedLinear, BiasFloor, LoraLayer)) and hasattr(module, "base_layer")


def clone_sharing_weights(model: nn.Module) -> nn.Module:
    """A structural copy of a frozen model that shares every parameter and buffer tensor,
    so several methods can sit on one base at once (one base's memory, not one per method)."""
    memo = {id(t): t for t in [*model.parameters(), *model.buffers()]}
    return copy.deepcopy(model, memo)


def add_method(model: nn.Module, method: str, rank: int, targets: list[str], seed: int = 0) -> list[nn.Parameter]:
    """Put `method` on every targeted linear layer of a frozen `model` (s = alpha/r = 1 for all);
    returns the trainable parameters."""
    model.requires_grad_(False)
    spec = METHOD_SPECS.get(method)
    if spec is not None and spec.peft_backed:  # peft-lora, peft-dora (the registry's peft options)
        from peft import LoraConfig, inject_adapter_in_model

        torch.manual_seed(seed)  # peft draws its Kaiming A from the global generator
        cfg = LoraConfig(r=rank, lora_alpha=rank, lora_dropout=0.0, target_modules=targets, **spec.peft_config)
        inject_adapter_in_model(cfg, model)
    elif method == FLOOR:
        cfg = AdapterConfig(method=REFERENCE_METHOD, rank=1, targets=targets)  # only for its target matching
        for path in match_targets(model, cfg):
            parent, _, child = path.rpartition(".")
            holder = model.get_submodule(parent) if parent else model
            setattr(holder, child, BiasFloor(getattr(holder, child)))
    else:
        inject(model, AdapterConfig(method=method, rank=rank, alpha=float(rank), targets=targets, seed=seed))
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise RuntimeError(f"{method} put no trainable parameter on targets {targets}")
    return params


def parameter_count(params: list[nn.Parameter]) -> int:
    return sum(p.numel() for p in params)


def optimizer_state_bytes(optimizer: torch.optim.Optimizer) -> int:
    """Bytes of every tensor in the optimizer's state (AdamW: exp_avg, exp_avg_sq, step)."""
    return sum(t.nbytes for state in optimizer.state.values() for t in state.values() if torch.is_tensor(t))


def _storage(t: torch.Tensor) -> tuple[int, int]:
    s = t.untyped_storage()
    return s.data_ptr(), s.nbytes()


class SavedTensorMeter:
    """Storages autograd saves for backward inside adapter branches vs. everywhere else.

    Use around a forward pass (the backward may run outside). ``branch_bytes`` is what the
    branches save; ``branch_only_bytes`` the part no other op of the model also saves (the
    memory the branches really add; e.g. LoRA's saved input may be an activation the base
    keeps anyway)."""

    def __init__(self, model: nn.Module):
        self.wrappers = [m for m in model.modules() if _is_branch_wrapper(m)]
        if not self.wrappers:
            raise ValueError("the model has no adapter branch to measure (no AdaptedLinear, peft LoRA layer or floor)")
        self.weights = {_storage(t)[0] for t in [*model.parameters(), *model.buffers()]}
        self.branch: dict[int, int] = {}  # storage pointer -> bytes
        self.elsewhere: dict[int, int] = {}
        self.depth = 0
        self._handles: list = []
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, lambda t: t)

    def _pack(self, t: torch.Tensor) -> torch.Tensor:
        ptr, nbytes = _storage(t)
        if ptr not in self.weights and nbytes:
            (self.branch if self.depth > 0 else self.elsewhere)[ptr] = nbytes
        return t

    def _shift(self, by: int) -> Callable:
        def hook(*_):
            self.depth += by

        return hook

    def __enter__(self) -> SavedTensorMeter:
        for w in self.wrappers:  # inside a wrapper: branch (its frozen base saves only weights)
            self._handles += [w.register_forward_pre_hook(self._shift(+1)), w.register_forward_hook(self._shift(-1))]
        self._hooks.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self._hooks.__exit__(*exc)
        for h in self._handles:
            h.remove()
        self._handles.clear()

    @property
    def branch_bytes(self) -> int:
        return sum(self.branch.values())

    @property
    def branch_only_bytes(self) -> int:
        return sum(n for p, n in self.branch.items() if p not in self.elsewhere)

    @property
    def other_bytes(self) -> int:
        return sum(self.elsewhere.values())


@contextmanager
def peak_step_bytes() -> Iterator[dict[str, int]]:
    """Peak bytes held by torch's CPU allocator inside the block, relative to its start.

    Sums the signed sizes of the profiler's allocation events in time order; frees of tensors
    allocated before the block count too (they lower the level)."""
    from torch._C._profiler import _EventType
    from torch.profiler import ProfilerActivity, profile

    out: dict[str, int] = {}
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        yield out
    sizes: list[tuple[int, int]] = []
    stack = list(prof.profiler.kineto_results.experimental_event_tree())
    while stack:
        e = stack.pop()
        if e.tag == _EventType.Allocation:
            sizes.append((e.start_time_ns, e.extra_fields.alloc_size))
        stack.extend(e.children)
    level = peak = 0
    for _, n in sorted(sizes):
        level += n
        peak = max(peak, level)
    out.update(peak_bytes=peak, end_bytes=level)


@dataclass
class Variant:
    """One method on one (shared-weight) copy of the base, with its own optimizer."""

    name: str
    model: nn.Module
    params: list[nn.Parameter]
    optimizer: torch.optim.Optimizer
    cpu: list[float] = field(default_factory=list)  # process CPU seconds per timed step
    wall: list[float] = field(default_factory=list)  # wall seconds per timed step
    layer_cpu: list[float] = field(default_factory=list)  # CPU seconds per layer-only step


def train_step(variant: Variant, loss_fn: Callable[[nn.Module], torch.Tensor]) -> None:
    """forward + backward + optimizer step; appends its CPU and wall time to the variant."""
    gc.collect()  # not inside the timed region
    wall, cpu = time.perf_counter(), time.process_time()
    loss = loss_fn(variant.model)
    loss.backward()
    variant.optimizer.step()
    variant.optimizer.zero_grad(set_to_none=True)
    variant.cpu.append(time.process_time() - cpu)
    variant.wall.append(time.perf_counter() - wall)


def measure_step(variant: Variant, loss_fn: Callable[[nn.Module], torch.Tensor]) -> dict[str, int]:
    """The variant's first (untimed) step: counts branch-saved bytes and the peak allocation of
    forward+backward (activations, gradients, temporaries; the optimizer's state is counted
    on its own, and AdamW's first step only adds that state, after backward has freed the
    activations), then takes the optimizer step."""
    gc.collect()
    meter = SavedTensorMeter(variant.model)
    with peak_step_bytes() as peak:
        with meter:
            loss = loss_fn(variant.model)
        loss.backward()
    variant.optimizer.step()
    variant.optimizer.zero_grad(set_to_none=True)
    return {
        "trainable_parameters": parameter_count(variant.params),
        "optimizer_state_bytes": optimizer_state_bytes(variant.optimizer),
        "branch_saved_bytes": meter.branch_bytes,
        "branch_only_saved_bytes": meter.branch_only_bytes,
        "other_saved_bytes": meter.other_bytes,
        "peak_step_bytes": peak["peak_bytes"],
    }


def capture_layer_inputs(variant: Variant, loss_fn: Callable[[nn.Module], torch.Tensor]) -> dict[str, torch.Tensor]:
    """Module path -> the input each adapter wrapper of `variant` saw in one forward pass."""
    inputs: dict[str, torch.Tensor] = {}
    handles = [
        m.register_forward_pre_hook(lambda mod, args, p=p: inputs.setdefault(p, args[0].detach().clone()))
        for p, m in variant.model.named_modules()
        if _is_branch_wrapper(m)
    ]
    try:
        with torch.no_grad():
            loss_fn(variant.model)
    finally:
        for h in handles:
            h.remove()
    return inputs


def random_cotangents(model: nn.Module, inputs: dict[str, torch.Tensor], seed: int) -> dict[str, torch.Tensor]:
    """Module path -> a seeded random output gradient (..., d_out) for each captured layer input."""
    g = torch.Generator().manual_seed(seed)
    return {p: torch.randn(*x.shape[:-1], model.get_submodule(p).base_layer.out_features, generator=g) for p, x in inputs.items()}


def layer_step(variant: Variant, inputs: dict[str, torch.Tensor], grads: dict[str, torch.Tensor]) -> None:
    """Forward + backward of the adapted layers alone (cotangents `grads`, input gradients
    included, as in training) and the optimizer step; appends its CPU time."""
    layers = {p: variant.model.get_submodule(p) for p in inputs}
    leaves = {p: x.requires_grad_() for p, x in inputs.items()}
    gc.collect()
    cpu = time.process_time()
    outs = [layers[p](x) for p, x in leaves.items()]  # each (..., d_out)
    torch.autograd.backward(outs, [grads[p] for p in leaves])
    variant.optimizer.step()
    variant.optimizer.zero_grad(set_to_none=True)
    variant.layer_cpu.append(time.process_time() - cpu)
    for x in leaves.values():
        x.grad = None


def interleaved_times(variants: list[Variant], step: Callable[[Variant], None], repeats: int, desc: str) -> None:
    """`repeats` rounds of one `step(variant)` per variant, the order rotated by one each round
    so that no method always runs right after the same other one."""
    bar = tqdm(total=repeats * len(variants), desc=desc)
    for k in range(repeats):
        for v in variants[k % len(variants) :] + variants[: k % len(variants)]:
            step(v)
            bar.update()
    bar.close()


def _per_round(variants: list[Variant], attr: str, fn: Callable[[float, float, float], float]) -> dict[str, list[float]]:
    """fn(method's time, peft LoRA's, floor's) per round, from the `attr` time lists."""
    ref = getattr(next(v for v in variants if v.name == REFERENCE), attr)
    floor = getattr(next(v for v in variants if v.name == FLOOR), attr) if any(v.name == FLOOR for v in variants) else ref
    return {v.name: [fn(t, r, f) for t, r, f in zip(getattr(v, attr), ref, floor, strict=True)] for v in variants}


def time_ratios(variants: list[Variant]) -> dict[str, dict[str, float | list[float]]]:
    """Per method, medians over rounds of per-round ratios to peft LoRA's time in the same round:
    whole step on CPU time (with its spread) and on wall time; the adapted layers alone; and
    the overhead over the floor relative to peft LoRA's, (t - t_floor) / (t_peft - t_floor),
    on the layers alone (where it is resolved) and on the whole step."""
    ratio = _per_round(variants, "cpu", lambda t, r, f: t / r)
    wall = _per_round(variants, "wall", lambda t, r, f: t / r)
    overhead = _per_round(variants, "cpu", lambda t, r, f: (t - f) / (r - f) if r != f else float("nan"))
    out: dict[str, dict[str, float | list[float]]] = {}
    for v in variants:
        row = out[v.name] = {
            "ratio_median": statistics.median(ratio[v.name]), "ratio_min": min(ratio[v.name]), "ratio_max": max(ratio[v.name]),
            "wall_ratio_median": statistics.median(wall[v.name]), "step_overhead_vs_peft": statistics.median(overhead[v.name]),
            "cpu_seconds_median": statistics.median(v.cpu), "wall_seconds_median": statistics.median(v.wall),
            "ratios": ratio[v.name], "wall_ratios": wall[v.name],
        }
        if v.layer_cpu:
            layer = _per_round(variants, "layer_cpu", lambda t, r, f: t / r)[v.name]
            layer_over = _per_round(variants, "layer_cpu", lambda t, r, f: (t - f) / (r - f) if r != f else float("nan"))[v.name]
            row.update(layer_ratio_median=statistics.median(layer), overhead_vs_peft=statistics.median(layer_over),
                       layer_cpu_seconds_median=statistics.median(v.layer_cpu))
    return out


@dataclass
class Invocation:
    preset: str
    config: object
    command: str  # as typed, for the results files
    stem: str  # results file name: <name> for the quick preset, <name>_<preset> otherwise


def benchmark_command(name: str, doc: str, config_cls: type, presets: dict[str, dict]) -> Command:
    """The command line of ``python -m benchmarks.<name>`` on the command frame (``sbora/cli.py``): ``--preset`` plus
    one option per config field (the preset's values, then the command line's)."""

    def preset(chosen: str) -> tuple[dict, str]:
        if chosen not in presets:
            raise ConfigError(f"unknown preset '{chosen}'; choose {' or '.join(sorted(presets))}")
        return presets[chosen], f"from preset {chosen}"

    return Command(f"python -m benchmarks.{name}", doc, sections=(
        Section("benchmark", config_cls, title="benchmark options (override the preset)", option="preset", default="quick", load=preset,
                option_help=f"{' or '.join(sorted(presets))} defaults"),))


def parse_invocation(name: str, doc: str, config_cls: type, presets: dict[str, dict], argv: list[str] | None) -> Invocation:
    """The benchmark's command line (``benchmark_command``); a bad option or value exits 2 with one line."""
    argv = sys.argv[1:] if argv is None else list(argv)
    parsed = []
    code = run_main(lambda args: parsed.append(parse(benchmark_command(name, doc, config_cls, presets), args)), argv)
    if code:
        raise SystemExit(code)
    chosen, config = parsed[0].args.preset, parsed[0].configs["benchmark"]
    if config.threads:
        torch.set_num_threads(config.threads)
    return Invocation(chosen, config, f"python -m benchmarks.{name} {' '.join(argv)}".strip(), name if chosen == "quick" else f"{name}_{chosen}")


def environment() -> dict[str, object]:
    """What the numbers were measured on, stored next to them."""
    import diffusers
    import peft
    import transformers

    return {
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "machine": platform.machine(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "load_average": list(os.getloadavg()),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "diffusers": diffusers.__version__,
        "transformers": transformers.__version__,
        "peft": peft.__version__,
    }


def write_results(name: str, payload: dict, markdown: str, figure, out_dir: Path = DOCS_DIR) -> list[Path]:
    """docs/benchmarks/<name>.{json,md,png}, each written atomically (the png only when `figure` is given)."""
    paths = [out_dir / f"{name}.{ext}" for ext in ("json", "md", "png")]
    write_json(paths[0], payload, indent=1)
    write_text(paths[1], markdown)
    if figure is None:
        return paths[:2]
    with atomic_path(paths[2]) as tmp:
        figure.savefig(tmp, format="png", dpi=120, bbox_inches="tight")
    import matplotlib.pyplot as plt

    plt.close(figure)  # a run in units saves after every unit: hundreds of figures otherwise stay open
    return paths


def targets_table(checks: list[tuple[str, bool, str]]) -> list[str]:
    """Markdown lines of a benchmark's targets: one row per (target, met, measured)."""
    return ["| target | met | measured |", "|---|---|---|", *(f"| {name} | {'yes' if ok else 'no'} | {text} |" for name, ok, text in checks)]


def run_benchmark(
    name: str, doc: str, config_cls: type, presets: dict[str, dict], argv: list[str] | None,
    measure: Callable[[object, dict, Callable[[], None]], None], markdown: Callable[[dict], str], figure: Callable[[dict], object],
    targets: Callable[[dict], list[tuple[str, bool, str]]] | None = None,
) -> dict:
    """Parse the command line, then ``measure(config, results, save)``, which fills ``results`` and
    calls ``save()`` after each part, so a long run that stops keeps what it measured (marked
    partial). Writes ``<out_dir or docs/benchmarks>/<stem>.{json,md,png}``, prints each of
    ``targets(results)`` as met or MISSED, and returns the payload."""
    inv = parse_invocation(name, doc, config_cls, presets, argv)
    t0 = time.time()
    payload = {"config": {"preset": inv.preset, **asdict(inv.config)}, "environment": environment(), "command": inv.command, "results": {}}
    drawn = -math.inf  # when the figure was last drawn

    def save(final: bool = False) -> None:
        nonlocal drawn
        payload["complete"] = final and not payload["results"].get("pending")  # a resumable run's merge may leave units to do
        payload["seconds"], payload["cpu_seconds"] = time.time() - t0, time.process_time()
        payload["environment"]["load_average_end"] = list(os.getloadavg())
        # The figure at most once every FIGURE_EVERY seconds until the end: the standard quality run's finished figure takes
        # 2.3 s to draw (up to 27 min over its 692 units), and JSON and markdown already keep what a stopped run measured.
        draw = final or time.time() - drawn >= FIGURE_EVERY
        drawn = time.time() if draw else drawn
        paths = write_results(inv.stem, payload, markdown(payload), figure(payload) if draw else None, Path(inv.config.out_dir or DOCS_DIR))
        if final:
            print("wrote " + ", ".join(map(str, paths)))
            payload["written"] = [str(p) for p in paths]  # for a caller that writes more beside them

    measure(inv.config, payload["results"], save)
    save(final=True)
    for what, ok, got in targets(payload["results"]) if targets else []:
        print(f"{'met   ' if ok else 'MISSED'} {what}: {got}")
    return payload


# ---------------------------------------------------------------------------- resumable runs in units (LLM benchmarks)


def parse_worker(text: str) -> tuple[int, int]:
    """``"k/n"`` -> (k, n): worker k of n, 0 <= k < n."""
    try:
        k, n = (int(x) for x in text.split("/"))
    except ValueError:
        raise ConfigError(f"--worker takes K/N (worker K of N, counted from 0), e.g. 0/2; got '{text}'") from None
    if not 0 <= k < n:
        raise ConfigError(f"--worker {text}: K must be in 0..N-1")
    return k, n


class UnitStore:
    """The finished units of a resumable benchmark: one JSON file per unit in `folder`, written
    atomically by the one worker that owns the unit (so no two processes ever write one file).

    Every file carries `protocol` (the settings all units of one run share: steps, data
    sizes...); reading a file of another protocol is an error, so a changed setting never
    mixes with old results silently. `implied`: what a key added to the protocol later meant
    for the files written before it (they lack it)."""

    def __init__(self, folder: str | Path, protocol: dict, implied: dict | None = None):
        self.folder, self.protocol, self.implied = Path(folder), protocol, implied or {}

    def path(self, key: str) -> Path:
        return self.folder / f"{key}.json"

    def load(self, key: str) -> dict | None:
        path = self.path(key)
        if not path.is_file():
            return None
        data = json.loads(path.read_text())
        theirs = self.implied | (data.get("protocol") or {})
        if theirs != self.protocol:
            diff = ", ".join(f"{k} {theirs.get(k)} (now {self.protocol.get(k)})" for k in sorted({*theirs, *self.protocol}) if theirs.get(k) != self.protocol.get(k))
            raise ConfigError(f"{path} belongs to a run with other settings: {diff}; use another --work-dir, or that run's settings")
        return data["result"]

    def save(self, key: str, result: dict) -> None:
        write_json(self.path(key), {"protocol": self.protocol, "result": result}, indent=None)


def run_units(units: list, worker: tuple[int, int], is_done: Callable[[object], bool], ready: Callable[[object], bool],
              do: Callable[[object], None], wait_seconds: float = 60, sleep: Callable[[float], None] = time.sleep) -> list:
    """Run worker k of n's share of `units` (every n-th, from the k-th: the schedule's order,
    e.g. seed-major, is kept within each worker), skipping those already done. A unit whose
    inputs another worker has not finished (`ready` false) is passed over until it is ready;
    when only such units are left, wait `wait_seconds` between looks. Returns the units run."""
    k, n = worker
    mine, ran, said = units[k::n], [], None
    while True:
        pending = [u for u in mine if not is_done(u)]
        if not pending:
            return ran
        unit = next((u for u in pending if ready(u)), None)
        if unit is None:
            if said != pending:
                print(f"worker {k}/{n}: waiting for other workers' units before {', '.join(map(str, pending))}", flush=True)
                said = pending
            sleep(wait_seconds)
            continue
        do(unit)
        if not is_done(unit):
            raise RuntimeError(f"unit {unit} ran but is still not done: a bug in the benchmark's bookkeeping")
        ran.append(unit)


def mib(n: float) -> str:
    return f"{n / 2**20:.2f}"


def run_resumable(config, res: dict, save: Callable[[], None], collect: Callable, schedule: Callable, start: Callable) -> None:
    """``--worker K/N`` of a benchmark in units: this worker's share of `schedule(config)`, done by the worker that
    ``start(config, sched, k)`` returns (its ``do(unit)``; it loads what the units share once), the report
    (`collect(config)`) saved after each unit; ``--merge``: the report only."""
    config.validate()
    if config.merge:
        res.update(collect(config))
        return
    k, n = parse_worker(config.worker)
    if n > 1 and not config.out_dir:  # one writer per file: the published report comes from --merge
        config.out_dir = str(Path(config.work_dir) / f"report-worker{k}")
    sched = schedule(config)
    doer = start(config, sched, k)

    def report() -> None:
        res.clear()
        res.update(collect(config))
        save()

    report()
    run_units(sched.units, (k, n), sched.is_done, sched.ready, lambda unit: (doer.do(unit), report()))
    res.clear()
    res.update(collect(config))


def llm_start(make: Callable) -> Callable:
    """The LLM benchmarks' `start` for ``run_resumable``: the base model and tokenizer loaded once, on CUDA when present
    (unless ``--cpu``), then ``make(config, sched, base, tokenizer, device_name, k)``."""

    def start(config, sched, k: int):
        from llm.models import load_base

        device = torch.device("cuda" if torch.cuda.is_available() and not config.cpu else "cpu")
        base, tokenizer = load_base()
        base.requires_grad_(False).to(device)
        return make(config, sched, base, tokenizer, torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU", k)

    return start
