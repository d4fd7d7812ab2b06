"""The method registry (``adapters/registry.py``) walked spec by spec, each capability checked through the real
entry points: the YAML files and cores, the concept trainer's command line and the app's Train check (they accept
exactly the same methods), the LLM trainer, export (every claimed format written, an unclaimed one refused
clearly), composition (disjoint slots compose with zero weight overlap; a slot taken twice is refused) and the
benchmarks' label tables."""

from __future__ import annotations

import copy
import dataclasses
import re

import pytest
from concept_helpers import QUICK_YAML, photos, train_tiny_concept

from sbora.adapters import METHODS, AdapterConfig, load_adapter_config, read_adapter
from sbora.adapters.config import DEFAULT_METHOD, LAYOUTS, TARGET_PRESETS
from sbora.adapters.registry import (
    CONCEPT,
    EXPORT_FORMATS,
    LLM,
    METHOD_SPECS,
    REFERENCE_METHOD,
    SLOT_SPACES,
    composable_methods,
    labels,
    spec_of,
    trained_methods,
)
from sbora.configuration import CONFIG_DIR, ConfigError

SPECS = list(METHOD_SPECS)
CONCEPT_METHODS = trained_methods(CONCEPT)
QUICK = ["--model", "tiny", "--rank", "4", "--steps", "2", "--resolution", "32", "--sample-steps", "1", "--num-validation-images", "1",
         "--lr", "1e-2", "--checkpoint-every", "0"]


# ---- what each spec says, against the YAML files and the cores ----------------------------------


def test_every_method_yaml_is_a_spec_and_every_spec_has_its_yaml():
    assert {s.yaml for s in METHOD_SPECS.values()} == {p.stem for p in (CONFIG_DIR / "methods").glob("*.yaml")}
    assert METHODS == {s.name: s.core for s in METHOD_SPECS.values() if s.base is None}  # the core table is the registry's
    assert DEFAULT_METHOD in METHODS and REFERENCE_METHOD in METHODS


@pytest.mark.parametrize("name", SPECS)
def test_spec_matches_its_yaml_and_core(name):
    spec = METHOD_SPECS[name]
    config = load_adapter_config(spec.yaml)
    assert config.method == spec.config_method and METHODS[config.method] is (spec.core or METHODS[spec.base])
    assert config.delta == spec.delta  # delta-lora's YAML is LoRA with Delta-LoRA on; no other method's is
    assert spec_of(config).name == (spec.base if spec.peft_backed else name)
    if spec.targets:  # the preset its method needs is the one its YAML sets
        assert config.targets == [spec.targets] and spec.targets in TARGET_PRESETS
    assert spec.slot_side in (*SLOT_SPACES, None) and set(spec.layouts) <= set(LAYOUTS)
    assert spec.composable == (spec.slot_side is not None) and (not spec.layouts or spec.composable)
    assert set(spec.export_formats) <= set(EXPORT_FORMATS) and all(t in (CONCEPT, LLM) for t in spec.trainers)
    assert spec.peft_backed == (spec.core is None) and spec.delta_capable == (not spec.peft_backed)
    if spec.base is not None:
        assert spec.base in METHODS
    core = METHODS[spec.config_method]
    if not spec.peft_backed:  # low_rank: the core's factor rank follows --rank; a dense core's does not
        ranks = {r: core(24, 32, AdapterConfig(method=spec.config_method, rank=r), "x").lora_factors()[0].shape[0] for r in (2, 4)}
        assert (ranks[2] != ranks[4]) == spec.low_rank


def test_every_spec_has_one_label_and_the_label_rules():
    assert all(s.label for s in METHOD_SPECS.values()) and len({s.label for s in METHOD_SPECS.values()}) == len(METHOD_SPECS)
    # "(ours)" only beside peft's implementation of the same method
    peft = [s.name for s in METHOD_SPECS.values() if s.baseline_of]
    assert peft and all(labels([p, METHOD_SPECS[p].baseline_of])[METHOD_SPECS[p].baseline_of].endswith(" (ours)") for p in peft)
    assert labels(CONCEPT_METHODS) == {m: METHOD_SPECS[m].label for m in CONCEPT_METHODS}  # no peft twin in the table: plain labels


def test_benchmark_label_tables_come_from_the_registry():
    from benchmarks import fa_paths, hot_swap, inference, quality, train_cost
    from benchmarks.common import OUR_METHODS, REFERENCE

    assert set(quality.METHODS) - {quality.DIFFORA} == set(CONCEPT_METHODS)  # every method the concept trainer trains
    for table in (quality.LABELS, quality.MULTI_LABELS, train_cost.LABELS, inference.METHODS):
        for key, text in table.items():
            if key in METHOD_SPECS:
                assert text.startswith(METHOD_SPECS[key].label), (key, text)
    assert set(quality.MULTI_METHODS) == {REFERENCE_METHOD, *composable_methods()}
    assert {k.partition("@")[0] for k in hot_swap.METHODS} == {REFERENCE, REFERENCE_METHOD, *composable_methods()}
    assert all(METHOD_SPECS[m].core is not None and METHOD_SPECS[m].low_rank for m in OUR_METHODS)
    assert fa_paths.VARIANTS[REFERENCE][1] == METHOD_SPECS[REFERENCE].label
    assert quality.SLOT_METHODS == {n: METHOD_SPECS[m].slot_dim for n, (m, _) in quality.METHODS.items() if METHOD_SPECS[m].composable}


# ---- the concept trainer and the app accept exactly the same methods -----------------------------


@pytest.fixture(scope="module")
def studio(tiny_pipe, tmp_path_factory):
    from sbora_diffusion.app import AppConfig, Studio

    root = tmp_path_factory.mktemp("methods-app")
    (root / "quick.yaml").write_text(QUICK_YAML)
    studio = Studio(AppConfig(outputs=str(root / "outputs"), model="tiny", train_config=str(root / "quick.yaml")), pipe=copy.deepcopy(tiny_pipe))
    yield studio, root
    studio.close()


@pytest.mark.parametrize("name", SPECS)
def test_the_concept_trainer_and_the_app_accept_exactly_the_same_methods(name, studio, tmp_path, capsys):
    from sbora_diffusion.app import AppInputError
    from sbora_diffusion.concept.cli import main

    trained = METHOD_SPECS[name].trained_by(CONCEPT)
    folder = photos(tmp_path / "photos", "alpha")
    code = main(["--concept", str(folder), "--method", name, "--output-dir", str(tmp_path / "cli"), *QUICK])
    err = capsys.readouterr().err
    assert code == (0 if trained else 2), err
    if not trained:
        assert f"method '{name}'" in err and "not by the concept trainer" in err and not (tmp_path / "cli").exists()
    app, root = studio
    safe = re.sub(r"[^a-z0-9]", "", name)
    if trained:
        job = app.start_training(name=f"c{safe}", class_word="toy", photos=sorted(map(str, folder.iterdir())), method=name, rank=4)
        assert job.finished.wait(120) and job.status == "done", job.error
        assert f"c{safe}/{name}" in app.cards()
    else:
        with pytest.raises(AppInputError, match="unknown method"):
            app.start_training(name=f"c{safe}", class_word="toy", photos=sorted(map(str, folder.iterdir())), method=name, rank=4)


def test_the_app_lists_exactly_the_concept_trainers_methods():
    from sbora_diffusion.app import TRAINED_METHODS

    assert sorted(TRAINED_METHODS) == sorted(CONCEPT_METHODS) and "delta-lora" in TRAINED_METHODS  # the command line trains it


@pytest.mark.parametrize("name", SPECS)
def test_the_llm_trainer_takes_its_methods_and_refuses_the_others(name, tmp_path, capsys):
    from llm import train as llm_train
    from sbora.configuration import from_dict

    spec = METHOD_SPECS[name]
    if spec.trained_by(LLM):
        config = from_dict(llm_train.TrainConfig, {"method": name}, source="test")
        assert config.peft_backed == spec.peft_backed and config.adapter_config().method == spec.config_method
        assert config.adapter_config().targets == ["llama"]  # the trainer's preset, not the method YAML's
    else:
        assert llm_train.main(["--method", name, "--output-dir", str(tmp_path / "x")]) == 2
        assert f"method '{name}'" in capsys.readouterr().err and not (tmp_path / "x").exists()
    if spec.trained_by(LLM) and not spec.delta_capable:  # peft's layers: --delta refused
        with pytest.raises(ConfigError, match="--delta"):
            from_dict(llm_train.TrainConfig, {"method": name, "delta": True}, source="test")


# ---- export: every claimed format is written, an unclaimed one is refused clearly -----------------


@pytest.fixture(scope="module")
def trained(tiny_pipe, tmp_path_factory):
    """For every method the concept trainer trains: alpha (slot 0), beta (slot 1), gamma (slot 0 again), rank 4, seed 0."""
    outputs = tmp_path_factory.mktemp("methods") / "outputs"
    return {m: {c: train_tiny_concept(tiny_pipe, outputs, c, slot, method=m) for c, slot in (("alpha", 0), ("beta", 1), ("gamma", 0))}
            for m in CONCEPT_METHODS}


@pytest.mark.parametrize("name", CONCEPT_METHODS)
def test_concept_adapters_export_to_every_claimed_format(name, trained, tmp_path, capsys):
    from sbora.export import main

    spec = METHOD_SPECS[name]
    adapter = trained[name]["alpha"]
    assert spec_of(read_adapter(adapter).config).name == name
    for fmt in EXPORT_FORMATS:
        out = tmp_path / (f"{fmt}.safetensors" if fmt != "peft" else fmt)
        code = main(["--adapter", str(adapter), "--format", fmt, "--out", str(out)])
        err = capsys.readouterr().err
        if fmt in spec.export_formats:
            assert code == 0 and out.exists(), err
        else:
            assert code == 2 and f"--method {name}" in err and not out.exists()


def test_export_asks_the_registry(trained, tmp_path, capsys, monkeypatch):
    """A format a method's spec does not claim is refused by export before anything is written."""
    from sbora.export import main

    monkeypatch.setitem(METHOD_SPECS, "lora", dataclasses.replace(METHOD_SPECS["lora"], export_formats=("peft",)))
    out = tmp_path / "lora.safetensors"
    assert main(["--adapter", str(trained["lora"]["alpha"]), "--format", "kohya", "--out", str(out)]) == 2
    assert "exports to peft, not kohya" in capsys.readouterr().err and not out.exists()


@pytest.mark.parametrize("name", [m for m, s in METHOD_SPECS.items() if s.peft_backed])
def test_peft_baselines_export_as_their_spec_says(name, tmp_path, capsys):
    """peft's own layers on an LLM (the LLM trainer's path, ``llm/peft_dora.py``): a plain peft LoRA folder exports
    (as LoRA); a DoRA folder exports to no format and is refused, naming the method."""
    from llm_helpers import save_tiny_base
    from transformers import AutoModelForCausalLM

    from llm.peft_dora import inject_dora, save_dora
    from sbora.export import main

    spec = METHOD_SPECS[name]
    base = save_tiny_base(tmp_path / "base")
    model = AutoModelForCausalLM.from_pretrained(base)
    adapter = load_adapter_config(spec.yaml, rank=2, targets=["llama"])
    inject_dora(model, adapter, "t", spec.peft_config)
    save_dora(model, tmp_path / "adapter", adapter, "t", base_model=str(base), options=spec.peft_config)
    out = tmp_path / "out"
    code = main(["--adapter", str(tmp_path / "adapter"), "--format", "peft", "--out", str(out)])  # an LLM adapter: peft only
    err = capsys.readouterr().err
    if "peft" in spec.export_formats:
        assert code == 0 and (out / "adapter_model.safetensors").exists(), err
    else:
        assert code == 2 and f"--method {name}" in err and "no format" in err and not out.exists()


# ---- composition: disjoint slots compose with zero weight overlap ---------------------------------


@pytest.mark.parametrize("name", CONCEPT_METHODS)
def test_composable_methods_compose_in_disjoint_slots_with_zero_overlap(name, trained, tiny_pipe):
    from sbora_diffusion.compose import Composer, CompositionError

    spec = METHOD_SPECS[name]
    files = trained[name]
    composer = Composer(copy.deepcopy(tiny_pipe))
    composer.load(files["alpha"])
    composer.load(files["beta"])  # slots 0 and 1 of one seed
    (pair,) = composer.overlap(["alpha", "beta"]).pairs()
    if spec.composable:
        assert pair["max_interference"] < 1e-6
        with pytest.raises(CompositionError, match="slot 0"):
            composer.load(files["gamma"])  # slot 0 again: refused before sampling
    else:  # no slots: one seed's adapters overlap, and nothing is refused
        assert pair["max_interference"] > 1e-3
        composer.load(files["gamma"])


def test_composition_messages_name_the_registrys_slot_methods():
    from sbora.adapters.registry import or_list

    assert or_list(composable_methods()) == ", ".join(composable_methods()[:-1]) + " or " + composable_methods()[-1]
    assert all(METHOD_SPECS[m].slot_space for m in composable_methods())


def test_delta_applies_to_every_core(tiny_model):
    from sbora.adapters import adapted_layers, inject

    for name, spec in METHOD_SPECS.items():
        if spec.delta_capable and spec.base is None:
            model = copy.deepcopy(tiny_model)
            inject(model, AdapterConfig(method=name, rank=2, targets=["to_q"], delta=True), name="d")
            assert all(hasattr(layer.cores["d"], "start_delta") for layer in adapted_layers(model, "d").values())
