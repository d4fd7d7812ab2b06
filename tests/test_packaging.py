"""Packaging: a non-editable install carries its configs; the CPU path needs no bitsandbytes;
nothing goes through transformers' own peft integration."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run_python(code: str, cwd: Path, pythonpath: str | None = None) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    if pythonpath:
        env["PYTHONPATH"] = pythonpath
    return subprocess.run([sys.executable, "-c", code], cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


def test_a_built_wheel_finds_its_configs_from_anywhere(tmp_path):
    """Build the wheel as `pip install .` would, unpack it, and use it from another folder with
    the repository out of sight: the method, training and model configs must come with it."""
    # Built from a copy of the files git would commit: a build in the checkout would leave an egg-info there
    # that shadows the editable install's metadata (its entry points) for every later command.
    source, wheels = tmp_path / "source", tmp_path / "wheels"
    tracked = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=ROOT, capture_output=True, check=True).stdout.decode().split("\0")
    for name in filter(None, tracked):
        if (ROOT / name).is_file():
            (source / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, source / name)
    done = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-w", str(wheels), str(source)],
                          capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-2000:]
    (wheel,) = wheels.glob("sbora_diffusion-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    for shipped in ("sbora/configs/methods/sbora-fa.yaml", "sbora/configs/train/default.yaml",
                    "sbora/configs/models/sd15-unet.json", "sbora/configs/llm/train.yaml",
                    "sbora/configs/train/pocket.yaml"):
        assert shipped in names, shipped
    assert not [n for n in names if n.startswith(("apps/", "benchmarks/", "tests/"))]  # the top layer stays in the checkout
    (entry_points,) = [n for n in names if n.endswith(".dist-info/entry_points.txt")]
    assert "[sbora.exporters]" in zipfile.ZipFile(wheel).read(entry_points).decode()
    from sbora_diffusion.world import WEIGHTS_DIR

    shipped_weights = sorted(str(p.relative_to(ROOT)) for p in WEIGHTS_DIR.rglob("*") if p.is_file())
    assert any(p.endswith(".safetensors") for p in shipped_weights)
    assert set(shipped_weights) <= set(names)  # the pocket base and CLIP, every file
    site = tmp_path / "site"
    zipfile.ZipFile(wheel).extractall(site)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    code = (
        "import sbora, sbora_diffusion, sys; from pathlib import Path;"
        "from sbora.adapters import load_adapter_config, METHODS;"
        "from sbora.configuration import CONFIG_DIR;"
        "assert Path(sbora_diffusion.__file__).is_relative_to(Path.cwd().parent / 'site'), sbora_diffusion.__file__;"
        "assert CONFIG_DIR == Path(sbora.__file__).parent / 'configs', CONFIG_DIR;"
        "[load_adapter_config(m) for m in METHODS];"
        "from sbora.cli import parse; from llm.train import COMMAND; print(parse(COMMAND, []).configs['config'].steps)"
    )
    result = run_python(code, cwd=elsewhere, pythonpath=str(site))
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip() == "300"


def test_the_cpu_path_works_without_bitsandbytes(tmp_path):
    """bitsandbytes is the [cuda] extra: int8 QSBoRA (auto on the CPU) must not need it."""
    code = (
        "import sys; sys.modules['bitsandbytes'] = None;"  # any import of it now fails
        "sys.path.insert(0, 'tests');"
        "from llm_helpers import tiny_llama, tiny_tokenizer; from llm.quant import quantize_model, resolve_mode;"
        "import torch; tok = tiny_tokenizer(); m = tiny_llama(tok);"
        "assert resolve_mode('auto') == 'int8' and quantize_model(m, 'auto') == 14;"
        "print(m(torch.tensor([[5, 6, 7]])).logits.shape)"
    )
    result = run_python(code, cwd=ROOT, pythonpath=str(ROOT))
    assert result.returncode == 0, result.stderr[-2000:]
    assert "torch.Size([1, 3, 259])" in result.stdout
    nf4 = run_python("import sys; sys.modules['bitsandbytes'] = None; import torch; from llm.quant import quantize_model;"
                     "quantize_model(torch.nn.Sequential(torch.nn.Linear(4, 4)), 'nf4')", cwd=ROOT, pythonpath=str(ROOT))
    assert nf4.returncode != 0 and "pip install .[cuda]" in nf4.stderr


def test_dependencies_are_declared_as_the_readme_says():
    import tomllib

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert isinstance(project["license"], str)  # SPDX string form (the table form is deprecated)
    assert not any(d.startswith("bitsandbytes") for d in project["dependencies"])
    assert any(d.startswith("bitsandbytes") for d in project["optional-dependencies"]["cuda"])
    assert "pytest" in " ".join(project["optional-dependencies"]["test"])
