"""One table over the method registry: math, merge, gradients, slots, files, errors."""

from __future__ import annotations

import json
import ast
import copy
from pathlib import Path

import pytest
import torch
from conftest import TinyBlocks

from sbora.adapters import (
    METHODS,
    AdaptedLinear,
    AdapterConfig,
    AdapterFileError,
    active_adapters,
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
from sbora.adapters.sbora import MERGE_RATIO, PASS_RANKS
from sbora.cli import Command, Section, build_parser, parse
from sbora.configuration import ConfigError, override

pytestmark = pytest.mark.numeric  # also run under other CPU kernels and 2 threads (make test-cpus, .ci/run)

METHOD_NAMES = sorted(METHODS)
SLOTTED = ["ortho", "sbora-fa", "sbora-fb"]
R = 4

# Trainable parameters per layer, from docs/architecture.md §3; every registered method needs an entry.
EXPECTED_TRAINABLE = {
    "lora": lambda d_in, d_out, r: r * (d_in + d_out),
    "sbora-fa": lambda d_in, d_out, r: r * d_out,
    "sbora-fb": lambda d_in, d_out, r: r * d_in,
    "ortho": lambda d_in, d_out, r: r * d_out,
    "difflora": lambda d_in, d_out, r: 2 * r * (d_in + d_out) + 1,
    "custom-diffusion": lambda d_in, d_out, r: d_in * d_out,
}
# Inner dimension k of lora_factors() (A is k x d_in, B is d_out x k).
FACTOR_RANK = {"difflora": lambda d_in, r: 2 * r, "custom-diffusion": lambda d_in, r: d_in}


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
    tiny_model.requires_grad_(False)  # freezing the base is the trainer's job, done once
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
    tiny_model.requires_grad_(False)
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
    tiny_model.requires_grad_(False)
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
def test_cores_stay_float32_on_any_base(method, dtype, tiny_model, tiny_input):
    """A bf16 adapter would lose a 1e-4 update to rounding: cores are float32 on every base."""
    tiny_model.to(dtype)
    inject(tiny_model, config(method))
    for layer in adapted_layers(tiny_model).values():
        assert all(t.dtype == torch.float32 for t in layer.cores["default"].parameters())
    with torch.no_grad():
        p = adapter_parameters(tiny_model)[-1]
        before = p.clone()
        p.add_(1e-4)  # a typical small optimizer update survives
        assert (p - before).abs().min() > 5e-5
    randomize(tiny_model)
    y = tiny_model(tiny_input.to(dtype))
    assert y.dtype == dtype and torch.isfinite(y).all()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("method", METHOD_NAMES)
def test_unmerge_restores_a_low_precision_base(method, dtype, tiny_model):
    """SBoRA touches r columns/rows and puts them back bit-exactly; dense cores within one rounding of |ΔW|."""
    tiny_model.to(dtype)
    w0 = base_weights(tiny_model)
    inject(tiny_model, config(method))
    randomize(tiny_model)
    for _ in range(3):  # swaps do not accumulate drift
        merge(tiny_model)
        assert any(not torch.equal(v, w0[k.replace("base_layer.", "")]) for k, v in base_weights(tiny_model).items())
        unmerge(tiny_model)
    for path, layer in adapted_layers(tiny_model).items():
        w, ref = layer.base_layer.weight, w0[path + ".weight"]
        if method in ("sbora-fa", "sbora-fb"):
            assert torch.equal(w, ref), path
        else:  # stated tolerance: 3 swaps x one rounding (relative eps of the dtype) of max|ΔW| + |W|
            eps = torch.finfo(dtype).eps
            bound = 3 * 2 * eps * (layer.cores["default"].delta_weight().abs().max() + ref.float().abs().max())
            assert (w.float() - ref.float()).abs().max() <= bound, path


def test_sbora_unmerge_is_exact_with_other_adapters_merged_between(tiny_model):
    w0 = base_weights(tiny_model)
    inject(tiny_model, config("sbora-fa", slot=0), name="a")
    inject(tiny_model, config("sbora-fa", slot=1), name="b")
    randomize(tiny_model, "a", seed=1)
    randomize(tiny_model, "b", seed=2)
    merge(tiny_model, "a")
    merge(tiny_model, "b")
    unmerge(tiny_model, "a")  # disjoint columns: a's are untouched by b, restored exactly
    unmerge(tiny_model, "b")
    for path, layer in adapted_layers(tiny_model).items():
        assert torch.equal(layer.base_layer.weight, w0[path + ".weight"]), path


# ---- exact LoRA factors --------------------------------------------------------------


@pytest.mark.parametrize("method", METHOD_NAMES)
@pytest.mark.parametrize("shape", [(5,), (2, 5), (2, 3, 5)], ids=["2d", "3d", "4d"])
def test_lora_factors_are_exact(method, shape, tiny_model):
    inject(tiny_model, config(method, slot=1) if method in SLOTTED else config(method))
    randomize(tiny_model)
    for path, layer in adapted_layers(tiny_model).items():
        core = layer.cores["default"]
        A, B, s = core.lora_factors()
        k = FACTOR_RANK.get(method, lambda d_in, r: r)(layer.in_features, R)
        assert A.shape == (k, layer.in_features) and B.shape == (layer.out_features, k), path
        assert torch.equal((B @ A) * s, core.delta_weight()), path  # ΔW = s·B·A, bit for bit
        x = torch.randn(*shape, layer.in_features)
        torch.testing.assert_close(core.delta(x), s * (x @ A.T @ B.T), atol=1e-5, rtol=1e-5)
        if method in ("sbora-fa", "sbora-fb"):
            one_hot = A if method == "sbora-fa" else B.T  # (r, dim) rows e_i at the slot's indices
            assert torch.equal(one_hot.nonzero()[:, 1], core.indices) and torch.equal(one_hot.sum(1), torch.ones(R))
        if method == "ortho":
            assert torch.equal(A, core.A)


# ---- orthogonal bases at any width ---------------------------------------------------


@pytest.mark.parametrize("d_in", [10, 20, 33, 100, 320])
def test_ortho_slots_are_orthogonal_at_any_width(d_in):
    from sbora.adapters.ortho import orthogonal_rows

    r = min(5, d_in // 4)
    rows = [orthogonal_rows(AdapterConfig(method="ortho", rank=r, slot=k), d_in, "layer") for k in range(4)]
    for i in range(4):
        torch.testing.assert_close(rows[i] @ rows[i].T, torch.eye(r), atol=1e-6, rtol=0)
        for j in range(i):
            assert (rows[i] @ rows[j].T).abs().max() < 1e-6, (d_in, i, j)


def test_ortho_basis_is_the_same_in_another_process(tmp_path):
    import subprocess
    import sys

    from safetensors.torch import load_file

    from sbora.adapters.ortho import orthogonal_rows

    code = (
        "import sys; from safetensors.torch import save_file; from sbora.adapters import AdapterConfig;"
        "from sbora.adapters.ortho import orthogonal_rows;"
        "save_file({f'{d}/{k}': orthogonal_rows(AdapterConfig(method='ortho', rank=3, slot=k, seed=7), d, 'a.b') "
        "for d in (20, 33) for k in range(3)}, sys.argv[1])"
    )
    subprocess.run([sys.executable, "-c", code, str(tmp_path / "rows.safetensors")], check=True, cwd=tmp_path)
    other = load_file(str(tmp_path / "rows.safetensors"))
    assert len(other) == 6
    for key, rows in other.items():
        d, k = map(int, key.split("/"))
        assert torch.equal(rows, orthogonal_rows(AdapterConfig(method="ortho", rank=3, slot=k, seed=7), d, "a.b")), key


# ---- inject leaves other adapters alone; call-scoped selection ---------------------------


def test_inject_leaves_earlier_adapters_trainable(tiny_model):
    tiny_model.requires_grad_(False)
    inject(tiny_model, config("sbora-fa", slot=0), name="a")
    inject(tiny_model, config("sbora-fa", slot=1), name="b")
    assert all(p.requires_grad for p in adapter_parameters(tiny_model, "a"))
    assert all(p.requires_grad for p in adapter_parameters(tiny_model, "b"))
    assert not any(p.requires_grad for n, p in tiny_model.named_parameters() if ".cores." not in n)
    for p in adapter_parameters(tiny_model, "a"):
        p.requires_grad_(False)
    inject(tiny_model, config("lora"), name="c")
    assert not any(p.requires_grad for p in adapter_parameters(tiny_model, "a"))  # frozen stays frozen too


def two_concepts(model):
    inject(model, config("sbora-fa", slot=0), name="a")
    inject(model, config("lora"), name="b")
    randomize(model, "a", seed=1)
    randomize(model, "b", seed=2)


def test_active_adapters_scope_equals_the_switches(tiny_model, tiny_input):
    base = tiny_model(tiny_input)
    two_concepts(tiny_model)
    both = tiny_model(tiny_input)
    set_adapter_enabled(tiny_model, "b", False)
    set_adapter_weight(tiny_model, "a", 0.3)
    only_a = tiny_model(tiny_input)
    set_adapter_enabled(tiny_model, "b", True)
    set_adapter_weight(tiny_model, "a", 1.0)
    with active_adapters(tiny_model, {"a": 0.3}):
        assert torch.equal(tiny_model(tiny_input), only_a)
        with active_adapters(tiny_model, []):  # innermost scope wins
            assert torch.equal(tiny_model(tiny_input), base)
        assert torch.equal(tiny_model(tiny_input), only_a)
    assert torch.equal(tiny_model(tiny_input), both)  # nothing on the layers changed
    assert all(layer.enabled == {"a": True, "b": True} for layer in adapted_layers(tiny_model).values())
    with pytest.raises(ValueError, match="no adapter named 'c'.*it has: a, b"):
        with active_adapters(tiny_model, ["c"]):
            pass
    merge(tiny_model, "a")
    with pytest.raises(RuntimeError, match="'a' is merged"):
        with active_adapters(tiny_model, ["b"]):
            pass
    with active_adapters(tiny_model, {"a": 1.0}):
        torch.testing.assert_close(tiny_model(tiny_input), tiny_model(tiny_input))


def test_active_adapters_are_per_thread(tiny_model, tiny_input):
    import threading

    two_concepts(tiny_model)
    selections = [{"a": 1.0}, {"b": 0.5}, {"a": 0.7, "b": 1.0}, {}]
    alone = []
    for sel in selections:
        with active_adapters(tiny_model, sel):
            alone.append(tiny_model(tiny_input))
    results: dict[int, list[torch.Tensor]] = {i: [] for i in range(len(selections))}
    barrier = threading.Barrier(len(selections))

    def worker(i):
        barrier.wait()
        with active_adapters(tiny_model, selections[i]):
            for _ in range(20):
                results[i].append(tiny_model(tiny_input))

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(len(selections))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    # A leaked selection would move outputs by what one adapter does (> 1e-2 here); a new thread's
    # first matmul may round differently in the last bit, so compare far below the former.
    gaps = [(alone[i] - alone[j]).abs().max() for i in range(len(alone)) for j in range(i)]
    assert min(gaps) > 1e-2
    for i, outs in results.items():
        assert len(outs) == 20, selections[i]
        for y in outs:
            torch.testing.assert_close(y, alone[i], atol=1e-5, rtol=0)


def test_fa_dropout_keeps_only_r_columns_for_backward(tiny_model):
    inject(tiny_model, AdapterConfig(method="sbora-fa", rank=R, targets=["to_q"], dropout=0.5))
    layer = adapted_layers(tiny_model)["blocks.0.to_q"]
    randomize(tiny_model)
    layer.train()
    x = torch.randn(3, 7, layer.in_features, requires_grad=True)
    saved: list[torch.Tensor] = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        y = layer.cores["default"].add_delta(torch.zeros(3, 7, layer.out_features), x, 1.0)
    own = {t.untyped_storage().data_ptr() for t in layer.parameters()}
    acts = [t for t in saved if t.untyped_storage().data_ptr() not in own and t.numel() > 1]
    assert acts and all(t.shape[-1] == R for t in acts), [tuple(t.shape) for t in acts]  # mask and input: r wide
    y.sum().backward()
    assert x.grad is not None and 0 < (x.grad != 0).sum() <= 3 * 7 * R


def test_fa_fused_op_refuses_double_backward(tiny_model):
    tiny_model.requires_grad_(False)
    inject(tiny_model, AdapterConfig(method="sbora-fa", rank=R, targets=["to_q"]))
    layer = adapted_layers(tiny_model)["blocks.0.to_q"]
    randomize(tiny_model)
    x = torch.randn(2, 5, layer.in_features, requires_grad=True)
    y = layer(x)
    assert type(y.grad_fn).__name__ == "BaseWithColumnBranchBackward"
    (gx,) = torch.autograd.grad(y.square().sum(), x, create_graph=True)
    with pytest.raises(RuntimeError, match="once_differentiable|differentiate twice"):
        gx.sum().backward()


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
    with pytest.raises(AdapterFileError, match=r"blocks\.0\.to_q\.B: file has torch.float32 \(32, 4\), model needs torch.float32 \(48, 4\)"):
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
    command = Command("t", "", sections=(Section("adapter", AdapterConfig, option="method", kind="methods", default="sbora-fa", skip=("method", "delta")),))
    help_text = build_parser(command).format_help()
    for field in ("--rank", "--alpha", "--dropout", "--rslora", "--targets", "--target-regex", "--slot", "--seed", "--tau"):
        assert field in help_text
    parsed = parse(command, ["--method", "sbora-fb", "--rank", "4", "--targets", "to_q,to_v", "--no-rslora", "--slot", "2"])
    cfg = parsed.configs["adapter"]
    assert (cfg.method, cfg.rank, cfg.targets, cfg.rslora, cfg.slot) == ("sbora-fb", 4, ["to_q", "to_v"], False, 2)
    assert cfg == override(load_adapter_config("sbora-fb"), parsed.overrides["adapter"])


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


def _tampered(good: Path, tmp_path: Path, name: str, change) -> Path:
    """A copy of adapter file `good` with its tensors (and metadata) changed by `change(tensors, meta)`."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    with safe_open(str(good), framework="pt") as f:
        meta = dict(f.metadata())
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    change(tensors, meta)
    out = tmp_path / name
    save_file(tensors, str(out), metadata=meta)
    return out


@pytest.mark.parametrize("case, change, message", [
    ("index out of range", lambda t, m: t["blocks.0.to_q.indices"].__setitem__(0, 10_000), r"blocks\.0\.to_q\.indices: index 10000 is out of range"),
    ("repeated index", lambda t, m: t["blocks.0.to_q.indices"].__setitem__(1, int(t["blocks.0.to_q.indices"][0])), "negative or repeated indices"),
    ("negative index", lambda t, m: t["blocks.0.to_q.indices"].__setitem__(0, -1), "negative or repeated indices"),
    ("NaN weight", lambda t, m: t["blocks.1.to_v.B"].__setitem__((0, 0), float("nan")), r"blocks\.1\.to_v\.B holds NaN"),
    ("infinite weight", lambda t, m: t["blocks.1.to_v.B"].__setitem__((0, 0), float("inf")), "NaN or infinite"),
    ("float indices", lambda t, m: t.__setitem__("blocks.0.to_q.indices", t["blocks.0.to_q.indices"].float()), "model needs torch.int64"),
    ("modules not a list", lambda t, m: m.__setitem__("modules", '"blocks.0.to_q"'), "modules must be a list"),
])
def test_adapter_file_content_is_validated_before_the_model_changes(case, change, message, tiny_model, tmp_path):
    inject(tiny_model, config("sbora-fa"))
    randomize(tiny_model)
    good = save_adapter(tiny_model, tmp_path / "good.safetensors")
    bad = _tampered(good, tmp_path, "bad.safetensors", change)
    target = TinyBlocks()
    with pytest.raises(AdapterFileError, match=message):
        load_adapter(target, bad)
    assert_untouched(target)


@pytest.mark.parametrize("name", ["../outside.safetensors", "/etc/passwd", "sub/te.safetensors", "..", 7])
def test_metadata_never_names_a_file_outside_the_adapter_folder(name, tiny_pipe, tmp_path):
    import copy as copy_

    from sbora_diffusion.concept.adapter import load_concept_adapter, save_concept_adapter

    pipe = copy_.deepcopy(tiny_pipe)
    inject(pipe.unet, config("lora", rank=2), name="c")
    inject(pipe.text_encoder, AdapterConfig(method="lora", rank=2, targets=["clip-text"]), name="c")
    good = save_concept_adapter(pipe, tmp_path / "a" / "adapter.safetensors", "c", base_model="tiny", info={"concept": "c", "token": "<c1>"})
    bad = _tampered(good, tmp_path / "a", "evil.safetensors", lambda t, m: m.__setitem__("extra", m["extra"].replace('"adapter.text_encoder.safetensors"', json.dumps(name))))
    fresh = copy_.deepcopy(tiny_pipe)
    with pytest.raises(AdapterFileError, match="plain file name|outside the adapter's folder"):
        load_concept_adapter(fresh, bad)
    assert_untouched(fresh.unet) and assert_untouched(fresh.text_encoder)
