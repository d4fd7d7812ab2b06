"""DiffoRA module selection (Jiang et al., arXiv 2502.08905) as a procedure of the shared training
engine: any core, both trainers.

Only the paper's abstract is public. It describes a Differential Adaptation Matrix (DAM) that
decides which modules get a low-rank adapter, built "via continuous relaxation and
discretization with weight sharing". Our reading, which this module implements:

- **The DAM** has one entry per candidate module m: every layer the method's targets match
  gets an adapter. Relaxed, the entry is a gate σ(β_m) ∈ (0, 1) with a learnable logit β_m
  that multiplies the module's adapter output: y = W x + σ(β_m)·ΔY_m(x). β_m starts at 0
  (σ = 1/2: no module preferred).
- **Warm-up** (``--select-warmup`` steps): gates and adapters train together on the training
  loss, first-order: one optimizer, one backward pass, no bilevel split and no held-out split;
  the gates at their own learning rate (``--gate-lr``) without weight decay.
- **Discretization**, at the end of the warm-up's last step: the entries become 0 or 1. The
  modules with the largest σ(β_m) are kept: the top ``--keep-ratio`` of them (rounded up), or,
  with ``--param-budget``, the best ones in gate order whose adapter parameters fit in the
  budget. Each trained part (UNet, text encoder) keeps at least its best module, so that no
  adapter file comes out empty. Ties break by module order: one seed, one selection.
- **Weight sharing**: the kept modules keep the adapter weights trained under the relaxation,
  with the gate folded in (ΔW ← σ(β_m)·ΔW, ``Core.scale_``), so the model computes the same
  just before and after the cut. The other modules' adapters are removed from the model, the
  optimizer (with their state) and therefore the saved file; training continues on the kept
  modules alone.

The selection (kept and dropped modules and every gate value) is printed, logged
(``gate/<module>`` while the gates train, ``modules_kept`` and ``adapter_params`` after the cut)
and stored in the adapter's metadata under ``diffora``. Cost: the warm-up trains adapters on
every candidate module plus one scalar each; after the cut, training and the adapter file
cost only the kept modules. One process only: removing modules mid-run is beyond
DistributedDataParallel.
"""

from __future__ import annotations

import math
import sys

import torch
from torch import nn
from tqdm.auto import tqdm

from ..adapters import remove
from ..adapters.base import Core
from ..configuration import ConfigError
from .common import adapted_modules, resolve_steps

GATE = "diffora.gate."  # checkpoint names of the gate logits: GATE + module key


class GatedCore(nn.Module):
    """A core whose output σ(β) scales, while DiffoRA's warm-up runs (the cut unwraps it: never saved)."""

    fuses_base = False

    def __init__(self, core: Core):
        super().__init__()
        self.core = core
        self.logit = nn.Parameter(torch.zeros((), device=next(core.parameters()).device))  # β: σ(0) = 1/2

    @property
    def rank(self) -> int:
        return self.core.rank

    def gate(self) -> torch.Tensor:
        return torch.sigmoid(self.logit)

    def delta(self, x: torch.Tensor) -> torch.Tensor:
        return self.core.delta(x) * self.gate()  # (..., d_out)

    def add_delta(self, y: torch.Tensor, x: torch.Tensor, weight: float) -> torch.Tensor:
        return y.add_(self.delta(x) * weight)


class DiffoRA:
    def __init__(self, models: dict[str, nn.Module], name: str, keep_ratio: float, param_budget: int | None, warmup: float, gate_lr: float):
        self.models, self.name = models, name
        self.keep_ratio, self.param_budget, self.warmup, self.gate_lr = keep_ratio, param_budget, warmup, gate_lr
        self.cut_step: int | None = None  # resolved against the run's --steps at set-up
        self.kept: list[str] | None = None
        self.gates: dict[str, float] = {}
        self._cut_logged = False

    def fingerprint(self) -> dict:
        return {"keep_ratio": self.keep_ratio, "param_budget": self.param_budget, "warmup": self.warmup, "gate_lr": self.gate_lr}

    # -- set-up: a gate on every candidate module ---------------------------------------------------

    def setup(self, engine) -> None:
        if engine.accelerator.num_processes > 1:
            raise ConfigError("--select diffora removes modules mid-run, which DistributedDataParallel does not allow: train on one process")
        self.cut_step = resolve_steps(self.warmup, engine.cfg.steps)
        modules = adapted_modules(self.models, self.name)
        self.part = {key: part for key, (part, _, _) in modules.items()}
        self.size = {key: sum(p.numel() for p in layer.cores[self.name].parameters() if p.requires_grad) for key, (_, _, layer) in modules.items()}
        if self.param_budget is not None:
            least = sum(min(n for k, n in self.size.items() if self.part[k] == part) for part in set(self.part.values()))
            if self.param_budget < least:
                raise ConfigError(f"--param-budget {self.param_budget} cannot hold one adapted module of each trained part "
                                  f"(at least {least} adapter parameters): raise it")
        gates = {}
        for key, (_, _, layer) in modules.items():
            gated = GatedCore(layer.cores[self.name])
            layer.cores[self.name] = gated
            gates[GATE + key] = gated.logit
        engine.add_parameters(gates, lr=self.gate_lr, weight_decay=0.0)
        if engine.is_main:
            rule = f"the best {self.n_keep()} (keep ratio {self.keep_ratio:g})" if self.param_budget is None else f"the best within {self.param_budget:,} parameters"
            print(f"DiffoRA: gates on {len(modules)} modules; at the end of step {self.cut_step} {rule} keep their adapters", file=sys.stderr)

    def n_keep(self) -> int:
        parts = len(set(self.part.values()))
        return max(parts, math.ceil(round(self.keep_ratio * len(self.size), 6)))

    def live_gates(self) -> dict[str, float]:
        return {key: float(layer.cores[self.name].gate().detach()) for key, (_, _, layer) in adapted_modules(self.models, self.name).items()}

    # -- the cut ------------------------------------------------------------------------------------

    def after_optimizer_step(self, engine, step: int) -> None:
        if step == self.cut_step:
            gates = self.live_gates()
            self._cut(engine, self.select(gates), gates)
            if engine.is_main:
                tqdm.write(self.report(), file=sys.stderr)

    def select(self, gates: dict[str, float]) -> list[str]:
        """The kept modules, best gate first: each part's best that fits, then the rest in gate order while they fit."""
        order = sorted(gates, key=lambda k: -gates[k])  # stable: equal gates keep module order
        kept: list[str] = []
        used = 0

        def fits(key: str, reserve: int) -> bool:
            if self.param_budget is None:
                return len(kept) < self.n_keep()
            return used + self.size[key] + reserve <= self.param_budget

        parts = list(dict.fromkeys(self.part[k] for k in gates))
        for i, part in enumerate(parts):
            # Leave room for the smallest module of every part still to be served.
            reserve = sum(min(n for k, n in self.size.items() if self.part[k] == later) for later in parts[i + 1 :])
            best = next(k for k in order if self.part[k] == part and fits(k, reserve))  # exists: checked at set-up
            kept.append(best)
            used += self.size[best]
        for key in order:
            if key not in kept and fits(key, 0):
                kept.append(key)
                used += self.size[key]
        return [k for k in order if k in kept]

    def _cut(self, engine, kept: list[str], gates: dict[str, float]) -> None:
        """Unwrap every gate: kept modules fold it into their adapter, the others leave model and optimizer."""
        modules = adapted_modules(self.models, self.name)
        dropped: set[int] = set()
        for key, (_, _, layer) in modules.items():
            core = layer.cores[self.name].core
            layer.cores[self.name] = core
            if key in kept:
                core.scale_(gates[key])
            else:
                dropped.update(id(p) for p in core.parameters())
        engine.drop_parameters([n for n, p in engine.named_params.items() if id(p) in dropped or n.startswith(GATE)])
        for part, model in self.models.items():
            paths = [path for key, (p, path, _) in modules.items() if p == part and key not in kept]
            if paths:
                remove(model, self.name, paths)
        self.kept, self.gates = list(kept), dict(gates)

    def report(self) -> str:
        total, kept = sum(self.size.values()), sum(self.size[k] for k in self.kept)
        rule = f"keep ratio {self.keep_ratio:g}" if self.param_budget is None else f"budget {self.param_budget:,}"
        lines = [f"DiffoRA selection at step {self.cut_step}: kept {len(self.kept)} of {len(self.gates)} modules, "
                 f"{kept:,} of {total:,} adapter parameters ({rule})", "   gate  module"]
        for key in sorted(self.gates, key=lambda k: -self.gates[k]):
            lines.append(f"  {self.gates[key]:.3f}  {'kept   ' if key in self.kept else 'dropped'}  {key}")
        return "\n".join(lines)

    # -- logs, checkpoints, the adapter file ------------------------------------------------------

    def log_values(self) -> dict:
        if self.kept is None:
            return {f"gate/{k}": v for k, v in self.live_gates().items()}
        values = {"modules_kept": len(self.kept), "adapter_params": sum(self.size[k] for k in self.kept)}
        if not self._cut_logged:  # the first line after the cut also holds the gates it was made from
            values.update({f"gate/{k}": v for k, v in self.gates.items()})
            self._cut_logged = True
        return values

    def state_dict(self) -> dict:
        return {"cut_step": self.cut_step, "kept": self.kept, "gates": self.gates}

    def load_state_dict(self, state: dict, engine) -> None:
        self.cut_step = int(state["cut_step"])  # as planned when the run began, whatever --steps is now
        if state["kept"] is not None:
            self._cut(engine, state["kept"], state["gates"])
            self._cut_logged = True
            if engine.is_main:
                print(f"DiffoRA: the selection of step {self.cut_step} is restored ({len(self.kept)} of {len(self.gates)} modules kept)", file=sys.stderr)

    def metadata(self) -> dict:
        dropped = [k for k in sorted(self.gates, key=lambda k: -self.gates[k]) if k not in self.kept]
        return {"diffora": {
            "selected_at_step": self.cut_step, "keep_ratio": self.keep_ratio if self.param_budget is None else None,
            "param_budget": self.param_budget, "kept": self.kept, "dropped": dropped, "gates": self.gates,
            "adapter_params": sum(self.size[k] for k in self.kept), "adapter_params_before": sum(self.size.values()),
        }}
