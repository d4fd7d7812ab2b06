"""Multi-concept composition on the embedded tiny pipeline: composition math, overlap, refusals,
regional sampling, concurrency, the compose command."""

from __future__ import annotations

import copy
import json
import threading

import numpy as np
import pytest
import torch
from concept_helpers import regional_attention_maps_are_confined, train_tiny_concept
from numeric import assert_close_to_signal, differ, same_image
from PIL import Image
from safetensors import safe_open
from safetensors.torch import save_file

from sbora.adapters import METHODS, AdapterConfig, active_adapters, adapted_layers, adapter_names, adapter_parameters, inject
from sbora.adapters.overlap import interference, overlap_rows, shared_indices
from sbora_diffusion.compose import (
    CompositionError,
    Composer,
    Region,
    compose,
    find_concepts,
    load_composition,
    main,
)
from sbora.configuration import CONFIG_DIR, ConfigError
from sbora_diffusion.regional import RegionError, box_mask, image_mask, parse_box

pytestmark = pytest.mark.numeric  # also run under other CPU kernels and 2 threads (make test-cpus, .ci/run)

RENDER = dict(steps=2, height=32, width=32)


@pytest.fixture(scope="module")
def outputs(tiny_pipe, tmp_path_factory):
    """alpha (slot 0), beta (slot 1) and gamma (slot 0 again: overlaps alpha), SBoRA-FA rank 4, seed 0."""
    root = tmp_path_factory.mktemp("compose") / "outputs"
    for name, slot in (("alpha", 0), ("beta", 1), ("gamma", 0)):
        train_tiny_concept(tiny_pipe, root, name, slot)
    return root


@pytest.fixture
def composer(tiny_pipe, outputs):
    """A fresh copy of the tiny pipeline with alpha and beta loaded."""
    c = Composer(copy.deepcopy(tiny_pipe))
    c.load(outputs / "alpha" / "sbora-fa" / "adapter.safetensors")
    c.load(outputs / "beta" / "sbora-fa" / "adapter.safetensors", weight=0.7)
    return c


def arrays(images):
    return [np.asarray(im) for im in images]


def base_weights(composer) -> dict[str, torch.Tensor]:
    return {f"{part}.{k}": v.clone() for part, model in zip(("unet", "te"), composer.parts)
            for k, v in model.state_dict().items() if ".cores." not in k}


# ----------------------------------------------------------------------------- composition math


def test_merged_equals_unmerged_and_unmerge_restores_the_base_bit_exactly(composer):
    unet = composer.pipe.unet
    selection = {"alpha": 1.0, "beta": 0.7}
    before = base_weights(composer)
    g = torch.Generator().manual_seed(0)
    x, ctx = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 77, 32, generator=g)
    with torch.no_grad(), active_adapters(composer.parts, selection):
        unmerged = unet(x, 10, ctx).sample
        composer.merge(selection)
        merged = unet(x, 10, ctx).sample
        bare_after_merge = unet(x, 10, ctx).sample
    assert not torch.equal(before["unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.base_layer.weight"],
                           unet.down_blocks[0].attentions[0].transformer_blocks[0].attn1.to_q.base_layer.weight)
    assert_close_to_signal(merged, unmerged)  # other kernels: equal up to round-off at the outputs' size
    assert torch.equal(merged, bare_after_merge)
    with pytest.raises(RuntimeError, match="merged"):  # a merged composition cannot be switched per call
        with active_adapters(composer.parts, {"alpha": 1.0}):
            pass
    with pytest.raises(RegionError, match="unmerged"):
        composer.render("x", [0], selection, regions=[Region("alpha", box=[0, 0, 1, 1])], **RENDER)
    composer.unmerge()
    after = base_weights(composer)
    assert after.keys() == before.keys() and all(torch.equal(after[k], before[k]) for k in before)
    with torch.no_grad(), active_adapters(composer.parts, selection):
        assert torch.equal(unet(x, 10, ctx).sample, unmerged)


def test_a_concept_in_another_slot_leaves_a_concepts_columns_untouched(composer):
    layers = adapted_layers(composer.pipe.unet)
    base = {p: layer.base_layer.weight.clone() for p, layer in layers.items()}
    composer.merge({"beta": 1.0})
    for p, layer in layers.items():
        I_alpha, I_beta = layer.cores["alpha"].indices, layer.cores["beta"].indices
        assert not set(I_alpha.tolist()) & set(I_beta.tolist())
        W = layer.base_layer.weight
        assert torch.equal(W[:, I_alpha], base[p][:, I_alpha]), p  # beta never writes alpha's columns
        assert not torch.equal(W[:, I_beta], base[p][:, I_beta]), p
    composer.unmerge()
    composer.merge({"alpha": 1.0, "beta": 1.0})
    for p, layer in layers.items():
        W, a, b = layer.base_layer.weight, layer.cores["alpha"], layer.cores["beta"]
        # alpha's columns hold exactly alpha's update, beta's exactly beta's, every other column the base
        assert torch.equal(W[:, a.indices], base[p][:, a.indices] + a.B * a.scale), p
        assert torch.equal(W[:, b.indices], base[p][:, b.indices] + b.B * b.scale), p
        rest = torch.ones(W.shape[1], dtype=torch.bool)
        rest[a.indices] = rest[b.indices] = False
        assert torch.equal(W[:, rest], base[p][:, rest]), p
    composer.unmerge()
    assert all(torch.equal(layer.base_layer.weight, base[p]) for p, layer in layers.items())


# ----------------------------------------------------------------------------- overlap


@pytest.mark.parametrize("method", ["sbora-fa", "sbora-fb", "ortho", "lora"])
def test_overlap_fires_on_shared_slots_and_stays_quiet_on_disjoint_ones(method, tiny_model):
    for name, slot in (("a", 0), ("b", 1), ("c", 0)):
        inject(tiny_model, AdapterConfig(method=method, rank=4, slot=slot, targets=["to_q", "to_v"]), name=name)
    with torch.no_grad():
        for p in adapter_parameters(tiny_model):
            p.normal_(generator=torch.Generator().manual_seed(p.numel()))
    disjoint = overlap_rows({"m": tiny_model}, ["a", "b"])
    same = overlap_rows({"m": tiny_model}, ["a", "c"])
    assert len(disjoint) == len(same) == 4  # 2 blocks x (to_q, to_v), both adapters on each
    for row in disjoint + same:  # the factor-space measure is the dense one
        layer = tiny_model.get_submodule(row["layer"])
        da, db = (layer.cores[n].delta_weight().double() for n in row["pair"])
        dense = (torch.minimum((da @ db.T).norm(), (da.T @ db).norm()) / (da.norm() * db.norm())).item()
        assert row["interference"] == pytest.approx(dense, abs=1e-6)  # float32 round-off of the dense ΔW
    if method == "lora":  # no slots: the same seed gives both the same A
        assert all(r["interference"] > 0.05 for r in disjoint)
    else:
        assert all(r["interference"] < 1e-6 for r in disjoint)
        assert all(r["interference"] > 0.05 for r in same)
    expected = {"sbora-fa": (0, 4), "sbora-fb": (0, 4)}.get(method, (None, None))
    assert {r["shared_indices"] for r in disjoint} == {expected[0]} and {r["shared_indices"] for r in same} == {expected[1]}


def test_composer_reports_overlap_per_layer_and_warns_above_the_threshold(composer, outputs):
    quiet = composer.overlap()
    assert quiet.rows and all(r["interference"] == 0.0 and r["shared_indices"] == 0 for r in quiet.rows)
    assert quiet.warnings() == [] and quiet.pairs()[0]["above"] == 0
    gamma = outputs / "gamma" / "sbora-fa" / "adapter.safetensors"
    with pytest.raises(CompositionError, match="(?s)'alpha'.*rank 4 slot 0.*'gamma'.*rank 4 slot 0.*--slot 2"):
        composer.load(gamma)  # the same slot twice: refused before sampling (adapters.slots.slot_clash)
    composer.load(gamma, allow_overlap=True)
    loud = composer.overlap(["alpha", "gamma"])
    (pair,) = loud.pairs()
    assert pair["pair"] == "alpha+gamma" and pair["above"] == pair["layers"] == len(adapted_layers(composer.pipe.unet))
    assert pair["shared_indices"] == 4 * pair["layers"] and pair["max_interference"] > 0.01
    (message,) = loud.warnings()
    assert "alpha and gamma" in message and "slot 0 twice" in message and "--slot" in message
    assert json.loads(json.dumps(loud.to_json()))["layers"][0]["pair"] == "alpha+gamma"


def test_shared_index_count_needs_cores_of_one_kind():
    fa = METHODS["sbora-fa"](16, 16, AdapterConfig(method="sbora-fa", rank=4), "x")
    fb = METHODS["sbora-fb"](16, 16, AdapterConfig(method="sbora-fb", rank=4), "x")
    assert shared_indices(fa, fb) is None and shared_indices(fa, fa) == 4
    assert interference(fa, fa) == 0.0  # untrained: a zero update interferes with nothing


# ----------------------------------------------------------------------------- refusals


def _corrupt_shape(src, dst):
    with safe_open(str(src), framework="pt") as f:
        meta, tensors = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
    key = next(k for k in tensors if k.endswith(".B"))
    tensors[key] = torch.zeros(tensors[key].shape[0] + 3, tensors[key].shape[1])
    save_file(tensors, str(dst), metadata=meta)
    return key


def test_composer_refuses_what_cannot_compose_and_leaves_the_pipeline_as_it_was(tiny_pipe, outputs, tmp_path):
    alpha = outputs / "alpha" / "sbora-fa" / "adapter.safetensors"
    pipe = copy.deepcopy(tiny_pipe)
    composer = Composer(pipe)
    composer.load(alpha)
    state = (adapter_names(pipe.unet), len(pipe.tokenizer), type(pipe.text_encoder.get_input_embeddings()))

    def unchanged():
        assert (adapter_names(pipe.unet), len(pipe.tokenizer), type(pipe.text_encoder.get_input_embeddings())) == state

    with pytest.raises(CompositionError, match="two concepts are named 'alpha'.*another name"):
        composer.load(alpha)
    unchanged()
    with pytest.raises(CompositionError, match="both claim token '<alpha1>'.*retrain one with another --token"):
        composer.load(alpha, name="alpha_again")
    unchanged()
    with pytest.raises(CompositionError, match="trained in slot 1, the composition says slot 2.*--slot 2"):
        composer.load(outputs / "beta" / "sbora-fa" / "adapter.safetensors", slot=2)
    unchanged()
    bad = tmp_path / "misfit" / "adapter.safetensors"
    bad.parent.mkdir()
    key = _corrupt_shape(outputs / "beta" / "sbora-fa" / "adapter.safetensors", bad)
    with pytest.raises(CompositionError, match=f"(?s)cannot join this composition.*{key}.*train it on this base model"):
        composer.load(bad)
    unchanged()
    other = Composer(copy.deepcopy(tiny_pipe))
    other.pipe.base_model_id = "pocket"
    with pytest.raises(CompositionError, match="trained on base model 'tiny', but this composition runs on 'pocket'.*retrain"):
        other.load(alpha)
    assert adapter_names(other.pipe.unet) == []
    with pytest.raises(CompositionError, match="no concept named 'zeta'"):
        composer.render("x", [0], {"zeta": 1.0}, **RENDER)
    with pytest.raises(RegionError, match="not part of this composition"):
        composer.render("x", [0], {}, regions=[Region("alpha", box=[0, 0, 1, 1])], **RENDER)


def test_unloading_a_concept_takes_its_token_and_keeps_the_others_working(composer, outputs):
    beta_alone = arrays(composer.render("a photo of <beta1> toy", [0], {"beta": 0.7}, **RENDER))
    composer.unload("alpha")
    assert "<alpha1>" not in composer.pipe.tokenizer.get_vocab() and adapter_names(composer.pipe.unet) == ["beta"]
    assert same_image(arrays(composer.render("a photo of <beta1> toy", [0], {"beta": 0.7}, **RENDER))[0], beta_alone[0])
    composer.load(outputs / "alpha" / "sbora-fa" / "adapter.safetensors", name="alpha")  # and back
    assert sorted(composer.concepts) == ["alpha", "beta"]


# ----------------------------------------------------------------------------- regional sampling


def test_one_full_image_region_equals_plain_composition(composer):
    prompt = "a photo of <alpha1> toy on the beach"
    plain = composer.render(prompt, [0, 1], {"alpha": 1.0}, **RENDER)
    regional = composer.render(prompt, [0, 1], {"alpha": 1.0}, regions=[Region("alpha", box=[0, 0, 1, 1], prompt=prompt)], **RENDER)
    assert all(same_image(a, b) for a, b in zip(arrays(plain), arrays(regional)))  # the regional processor's kernels: up to rounding
    sketched = composer.render(prompt, [0, 1], {"alpha": 1.0}, regions=[Region("alpha", mask=Image.new("L", (7, 5), 255), prompt=prompt)],
                               **RENDER)
    assert all(same_image(a, b) for a, b in zip(arrays(plain), arrays(sketched)))
    # A region of its own prompt changes the picture (the check above is not vacuous).
    other = composer.render(prompt, [0], {"alpha": 1.0}, regions=[Region("alpha", box=[0, 0, 1, 1], prompt="a red cube")], **RENDER)
    assert differ(arrays(other)[0], arrays(plain)[0])


@pytest.mark.parametrize("mode", ["cross", "attention"])
def test_with_two_regions_a_concepts_adapters_change_only_its_regions_attention_output(mode, composer):
    """The attention-level modes blend each cross-attention layer's output by the masks (the latent mode
    confines whole UNet calls instead: tested where the pixels land, test_placement.py)."""
    reference = regional_attention_maps_are_confined(composer, mode, context_dim=32)
    assert {m.shape[0] for m in reference.values()} == {8, 4}  # both attention resolutions of the UNet


def test_region_masks_and_boxes():
    assert torch.equal(box_mask([0, 0, 1, 1], 4, 6), torch.ones(4, 6))
    left = box_mask("0, 0, 0.5, 1", 4, 6)
    assert left[:, :3].eq(1).all() and left[:, 3:].eq(0).all()
    assert box_mask([0.1, 0.1, 0.35, 0.6], 4, 4)[0, 0].item() == pytest.approx(0.6 * 0.6)  # partial pixels: covered share
    for bad in ("1,2,3", [0, 0, 1.5, 1], "a b c d", [0.5, 0, 0.5, 1], [float("nan"), 0, 1, 1]):
        with pytest.raises(RegionError, match="four numbers"):
            parse_box(bad)
    for image in (Image.new("RGBA", (8, 8), (255, 0, 0, 255)), Image.new("1", (8, 8), 1), Image.new("RGB", (8, 8), "white").convert("P"),
                  Image.fromarray(np.full((8, 8), 65535, np.uint16)), Image.new("CMYK", (8, 8), (0, 0, 0, 0))):
        assert image_mask(image, 4, 4).min() > 0, image.mode
    clear = Image.new("RGBA", (8, 8), (255, 255, 255, 0))
    clear.paste((255, 255, 255, 255), (0, 0, 4, 8))  # strokes on a transparent canvas
    m = image_mask(clear, 4, 4)
    assert m[:, :2].eq(1).all() and m[:, 2:].eq(0).all()
    with pytest.raises(RegionError, match="covers no part"):
        image_mask(Image.new("L", (8, 8), 0), 4, 4)


# ----------------------------------------------------------------------------- concurrency


def test_two_compositions_from_two_threads_give_the_same_images_as_each_alone(composer):
    # Different selections, regions, step counts and guidance: nothing of one call may leak into the other.
    jobs = {
        "both, regional": dict(prompt="a photo of <alpha1> toy and <beta1> toy", seeds=[0, 1], weights={"alpha": 1.0, "beta": 0.7},
                               regions=[Region("alpha", box=[0, 0, 0.5, 1]), Region("beta", box=[0.5, 0, 1, 1])], steps=6),
        "beta alone": dict(prompt="a painting of <beta1> toy", seeds=[3], weights={"beta": 1.2}, steps=4, guidance_scale=3.0),
    }
    settings = dict(height=32, width=32)
    alone = {k: arrays(composer.render(**job, **settings)) for k, job in jobs.items()}
    assert differ(alone["both, regional"][0], alone["beta alone"][0])
    together, errors = {}, []
    barrier = threading.Barrier(len(jobs))

    def run(key):
        try:
            barrier.wait()
            together[key] = arrays(composer.render(**jobs[key], **settings))
        except Exception as e:  # reported below
            errors.append(e)

    threads = [threading.Thread(target=run, args=(k,)) for k in jobs]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    for key in jobs:
        assert all(same_image(a, b) for a, b in zip(alone[key], together[key])), key  # two threads share the kernels' thread pool


# ----------------------------------------------------------------------------- the command


def _yaml(path, outputs, **extra):
    lines = ["prompt: 'a photo of <alpha1> toy and <beta1> toy'", f"outputs: {outputs}", "model: tiny", "seeds: [0, 1]",
             "steps: 2", "height: 32", "width: 32", "concepts:",
             "  - {concept: alpha, slot: 0, region: [0, 0, 0.5, 1], prompt: 'a photo of <alpha1> toy'}",
             "  - {concept: beta, slot: 1, weight: 0.8, region: [0.5, 0, 1, 1]}"]
    lines += [f"{k}: {v}" for k, v in extra.items()]
    path.write_text("\n".join(lines) + "\n")
    return path


def test_compose_command_writes_images_manifest_and_overlap(outputs, tmp_path, capsys):
    config = _yaml(tmp_path / "pair.yaml", outputs)
    assert main(["--config", str(config), "--out", str(tmp_path / "out")]) == 0
    printed = capsys.readouterr().out
    assert "overlap alpha+beta: max interference 0" in printed and "wrote 2 images" in printed
    records = [json.loads(line) for line in (tmp_path / "out" / "manifest.jsonl").read_text().splitlines()]
    assert [(r["prompt"], r["seed"]) for r in records] == [("a photo of <alpha1> toy and <beta1> toy", s) for s in (0, 1)]
    assert [c["name"] for c in records[0]["concepts"]] == ["alpha", "beta"] and records[0]["mode"] == "unmerged"
    assert records[0]["concepts"][0]["region"] == [0, 0, 0.5, 1] and records[0]["concepts"][1]["weight"] == 0.8
    assert all(Image.open(tmp_path / "out" / r["image"]).size == (32, 32) for r in records)
    report = json.loads((tmp_path / "out" / "overlap.json").read_text())
    assert report["pairs"][0]["pair"] == "alpha+beta" and report["pairs"][0]["max_interference"] == 0
    # A missing concept says how to train it; a typo in the YAML names the field.
    missing = tmp_path / "missing.yaml"
    missing.write_text(config.read_text().replace("concept: beta, slot: 1", "concept: zeta, slot: 3"))
    assert main(["--config", str(missing)]) == 2
    assert "train it first: python train_concept.py --concept zeta --method sbora-fa --slot 3" in capsys.readouterr().err
    typo = tmp_path / "typo.yaml"
    typo.write_text(config.read_text().replace("region:", "regoin:"))
    assert main(["--config", str(typo)]) == 2
    assert "unknown field(s) regoin" in capsys.readouterr().err


def test_merged_composition_of_overlapping_concepts_warns_and_restores_the_pipeline(tiny_pipe, outputs, tmp_path):
    with pytest.raises(ConfigError, match="regions need mode: unmerged"):
        load_composition(_yaml(tmp_path / "c.yaml", outputs, mode="merged", out=tmp_path / "merged"))
    text = (tmp_path / "c.yaml").read_text().replace(", region: [0, 0, 0.5, 1]", "").replace(", region: [0.5, 0, 1, 1]", "")
    (tmp_path / "c.yaml").write_text(text.replace("concept: beta, slot: 1", "concept: gamma, slot: 0") + "allow_overlap: true\n")
    pipe = copy.deepcopy(tiny_pipe)

    def base():  # the UNet's own weights, under their names without adapters
        return {k.replace(".base_layer.", "."): v.clone() for k, v in pipe.unet.state_dict().items() if ".cores." not in k}

    before = base()
    with pytest.warns(UserWarning, match="alpha and gamma overlap"):
        result = compose(load_composition(tmp_path / "c.yaml"), pipe=pipe)
    assert result["images"] == 2 and result["overlap"][0]["above"] > 0
    after = base()
    assert adapter_names(pipe.unet) == ["alpha", "gamma"] and after.keys() == before.keys()
    assert all(torch.equal(after[k], v) for k, v in before.items())  # unmerged again after rendering
    assert json.loads((tmp_path / "merged" / "manifest.jsonl").read_text().splitlines()[0])["mode"] == "merged"


def test_shipped_compositions_and_the_concept_listing(outputs, tmp_path):
    shipped = sorted((CONFIG_DIR / "compositions").glob("*.yaml"))
    assert shipped
    for path in shipped:
        config = load_composition(path.stem)
        assert config.prompt and config.concepts and config.name == path.stem
        assert all(c.slot is not None for c in config.concepts)
        assert len({c.slot for c in config.concepts}) == len(config.concepts)  # disjoint by construction
    assert set(find_concepts(outputs)) == {"alpha/sbora-fa", "beta/sbora-fa", "gamma/sbora-fa"}
    (outputs / "compositions" / "x").mkdir(parents=True, exist_ok=True)  # other folders are not concepts
    outside = tmp_path / "elsewhere" / "adapter.safetensors"
    outside.parent.mkdir()
    outside.write_bytes((outputs / "alpha" / "sbora-fa" / "adapter.safetensors").read_bytes())
    (outputs / "linked" / "sbora-fa").mkdir(parents=True)
    (outputs / "linked" / "sbora-fa" / "adapter.safetensors").symlink_to(outside)  # a link out of the folder is not listed
    assert set(find_concepts(outputs)) == {"alpha/sbora-fa", "beta/sbora-fa", "gamma/sbora-fa"}
    assert find_concepts(tmp_path / "nowhere") == {}


# ----------------------------------------------------------------------------- output cross-talk


def test_composer_reports_output_crosstalk_beside_the_weight_overlap(composer, tiny_pipe, tmp_path):
    from sbora_diffusion.compose import Calibration

    report = composer.overlap()
    (pair,) = report.pairs()
    unet_layers = len(adapted_layers(composer.pipe.unet))
    assert pair["max_interference"] == 0 and pair["shared_indices"] == 0  # disjoint slots: nothing shared in W ...
    directions = {(d["inputs"], d["update"]): d for d in pair["crosstalk"]}
    assert set(directions) == {("alpha", "beta"), ("beta", "alpha")}
    assert all(d["median"] > 0.05 and d["layers"] == unet_layers for d in directions.values())  # ... yet each moves the other's outputs
    assert pair["median_crosstalk"] == max(d["median"] for d in directions.values())
    assert pair["max_crosstalk"] == max(d["max"] for d in directions.values())
    calibration = report.crosstalk["calibration"]
    assert calibration["alpha"]["source"] == "eval prompts" and "<alpha1>" in calibration["alpha"]["prompts"][0]
    assert 1 <= len(calibration["beta"]["prompts"]) <= 4
    # A layer's ratio is the dense ‖ΔW_beta Xᵀ‖ / ‖ΔW_alpha Xᵀ‖ on the inputs alpha's calibration run gives it.
    row = next(r for r in report.crosstalk["layers"] if (r["inputs"], r["update"]) == ("alpha", "beta"))
    layer = composer.pipe.unet.get_submodule(row["layer"])
    seen = []
    handle = layer.register_forward_pre_hook(lambda m, args: seen.append(args[0].detach().reshape(-1, args[0].shape[-1]).double()))
    try:
        with active_adapters(composer.parts, {"alpha": 1.0}):
            composer._calibration_run(calibration["alpha"]["prompts"], Calibration())
    finally:
        handle.remove()
    X = torch.cat(seen)
    dense = {n: (layer.cores[n].delta_weight().detach().double() @ X.T).norm().item() for n in ("alpha", "beta")}
    assert row["input_rows"] == X.shape[0]
    assert row["crosstalk"] == pytest.approx(dense["beta"] / dense["alpha"], rel=1e-6)
    assert row["own_rms"] == pytest.approx(dense["alpha"] / X.shape[0] ** 0.5, rel=1e-6)
    # Measured once: the next report reuses the runs.
    again = composer.overlap()
    assert again.crosstalk["seconds"] == 0.0 and again.crosstalk["layers"] == report.crosstalk["layers"]
    # Prompts the user gives (the token written out, or templates for every concept) replace the defaults.
    given = composer.overlap(calibration=Calibration(prompts={"alpha": ["a painting of <alpha1> toy in the snow"]},
                                                     templates=["a photo of {token} {class_word} at night"], steps=1))
    assert given.crosstalk["calibration"] == {"alpha": {"prompts": ["a painting of <alpha1> toy in the snow"], "source": "given"},
                                              "beta": {"prompts": ["a photo of <beta1> toy at night"], "source": "templates"}}
    assert given.crosstalk["seconds"] > 0 and given.crosstalk["layers"] != report.crosstalk["layers"]
    with pytest.raises(CompositionError, match="placeholder"):
        composer.overlap(calibration=Calibration(templates=["a photo of {thing}"]))
    # Weight overlap only, on request; nothing measured while merged.
    quick = composer.overlap(crosstalk=False)
    assert quick.crosstalk is None and quick.pairs()[0]["crosstalk"] is None and quick.pairs()[0]["max_crosstalk"] is None
    composer.merge({"alpha": 1.0, "beta": 1.0})
    try:
        merged = composer.overlap()
        assert merged.crosstalk["skipped"] and merged.pairs()[0]["crosstalk"] is None
        assert any("not measured" in line for line in merged.lines())
    finally:
        composer.unmerge()
    # A concept loaded later is measured against the others (their runs are redone with it).
    composer.load(train_tiny_concept(tiny_pipe, tmp_path / "outputs", "delta", slot=2))
    three = composer.overlap()
    assert len(three.pairs()) == 3 and all(p["crosstalk"] and len(p["crosstalk"]) == 2 for p in three.pairs())
    text = three.markdown()
    assert "weight overlap (max interference)" in text and "output cross-talk on calibration inputs" in text
    assert "says nothing about the outputs" in text and "Disjoint slots do not make it 0" in text
    saved = json.loads(json.dumps(three.to_json(), allow_nan=False))
    assert set(saved["meaning"]) == {"weight_overlap", "output_crosstalk"}
    assert {(r["inputs"], r["update"]) for r in saved["crosstalk"]["layers"]} == {
        (a, b) for a in ("alpha", "beta", "delta") for b in ("alpha", "beta", "delta") if a != b}


def test_compose_command_reports_crosstalk_on_the_calibration_prompts_given(outputs, tmp_path, capsys):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("# one prompt a line; {token} and {class_word} are filled in per concept\n\na photo of {token} {class_word} in the snow\n")
    config = _yaml(tmp_path / "pair.yaml", outputs, calibration_prompts_file=str(prompts), calibration_steps=1)
    config.write_text(config.read_text().replace("prompt: 'a photo of <alpha1> toy'}",
                                                 "prompt: 'a photo of <alpha1> toy', calibration_prompts: ['a painting of <alpha1> toy']}"))
    assert main(["--config", str(config), "--out", str(tmp_path / "out")]) == 0
    printed = capsys.readouterr().out
    assert "weight overlap alpha+beta: max interference 0 over" in printed
    assert "output cross-talk on calibration inputs, |dW_beta X_alpha| / |dW_alpha X_alpha|: median" in printed
    assert "output cross-talk on calibration inputs, |dW_alpha X_beta| / |dW_beta X_beta|: median" in printed
    report = json.loads((tmp_path / "out" / "overlap.json").read_text())
    talk = report["crosstalk"]
    assert talk["calibration"] == {"alpha": {"prompts": ["a painting of <alpha1> toy"], "source": "given"},
                                   "beta": {"prompts": ["a photo of <beta1> toy in the snow"], "source": "templates"}}
    assert talk["settings"]["steps"] == 1 and talk["settings"]["size"] == 64
    assert report["pairs"][0]["max_interference"] == 0 and report["pairs"][0]["median_crosstalk"] > 0
    assert {(r["inputs"], r["update"]) for r in talk["layers"]} == {("alpha", "beta"), ("beta", "alpha")}
    table = (tmp_path / "out" / "overlap.md").read_text()
    assert "| alpha+beta | 0 |" in table and "beta on alpha's inputs" in table and "a painting of <alpha1> toy" in table
    # --no-crosstalk: the weight overlap alone; a calibration file that is not there is an error before anything runs.
    assert main(["--config", str(config), "--out", str(tmp_path / "quick"), "--no-crosstalk"]) == 0
    assert "cross-talk on calibration" not in capsys.readouterr().out
    assert json.loads((tmp_path / "quick" / "overlap.json").read_text())["crosstalk"] is None
    assert main(["--config", str(config), "--calibration-prompts-file", str(tmp_path / "none.txt")]) == 2
    assert "cannot read calibration prompts" in capsys.readouterr().err
