"""The layering contract (docs/architecture.md), checked on the import graph of the installed
packages, counting every import, module-level or inside a function:

- the core (``sbora``) imports neither world;
- the worlds (``sbora_diffusion``, ``llm``) import the core and never each other;
- no module imports, directly or through others, a module that imports it back (a function-level
  import that dodges a cycle at import time is still a cycle here).
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CORE, WORLDS = "sbora", ("sbora_diffusion", "llm")


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> dict[str, Path]:
    return {module_name(p): p for top in (CORE, *WORLDS) for p in (ROOT / top).rglob("*.py")}


def imports_of(name: str, path: Path, known: set[str]) -> set[str]:
    """The package modules that `name` imports (a name imported from a package counts as its submodule when it is one)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")
                base = ".".join(parts[: len(parts) - node.level + 1] + ([base] if base else []))
            targets = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in known else base for alias in node.names]
        else:
            continue
        for target in targets:
            while target and target not in known:  # `import a.b.c` of a package module: its nearest known module
                target = target.rpartition(".")[0]
            if target and target != name:
                found.add(target)
    return found


@pytest.fixture(scope="module")
def graph() -> dict[str, set[str]]:
    mods = modules()
    return {name: imports_of(name, path, set(mods)) for name, path in mods.items()}


def top(name: str) -> str:
    return name.split(".")[0]


def test_the_core_imports_no_world(graph):
    upward = sorted(f"{m} -> {t}" for m, ts in graph.items() if top(m) == CORE for t in ts if top(t) in WORLDS)
    assert not upward, "the core imports a world:\n" + "\n".join(upward)


def test_the_worlds_do_not_import_each_other(graph):
    across = sorted(f"{m} -> {t}" for m, ts in graph.items() if top(m) in WORLDS for t in ts if top(t) in WORLDS and top(t) != top(m))
    assert not across, "a world imports the other:\n" + "\n".join(across)


def test_no_import_cycles(graph):
    """Tarjan's strongly connected components: every component must be a single module."""
    index, low, stack, on_stack, cycles = {}, {}, [], set(), []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    assert not cycles, "import cycles:\n" + "\n".join(" <-> ".join(c) for c in cycles)


def test_the_graph_is_read(graph):
    """The checks above see real edges: the worlds import the core, the core's modules each other."""
    assert "sbora.adapters" in graph["llm.train"] and "sbora.engine" in graph["sbora_diffusion.concept.train"]
    assert "sbora.configuration" in graph["sbora.adapters.config"]
    assert "sbora_diffusion.world" in graph["sbora_diffusion.models"]  # a function-level import counts


def closure(graph: dict[str, set[str]], start: str) -> set[str]:
    seen, todo = set(), [start]
    while todo:
        for t in graph[todo.pop()] - seen:
            seen.add(t)
            todo.append(t)
    return seen


def test_the_command_frame_does_not_load_the_training_loop(graph):
    """Every command's error handler (sbora.cli) must not pull in the engine."""
    assert "sbora.engine" not in closure(graph, "sbora.cli")
    assert "sbora.engine" in closure(graph, "llm.train")  # the closure follows edges


@pytest.mark.parametrize("trainer", ["sbora_diffusion/concept/train.py", "llm/train.py"])
def test_each_trainer_is_only_its_task(trainer):
    """A trainer brings its data and loss as a Task; the loop, options, run folder and pipeline set-up live elsewhere
    (docs/architecture.md). Its size is the symptom of that: at most 150 lines with its docstring."""
    lines = (ROOT / trainer).read_text(encoding="utf-8").splitlines()
    assert len(lines) <= 150, f"{trainer} has {len(lines)} lines: move what is not its task's data and loss to its own module"
    assert "(Task):" in "\n".join(lines)


def test_the_old_import_paths_of_moved_modules_still_work():
    """The documented Python API before the split (sbora_diffusion.adapters…) imports the same objects, with a warning naming the new place."""
    code = (
        "import warnings, sys; warnings.simplefilter('error', DeprecationWarning)\n"
        "try:\n    import sbora_diffusion.adapters\nexcept DeprecationWarning as w:\n    print(w)\n"
        "warnings.simplefilter('ignore')\n"
        "from sbora_diffusion.adapters.inject import replace_module\n"
        "from sbora_diffusion.adapters import AdaptedLinear\n"
        "from sbora_diffusion.concepts import load_concept\n"
        "from sbora_diffusion.engine import Engine\n"
        "import sbora.adapters, sbora.engine, sbora_diffusion.concept.config as cc\n"
        "print(AdaptedLinear is sbora.adapters.AdaptedLinear, replace_module is sys.modules['sbora.adapters.inject'].replace_module,\n"
        "      load_concept is cc.load_concept, Engine is sbora.engine.Engine, sbora.adapters.__spec__.name)\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-2000:]
    first, second = done.stdout.strip().splitlines()
    assert first == "sbora_diffusion.adapters moved to sbora.adapters; import it from there"
    assert second == "True True True True sbora.adapters"  # the new modules themselves are untouched
