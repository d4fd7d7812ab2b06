"""The shared training engine on a toy trainer: schedule on any number of processes, exact resume
after Ctrl-C at any point, the scaler's state, divergence, the output folder's rules, checkpoint
fallbacks, procedure hooks."""

from __future__ import annotations

import json
import os
import pickle
import random
import signal
import socket
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from engine_toy import toy_config, toy_train

from sbora import engine as engine_mod
from sbora.checkpoint import CheckpointError, list_checkpoints, read_checkpoint
from sbora.configuration import ConfigError
from sbora.engine import Engine, TrainingDiverged, TrainingInterrupted
from sbora.rundir import OutputFolderError, RunDir

pytestmark = pytest.mark.numeric  # also run under other CPU kernels and 2 threads (make test-cpus, .ci/run)


def log_of(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]


def same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def expected_lrs(steps: int, warmup: int, peak: float) -> list[float]:
    """transformers' cosine with warm-up, evaluated after each optimizer step (what log.jsonl records)."""
    from transformers import get_scheduler

    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=peak)
    sched = get_scheduler("cosine", opt, num_warmup_steps=warmup, num_training_steps=steps)
    out = []
    for _ in range(steps):
        opt.step()
        sched.step()
        out.append(sched.get_last_lr()[0])
    return out


def test_schedule_is_stepped_once_per_optimizer_step(tmp_path):
    run = toy_train(toy_config(tmp_path / "a", steps=8))
    assert [r["lr"] for r in log_of(run["out"])] == pytest.approx(expected_lrs(8, 2, 0.05), abs=1e-12)
    assert [r["step"] for r in log_of(run["out"])] == list(range(1, 9))


def test_schedule_is_the_same_on_two_processes(tmp_path):
    """accelerate's scheduler wrapper steps once per process; the engine's schedule must not depend on the count."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(__file__).parent), str(Path(__file__).parents[1])]),
           "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    with socket.socket() as s:  # a free port for the process group's rendezvous
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    reports = tmp_path / "reports"
    reports.mkdir()
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(port),
           str(Path(__file__).parent / "engine_toy.py"), str(tmp_path / "two"), "8", str(reports)]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    seen = sorted(json.loads(f.read_text())["process"] for f in reports.glob("process-*.json"))
    assert seen == [0, 1] and all(json.loads(f.read_text())["of"] == 2 for f in reports.iterdir())  # really two processes, one group
    log = log_of(tmp_path / "two")
    assert [r["step"] for r in log] == list(range(1, 9))
    assert [r["lr"] for r in log] == pytest.approx(expected_lrs(8, 2, 0.05), abs=1e-12)  # reaches 0 at the end, never climbs back
    assert log[-1]["lr"] == pytest.approx(0.0, abs=1e-12) and max(r["lr"] for r in log) == pytest.approx(0.05)


def send_ctrl_c_at(k: int, times: int = 1):
    """An on_loss hook that sends SIGINT to this process at micro-batch k (`times` signals)."""
    def hook(micro):
        if micro.index == k:
            for _ in range(times):
                os.kill(os.getpid(), signal.SIGINT)
    return hook


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_ctrl_c_at_a_random_point_then_resume_is_bit_exact(seed, tmp_path):
    straight = toy_train(toy_config(tmp_path / "a", grad_accum=2))
    rng = random.Random(seed)
    k = rng.randrange(12)  # any micro-batch of the 6 steps x 2, mid-step included
    with pytest.raises(TrainingInterrupted) as info:
        toy_train(toy_config(tmp_path / "b", grad_accum=2), on_loss=send_ctrl_c_at(k))
    stopped = info.value.step
    assert stopped == k // 2 + 1  # the step in progress was finished, then the run stopped at the boundary
    assert info.value.checkpoint.name == f"step-{stopped:08d}.pt" and not (tmp_path / "b" / "weights.safetensors").exists()
    if stopped < 6:
        resumed = toy_train(toy_config(tmp_path / "b", grad_accum=2), resume=True)
        assert same(resumed["weights"], straight["weights"])
        assert resumed["losses"] == straight["losses"][stopped:]
        assert [r["step"] for r in log_of(tmp_path / "b")] == list(range(1, 7))  # no step logged twice


def test_second_ctrl_c_abandons_the_step_and_keeps_the_boundary(tmp_path):
    straight = toy_train(toy_config(tmp_path / "a", grad_accum=2))
    with pytest.raises(TrainingInterrupted) as info:
        toy_train(toy_config(tmp_path / "b", grad_accum=2), on_loss=send_ctrl_c_at(7, times=2))  # step 4, first micro-batch
    assert info.value.step == 3  # step 4 was abandoned
    assert read_checkpoint(info.value.checkpoint)["step"] == 3
    resumed = toy_train(toy_config(tmp_path / "b", grad_accum=2), resume=True)
    assert same(resumed["weights"], straight["weights"])


def test_stop_event_stops_a_background_run_at_a_boundary(tmp_path):
    event = threading.Event()
    result = {}

    def worker():
        try:
            toy_train(toy_config(tmp_path / "b", steps=50), stop_event=event, on_loss=lambda m: m.index == 3 and event.set())
        except TrainingInterrupted as e:
            result["step"] = e.step

    t = threading.Thread(target=worker)
    t.start()
    t.join()
    assert result["step"] == 4 and list_checkpoints(tmp_path / "b" / ".partial" / "checkpoints")[-1].name == "step-00000004.pt"


def test_resume_with_more_steps_trains_on_a_schedule_over_the_new_total(tmp_path, capsys):
    toy_train(toy_config(tmp_path / "a", steps=6))
    assert log_of(tmp_path / "a")[-1]["lr"] == pytest.approx(0.0, abs=1e-12)  # the cosine ended
    before = read_checkpoint(list_checkpoints(tmp_path / "a" / "checkpoints")[-1])["trainable"]
    longer = toy_train(toy_config(tmp_path / "a", steps=10), resume=True)
    assert "resumed from step 6" in capsys.readouterr().err
    log = log_of(tmp_path / "a")
    assert [r["step"] for r in log] == list(range(1, 11))
    assert [r["lr"] for r in log[6:]] == pytest.approx(expected_lrs(10, 2, 0.05)[6:], abs=1e-12)  # not 0
    assert not same(longer["weights"], {k: v for k, v in before.items()})
    with pytest.raises(ConfigError, match="already at --steps 10: the run is finished"):
        toy_train(toy_config(tmp_path / "a", steps=10), resume=True)


def test_an_interrupt_after_the_last_step_is_finished_by_resume(tmp_path):
    """Ctrl-C while the trainer writes its files: the message says --resume, and --resume publishes the run without training on."""
    reference = toy_train(toy_config(tmp_path / "ref"))

    def ctrl_c():
        raise KeyboardInterrupt

    with pytest.raises(TrainingInterrupted, match="continue with the same command plus --resume") as info:
        toy_train(toy_config(tmp_path / "a"), after_run=ctrl_c)
    assert info.value.step == 6 and info.value.checkpoint.name == "step-00000006.pt"
    assert not (tmp_path / "a" / "weights.safetensors").exists()  # nothing published yet
    finished = toy_train(toy_config(tmp_path / "a"), resume=True)
    assert finished["losses"] == []  # no step trained again
    assert same(finished["weights"], reference["weights"])
    assert [r["step"] for r in log_of(tmp_path / "a")] == list(range(1, 7))
    assert not (tmp_path / "a" / ".partial").exists()
    # A second Ctrl-C at the same point, on the resumed run, still leaves it resumable.
    with pytest.raises(TrainingInterrupted):
        toy_train(toy_config(tmp_path / "b"), after_run=ctrl_c)
    with pytest.raises(TrainingInterrupted):
        toy_train(toy_config(tmp_path / "b"), resume=True, after_run=ctrl_c)
    assert same(toy_train(toy_config(tmp_path / "b"), resume=True)["weights"], reference["weights"])


def test_scaler_state_is_checkpointed_and_restored(tmp_path, monkeypatch):
    """fp16's gradient scaler decides which steps are skipped: its state must survive a resume.

    Step 2's loss is huge: its scaled gradients overflow, the step is skipped and the scale backs
    off 256-fold. Step 6's loss is large: it overflows only at the old scale. So a resumed run
    whose scaler restarted from its initial scale would skip step 6 and end elsewhere."""
    real = engine_mod.make_accelerator

    def with_scaler(*args, **kwargs):
        acc = real(*args, **kwargs)
        acc.scaler = torch.amp.GradScaler("cpu", init_scale=2.0**16, backoff_factor=2.0**-8, growth_interval=1000)
        return acc

    monkeypatch.setattr(engine_mod, "make_accelerator", with_scaler)
    factors = {1: 2.0**120, 5: 2.0**108}
    cfg = dict(steps=8, checkpoint_every=3, keep_checkpoints=5, lr_schedule="constant", warmup_steps=0)
    straight = toy_train(toy_config(tmp_path / "a", **cfg), on_loss=lambda m: factors.get(m.index))
    state = read_checkpoint(tmp_path / "a" / "checkpoints" / "step-00000003.pt")
    assert state["scaler"]["scale"] == 2.0**8  # backed off once
    toy_train(toy_config(tmp_path / "b", **{**cfg, "steps": 3}), on_loss=lambda m: factors.get(m.index))
    resumed = toy_train(toy_config(tmp_path / "b", **cfg), on_loss=lambda m: factors.get(m.index), resume=True)
    assert same(resumed["weights"], straight["weights"])


# ---- divergence and the output folder -------------------------------------------------------


def snapshot(folder: Path) -> dict:
    return {p.relative_to(folder): p.read_bytes() for p in folder.rglob("*") if p.is_file() and ".partial" not in p.parts and p.name != ".lock"}


@pytest.mark.parametrize("case", ["nan loss", "weights blow up"])
def test_divergence_stops_and_leaves_the_earlier_result_untouched(case, tmp_path):
    first = toy_train(toy_config(tmp_path / "a"))
    files = snapshot(first["out"])
    with pytest.raises(TrainingDiverged, match="nothing was published"):
        if case == "nan loss":
            toy_train(toy_config(tmp_path / "a", overwrite=True), on_loss=lambda m: float("nan") if m.index == 3 else None)  # loss·NaN
        else:
            toy_train(toy_config(tmp_path / "a", overwrite=True, lr=1e30, max_grad_norm=0, lr_schedule="constant", warmup_steps=0))
    assert snapshot(first["out"]) == files  # the finished run is exactly as it was


def test_a_folder_with_a_run_is_refused_without_resume_or_overwrite(tmp_path):
    first = toy_train(toy_config(tmp_path / "a"))
    with pytest.raises(OutputFolderError, match="already holds a run.*--resume.*--overwrite.*--output-dir"):
        toy_train(toy_config(tmp_path / "a"))
    with pytest.raises(OutputFolderError, match="only one of them"):
        toy_train(toy_config(tmp_path / "a", overwrite=True), resume=True)
    (first["out"] / "notes.txt").write_text("mine")
    replaced = toy_train(toy_config(tmp_path / "a", overwrite=True, lr=0.01))
    assert not same(replaced["weights"], first["weights"]) and not (first["out"] / "notes.txt").exists()
    assert sorted(p.name for p in first["out"].iterdir()) == [".lock", "checkpoints", "log.jsonl", "logs", "weights.safetensors"]
    with pytest.raises(TrainingInterrupted):
        toy_train(toy_config(tmp_path / "b"), on_loss=send_ctrl_c_at(2))
    with pytest.raises(OutputFolderError, match="interrupted run \\(checkpoint at step 3\\).*--resume"):
        toy_train(toy_config(tmp_path / "b"))


def test_overwrite_keeps_the_old_result_until_the_new_run_has_finished(tmp_path):
    first = toy_train(toy_config(tmp_path / "a"))
    with pytest.raises(TrainingInterrupted):
        toy_train(toy_config(tmp_path / "a", overwrite=True, lr=0.01), on_loss=send_ctrl_c_at(3))
    kept = load_file(str(tmp_path / "a" / "weights.safetensors"))
    assert same(kept, first["weights"])


def test_two_runs_into_one_folder_at_once_are_refused(tmp_path):
    holder = RunDir(tmp_path / "a")
    holder.open()
    try:
        with pytest.raises(OutputFolderError, match="another run is writing"):
            RunDir(tmp_path / "a").open()
    finally:
        holder.close()
    RunDir(tmp_path / "a").open()  # free again


# ---- checkpoints ------------------------------------------------------------------------------


def test_resume_falls_back_from_an_unreadable_checkpoint(tmp_path):
    straight = toy_train(toy_config(tmp_path / "a", steps=8))
    with pytest.raises(TrainingInterrupted):
        toy_train(toy_config(tmp_path / "b", steps=8, keep_checkpoints=3), on_loss=send_ctrl_c_at(4))  # stops at 5: ckpts 2, 4, 5
    ckpts = tmp_path / "b" / ".partial" / "checkpoints"
    assert [p.name for p in list_checkpoints(ckpts)] == ["step-00000002.pt", "step-00000004.pt", "step-00000005.pt"]
    (ckpts / "step-00000005.pt").write_bytes(b"")  # what a power loss could leave without fsync
    (ckpts / ".step-00000006.pt.abc.tmp").write_bytes(b"half")  # an interrupted write's temp file
    with pytest.warns(UserWarning, match="step-00000005.pt cannot be read.*older step-00000004.pt"):
        resumed = toy_train(toy_config(tmp_path / "b", steps=8, keep_checkpoints=3), resume=True)
    assert same(resumed["weights"], straight["weights"])
    assert [r["step"] for r in log_of(tmp_path / "b")] == list(range(1, 9))  # the log was cut back to step 4
    assert not list((tmp_path / "b" / "checkpoints").glob(".*.tmp"))


def test_resume_from_a_named_checkpoint_file(tmp_path):
    straight = toy_train(toy_config(tmp_path / "a", steps=6, keep_checkpoints=5))
    resumed = toy_train(toy_config(tmp_path / "b", steps=6), resume=str(tmp_path / "a" / "checkpoints" / "step-00000002.pt"))
    assert same(resumed["weights"], straight["weights"])
    with pytest.raises(OutputFolderError, match="no such checkpoint"):
        toy_train(toy_config(tmp_path / "c", steps=6), resume=str(tmp_path / "nowhere.pt"))


def test_pickled_or_garbage_checkpoints_are_clear_errors(tmp_path):
    class Payload:
        def __reduce__(self):
            return (print, ("pwned",))

    folder = tmp_path / "x" / "checkpoints"
    folder.mkdir(parents=True)
    (folder / "step-00000001.pt").write_bytes(pickle.dumps({"step": 1, "x": Payload()}))
    with pytest.raises(CheckpointError, match="no readable checkpoint"):
        toy_train(toy_config(tmp_path / "x", overwrite=False), resume=True)
    with pytest.raises(CheckpointError, match="cannot be read"):
        read_checkpoint(folder / "step-00000001.pt")


def test_resume_with_other_settings_is_refused(tmp_path):
    toy_train(toy_config(tmp_path / "a", steps=4))

    class Wider(Engine):
        def setup(self, named, groups, fingerprint=None, **kw):
            return super().setup(named, groups, fingerprint={"toy": 2}, **kw)

    with pytest.raises(ConfigError, match="other settings.*toy: 1 there, 2 now"):
        toy_train(toy_config(tmp_path / "a", steps=6), resume=True, make_engine=Wider)


@pytest.mark.parametrize("field, value, message", [
    ("lr", float("nan"), "lr must be a finite number"), ("lr", -1e-3, "0 < lr"), ("steps", 0, "1 <= steps"),
    ("adam_beta1", 1.0, "adam_beta1 < 1"), ("max_grad_norm", float("inf"), "finite"), ("warmup_steps", 99, "must not exceed steps"),
    ("grad_accum", 0, "1 <= grad_accum"), ("lr_schedule", "cosinus", "lr_schedule must be one of"),
])
def test_numeric_options_are_validated_before_anything_is_written(field, value, message, tmp_path):
    with pytest.raises(ConfigError, match=message):
        toy_train(toy_config(tmp_path / "a", **{field: value}))
    assert not (tmp_path / "a").exists()


# ---- procedures ---------------------------------------------------------------------------------


class Recorder:
    """Counts optimizer steps, trains an extra bias from setup on, drops it after step 3."""

    def __init__(self):
        self.steps: list[int] = []
        self.extra = torch.nn.Parameter(torch.zeros(3))

    def setup(self, engine):
        engine.add_parameters({"extra": self.extra})

    def after_optimizer_step(self, engine, step):
        self.steps.append(step)
        if step == 3:
            engine.drop_parameters(["extra"])

    def log_values(self):
        return {"recorded": len(self.steps)}

    def state_dict(self):
        return {"steps": list(self.steps)}

    def load_state_dict(self, state, engine):
        self.steps = list(state["steps"])
        if self.steps and self.steps[-1] >= 3:
            engine.drop_parameters(["extra"])


def test_procedures_see_every_step_change_groups_and_resume(tmp_path):
    rec = Recorder()
    run = toy_train(toy_config(tmp_path / "a", steps=5), procedures=[rec])
    assert rec.steps == [1, 2, 3, 4, 5] and [r["recorded"] for r in log_of(run["out"])] == [1, 2, 3, 4, 5]
    assert not rec.extra.requires_grad
    opt = run["engine"].optimizer
    assert all(p is not rec.extra for g in opt.param_groups for p in g["params"]) and rec.extra not in opt.state
    state = read_checkpoint(list_checkpoints(tmp_path / "a" / "checkpoints")[-1])
    assert state["procedures"]["Recorder"] == {"steps": [1, 2, 3, 4, 5]} and "extra" not in state["trainable"]
    early = read_checkpoint(tmp_path / "a" / "checkpoints" / "step-00000004.pt")
    assert "extra" not in early["trainable"]
    again = Recorder()
    toy_train(toy_config(tmp_path / "b", steps=2), procedures=[again])
    assert "extra" in read_checkpoint(list_checkpoints(tmp_path / "b" / "checkpoints")[-1])["trainable"]
    resumed = Recorder()
    toy_train(toy_config(tmp_path / "b", steps=5), procedures=[resumed], resume=True)
    assert resumed.steps == [1, 2, 3, 4, 5]
