"""An exponential moving average (EMA) of the trained weights, as a procedure of the shared engine.

After optimizer step t the average moves toward the weights: ``avg ← d·avg + (1 − d)·θ`` with
``d = min(decay, (1 + t) / (10 + t))``: the warm-up keeps the first steps' random weights from
dominating a short run's average. It covers the tensors the run trains at set-up (the engine's
``named_params``), is kept in float32 on the parameters' device, goes into every checkpoint (a
resumed run continues the same average bit for bit) and is read back with ``averaged()`` or
``read(checkpoint_state)``: a diffusion base is sampled with its averaged weights.
"""

from __future__ import annotations

import torch


class EMA:
    def __init__(self, decay: float):
        if not 0 <= decay < 1:
            raise ValueError(f"EMA decay must satisfy 0 <= decay < 1, got {decay}")
        self.decay = decay
        self.shadow: dict[str, torch.Tensor] = {}
        self._params: dict[str, torch.nn.Parameter] = {}

    def fingerprint(self) -> dict:
        return {"decay": self.decay}

    def setup(self, engine) -> None:
        self._params = dict(engine.named_params)
        self.shadow = {k: p.detach().float().clone() for k, p in self._params.items()}

    def rate(self, step: int) -> float:
        """The decay d applied after optimizer step `step` (1-based)."""
        return min(self.decay, (1 + step) / (10 + step))

    @torch.no_grad()
    def after_optimizer_step(self, engine, step: int) -> None:
        d = self.rate(step)
        for k, p in self._params.items():
            self.shadow[k].lerp_(p.detach().float(), 1 - d)

    def averaged(self) -> dict[str, torch.Tensor]:
        """The averaged tensors by the engine's parameter names."""
        return self.shadow

    def state_dict(self) -> dict:
        return {"decay": self.decay, "shadow": {k: v.detach().cpu().clone() for k, v in self.shadow.items()}}

    def load_state_dict(self, state: dict, engine) -> None:
        missing = sorted(set(self._params) - set(state["shadow"]))
        if missing:
            raise ValueError(f"the checkpoint's EMA lacks {', '.join(missing[:3])}: it was written for other trained tensors")
        for k, p in self._params.items():
            self.shadow[k] = state["shadow"][k].to(device=p.device, dtype=torch.float32).clone()

    @staticmethod
    def read(checkpoint: dict) -> dict[str, torch.Tensor]:
        """The averaged tensors stored in a checkpoint written by an engine run with this procedure."""
        try:
            return checkpoint["procedures"][EMA.__name__]["shadow"]
        except KeyError:
            raise ValueError("the checkpoint holds no EMA weights (its run had no EMA procedure)") from None
