"""Gradient fusion (Mix-of-Show, Gu et al., NeurIPS 2023; sbora_diffusion/fusion.py): the closed-form
least squares on small models with inputs we choose, then on the embedded tiny pipeline, through
the composer, the compose command and the app's Studio."""

from __future__ import annotations

import collections
import copy
import dataclasses
import json

import pytest
import torch
from concept_helpers import photos, quick_config, train_tiny_concept
from numeric import same_image
from PIL import Image
from torch import nn

from sbora_diffusion.app import AppConfig, AppInputError, Studio
from sbora.adapters import AdapterConfig, adapted_layers, adapter_names, adapter_parameters, inject
from sbora.adapters.scope import current_selection
from sbora_diffusion.compose import FUSIONS, Composer, main
from sbora_diffusion.concept.train import train
from sbora_diffusion.concept.config import ConceptConfig
from sbora_diffusion.fusion import capture, fused_cores

pytestmark = pytest.mark.numeric  # also run under other CPU kernels and 2 threads (make test-cpus, .ci/run)

SETTINGS = dict(steps=2, height=32, width=32)


def randomized(model: nn.Module, seed: int = 0) -> nn.Module:
    """Every adapter parameter drawn from N(0, 0.1²): updates as large as training would leave them."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in adapter_parameters(model):
            p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    return model


def one_layer(method: str, slots=(0, 1), d_in: int = 24, d_out: int = 16) -> nn.Sequential:
    """One linear layer (its input is the model's input) with adapters a and b in `slots`."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(d_in, d_out))
    for name, slot in zip("ab", slots):
        inject(model, AdapterConfig(method=method, rank=4, slot=slot, targets=["0"]), name=name)
    return randomized(model)


# ----------------------------------------------------------------------------- the math, on inputs we choose


def test_fusion_equals_the_plain_sum_exactly_when_no_concept_moves_the_others_inputs():
    """W_sum = W0 + Σ_j w_j ΔW_j reproduces concept i on its inputs iff Σ_{j≠i} w_j ΔW_j X_i = 0.

    With disjoint SBoRA-FA slots, ΔW_j X_i = ΔW_j[:, I_j] X_i[I_j]: zero exactly when concept i's
    inputs vanish on concept j's columns I_j. On such inputs W_sum has zero error, so it is the
    minimizer, and the unique one when S = Σ X_i X_iᵀ is nonsingular: fusion must return it. With
    too few inputs (S singular) fusion agrees with W_sum on every captured input and is the
    minimizer nearest W0 instead. On generic inputs disjoint slots alone do not give the plain sum.
    """
    model = one_layer("sbora-fa")
    layer = model[0]
    a, b = layer.cores["a"], layer.cores["b"]
    assert not set(a.indices.tolist()) & set(b.indices.tolist())
    plain = 1.0 * a.delta_weight() + 0.7 * b.delta_weight()
    g = torch.Generator().manual_seed(1)

    def inputs(n: int, zero: torch.Tensor | None) -> torch.Tensor:
        x = torch.randn(n, 24, generator=g)
        if zero is not None:
            x[:, zero] = 0.0
        return x

    def fuse(xa, xb):
        cores, rows = fused_cores({"m": model}, {"a": (1.0, lambda: model(xa)), "b": (0.7, lambda: model(xb))})
        return cores["m"]["0"].delta_W, rows[0]

    # The condition holds, S nonsingular: fusion is the plain sum (up to the ridge's 1e-6 relative bias).
    xa, xb = inputs(300, b.indices), inputs(300, a.indices)
    fused, row = fuse(xa, xb)
    torch.testing.assert_close(fused, plain, rtol=1e-4, atol=1e-5 * plain.abs().max().item())
    assert row["sum_error"] < 1e-6 and row["fused_error"] < 1e-4
    # The condition holds, S singular (5 + 5 inputs in 24 dimensions): the same outputs on every captured
    # input, but not the same weights; fusion moves W only along the inputs, so its update is smaller.
    xa, xb = inputs(5, b.indices), inputs(5, a.indices)
    fused, row = fuse(xa, xb)
    for x in (xa, xb):
        torch.testing.assert_close(x @ fused.T, x @ plain.T, rtol=1e-4, atol=1e-4)
    assert (fused - plain).norm() > 0.5 * plain.norm() and fused.norm() < plain.norm()
    # Generic inputs: the same disjoint slots, but each concept's columns see the other's inputs.
    xa, xb = inputs(300, None), inputs(300, None)
    fused, row = fuse(xa, xb)
    assert row["sum_error"] > 0.3 and row["fused_error"] < 0.8 * row["sum_error"]
    assert (fused - plain).norm() > 0.1 * plain.norm()


def test_the_streaming_solve_is_the_least_squares_minimizer_and_its_error_report_is_exact(tiny_model):
    """ΔW* from the running sums is a minimizer of Σ_i ‖(ΔW − w_iΔW_i) X_i‖² over every stacked input (what
    Mix-of-Show's L-BFGS converges to): the same residual and outputs as lstsq, and the same weights where S
    is well posed (block 1's inputs come out of a LayerNorm, which leaves the all-ones direction empty).
    The errors reported from the sums equal the residuals computed from the inputs themselves."""
    for name in "ab":  # LoRA with one seed: the same A, overlapping updates
        inject(tiny_model, AdapterConfig(method="lora", rank=4, targets=["to_q", "to_v"]), name=name)
    randomized(tiny_model)
    weights = {"a": 1.0, "b": 0.5}
    g = torch.Generator().manual_seed(2)
    xa, xa2, xb = torch.randn(4, 30, 24, generator=g), torch.randn(2, 10, 24, generator=g), torch.randn(3, 40, 24, generator=g)
    seen = collections.defaultdict(list)  # layer -> [(concept, input)]
    hooks = [layer.register_forward_pre_hook(lambda m, args, p=p: seen[p].append((next(iter(current_selection())), args[0])))
             for p, layer in adapted_layers(tiny_model).items()]
    # Two batches for a: the sums stream over calls. Block 1's inputs depend on which concept runs.
    runs = {"a": (1.0, lambda: [tiny_model(xa), tiny_model(xa2)]), "b": (0.5, lambda: tiny_model(xb))}
    cores, rows = fused_cores({"m": tiny_model}, runs)
    for h in hooks:
        h.remove()
    assert len(rows) == 4 and set(cores["m"]) == set(seen)
    well_posed = 0
    for row in rows:
        layer = tiny_model.get_submodule(row["layer"])
        X = torch.cat([x.reshape(-1, x.shape[-1]) for _, x in seen[row["layer"]]]).double()  # (n, d_in)
        own = torch.cat([x.reshape(-1, x.shape[-1]) @ (weights[n] * layer.cores[n].delta_weight()).T
                         for n, x in seen[row["layer"]]]).double()  # (n, d_out)
        lstsq = torch.linalg.lstsq(X, own, rcond=1e-6, driver="gelsd").solution.T  # (d_out, d_in)
        fused = cores["m"][row["layer"]].delta_W.double()
        assert (X @ fused.T - own).norm() <= (X @ lstsq.T - own).norm() * (1 + 1e-8)
        assert (X @ (fused - lstsq).T).norm() < 1e-5 * (X @ lstsq.T).norm()
        eig = torch.linalg.eigvalsh(X.T @ X)
        if eig.min() > 1e-3 * eig.mean():
            well_posed += 1
            assert (fused - lstsq).norm() < 1e-4 * lstsq.norm()
        plain = sum(w * layer.cores[n].delta_weight().double() for n, w in weights.items())
        energy = own.square().sum()
        for key, dW in (("sum_error", plain), ("fused_error", fused)):
            assert row[key] == pytest.approx(((X @ dW.T - own).square().sum() / energy).sqrt().item(), rel=1e-4, abs=1e-7)
        assert row["fused_error"] < 0.8 * row["sum_error"]
    assert well_posed == 3


def test_capture_counts_a_concepts_inputs_in_layers_it_does_not_adapt():
    """A layer only concept a adapts still gets concept b's inputs in S (b wants W0 there) but no update from b."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 8))
    inject(model, AdapterConfig(method="lora", rank=2, targets=["0", "1"]), name="a")
    inject(model, AdapterConfig(method="lora", rank=2, targets=["1"]), name="b")
    randomized(model)
    x = torch.randn(50, 8, generator=torch.Generator().manual_seed(3))
    fits = capture({"m": model}, {"a": (1.0, lambda: model(x)), "b": (1.0, lambda: model(x))})
    first = fits[("m", "0")]
    torch.testing.assert_close(first.S, 2 * x.double().T @ x.double())
    torch.testing.assert_close(first.T, (x @ model[0].cores["a"].delta_weight().T).double().T @ x.double(), rtol=1e-5, atol=1e-5)  # a's float32 branch
    # Both want their own update on the same inputs: the fused update is their mean.
    torch.testing.assert_close(first.solve(), model[0].cores["a"].delta_weight() / 2, rtol=1e-4, atol=1e-6)


# ----------------------------------------------------------------------------- on the tiny pipeline


@pytest.fixture(scope="module")
def outputs(tiny_pipe, tmp_path_factory):
    """LoRA alpha (with a text-encoder adapter) and beta, one seed: overlapping; SBoRA-FA alpha and beta in slots 0 and 1."""
    root = tmp_path_factory.mktemp("fusion") / "outputs"
    for name, te in (("alpha", True), ("beta", False)):
        concept = ConceptConfig(name=name, instance_dir=str(photos(root.parent / "photos" / name, name)), token=f"<{name}1>", class_word="toy")
        config = dataclasses.replace(quick_config(root / name / "lora"), train_text_encoder=te)
        train(concept, "lora", train_config=config, pipe=copy.deepcopy(tiny_pipe), adapter_overrides={"rank": 4})
    for name, slot in (("alpha", 0), ("beta", 1)):
        train_tiny_concept(tiny_pipe, root, name, slot)
    return root


def lora_composer(tiny_pipe, outputs) -> Composer:
    composer = Composer(copy.deepcopy(tiny_pipe))
    for name in ("alpha", "beta"):
        composer.load(outputs / name / "lora" / "adapter.safetensors")
    return composer


def test_fused_layers_reproduce_each_overlapping_lora_far_better_than_the_plain_sum(tiny_pipe, outputs):
    """On every concept's own captured inputs (recorded here by our own hooks, apart from the fusion's sums),
    the fused layers' outputs are at least 2x closer to that concept's own outputs than the plain sum's
    (about 7x in this setup), in the UNet and in the text encoder."""
    composer = lora_composer(tiny_pipe, outputs)
    weights = {"alpha": 1.0, "beta": 0.8}
    layers = {(part, p): layer for part, model in zip(("unet", "text_encoder"), composer.parts) for p, layer in adapted_layers(model).items()}
    seen = collections.defaultdict(list)
    hooks = [layer.register_forward_pre_hook(lambda m, args, key=key: seen[key].append((dict(current_selection()), args[0])))
             for key, layer in layers.items()]
    (name,) = FUSIONS["gradient"](composer, weights, **SETTINGS)
    for h in hooks:
        h.remove()
    fused = composer.fused[name]
    assert {part for part, _ in layers} == {"unet", "text_encoder"}  # alpha's text-encoder adapter is fused too
    assert {(r["part"], r["layer"]) for r in fused.rows} == set(layers) and all(name in layer.cores for layer in layers.values())
    errors = collections.defaultdict(lambda: torch.zeros(3, dtype=torch.float64))  # concept -> (plain sum, fused, own) squared norms
    for key, layer in layers.items():
        plain = sum(w * layer.cores[n].delta_weight() for n, w in weights.items() if n in layer.cores)
        per_layer = torch.zeros(3, dtype=torch.float64)
        for selection, x in seen[key]:
            (concept, w), = selection.items()
            own = w * layer.cores[concept].delta_weight() if concept in layer.cores else torch.zeros_like(plain)
            x = x.reshape(-1, x.shape[-1]).double()
            e = torch.stack([(x @ (dW - own).double().T).square().sum() for dW in (plain, layer.cores[name].delta_weight(), 0 * own)])
            errors[concept] += e
            per_layer += e
        row = next(r for r in fused.rows if (r["part"], r["layer"]) == key)
        assert row["fused_error"] == pytest.approx((per_layer[1] / per_layer[2]).sqrt().item(), rel=1e-3)
        assert row["fused_error"] <= row["sum_error"] + 1e-6  # the minimizer of the summed error, layer by layer
    assert set(errors) == set(weights)
    for concept, (plain, fused_error, _) in errors.items():
        assert fused_error.sqrt() < 0.5 * plain.sqrt(), concept


def test_a_fusion_is_reused_replaced_and_taken_off_with_its_concepts(tiny_pipe, outputs):
    composer = lora_composer(tiny_pipe, outputs)
    first = FUSIONS["gradient"](composer, {"alpha": 1.0, "beta": 0.8}, **SETTINGS)
    fused = composer.fused[next(iter(first))]
    assert FUSIONS["gradient"](composer, {"alpha": 1.0, "beta": 0.8}, **SETTINGS) == first and composer.fused[next(iter(first))] is fused
    second = FUSIONS["gradient"](composer, {"alpha": 1.0, "beta": 0.5}, **SETTINGS)
    assert second != first and list(composer.fused) == list(second)  # one fused adapter at a time
    assert adapter_names(composer.pipe.unet) == sorted(["alpha", "beta", *second])
    composer.unload("beta")
    assert composer.fused == {} and adapter_names(composer.pipe.unet) == ["alpha"] and adapter_names(composer.pipe.text_encoder) == ["alpha"]
    assert FUSIONS["gradient"](composer, {}, **SETTINGS) == {}


# ----------------------------------------------------------------------------- the command and the app


def _yaml(path, outputs, method, regions: bool):
    boxes = (", region: [0, 0, 0.5, 1]", ", region: [0.5, 0, 1, 1]") if regions else ("", "")
    path.write_text("\n".join([
        "prompt: 'a photo of <alpha1> toy and <beta1> toy'", f"outputs: {outputs}", "model: tiny", "seeds: [0, 1]",
        "steps: 2", "height: 32", "width: 32", "concepts:",
        f"  - {{concept: alpha, method: {method}{boxes[0]}}}", f"  - {{concept: beta, method: {method}, weight: 0.8{boxes[1]}}}",
    ]) + "\n")
    return path


@pytest.mark.parametrize("method, regions", [("sbora-fa", True), ("lora", False)])
def test_compose_command_with_gradient_fusion_writes_a_fused_adapter_that_renders_the_same(method, regions, tiny_pipe, outputs, tmp_path,
                                                                                            capsys):
    """Disjoint SBoRA-FA slots with regions (the fused adapter runs in the regions) and overlapping LoRAs, through
    the real command; the fused file, loaded alone on a fresh pipeline, renders the command's images exactly."""
    out = tmp_path / "out"
    assert main(["--config", str(_yaml(tmp_path / "c.yaml", outputs, method, regions)), "--fusion", "gradient", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "gradient fusion of" in printed and f"wrote {out / 'fused.safetensors'}" in printed and "wrote 2 images" in printed
    records = [json.loads(line) for line in (out / "manifest.jsonl").read_text().splitlines()]
    assert [r["fusion"] for r in records] == ["gradient"] * 2
    report = json.loads((out / "fusion.json").read_text())
    assert report["concepts"] == {"alpha": 1.0, "beta": 0.8} and report["layers"]
    assert all(r["fused_error"] <= r["sum_error"] + 1e-6 for r in report["layers"])
    # Disjoint slots still interfere through the inputs (the cross terms are not zero); overlapping LoRAs far more.
    assert report["sum_error"] > (0.5 if method == "lora" else 1e-3) and report["fused_error"] < 0.5 * report["sum_error"]
    assert (out / "fused.text_encoder.safetensors").is_file() == (method == "lora")  # only LoRA alpha adapted the text encoder
    if regions:
        return
    fresh = Composer(copy.deepcopy(tiny_pipe))
    loaded = fresh.load(out / "fused.safetensors")
    assert loaded.name == "c" and loaded.method == "gradient-fusion" and loaded.token == "<alpha1> <beta1>"
    again = fresh.render("a photo of <alpha1> toy and <beta1> toy", [0, 1], **SETTINGS)
    assert all(same_image(a, Image.open(out / r["image"])) for a, r in zip(again, records))


def test_the_app_generates_with_gradient_fusion(tiny_pipe, outputs):
    studio = Studio(AppConfig(outputs=str(outputs), model="tiny"), pipe=copy.deepcopy(tiny_pipe))
    try:
        concepts = {"alpha/lora": 1.0, "beta/lora": 0.8}
        images, info = studio.generate("a photo of <alpha1> toy and <beta1> toy", concepts, steps=2, fusion="gradient")
        assert len(images) == 1 and info["fusion"] == "gradient"
        assert info["fused"]["layers"] > 0 and info["fused"]["fused_error"] < 0.5 * info["fused"]["sum_error"]
        _, plain = studio.generate("a photo of <alpha1> toy and <beta1> toy", concepts, steps=2)
        assert plain["fusion"] == "sum" and plain["fused"] is None
        with pytest.raises(AppInputError, match="fusion must be one of sum, gradient"):
            studio.generate("x", concepts, steps=2, fusion="average")
    finally:
        studio.close()
