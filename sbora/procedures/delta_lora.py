"""Delta-LoRA (Zi et al., "Delta-LoRA: Fine-Tuning High-Rank Parameters with the Delta of Low-Rank
Matrices", arXiv 2309.02411) as a procedure of the shared training engine: any core, both trainers.

After each optimizer step t > K the paper moves the frozen weight by λ·s·(B_t A_t − B_{t−1}A_{t−1}),
which telescopes to W_t = W_0 + λ·s·(B_t A_t − B_K A_K) (docs/architecture.md §3). The adapter cores with
``AdapterConfig.delta`` (``adapters/delta.py``) carry that sum as a branch with detached current
factors, so this procedure has one thing to do: at the end of step K (at set-up when K = 0) it
gives every core its factors of that moment and λ. W itself is never written and gets no
gradient and no optimizer state; a checkpoint holds K and the step-K factors, so a resumed run
continues bit for bit; the adapter file holds them as well (rank ≤ 2k, never a dense ΔW).

What it changes: from step K on, every adapted weight also moves with the adapter's own
updates, λ-fold (the paper: λ = 2 on E2E, 0.5 on GLUE; K = 500 steps of runs many thousands
long), so the total update is no longer confined to the span of the final B A. Any core with
exact ``lora_factors()``: with SBoRA-FA the move stays in its r columns. What it costs: from
K on, one rank-2k product more per adapted layer and pass (no gradient state), and A_K, B_K
per layer in memory, checkpoints and the adapter file. The branch takes no dropout (refused).
"""

from __future__ import annotations

import sys

from torch import nn

from ..adapters.delta import DeltaLoRAMixin
from .common import adapted_modules, resolve_steps


class DeltaLoRA:
    def __init__(self, models: dict[str, nn.Module], name: str, lam: float, start: float):
        self.models, self.name, self.lam, self.start = models, name, lam, start
        self.start_step: int | None = None  # K, resolved against the run's --steps at set-up
        self.started = False

    def fingerprint(self) -> dict:
        return {"lambda": self.lam, "start": self.start}

    def cores(self) -> dict[str, DeltaLoRAMixin]:
        cores = {key: layer.cores[self.name] for key, (_, _, layer) in adapted_modules(self.models, self.name).items()}
        plain = [key for key, core in cores.items() if not isinstance(core, DeltaLoRAMixin)]
        if plain:
            raise TypeError(f"Delta-LoRA needs adapters built with delta=True; {plain[0]} holds a {type(cores[plain[0]]).__name__}")
        return cores

    def setup(self, engine) -> None:
        self.start_step = resolve_steps(self.start, engine.cfg.steps)
        if engine.is_main:
            print(f"Delta-LoRA: from step {self.start_step} on, the frozen weights move by λ·(ΔW_t − ΔW_K), λ = {self.lam:g}",
                  file=sys.stderr)
        if self.start_step == 0 and engine.resume_state is None:  # a resumed run gets its factors from the checkpoint
            self._start()

    def after_optimizer_step(self, engine, step: int) -> None:
        if step == self.start_step:
            self._start()

    def _start(self) -> None:
        for core in self.cores().values():
            core.start_delta(self.lam)
        self.started = True

    def log_values(self) -> dict:
        """``weight_shift``: ‖W_t − W_0‖_F over all adapted layers (0 before K)."""
        shifts = [core.weight_shift() for core in self.cores().values()] if self.started else [0.0]
        return {"weight_shift": sum(v * v for v in shifts) ** 0.5}

    def state_dict(self) -> dict:
        factors = {key: {"A_K": core.A_K.detach().cpu().clone(), "B_K": core.B_K.detach().cpu().clone()}
                   for key, core in self.cores().items()} if self.started else {}
        return {"start_step": self.start_step, "started": self.started, "factors": factors}

    def load_state_dict(self, state: dict, engine) -> None:
        self.start_step = int(state["start_step"])  # K as planned when the run began, whatever --steps is now
        if state["started"]:
            cores = self.cores()
            for key, core in cores.items():
                saved = state["factors"][key]
                core.start_delta(self.lam, saved["A_K"], saved["B_K"])
            self.started = True

    def metadata(self) -> dict:
        """Into the adapter file's metadata (the tensors A_K, B_K and λ are in the file itself)."""
        return {"delta_lora": {"lambda": self.lam, "start_step": self.start_step, "started": self.started}}

