"""The one training loop, shared by the concept trainer, the LLM trainer and the pocket world's pretraining.

A training run is a ``Task`` (its models, data, loss and what it saves) given to ``fit``:

    state, engine = fit(task, cfg, out_dir, resume=...)

``fit`` drives the engine; the engine's own steps, which ``fit`` runs in this order:

    engine = Engine(cfg, out_dir, resume=...)      # checks the output folder and the checkpoint first
    unet, te = engine.prepare(unet, te)            # accelerate: device, DDP, mixed precision
    engine.setup(named_params, groups, fingerprint)  # optimizer, schedule, resume, .partial/ opened
    state = engine.run(loss_fn)                    # loss_fn(Micro) -> loss of one micro-batch
    ... write the adapter etc. into engine.run_dir ...
    engine.finish()                                # publish the run's files into the output folder

What it owns (HF Trainer / accelerate's examples, in one small place):

- **accelerate** set-up, mixed precision (``auto``: bf16, else fp16, on CUDA; off on the CPU)
  and its gradient scaler, gradient accumulation, clipping, AdamW (or 8-bit AdamW);
- **the learning-rate schedule**, stepped once per optimizer step (never handed to accelerate,
  whose wrapper steps it once per process), so its shape is the same on any number of
  processes. Resuming with a larger ``--steps`` recomputes the schedule over the new total:
  step N gets the rate that a run planned for the new total has at step N;
- **checkpoints** at step boundaries only, atomic and fsynced, holding the trainable tensors,
  optimizer, schedule, scaler, every RNG, the engine's generator and the procedures' state;
  **exact resume** from them (the newest readable one, with a fallback to older ones);
- **Ctrl-C**: the first one finishes the current step, writes a checkpoint and stops; a
  second one abandons the step at once (its partial work discarded) and still leaves an exact
  checkpoint of the last boundary. A ``stop_event`` does the same for a background worker;
- **divergence**: a non-finite loss or parameter stops the run before anything is published;
- **the progress bar**, tensorboard (``logs/``) and ``log.jsonl`` (one JSON line per logged
  step, never repeated after a resume);
- **the output folder** rules of ``rundir`` (refuse / --resume / --overwrite, staging, publish).

**Procedures** (Delta-LoRA, DiffoRA selection) change how training runs, once for both
trainers: an object with any of ``setup(engine)``, ``after_optimizer_step(engine, step)``,
``log_values()``, ``state_dict()`` / ``load_state_dict(state, engine)``, ``fingerprint()``
(its options: part of the run's fingerprint, so a resume with other ones is refused); it may
call ``engine.add_parameters`` and ``engine.drop_parameters`` mid-run. Its state goes into
every checkpoint.
"""

from __future__ import annotations

import dataclasses
import json
import math
import signal
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import yaml
from tqdm.auto import tqdm

from .checkpoint import TrainingDiverged, TrainingInterrupted, capture_rng, load_checkpoint, restore_rng, save_checkpoint
from .configuration import ConfigError, check_fields
from .fileio import write_text
from .rundir import LOG, RunDir

MIXED_PRECISION = ("auto", "no", "fp16", "bf16")
SCHEDULES = ("constant", "constant_with_warmup", "linear", "cosine", "cosine_with_restarts", "polynomial")


@dataclass
class EngineConfig:
    """The training loop's options: the same names in every trainer's command line.

    Each field's ``aliases`` are the names it had before and the names diffusers' and
    transformers' training scripts give it; they keep working (``cli.canonical_argv``)."""

    steps: int = field(default=300, metadata={"help": "optimizer steps in total (a resumed run trains on up to this step)", "aliases": ("max-train-steps",)})
    batch_size: int = field(default=1, metadata={"help": "examples per micro-batch and process", "aliases": ("train-batch-size",)})
    grad_accum: int = field(default=1, metadata={"help": "micro-batches per optimizer step", "aliases": ("gradient-accumulation-steps",)})
    lr: float = field(default=1e-4, metadata={"help": "peak learning rate (AdamW)", "aliases": ("learning-rate",)})
    lr_schedule: str = field(default="constant", metadata={"help": "learning-rate schedule: " + ", ".join(SCHEDULES), "aliases": ("lr-scheduler",)})
    warmup_steps: int = field(default=0, metadata={"help": "learning-rate warm-up steps", "aliases": ("lr-warmup-steps",)})
    weight_decay: float = field(default=0.0, metadata={"help": "AdamW weight decay of the adapters", "aliases": ("adam-weight-decay",)})
    adam_beta1: float = field(default=0.9, metadata={"help": "AdamW beta1"})
    adam_beta2: float = field(default=0.999, metadata={"help": "AdamW beta2"})
    adam_epsilon: float = field(default=1e-8, metadata={"help": "AdamW epsilon"})
    max_grad_norm: float = field(default=1.0, metadata={"help": "gradient clipping norm (0: no clipping)"})
    use_8bit_adam: bool = field(default=False, metadata={"help": "bitsandbytes' 8-bit AdamW (needs CUDA and pip install .[cuda])"})
    mixed_precision: str = field(default="auto", metadata={"help": "auto (bf16, else fp16, on CUDA; no on the CPU), no, fp16 (CUDA only) or bf16"})
    cpu: bool = field(default=False, metadata={"help": "train on the CPU even where CUDA is present"})
    train_seed: int = field(default=0, metadata={"help": "seed of data order, noise and dropout (the adapter's own --seed fixes its slots)"})
    log_every: int = field(default=1, metadata={"help": "steps between log.jsonl lines and tensorboard points (mean loss over them)"})
    checkpoint_every: int = field(default=100, metadata={"help": "steps between checkpoints (0: only at the end and on Ctrl-C)", "aliases": ("checkpointing-steps",)})
    keep_checkpoints: int = field(default=2, metadata={"help": "newest checkpoints kept", "aliases": ("checkpoints-total-limit",)})
    output_dir: str | None = field(default=None, metadata={"help": "the run's folder (default: under outputs/, see the README)"})
    overwrite: bool = field(default=False, metadata={"help": "replace a run already in the output folder (kept until the new one has finished)"})

    def validate(self) -> None:
        check_fields(self, {
            "steps": (1, None), "batch_size": (1, None), "grad_accum": (1, None), "lr": (0, None, "open"),
            "warmup_steps": (0, None), "weight_decay": (0, None), "adam_beta1": (0, 1, "right-open"),
            "adam_beta2": (0, 1, "right-open"), "adam_epsilon": (0, None, "open"), "max_grad_norm": (0, None),
            "log_every": (1, None), "checkpoint_every": (0, None), "keep_checkpoints": (1, None), "train_seed": (0, None),
        })
        if self.lr_schedule not in SCHEDULES:
            raise ConfigError(f"lr_schedule must be one of {', '.join(SCHEDULES)}, got '{self.lr_schedule}'")
        if self.mixed_precision not in MIXED_PRECISION:
            raise ConfigError(f"mixed_precision must be one of {', '.join(MIXED_PRECISION)}, got '{self.mixed_precision}'")
        if self.warmup_steps > self.steps:
            raise ConfigError(f"warmup_steps ({self.warmup_steps}) must not exceed steps ({self.steps})")


@dataclass
class Micro:
    """One micro-batch of the run: `index` counts micro-batches over all processes, so data can be a pure function of it."""

    index: int
    step: int
    generator: torch.Generator


@dataclass
class RunState:
    start: int
    step: int
    losses: list[float]


def resolve_mixed_precision(mode: str, cpu: bool) -> str:
    cuda = torch.cuda.is_available() and not cpu
    if mode == "auto":
        return ("bf16" if torch.cuda.is_bf16_supported() else "fp16") if cuda else "no"
    if mode == "fp16" and not cuda:
        raise ConfigError("--mixed-precision fp16 needs a CUDA GPU (CPU autocast does not cover fp16); use bf16 or no on this machine")
    return mode


def check_device_options(cfg: EngineConfig) -> str:
    """Options that need CUDA are refused up front on a machine without it; returns the resolved precision."""
    mode = resolve_mixed_precision(cfg.mixed_precision, cfg.cpu)
    if cfg.use_8bit_adam:
        if not torch.cuda.is_available() or cfg.cpu:
            raise ConfigError("--use-8bit-adam needs a CUDA GPU (bitsandbytes' 8-bit optimizers run on CUDA); drop the flag on this machine")
        try:
            import bitsandbytes  # noqa: F401
        except ImportError:
            raise ConfigError("--use-8bit-adam needs the bitsandbytes package: pip install .[cuda] (or drop the flag)") from None
    return mode


def make_accelerator(mixed_precision: str, cpu: bool, grad_accum: int = 1, logging_dir: Path | None = None):
    """A fresh ``accelerate.Accelerator`` (its process-wide state reset, so each run sets its own precision)."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState
    from accelerate.utils import ProjectConfiguration

    AcceleratorState._reset_state(reset_partial_state=False)
    # Without CUDA the run is a CPU run, also under torchrun / accelerate launch: accelerate
    # sets up its multi-process CPU backend (gloo) only when told cpu=True.
    cpu = cpu or not torch.cuda.is_available()
    kwargs = {}
    if logging_dir is not None:
        kwargs = dict(log_with="tensorboard", project_config=ProjectConfiguration(project_dir=str(logging_dir.parent), logging_dir=str(logging_dir)))
    return Accelerator(mixed_precision=mixed_precision, cpu=cpu, gradient_accumulation_steps=grad_accum, **kwargs)


class _StopSignal:
    """First Ctrl-C: stop at the next step boundary. Second: abandon the step now (KeyboardInterrupt)."""

    def __init__(self, event: threading.Event | None):
        self.event = event or threading.Event()
        self._previous = None

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGINT, self._handle)
        return self

    def __exit__(self, *exc):
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)
            self._previous = None

    def _handle(self, signum, frame):
        if self.event.is_set():
            raise KeyboardInterrupt
        self.event.set()
        print("\nCtrl-C: finishing this step, then saving a checkpoint (Ctrl-C again to stop at once)", file=sys.stderr, flush=True)


class Engine:
    def __init__(self, cfg: EngineConfig, out_dir: str | Path, *, resume: bool | str = False, desc: str = "train",
                 stop_event: threading.Event | None = None):
        cfg.validate()
        self.cfg, self.desc = cfg, desc
        self.mixed_precision = check_device_options(cfg)
        self.run_dir = Path(out_dir) / ".partial"
        self.accelerator = make_accelerator(self.mixed_precision, cfg.cpu, cfg.grad_accum, self.run_dir / "logs")
        self.folder = RunDir(out_dir, resume=resume, overwrite=cfg.overwrite, writer=self.accelerator.is_main_process)
        self.folder.check()
        self.resume_state = self.resume_path = None
        if resume:  # read (and checked) before the trainer's slow model load
            self.resume_state, self.resume_path = load_checkpoint(self.folder.checkpoint_source())
            step = int(self.resume_state["step"])
            # An interrupted run whose training was complete (stopped while its files and samples
            # were being written) is finished by --resume without training further.
            unfinished = self.resume_path.parent.parent == self.folder.staging
            if step > cfg.steps or (step == cfg.steps and not unfinished):
                raise ConfigError(f"{self.resume_path} is at step {step}, already at --steps {cfg.steps}: the run is finished; "
                                  "raise --steps to train on")
        from accelerate.utils import set_seed

        set_seed(cfg.train_seed)
        self.generator = torch.Generator().manual_seed(cfg.train_seed * 1000 + self.accelerator.process_index)
        self.stop = _StopSignal(stop_event)
        self.procedures: list = []
        self.step = 0
        self.models: tuple = ()

    @property
    def device(self) -> torch.device:
        return self.accelerator.device

    @property
    def weight_dtype(self) -> torch.dtype:
        """The dtype frozen weights may be stored in under this run's mixed precision."""
        return {"fp16": torch.float16, "bf16": torch.bfloat16}.get(self.mixed_precision, torch.float32)

    @property
    def is_main(self) -> bool:
        return self.accelerator.is_main_process

    def prepare(self, *models):
        """accelerate's prepare for the models that train (device placement, DDP on several processes); a tuple."""
        prepared = self.accelerator.prepare(*models) if models else ()
        self.models = prepared if isinstance(prepared, tuple) else (prepared,)
        return self.models

    # -- set-up -------------------------------------------------------------------------------

    def setup(self, named_params: dict[str, torch.nn.Parameter], groups: list[dict], fingerprint: dict | None = None,
              procedures: Sequence = (), tracker_config: dict | None = None) -> int:
        """Optimizer and schedule over `groups` ({"params", optional "lr", "weight_decay"}); resume; open .partial/.

        `named_params` names every trainable tensor (checkpoint keys); `fingerprint` (plain
        values, e.g. the adapter config) must match a checkpoint to resume from it. Returns
        the step the run starts at.
        """
        cfg = self.cfg
        self.named_params = dict(named_params)
        self.procedures = list(procedures)
        options = {type(p).__name__: p.fingerprint() for p in self.procedures if hasattr(p, "fingerprint")}
        self.fingerprint = json.loads(json.dumps({**(fingerprint or {}), **options}))
        for proc in self.procedures:
            if hasattr(proc, "setup"):
                proc.setup(self)
        groups = [{"lr": cfg.lr, "weight_decay": cfg.weight_decay, **g, "params": list(g["params"])} for g in groups]
        groups += getattr(self, "_pending_groups", [])
        kwargs = dict(betas=(cfg.adam_beta1, cfg.adam_beta2), eps=cfg.adam_epsilon)
        if cfg.use_8bit_adam:
            import bitsandbytes as bnb

            optimizer = bnb.optim.AdamW8bit(groups, **kwargs)
        else:
            optimizer = torch.optim.AdamW(groups, **kwargs)
        from transformers import get_scheduler

        self.scheduler = get_scheduler(cfg.lr_schedule, optimizer, num_warmup_steps=cfg.warmup_steps, num_training_steps=cfg.steps)
        self.optimizer = self.accelerator.prepare(optimizer)
        if self.resume_state is not None:
            self._restore(self.resume_state)
        self.folder.open(self.resume_path, self.step)
        self._log = open(self.run_dir / LOG, "a") if self.is_main else None
        if self.is_main:
            flat = {k: v if isinstance(v, (int, float, str, bool)) else str(v) for k, v in (tracker_config or dataclasses.asdict(cfg)).items()}
            self.accelerator.init_trackers(self.desc.split()[0], config=flat)
        return self.step

    def add_parameters(self, named: dict[str, torch.nn.Parameter], lr: float | None = None, weight_decay: float | None = None) -> None:
        """A new parameter group (mid-run, or from a procedure's setup): it trains from the next step on, on the same schedule."""
        for p in named.values():
            p.requires_grad_(True)
        group = {"params": list(named.values()), "lr": self.cfg.lr if lr is None else lr,
                 "weight_decay": self.cfg.weight_decay if weight_decay is None else weight_decay}
        self.named_params.update(named)
        if not hasattr(self, "optimizer"):
            self._pending_groups = getattr(self, "_pending_groups", []) + [group]
            return
        fn = self.scheduler.lr_lambdas[0]
        group["initial_lr"] = group["lr"]
        self.optimizer.add_param_group(group)
        self.scheduler.base_lrs.append(group["lr"])
        self.scheduler.lr_lambdas.append(fn)
        self.optimizer.param_groups[-1]["lr"] = group["lr"] * fn(self.scheduler.last_epoch)

    def drop_parameters(self, names: Sequence[str]) -> None:
        """Remove trainable tensors from the run: frozen, out of the optimizer (and its state) and the checkpoints."""
        drop = {id(self.named_params.pop(n)): n for n in names}
        for group in self.optimizer.param_groups:
            kept = []
            for p in group["params"]:
                if id(p) in drop:
                    self.optimizer.state.pop(p, None)
                    p.requires_grad_(False)
                    p.grad = None
                else:
                    kept.append(p)
            group["params"] = kept

    def _restore(self, state: dict) -> None:
        where = self.resume_path
        if state.get("fingerprint", {}) != self.fingerprint:
            a, b = state.get("fingerprint", {}), self.fingerprint
            diff = sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k))
            raise ConfigError(f"--resume: {where} was trained with other settings ({', '.join(f'{k}: {a.get(k)!r} there, {b.get(k)!r} now' for k in diff[:4])}); "
                              "resume with the same settings, or train without --resume")
        for proc in self.procedures:
            if hasattr(proc, "load_state_dict"):
                proc.load_state_dict(state["procedures"][type(proc).__name__], self)
        saved = state["trainable"]
        mismatch = sorted(set(saved) ^ set(self.named_params)) or sorted(k for k, p in self.named_params.items() if saved[k].shape != p.shape)
        if mismatch:
            raise ConfigError(f"--resume: {where} does not fit this run (method, rank, targets or token mode changed); "
                              f"differing: {', '.join(mismatch[:5])}. Train without --resume, or with the same settings")
        with torch.no_grad():
            for k, p in self.named_params.items():
                p.copy_(saved[k])
        self.optimizer.load_state_dict(state["optimizer"])
        # The schedule's position and base rates come from the checkpoint; its shape from this
        # run's --steps. Same total: the very rates of an uninterrupted run. Larger: the rates of
        # a run planned for the new total (the optimizer's current rate is recomputed from it).
        self.scheduler.load_state_dict(state["scheduler"])
        lrs = [base * fn(self.scheduler.last_epoch) for base, fn in zip(self.scheduler.base_lrs, self.scheduler.lr_lambdas)]
        for group, lr in zip(self.optimizer.param_groups, lrs):
            group["lr"] = lr
        self.scheduler._last_lr = lrs
        scaler = self.accelerator.scaler
        if scaler is not None and state.get("scaler"):
            scaler.load_state_dict(state["scaler"])
        restore_rng(state["rng"])
        self.generator.set_state(state["generator"])
        self.step = int(state["step"])
        if self.is_main:
            print(f"resumed from step {self.step} ({where}); training on to step {self.cfg.steps}", file=sys.stderr)

    # -- checkpoints --------------------------------------------------------------------------

    def state_dict(self, rng: dict | None = None, generator: torch.Tensor | None = None) -> dict[str, Any]:
        scaler = self.accelerator.scaler
        return {
            "step": self.step,
            "trainable": {k: p.detach().cpu().clone() for k, p in self.named_params.items()},
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": scaler.state_dict() if scaler is not None else None,
            "rng": rng or capture_rng(),
            "generator": self.generator.get_state() if generator is None else generator,
            "procedures": {type(p).__name__: p.state_dict() for p in self.procedures if hasattr(p, "state_dict")},
            "fingerprint": self.fingerprint,
        }

    def checkpoint(self, rng: dict | None = None, generator: torch.Tensor | None = None) -> Path | None:
        """Write the state at the current step boundary (main process)."""
        if not self.is_main:
            return None
        self._last_checkpoint = save_checkpoint(self.run_dir / "checkpoints", self.state_dict(rng, generator), keep=self.cfg.keep_checkpoints)
        return self._last_checkpoint

    # -- the loop -------------------------------------------------------------------------------

    def run(self, loss_fn: Callable[[Micro], torch.Tensor], on_step: Callable[[int, float], None] | None = None) -> RunState:
        """Train from the current step to ``cfg.steps``. `loss_fn` returns one micro-batch's loss;
        `on_step(step, loss)` runs after each step (validation images, progress), outside the training RNG streams."""
        cfg, acc = self.cfg, self.accelerator
        start = self.step
        params = list(self.named_params.values())
        losses: list[float] = []
        pending: list[float] = []
        self._last_checkpoint = None
        for m in self.models:
            m.train()
        bar = tqdm(total=cfg.steps, initial=start, desc=self.desc, unit="step", disable=not acc.is_local_main_process)
        with self.stop:
            try:
                while self.step < cfg.steps:
                    if self._stop_requested():
                        raise TrainingInterrupted(self.step, self._boundary_checkpoint(start))
                    snapshot = (capture_rng(), self.generator.get_state())  # the boundary, for an abandoned step
                    self._committed = False
                    try:
                        value = self._one_step(loss_fn, params)
                    except KeyboardInterrupt:  # a second Ctrl-C: this step's work is dropped, the boundary kept
                        if self._committed:
                            raise TrainingInterrupted(self.step, getattr(self, "_last_checkpoint", None)) from None
                        raise TrainingInterrupted(self.step, self._boundary_checkpoint(start, *snapshot)) from None
                    self.step += 1
                    losses.append(value)
                    pending.append(value)
                    lr = self.scheduler.get_last_lr()[0]
                    bar.update(1)
                    bar.set_postfix(loss=f"{value:.4f}", lr=f"{lr:.2e}")
                    if self.step % cfg.log_every == 0 or self.step == cfg.steps:
                        self._write_log(sum(pending) / len(pending), lr)
                        pending = []
                    if cfg.checkpoint_every and self.step % cfg.checkpoint_every == 0 and self.step < cfg.steps:
                        self.checkpoint()
                    if on_step is not None:
                        try:
                            with torch.random.fork_rng(devices=[]):  # validation images must not shift the training streams
                                on_step(self.step, value)
                        except KeyboardInterrupt:
                            raise TrainingInterrupted(self.step, self._boundary_checkpoint(start)) from None
                        for m in self.models:
                            m.train()
            finally:
                bar.close()
        if self.step > start:
            self.checkpoint()  # the final state, so --resume with more steps can train on (or finish an interrupted run)
        acc.wait_for_everyone()
        return RunState(start=start, step=self.step, losses=losses)

    def _stop_requested(self) -> bool:
        flag = self.stop.event.is_set()
        if self.accelerator.num_processes > 1:  # every process stops at the same boundary
            t = torch.tensor([float(flag)], device=self.device)
            flag = bool(self.accelerator.reduce(t, "max").item())
        return flag

    def _boundary_checkpoint(self, start: int, rng=None, generator=None) -> Path | None:
        if self.step == start and self.resume_path is not None:
            return self.resume_path  # nothing new since the checkpoint this run resumed from
        last = getattr(self, "_last_checkpoint", None)
        if last is not None and last.name == f"step-{self.step:08d}.pt":
            return last
        return self.checkpoint(rng, generator) if self.step > start or self.resume_path is None else None

    def _one_step(self, loss_fn, params) -> float:
        cfg, acc = self.cfg, self.accelerator
        self._committed = False
        total = 0.0
        for a in range(cfg.grad_accum):
            micro = Micro(index=(self.step * cfg.grad_accum + a) * acc.num_processes + acc.process_index, step=self.step, generator=self.generator)
            with acc.accumulate(*self.models):
                with acc.autocast():
                    loss = loss_fn(micro)
                value = acc.gather(loss.detach().float()[None]).mean().item()
                if not math.isfinite(value):
                    raise TrainingDiverged(
                        f"the loss became {value} at step {self.step + 1}; nothing was published. Lower --lr (now {cfg.lr:g})"
                        + (" or use --mixed-precision bf16/no" if self.mixed_precision == "fp16" else "")
                    )
                acc.backward(loss)
                if acc.sync_gradients:
                    if cfg.max_grad_norm > 0:
                        acc.clip_grad_norm_(params, cfg.max_grad_norm)
                    self._committed = True  # from here on the step changes the weights
                self.optimizer.step()
                self.optimizer.zero_grad(set_to_none=True)
            total += value
        self.scheduler.step()
        for proc in self.procedures:
            if hasattr(proc, "after_optimizer_step"):
                proc.after_optimizer_step(self, self.step + 1)
        norm = torch.nn.utils.get_total_norm([p.detach() for p in self.named_params.values()])
        if not torch.isfinite(norm):
            raise TrainingDiverged(f"a trainable parameter became non-finite at step {self.step + 1}; nothing was published. Lower --lr (now {cfg.lr:g})")
        return total / cfg.grad_accum

    def _write_log(self, loss: float, lr: float) -> None:
        record = {"step": self.step, "loss": loss, "lr": lr}
        for proc in self.procedures:
            if hasattr(proc, "log_values"):
                record.update(proc.log_values())
        self.accelerator.log(record, step=self.step)
        if self._log is not None:
            self._log.write(json.dumps({**record, "time": time.time()}) + "\n")
            self._log.flush()

    # -- the end ----------------------------------------------------------------------------------

    def log_image(self, tag: str, image, step: int) -> None:
        """An image for tensorboard (main process)."""
        if self.is_main:
            import numpy as np

            self.accelerator.get_tracker("tensorboard", unwrap=True).add_image(tag, np.asarray(image), step, dataformats="HWC")

    def finish(self) -> Path:
        """Publish the run's files (those written into ``run_dir`` included) into the output folder."""
        if getattr(self, "_log", None) is not None:
            self._log.close()
            self._log = None
        self.accelerator.wait_for_everyone()  # every process done writing
        out = self.folder.publish()
        self.accelerator.wait_for_everyone()  # the files are in place for every process (end_training then ends the group)
        self.close()
        return out

    def close(self) -> None:
        """End logging and accelerate's trackers and process group; the folder's lock is released by ``finish`` or ``abort``."""
        if getattr(self, "_log", None) is not None:
            self._log.close()
            self._log = None
        self.accelerator.end_training()

    def abort(self, error: BaseException | None = None) -> None:
        """After a failure: stop logging and release the folder (``.partial/`` stays for --resume).

        A Ctrl-C after the training loop (while the trainer writes its files and samples) is
        raised as ``TrainingInterrupted``: the final checkpoint is in ``.partial/``, and the same
        command plus --resume finishes the run without training further."""
        self.close()
        self.folder.close()
        if isinstance(error, KeyboardInterrupt) and not isinstance(error, TrainingInterrupted):
            checkpoint = getattr(self, "_last_checkpoint", None) or self.resume_path
            if checkpoint is not None:
                raise TrainingInterrupted(self.step, checkpoint) from None


# ---------------------------------------------------------------------------------------------
# A task and one fit(): what every training run of the toolkit goes through.


@dataclass
class Setup:
    """What a task hands the engine once its models are built (``Task.setup``)."""

    named: dict[str, torch.nn.Parameter]  # every trainable tensor by name: the checkpoints' keys
    groups: list[dict]  # optimizer groups: {"params", optional "lr", "weight_decay"}
    fingerprint: dict = field(default_factory=dict)  # plain values a checkpoint must match to be resumed from
    procedures: Sequence = ()  # Delta-LoRA, DiffoRA, ... (``procedures/``)
    config: dict | None = None  # the run's resolved configuration, written to config.yaml


class Task:
    """One kind of training run: its models, its data and loss, and what it writes at the end.

    ``fit`` calls ``setup(engine)`` once (build and place the models; everything that can be
    wrong with the input should have been checked before, as the output folder is open by
    then), ``loss(micro)`` for every micro-batch, ``after_step(engine, step, loss)`` after every
    optimizer step, and ``save(engine, state)`` on the main process after the last step (write
    the results into ``engine.run_dir``: they are published with the run).
    """

    desc = "train"  # the progress bar's label

    def setup(self, engine: Engine) -> Setup:
        raise NotImplementedError

    def loss(self, micro: Micro) -> torch.Tensor:
        raise NotImplementedError

    def after_step(self, engine: Engine, step: int, loss: float) -> None:
        """Called after every optimizer step (validation images, a progress display): nothing by default."""

    def save(self, engine: Engine, state: RunState) -> None:
        raise NotImplementedError


def fit(task: Task, cfg: EngineConfig, out_dir: str | Path, *, resume: bool | str = False,
        stop_event: threading.Event | None = None) -> tuple[RunState, Engine]:
    """Train `task` under `cfg` into `out_dir`: the output folder's rules, config.yaml, the run's
    fingerprint, the loop, and a published folder at the end, or a resumable ``.partial/`` after
    a failure or Ctrl-C. Returns the final state and the (closed) engine, for what it measured."""
    engine = Engine(cfg, out_dir, resume=resume, desc=task.desc, stop_event=stop_event)
    try:
        setup = task.setup(engine)
        engine.setup(setup.named, setup.groups, fingerprint=setup.fingerprint, procedures=setup.procedures)
        if engine.is_main and setup.config is not None:
            write_text(engine.run_dir / "config.yaml", yaml.safe_dump(setup.config, sort_keys=False))
        state = engine.run(task.loss, lambda step, loss: task.after_step(engine, step, loss))
        if engine.is_main:
            task.save(engine, state)
        engine.finish()
    except BaseException as e:
        engine.abort(e)  # a Ctrl-C after the last step: TrainingInterrupted (finish with --resume)
        raise
    return state, engine
