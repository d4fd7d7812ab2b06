"""The resumable, seed-major unit runs of the LLM benchmarks (benchmarks/common.py's run_units and
UnitStore, benchmarks/llm_quality.py's schedule and merge) on fake results: no model is loaded."""

from __future__ import annotations

import json
import math
import random

import pytest

from benchmarks import llm_quality as lq
from benchmarks.common import UnitStore, parse_worker, run_units
from sbora.configuration import ConfigError


def test_worker_spec_is_k_of_n():
    assert parse_worker("0/2") == (0, 2) and parse_worker("1/2") == (1, 2) and parse_worker("0/1") == (0, 1)
    for bad in ("2/2", "-1/2", "0/0", "1", "a/b", "1/2/3"):
        with pytest.raises(ConfigError, match="--worker"):
            parse_worker(bad)


def test_workers_take_alternate_units_and_a_rerun_skips_what_is_done():
    units, done, runs = list(range(7)), set(), {}
    for k in (0, 1):
        runs[k] = run_units(units, (k, 2), done.__contains__, lambda u: True, done.add)
    assert runs == {0: [0, 2, 4, 6], 1: [1, 3, 5]}  # disjoint, together every unit, each worker in schedule order
    assert done == set(units)
    assert run_units(units, (0, 2), done.__contains__, lambda u: True, done.add) == []  # resumed: nothing left
    done -= {4}  # a unit lost (e.g. stopped before its file was written) is the only one redone
    assert run_units(units, (0, 2), done.__contains__, lambda u: True, done.add) == [4]


def test_a_unit_waiting_for_another_workers_input_is_passed_over_then_run():
    # worker 0 owns a, c, e; c needs b (worker 1's); e needs nothing
    units, done, naps = ["a", "b", "c", "d", "e"], set(), []
    ready = lambda u: u != "c" or "b" in done  # noqa: E731

    def sleep(seconds):  # meanwhile the other worker finishes b
        naps.append(seconds)
        done.add("b")

    assert run_units(units, (0, 2), done.__contains__, ready, done.add, wait_seconds=7, sleep=sleep) == ["a", "e", "c"]
    assert naps == [7]


def test_a_unit_that_stays_undone_is_an_error_not_a_loop():
    with pytest.raises(RuntimeError, match="still not done"):
        run_units(["a"], (0, 1), lambda u: False, lambda u: True, lambda u: None)


def test_unit_store_refuses_results_of_other_settings(tmp_path):
    store = UnitStore(tmp_path / "units", {"steps": 150})
    assert store.load("x") is None
    store.save("x", {"accuracy": 0.5})
    assert store.load("x") == {"accuracy": 0.5}
    assert [p.name for p in (tmp_path / "units").iterdir()] == ["x.json"]  # written atomically: no temporary left
    with pytest.raises(ConfigError, match=r"other settings: steps 150 \(now 100\)"):
        UnitStore(tmp_path / "units", {"steps": 100}).load("x")


# ---------------------------------------------------------------------------- llm_quality's schedule and merge


def small_config(tmp_path, **kw) -> lq.LLMQualityConfig:
    return lq.LLMQualityConfig(**{"methods": ["lora", "sbora-fa"], "lrs": [1e-3, 3e-3], "seeds": 2, "steps": 10, "batch_size": 2,
                                  "train_size": 20, "val_size": 4, "test_size": 12, "test_limit": 6, "max_new_tokens": 40, "eval_batch_size": 64,
                                  "work_dir": str(tmp_path), "worker": "0/2", **kw})


def sheet(n: int, seed: int) -> list[bool]:
    rng = random.Random(seed)
    return [rng.random() < 0.7 for _ in range(n)]


def fake(method: str, lr: float | None, seed: int | None, per_problem: list[bool], **extra) -> dict:
    """A unit's stored result as Worker.do writes it (the zero-shot base has no training part)."""
    trained = {} if method == "zero-shot" else {"final_loss": 0.1, "trainable_params": {"lora": 40, "sbora-fa": 16}[method],
                                                 "adapter_name": "arithmetic", "steps": 10, "train_seconds": 50.0}
    return {"method": method, "lr": lr, "seed": seed, "per_problem": per_problem, "samples": [], "device": "CPU", "base_parameters": 1000,
            "worker": "0/2", "started": 100.0, "finished": 200.0, "seconds": 100.0, "cpu_seconds": 90.0, "score_seconds": 10.0,
            "answers": len(per_problem), **trained, **extra}


def val(method: str, lr: float, accuracy: float, loss: float = 0.1) -> dict:
    profile = {"projection": {"q_proj": 0.01}, "depth": {"first third": 0.01}}
    return fake(method, lr, 0, [True, False, True, False], accuracy=accuracy, correct=2, total=4, final_loss=loss, profile=profile)


def test_schedule_is_seed_major():
    config = lq.LLMQualityConfig(methods=["lora", "sbora-fa"], lrs=[1e-3, 3e-3], seeds=3)
    units = [lq.unit_key(u) for u in lq.schedule(config)]
    assert units == ["zero-shot", "val-lora-lr0.001", "val-lora-lr0.003", "val-sbora-fa-lr0.001", "val-sbora-fa-lr0.003",
                     "test-lora-seed0", "test-sbora-fa-seed0", "test-lora-seed1", "test-sbora-fa-seed1", "test-lora-seed2", "test-sbora-fa-seed2"]
    # two workers split every stage: each has half of the sweep, and its test seeds in seed order
    assert units[1::2] == ["val-lora-lr0.001", "val-sbora-fa-lr0.001", "test-lora-seed0", "test-lora-seed1", "test-lora-seed2"]


def test_best_lr_is_the_highest_validation_accuracy_ties_to_lower_loss():
    assert lq.choose_lr({1e-3: {"accuracy": 0.5, "final_loss": 0.1}, 3e-3: {"accuracy": 0.6, "final_loss": 0.3}}) == 3e-3
    assert lq.choose_lr({1e-3: {"accuracy": 0.6, "final_loss": 0.1}, 3e-3: {"accuracy": 0.6, "final_loss": 0.3}}) == 1e-3
    assert lq.choose_lr({1e-3: {"diverged": "nan"}, 3e-3: {"accuracy": 0.1, "final_loss": 9.0}}) == 3e-3
    assert lq.choose_lr({1e-3: {"diverged": "nan"}}) is None


def test_test_units_wait_for_their_methods_whole_sweep(tmp_path):
    sched = lq.Schedule(small_config(tmp_path))
    test0 = ("test", "lora", 0)
    assert not sched.ready(test0) and not sched.is_done(test0)
    sched.store.save("val-lora-lr0.001", val("lora", 1e-3, 0.5))
    assert not sched.ready(test0)  # 3e-3 not swept yet
    sched.store.save("val-lora-lr0.003", val("lora", 3e-3, 0.75))
    assert sched.ready(test0) and sched.best("lora") == (True, 3e-3) and not sched.is_done(test0)
    sched.store.save("test-lora-seed0", fake("lora", 1e-3, 0, sheet(6, 0)))  # a sheet at another lr (an older grid) does not count
    assert not sched.is_done(test0)
    sched.store.save("test-lora-seed0", fake("lora", 3e-3, 0, sheet(4, 0)))  # too few problems for --test-limit 6
    assert not sched.is_done(test0)
    sched.store.save("test-lora-seed0", fake("lora", 3e-3, 0, sheet(6, 0)))
    assert sched.is_done(test0)
    # every learning rate diverged: its test units are settled (nothing to score) instead of waiting forever
    for lr in (1e-3, 3e-3):
        sched.store.save(f"val-sbora-fa-lr{lr:g}", fake("sbora-fa", lr, 0, [], diverged="loss is nan"))
    assert sched.is_done(("test", "sbora-fa", 1))


def fill(sched: lq.Schedule, seeds: int, n: int = 6) -> None:
    sched.store.save("zero-shot", fake("zero-shot", None, None, [False] * n))
    for method, accs in (("lora", (0.5, 0.75)), ("sbora-fa", (0.25, 0.5))):
        for lr, acc in zip((1e-3, 3e-3), accs):
            sched.store.save(f"val-{method}-lr{lr:g}", val(method, lr, acc))
        for seed in range(seeds):  # seed 0 is the sweep's adapter read back: its training counts once, in the sweep
            sched.store.save(f"test-{method}-seed{seed}", fake(method, 3e-3, seed, sheet(n, seed + 10 * (method == "lora")), loaded=seed == 0))


def test_merge_of_a_partial_run_compares_every_method_at_the_seeds_done(tmp_path):
    config = small_config(tmp_path, merge=True, worker="")
    sched = lq.Schedule(config)
    fill(sched, seeds=1)  # stopped after seed 0
    res = lq.collect(config)
    assert res["units"] == {"done": 7, "total": 9} and res["pending"] == ["test-lora-seed1", "test-sbora-fa-seed1"]
    assert res["best_lr"] == {"lora": 3e-3, "sbora-fa": 3e-3} and res["problems"]["test"] == 6
    rows = lq.summary_rows(res)
    assert rows["lora"]["seeds"] == rows["sbora-fa"]["seeds"] == 1 and rows["sbora-fa"]["paired_seeds"] == 1
    expected = 100 * (sum(sheet(6, 0)) - sum(sheet(6, 10))) / 6
    assert rows["sbora-fa"]["vs_lora"][0] == pytest.approx(expected)
    assert res["timing"]["training_runs"] == 4 and res["timing"]["answers"] == 6 * 3 + 4 * 4
    # the published files say the run is partial; the markdown shows the sweep and the comparison so far
    payload = lq.main(["--preset", "cpu", "--merge", "--work-dir", str(tmp_path), "--out-dir", str(tmp_path / "out"), "--methods", "lora,sbora-fa",
                       "--lrs", "0.001,0.003", "--seeds", "2", "--steps", "10", "--batch-size", "2", "--train-size", "20", "--val-size", "4",
                       "--test-size", "12", "--test-limit", "6"])
    saved = json.loads((tmp_path / "out" / "llm_quality_cpu.json").read_text())
    assert saved["complete"] is False and payload["complete"] is False and saved["results"]["pending"] == res["pending"]
    text = (tmp_path / "out" / "llm_quality_cpu.md").read_text()
    assert "partial" in text and "Units done: 7 of 9" in text and "| SBoRA-FA |" in text and "## What it means" in text


def test_merge_pairs_sheets_on_the_problems_all_of_them_have(tmp_path):
    config = small_config(tmp_path, test_limit=8, worker="")
    sched = lq.Schedule(config)
    fill(sched, seeds=2)  # every sheet has 6 problems, the limit asks 8: the added ones are still to score
    sched.store.save("test-lora-seed1", fake("lora", 3e-3, 1, sheet(8, 11)))  # one sheet already extended
    res = lq.collect(config)
    assert res["problems"]["test"] == 6 and all(r["total"] == 6 for runs in res["runs"].values() for r in runs)
    assert "test-lora-seed1" not in res["pending"] and "test-lora-seed0" in res["pending"]
    config.test_limit = 6
    assert lq.collect(config)["pending"] == []


def test_a_test_unit_scores_only_the_problems_it_lacks(tmp_path):
    config = small_config(tmp_path, test_limit=8)
    sched = lq.Schedule(config)
    fill(sched, seeds=1)
    worker = object.__new__(lq.Worker)  # no model: training and scoring are stubbed
    worker.config, worker.sched, worker.base, worker.device, worker.base_parameters = config, sched, None, "CPU", 1000
    worker.test_set = [f"problem {i}" for i in range(12)]
    asked = []
    worker.trained = lambda method, lr, seed: (object(), {"adapter_name": "arithmetic", "final_loss": 0.1, "trainable_params": 40, "steps": 10,
                                                          "train_seconds": 50.0, "loaded": True})

    def score(model, examples, desc):
        asked.append(list(examples))
        return {"per_problem": [True] * len(examples), "samples": [{"x": 1}]}, 1.0

    worker.score = score
    worker.do(("test", "lora", 0))
    assert asked == [["problem 6", "problem 7"]]
    record = sched.store.load("test-lora-seed0")
    assert record["per_problem"] == sheet(6, 10) + [True, True] and record["answers"] == 8 and sched.is_done(("test", "lora", 0))


# ---------------------------------------------------------------------------- retention statistics and llm_multitask's units


def test_ratio_interval_is_the_delta_method_over_problems():
    from benchmarks.accuracy import ratio_difference, ratio_interval

    solo = [True] * 80 + [False] * 20
    merged = [True] * 72 + [False] * 28  # keeps 72 of the 80
    r, half = ratio_interval(merged, solo)
    assert r == pytest.approx(0.9)
    # z_i = (m_i - 0.9 s_i) / 0.8: 0.125 on 72 problems, -1.125 on 8, 0 on 20
    z = [0.125] * 72 + [-1.125] * 8 + [0.0] * 20
    mean = sum(z) / 100
    assert half == pytest.approx(1.959964 * (sum((x - mean) ** 2 for x in z) / 99) ** 0.5 / 10)
    assert ratio_interval(solo, solo) == (1.0, 0.0)
    assert math.isnan(ratio_interval(solo, [False] * 100)[0])  # nothing solved solo: nothing to keep
    d, dhalf = ratio_difference(merged, solo, solo, solo)
    assert d == pytest.approx(-0.1) and dhalf == pytest.approx(half)  # against a method that keeps everything
    with pytest.raises(ValueError, match="pair"):
        ratio_difference(merged, solo, solo[:50], solo[:50])


def mt_config(tmp_path, **kw):
    from benchmarks import llm_multitask as mt

    return mt.MultitaskConfig(**{"tasks": ["addsub", "reverse"], "methods": ["sbora-fa", "lora"], "steps": 10, "test_size": 6,
                                 "work_dir": str(tmp_path), "worker": "0/2", **kw})


def mt_sheet(per_problem: list[bool]) -> dict:
    return {"accuracy": sum(per_problem) / len(per_problem), "correct": sum(per_problem), "total": len(per_problem),
            "per_problem": per_problem, "samples": []}


def test_multitask_merges_wait_for_their_task_adapters_and_the_report_is_partial_until_done(tmp_path):
    from benchmarks import llm_multitask as mt

    config = mt_config(tmp_path)
    sched = mt.Schedule(config)
    assert [mt.unit_key(u) for u in sched.units] == ["zero-shot", "solo-sbora-fa-addsub", "solo-sbora-fa-reverse", "merged-sbora-fa",
                                                     "solo-lora-addsub", "solo-lora-reverse", "merged-lora"]
    stamp = {"worker": "0/2", "started": 0.0, "finished": 60.0, "seconds": 60.0, "cpu_seconds": 50.0, "device": "CPU"}
    solo = [True, True, True, True, False, False]
    sched.store.save("zero-shot", {**stamp, "sheets": {t: mt_sheet([False] * 6) for t in config.tasks}})
    for m, merged in (("sbora-fa", solo), ("lora", [True, False, False, False, False, False])):
        for t in config.tasks:
            assert not sched.ready(("merged", m))
            sched.store.save(f"solo-{m}-{t}", {**stamp, "sheet": mt_sheet(solo), "trainable_params": 10, "final_loss": 0.1, "steps": 10,
                                               "train_seconds": 40.0, "adapter": "x"})
        assert sched.ready(("merged", m))
        if m == "sbora-fa":
            sched.store.save(f"merged-{m}", {**stamp, "sheets": {t: mt_sheet(merged) for t in config.tasks}, "interference": {"addsub+reverse": 0.0},
                                             "warnings": []})
    res = mt.collect(config)
    assert res["units"] == {"done": 6, "total": 7} and res["pending"] == ["merged-lora"]
    assert res["timing"]["training_runs"] == 4 and res["timing"]["answers"] == 6 * (2 + 4 + 2)
    assert set(mt.retention_rows(res)) == {"sbora-fa"}  # no LoRA merge yet: no comparison with it
    sched.store.save("merged-lora", {**stamp, "sheets": {t: mt_sheet([True, False, False, False, False, False]) for t in config.tasks},
                                     "interference": {"addsub+reverse": 0.3}, "warnings": ["interfere"]})
    rows = mt.retention_rows(mt.collect(config))
    assert rows["sbora-fa"]["pooled"] == (1.0, 0.0) and rows["lora"]["pooled"][0] == pytest.approx(0.25)
    assert rows["sbora-fa"]["vs_naive"][0] == pytest.approx(0.75)
    beats = "SBoRA-FA merged keeps more than the naive LoRA sum (paired 95% interval above 0)"
    assert dict((what, ok) for what, ok, _ in mt.targets_check(mt.collect(config)))[beats] is True
    # A LoRA sum that keeps 3 of the 4: SBoRA-FA's mean is higher, but the paired interval includes 0: not met.
    close = [True, True, True, False, False, False]
    sched.store.save("merged-lora", {**stamp, "sheets": {t: mt_sheet(close) for t in config.tasks}, "interference": {"addsub+reverse": 0.3},
                                     "warnings": ["interfere"]})
    d, half = mt.retention_rows(mt.collect(config))["sbora-fa"]["vs_naive"]
    assert d == pytest.approx(0.25) and half > d
    assert dict((what, ok) for what, ok, _ in mt.targets_check(mt.collect(config)))[beats] is False
    sched.store.save("merged-lora", {**stamp, "sheets": {t: mt_sheet([True, False, False, False, False, False]) for t in config.tasks},
                                     "interference": {"addsub+reverse": 0.3}, "warnings": ["interfere"]})
    payload = mt.main(["--preset", "cpu", "--merge", "--work-dir", str(tmp_path), "--out-dir", str(tmp_path / "out"), "--tasks", "addsub,reverse",
                       "--methods", "sbora-fa,lora", "--steps", "10", "--test-size", "6", "--train-size", "2000", "--batch-size", "16",
                       "--lr", "0.001", "--max-new-tokens", "48", "--eval-batch-size", "128"])
    assert payload["complete"] is True
    text = (tmp_path / "out" / "llm_multitask_cpu.md").read_text()
    assert "## Retention pooled over the tasks" in text and "| SBoRA-FA | 66.7 | 66.7 | 100.0% ± 0.0% | +75.0%" in text
    assert "Solo accuracy ≥ 50% on every task (enough to keep for retention to mean something): yes." in text


def test_verdict_names_what_the_interval_shows():
    from benchmarks.llm_quality import verdict

    assert verdict(2.0, 1.4).startswith("above LoRA") and "[+0.6, +3.4]" in verdict(2.0, 1.4)
    assert verdict(1.0, 1.4).startswith("within 1 point") and "[-0.4, +2.4]" in verdict(1.0, 1.4)
    assert verdict(-3.0, 1.0).startswith("more than 1 point below")
    assert verdict(-1.0, 1.0).startswith("not resolved")
