"""Atomic checkpoints that resume exactly and refuse to unpickle."""

from __future__ import annotations

import os
import pickle
import random

import numpy as np
import pytest
import torch

from sbora.checkpoint import CheckpointError, capture_rng, list_checkpoints, load_checkpoint, restore_rng, save_checkpoint

pytestmark = pytest.mark.numeric  # also run under other CPU kernels and 2 threads (make test-cpus, .ci/run)


def test_checkpoint_roundtrip_prunes_and_restores_rng(tmp_path):
    model = torch.nn.Linear(4, 3)
    opt = torch.optim.AdamW(model.parameters(), lr=0.1)
    model(torch.randn(2, 4)).sum().backward()
    opt.step()
    for step in (10, 20, 30):
        save_checkpoint(tmp_path, {"step": step, "optimizer": opt.state_dict(), "rng": capture_rng(), "trainable": {"w": model.weight}}, keep=2)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step-00000020.pt", "step-00000030.pt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step-00000020.pt", "step-00000030.pt"]  # no temp files
    umask = os.umask(0)
    os.umask(umask)
    assert (tmp_path / "step-00000030.pt").stat().st_mode & 0o777 == 0o666 & ~umask  # not mkstemp's 0600
    state, path = load_checkpoint(tmp_path)  # the newest
    assert path.name == "step-00000030.pt"
    assert state["step"] == 30 and torch.equal(state["trainable"]["w"], model.weight)
    opt2 = torch.optim.AdamW(torch.nn.Linear(4, 3).parameters(), lr=0.1)
    opt2.load_state_dict(state["optimizer"])
    assert torch.equal(opt2.state_dict()["state"][0]["exp_avg"], opt.state_dict()["state"][0]["exp_avg"])
    restore_rng(state["rng"])
    first = (torch.rand(3).tolist(), random.random(), float(np.random.rand()))
    restore_rng(state["rng"])
    assert (torch.rand(3).tolist(), random.random(), float(np.random.rand())) == first


def test_checkpoint_errors(tmp_path):
    with pytest.raises(CheckpointError, match="no checkpoint"):
        load_checkpoint(tmp_path)
    evil = tmp_path / "step-00000001.pt"

    class Payload:
        def __reduce__(self):
            return (print, ("pwned",))

    evil.write_bytes(pickle.dumps({"step": 1, "x": Payload()}))
    with pytest.raises(CheckpointError, match="cannot be read"):
        load_checkpoint(evil)
    (tmp_path / "step-00000002.pt").write_bytes(b"truncated")
    with pytest.raises(CheckpointError, match="no readable checkpoint.*may be corrupt"):
        load_checkpoint(tmp_path)


@pytest.mark.parametrize("race", [False, True])
def test_a_folder_published_without_replace_keeps_the_one_another_process_published(race, tmp_path, monkeypatch):
    """atomic_folder(replace=False), a cache entry's publication: a folder that another process published first (before
    the look, or between the look and the rename) is kept, ours is dropped, and no temporary folder is left."""
    from sbora import fileio

    target = tmp_path / "entry"

    def publish_theirs():
        target.mkdir()
        (target / "weights").write_text("theirs")

    if race:  # theirs lands after our look at the target, just before our rename
        real_replace = os.replace

        def replace_after_theirs(src, dst):
            if str(dst) == str(target) and not target.exists():
                publish_theirs()
            return real_replace(src, dst)

        monkeypatch.setattr(fileio.os, "replace", replace_after_theirs)
    with fileio.atomic_folder(target, replace=False) as tmp:
        (tmp / "weights").write_text("ours")
        if not race:
            publish_theirs()
    assert (target / "weights").read_text() == "theirs" and [p.name for p in tmp_path.iterdir()] == ["entry"]
    with fileio.atomic_folder(tmp_path / "fresh", replace=False) as tmp:  # nothing there: published as usual
        (tmp / "weights").write_text("ours")
    assert (tmp_path / "fresh" / "weights").read_text() == "ours"
