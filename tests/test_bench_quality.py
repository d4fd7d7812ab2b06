"""The quality benchmark's helpers (benchmarks/quality.py): crop scoring, table assembly, interval math,
slots, the full-UNet ceiling, and one end-to-end run on the tiny base with a tiny random CLIP."""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import shutil
import statistics

import pytest
import torch
from PIL import Image

from benchmarks import quality as q
from benchmarks.accuracy import T95, wilson_interval
from benchmarks.common import DOCS_DIR, UnitStore
from numeric import assert_close_to_signal
from sbora.configuration import CONFIG_DIR, ConfigError
from sbora_diffusion.world import design_probe as dp

@pytest.fixture(scope="module")
def scorer(tiny_clip_files):
    from sbora_diffusion.clip_score import load_clip

    arch, weights = tiny_clip_files
    return load_clip(str(arch), pretrained=None, weights=weights, device="cpu", batch_size=3)


def two_halves(left=(220, 30, 30), right=(30, 60, 220), size=(64, 48)) -> Image.Image:
    im = Image.new("RGB", size, right)
    im.paste(left, (0, 0, size[0] // 2, size[1]))
    return im


def test_crop_box_cuts_the_asked_fraction():
    im = two_halves()
    left, right = q.crop_box(im, q.BOXES[0]), q.crop_box(im, q.BOXES[1])
    assert left.size == (32, 48) and right.size == (32, 48)
    assert left.getcolors() == [(32 * 48, (220, 30, 30))] and right.getcolors() == [(32 * 48, (30, 60, 220))]
    assert q.crop_box(im, (0.25, 0.5, 0.75, 1.0)).size == (32, 24)
    with pytest.raises(ValueError, match="empty"):
        q.crop_box(im, (0.5, 0.0, 0.5, 1.0))


def test_crop_clip_i_scores_each_crop_against_its_references(scorer):
    images = [two_halves(), two_halves(left=(240, 220, 30))]
    refs = q.encode_pil(scorer, [q.crop_box(images[0], q.BOXES[0])])  # (1, D): exactly image 0's left half
    assert refs.shape == (1, 32) and torch.allclose(refs.norm(dim=-1), torch.ones(1), atol=1e-5)
    left = q.crop_clip_i(scorer, images, q.BOXES[0], refs)
    right = q.crop_clip_i(scorer, images, q.BOXES[1], refs)
    assert len(left) == 2 and left[0] == pytest.approx(1.0, abs=1e-5)  # a crop against its own embedding
    emb = q.encode_pil(scorer, [q.crop_box(images[1], q.BOXES[0]), q.crop_box(images[0], q.BOXES[1])])
    assert left[1] == pytest.approx(float(emb[0] @ refs[0]), abs=1e-6)
    assert right[0] == pytest.approx(float(emb[1] @ refs[0]), abs=1e-6) and right[0] < 0.9999
    two_refs = torch.cat([refs, emb[1:]])  # the mean over references
    assert q.crop_clip_i(scorer, images[:1], q.BOXES[0], two_refs)[0] == pytest.approx((1.0 + float(emb[1] @ refs[0])) / 2, abs=1e-5)


def runs_fixture():
    """LoRA and SBoRA-FA on two concepts, three seeds; SBoRA-FA = LoRA + 0.01·(seed + 1) on CLIP-I."""
    runs = []
    for seed in range(3):
        for k, concept in enumerate(("robot", "duck")):
            base = 0.5 + 0.1 * k + 0.02 * seed
            runs.append({"method": "lora", "concept": concept, "seed": seed, "clip_i": base, "clip_t": 0.3, "drift": 0.1})
            runs.append({"method": "sbora-fa", "concept": concept, "seed": seed, "clip_i": base + 0.01 * (seed + 1), "clip_t": 0.3,
                         "drift": 0.05})
    runs.append({"method": "full-ft", "concept": "robot", "seed": 0, "clip_i": 0.9, "clip_t": 0.2, "drift": 0.3})
    return runs


def test_cells_are_means_with_students_t_intervals_over_seeds():
    runs = runs_fixture()
    mean, half, n = q.cell(runs, "lora", "robot", "clip_i")
    values = [0.5, 0.52, 0.54]
    assert n == 3 and mean == pytest.approx(0.52)
    assert half == pytest.approx(T95[1] * 0.02 / math.sqrt(3))  # stdev of 0.50/0.52/0.54 is 0.02; t with 2 degrees of freedom
    assert q.cell(runs, "lora", "beachball", "clip_i")[2] == 0
    one = q.cell(runs, "full-ft", "robot", "clip_i")
    assert one[0] == pytest.approx(0.9) and math.isnan(one[1])  # one seed: no interval
    assert q.per_seed_means(runs, "lora", ["robot", "duck"], "clip_i") == pytest.approx({0: 0.55, 1: 0.57, 2: 0.59})
    assert q.per_seed_means(runs, "full-ft", ["robot", "duck"], "clip_i") == {}  # duck missing: no complete seed
    assert sum(values) / 3 == pytest.approx(mean)


def test_paired_differences_to_lora_are_over_concept_seed_units():
    runs = runs_fixture()
    mean, half, units = q.paired_vs(runs, "sbora-fa", "lora", "clip_i")
    diffs = [0.01, 0.01, 0.02, 0.02, 0.03, 0.03]
    assert units == 6 and mean == pytest.approx(0.02)
    sd = math.sqrt(sum((d - 0.02) ** 2 for d in diffs) / 5)
    assert half == pytest.approx(T95[4] * sd / math.sqrt(6))
    assert q.paired_vs(runs, "sbora-fa", "lora", "drift")[:2] == pytest.approx((-0.05, 0.0))
    assert q.paired_vs(runs, "full-ft", "lora", "clip_i")[2] == 1
    assert q.paired_vs(runs, "sbora-fa", "ortho", "clip_i")[2] == 0


def test_paired_table_says_how_many_units_the_target_needs():
    runs = [{**r, "identified": 0.75 if r["method"] == "sbora-fa" else 0.5, "trainable_params": 10, "final_loss": 0.03,
             "train_seconds": 1.0} for r in runs_fixture()]
    lines = q.paired_lines({"runs": runs, "concepts": ["robot", "duck"]})
    fa = next(line for line in lines if line.startswith("| SBoRA-FA |"))
    # Δ CLIP-I 0.01, 0.01, 0.02, 0.02, 0.03, 0.03 (sd 0.0089): 3 units give t(2)·sd/√3 = 0.022 ≤ 0.05, 2 give 0.080
    assert "| 6 | 3 (2) |" in fa and fa.startswith("| SBoRA-FA | 10 | +0.020 ± ")
    assert "| +25% ± 0% | 6 |" in fa  # Δ identified in percentage points
    assert "| 1 | — |" in next(line for line in lines if line.startswith("| full UNet fine-tune |"))  # one unit: no spread yet


def test_method_table_has_floor_first_ceiling_last_and_a_mean_column():
    res = {"concepts": ["robot", "duck"], "runs": runs_fixture(),
           "zero_shot": {"robot": {"clip_i": 0.4, "clip_t": 0.3, "drift": 0.0}, "duck": {"clip_i": 0.3, "clip_t": 0.2, "drift": 0.0}}}
    table = q.method_table(res, "clip_i")
    assert list(table) == ["zero-shot", "lora", "sbora-fa", "full-ft"]
    assert table["zero-shot"]["mean"][0] == pytest.approx(0.35) and math.isnan(table["zero-shot"]["robot"][1])
    assert table["lora"]["mean"][0] == pytest.approx(0.57)
    assert table["lora"]["mean"][1] == pytest.approx(T95[1] * 0.02 / math.sqrt(3))
    assert table["sbora-fa"]["duck"][0] == pytest.approx(0.64)
    assert math.isnan(table["full-ft"]["mean"][0]) and table["full-ft"]["robot"][0] == pytest.approx(0.9)
    lines = q.table_lines(res, "clip_i")
    assert lines[0] == "| method | robot | duck | mean |" and len(lines) == 2 + 4
    assert "| LoRA | 0.520 ± " in lines[3] and lines[5].startswith("| full UNet fine-tune | 0.900 | — | — |")


def test_the_identified_table_prints_shares_in_percent_as_the_paired_table_does():
    runs = [{"method": "lora", "concept": "robot", "seed": k, "identified": v, "clip_i": v} for k, v in enumerate((0.5, 0.625, 0.75))]
    lines = q.table_lines({"concepts": ["robot"], "runs": runs}, "identified")
    half = T95[1] * 0.125 / math.sqrt(3)  # t with 2 degrees of freedom; the sample standard deviation of 0.5, 0.625, 0.75 is 0.125
    assert lines[2] == f"| LoRA | 62% ± {half:.0%} | 62% ± {half:.0%} |"
    assert q.table_lines({"concepts": ["robot"], "runs": runs}, "clip_i")[2] == f"| LoRA | 0.625 ± {half:.3f} | 0.625 ± {half:.3f} |"


@pytest.mark.parametrize("gap, says", [(0.2, "is a ceiling here"), (-0.2, "is **not** a ceiling here"), (0.0, "not shown to be")])
def test_the_report_says_whether_the_full_fine_tune_is_a_ceiling(gap, says):
    noise = [0.01, -0.02, 0.015, -0.005]
    runs = [{"method": m, "concept": "robot", "seed": k, "clip_i": 0.5 + (gap + e if m == "full-ft" else 0.0)}
            for k, e in enumerate(noise) for m in ("lora", "full-ft")]
    verdict = q.ceiling_verdict({"runs": runs})
    assert says in verdict and "4 units" in verdict
    assert q.ceiling_verdict({"runs": runs[:2]}) == ""  # one unit: no interval, no verdict


def test_multi_table_and_its_paired_difference():
    multi = []
    for seed in range(2):
        multi.append({"pair": "robot+duck", "method": "lora", "mode": "sum", "seed": seed, "clip_i": {"robot": 0.5, "duck": 0.4 + 0.1 * seed}})
        multi.append({"pair": "robot+duck", "method": "sbora-fa", "mode": "sum", "seed": seed, "clip_i": {"robot": 0.6, "duck": 0.6}})
    res = {"multi": multi, "multi_zero_shot": [{"pair": "robot+duck", "clip_i": {"robot": 0.3, "duck": 0.2}}]}
    rows = q.multi_table(res)
    assert list(rows) == [("lora", "sum"), ("sbora-fa", "sum")]
    assert rows[("lora", "sum")]["robot+duck:duck"] == pytest.approx((0.45, T95[0] * math.sqrt(0.005) / math.sqrt(2)))
    assert rows[("lora", "sum")]["mean"][0] == pytest.approx(0.475)
    assert q.multi_paired(res, "sbora-fa", "sum")[:3] == pytest.approx((0.125, T95[0] * math.sqrt(0.00125) / math.sqrt(2), 2))
    lines = q.multi_lines(res)
    assert lines[2].startswith("| zero-shot base (floor) | class words | 0.300 | 0.200 | 0.250 |")
    assert lines[-1].startswith("| SBoRA-FA, slots | weights only | 0.600 ± 0.000 | 0.600 ± 0.000 | 0.600 ± 0.000 | +0.125 ± ")


def test_the_floor_is_one_row_over_all_pairs():
    multi = [{"pair": pair, "method": "lora", "mode": "sum", "seed": 0, "clip_i": dict.fromkeys(pair.split("+"), 0.5)}
             for pair in ("robot+duck", "beachball+checkerflag")]
    res = {"multi": multi, "multi_zero_shot": [{"pair": "robot+duck", "clip_i": {"robot": 0.3, "duck": 0.2}},
                                               {"pair": "beachball+checkerflag", "clip_i": {"beachball": 0.1, "checkerflag": 0.0}}]}
    lines = q.multi_lines(res)
    floor = [line for line in lines if line.startswith("| zero-shot base")]
    assert floor == ["| zero-shot base (floor) | class words | 0.300 | 0.200 | 0.100 | 0.000 | 0.150 | — |"]


def test_regions_against_the_weights_alone_are_paired_per_pair_concept_and_seed():
    def entry(mode, seed, robot, duck, own):
        return {"pair": "robot+duck", "method": "ortho", "mode": mode, "seed": seed, "clip_i": {"robot": robot, "duck": duck},
                "placement": {"robot": {"own_half": own, "other_half": 0, "images": 8}, "duck": {"own_half": 0, "other_half": 2, "images": 8}}}
    res = {"multi": [entry("sum", 0, 0.1, 0.2, 1), entry("regional", 0, 0.4, 0.2, 5),
                     entry("sum", 1, 0.2, 0.2, 2), entry("regional", 1, 0.3, 0.4, 4),
                     entry("regional", 2, 0.9, 0.9, 8)]}  # seed 2 has no `sum` to pair with: left out
    d = q.regions_vs_sum(res)["ortho"]
    diffs = [0.3, 0.0, 0.1, 0.2]
    assert d["clip_i"] == pytest.approx((0.15, T95[2] * statistics.stdev(diffs) / 2, 4))
    own = [4 / 8, 0.0, 2 / 8, 0.0]
    assert d["own_half"][:2] == pytest.approx((0.1875, T95[2] * statistics.stdev(own) / 2))
    assert d["other_half"][:3] == pytest.approx((0.0, 0.0, 4))
    lines = q.regions_lines(res)
    assert lines[2].startswith("| Ortho, slots | +0.150 ± ") and "| +19% ± " in lines[2] and lines[2].endswith("| 4 |")
    assert q.regions_lines({"multi": []}) == []


def test_slots_fit_the_narrowest_layer(tiny_pipe):
    from sbora.adapters import load_adapter_config, match_targets

    cap = q.slot_capacity(tiny_pipe.unet, load_adapter_config("sbora-fa", rank=4), "in")
    assert cap == 32 // 4  # the tiny UNet's narrowest attention input is 32 wide
    assert q.slot_capacity(tiny_pipe.unet, load_adapter_config("sbora-fb", rank=16), "out") == 2
    assert q.assign_slots(["a", "b", "c"], 2) == {"a": 0, "b": 1, "c": 0}
    # --rank and --targets reach every low-rank method's adapter config (and its slot count), never the dense ones.
    wide = q.QualityConfig(model="tiny", rank=8, targets=["sd-unet-full"])
    assert q.adapter_overrides(wide, "sbora-fa") == {"rank": 8, "alpha": 8.0, "targets": ["sd-unet-full"]}
    assert q.adapter_overrides(wide, "custom-diffusion") == {} and q.adapter_overrides(q.QualityConfig(), "lora") == {}
    full = load_adapter_config("sbora-fa", **q.adapter_overrides(wide, "sbora-fa"))
    widths = [tiny_pipe.unet.get_submodule(p).in_features for p in match_targets(tiny_pipe.unet, full)]
    assert any(p.endswith("ff.net.2") for p in match_targets(tiny_pipe.unet, full))
    assert q.slot_capacity(tiny_pipe.unet, full, "in") == min(widths) // 8
    with pytest.raises(Exception, match="not even one slot"):
        q.assign_slots(["a"], 0)


def test_keep_box_paints_the_rest_gray_at_full_size():
    im = Image.new("RGB", (64, 64), (200, 10, 10))
    left = q.keep_box(im, (0.0, 0.0, 0.5, 1.0))
    assert left.size == (64, 64)
    assert left.getpixel((10, 30)) == (200, 10, 10) and left.getpixel((31, 0)) == (200, 10, 10)
    assert left.getpixel((32, 30)) == (128, 128, 128) and left.getpixel((63, 63)) == (128, 128, 128)


def test_placement_table_pools_images_with_wilson_intervals():
    res = {"multi_zero_shot": [{"placement": {"robot": {"own_half": 1, "other_half": 0, "images": 4}, "duck": {"own_half": 0, "other_half": 0, "images": 4}}}],
           "multi": [{"method": "sbora-fa", "mode": "regional", "placement": {"robot": {"own_half": 4, "other_half": 0, "images": 4},
                                                                              "duck": {"own_half": 3, "other_half": 1, "images": 4}}},
                     {"method": "sbora-fa", "mode": "regional", "placement": {"robot": {"own_half": 0, "other_half": 0, "images": 0}}}]}
    lines = q.placement_lines(res)
    assert lines[2].startswith("| zero-shot base (floor) | class words | 1/8 = 12% [")
    assert "| regions | 7/8 = 88% [" in lines[3] and lines[3].endswith("| 1/8 = 12% |")
    assert q.placement_lines({"multi": []}) == []


def test_wilson_interval_covers_the_rate_and_stays_in_0_1():
    assert wilson_interval(0, 40)[0] == 0.0 and 0.05 < wilson_interval(0, 40)[1] < 0.1  # 0 of 40: up to ~8.8%
    assert wilson_interval(40, 40)[1] == 1.0 and 0.9 < wilson_interval(40, 40)[0] < 0.95
    lo, hi = wilson_interval(28, 40)
    assert lo < 0.7 < hi and hi - lo == pytest.approx(0.27, abs=0.02)  # 70% of 40: about ±14 points
    assert math.isnan(wilson_interval(0, 0)[0])


def test_estimate_counts_every_run_and_image():
    cfg = q.QualityConfig(concepts=["robot", "duck"], methods=["lora", "sbora-fa"], seeds=2, num_prompts=3, num_images=2,
                          drift_prompts=2, drift_images=1, pairs=["robot+duck"], multi_methods=["lora"], multi_modes=["sum"], multi_images=3,
                          lrs=None, full_ft_lrs=[1e-4])
    timing = {"step_seconds": {"lora": 1.0, "sbora-fa": 0.5, "full-ft": 2.0}, "step_seconds_mean": 1.0, "image_seconds": 0.1,
              "run_overhead_seconds": 0.5}
    est = q.estimate_seconds(cfg, timing, steps=10, default_lr=3e-3)
    assert est["runs"] == 2 * 2 * 3  # concepts x seeds x (methods + ceiling)
    assert est["train"] == pytest.approx(4 * 10 * (1.0 + 0.5 + 2.0))
    per_run = 3 * 2 + 2 * 1
    assert est["image_count"] == 12 * per_run + 2 * 3 * 2 + 2 * 1 + 1 * 2 * 1 * 1 * 3 + 3
    assert est["total"] == pytest.approx(est["train"] + 0.1 * est["image_count"] + 12 * 0.5)
    # A sweep of 2 rates trains every rate on every concept once (seed 0); an adapter's reported seed 0 reuses its sweep run.
    swept = q.estimate_seconds(dataclasses.replace(cfg, lrs=[1e-3, 3e-3], full_ft_lrs=[1e-4, 3e-4]), timing, steps=10, default_lr=3e-3)
    assert swept["runs"] == (4 + 4 - 2) * 2 + (4 + 4)
    assert swept["image_count"] == est["image_count"] + 3 * 2 * 2 * 3 * 2  # methods x concepts x rates x validation images


def test_config_refuses_unknown_methods_and_bad_pairs():
    from sbora.configuration import ConfigError, override

    with pytest.raises(ConfigError, match="unknown method"):
        override(q.QualityConfig(), {"methods": ["lora", "dora"]})
    with pytest.raises(ConfigError, match="pair 'robot\\+robot'"):
        override(q.QualityConfig(), {"pairs": ["robot+robot"]})
    with pytest.raises(ConfigError, match="pair 'robot\\+dog2'"):
        override(q.QualityConfig(), {"pairs": ["robot+dog2"]})
    assert override(q.QualityConfig(), q.PRESETS["quick"]).concepts == ["robot", "duck"]
    with pytest.raises(ConfigError, match="--lrs lists a learning rate twice"):
        override(q.QualityConfig(), {"lrs": [1e-3, 0.001]})
    with pytest.raises(ConfigError, match="positive"):
        override(q.QualityConfig(), {"full_ft_lrs": [-1e-4]})
    with pytest.raises(ConfigError, match="--worker"):
        override(q.QualityConfig(), {"worker": "2/2"})


def test_full_unet_ceiling_trains_only_unet_weights_and_the_token(tiny_pipe, tmp_path):
    """The ceiling is a task of the engine: every UNet weight and the token train; checkpoints resume it like any run."""
    from sbora.engine import fit
    from sbora_diffusion.concept.config import load_concept
    from sbora_diffusion.concept.options import TrainConfig

    pipe = copy.deepcopy(tiny_pipe)
    before = {part: {n: p.detach().clone() for n, p in getattr(pipe, part).named_parameters()} for part in ("unet", "text_encoder", "vae")}
    concept = load_concept("robot")
    cfg = TrainConfig(steps=2, resolution=32, lr=1e-3, token_lr=1e-2, checkpoint_every=1, cpu=True, output_dir=str(tmp_path / "run"))
    state, _ = fit(q.FullUNetTask(concept, "tiny", cfg, pipe, lr=1e-2), cfg, tmp_path / "run")
    assert len(state.losses) == 2 and all(math.isfinite(x) for x in state.losses)
    assert sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir()) == ["step-00000001.pt", "step-00000002.pt"]
    assert (tmp_path / "run" / "config.yaml").is_file() and (tmp_path / "run" / "log.jsonl").is_file()
    changed = [n for n, p in pipe.unet.named_parameters() if not torch.equal(p, before["unet"][n])]
    assert len(changed) >= 0.9 * len(before["unet"])  # (nearly) every UNet tensor moved
    assert any("conv" in n for n in changed) and any("norm" in n for n in changed)  # not only linear layers
    for n, p in pipe.vae.named_parameters():
        assert torch.equal(p, before["vae"][n]), n
    te = dict(pipe.text_encoder.named_parameters())
    for n, old in before["text_encoder"].items():
        key = n.replace("token_embedding.weight", "token_embedding.base.weight")
        assert torch.equal(te[key], old), n  # the frozen text encoder, its embedding table included
    token = pipe.text_encoder.get_input_embeddings()
    assert token.vectors.shape == (1, 32) and pipe.tokenizer.convert_tokens_to_ids("<robot1>") in token.token_ids.tolist()
    # Resumed from its step-1 checkpoint on a fresh copy of the base, step 2 gives the same weights.
    resumed = copy.deepcopy(tiny_pipe)
    again = dataclasses.replace(cfg, output_dir=str(tmp_path / "again"))
    (tmp_path / "again" / ".partial" / "checkpoints").mkdir(parents=True)
    shutil.copy(tmp_path / "run" / "checkpoints" / "step-00000001.pt", tmp_path / "again" / ".partial" / "checkpoints")
    state2, _ = fit(q.FullUNetTask(concept, "tiny", again, resumed, lr=1e-2), again, tmp_path / "again", resume=True)
    assert state2.step == 2
    for (n, a), b in zip(pipe.unet.named_parameters(), resumed.unet.parameters()):
        assert_close_to_signal(b, a, msg=n)


def test_end_to_end_on_the_tiny_base_writes_tables_and_files(tiny_pipe, tiny_clip_files, tmp_path):
    arch, weights = tiny_clip_files
    out = tmp_path / "docs"
    argv = ["--preset", "quick", "--model", "tiny", "--clip-model", str(arch), "--clip-weights", str(weights), "--methods", "lora,sbora-fa",
            "--multi-methods", "lora,sbora-fa", "--steps", "2", "--num-prompts", "1", "--num-images", "1", "--drift-prompts", "1",
            "--drift-images", "1", "--multi-images", "1", "--sample-steps", "2", "--threads", "1", "--rank", "4", "--seeds", "1",
            "--lrs", "1e-3,3e-3", "--work-dir", str(tmp_path / "work"), "--units-dir", str(tmp_path / "units"), "--out-dir", str(out)]
    payload = q.main(argv, pipe=copy.deepcopy(tiny_pipe))
    res = payload["results"]
    # The sweep: each adapter method's rate from its validation CLIP-I; seed 0 reuses the sweep's run at that rate.
    assert res["units"] == res["units_done"] == 2 + 1 + 2 * 2 * 2 + 3 * 2 + 2  # zero-shot (2 concepts, 1 pair), sweeps, runs, pairs
    for method in ("lora", "sbora-fa"):
        sweep = res["sweep"][method]
        best = max((1e-3, 3e-3), key=lambda lr: (sum(sweep[f"{lr:g}"][c]["clip_i"] for c in ("robot", "duck")),
                                                  sum(sweep[f"{lr:g}"][c]["identified"] for c in ("robot", "duck"))))
        assert res["best_lr"][method] == best
        for r in (r for r in res["runs"] if r["method"] == method):
            assert r["lr"] == best and r["reused_sweep_run"] and r["adapter"] == sweep[f"{best:g}"][r["concept"]]["adapter"]
    assert "full-ft" not in res["sweep"] and res["best_lr"]["full-ft"] == 1e-4  # one rate: no sweep
    assert payload["complete"] and {p.name for p in out.iterdir()} == {"quality.json", "quality.md", "quality.png", "quality_robot.png", "quality_duck.png"}
    grid = Image.open(out / "quality_robot.png")  # base, LoRA, SBoRA-FA and the ceiling (rows) x the one prompt's image
    tile = 32  # the tiny base's images
    assert grid.height > 4 * tile and grid.width > tile and grid.height < 4 * (tile + 60)
    assert len(res["runs"]) == 3 * 2  # (lora, sbora-fa, full-ft) x 2 concepts, one seed
    assert {(r["method"], r["concept"], r["seed"]) for r in res["runs"]} == {
        (m, c, 0) for m in ("lora", "sbora-fa", "full-ft") for c in ("robot", "duck")}
    for r in res["runs"]:
        assert -1 <= r["clip_i"] <= 1 and -1 <= r["clip_t"] <= 1 and 0 <= r["drift"] <= 2 and r["images"] == 1
        assert r["identified"] in (0.0, 1.0) and len(r["named"]) == 1 and r["named"][0] in dp.GROUPS  # the design probe's verdict on 1 image
    assert all(0 <= z["identified"] <= 1 for z in res["zero_shot"].values())
    fa = [r for r in res["runs"] if r["method"] == "sbora-fa"]
    assert {r["concept"]: r["slot"] for r in fa} == {"robot": 0, "duck": 1}
    lora = next(r for r in res["runs"] if r["method"] == "lora")
    assert fa[0]["trainable_params"] < 0.6 * lora["trainable_params"]  # FA trains r·d_out, LoRA r·(d_in + d_out)
    assert len(res["multi"]) == 2 * 2  # methods x modes (one seed)
    assert {m["mode"] for m in res["multi"]} == {"sum", "regional"}
    assert all(set(m["clip_i"]) == {"robot", "duck"} for m in res["multi"])
    for m in [*res["multi"], *res["multi_zero_shot"]]:  # the design probe on each half of every composed image
        assert set(m["placement"]) == {"robot", "duck"}
        assert all(v["images"] == 1 and v["own_half"] in (0, 1) and v["other_half"] in (0, 1) for v in m["placement"].values())
    fa_pairs = [m for m in res["multi"] if m["method"] == "sbora-fa"]
    assert max(m["max_interference"] for m in fa_pairs) == pytest.approx(0.0, abs=1e-6)  # disjoint slots
    assert res["full_estimate"]["total"] > 0 and res["timing"]["images"] > 0
    md = (out / "quality.md").read_text()
    assert "| LoRA | " in md and "± nan" not in md  # one seed: means without intervals
    assert "| zero-shot base (floor) |" in md and "| SBoRA-FA, slots | regions |" in md and "estimated" in md
    assert json.loads((out / "quality.json").read_text())["results"]["concepts"] == ["robot", "duck"]
    assert len(list((tmp_path / "work" / "multi" / "robot_duck" / "sbora-fa" / "sum" / "seed0").glob("*.png"))) == 1
    assert "**" in md.split("## Learning rates")[1].split("##")[0]  # the sweep table, the chosen rates in bold
    again = q.main([*argv, "--merge"], pipe=copy.deepcopy(tiny_pipe))  # every unit done: the report is rebuilt from them
    assert again["results"]["runs"] == res["runs"] and again["complete"]
    # Paired against itself as the baseline: every method, every unit, every difference exactly zero.
    itself = q.main([*argv, "--merge", "--baseline", str(tmp_path / "units")], pipe=copy.deepcopy(tiny_pipe))
    assert itself["results"]["baseline"]["metrics"] == list(q.METRICS) and len(itself["results"]["baseline"]["runs"]) == len(res["runs"])
    section = (out / "quality.md").read_text().split("## Against the baseline run")[1].split("\n## ")[0]
    assert section.count("| +0.000 ± 0.000 | +0.000 ± 0.000 | +0.000 ± 0.000 | +0% ± 0% | 2 |") == 3  # LoRA, SBoRA-FA, the full fine-tune: 2 units each, one seed
    assert "partial" not in md and "h of worker time in all" in md  # a finished run; its time is the workers', not the report's
    assert "## Is the concept there? Identification per run" in md and "[" in md.split("Identification per run")[1]  # Wilson intervals
    assert f"The design probe {dp.probe_id()} (" in md
    # A run scored by an earlier probe (its units name none: the first): --merge still reports it, as that probe scored it;
    # running more of it with the shipped probe is refused, not mixed.
    shutil.copytree(tmp_path / "units", tmp_path / "old-units")
    for p in (tmp_path / "old-units").glob("*.json"):
        data = json.loads(p.read_text())
        del data["protocol"]["probe"]
        p.write_text(json.dumps(data))
    old = [*argv, "--units-dir", str(tmp_path / "old-units"), "--out-dir", str(tmp_path / "old-docs")]
    merged = q.main([*old, "--merge"], pipe=copy.deepcopy(tiny_pipe))["results"]
    assert merged["runs"] == res["runs"] and merged["settings"]["probe"] == dp.FIRST_PROBE
    assert f"The design probe {dp.FIRST_PROBE} (" in (tmp_path / "old-docs" / "quality.md").read_text()
    with pytest.raises(ConfigError, match=f"other settings: probe {dp.FIRST_PROBE} \\(now {dp.probe_id()}\\)"):
        q.main(old, pipe=copy.deepcopy(tiny_pipe))
    (tmp_path / "old-units" / "run-lora-robot-seed0.json").write_text("{cut short")  # e.g. another tool's file, or a bad copy
    with pytest.raises(ConfigError, match="run-lora-robot-seed0.json is not a unit of a quality run"):
        q.main([*old, "--merge"], pipe=copy.deepcopy(tiny_pipe))
    # The units travel with the checkout, the work folder stays behind: on a "new machine" the pair units still to do
    # train their lost adapters again (same seed and rate) and compose the same images.
    units = sorted(p.name for p in (tmp_path / "units").iterdir())
    assert len(units) == res["units"] and not (tmp_path / "work" / "units").exists()
    shutil.rmtree(tmp_path / "work")
    for p in (tmp_path / "units").glob("pair-robot_duck-sbora-fa-seed0.json"):
        p.unlink()
    redone = q.main(argv, pipe=copy.deepcopy(tiny_pipe))["results"]
    assert redone["units_done"] == res["units"] and redone["runs"] == res["runs"]
    assert sorted(p.name for p in (tmp_path / "work" / "runs" / "robot").iterdir()) == ["sbora-fa"]  # only the lost adapters trained
    assert (tmp_path / "work" / "runs" / "duck" / "sbora-fa" / "seed0").is_dir()
    before = {m["mode"]: m["clip_i"] for m in fa_pairs}
    after = {m["mode"]: m["clip_i"] for m in redone["multi"] if m["method"] == "sbora-fa"}
    assert after.keys() == before.keys() and all(after[k] == pytest.approx(before[k], abs=1e-4) for k in before)


def test_a_baseline_run_is_paired_per_method_concept_and_seed():
    runs = [{"method": m, "concept": c, "seed": k, "lr": 3e-3, "clip_i": 0.5 + 0.1 * k, "clip_t": 0.3, "drift": 0.1, "identified": 0.5}
            for m in ("lora", "sbora-fa") for c in ("robot", "duck") for k in range(3)]
    better = [{**r, "clip_i": r["clip_i"] + d, "identified": 0.75, "lr": 1e-3} for r, d in zip(runs, [0.01, 0.03, 0.02] * 4)]
    res = {"runs": better[6:], "baseline": {"folder": "b", "metrics": ["clip_i", "identified"], "runs": runs[:9]}}  # SBoRA-FA here; 3 of its 6 there
    lines = q.baseline_lines(res)
    assert lines[0] == "| method | lr (here / baseline) | Δ CLIP-I | Δ identified | units | identified here | identified in the baseline |"
    mean, half, n = q.seed_interval([0.01, 0.03, 0.02]) + (3,)
    assert lines[2] == f"| SBoRA-FA | 0.001 / 0.003 | +{mean:.3f} ± {half:.3f} | +25% ± 0% | 3 | 75% | 50% |" and len(lines) == 3
    mean, half = q.seed_interval([0.01, 0.03, 0.02] * 2)  # LoRA: both concepts there, 6 units
    assert q.baseline_lines({"runs": better[:6], "baseline": res["baseline"]})[2] == f"| LoRA | 0.001 / 0.003 | +{mean:.3f} ± {half:.3f} | +25% ± 0% | 6 | 75% | 50% |"
    assert q.baseline_lines({"runs": runs[6:9], "baseline": {**res["baseline"], "runs": runs[:6]}}) == []  # nothing in common
    assert q.baseline_lines({"runs": runs}) == []


def test_a_baseline_must_have_drawn_its_images_alike(tmp_path):
    here = q.QualityConfig(model="tiny", methods=["lora"], multi_methods=[], pairs=[], concepts=["robot"], num_images=4, drift_prompts=2,
                           baseline=str(tmp_path / "b"))
    with pytest.raises(ConfigError, match="is not a folder"):
        here.validate()
    result = {"method": "lora", "concept": "robot", "seed": 0, "clip_i": 0.5}
    mine = tmp_path / "snr.yaml"  # the tiny base's training config with one setting changed: what a baseline is for
    mine.write_text((CONFIG_DIR / "train" / "tiny.yaml").read_text() + "\nsnr_gamma: 5.0\n")
    for name, other in (("alike", {}), ("other-training", {"train_config": str(mine), "steps": 1200, "drift_prompts": 0}),
                        ("more-images", {"num_images": 8}), ("other-sampler", {"train_config": "pocket"}),
                        ("other-guidance", {"guidance_scale": 12.0}), ("other-guidance-and-steps", {"guidance_scale": 12.0, "steps": 1200})):
        folder = tmp_path / name
        UnitStore(folder, {**q.protocol(here), **other}).save("run-lora-robot-seed0", result)
        UnitStore(folder, {**q.protocol(here), **other}).save("run-ortho-robot-seed0", {**result, "method": "ortho"})  # not asked for here
    got = q.baseline_runs(dataclasses.replace(here, baseline=str(tmp_path / "alike")))
    steps = q.training_of(q.protocol(here)).steps  # the tiny config's
    assert got == {"folder": str(tmp_path / "alike"), "metrics": list(q.METRICS), "runs": [result],
                   "trained": f" with the same training config, {steps} steps"}
    other = q.baseline_runs(dataclasses.replace(here, baseline=str(tmp_path / "other-training")))
    assert other["metrics"] == ["clip_i", "clip_t", "identified"] and other["runs"] == [result]  # no drift there: not paired
    assert other["trained"] == f" from `{mine}`, 1200 steps"  # what the baseline was trained with, for the report's sentence
    UnitStore(tmp_path / "ranked", {**q.protocol(here), "rank": 8}).save("run-lora-robot-seed0", result)
    assert q.baseline_runs(dataclasses.replace(here, baseline=str(tmp_path / "ranked")))["trained"].endswith(f", {steps} steps, rank 8")
    assert q.baseline_runs(dataclasses.replace(here, rank=4, baseline=str(tmp_path / "alike")))["trained"].endswith("steps, the method YAMLs' rank")
    # --targets: kept in the protocol only when given (older units have none), and said where the two runs differ.
    assert "targets" not in q.protocol(here) and q.protocol(dataclasses.replace(here, targets=["sd-unet-full"]))["targets"] == ["sd-unet-full"]
    assert q.baseline_runs(dataclasses.replace(here, targets=["sd-unet-full"], baseline=str(tmp_path / "alike")))["trained"].endswith(
        f"{steps} steps, targets of the method YAMLs")
    UnitStore(tmp_path / "wide", {**q.protocol(here), "targets": ["sd-unet-full"]}).save("run-lora-robot-seed0", result)
    assert q.baseline_runs(dataclasses.replace(here, baseline=str(tmp_path / "wide")))["trained"].endswith(f"{steps} steps, targets sd-unet-full")
    # A run with a --train-set against a baseline without one: the baseline is not said to share the training config.
    assert q.baseline_runs(dataclasses.replace(here, train_set=["snr_gamma=5"], baseline=str(tmp_path / "alike")))["trained"] == \
        f" from the same file, without `--train-set`, {steps} steps"
    with pytest.raises(ConfigError, match="num_images 8 \\(here 4\\)"):
        q.baseline_runs(dataclasses.replace(here, baseline=str(tmp_path / "more-images")))
    with pytest.raises(ConfigError, match="drew its images otherwise: sample_steps 25 \\(here 20\\);"):  # the pocket config's sampler, not the tiny's
        q.baseline_runs(dataclasses.replace(here, baseline=str(tmp_path / "other-sampler")))
    # Another guidance alone: the same adapters drawn otherwise, a measurement of the sampler (the report's sentence says so).
    drawn = q.baseline_runs(dataclasses.replace(here, baseline=str(tmp_path / "other-guidance")))
    assert drawn["runs"] == [result] and drawn["drawn"] == "guidance_scale 12.0" and "drawn" not in got
    said = q.baseline_difference({"settings": {"sample_steps": 20, "guidance_scale": 7.5, "probe": "p2"}, "baseline": drawn}, {})
    assert said.endswith("the difference is in how they were drawn or scored: this run drew with DDIM 20 steps, guidance 7.5, design probe p2; "
                         "the baseline with guidance scale 12.0.")
    # Another design probe alone (units written before probes were named were scored by the first): the same images scored
    # otherwise, paired and said; another probe and other training: refused.
    first = {k: v for k, v in q.protocol(here).items() if k != "probe"}
    UnitStore(tmp_path / "first-probe", first).save("run-lora-robot-seed0", result)
    UnitStore(tmp_path / "first-probe-1200", {**first, "steps": 1200}).save("run-lora-robot-seed0", result)
    assert q.protocol(here)["probe"] == dp.probe_id() != dp.FIRST_PROBE  # the shipped probe is a retrained one
    scored = q.baseline_runs(dataclasses.replace(here, baseline=str(tmp_path / "first-probe")))
    assert scored["runs"] == [result] and scored["drawn"] == f"probe {dp.FIRST_PROBE}"
    with pytest.raises(ConfigError, match=f"probe {dp.FIRST_PROBE} \\(here {dp.probe_id()}\\); .* differ only in the sampler or the probe"):
        q.baseline_runs(dataclasses.replace(here, baseline=str(tmp_path / "first-probe-1200")))
    with pytest.raises(ConfigError, match=f"other settings: probe {dp.FIRST_PROBE} \\(now {dp.probe_id()}\\)"):  # a run's units share one probe
        q.Schedule(dataclasses.replace(here, baseline=None, units_dir=str(tmp_path / "first-probe"))).load(("run", "lora", "robot", 0))
    said = q.baseline_difference({"settings": {"steps": 300}, "baseline": got}, {"rank": 32, "targets": ["sd-unet-full"]})
    assert "the difference is in training: " in said and ", 300 steps, rank 32, targets sd-unet-full; the baseline's with the same" in said
    with pytest.raises(ConfigError, match="guidance_scale 12.0 \\(here 7.5\\); .* trained alike and differ only in the sampler"):
        q.baseline_runs(dataclasses.replace(here, baseline=str(tmp_path / "other-guidance-and-steps")))  # sampler and training: refused
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match="no finished runs"):
        q.baseline_runs(dataclasses.replace(here, baseline=str(tmp_path / "empty")))
    for junk in ("{not json", '{"protocol": {}}', '{"protocol": {}, "result": {"method": "lora"}}', "[1, 2]"):
        (tmp_path / "junk").mkdir(exist_ok=True)
        (tmp_path / "junk" / "run-lora-robot-seed0.json").write_text(junk)  # e.g. a file cut short, or another tool's JSON
        with pytest.raises(ConfigError, match="is not a unit of a quality run"):
            q.baseline_runs(dataclasses.replace(here, baseline=str(tmp_path / "junk")))


def test_train_set_changes_one_training_field_and_keeps_its_units_apart(tmp_path):
    plain = q.QualityConfig(model="tiny", methods=["lora"], multi_methods=[], pairs=[], concepts=["robot"])
    snr = dataclasses.replace(plain, train_set=["snr_gamma=5", "token-lr=0.01"])
    assert q.train_overrides(snr.train_set) == {"snr_gamma": "5", "token_lr": "0.01"}
    tcfg = q.base_train_config(snr)
    assert (tcfg.snr_gamma, tcfg.token_lr) == (5.0, 0.01) and q.base_train_config(plain).snr_gamma is None
    assert "train_set" not in q.protocol(plain)  # units written before the option still load
    assert q.protocol(snr)["train_set"] == ["snr_gamma=5", "token-lr=0.01"]
    UnitStore(tmp_path, q.protocol(plain)).save("run-lora-robot-seed0", {"clip_i": 0.5})
    with pytest.raises(ConfigError, match="other settings: train_set"):  # a changed setting never mixes with old units
        UnitStore(tmp_path, q.protocol(snr)).load("run-lora-robot-seed0")
    for bad, says in ((["snr_gamma"], "takes FIELD=VALUE"), (["=5"], "takes FIELD=VALUE"), (["snr=5"], "unknown field"),
                      (["snr_gamma=lots"], "expects float")):
        with pytest.raises(ConfigError, match=says):
            dataclasses.replace(plain, train_set=bad).validate()
    # A baseline's sampler is read with its own --train-set: the tiny config's 20 DDIM steps set to 25 is another sampler,
    # and nothing else: it pairs, as a measurement of the sampler, and says so.
    UnitStore(tmp_path / "b", q.protocol(dataclasses.replace(plain, train_set=["sample_steps=25"]))).save(
        "run-lora-robot-seed0", {"method": "lora", "concept": "robot", "seed": 0})
    assert q.baseline_runs(dataclasses.replace(plain, baseline=str(tmp_path / "b")))["drawn"] == "sample_steps 25"
    # With prior preservation the sampler draws the class images, so it is training too: not paired.
    prior = dataclasses.replace(plain, train_set=["with_prior_preservation=true"])
    UnitStore(tmp_path / "pp", q.protocol(dataclasses.replace(prior, guidance_scale=12.0))).save(
        "run-lora-robot-seed0", {"method": "lora", "concept": "robot", "seed": 0})
    with pytest.raises(ConfigError, match="guidance_scale 12.0 \\(here 7.5\\); .* differ only in the sampler"):
        q.baseline_runs(dataclasses.replace(prior, baseline=str(tmp_path / "pp")))
    assert "drawn" not in q.baseline_runs(dataclasses.replace(prior, guidance_scale=12.0, baseline=str(tmp_path / "pp")))
    header = q.markdown({"results": {"settings": {"train_config": "configs/train/tiny.yaml", "train_set": snr.train_set}}, "command": "c", "seconds": 1,
                         "config": {**dataclasses.asdict(snr), "preset": "demo"}, "environment": {"date": "d", "torch_threads": 1,
                         "load_average": [0.0], "load_average_end": [0.0]}})
    assert "from `configs/train/tiny.yaml` with `snr_gamma=5`, `token-lr=0.01`;" in header


def test_class_images_keep_the_training_configs_sampling_while_the_trainers_own_sample_is_cheap():
    """The trainer's samples.png is not scored, so it is drawn in 5 DDIM steps; with prior preservation the same field
    draws the class images, which are training data: they keep the training config's steps (5-step class images were
    blurs that the adapter learnt to paint)."""
    plain = q.QualityConfig(model="pocket", methods=["sbora-fa"], multi_methods=[], pairs=[], concepts=["robot"])
    prior = dataclasses.replace(plain, train_set=["with_prior_preservation=true"])
    tcfg = q.base_train_config(plain)
    assert tcfg.sample_steps == 25 and q.trainer_overrides(plain, tcfg)["sample_steps"] == 5
    assert q.trainer_overrides(prior, q.base_train_config(prior))["sample_steps"] == 25


def test_the_schedule_is_seed_major_and_sweeps_before_the_seeds():
    cfg = q.QualityConfig(concepts=["robot", "duck"], methods=["lora", "sbora-fa"], seeds=2, lrs=[1e-3, 3e-3], full_ft_lrs=[1e-4],
                          pairs=["robot+duck"], multi_methods=["lora"])
    units = q.schedule(cfg, default_lr=3e-3)
    kinds = [u[0] for u in units]
    assert kinds[:3] == ["zero-shot", "zero-shot", "pair-zero-shot"]
    assert units[3:11] == [("sweep", m, lr, c) for m in ("lora", "sbora-fa") for lr in (1e-3, 3e-3) for c in ("robot", "duck")]
    seed0 = [u for u in units if u[0] in ("run", "pair") and u[-1] == 0]
    seed1 = [u for u in units if u[0] in ("run", "pair") and u[-1] == 1]
    assert units.index(seed0[-1]) < units.index(seed1[0])  # every unit of seed 0 before any of seed 1
    assert ("run", "full-ft", "duck", 1) in units and not any(u[0] == "sweep" and u[1] == "full-ft" for u in units)  # one rate: no sweep
    assert len({q.unit_key(u) for u in units}) == len(units)


def test_best_rate_waits_for_the_whole_sweep_and_a_changed_best_redoes_the_runs(tmp_path):
    cfg = q.QualityConfig(concepts=["robot", "duck"], methods=["lora"], ceiling=False, seeds=1, lrs=[1e-3, 3e-3], pairs=[],
                          multi_methods=[], work_dir=str(tmp_path), model="tiny")
    sched = q.Schedule(cfg)
    run = ("run", "lora", "robot", 0)
    assert sched.best("lora") == (False, None) and not sched.ready(run)
    clip = {(1e-3, "robot"): 0.30, (1e-3, "duck"): 0.20, (3e-3, "robot"): 0.28, (3e-3, "duck"): 0.30}
    for (lr, c), v in clip.items():
        sched.store.save(q.unit_key(("sweep", "lora", lr, c)), {"clip_i": v, "identified": 0.5, "lr": lr})
    assert sched.best("lora") == (True, 3e-3) and sched.ready(run)  # mean 0.29 beats 0.25
    sched.store.save(q.unit_key(run), {"lr": 3e-3})
    assert sched.is_done(run)
    sched.store.save(q.unit_key(("sweep", "lora", 3e-3, "duck")), {"clip_i": 0.10, "identified": 0.5, "lr": 3e-3})
    assert sched.best("lora") == (True, 1e-3) and not sched.is_done(run)  # the stored run is at a rate no longer chosen
    other = dataclasses.replace(cfg, steps=7)
    with pytest.raises(Exception, match="other settings"):
        q.Schedule(other).load(run)


def test_extra_rates_extend_only_their_methods_sweep():
    from sbora.configuration import ConfigError

    cfg = q.QualityConfig(methods=["lora", "sbora-fb"], multi_methods=["lora"], lrs=[1e-3, 3e-3], full_ft_lrs=[1e-4, 3e-4],
                          extra_lrs=["sbora-fb=0.01", "full-ft=3e-5"])
    cfg.validate()
    assert q.lr_grid(cfg, "lora", 3e-3) == [1e-3, 3e-3]
    assert q.lr_grid(cfg, "sbora-fb", 3e-3) == [1e-3, 3e-3, 1e-2]
    assert q.lr_grid(cfg, "full-ft", 3e-3) == [3e-5, 1e-4, 3e-4]  # sorted: the table's columns run low to high
    sweeps = [u for u in q.schedule(cfg, 3e-3) if u[0] == "sweep"]
    assert sum(u[1] == "sbora-fb" for u in sweeps) == 3 * len(cfg.concepts) and sum(u[1] == "lora" for u in sweeps) == 2 * len(cfg.concepts)
    single = dataclasses.replace(cfg, lrs=None)  # one rate: no sweep to extend
    assert q.lr_grid(single, "sbora-fb", 3e-3) == [3e-3]
    assert q.lr_grid(dataclasses.replace(cfg, extra_lrs=["sbora-fb=0.003"]), "sbora-fb", 3e-3) == [1e-3, 3e-3]  # no rate twice
    assert q.lr_grid(dataclasses.replace(cfg, extra_lrs=["sbora-fb=0.01", "sbora-fb=1e-2"]), "sbora-fb", 3e-3) == [1e-3, 3e-3, 1e-2]
    for bad in ("sbora-fb", "sbora-fb=x", "sbora-fb=-1", "ortho=0.01", "nope=0.01"):  # ortho is not among --methods
        with pytest.raises(ConfigError, match="--extra-lrs entry"):
            dataclasses.replace(cfg, extra_lrs=[bad]).validate()


def test_the_old_single_rate_flags_still_work():
    from benchmarks.common import parse_invocation

    inv = parse_invocation("quality", q.__doc__, q.QualityConfig, q.PRESETS, ["--preset", "standard", "--lr", "0.002", "--full-ft-lr", "1e-4"])
    assert inv.config.lrs == [0.002] and inv.config.full_ft_lrs == [1e-4] and inv.stem == "quality_standard"
    assert q.schedule(inv.config, default_lr=3e-3)[len(inv.config.concepts) + len(inv.config.pairs)][0] == "run"  # one rate: no sweep



def test_the_old_preset_name_full_runs_the_standard_preset():
    from benchmarks.common import parse_invocation

    old, new = (parse_invocation("quality", q.__doc__, q.QualityConfig, q.PRESETS, ["--preset", p]).config for p in ("full", "standard"))
    assert old == new and old.seeds == 8 and old.extra_lrs == new.extra_lrs


def test_the_standard_preset_keeps_the_training_its_committed_units_had():
    """The standard run was trained before the pocket config weighted its loss: its preset keeps snr_gamma off, so it
    still trains as its committed units did, while the demo preset trains as `make demo` does today. Its units were
    scored by the first design probe: continuing them with the shipped one is refused, not mixed."""
    from benchmarks.common import parse_invocation

    config = lambda preset: parse_invocation("quality", q.__doc__, q.QualityConfig, q.PRESETS, ["--preset", preset]).config  # noqa: E731
    standard, demo = config("standard"), config("demo")
    unit = json.loads((DOCS_DIR / "quality_standard_units" / "run-sbora-fa-duck-seed0.json").read_text())
    assert unit["protocol"] == {k: v for k, v in q.protocol(standard).items() if k != "probe"} and q.base_train_config(standard).snr_gamma is None
    assert "probe" not in unit["protocol"] and q.protocol(standard)["probe"] == dp.probe_id() != dp.FIRST_PROBE
    pocket = q.base_train_config(dataclasses.replace(demo, train_set=[]))
    assert q.base_train_config(demo) == pocket and pocket.snr_gamma is not None  # the demo preset: make demo's own settings
    # ... drawing the standard run's images (scored by another probe)
    assert q.drawn_as(q.protocol(demo)) == q.drawn_as(unit["protocol"]) | {"probe": dp.probe_id()}
