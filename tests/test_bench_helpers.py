"""The measuring helpers of benchmarks/common.py on the tiny model (exact counts, no timings), the accuracy
statistics of benchmarks/accuracy.py, and the data helpers the LLM benchmarks rely on."""

from __future__ import annotations

import json
import math
import statistics
from dataclasses import dataclass, field

import pytest
import torch
from conftest import TinyBlocks

import benchmarks.common as common
from benchmarks.common import (
    FLOOR,
    REFERENCE,
    SavedTensorMeter,
    Variant,
    add_method,
    capture_layer_inputs,
    clone_sharing_weights,
    optimizer_state_bytes,
    parameter_count,
    peak_step_bytes,
    run_benchmark,
    time_ratios,
)

TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]
R = 4


def adapted(method: str, base: TinyBlocks) -> tuple[torch.nn.Module, list[torch.nn.Parameter]]:
    model = clone_sharing_weights(base)
    return model, add_method(model, method, R, TARGETS)


def branch_meter(model, x) -> SavedTensorMeter:
    with SavedTensorMeter(model) as meter:
        model(x).sum().backward()
    return meter


def test_clones_share_the_base_and_counts_are_exact(tiny_model):
    counts = {}
    for method in (REFERENCE, "lora", "sbora-fa", FLOOR):
        model, params = adapted(method, tiny_model)
        assert model.blocks[0].to_q.base_layer.weight is tiny_model.blocks[0].to_q.weight  # shared, not copied
        counts[method] = parameter_count(params)
    # per block: to_q 24->32, to_k/to_v 20->32, to_out 32->24; two blocks
    assert counts[REFERENCE] == counts["lora"] == 2 * R * ((24 + 32) + 2 * (20 + 32) + (32 + 24))
    assert counts["sbora-fa"] == 2 * R * (32 + 32 + 32 + 24)
    assert counts[FLOOR] == 2 * (32 + 32 + 32 + 24)
    assert type(tiny_model.blocks[0].to_q) is torch.nn.Linear  # the base itself is untouched


def test_saved_tensor_meter_counts_branch_storages_only(tiny_model, tiny_input):
    x = tiny_input  # (2, 5, 24): 10 tokens
    fa = branch_meter(adapted("sbora-fa", tiny_model)[0], x)
    # Each of the 8 layers keeps its gathered (10, r) fp32 input columns and nothing else.
    assert fa.branch_bytes == fa.branch_only_bytes == 8 * 10 * R * 4
    floor = branch_meter(adapted(FLOOR, tiny_model)[0], x)
    assert floor.branch_bytes == 0 and floor.other_bytes > 0  # a bias needs nothing saved; the base saves its own
    ours, peft = (branch_meter(adapted(m, tiny_model)[0], x) for m in ("lora", REFERENCE))
    # LoRA keeps each distinct layer input once (per block x: 24 wide and the attention output: 32
    # wide; the 20-wide ctx is one tensor shared by every to_k/to_v) plus each layer's (10, r) hidden.
    assert ours.branch_bytes == peft.branch_bytes == 2 * 10 * (24 + 32) * 4 + 10 * 20 * 4 + 8 * 10 * R * 4


def test_meter_refuses_a_model_without_branches(tiny_model):
    with pytest.raises(ValueError, match="no adapter branch"):
        SavedTensorMeter(tiny_model)


def test_peak_step_bytes_sees_a_freed_allocation():
    with peak_step_bytes() as peak:
        big = torch.empty(1000, 1000)  # 4,000,000 bytes
        del big
    assert 4_000_000 <= peak["peak_bytes"] < 4_000_000 + 65_536
    assert abs(peak["end_bytes"]) < 65_536


def test_optimizer_state_bytes_is_adamw_moments_and_steps(tiny_model, tiny_input):
    model, params = adapted("sbora-fa", tiny_model)
    opt = torch.optim.AdamW(params)
    assert optimizer_state_bytes(opt) == 0  # lazily created
    model(tiny_input).sum().backward()
    opt.step()
    assert optimizer_state_bytes(opt) == 2 * 4 * parameter_count(params) + 4 * len(params)  # exp_avg, exp_avg_sq, fp32 step


def test_layer_inputs_are_what_each_layer_saw(tiny_model, tiny_input):
    model, params = adapted(FLOOR, tiny_model)
    variant = Variant(FLOOR, model, params, torch.optim.AdamW(params))
    inputs = capture_layer_inputs(variant, lambda m: m(tiny_input).sum())
    assert set(inputs) == {f"blocks.{b}.{t}" for b in (0, 1) for t in TARGETS}
    assert torch.equal(inputs["blocks.0.to_q"], tiny_input)
    assert inputs["blocks.0.to_k"].shape == (2, 5, 20) and inputs["blocks.0.to_out.0"].shape == (2, 5, 32)


def test_time_ratios_are_per_round_ratios_and_floor_overheads():
    def variant(name, cpu, layer):
        return Variant(name, torch.nn.Identity(), [], None, cpu=cpu, wall=[2 * t for t in cpu], layer_cpu=layer)

    rows = time_ratios([
        variant(REFERENCE, [2.0, 4.0, 2.0], [1.0, 1.0, 2.0]),
        variant("sbora-fa", [1.5, 3.0, 3.0], [0.75, 0.75, 1.5]),
        variant(FLOOR, [1.0, 2.0, 1.0], [0.5, 0.5, 1.0]),
    ])
    fa = rows["sbora-fa"]
    assert fa["ratio_median"] == 0.75 and (fa["ratio_min"], fa["ratio_max"]) == (0.75, 1.5)
    assert fa["wall_ratio_median"] == 0.75 and fa["layer_ratio_median"] == 0.75
    assert fa["overhead_vs_peft"] == 0.5  # (0.75 - 0.5) / (1 - 0.5) in every round
    assert rows[REFERENCE]["overhead_vs_peft"] == 1.0 and rows[FLOOR]["overhead_vs_peft"] == 0.0


def test_paired_difference_of_answer_sheets_pooled_over_seeds():
    from benchmarks.accuracy import paired_difference

    diff, half = paired_difference([[True, True, False, False]], [[True, False, False, False]])
    # per-problem differences (0, 1, 0, 0): mean 0.25, sample sd 0.5 -> 1.96 * 0.5 / sqrt(4)
    assert diff == pytest.approx(25.0) and half == pytest.approx(100 * 1.959964 * 0.25)
    assert paired_difference([[True] * 5], [[True] * 5]) == (0.0, 0.0)  # identical sheets: no noise
    # Two seeds: each problem's difference is averaged over the seeds first: (1, 0.5, 0, -0.5).
    a, b = [[True, True, False, False], [True, False, False, False]], [[False, False, False, True], [False, False, False, False]]
    diff, half = paired_difference(a, b)
    assert diff == pytest.approx(25.0) and half == pytest.approx(100 * 1.959964 * statistics.stdev([1, 0.5, 0, -0.5]) / 2)
    with pytest.raises(ValueError, match="do not pair"):
        paired_difference([[True]], [[True, False]])  # not the same problems
    with pytest.raises(ValueError, match="do not pair"):
        paired_difference(a, b[:1])  # not the same seeds


def test_discordance_and_the_problems_a_difference_needs():
    from benchmarks.accuracy import discordance, problems_needed

    assert discordance([[True, False], [True, True]], [[True, True], [False, True]]) == 0.5
    # q = 8%: half-width 1 point needs 1.96^2 * (0.08 - 0.0001) / 0.0001 problems; 80% power adds z = 0.8416
    assert problems_needed(0.08) == math.ceil(1.959964**2 * 0.0799 / 1e-4) == 3070
    assert problems_needed(0.08, power=0.8) == math.ceil((1.959964 + 0.841621) ** 2 * 0.0799 / 1e-4)
    assert problems_needed(0.08, points=2) < problems_needed(0.08) / 3.9  # a 2-point gap needs about a quarter
    assert problems_needed(0.0) == 0
    with pytest.raises(ValueError):
        problems_needed(0.08, power=1.0)


def test_seed_interval_is_students_t_over_seeds():
    from benchmarks.accuracy import seed_interval

    mean, half = seed_interval([0.8, 0.9, 1.0])
    assert mean == pytest.approx(0.9) and half == pytest.approx(4.303 * 0.1 / math.sqrt(3))
    assert seed_interval([0.5, 0.5]) == (0.5, 0.0)
    one = seed_interval([0.7])
    assert one[0] == 0.7 and math.isnan(one[1])  # one seed: no interval


def test_units_needed_is_the_smallest_run_whose_interval_meets_the_target():
    from benchmarks.accuracy import seed_interval, units_needed

    values = [0.1, -0.1, 0.05, -0.05, 0.0]  # sd 0.079
    n = units_needed(values, 0.05)
    sd = statistics.stdev(values)
    assert 2.201 * sd / math.sqrt(n - 1) > 0.05 >= 2.179 * sd / math.sqrt(n)  # t for 11 and 12 degrees of freedom
    assert n == 13
    assert seed_interval(values * 3)[1] <= 0.05  # the same spread over 15 units meets it
    assert units_needed([0.3, 0.3], 0.05) == 2  # no spread: the least that has an interval
    with pytest.raises(ValueError):
        units_needed([0.1], 0.05)


def test_validation_is_carved_from_training_data_deterministically():
    from llm.data import arithmetic_split, carve_validation

    train, test = arithmetic_split(300, 50)
    rest, val = carve_validation(train, 40)
    assert (len(rest), len(val)) == (260, 40) and carve_validation(train, 40) == (rest, val)
    assert not {e.input for e in val} & {e.input for e in rest} and not {e.input for e in val} & {e.input for e in test}
    assert rest == [e for e in train if e not in val]  # the rest keeps its order (batches stay a function of the seed)
    assert carve_validation(train, 40, seed=1)[1] != val and carve_validation(train, 0) == (train, [])
    with pytest.raises(ValueError, match="cannot hold out"):
        carve_validation(train[:5], 5)


def test_generated_tasks_are_fixed_splits_with_correct_answers(tmp_path):
    from llm.data import GENERATED_TASKS, arithmetic_kind, generated_split, is_correct, read_jsonl, write_jsonl

    train, test = generated_split("reverse", 30, 10)
    assert generated_split("reverse", 30, 10) == (train, test) and not {e.input for e in train} & {e.input for e in test}
    assert all(is_correct(e.output, e.answer) and e.output.split(", ") == e.input.split(", ")[::-1] for e in test)
    assert read_jsonl(write_jsonl(tmp_path / "reverse.jsonl", test)) == test  # the JSONL round trip is exact
    for task, kind in (("addsub", "AddSub"), ("multistep", "MultiArith")):
        examples = generated_split(task, 20, 20)[1]
        assert {arithmetic_kind(e.input) for e in examples} == {kind} and all(is_correct(e.output, e.answer) for e in examples)
    kinds = {arithmetic_kind(e.input) for e in generated_split("arithmetic", 0, 60)[1]}
    assert kinds == {"AddSub", "MultiArith", "SingleEq"} and set(GENERATED_TASKS) == {"arithmetic", "addsub", "multistep", "reverse"}
    with pytest.raises(ValueError, match="unknown generated task"):
        generated_split("poetry", 1, 1)


@dataclass
class CountConfig:
    parts: int = field(default=3, metadata={"help": "parts measured"})
    threads: int = field(default=0, metadata={"help": "torch threads (0: as they are)"})
    out_dir: str = field(default="", metadata={"help": "output folder"})


@pytest.mark.parametrize("every, drawn", [(1e9, 2), (0.0, 4)])
def test_a_running_benchmark_saves_its_numbers_every_part_and_its_figure_at_most_every_minute(every, drawn, tmp_path, monkeypatch):
    """JSON and markdown after every part (a stopped run keeps them), the figure at the first save, then at most every
    FIGURE_EVERY seconds, and always at the end."""
    import matplotlib.pyplot as plt

    monkeypatch.setattr(common, "FIGURE_EVERY", every)
    figures, seen = [], []

    def figure(payload):
        figures.append(len(payload["results"]))
        return plt.figure()

    def measure(config, res, save):
        for k in range(config.parts):
            res[f"part{k}"] = k
            save()
            seen.append((json.loads((tmp_path / "count.json").read_text())["results"], (tmp_path / "count.md").read_text(),
                         (tmp_path / "count.png").is_file()))

    payload = run_benchmark("count", "A counting benchmark.", CountConfig, {"quick": {}}, ["--out-dir", str(tmp_path)], measure,
                            lambda p: f"{len(p['results'])} parts", figure)
    assert [len(results) for results, _, _ in seen] == [1, 2, 3] and [md for _, md, _ in seen] == ["1 parts", "2 parts", "3 parts"]
    assert all(png for _, _, png in seen)  # a run stopped after its first part has a figure
    assert len(figures) == drawn and figures[0] == 1 and figures[-1] == 3  # the first save's and the final one's
    assert payload["complete"] and payload["written"][-1].endswith("count.png")
