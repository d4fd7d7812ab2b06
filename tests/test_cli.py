"""The command frame (``sbora/cli.py``) under every command: each installed script, ``train_concept.py``
and the benchmarks is a declared ``Command``; its --help gives every option's value and where it comes
from; an unknown option is one line and exit 2; every other name of an option means that option."""

from __future__ import annotations

import argparse
import importlib
import re
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from sbora.cli import COMMAND_LINE, Command, Flag, Section, build_parser, command_aliases, parse
from sbora.configuration import ConfigError

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
# what a command needs to read its configs at all (its required YAML), so that an alias is compared on real values
NEEDS = {"train_concept.py": ["--concept", "robot"], "sbora-train-concept": ["--concept", "robot"], "sbora-compose": ["--config", "robot_duck"]}
BENCHMARKS = {"fa_paths": "FAPathsConfig", "hot_swap": "HotSwapConfig", "inference": "InferenceConfig", "llm_multitask": "MultitaskConfig",
              "llm_quality": "LLMQualityConfig", "placement": "PlacementConfig", "quality": "QualityConfig", "train_cost": "TrainCostConfig"}


def script_command(target: str) -> Command:
    module, _, func = target.partition(":")
    module = importlib.import_module(module)
    assert getattr(module, func) == module.COMMAND.main, f"{target} is not its module's COMMAND"  # every script runs on the frame
    return module.COMMAND


def benchmark_command(name: str) -> Command:
    from benchmarks.common import benchmark_command

    module = importlib.import_module(f"benchmarks.{name}")
    return benchmark_command(name, module.__doc__, getattr(module, BENCHMARKS[name]), module.PRESETS)


def every_command() -> dict[str, tuple[Command, list[str]]]:
    """name -> (the command, the argv words that reach it: a subcommand's name)."""
    found = {"train_concept.py": (script_command("sbora_diffusion.concept.cli:main"), [])}
    for script, target in SCRIPTS.items():
        command = script_command(target)
        found.update({f"{script} {n}": (command, [n]) for n in command.subcommands} if command.subcommands else {script: (command, [])})
    found.update({f"benchmarks.{name}": (benchmark_command(name), []) for name in BENCHMARKS})
    return found


COMMANDS = every_command()


def reached(command: Command, words: list[str]) -> Command:
    return command.subcommands[words[0]] if words else command


def options(parser: argparse.ArgumentParser) -> dict[str, str]:
    """--option -> its help text, for every option of the parser but --help."""
    return {a.option_strings[-1]: a.help for a in parser._actions if a.option_strings and a.option_strings[-1] != "--help"}


def test_every_script_and_the_trainer_are_listed():
    assert {"sbora-llm-train", "sbora-generate", "sbora-export", "sbora-app", "sbora-compose", "train_concept.py",
            "sbora-evaluate score", "sbora-evaluate table", "benchmarks.train_cost"} <= set(COMMANDS)


@pytest.mark.parametrize("name", COMMANDS)
def test_help_lists_every_option_with_its_value_and_source(name, capsys):
    command, words = COMMANDS[name]
    with pytest.raises(SystemExit) as done:
        command.main([*words, "--help"])
    assert done.value.code == 0
    text = " ".join(capsys.readouterr().out.split())
    helps = options(build_parser(reached(command, words)))
    assert "--debug" in helps and len(helps) > 1
    for option, help_ in helps.items():
        assert option in text
        assert re.search(r"\((default: [^;()]*(\([^)]*\))?[^;()]*; [^()]+|required)\)$", help_), f"{option}: {help_}"
        assert "(default: None" not in help_


@pytest.mark.parametrize("name", COMMANDS)
def test_an_unknown_option_is_one_line_and_exit_2(name, capsys):
    command, words = COMMANDS[name]
    assert command.main([*words, "--no-such-option", "1"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: unrecognized arguments: --no-such-option 1") and err.count("\n") == 1, err


def outcome(command: Command, argv: list[str]):
    """The configs `argv` gives, or the error it is (a config that cannot be read is one, for both spellings alike)."""
    try:
        parsed = parse(command, argv)
    except ConfigError as e:
        return "error", str(e)
    return "parsed", parsed.configs, parsed.overrides, {k: v for k, v in vars(parsed.args).items()}


@pytest.mark.parametrize("name", [n for n, (c, w) in COMMANDS.items() if command_aliases(reached(c, w))])
def test_every_alias_means_its_option(name, capsys):
    command, words = COMMANDS[name]
    sub = reached(command, words)
    parser = build_parser(sub)
    actions = {a.option_strings[-1]: a for a in parser._actions if a.option_strings}
    required = [*NEEDS.get(name, []), *(w for f in sub.flags if f.required for w in (f"--{f.name}", "x"))]
    for alias, option in command_aliases(sub).items():
        action = actions[f"--{option}"]
        value = [] if action.nargs == 0 else ["latest"] if action.nargs == "?" else ["1"]
        ours = outcome(command, [*words, *required, f"--{option}", *value])
        assert outcome(command, [*words, *required, f"--{alias}", *value]) == ours, f"--{alias} vs --{option}"
        assert outcome(command, [*words, *required, f"--{alias.replace('-', '_')}", *value]) == ours
        if ours[0] == "parsed" and value:  # the value reached the option's field or flag
            given = {k for section in ours[2].values() for k in section} | {k for k, v in ours[3].items() if v in (value[0], [value[0]], True)}
            assert option.replace("-", "_") in given, f"--{alias}"


# ---------------------------------------------------------------------------- the frame's own rules, on a toy command


@dataclass
class Inner:
    rank: int = field(default=4, metadata={"help": "a rank"})
    slot: int = field(default=0, metadata={"help": "a slot", "aliases": ("position",)})


@dataclass
class Outer:
    steps: int = field(default=10, metadata={"help": "steps", "aliases": ("max-train-steps",)})
    tags: list[str] = field(default_factory=list, metadata={"help": "tags"})
    inner: dict = field(default_factory=dict, metadata={"help": "Inner overrides"})


def toy(tmp_path: Path) -> Command:
    (tmp_path / "base.yaml").write_text("steps: 20\ninner: {rank: 8}\n")
    return Command("toy", "A toy.", lambda invocation: None, sections=(
        Section("outer", Outer, option="config", default=str(tmp_path / "base.yaml"), option_help="the YAML"),
        Section("inner", Inner, defaults=({"slot": 1}, "the toy's default"), nested_in=("outer", "inner")),
    ), flags=(Flag("name", "a name", required=True),), resumable=True)


def test_layers_sources_and_nesting(tmp_path):
    command = toy(tmp_path)
    parsed = parse(command, ["--name", "n", "--position", "3", "--tags", "a,b", "--tags", "c", "--max_train_steps=5", "--resume_from_checkpoint", "latest"])
    outer, inner = parsed.configs["outer"], parsed.configs["inner"]
    assert (outer.steps, outer.tags, outer.inner) == (5, ["a", "b", "c"], {"rank": 8, "slot": 3})  # a list option accumulates; nested values merge
    assert (inner.rank, inner.slot) == (8, 3) and parsed.resume is True and parsed.args.name == "n"
    helps = options(build_parser(command, ["--slot", "2"]))
    assert helps["--steps"].endswith(f"(default: 20; from {tmp_path / 'base.yaml'})")
    assert helps["--rank"].endswith(f"(default: 8; from {tmp_path / 'base.yaml'})")  # the mapping nested in the outer YAML
    assert helps["--slot"].endswith(f"(default: 2; {COMMAND_LINE})") and helps["--name"].endswith("(required)")
    assert options(build_parser(command))["--slot"].endswith("(default: 1; the toy's default)")


def test_errors_name_what_to_do(tmp_path):
    command = toy(tmp_path)
    with pytest.raises(ConfigError, match="give --name: a name"):
        parse(command, [])
    with pytest.raises(ConfigError, match="did you mean --rank"):
        parse(command, ["--name", "n", "--rnak", "2"])
    (tmp_path / "bad.yaml").write_text("rank: 3\n")
    with pytest.raises(ConfigError, match="unknown field.*rank.*put rank under inner:"):
        parse(command, ["--name", "n", "--config", str(tmp_path / "bad.yaml")])
    help_ = build_parser(command, ["--config", str(tmp_path / "bad.yaml")]).format_help()
    assert "its values could not be read" in help_  # --help still works, saying why the YAML's values are missing


HEAVY = ("diffusers", "transformers", "gradio", "open_clip", "peft", "accelerate")  # seconds to import each


def test_help_answers_without_importing_the_model_libraries():
    """`--help` of every script but the app (whose page is built from gradio) and of train_concept.py imports none of
    HEAVY, so it answers in the time torch takes to import: train_concept.py's took 16 s here, the LLM commands' 10 s."""
    import subprocess
    import sys

    targets = ["sbora_diffusion.concept.cli:main", *(t for s, t in SCRIPTS.items() if s != "sbora-app")]
    code = ("import contextlib, importlib, io, sys\n"
            f"for target in {targets!r}:\n"
            "    module, _, func = target.partition(':')\n"
            "    with contextlib.redirect_stdout(io.StringIO()) as out:\n"
            "        try:\n            getattr(importlib.import_module(module), func)(['--help'])\n"
            "        except SystemExit:\n            pass\n"
            "    assert 'usage' in out.getvalue().lower(), (target, out.getvalue()[:200])\n"
            f"print(sorted(m for m in {HEAVY!r} if m in sys.modules))\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip().splitlines()[-1] == "[]"
