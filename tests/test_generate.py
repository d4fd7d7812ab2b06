"""The generate command on the embedded tiny pipeline: files, manifest, seeds, errors."""

from __future__ import annotations

import json

import numpy as np
import pytest
from numeric import differ, same_image
from PIL import Image

from sbora.configuration import ConfigError
from sbora_diffusion.generate import generate, main, parse_seeds

pytestmark = pytest.mark.numeric  # also run under other CPU kernels and 2 threads (make test-cpus, .ci/run)


def test_generate_writes_images_and_manifest(tiny_pipe, tmp_path):
    records = generate(tiny_pipe, ["a photo of {token} {class_word}", "a red cube"], [3, 7], tmp_path, concept="thing",
                       method="lora", token="<thing1>", class_word="toy", steps=2, height=32, width=32, batch_size=3)
    lines = [json.loads(line) for line in (tmp_path / "manifest.jsonl").read_text().splitlines()]
    assert lines == records and len(records) == 4
    assert [(r["prompt"], r["seed"]) for r in records] == [
        ("a photo of <thing1> toy", 3), ("a photo of <thing1> toy", 7), ("a red cube", 3), ("a red cube", 7)]
    for r in records:
        assert set(r) >= {"image", "prompt", "seed", "concept", "method", "token", "class_word"}
        assert (r["concept"], r["method"], r["token"], r["class_word"]) == ("thing", "lora", "<thing1>", "toy")
        assert Image.open(tmp_path / r["image"]).size == (32, 32)
    # Image k uses seed k whatever the batching: seed 7 alone gives the same picture.
    alone = generate(tiny_pipe, ["a red cube"], [7], tmp_path / "alone", steps=2, height=32, width=32, batch_size=1)
    a = np.asarray(Image.open(tmp_path / records[3]["image"]))
    assert same_image(a, Image.open(tmp_path / "alone" / alone[0]["image"]))  # a batch of one rounds like a batch of two, up to a level
    assert differ(a, Image.open(tmp_path / records[2]["image"]))
    assert not list(tmp_path.rglob("*.tmp"))


def test_generate_rejects_bad_input(tiny_pipe, tmp_path):
    with pytest.raises(ConfigError, match="placeholder"):
        generate(tiny_pipe, ["a photo of {dog}"], [0], tmp_path, token="<x>", steps=1)
    with pytest.raises(ConfigError, match="at least one prompt"):
        generate(tiny_pipe, [], [0], tmp_path, steps=1)
    assert not (tmp_path / "manifest.jsonl").exists()
    assert parse_seeds("0-2,5") == [0, 1, 2, 5]
    with pytest.raises(ConfigError, match="--seeds"):
        parse_seeds("a-b")


def test_cli_needs_prompts_without_adapter(tmp_path, capsys):
    assert main(["--out", str(tmp_path / "gen")]) == 2
    assert "no prompts" in capsys.readouterr().err
    assert not (tmp_path / "gen").exists()
