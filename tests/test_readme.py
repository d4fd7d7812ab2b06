"""The README's commands, as written: every command line in its bash blocks is accepted by the
real command's argument parser (nothing runs: parsing stops right after it succeeds), every
`make` target exists, and every repository file or folder a command names is there."""

from __future__ import annotations

import argparse
import importlib
import re
import shlex
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
# Commands of other tools that the README shows (set-up, launchers, viewers): not ours to parse.
FOREIGN = ("pip", "python3 -m venv", ".venv/bin/python -m pip", "accelerate config", "tensorboard", "cd ", "mkdir", "apt", "export ", "curl")


def readme_commands() -> list[str]:
    """Every command line of the README's ```bash blocks (continuations joined, comments dropped)."""
    text = (ROOT / "README.md").read_text()
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", text, flags=re.S):
        for line in block.replace("\\\n", " ").splitlines():
            line = line.split(" #")[0].strip() if not line.lstrip().startswith("#") else ""
            if line:
                commands.append(line)
    return commands


def entry_point(argv: list[str]):
    """(main function, its arguments) for one of our commands, or None for another tool's."""
    if argv[:2] == ["accelerate", "launch"]:
        argv = ["python", *argv[2:]]
    if argv[0] in SCRIPTS:
        module, _, func = SCRIPTS[argv[0]].partition(":")
        return getattr(importlib.import_module(module), func), argv[1:]
    if argv[0] in ("python", "python3") and len(argv) > 1:
        if argv[1] == "-m":
            return importlib.import_module(argv[2]).main, argv[3:]
        if argv[1] == "train_concept.py":
            return importlib.import_module("sbora_diffusion.concept.cli").main, argv[2:]
    return None


class Parsed(BaseException):
    """Raised once the command's parser has accepted the arguments (a BaseException, so no handler swallows it)."""


COMMANDS = [c for c in readme_commands() if not c.startswith(FOREIGN)]


def test_the_readme_has_commands():
    assert len(COMMANDS) >= 15 and any(c.startswith("make demo") for c in COMMANDS)


@pytest.mark.parametrize("command", COMMANDS)
def test_every_readme_command_is_accepted_as_written(command, monkeypatch):
    argv = shlex.split(command)
    while re.fullmatch(r"[A-Z_][A-Z0-9_]*=\S*", argv[0]):  # environment settings before the command
        argv = argv[1:]
    if argv[0] == "make":
        targets = set(re.findall(r"^([\w-]+):", (ROOT / "Makefile").read_text(), flags=re.M))
        assert set(argv[1:]) <= targets, f"Makefile has no target {set(argv[1:]) - targets}"
        return
    found = entry_point(argv)
    assert found is not None, f"not a command of this toolkit: {command}"
    main, args = found
    real = argparse.ArgumentParser.parse_args

    def parse_then_stop(self, args=None, namespace=None):
        raise Parsed(real(self, args, namespace))

    monkeypatch.setattr(argparse.ArgumentParser, "parse_args", parse_then_stop)
    with pytest.raises(Parsed):
        main(args)
    for arg in args:  # repository files and folders it names must exist (outputs/ ones are made by earlier commands)
        if re.match(r"^(configs|data|docs|scripts|benchmarks)/", arg):
            assert (ROOT / arg).exists(), f"{command}: {arg} does not exist in the repository"
