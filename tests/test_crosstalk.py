"""Output cross-talk ‖ΔW_j X_i‖ / ‖ΔW_i X_i‖ on calibration inputs (``adapters.overlap``), on chosen inputs:
exactly 0 where j reads only columns i's inputs never use, the analytic value on a hand-built layer,
the dense value for every method of the registry."""

from __future__ import annotations

import json
import math

import pytest
import torch
from torch import nn

from sbora.adapters import METHODS, AdapterConfig, adapter_parameters, inject
from sbora.adapters.overlap import (
    GramHooks,
    calibration_energies,
    crosstalk,
    crosstalk_rows,
    crosstalk_summary,
    interference,
    output_energy,
)

pytestmark = pytest.mark.numeric


def one_layer(d_in: int = 8, d_out: int = 6) -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(d_in, d_out))


def randomize(model: nn.Module, seed: int = 0) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in adapter_parameters(model):
            p.copy_(torch.randn(p.shape, generator=g))


def runs_on(model: nn.Module, inputs: dict[str, torch.Tensor]) -> dict:
    return {name: (1.0, lambda x=x: model(x)) for name, x in inputs.items()}


def test_crosstalk_is_exactly_zero_where_the_update_reads_only_columns_the_inputs_never_use():
    model = one_layer()
    for name, slot in (("i", 0), ("j", 1)):
        inject(model, AdapterConfig(method="sbora-fa", rank=2, slot=slot, targets=["0"]), name=name)
    randomize(model)
    layer = model[0]
    I_j = layer.cores["j"].indices
    g = torch.Generator().manual_seed(1)
    x_i = torch.randn(3, 5, 8, generator=g)
    x_i[..., I_j] = 0.0  # concept i's inputs never use the columns j reads
    x_j = torch.randn(4, 8, generator=g)  # j's own inputs use every column
    energies = calibration_energies({"m": model}, runs_on(model, {"i": x_i, "j": x_j}))
    assert energies["i"][("m", "0")]["input_rows"] == 15 and energies["j"][("m", "0")]["input_rows"] == 4
    assert energies["i"][("m", "0")]["energy"]["j"] == 0.0 and energies["i"][("m", "0")]["energy"]["i"] > 0
    rows = {(r["inputs"], r["update"]): r for r in crosstalk_rows(energies, ["i", "j"])}
    assert rows["i", "j"]["crosstalk"] == 0.0 and rows["i", "j"]["cross_rms"] == 0.0
    assert rows["j", "i"]["crosstalk"] > 0.1  # the other way round: j's inputs do use i's columns
    assert interference(layer.cores["i"], layer.cores["j"]) == 0.0  # disjoint slots: no weight overlap either way
    # The same construction under a plain LoRA pair is not zero: its A reads every column.
    lora = one_layer()
    for name, seed in (("i", 0), ("j", 1)):
        inject(lora, AdapterConfig(method="lora", rank=2, seed=seed, targets=["0"]), name=name)
    randomize(lora)
    e = calibration_energies({"m": lora}, runs_on(lora, {"i": x_i}))
    assert e["i"][("m", "0")]["energy"]["j"] > 0


def test_crosstalk_equals_the_analytic_value_on_a_hand_built_layer():
    model = one_layer(3, 2)
    for name in ("i", "j"):
        inject(model, AdapterConfig(method="lora", rank=1, alpha=2.0, targets=["0"]), name=name)
    layer = model[0]
    with torch.no_grad():
        layer.cores["i"].A.copy_(torch.tensor([[1.0, 0.0, 0.0]]))
        layer.cores["i"].B.copy_(torch.tensor([[1.0], [0.0]]))  # ΔW_i = s·[[1, 0, 0], [0, 0, 0]]
        layer.cores["j"].A.copy_(torch.tensor([[0.0, 1.0, 1.0]]))
        layer.cores["j"].B.copy_(torch.tensor([[0.0], [3.0]]))  # ΔW_j = s·[[0, 0, 0], [0, 3, 3]]
    s = layer.cores["i"].lora_factors()[2]
    assert s == 2.0
    x_i = torch.tensor([[1.0, 0.0, 0.0], [0.0, 2.0, 0.0]])  # ΔW_i x = s·(1, 0), s·(0, 0); ΔW_j x = s·(0, 0), s·(0, 6)
    x_j = torch.tensor([[0.0, 1.0, 1.0]])  # ΔW_j x = s·(0, 6); ΔW_i x = 0
    gram = x_i.double().T @ x_i.double()
    assert output_energy(layer.cores["i"], gram) == pytest.approx(s * s * 1.0, rel=1e-12)
    assert output_energy(layer.cores["j"], gram) == pytest.approx(s * s * 36.0, rel=1e-12)
    assert crosstalk(layer.cores["i"], layer.cores["j"], gram) == pytest.approx(6.0, rel=1e-12)
    energies = calibration_energies({"m": model}, runs_on(model, {"i": x_i, "j": x_j}))
    rows = {(r["inputs"], r["update"]): r for r in crosstalk_rows(energies, ["i", "j"])}
    assert rows["i", "j"]["crosstalk"] == pytest.approx(6.0, rel=1e-12)
    assert rows["i", "j"]["own_rms"] == pytest.approx(s * 1.0 / math.sqrt(2), rel=1e-12)  # per input row
    assert rows["j", "i"]["crosstalk"] == 0.0  # i reads only the first column, which x_j leaves at 0
    (ij, ji) = crosstalk_summary(rows.values())
    assert (ij["inputs"], ij["update"], ij["layers"]) == ("i", "j", 1)
    assert ij["median"] == ij["max"] == pytest.approx(6.0) and ij["overall"] == pytest.approx(6.0) and ij["worst_layer"] == "m.0"
    assert ji["median"] == ji["max"] == ji["overall"] == 0.0
    # An update that is zero on its own inputs has no ratio (not a division by zero).
    assert crosstalk(layer.cores["j"], layer.cores["i"], torch.zeros(3, 3, dtype=torch.float64)) is None


@pytest.mark.parametrize("method", sorted(METHODS))
def test_factor_space_energy_is_the_dense_one_for_every_method(method):
    model = one_layer(12, 10)
    for name, slot in (("i", 0), ("j", 1)):
        inject(model, AdapterConfig(method=method, rank=2, slot=slot, targets=["0"]), name=name)
    randomize(model, seed=3)
    g = torch.Generator().manual_seed(4)
    x_i = torch.randn(2, 7, 12, generator=g)
    energies = calibration_energies({"m": model}, runs_on(model, {"i": x_i}))
    X = x_i.reshape(-1, 12).double()
    for name in ("i", "j"):
        dense = (model[0].cores[name].delta_weight().detach().double() @ X.T).square().sum().item()
        assert energies["i"][("m", "0")]["energy"][name] == pytest.approx(dense, rel=1e-6)


def test_gram_hooks_sum_every_batch_and_leave_no_hook_behind():
    model = one_layer(4, 3)
    inject(model, AdapterConfig(method="sbora-fa", rank=1, targets=["0"]), name="a")
    xs = [torch.randn(2, 3, 4), torch.randn(5, 4)]
    with GramHooks({"k": model[0]}) as hooks:
        for x in xs:
            model(x)
    X = torch.cat([x.reshape(-1, 4) for x in xs]).double()
    torch.testing.assert_close(hooks.grams["k"], X.T @ X)
    assert hooks.rows["k"] == 11 and not model[0]._forward_pre_hooks


def test_rows_and_summary_are_json_and_skip_undefined_ratios():
    model = one_layer()
    for name, slot in (("i", 0), ("j", 1)):
        inject(model, AdapterConfig(method="sbora-fa", rank=2, slot=slot, targets=["0"]), name=name)
    with torch.no_grad():
        model[0].cores["j"].B.normal_()  # i stays untrained: its own update is zero
    energies = calibration_energies({"m": model}, runs_on(model, {"i": torch.randn(3, 8), "j": torch.randn(3, 8)}))
    rows = crosstalk_rows(energies, ["i", "j"])
    by = {(r["inputs"], r["update"]): r for r in rows}
    assert by["i", "j"]["crosstalk"] is None and by["i", "j"]["cross_rms"] > 0  # nothing of i's own to compare with
    assert by["j", "i"]["crosstalk"] == 0.0
    summary = {(d["inputs"], d["update"]): d for d in crosstalk_summary(rows)}
    assert summary["i", "j"]["median"] is None and summary["i", "j"]["overall"] is None
    json.dumps({"rows": rows, "summary": list(summary.values())}, allow_nan=False)
