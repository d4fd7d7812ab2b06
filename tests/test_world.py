"""The pocket world: generator, held-out concepts, and the shipped pocket base and CLIP.

The model tests load the shipped weights (sbora_diffusion/world/weights/) through the
standard loaders and measure them on small samples; thresholds are stated next to each.
"""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
import torch

from sbora_diffusion.world import POCKET_CLIP_DIR, POCKET_SD_DIR
from sbora_diffusion.world import concepts as wc
from sbora_diffusion.world import generator as g
from sbora_diffusion.world import pretrain as wp

# ----------------------------------------------------------------------------- generator

MENTION = re.compile(r"\b(" + "|".join(g.COLOURS) + r") (" + "|".join(g.NOUNS) + r") (on the left|on the right|in the center)")


def test_generator_is_deterministic_per_seed():
    for seed in (0, 7, 123456):
        a, b = g.sample(seed), g.sample(seed)
        assert a.caption == b.caption and a.meta == b.meta
        assert np.array_equal(np.asarray(a.image), np.asarray(b.image))
        assert a.image.size == (64, 64) and a.image.mode == "RGB"
    images = {np.asarray(g.sample(s).image).tobytes() for s in range(20)}
    assert len(images) == 20  # different seeds, different images
    assert len({g.sample(s).caption for s in range(40)}) > 30


def _floor_background(image: np.ndarray) -> str:
    """The scene whose floor colour is nearest the median of the bottom row."""
    floor = np.median(image[-1].astype(float), axis=0)
    floors = {name: np.array(cols[-1], dtype=float) for name, cols in g.SCENE_COLOURS.items()}
    return min(floors, key=lambda n: np.linalg.norm(floors[n] - floor))


def test_captions_match_the_pixels():
    """Colour and position words read back from the pixels (not from the metadata); backgrounds too."""
    checked_side = checked_center = checked_bg = 0
    for seed in range(150):
        s = g.sample(seed)
        im = np.asarray(s.image)
        for colour, _noun, where in MENTION.findall(s.caption):
            mask = g.colour_mask(im, colour)
            assert mask.sum() >= 12, (seed, s.caption, colour)
            if where == "in the center":
                cx = np.nonzero(mask)[1].mean()
                assert abs(cx - 31.5) < 9, (seed, s.caption, cx)
                checked_center += 1
            else:
                assert g.colour_side(im, colour) == where.split()[-1], (seed, s.caption)
                checked_side += 1
        m = re.search(r"on an? (\w+) background$", s.caption)
        if m and s.style == "photo":
            corner = im[:2, :2].reshape(-1, 3).astype(float).mean(0)
            assert np.linalg.norm(corner - np.array(g.PLAIN[m.group(1)])) < 8, (seed, s.caption)
            checked_bg += 1
        for scene, phrase in g.SCENES.items():
            if s.caption.endswith(phrase) and s.style == "photo":
                assert _floor_background(im) == scene, (seed, s.caption)
                checked_bg += 1
    assert checked_side > 60 and checked_center > 10 and checked_bg > 40


def test_caption_forms_short_and_long():
    s = g.sample(3)
    long = g.caption(s, "long")
    assert long.startswith(("a photo of ", "a painting of ")) and long.count(",") == 1
    assert g.caption(s.meta, "long") == long  # rebuilt from metadata alone
    short_forms = [g.sample(k).caption for k in range(300)]
    assert any(len(c.split()) <= 3 for c in short_forms)  # "a red circle"
    assert any(" and " in c and "background" in c for c in short_forms)
    assert any(c.startswith("a painting of ") for c in short_forms)
    words = {w.strip(",") for c in short_forms for w in c.split()}
    for concept in wc.CONCEPTS.values():  # concept prompts land in the world's vocabulary
        assert concept.class_word in words
    assert {"beach", "snow", "grass", "wooden", "table", "photo", "painting"} <= words


def test_render_and_visibility_rules():
    s = g.render("star", "blue", "right", "plain-yellow", "big", seed=1)
    assert s.caption == "a photo of a big blue star on the right, on a yellow background"
    assert g.colour_side(s.image, "blue") == "right"
    assert not g.visible_on("green", "grass") and not g.visible_on("white", "snow") and g.visible_on("red", "snow")
    with pytest.raises(ValueError):
        g.render("dragon", "red")


# ----------------------------------------------------------------------------- held-out concepts


def test_held_out_concepts_are_shipped_and_reproducible():
    from PIL import Image

    from sbora_diffusion.concept.config import load_concept

    assert len(wc.CONCEPTS) >= 4
    world_words = set(re.findall(r"[a-z]+", " ".join(g.sample(k).caption for k in range(400))))
    for name, c in wc.CONCEPTS.items():
        concept = load_concept(name)
        assert concept.token == c.token and concept.class_word == c.class_word
        assert c.class_word in g.CLASSES  # a class word the world knows
        files = concept.instance_images()
        assert 4 <= len(files) <= 6
        for path, mask, (expected, expected_mask) in zip(sorted(files), concept.instance_masks(files), wc.references(name, with_masks=True)):
            shipped = Image.open(path)
            assert shipped.size == (64, 64)
            assert np.array_equal(np.asarray(shipped.convert("RGB")), np.asarray(expected))  # the script rebuilds them
            assert np.array_equal(np.asarray(Image.open(mask)), np.asarray(expected_mask))  # and their masks
            # The mask covers the concept: where it is full, the photo shows the concept's colours, not the background.
            inside = np.asarray(expected_mask) == 255
            near = np.min([np.linalg.norm(np.asarray(expected).astype(float) - np.array(rgb), axis=-1) for rgb in c.palette], axis=0)
            assert inside.sum() > 40 and np.median(near[inside]) < 40 and np.median(near[~inside]) > np.median(near[inside]), (name, path.name)
        for prompt in concept.eval_prompts:
            text = concept.fill(prompt).replace(c.token, c.class_word)
            assert set(re.findall(r"[a-z]+", text)) <= world_words, text
        # Each photo's caption (metadata.jsonl, --caption-column text) names its place and background in the world's
        # words, read back from the pixels: the main colour's centre for the place, the corner or floor for the background.
        captions = concept.instance_prompts(files, "text")
        assert captions == [concept.fill(t) for t in wc.reference_captions(name)] and len(set(captions)) == len(files)
        for path, caption in zip(files, captions):
            assert caption.startswith(f"a photo of {c.token} {c.class_word} ")
            assert set(re.findall(r"[a-z]+", caption.replace(c.token, ""))) <= world_words, caption
            im = np.asarray(Image.open(path).convert("RGB")).astype(float)
            cx = np.nonzero(np.linalg.norm(im - np.array(c.palette[0]), axis=-1) < 40)[1].mean()
            place = re.search(r"(on the left|on the right|in the center),", caption).group(1)
            assert {"on the left": cx < 29, "on the right": cx > 36, "in the center": 28 <= cx <= 37}[place], (caption, cx)
            plain = re.search(r"on an? (\w+) background$", caption)
            if plain:
                assert np.linalg.norm(im[:2, :2].reshape(-1, 3).mean(0) - np.array(g.PLAIN[plain.group(1)])) < 8, caption
            else:
                assert caption.endswith(g.SCENES[_floor_background(im.astype(np.uint8))]), caption


def test_concept_views_vary():
    views = [np.asarray(wc.view("robot", k)) for k in range(6)]
    assert len({v.tobytes() for v in views}) == 6
    with pytest.raises(KeyError):
        wc.view("unicorn", 0)


# ----------------------------------------------------------------------------- shipped models


def _record(folder):
    return json.loads((folder / wp.RECORD_NAME).read_text())


@pytest.mark.parametrize("folder,limit", [(POCKET_SD_DIR, 40_000_000), (POCKET_CLIP_DIR, 15_000_000)])  # issue #27's bounds
def test_shipped_files_match_their_record(folder, limit):
    record = _record(folder)
    assert record["files"], "the record lists no files"
    assert wp.checksums(folder) == record["files"]  # same files, same bytes
    assert sum((folder / name).stat().st_size for name in record["files"]) <= limit
    assert all(not n.endswith((".bin", ".pt", ".pth", ".ckpt")) for n in record["files"])  # safetensors only
    commands = record.get("commands") or [record["command"]]  # the first base's record names one command
    assert all(c.startswith("python -m sbora_diffusion.world.pretrain") for c in commands)


@pytest.fixture(scope="module")
def pocket_pipe():
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(str(POCKET_SD_DIR), local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def test_pocket_base_loads_through_the_standard_loaders(pocket_pipe):
    from diffusers import AutoencoderKL, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel

    from sbora_diffusion.models import EMBEDDED, clip_tokenizer, load_pipeline

    assert isinstance(pocket_pipe, StableDiffusionPipeline)
    assert isinstance(pocket_pipe.unet, UNet2DConditionModel) and isinstance(pocket_pipe.vae, AutoencoderKL)
    assert isinstance(pocket_pipe.text_encoder, CLIPTextModel)
    assert pocket_pipe.unet.dtype == torch.float32
    assert 2 ** (len(pocket_pipe.vae.config.block_out_channels) - 1) == 4  # f = 4: 64x64 -> 16x16x4
    prompts = ["a photo of a red toy on the beach", "a blue star on the left and a pink heart on the right"]
    real = clip_tokenizer()
    assert pocket_pipe.tokenizer(prompts).input_ids == real(prompts).input_ids  # the real CLIP BPE
    assert "pocket" in EMBEDDED
    pipe = load_pipeline("pocket")
    assert type(pipe.scheduler).__name__ == "DDIMScheduler"


@pytest.fixture(scope="module")
def pocket_scorer():
    return wp.load_pocket_clip(POCKET_CLIP_DIR)


def test_pocket_clip_loads_through_open_clip_and_the_scoring_command():
    import open_clip

    from sbora_diffusion import clip_score

    model, _, preprocess = open_clip.create_model_and_transforms(f"local-dir:{POCKET_CLIP_DIR}")
    assert isinstance(model, open_clip.CLIP)
    scorer = clip_score.load_clip("pocket", device="cpu")
    image = wp.to_tensor(np.asarray(g.sample(0).image)[None])
    assert torch.allclose(scorer.model.encode_image(image), model.encode_image(image), atol=1e-5)
    assert preprocess(g.sample(0).image).shape == (3, 64, 64)


def test_pocket_clip_ranks_the_true_caption_first(pocket_scorer):
    """32 held-out world images, each against the 32 long captions: the true one is first for most (>= 60%)."""
    result = wp.clip_retrieval(pocket_scorer, count=32, start=wp.EVAL_SEED0 + 777)
    assert result["image_to_caption_top1"] >= 0.6, result
    assert result["caption_to_image_top1"] >= 0.5, result


def test_pocket_clip_tells_held_out_concepts_apart(pocket_scorer):
    """New photos of each held-out concept go to the concept of their nearest reference photo (>= 90%)."""
    result = wp.concept_identification(pocket_scorer, views_per_concept=8)
    assert result["mean"] >= 0.9 and result["min"] >= 0.75, result


# ----------------------------------------------------------------------------- pretraining


def test_ema_procedure_averages_and_resumes_exactly(tmp_path):
    """The engine's EMA procedure: avg <- d*avg + (1-d)*theta after each step, d = min(decay, (1+t)/(10+t));
    its average is in every checkpoint, and a resumed run ends with the same average as an uninterrupted one."""
    from sbora.engine import Engine, EngineConfig
    from sbora.procedures import EMA

    def run(out, steps, resume=False):
        torch.manual_seed(0)
        model = torch.nn.Linear(3, 2)
        engine = Engine(EngineConfig(steps=steps, lr=0.1, cpu=True, checkpoint_every=2, log_every=1), out, resume=resume)
        (model,) = engine.prepare(model)
        ema, seen = EMA(0.9), []
        engine.setup({"w": model.weight, "b": model.bias}, [{"params": list(model.parameters())}], procedures=[ema])
        x = torch.arange(6.0).reshape(2, 3)
        engine.run(lambda micro: model(x).pow(2).mean(), lambda step, loss: seen.append(model.weight.detach().clone()))
        engine.finish()
        return ema, seen

    ema, weights = run(tmp_path / "a", 4)
    torch.manual_seed(0)
    expected = torch.nn.Linear(3, 2).weight.detach().clone()  # the start: the same seeded init
    for t, w in enumerate(weights, start=1):
        d = min(0.9, (1 + t) / (10 + t))
        expected = d * expected + (1 - d) * w
    assert torch.allclose(ema.averaged()["w"], expected, atol=1e-6)
    assert not torch.allclose(ema.averaged()["w"], weights[-1])  # an average, not the last weights

    run(tmp_path / "b", 2)
    resumed, _ = run(tmp_path / "b", 4, resume=True)
    assert torch.equal(resumed.averaged()["w"], ema.averaged()["w"])
    from sbora.checkpoint import read_checkpoint

    assert torch.equal(EMA.read(read_checkpoint(tmp_path / "b" / "checkpoints" / "step-00000004.pt"))["w"], ema.averaged()["w"])
    with pytest.raises(ValueError, match="no EMA weights"):
        EMA.read({"procedures": {}})


def test_unet_loss_weight_is_min_snr_with_an_x0_floor():
    """The epsilon loss's weight: plain (1) without min-SNR or floor; min(snr, gamma)/snr with min-SNR; and
    with a floor the implied x0 error is weighed at least `floor` at large t, so layout is learnt."""
    from diffusers import DDPMScheduler

    from sbora_diffusion.models import sd_noise_scheduler_config

    ac = DDPMScheduler.from_config(sd_noise_scheduler_config()).alphas_cumprod
    snr = (ac / (1 - ac))[torch.tensor([0, 300, 600, 900, 999])]
    assert torch.equal(wp.unet_loss_weight(snr, 0.0, 0.0), torch.ones(5))
    min_snr = wp.unet_loss_weight(snr, 5.0, 0.0)
    assert torch.allclose(min_snr, torch.clamp(snr, max=5.0) / snr)
    assert min_snr[0] < 0.01 and min_snr[-1] == 1.0  # small t capped, large t untouched
    floored = wp.unet_loss_weight(snr, 5.0, 0.1)
    x0_weight = floored * snr  # the weight the implied x0 error gets
    assert torch.all(x0_weight >= 0.1 - 1e-6) and torch.allclose(x0_weight, torch.clamp(snr, max=5.0) + 0.1)
    assert floored[-1] > 20 * min_snr[-1]  # t = 999 (snr ~ 0.005): the layout's error now counts


def test_caption_twins_change_one_attribute_and_the_hinge_pushes_them_apart():
    """text_contrast's pairs: the twin is the same caption (same draws, same form) with the sides swapped or the
    first noun changed, and drawing twins leaves the batch's own captions as they were; the hinge is 0 below its
    margin and its gradient lowers the pair's similarity above it."""
    import random

    swap = {"left": "right", "right": "left"}
    sides = 0
    for seed in range(60):
        meta = g.sample(seed).__dict__ | {"objects": [o.__dict__ for o in g.sample(seed).objects]}
        meta = {k: meta[k] for k in ("background", "style", "objects")}
        plain = wp.train_caption(meta, random.Random(seed), 0.25)
        for what in ("side", "noun"):
            rng = random.Random(seed)
            caption, twin = wp.caption_and_twin(meta, rng, 0.25, what, random.Random(-seed))
            assert caption == plain and rng.getstate() == _after(plain, meta, seed)  # the batch's caption and draws are unchanged
            words, twin_words = re.findall(r"\w+|,", caption), re.findall(r"\w+|,", twin)
            if what == "noun":
                changed = [(a, b) for a, b in zip(words, twin_words) if a != b]
                assert len(words) == len(twin_words) and len(changed) == 1 and changed[0][0] == meta["objects"][0]["noun"]
                assert changed[0][1] in (g.SHAPES if changed[0][0] in g.SHAPES else g.CLASSES)
            elif "in the center" in caption:
                assert twin in (caption.replace("in the center", "on the left"), caption.replace("in the center", "on the right"))
            else:
                assert twin_words == [swap.get(w, w) for w in words]
                sides += twin != caption
    assert sides > 10
    with pytest.raises(ValueError, match="'side' or 'noun'"):
        wp.twin_meta(meta, "colour", random.Random(0))

    gen = torch.Generator().manual_seed(0)
    a, far = torch.randn(3, 77, 8, generator=gen), torch.randn(3, 77, 8, generator=gen)
    assert wp.text_contrast(a, -a, 0.9)[0] == 0 and wp.text_contrast(a, far, 0.9)[0] == 0  # below the margin: let be
    near = (a + 0.01 * far).requires_grad_()
    loss, cos = wp.text_contrast(a, near, 0.9)
    assert cos > 0.99 and float(loss.detach()) == pytest.approx(float(cos) - 0.9, abs=1e-5)
    loss.backward()
    step = near.grad / near.grad.norm() * 0.1 * near.detach().norm()
    assert wp.text_contrast(a, near.detach() - step, 0.9)[1] < cos - 0.001  # a step down the gradient: further apart


def _after(caption: str, meta: dict, seed: int):
    """The rng state after drawing `meta`'s training caption from Random(seed)."""
    import random

    rng = random.Random(seed)
    assert wp.train_caption(meta, rng, 0.25) == caption
    return rng.getstate()


def _miniature(work, out) -> list[str]:
    """The options of a miniature v2 run: 40 images, 8- and 16-wide models, 2-4 steps, checkpoints every 2."""
    return ["--work", str(work), "--out", str(out), "--threads", str(torch.get_num_threads()), "--num-images", "40",
            "--vae-channels", "8,16,16", "--vae-steps", "2", "--vae-batch", "4", "--unet-channels", "16,32,32", "--text-width", "16",
            "--text-layers", "1", "--unet-steps", "4", "--unet-batch", "4", "--unet-warmup", "1", "--checkpoint-every", "2",
            "--probe-images", "2", "--measure-images", "2", "--measure-steps", "2", "--log-every", "1"]


def test_pretraining_runs_every_stage_resumes_and_stops_at_its_targets(tmp_path, monkeypatch):
    """A miniature v2 run (40 images, 8-wide models, 2-4 steps): every stage on the engine, the UNet probed at its
    checkpoint and stopped there once the targets hold, --resume skipping what is done and training on when asked,
    and records that name the commands but no path of this machine."""
    from sbora_diffusion.world import probes

    work, out = tmp_path / "work", tmp_path / "out"
    tiny = _miniature(work, out)
    monkeypatch.setattr(probes, "unmet_targets", lambda found: [])  # every target "holds": the UNet stops at its first probe
    assert wp.main(["all", *tiny]) == 0
    results = json.loads((work / "results.json").read_text())
    assert results["unet"]["stopped_at_targets"] == 2 and results["unet"]["last_probes"]["step"] == 2
    assert (work / "unet" / ".partial" / "checkpoints" / "step-00000002.pt").is_file()  # stopped, still resumable
    assert sorted(p.name for p in (work / "checkpoints" / "unet").iterdir()) == ["step-00000002.pt"]
    record = json.loads((out / "pocket-sd" / wp.RECORD_NAME).read_text())
    assert record["preset"] == "v2" and record["architecture"]["unet"]["cross_attention_dim"] == 16
    assert record["commands"][0].startswith("python -m sbora_diffusion.world.pretrain all --work $WORK --out $OUT")
    assert set(record["measurements"]["probes"]) == set(probes.PROBES) and record["measurements"]["slots"]["rank"] == 16
    assert str(tmp_path) not in (out / "pocket-sd" / wp.RECORD_NAME).read_text()
    assert not (out / "pocket-clip").exists()  # v2 does not retrain the pocket CLIP
    assert wp.checksums(out / "pocket-sd") == record["files"]

    assert wp.main(["unet", *tiny, "--resume"]) == 0  # stopped at its targets: done
    assert json.loads((work / "results.json").read_text())["unet"]["steps"] == 2
    assert wp.main(["unet", *tiny, "--resume", "--stop-at-targets", "false"]) == 0  # trains on to --unet-steps
    results = json.loads((work / "results.json").read_text())
    assert results["unet"]["steps"] == 4 and len(results["unet"]["commands"]) == 2
    assert sorted(p.name for p in (work / "checkpoints" / "unet").iterdir()) == ["step-00000002.pt", "step-00000004.pt"]
    assert wp.main(["vae", *tiny]) == 2  # a stage folder that holds a run is refused without --resume or --overwrite

    from sbora.checkpoint import TrainingInterrupted

    def ctrl_c_at_5(cfg, resume, overwrite):  # the stage was stopped (Ctrl-C) at step 5, its time kept up to there
        (work / "unet" / "time.json").write_text(json.dumps({"seconds": 9.0, "cpu_seconds": 7.5}))
        raise TrainingInterrupted(5, None)

    monkeypatch.setattr(wp, "stage_unet", ctrl_c_at_5)
    assert wp.main(["unet", *tiny, "--resume", "--stop-at-targets", "false", "--unet-steps", "6"]) == 130
    stopped = json.loads((work / "results.json").read_text())["unet"]
    assert stopped["interrupted_at"] == 5 and stopped["cpu_seconds"] == 7.5 and len(stopped["commands"]) == 3  # an export's record has them


def test_pretraining_trains_on_from_an_exported_base(tmp_path, monkeypatch):
    """--init-from: a new work folder trains the UNet and text encoder on from a base that `export` wrote, with that
    base's VAE (and latent scale) as they are; the record carries the base's making and adds its CPU time."""
    from safetensors.torch import load_file

    from sbora_diffusion.world import probes

    monkeypatch.setattr(probes, "unmet_targets", lambda found: ["colour"])  # no target holds: the runs go to their step count
    first = tmp_path / "first"
    assert wp.main(["data", "vae", "latents", "unet", "export", *_miniature(first / "work", first / "out"), "--unet-steps", "2"]) == 0
    base = first / "out" / "pocket-sd"
    base_record = _record(base)
    assert base_record["cpu_seconds_in_all"] == pytest.approx(sum(v for v in base_record["stage_cpu_seconds"].values() if v), abs=0.2)
    assert json.loads((first / "work" / "unet" / "time.json").read_text())["cpu_seconds"] > 0  # kept at each checkpoint

    work, out = tmp_path / "work", tmp_path / "out"
    on = [*_miniature(work, out), "--init-from", str(base), "--unet-steps", "2", "--unet-lr", "1e-12", "--text-lr", "1e-12",
          "--x0-weight-floor", "0.5", "--text-contrast-weight", "1"]
    assert wp.main(["all", *on]) == 0
    assert -1 <= json.loads((work / "results.json").read_text())["unet"]["final_text_twin_cos_last100"] <= 1
    assert not (work / "vae").exists()  # the base's VAE, not a new one
    assert json.loads((work / "latents.json").read_text())["scaling_factor"] == json.loads((base / "vae" / "config.json").read_text())["scaling_factor"]
    trained, started = load_file(out / "pocket-sd" / "unet" / "diffusion_pytorch_model.safetensors"), load_file(base / "unet" / "diffusion_pytorch_model.safetensors")
    assert all(torch.allclose(trained[k], started[k], atol=1e-6) for k in started)  # a negligible learning rate: still the base
    fresh = wp.build_unet(wp.preset_config("v2", unet_channels="16,32,32", text_width=16)).state_dict()
    assert not torch.allclose(fresh["conv_in.weight"], started["conv_in.weight"])  # ... not a new UNet
    record = _record(out / "pocket-sd")
    assert record["initialised_from"]["commands"] == base_record["commands"]
    assert record["initialised_from"]["files"] == base_record["files"]
    assert record["cpu_seconds_in_all"] > base_record["cpu_seconds_in_all"]
    assert str(tmp_path) not in (out / "pocket-sd" / wp.RECORD_NAME).read_text()

    assert wp.main(["export", *on, "--export-step", "2"]) == 0  # a chosen checkpoint (here the only one): the record says which
    assert _record(out / "pocket-sd")["stages"]["unet"]["exported_step"] == 2
    with pytest.raises(FileNotFoundError, match=r"no UNet checkpoint at step 3 .*kept steps: \[2\]"):
        wp.unet_checkpoint(wp.preset_config("v2", work=str(work), export_step=3))
    for bad in (["--x0-weight-floor", "-1"], ["--text-contrast-weight", "-0.5"], ["--text-contrast-margin", "1"], ["--export-step", "-2"]):
        assert wp.main(["export", *on, *bad]) == 2  # refused before anything runs
    assert _record(out / "pocket-sd")["stages"]["unet"]["exported_step"] == 2  # ... the export there kept
    assert wp.main(["vae", *on]) == 2  # trained on from a base: no VAE of its own
    assert wp.main(["unet", *on, "--out", str(first / "out")]) == 2  # would overwrite its own base
    with pytest.raises(ValueError, match="its UNet has cross_attention_dim=16, this run's architecture cross_attention_dim=32"):
        wp.initial_models(wp.preset_config("v2", init_from=str(base), unet_channels="16,32,32", text_width=32))
    with pytest.raises(FileNotFoundError, match="not a pocket-sd folder"):
        wp.init_base(wp.preset_config("v2", init_from=str(tmp_path)))
