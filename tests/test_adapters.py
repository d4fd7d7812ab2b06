"""One table over the method registry: math, merge, gradients, slots, files, errors."""

from __future__ import annotations

import argparse
import ast
import copy
from pathlib import Path

import pytest
import torch
from conftest import TinyBlocks

from sbora_diffusion.adapters import (
    METHODS,
    AdaptedLinear,
    AdapterConfig,
    AdapterFileError,
    adapted_layers,
    adapter_parameters,
    inject,
    load_adapter,
    load_adapter_config,
    merge,
    read_adapter,
    remove,
    save_adapter,
    set_adapter_enabled,
    set_adapter_weight,
    unmerge,
)
from sbora_diffusion.adapters.sbora import MERGE_RATIO, PASS_RANKS
from sbora_diffusion.configuration import ConfigError, add_arguments, override, overrides_from_args

METHOD_NAMES = sorted(METHODS)
SLOTTED = ["ortho", "sbora-fa", "sbora-fb"]
R = 4

# Trainable parameters per layer, from DESIGN.md §3; every registered method needs an entry.
EXPECTED_TRAINABLE = {
    "lora": lambda d_in, d_out, r: r * (d_in + d_out),
    "sbora-fa": lambda d_in, d_out, r: r * d_out,
    "sbora-fb": lambda d_in, d_out, r: r * d_in,
    "ortho": lambda d_in, d_out, r: r * d_out,
    "difflora": lambda d_in, d_out, r: 2 * r * (d_in + d_out) + 1,
}


def config(method: str, **kw) -> AdapterConfig:
    return AdapterConfig(method=method, rank=kw.pop("rank", R), alpha=kw.pop("alpha", 8.0), targets=["sd-unet"], **kw)


def randomize(model, name: str = "default", seed: int = 0) -> None:
    """Non-zero adapter weights, so every test below can see a wrong update."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in adapter_parameters(model, name):
            p.copy_(torch.randn(p.shape, generator=g) * 0.2 + (0.3 if p.ndim == 0 else 0.0))


def base_weights(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items() if ".cores." not in k}


def test_registry_and_table_agree():
    assert set(EXPECTED_TRAINABLE) == set(METHODS)
    for name in METHODS:
        assert (Path(__file__).parents[1] / "configs" / "methods" / f"{name}.yaml").is_file(), name


@pytest.mark.parametrize("method", METHOD_NAMES)
def test_zero_init_is_noop(method, tiny_model, tiny_input):
    y0 = tiny_model(tiny_input)
    wrapped = inject(tiny_model, config(method))
    assert len(wrapped) == 8  # 2 blocks x (to_q, to_k, to_v, to_out.0)
    assert torch.equal(tiny_model(tiny_input), y0)


@pytest.mark.parametrize("method", METHOD_NAMES)
@pytest.mark.parametrize("shape", [(5,), (2, 5), (2, 3, 5)], ids=["2d", "3d", "4d"])
def test_delta_weight_equals_forward_difference(method, shape, tiny_model):
    inject(tiny_model, config(method))
    randomize(tiny_model)
    for path, layer in adapted_layers(tiny_model).items():
        core = layer.cores["default"]
        x = torch.randn(*shape, layer.in_features)
        diff = layer(x) - layer.base_layer(x)
        expected = x @ core.delta_weight().T
        assert diff.shape == (*shape, layer.out_features)
        torch.testing.assert_close(diff, expected, atol=1e-5, rtol=1e-5, msg=path)
        torch.testing.assert_close(core.delta(x), expected, atol=1e-5, rtol=1e-5)
        assert expected.abs().max() > 1e-3  # the check above compared something real


@pytest.mark.parametrize("method", METHOD_NAMES)
def test_merge_equals_unmerged_and_unmerge_restores(method, tiny_model, tiny_input):
    w0 = base_weights(tiny_model)
    inject(tiny_model, config(method))
    randomize(tiny_model)
    y_unmerged = tiny_model(tiny_input)
    merge(tiny_model)
    w_merged = base_weights(tiny_model)
    assert any(not torch.equal(w_merged[k], w0[k.replace("base_layer.", "")]) for k in w_merged if "base_layer" in k)
    torch.testing.assert_close(tiny_model(tiny_input), y_unmerged, atol=1e-5, rtol=1e-5)
    unmerge(tiny_model)
    for k, v in base_weights(tiny_model).items():
        assert (v - w0[k.replace("base_layer.", "")]).abs().max() <= 1e-6, k
    torch.testing.assert_close(tiny_model(tiny_input), y_unmerged, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("method", METHOD_NAMES)
def test_only_adapter_parameters_train_with_exact_count(method, tiny_model, tiny_input):
    inject(tiny_model, config(method))
    randomize(tiny_model)
    tiny_model(tiny_input).square().sum().backward()
    adapter_ids = {id(p) for p in adapter_parameters(tiny_model)}
    for name, p in tiny_model.named_parameters():
        if id(p) in adapter_ids:
            assert p.requires_grad and p.grad is not None and p.grad.abs().sum() > 0, name
        else:
            assert not p.requires_grad and p.grad is None, name
    expected = sum(
        EXPECTED_TRAINABLE[method](layer.in_features, layer.out_features, R)
        for layer in adapted_layers(tiny_model).values()
    )
    assert sum(p.numel() for p in tiny_model.parameters() if p.requires_grad) == expected


def test_lora_core_equals_peft_lora(tiny_model, tiny_input):
    from peft import LoraConfig, get_peft_model

    reference = get_peft_model(
        copy.deepcopy(tiny_model),
        LoraConfig(r=R, lora_alpha=8, target_modules=["to_q", "to_k", "to_v", "to_out.0"], lora_dropout=0.0),
    )
    inject(tiny_model, config("lora"))
    randomize(tiny_model)
    peft_layers = {n: m for n, m in reference.named_modules() if hasattr(m, "lora_A") and "default" in m.lora_A}
    assert len(peft_layers) == 8
    for path, layer in adapted_layers(tiny_model).items():
        peft_layer = peft_layers["base_model.model." + path]
        with torch.no_grad():
            peft_layer.lora_A["default"].weight.copy_(layer.cores["default"].A)
            peft_layer.lora_B["default"].weight.copy_(layer.cores["default"].B)
        x = torch.randn(3, layer.in_features)
        branch = peft_layer.lora_B["default"](peft_layer.lora_A["default"](x)) * peft_layer.scaling["default"]
        assert torch.equal(layer.cores["default"].delta(x), branch)
    torch.testing.assert_close(tiny_model(tiny_input), reference(tiny_input), atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("method", ["sbora-fa", "sbora-fb"])
def test_sbora_equals_dense_one_hot_reference(method, tiny_model):
    inject(tiny_model, config(method))
    randomize(tiny_model)
    for layer in adapted_layers(tiny_model).values():
        core = layer.cores["default"]
        x = torch.randn(2, 5, layer.in_features)
        idx = core.indices
        if method == "sbora-fa":  # A's rows are e_i, i in I
            A = torch.zeros(R, layer.in_features)
            A[torch.arange(R), idx] = 1.0
            B = core.B
        else:  # B's columns are e_j, j in J
            B = torch.zeros(layer.out_features, R)
            B[idx, torch.arange(R)] = 1.0
            A = core.A
        torch.testing.assert_close(core.delta(x), core.scale * (x @ A.T @ B.T), atol=1e-6, rtol=1e-6)
        dense = core.delta_weight()
        touched = (dense != 0).any(dim=0 if method == "sbora-fa" else 1).nonzero().flatten()
        assert torch.equal(touched, idx)  # only columns I (FA) / rows J (FB) change


@pytest.mark.parametrize("method", SLOTTED)
def test_slots_are_disjoint_and_compose(method, tiny_model, tiny_input):
    w0 = base_weights(tiny_model)
    inject(tiny_model, config(method, slot=0), name="a")
    inject(tiny_model, config(method, slot=1), name="b")
    randomize(tiny_model, "a", seed=1)
    randomize(tiny_model, "b", seed=2)
    for path, layer in adapted_layers(tiny_model).items():
        a, b = layer.cores["a"], layer.cores["b"]
        if method == "ortho":
            assert (a.A @ b.A.T).abs().max() < 1e-6, path  # A_i A_j^T = 0
            torch.testing.assert_close(a.A @ a.A.T, torch.eye(R), atol=1e-6, rtol=0)
        else:
            assert not set(a.indices.tolist()) & set(b.indices.tolist()), path
            dim = 0 if method == "sbora-fa" else 1
            touched_a = (a.delta_weight() != 0).any(dim=dim)
            touched_b = (b.delta_weight() != 0).any(dim=dim)
            assert not (touched_a & touched_b).any()
    y_both = tiny_model(tiny_input)
    merge(tiny_model)
    torch.testing.assert_close(tiny_model(tiny_input), y_both, atol=1e-5, rtol=1e-5)
    for path, layer in adapted_layers(tiny_model).items():
        expected = w0[path + ".weight"] + layer.cores["a"].delta_weight() + layer.cores["b"].delta_weight()
        torch.testing.assert_close(layer.base_layer.weight, expected, atol=1e-6, rtol=1e-6)


def test_ortho_bases_are_per_layer_not_reseeded_per_concept(tiny_model):
    inject(tiny_model, config("ortho", slot=0), name="a")
    inject(tiny_model, config("ortho", slot=1), name="b")
    layers = adapted_layers(tiny_model)
    q0, q1 = layers["blocks.0.to_q"].cores, layers["blocks.1.to_q"].cores
    assert not torch.allclose(q0["a"].A, q1["a"].A)  # same shape, different layer => different basis
    assert not torch.allclose(q0["a"].A, q0["b"].A)  # same layer, other slot => other rows
    again = TinyBlocks()
    inject(again, config("ortho", slot=0), name="a")
    assert torch.equal(adapted_layers(again)["blocks.0.to_q"].cores["a"].A, q0["a"].A)  # deterministic


@pytest.mark.parametrize("method", METHOD_NAMES)
def test_save_load_reproduces_outputs_exactly(method, tiny_model, tiny_input, tmp_path):
    fresh = copy.deepcopy(tiny_model)
    inject(tiny_model, config(method, slot=1) if method in SLOTTED else config(method))
    randomize(tiny_model)
    y = tiny_model(tiny_input)
    path = save_adapter(tiny_model, tmp_path / "a.safetensors", base_model="tiny-blocks")
    file = read_adapter(path)
    assert file.config.method == method and file.config.rank == R and file.base_model == "tiny-blocks"
    assert file.modules == list(adapted_layers(tiny_model))
    if method in ("sbora-fa", "sbora-fb"):
        assert torch.equal(file.tensors["blocks.0.to_q.indices"], adapted_layers(tiny_model)["blocks.0.to_q"].cores["default"].indices)
    load_adapter(fresh, path, name="concept")
    assert torch.equal(fresh(tiny_input), y)
    assert list(path.parent.iterdir()) == [path]  # the atomic write left no temp file


def test_fa_backward_keeps_only_r_input_columns(tiny_model):
    inject(tiny_model, AdapterConfig(method="sbora-fa", rank=R, targets=["to_q"]))
    layer = adapted_layers(tiny_model)["blocks.0.to_q"]
    randomize(tiny_model)
    x = torch.randn(3, 7, layer.in_features, requires_grad=True)
    saved: list[torch.Tensor] = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        y = layer.cores["default"].add_delta(torch.zeros(3, 7, layer.out_features), x, 1.0)
    B = layer.cores["default"].B
    activations = [t for t in saved if t.is_floating_point() and t.untyped_storage().data_ptr() != B.untyped_storage().data_ptr()]
    # Only the gathered x[..., I] (flattened to (21, r) by linear), never x itself.
    assert [tuple(t.shape) for t in activations] == [(3 * 7, R)]
    assert sum(t.numel() for t in activations) * layer.in_features == x.numel() * R
    y.sum().backward()
    assert torch.equal(x.grad[..., [i for i in range(layer.in_features) if i not in layer.cores["default"].indices]], torch.zeros(3, 7, layer.in_features - R))


@pytest.mark.parametrize("batch, tokens", [(3, 7), (4, 40)], ids=["in-place branch", "merged weight"])
def test_fa_fused_training_path(tiny_model, batch, tokens):
    """One adapter on a frozen float base trains through BaseWithColumnBranch: the same output and
    gradients as base + w·ΔY, only x[..., I] saved. Few tokens per input feature add the branch
    in place; many merge it into a copy of W (sbora.merges_weight)."""
    inject(tiny_model, AdapterConfig(method="sbora-fa", rank=R, targets=["to_out.0"]))
    layer = adapted_layers(tiny_model)["blocks.0.to_out.0"]  # 32 -> 24, with a bias
    core = layer.cores["default"]
    randomize(tiny_model)
    layer.set_weight("default", 0.7)
    x = torch.randn(batch, tokens, layer.in_features, requires_grad=True)
    saved: list[torch.Tensor] = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        y = layer(x)
    assert type(y.grad_fn).__name__ == "BaseWithColumnBranchBackward"
    assert y.grad_fn.merge == (batch * tokens * (R + PASS_RANKS) >= MERGE_RATIO * layer.in_features) == (tokens == 40)  # both paths run
    own = {t.untyped_storage().data_ptr() for t in [*layer.parameters(), *layer.buffers()]}
    assert [tuple(t.shape) for t in saved if t.untyped_storage().data_ptr() not in own] == [(batch, tokens, R)]
    g = torch.randn_like(y)
    y.backward(g)
    fused = (y.detach(), x.grad.clone(), core.B.grad.clone())
    x.grad, core.B.grad = None, None
    reference = layer.base_layer(x) + 0.7 * core.delta(x)
    reference.backward(g)
    for got, want in zip(fused, (reference.detach(), x.grad, core.B.grad), strict=True):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_fa_fusion_keeps_base_layer_hooks_and_dropout(tiny_model):
    inject(tiny_model, AdapterConfig(method="sbora-fa", rank=R, targets=["to_out.0"], dropout=0.5))
    layer = adapted_layers(tiny_model)["blocks.0.to_out.0"]
    randomize(tiny_model)
    x = torch.randn(2, 5, layer.in_features, requires_grad=True)
    assert type(layer(x).grad_fn).__name__ != "BaseWithColumnBranchBackward"  # training with dropout: unfused
    layer.eval()
    assert type(layer(x).grad_fn).__name__ == "BaseWithColumnBranchBackward"
    seen = []
    layer.base_layer.register_forward_hook(lambda mod, args, out: seen.append(out.shape))
    y = layer(x)  # a hooked base layer is called, never bypassed
    assert seen == [(2, 5, layer.out_features)]
    torch.testing.assert_close(y, layer.base_layer(x) + layer.cores["default"].delta(x))


def test_weight_switch_and_remove(tiny_model, tiny_input):
    y0 = tiny_model(tiny_input)
    w0 = base_weights(tiny_model)
    inject(tiny_model, config("sbora-fa"))
    randomize(tiny_model)
    layer = adapted_layers(tiny_model)["blocks.0.to_q"]
    x = torch.randn(4, layer.in_features)
    full = layer(x) - layer.base_layer(x)
    set_adapter_weight(tiny_model, "default", 0.5)
    torch.testing.assert_close(layer(x) - layer.base_layer(x), 0.5 * full)
    set_adapter_enabled(tiny_model, "default", False)
    assert torch.equal(tiny_model(tiny_input), y0)
    set_adapter_enabled(tiny_model, "default", True)
    merge(tiny_model)
    with pytest.raises(RuntimeError, match="unmerge it"):
        set_adapter_weight(tiny_model, "default", 1.0)
    remove(tiny_model, "default")  # unmerges first
    assert not any(isinstance(m, AdaptedLinear) for m in tiny_model.modules())
    for k, v in base_weights(tiny_model).items():
        assert (v - w0[k]).abs().max() <= 1e-6, k


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
@pytest.mark.parametrize("method", METHOD_NAMES)
def test_cores_follow_base_dtype(method, dtype, tiny_model, tiny_input):
    tiny_model.to(dtype)
    inject(tiny_model, config(method))
    for layer in adapted_layers(tiny_model).values():
        assert all(t.dtype == dtype for t in layer.cores["default"].parameters())
    assert tiny_model(tiny_input.to(dtype)).dtype == dtype


# ---- bad input: clear errors, nothing changed -------------------------------------------


def assert_untouched(model):
    assert not any(isinstance(m, AdaptedLinear) for m in model.modules())


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"method": "bora"}, "unknown adapter method 'bora'.*sbora-fa"),
        ({"method": "lora", "rank": 0}, "rank must be a positive"),
        ({"method": "lora", "rank": 21}, "exceeds min\\(d_in=20"),
        ({"method": "sbora-fa", "rank": 25}, "slot 0 with rank 25 needs 25 input indices but the layer has 24.*rank must be at most 24"),
        ({"method": "sbora-fb", "rank": 8, "slot": 4}, "slot 4 with rank 8 needs 40 output indices but the layer has 32"),
        ({"method": "ortho", "rank": 8, "slot": 2}, "needs 24 basis vectors but the layer has 20"),
        ({"method": "lora", "targets": ["to_z"]}, "match no linear layer"),
        ({"method": "lora", "targets": [], "target_regex": "blocks\\.9\\..*"}, "target_regex .* match no linear layer"),
    ],
)
def test_bad_config_is_refused_and_model_untouched(kwargs, message, tiny_model):
    cfg = AdapterConfig(**{"targets": ["sd-unet"], **kwargs})
    with pytest.raises(ConfigError, match=message):
        inject(tiny_model, cfg)
    assert_untouched(tiny_model)


def test_same_adapter_name_twice_is_refused(tiny_model):
    inject(tiny_model, config("lora"), name="dog")
    with pytest.raises(ValueError, match="already has an adapter named 'dog'"):
        inject(tiny_model, config("sbora-fa"), name="dog")
    assert all(list(layer.cores) == ["dog"] for layer in adapted_layers(tiny_model).values())


@pytest.mark.parametrize("name", ["train", "double", "a.b", "", "dog 1"])
def test_unusable_adapter_names_are_refused(name, tiny_model):
    with pytest.raises(ValueError, match="is not allowed"):
        inject(tiny_model, config("lora"), name=name)
    assert_untouched(tiny_model)
    inject(tiny_model, config("lora"), name="task_train-1")  # letters, digits, '_' and '-' are fine


def test_corrupt_and_foreign_files(tiny_model, tmp_path):
    inject(tiny_model, config("sbora-fa"))
    good = save_adapter(tiny_model, tmp_path / "good.safetensors")
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(good.read_bytes()[:-17])
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"\x00not a safetensors file")
    from safetensors.torch import save_file

    foreign = tmp_path / "foreign.safetensors"
    save_file({"x": torch.zeros(2)}, str(foreign))
    for path, message in [
        (tmp_path / "missing.safetensors", "no adapter file at"),
        (truncated, "not a readable safetensors file.*corrupt"),
        (garbage, "not a readable safetensors file"),
        (foreign, "not an adapter of this toolkit"),
    ]:
        target = TinyBlocks()
        with pytest.raises(AdapterFileError, match=message):
            load_adapter(target, path)
        assert_untouched(target)

    class Wider(TinyBlocks):  # same module paths, other dimensions
        def __init__(self):
            super().__init__()
            self.blocks[0].to_q = torch.nn.Linear(24, 48, bias=False)

    wider = Wider()
    with pytest.raises(AdapterFileError, match=r"blocks\.0\.to_q\.B: file has shape \(32, 4\), model needs \(48, 4\)"):
        load_adapter(wider, good)
    assert_untouched(wider)
    other = torch.nn.Sequential(torch.nn.Linear(24, 24))
    with pytest.raises(AdapterFileError, match="does not fit this model.*no linear layer at blocks.0.to_q"):
        load_adapter(other, good)
    assert_untouched(other)


# ---- configs: YAML + command-line overrides -------------------------------------------


@pytest.mark.parametrize("method", METHOD_NAMES)
def test_method_yaml_loads_and_overrides(method):
    cfg = load_adapter_config(method)
    assert cfg.method == method
    cfg = load_adapter_config(method, rank="8", rslora="true", targets="to_q,to_k")
    assert (cfg.rank, cfg.rslora, cfg.targets) == (8, True, ["to_q", "to_k"])
    assert cfg.scale == pytest.approx(cfg.alpha / 8**0.5)


def test_cli_overrides_every_field():
    parser = argparse.ArgumentParser()
    add_arguments(parser, AdapterConfig)
    help_text = parser.format_help()
    for field in ("--rank", "--alpha", "--dropout", "--rslora", "--targets", "--target-regex", "--slot", "--seed", "--tau"):
        assert field in help_text
    args = parser.parse_args(["--rank", "4", "--targets", "to_q,to_v", "--no-rslora", "--slot", "2"])
    cfg = override(load_adapter_config("sbora-fb"), overrides_from_args(args, AdapterConfig))
    assert (cfg.method, cfg.rank, cfg.targets, cfg.rslora, cfg.slot) == ("sbora-fb", 4, ["to_q", "to_v"], False, 2)


@pytest.mark.parametrize(
    "data, message",
    [({"rnak": 4}, "unknown field\\(s\\) rnak"), ({"rank": "four"}, "'rank' expects int"), ({"method": "x"}, "unknown adapter method")],
)
def test_bad_config_values(data, message):
    with pytest.raises(ConfigError, match=message):
        override(AdapterConfig(), data)
    with pytest.raises(ConfigError, match="unknown method 'nope'"):
        load_adapter_config("nope")


def test_cores_import_neither_diffusers_nor_transformers():
    folder = Path(__file__).parents[1] / "sbora_diffusion" / "adapters"
    for file in folder.glob("*.py"):
        for node in ast.walk(ast.parse(file.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""] if isinstance(node, ast.ImportFrom) else []
            assert not any(n.split(".")[0] in ("diffusers", "transformers", "peft") for n in names), file.name
