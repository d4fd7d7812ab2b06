"""A toy trainer on the shared engine (a linear model, data drawn from the engine's generator,
dropout drawn from torch's global RNG), for the engine's tests; also runnable under torchrun:

    python -m torch.distributed.run --nproc_per_node 2 tests/engine_toy.py OUT STEPS
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from sbora.engine import Engine, EngineConfig


def toy_config(out, **kw) -> EngineConfig:
    fields = dict(steps=6, lr=0.05, lr_schedule="cosine", warmup_steps=2, checkpoint_every=2, log_every=1, output_dir=str(out))
    fields.update(kw)
    return EngineConfig(**fields)


def toy_train(cfg: EngineConfig, resume=False, procedures=(), on_loss=None, stop_event=None, make_engine=Engine, after_run=None) -> dict:
    """Train a Linear(4, 3) to map x to x[:3]; returns {"weights", "losses", "out", "engine"}.

    `on_loss(micro)` runs inside every micro-batch's loss; a number it returns multiplies the loss.
    `after_run()` runs after the loop, while the trainer writes its files (e.g. a Ctrl-C there)."""
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 3)
    engine = make_engine(cfg, cfg.output_dir, resume=resume, stop_event=stop_event)
    try:
        (prepared,) = engine.prepare(model)
        engine.setup(dict(model.named_parameters()), [{"params": list(model.parameters())}], fingerprint={"toy": 1}, procedures=procedures)

        def loss_fn(micro):
            x = torch.randn(8, 4, generator=micro.generator)
            factor = on_loss(micro) if on_loss is not None else None  # a hook may scale the loss (e.g. by NaN)
            loss = (prepared(F.dropout(x, 0.2)) - x[:, :3]).square().mean()
            return loss if factor is None else loss * factor

        state = engine.run(loss_fn)
        if after_run is not None:
            after_run()
        if engine.is_main:
            save_file({k: v.detach().contiguous() for k, v in model.state_dict().items()}, str(engine.run_dir / "weights.safetensors"))
        out = engine.finish()
    except BaseException as e:
        engine.abort(e)  # a Ctrl-C after the last step: TrainingInterrupted (finish with --resume)
        raise
    weights = load_file(str(Path(out) / "weights.safetensors"))
    return {"weights": weights, "losses": state.losses, "out": Path(out), "engine": engine}


if __name__ == "__main__":
    # Each process reports in a file of its own (several processes printing to one pipe interleave).
    run = toy_train(toy_config(sys.argv[1], steps=int(sys.argv[2]), checkpoint_every=0))
    acc = run["engine"].accelerator
    report = Path(sys.argv[3]) / f"process-{acc.process_index}.json"
    report.write_text(json.dumps({"process": acc.process_index, "of": acc.num_processes}))
