"""Single-concept training on the embedded tiny pipeline: every method, reload, resume, bad input."""

from __future__ import annotations

import copy
import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
from numeric import assert_close_to_signal, differ, same_image
import torch
import yaml
from PIL import Image

from sbora.adapters import METHODS, AdapterFileError, adapter_names, adapter_parameters, read_adapter
from sbora.checkpoint import list_checkpoints, read_checkpoint
from sbora_diffusion.concept.config import ConceptConfig, ConceptError, load_concept
from sbora_diffusion.concept.data import Photo, sample_batch
from sbora.configuration import CONFIG_DIR, ConfigError, override
from sbora_diffusion.generate import main as generate_main
from sbora_diffusion.generate import render
from sbora_diffusion.models import ModelResolutionError, clip_tokenizer, load_pipeline
from sbora_diffusion.concept.cli import main
from sbora_diffusion.concept.options import TrainConfig, load_train_config
from sbora_diffusion.concept.train import train

pytestmark = pytest.mark.numeric  # also run under other CPU kernels and 2 threads (make test-cpus, .ci/run)


@pytest.fixture(scope="module")
def concept_dir(tmp_path_factory):
    """Three small photos of a 'concept' (coloured squares on different backgrounds)."""
    folder = tmp_path_factory.mktemp("concept")
    for i, (bg, fg) in enumerate([((20, 40, 200), (220, 30, 30)), ((240, 240, 200), (220, 30, 30)), ((30, 120, 30), (220, 30, 30))]):
        im = Image.new("RGB", (40, 36), bg)
        im.paste(fg, (8 + i * 4, 8, 24 + i * 4, 28))
        im.save(folder / f"img{i}.png")
    return folder


def concept(folder, **kw) -> ConceptConfig:
    fields = dict(name="thing", instance_dir=str(folder), token="<thing1>", class_word="toy",
                  validation_prompts=["a photo of {token} {class_word}"])
    fields.update(kw)
    return ConceptConfig(**fields)


def quick(tmp_path, **kw) -> TrainConfig:
    """Two steps at 32 px, one 2-step sample at the end: seconds on a CPU."""
    fields = dict(steps=2, resolution=32, lr=1e-3, validation_steps=0, num_validation_images=1,
                  sample_steps=2, checkpoint_every=0, output_dir=str(tmp_path / "run"))
    fields.update(kw)
    return TrainConfig(**fields)


def base_state(part) -> dict[str, torch.Tensor]:
    """A model part's frozen weights under their original names (adapter wrappers looked through)."""
    out = {}
    for k, v in part.state_dict().items():
        if ".cores." in k or ".dropouts." in k or k.endswith((".vectors", ".token_ids")):
            continue
        out[k.replace(".base_layer.", ".").replace(".token_embedding.base.", ".token_embedding.")] = v
    return out


def images_of(pipe, prompt="a photo of <thing1> toy"):
    return [np.asarray(im) for im in render(pipe, [prompt], [0], steps=2, height=32, width=32)]


@pytest.mark.parametrize("method", sorted(METHODS))
def test_every_method_trains_only_its_adapter_and_token(method, tiny_pipe, concept_dir, tmp_path):
    pipe = copy.deepcopy(tiny_pipe)
    before = {n: base_state(getattr(pipe, n)) for n in ("unet", "text_encoder", "vae")}
    result = train(concept(concept_dir), method, train_config=quick(tmp_path), adapter_overrides={"rank": 4}, pipe=pipe)
    assert result.step == 2 and len(result.losses) == 2 and all(np.isfinite(result.losses))
    # The optimizer saw exactly the adapter parameters and the concept token's vectors.
    token = pipe.text_encoder.get_input_embeddings()
    trainable = {id(p) for part in (pipe.unet, pipe.text_encoder, pipe.vae) for p in part.parameters() if p.requires_grad}
    assert trainable == {id(p) for p in adapter_parameters(pipe.unet, "thing")} | {id(token.vectors)}
    # Base weights bit-identical; the adapter and the token embedding moved.
    for name, state in before.items():
        after = base_state(getattr(pipe, name))
        assert after.keys() == state.keys()
        assert all(torch.equal(after[k], state[k]) for k in state), name
    file = read_adapter(result.adapter_path)
    assert file.config.method == method and file.config.rank == 4
    assert any(t.abs().sum() > 0 for k, t in file.tensors.items() if k.endswith((".B", ".A", ".delta_W")))
    init = pipe.text_encoder.get_input_embeddings().base(torch.tensor(pipe.tokenizer("toy", add_special_tokens=False).input_ids))
    assert not torch.equal(file.extra_tensors["token_embeddings"], init.mean(0, keepdim=True))
    assert file.extra["token"] == "<thing1>" and file.extra["token_mode"] == "new" and file.base_model == "tiny"
    out = result.out_dir
    assert out == tmp_path / "run"
    grid = Image.open(out / "samples.png")  # one prompt x (base, adapted), under a caption strip and beside the prompt
    assert grid.width > 2 * 32 and grid.height > 32
    # The card picture is the adapted image itself: the grid's bottom-right cell (its last prompt, seed and column).
    preview = Image.open(out / "preview.png")
    assert preview.size == (32, 32)
    assert np.array_equal(np.asarray(preview), np.asarray(grid.crop((grid.width - 32, grid.height - 32, grid.width, grid.height))))
    assert [json.loads(line)["step"] for line in (out / "log.jsonl").read_text().splitlines()] == [1, 2]
    assert (out / "config.yaml").is_file() and any((out / "logs").rglob("events.out.tfevents.*"))


@pytest.mark.parametrize("per_prompt, layout", [(8, (2, 2)), (2, (1, 2)), (1, (1, 1))])
def test_the_preview_is_the_first_prompts_adapted_images(per_prompt, layout):
    """preview.png (the app's card picture): the first validation prompt's adapted images, at most four, 2x2 when four."""
    from sbora_diffusion.concept.samples import preview_grid

    adapted = [Image.new("RGB", (8, 8), (10 * k, 0, 0)) for k in range(2 * per_prompt)]  # 2 prompts, seed-major per prompt
    grid = np.asarray(preview_grid(adapted, per_prompt))
    rows, cols = layout
    assert grid.shape == (8 * rows, 8 * cols, 3)
    shown = [int(grid[8 * r, 8 * c, 0]) // 10 for r in range(rows) for c in range(cols)]
    assert shown == list(range(rows * cols))  # seeds 0.. of the first prompt, row-major


@pytest.mark.parametrize("method, token_mode, text_encoder", [("sbora-fa", "new", True), ("lora", "rare", False)])
def test_saved_adapter_reloads_to_identical_images(method, token_mode, text_encoder, tiny_pipe, concept_dir, tmp_path):
    token = "<thing1>" if token_mode == "new" else "sks"
    cfg = quick(tmp_path, token_mode=token_mode, train_text_encoder=text_encoder)
    result = train(concept(concept_dir, token=token), method, train_config=cfg, adapter_overrides={"rank": 4}, pipe=copy.deepcopy(tiny_pipe))
    prompt = f"a photo of {token} toy"
    trained = images_of(result.pipe, prompt)
    reloaded = load_pipeline("tiny", adapter=result.adapter_path)
    # A fresh load and the trained pipeline run other code paths (deep copy vs load, fused vs plain FA): equal up to rounding.
    assert all(same_image(a, b) for a, b in zip(trained, images_of(reloaded, prompt)))
    assert any(differ(a, b) for a, b in zip(trained, images_of(copy.deepcopy(tiny_pipe), prompt)))
    te_file = result.out_dir / "adapter.text_encoder.safetensors"
    assert te_file.is_file() == text_encoder
    if text_encoder:
        assert read_adapter(te_file).config.targets == ["clip-text"]
        # The generate command: base model and the concept's eval prompts come from the adapter file.
        out = tmp_path / "gen"
        args = ["--adapter", str(result.adapter_path), "--seeds", "0", "--steps", "2", "--height", "32", "--width", "32", "--out", str(out),
                "--batch-size", "1"]  # one image per call, as images_of renders them (batched matmuls may round differently)
        assert generate_main(args) == 0
        records = [json.loads(line) for line in (out / "manifest.jsonl").read_text().splitlines()]
        assert [r["prompt"] for r in records] == [p.format(token=token, class_word="toy") for p in ConceptConfig().eval_prompts]
        assert {(r["concept"], r["method"], r["token"], r["class_word"]) for r in records} == {("thing", method, token, "toy")}
        assert same_image(Image.open(out / records[0]["image"]).convert("RGB"), trained[0])


def test_resume_continues_exactly(tiny_pipe, concept_dir, tmp_path):
    c = concept(concept_dir)
    # The straight run also writes a checkpoint and a validation grid at step 2: neither may disturb its random streams.
    straight = train(c, "sbora-fb", train_config=quick(tmp_path / "a", steps=4, checkpoint_every=2, validation_steps=2),
                     pipe=copy.deepcopy(tiny_pipe))
    assert [p.name for p in list_checkpoints(straight.out_dir / "checkpoints")] == ["step-00000002.pt", "step-00000004.pt"]
    assert Image.open(straight.out_dir / "validation" / "step-000002.png").width > 2 * 32
    first = train(c, "sbora-fb", train_config=quick(tmp_path / "b", steps=2), pipe=copy.deepcopy(tiny_pipe))
    assert [int(p.stem.split("-")[1]) for p in list_checkpoints(first.out_dir / "checkpoints")] == [2]
    resumed = train(c, "sbora-fb", train_config=quick(tmp_path / "b", steps=4), pipe=copy.deepcopy(tiny_pipe), resume=True)
    assert resumed.step == 4 and len(resumed.losses) == 2
    assert resumed.losses == straight.losses[2:]
    a, b = read_adapter(straight.adapter_path), read_adapter(resumed.adapter_path)
    assert all(torch.equal(a.tensors[k], b.tensors[k]) for k in a.tensors)
    assert torch.equal(a.extra_tensors["token_embeddings"], b.extra_tensors["token_embeddings"])
    sa = read_checkpoint(list_checkpoints(straight.out_dir / "checkpoints")[-1])
    sb = read_checkpoint(list_checkpoints(resumed.out_dir / "checkpoints")[-1])
    assert sa["step"] == sb["step"] == 4
    for pa, pb in zip(sa["optimizer"]["state"].values(), sb["optimizer"]["state"].values()):
        assert all(torch.equal(pa[k], pb[k]) for k in ("exp_avg", "exp_avg_sq", "step"))
    lines = (resumed.out_dir / "log.jsonl").read_text().splitlines()
    assert [json.loads(line)["step"] for line in lines] == [1, 2, 3, 4]


def test_prior_preservation_v_prediction_min_snr(tiny_pipe, concept_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("SBORA_CACHE", str(tmp_path / "cache"))
    cfg = quick(tmp_path, with_prior_preservation=True, num_class_images=2, prediction_type="v_prediction", snr_gamma=5.0,
                noise_offset=0.05, grad_accum=2, gradient_checkpointing=True, train_text_encoder=True, mixed_precision="bf16")
    result = train(concept(concept_dir), "ortho", train_config=cfg, adapter_overrides={"rank": 4}, pipe=copy.deepcopy(tiny_pipe))
    assert all(np.isfinite(result.losses))
    assert result.pipe.unet.conv_in.weight.dtype == torch.bfloat16  # frozen weights in bf16, adapters in fp32
    assert all(p.dtype == torch.float32 for p in adapter_parameters(result.pipe.unet))
    cached = sorted((tmp_path / "cache" / "class_images").rglob("*.png"))
    assert len(cached) == 2 and Image.open(cached[0]).size == (32, 32)
    stamps = [p.stat().st_mtime_ns for p in cached]
    train(concept(concept_dir), "lora", train_config=override(cfg, {"output_dir": str(tmp_path / "run2")}), adapter_overrides={"rank": 4},
          pipe=copy.deepcopy(tiny_pipe))
    assert [p.stat().st_mtime_ns for p in sorted((tmp_path / "cache" / "class_images").rglob("*.png"))] == stamps
    # Class images drawn with other sampling settings are never reused: a run sampling with 3 DDIM steps draws its own.
    train(concept(concept_dir), "lora", train_config=override(cfg, {"output_dir": str(tmp_path / "run3"), "sample_steps": 3}),
          adapter_overrides={"rank": 4}, pipe=copy.deepcopy(tiny_pipe))
    folders = sorted(p.parent.name for p in (tmp_path / "cache" / "class_images").rglob("*.png"))
    assert len(folders) == 4 and len(set(folders)) == 2 and folders[0].endswith("2steps-cfg7-5") and folders[2].endswith("3steps-cfg7-5")


def _corrupt(folder):
    (folder / "a.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really a png")


@pytest.mark.parametrize(
    "case, args, message",
    [
        ("missing folder", ["--concept", "{tmp}/nowhere"], "does not exist"),
        ("no images", ["--concept", "{tmp}/empty"], "no images in"),
        ("corrupt image", ["--concept", "{tmp}/corrupt"], "cannot read image"),
        ("unknown concept", ["--concept", "no-such-concept"], "unknown concept 'no-such-concept'"),
        ("unknown method", ["--concept", "{concept}", "--method", "no-such-method"], "unknown method 'no-such-method'"),
        ("rank too large", ["--concept", "{concept}", "--rank", "64"], "rank 64"),
        ("user's dog without photos", ["--concept", "dog"], "put 3-20 photos of your dog"),
        ("missing instance_dir override", ["--concept", "robot", "--instance-dir", "{tmp}/nowhere"], "does not exist"),
        ("captions without their file", ["--concept", "{concept}", "--caption-column", "text"], "metadata.jsonl does not exist"),
        ("captions in another column", ["--concept", "robot", "--caption-column", "prompt"], 'needs a "file_name" and a "prompt" text'),
    ],
)
def test_bad_input_is_a_clear_error_and_leaves_no_output(case, args, message, concept_dir, tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    (tmp_path / "corrupt").mkdir()
    _corrupt(tmp_path / "corrupt")
    args = [a.format(tmp=tmp_path, concept=concept_dir) for a in args]
    assert main(args + ["--model", "tiny", "--output-dir", str(tmp_path / "outputs"), "--steps", "1"]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "outputs").exists()


def write_captions(folder, captions: dict) -> None:
    (folder / "metadata.jsonl").write_text("".join(json.dumps({"file_name": name, "text": text}) + "\n" for name, text in captions.items()))


def test_per_photo_captions_train_each_photo_with_its_own_prompt(tiny_pipe, concept_dir, tmp_path):
    folder = tmp_path / "photos"
    shutil.copytree(concept_dir, folder)
    names, c = sorted(p.name for p in folder.glob("*.png")), concept(folder)
    plain = train(c, "sbora-fa", train_config=quick(tmp_path / "plain"), pipe=copy.deepcopy(tiny_pipe))
    runs = {}
    for label, captions in [("same", ["a photo of {token} {class_word}", "a photo of <thing1> {class_word}", "a photo of {token} toy"]),
                            ("named", ["a photo of {token} {class_word} on the beach", "a photo of {token} {class_word} in the snow",
                                       "a photo of {token} {class_word} on the grass"])]:
        write_captions(folder, dict(zip(names, captions)))
        runs[label] = train(c, "sbora-fa", train_config=quick(tmp_path / label, caption_column="text"), pipe=copy.deepcopy(tiny_pipe))
    assert yaml.safe_load((runs["named"].out_dir / "config.yaml").read_text())["train"]["caption_column"] == "text"
    # Captions that all read as the instance prompt train exactly the run without captions; captions naming the
    # backgrounds train another adapter from the same photos and batches.
    a, same, named = (read_adapter(r.adapter_path) for r in (plain, runs["same"], runs["named"]))
    assert runs["same"].losses == plain.losses and runs["named"].losses != plain.losses
    assert all(torch.equal(a.tensors[k], same.tensors[k]) for k in a.tensors)
    assert any(not torch.equal(a.tensors[k], named.tensors[k]) for k in a.tensors)


def test_each_batch_image_comes_with_its_photos_prompt_and_mask():
    """Photo i is 40 * i everywhere, its mask its left columns 0..i: a batch's prompts and masks follow its photos
    through the random crop and flip; class images (no mask) count everywhere."""
    photos = []
    for i in range(3):
        mask = torch.zeros((1, 10, 10), dtype=torch.uint8)
        mask[..., : i + 1] = 255
        photos.append(Photo(torch.full((3, 10, 10), 40 * i, dtype=torch.uint8), (10, 10), mask))
    instance_ids = [torch.arange(3)[:, None].expand(3, 77) * 100]  # photo i's prompt: ids 100 * i
    args = (photos, [Photo(torch.zeros((3, 10, 10), dtype=torch.uint8), (10, 10))], instance_ids, [torch.full((1, 77), 7)], 16, 8, False, True)
    pixels, ids, _, weights = sample_batch(*args, torch.Generator().manual_seed(0), background_weight=0.25)
    masks = (weights - 0.25) / 0.75  # the concept's share of each pixel
    assert sample_batch(*args, torch.Generator().manual_seed(0))[3] is None  # background weight 1: every pixel alike
    photo = ((pixels[:16, 0, 0, 0] + 1) * 127.5 / 40).round().long()  # (16,): which photo each instance image is
    assert len(set(photo.tolist())) == 3 and ids[0].shape == (32, 77) and masks.shape == (32, 1, 8, 8)
    assert torch.equal(ids[0][:16], (photo * 100)[:, None].expand(16, 77))
    assert torch.equal(ids[0][16:], torch.full((16, 77), 7))  # the class images' prompt
    covered = masks[:16, 0, 0].sum(-1)  # (16,) masked columns in the crop: i + 1 less the crop's left offset, either side
    assert ((covered <= photo + 1) & (masks[:16].amax((1, 2, 3)) <= 1)).all() and masks[16:].eq(1).all()
    flipped = masks[:16, 0, 0, -1] == 1  # the masked columns on the right: flipped with its photo
    assert flipped.any() and (~flipped & (covered > 0)).any()


class _Latents:  # a stand-in VAE whose latents are the pixels pooled 4x4, so a test knows every latent
    dtype, config = torch.float32, type("C", (), {"scaling_factor": 1.0})

    def encode(self, pixels):
        mean = torch.nn.functional.avg_pool2d(pixels, 4).repeat(1, 2, 1, 1)[:, :4]  # (B, 4, h, w)
        return type("E", (), {"latent_dist": type("D", (), {"sample": lambda self, generator: mean})()})()


def test_each_distinct_image_is_encoded_once_and_drawn_as_the_vae_draws(tiny_pipe):
    """The frozen VAE's posterior per distinct image, kept: a batch draws the latents the VAE itself would, and an
    image seen before (another batch, or twice in one) is not encoded again; past its budget nothing new is kept."""
    from sbora_diffusion.concept.loss import EncodedOnce

    vae, calls = tiny_pipe.vae, []
    hook = vae.encoder.register_forward_hook(lambda module, args, out: calls.append(args[0].shape[0]))
    try:
        x = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(0)) * 2 - 1
        batch = torch.cat([x, x.flip(-1), x[:1]])  # (5, 3, 32, 32): four distinct images, the first twice
        encoder = EncodedOnce(vae)
        with torch.no_grad():
            ours, theirs = encoder.encode(batch).latent_dist, vae.encode(batch).latent_dist
            assert calls == [1, 1, 1, 1, 5]  # ours one image at a time, the repeat not at all; then the VAE's own batch
            assert_close_to_signal(ours.mean, theirs.mean)  # one image at a time against a batch: round-off apart
            assert_close_to_signal(ours.std, theirs.std)
            a, b = ours.sample(generator=torch.Generator().manual_seed(1)), theirs.sample(generator=torch.Generator().manual_seed(1))
            assert a.shape == (5, 4, 8, 8) and torch.equal(ours.mean[0], ours.mean[4])
            assert_close_to_signal(a, b)  # the same draws from the same generator
            calls.clear()
            encoder.encode(batch.flip(0))
            assert calls == [] and len(encoder.moments) == 4 and encoder.dtype == vae.dtype
            tight = EncodedOnce(vae, budget_bytes=encoder.moments[next(iter(encoder.moments))].nbytes)  # room for one
            tight.encode(batch)
            tight.encode(batch)
            assert len(tight.moments) == 1 and calls == [1] * 4 + [1] * 3  # the first image kept, the other three again
    finally:
        hook.remove()


def test_masked_loss_is_the_weighted_mean_over_the_concepts_latents(tiny_pipe):
    """A UNet that predicts nothing leaves the noise as the error: each image's loss is Σ w·ε² / (4 Σ w), w the
    mask area-averaged to the latents (1 on the concept, `bg` elsewhere)."""
    from sbora_diffusion.concept.loss import diffusion_loss

    unet = lambda noisy, t, context: type("O", (), {"sample": torch.zeros_like(noisy)})()  # noqa: E731
    pixels, mask = torch.rand(2, 3, 16, 16) * 2 - 1, torch.zeros(2, 1, 16, 16)
    mask[0, :, :8, :8] = 1  # image 0: the top-left latent quarter; image 1: the left half
    mask[1, :, :, :8] = 1
    noise = torch.randn((2, 4, 4, 4), generator=torch.Generator().manual_seed(3))  # the loss's first draw from its generator

    def loss(weights):
        return diffusion_loss(_Latents(), tiny_pipe.scheduler, unet, lambda: (None, {}), pixels, n_instance=2,
                              gen=torch.Generator().manual_seed(3), pixel_weights=weights)

    assert torch.allclose(loss(None), noise.pow(2).mean())
    assert torch.allclose(loss(torch.ones_like(mask)), noise.pow(2).mean())
    concept_only = (noise[0, :, :2, :2].pow(2).mean() + noise[1, :, :, :2].pow(2).mean()) / 2
    assert torch.allclose(loss(mask), concept_only)
    w = 0.25 + 0.75 * mask[:, :, ::4, ::4]  # (2, 1, 4, 4): the mask is whole latent cells here
    assert torch.allclose(loss(0.25 + 0.75 * mask), ((noise.pow(2) * w).sum((1, 2, 3)) / (4 * w.sum((1, 2, 3)))).mean())


def test_timestep_bias_draws_the_biased_end_more_often(tiny_pipe):
    """diffusers' timestep bias: none draws t uniformly, from the same random numbers as before it existed;
    later/earlier draw their end `multiplier` times as often."""
    from sbora_diffusion.concept.loss import diffusion_loss, timestep_weights

    assert timestep_weights(1000, "none", 3, 0.25) is None and timestep_weights(1000, "later", 1, 0.25) is None
    later, earlier = timestep_weights(1000, "later", 3, 0.25), timestep_weights(1000, "earlier", 3, 0.1)
    assert torch.allclose(later.sum(), torch.tensor(1.0)) and torch.allclose(later[750:], 3 * later[:750].max()) and later[749] == later[0]
    assert torch.allclose(earlier[:100], 3 * earlier[100:].max()) and earlier[100] == earlier[-1]
    drawn = []

    def unet(noisy, t, context):
        drawn.append(t)
        return type("O", (), {"sample": torch.zeros_like(noisy)})()

    def draw(*bias):
        diffusion_loss(_Latents(), tiny_pipe.scheduler, unet, lambda: (None, {}), torch.zeros(4000, 3, 4, 4), n_instance=4000,
                       gen=torch.Generator().manual_seed(1), timestep_bias=bias)
        return drawn.pop()

    gen = torch.Generator().manual_seed(1)
    torch.randn((4000, 4, 1, 1), generator=gen)  # the noise is drawn first
    assert torch.equal(draw("none", 1.0, 0.25), torch.randint(0, 1000, (4000,), generator=gen))
    share = (draw("later", 3.0, 0.25) >= 750).float().mean()  # 0.25 * 3 / (0.75 + 0.25 * 3) = 0.5
    assert abs(share - 0.5) < 0.03 and abs((draw("none", 1.0, 0.25) >= 750).float().mean() - 0.25) < 0.03
    assert abs((draw("earlier", 3.0, 0.1) < 100).float().mean() - 0.25) < 0.03  # 0.3 / 1.2
    with pytest.raises(ConfigError, match="timestep_bias_strategy must be one of none, earlier, later, got 'range'"):
        TrainConfig(timestep_bias_strategy="range").validate()


def test_input_perturbation_noises_the_input_alone(tiny_pipe):
    """Ning et al.'s input perturbation (diffusers' --input_perturbation): z_t is noised with ε + γξ, the target stays ε;
    at 0 the loss draws exactly what it drew before the option existed."""
    from sbora_diffusion.concept.loss import diffusion_loss

    seen = []

    def unet(noisy, t, context):  # predicts nothing: the error is the target, ε
        seen.append((noisy, t))
        return type("O", (), {"sample": torch.zeros_like(noisy)})()

    pixels = torch.rand(3, 3, 16, 16) * 2 - 1
    latents = _Latents().encode(pixels).latent_dist.sample(None)  # (3, 4, 4, 4)

    def loss(gamma):
        return diffusion_loss(_Latents(), tiny_pipe.scheduler, unet, lambda: (None, {}), pixels, n_instance=3,
                              gen=torch.Generator().manual_seed(5), input_perturbation=gamma)

    gen = torch.Generator().manual_seed(5)
    noise, xi = torch.randn(latents.shape, generator=gen), torch.randn(latents.shape, generator=gen)
    t = torch.randint(0, 1000, (3,), generator=gen)
    assert torch.allclose(loss(0.1), noise.pow(2).mean())  # the target is ε alone
    assert torch.equal(seen[-1][1], t)  # drawn after ξ, as diffusers does
    assert torch.allclose(seen[-1][0], tiny_pipe.scheduler.add_noise(latents, noise + 0.1 * xi, t))
    gen = torch.Generator().manual_seed(5)
    noise = torch.randn(latents.shape, generator=gen)
    assert torch.allclose(loss(0.0), noise.pow(2).mean())
    t = torch.randint(0, 1000, (3,), generator=gen)
    assert torch.equal(seen[-1][1], t) and torch.allclose(seen[-1][0], tiny_pipe.scheduler.add_noise(latents, noise, t))
    with pytest.raises(ConfigError, match="input_perturbation"):
        TrainConfig(input_perturbation=-0.1).validate()


def test_masked_loss_trains_from_the_masks(tiny_pipe, concept_dir, tmp_path):
    folder = tmp_path / "photos"
    shutil.copytree(concept_dir, folder)
    c = concept(folder)
    with pytest.raises(ConceptError, match=r"no mask for img0.png, img1.png, img2.png in .*masks: give each photo a mask"):
        train(c, "sbora-fa", train_config=quick(tmp_path / "none", background_loss_weight=0.0), pipe=copy.deepcopy(tiny_pipe))
    assert not (tmp_path / "none").exists()
    (folder / "masks").mkdir()
    for p in sorted(folder.glob("*.png")):
        m = Image.new("L", Image.open(p).size, 0)
        m.paste(255, (8, 8, 28, 28))  # the red square and its neighbourhood
        m.save(folder / "masks" / p.name)
    plain = train(c, "sbora-fa", train_config=quick(tmp_path / "plain"), pipe=copy.deepcopy(tiny_pipe))
    masked = train(c, "sbora-fa", train_config=quick(tmp_path / "masked", background_loss_weight=0.0), pipe=copy.deepcopy(tiny_pipe))
    assert masked.losses != plain.losses
    a, b = read_adapter(plain.adapter_path), read_adapter(masked.adapter_path)
    assert any(not torch.equal(a.tensors[k], b.tensors[k]) for k in a.tensors)
    Image.new("L", Image.open(folder / "img1.png").size, 0).save(folder / "masks" / "img1.png")
    with pytest.raises(ConceptError, match=r"the mask .*img1.png is black everywhere"):
        train(c, "sbora-fa", train_config=quick(tmp_path / "black", background_loss_weight=0.0), pipe=copy.deepcopy(tiny_pipe))
    Image.new("L", (8, 8), 255).save(folder / "masks" / "img1.png")
    with pytest.raises(ConceptError, match=r"the mask .*img1.png is 8x8 but its photo img1.png is 40x36; draw the mask at the photo's size"):
        train(c, "sbora-fa", train_config=quick(tmp_path / "small", background_loss_weight=0.5), pipe=copy.deepcopy(tiny_pipe))
    assert not (tmp_path / "small").exists()  # stopped before anything was written
    with pytest.raises(ConfigError, match="background_loss_weight"):
        quick(tmp_path, background_loss_weight=1.5).validate()


@pytest.mark.parametrize("captions, message", [
    ({"img0.png": "a photo of {token}", "img1.png": "a photo of {token}"}, "no \"text\" caption for img2.png"),
    ({"img0.png": "a photo of {token}", "img1.png": "a photo of {token}", "img2.png": "a photo of a toy"}, "caption of img2.png ('a photo of a toy') does not name the concept"),
    ({"img0.png": "a photo of {token}", "img1.png": "a {tokn} toy", "img2.png": "{token}"}, "caption of img1.png ('a {tokn} toy') has a bad placeholder"),
    ("not json", "line 1: not a JSON object"),
    ('{"file_name": "img0.png", "text": "{token}"}\n{"file_name": "./img0.png", "text": "a {token}"}', "line 2: a second caption for ./img0.png"),
    (b"\xff\xfe{", "is not UTF-8 text"),
])
def test_bad_captions_are_clear_errors(captions, message, concept_dir, tmp_path):
    folder = tmp_path / "photos"
    shutil.copytree(concept_dir, folder)
    if isinstance(captions, dict):
        write_captions(folder, captions)
    elif isinstance(captions, bytes):
        (folder / "metadata.jsonl").write_bytes(captions)
    else:
        (folder / "metadata.jsonl").write_text(captions + "\n")
    c = concept(folder)
    with pytest.raises(ConceptError, match=re.escape(message)):
        c.instance_prompts(c.instance_images(), "text")
    assert c.instance_prompts(c.instance_images()) == ["a photo of <thing1> toy"] * 3  # without the column: the instance prompt


def test_captions_written_with_a_byte_order_mark_are_read(concept_dir, tmp_path):
    folder = tmp_path / "photos"
    shutil.copytree(concept_dir, folder)
    lines = [json.dumps({"file_name": f"img{i}.png", "text": f"a photo of {{token}} on the {side}"}) for i, side in enumerate(["left", "right", "left"])]
    (folder / "metadata.jsonl").write_text("\n".join(lines), encoding="utf-8-sig")  # as Windows' Notepad saves "UTF-8 with BOM"
    c = concept(folder)
    assert c.instance_prompts(c.instance_images(), "text") == ["a photo of <thing1> on the left", "a photo of <thing1> on the right",
                                                               "a photo of <thing1> on the left"]


def test_resume_without_checkpoint_is_refused(concept_dir, tmp_path, capsys):
    assert main(["--concept", str(concept_dir), "--model", "tiny", "--resume", "--output-dir", str(tmp_path / "outputs")]) == 2
    assert "no checkpoint" in capsys.readouterr().err
    assert not (tmp_path / "outputs").exists()


def test_cli_help_explains_every_field(capsys):
    with pytest.raises(SystemExit):
        main(["--help"])
    text = capsys.readouterr().out
    for flag in ("--rank", "--slot", "--seed", "--targets", "--token", "--class-word", "--instance-dir", "--steps", "--overwrite", "--debug",
                 "--mixed-precision", "--use-8bit-adam", "--snr-gamma", "--with-prior-preservation", "--resume", "--model"):
        assert flag in text


@pytest.mark.parametrize("flags, message", [(["--use-8bit-adam"], "8-bit"), (["--mixed-precision", "fp16"], "fp16 needs a CUDA GPU")])
def test_cuda_only_options_without_cuda_say_so(flags, message, concept_dir, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert main(["--concept", str(concept_dir), "--model", "tiny", *flags, "--output-dir", str(tmp_path / "outputs")]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "outputs").exists()


def test_concepts_load_from_yaml_and_folders(concept_dir):
    robot = load_concept("robot")
    assert robot.token == "<robot1>" and robot.class_word == "toy" and len(robot.instance_images()) == 5
    assert robot.fill(robot.instance_prompt) == "a photo of <robot1> toy"
    folder = load_concept(concept_dir, class_word="cube")
    assert folder.name == concept_dir.name and folder.class_word == "cube" and len(folder.instance_images()) == 3
    with pytest.raises(ConceptError, match="must contain"):
        load_concept("robot", instance_prompt="a photo of a toy")
    assert load_train_config().steps > 0


def test_tokenizer_is_clip_bpe_and_tiny_is_deterministic(tiny_pipe):
    import open_clip

    text = "a photo of a dog on the beach, watercolor!"
    ids = clip_tokenizer()(text).input_ids
    assert ids == [i for i in open_clip.tokenize([text])[0].tolist() if i][: len(ids)]
    assert clip_tokenizer().model_max_length == 77
    again = load_pipeline("tiny")
    assert all(torch.equal(a, b) for a, b in zip(tiny_pipe.unet.state_dict().values(), again.unet.state_dict().values()))


def test_model_resolution_errors(tmp_path, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    with pytest.raises(ModelResolutionError, match="local folder"):
        load_pipeline("someone/stable-diffusion-nowhere")
    with pytest.raises(ModelResolutionError, match="model_index.json"):
        load_pipeline(str(tmp_path))
    with pytest.raises(ConfigError, match="neither"):
        load_pipeline("not-a-model")
    with pytest.raises(AdapterFileError):
        load_pipeline("tiny", adapter=tmp_path / "missing.safetensors")


def test_local_diffusers_folder_loads_like_the_embedded_base(tiny_pipe, tmp_path):
    tiny_pipe.save_pretrained(tmp_path / "sd")
    local = load_pipeline(str(tmp_path / "sd"))
    assert type(local).__name__ == "StableDiffusionPipeline" and type(local.scheduler).__name__ == "DDIMScheduler"
    for part in ("unet", "text_encoder", "vae"):
        a, b = getattr(tiny_pipe, part).state_dict(), getattr(local, part).state_dict()
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert local.tokenizer("a photo of <x> dog").input_ids == tiny_pipe.tokenizer("a photo of <x> dog").input_ids


def test_two_concepts_load_side_by_side(tiny_pipe, concept_dir, tmp_path):
    from sbora_diffusion.concept.adapter import load_concept_adapter

    paths = {}
    for name, slot in (("cat", 0), ("car", 1)):
        c = concept(concept_dir, name=name, token=f"<{name}1>")
        paths[name] = train(c, "sbora-fa", train_config=quick(tmp_path / name), adapter_overrides={"rank": 4, "slot": slot},
                            pipe=copy.deepcopy(tiny_pipe)).adapter_path
    pipe = load_pipeline("tiny")
    for name in paths:
        load_concept_adapter(pipe, paths[name])
    table = pipe.text_encoder.get_input_embeddings()
    for name, path in paths.items():
        (token_id,) = pipe.tokenizer(f"<{name}1>", add_special_tokens=False).input_ids
        learned = read_adapter(path).extra_tensors["token_embeddings"][0]
        assert torch.equal(table(torch.tensor([token_id]))[0], learned)
    with pytest.raises(AdapterFileError, match="already"):  # the same concept twice
        load_concept_adapter(pipe, paths["cat"], name="cat-again")
    assert adapter_names(pipe.unet) == ["car", "cat"]  # the failed load took its UNet adapter out again


# ---- reliability through the real command line -------------------------------------------------


def cli(concept_dir, out, *extra):
    return ["--concept", str(concept_dir), "--model", "tiny", "--output-dir", str(out), "--steps", "2", "--resolution", "32", "--rank", "2",
            "--sample-steps", "1", "--num-validation-images", "1", "--checkpoint-every", "1", *extra]


def files_of(folder):
    return {p.relative_to(folder): p.read_bytes() for p in folder.rglob("*") if p.is_file() and ".partial" not in p.parts and p.name != ".lock"}


def test_a_second_run_never_replaces_the_first_unless_asked(concept_dir, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(cli(concept_dir, out)) == 0
    first = files_of(out)
    assert main(cli(concept_dir, out, "--lr", "0.5")) == 2
    err = capsys.readouterr().err
    assert "already holds a run" in err and "--resume" in err and "--overwrite" in err and "--output-dir" in err
    assert files_of(out) == first
    assert main(cli(concept_dir, out, "--lr", "nan")) == 2 and "finite" in capsys.readouterr().err
    assert main(cli(concept_dir, out, "--lr=-1e-3", "--overwrite")) == 2 and "0 < lr" in capsys.readouterr().err
    assert files_of(out) == first
    assert main(cli(concept_dir, out, "--lr", "0.5", "--overwrite")) == 0
    assert files_of(out)[Path("adapter.safetensors")] != first[Path("adapter.safetensors")]
    # --resume names a checkpoint file of another run: continues from it into this folder.
    assert main(cli(concept_dir, tmp_path / "other", "--steps", "3", "--resume", str(out / "checkpoints" / "step-00000002.pt"))) == 0
    assert [json.loads(line)["step"] for line in (tmp_path / "other" / "log.jsonl").read_text().splitlines()] == [1, 2, 3]


def test_ctrl_c_while_samples_are_made_is_finished_by_resume(concept_dir, tmp_path, monkeypatch, capsys):
    """After the last step the trainer writes the adapter and makes samples: a Ctrl-C there leaves a run that
    the same command plus --resume finishes (samples, publication) without training further."""
    import sbora_diffusion.concept.train as tc

    out = tmp_path / "run"

    def ctrl_c(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(tc, "sample_images", ctrl_c)
    assert main(cli(concept_dir, out)) == 130
    err = capsys.readouterr().err
    assert "interrupted at step 2" in err and "--resume" in err and not (out / "adapter.safetensors").exists()
    monkeypatch.undo()
    assert main(cli(concept_dir, out, "--resume")) == 0
    assert "resumed from step 2" in capsys.readouterr().err
    assert (out / "samples.png").is_file() and (out / "adapter.safetensors").is_file() and not (out / ".partial").exists()
    assert [json.loads(line)["step"] for line in (out / "log.jsonl").read_text().splitlines()] == [1, 2]
    assert main(cli(concept_dir, out, "--resume")) == 2  # finished: --resume now asks for more steps
    assert "the run is finished; raise --steps" in capsys.readouterr().err


@pytest.mark.parametrize("seed", [0, 3])
def test_ctrl_c_at_a_random_point_resumes_bit_exactly(seed, tiny_pipe, concept_dir, tmp_path, monkeypatch):
    import os
    import random
    import signal

    import sbora_diffusion.concept.train as tc
    from sbora.engine import TrainingInterrupted

    cfg = dict(steps=4, grad_accum=2, checkpoint_every=0)
    straight = train(concept(concept_dir), "sbora-fa", train_config=quick(tmp_path / "a", **cfg), pipe=copy.deepcopy(tiny_pipe))
    k, calls = random.Random(seed).randrange(8), []
    real = tc.diffusion_loss

    def interrupting(*args, **kwargs):
        calls.append(1)
        if len(calls) == k + 1:
            os.kill(os.getpid(), signal.SIGINT)  # in the middle of a step's micro-batch
        return real(*args, **kwargs)

    monkeypatch.setattr(tc, "diffusion_loss", interrupting)
    try:  # Ctrl-C during the last step finishes the run; earlier, it stops at the step's end
        finished = train(concept(concept_dir), "sbora-fa", train_config=quick(tmp_path / "b", **cfg), pipe=copy.deepcopy(tiny_pipe))
        assert k // 2 + 1 == 4
    except TrainingInterrupted as e:
        assert e.step == k // 2 + 1 < 4 and not (tmp_path / "b" / "adapter.safetensors").exists()
        monkeypatch.undo()
        finished = train(concept(concept_dir), "sbora-fa", train_config=quick(tmp_path / "b", **cfg), pipe=copy.deepcopy(tiny_pipe), resume=True)
    a, b = read_adapter(straight.adapter_path), read_adapter(finished.adapter_path)
    assert all(torch.equal(a.tensors[t], b.tensors[t]) for t in a.tensors)
    assert torch.equal(a.extra_tensors["token_embeddings"], b.extra_tensors["token_embeddings"])


def test_help_shows_the_values_the_run_will_use(capsys):
    with pytest.raises(SystemExit):
        main(["--concept", "robot", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    pocket = yaml.safe_load((CONFIG_DIR / "train" / "pocket.yaml").read_text())  # the embedded default base's settings
    assert f"(default: {pocket['steps']}; from configs/train/pocket.yaml)" in text  # --steps
    assert f"(default: {pocket['lr']}; from configs/train/pocket.yaml)" in text  # --lr
    assert "(default: pocket; from configs/train/pocket.yaml)" in text  # --score-clip
    assert "(default: <robot1>; from concept 'robot')" in text and "(default: toy; from concept 'robot')" in text
    assert "(default: 16; from configs/methods/sbora-fa.yaml)" in text
    with pytest.raises(SystemExit):
        main(["--concept", "robot", "--config", "default", "--help"])
    assert "(default: 400; from configs/train/default.yaml)" in " ".join(capsys.readouterr().out.split())


def test_any_concept_folder_name_trains_into_a_safe_folder(tiny_pipe, concept_dir, tmp_path, monkeypatch):
    import shutil

    folder = tmp_path / "mein Hündchen"
    shutil.copytree(concept_dir, folder)
    monkeypatch.chdir(tmp_path)
    result = train(str(folder), "sbora-fa", train_config=quick(tmp_path, output_dir=None), adapter_overrides={"rank": 2},
                   pipe=copy.deepcopy(tiny_pipe))
    key = result.out_dir.parts[-2]
    assert result.out_dir == Path("outputs") / key / "sbora-fa" and key.isascii() and " " not in key
    info = read_adapter(result.adapter_path).extra
    assert info["display_name"] == "mein Hündchen" and info["concept"] == key


def test_custom_diffusion_trains_only_cross_attention_kv_and_the_token(tiny_pipe, concept_dir, tmp_path):
    """Custom Diffusion (Kumari et al.): dense ΔW on attn2.to_k/to_v only, through the real CLI."""
    from sbora.adapters import merge, unmerge
    from sbora_diffusion.concept.adapter import load_concept_adapter

    out = tmp_path / "cd"
    assert main(["--concept", str(concept_dir), "--model", "tiny", "--method", "custom-diffusion", "--output-dir", str(out), "--steps", "2",
                 "--resolution", "32", "--sample-steps", "1", "--num-validation-images", "1", "--lr", "1e-2"]) == 0
    file = read_adapter(out / "adapter.safetensors")
    assert file.modules and all(m.endswith(("attn2.to_k", "attn2.to_v")) for m in file.modules)
    unet = tiny_pipe.unet
    assert len(file.modules) == sum(1 for n, _ in unet.named_modules() if n.endswith(("attn2.to_k", "attn2.to_v")))
    trainable = sum(t.numel() for t in file.tensors.values())
    assert trainable == sum(m.in_features * m.out_features for n, m in unet.named_modules() if n.endswith(("attn2.to_k", "attn2.to_v")))
    assert all(t.abs().sum() > 0 for t in file.tensors.values()) and "token_embeddings" in file.extra_tensors
    pipe = copy.deepcopy(tiny_pipe)
    before = base_state(pipe.unet)
    load_concept_adapter(pipe, out / "adapter.safetensors")
    prompt = f"a photo of {file.extra['token']} toy"
    adapted = images_of(pipe, prompt)
    merge(pipe.unet)
    merged = images_of(pipe, prompt)
    assert all(np.abs(a.astype(int) - b.astype(int)).max() <= 1 for a, b in zip(adapted, merged))  # merge = unmerged
    unmerge(pipe.unet)
    after = base_state(pipe.unet)
    assert all((after[k] - before[k]).abs().max() <= 1e-6 for k in before)


def test_score_clip_scores_the_samples_against_the_photos(tiny_pipe, concept_dir, tmp_path, capsys):
    """--score-clip: CLIP-I of the base's and the adapted samples (one per validation prompt and seed)
    against the concept's photos, as clip_score measures it, saved to scores.json and printed."""
    from sbora_diffusion import clip_score

    cfg = quick(tmp_path, num_validation_images=2, score_clip="pocket")
    c = concept(concept_dir, validation_prompts=["a photo of {token} {class_word}", "a {token} {class_word} on the beach"])
    result = train(c, "sbora-fa", train_config=cfg, adapter_overrides={"rank": 4}, pipe=copy.deepcopy(tiny_pipe))
    saved = json.loads((result.out_dir / "scores.json").read_text())
    assert saved["images"] == 4 and saved["references"] == 3 and saved["clip_model"] == "pocket"
    assert saved["prompts"] == ["a photo of <thing1> toy", "a <thing1> toy on the beach"]
    per = saved["clip_i_per_image"]
    assert len(per["base"]) == len(per["adapted"]) == 4 and all(-1 <= v <= 1 for v in per["base"] + per["adapted"])
    assert saved["clip_i_base"] == pytest.approx(np.mean(per["base"])) and saved["clip_i_adapted"] == pytest.approx(np.mean(per["adapted"]))
    assert result.scores == {k: v for k, v in saved.items() if k != "prompts"}
    # the scoring command's measure: mean cosine to every photo (a photo scored against the photos: its row mean)
    scorer = clip_score.load_clip("pocket", device="cpu")
    refs = scorer.encode_images(sorted(concept_dir.iterdir()))  # (3, D)
    torch.testing.assert_close(clip_score.image_alignment(refs, refs), (refs @ refs.T).mean(1))
    assert main(cli(concept_dir, tmp_path / "cli", "--score-clip", "pocket")) == 0
    assert "CLIP-I" in capsys.readouterr().out and (tmp_path / "cli" / "scores.json").is_file()
    # a CLIP that cannot be had stops the run before training, and nothing is written
    assert main(cli(concept_dir, tmp_path / "bad", "--score-clip", "no-such-clip")) == 2
    assert "no-such-clip" in capsys.readouterr().err and not (tmp_path / "bad").exists()


# diffusers' own README command line (examples/dreambooth/README.md, "Training with LoRA"), paths and sizes made tiny
DIFFUSERS_README = ["--pretrained_model_name_or_path=tiny", "--instance_data_dir={data}", "--output_dir={out}", "--instance_prompt=a photo of sks dog",
                    "--resolution=32", "--train_batch_size=1", "--gradient_accumulation_steps=1", "--checkpointing_steps=100",
                    "--learning_rate=1e-4", "--report_to=wandb", "--lr_scheduler=constant", "--lr_warmup_steps=0", "--max_train_steps=2",
                    "--validation_prompt=A photo of sks dog in a bucket", "--validation_epochs=50", "--seed=0", "--push_to_hub"]


def test_a_diffusers_command_line_trains_and_options_without_equivalent_are_refused(concept_dir, tmp_path, capsys):
    out = tmp_path / "out"
    line = [a.format(data=concept_dir, out=out) for a in DIFFUSERS_README] + ["--sample-steps", "1", "--num-validation-images", "1"]
    assert main(line) == 2
    assert "--push_to_hub (diffusers) has no equivalent here: nothing is uploaded" in capsys.readouterr().err and not out.exists()
    line.remove("--push_to_hub")
    assert main(line) == 2
    assert "--report_to wandb: this toolkit logs to tensorboard" in capsys.readouterr().err and not out.exists()
    line[line.index("--report_to=wandb")] = "--report_to=tensorboard"
    assert main(line) == 0
    resolved = yaml.safe_load((out / "config.yaml").read_text())
    assert resolved["model"] == "tiny" and resolved["concept"]["instance_dir"] == str(concept_dir)
    assert resolved["concept"]["token"] == "sks" and resolved["concept"]["class_word"] == "dog"
    assert resolved["concept"]["instance_prompt"] == "a photo of {token} dog"
    assert resolved["concept"]["validation_prompts"] == ["A photo of sks dog in a bucket"]
    train_cfg = resolved["train"]
    assert (train_cfg["steps"], train_cfg["lr"], train_cfg["batch_size"], train_cfg["grad_accum"], train_cfg["checkpoint_every"]) == (2, 1e-4, 1, 1, 100)
    assert (train_cfg["lr_schedule"], train_cfg["warmup_steps"], train_cfg["resolution"], train_cfg["token_mode"]) == ("constant", 0, 32, "none")
    assert train_cfg["validation_epochs"] == 50 and resolved["adapter"]["seed"] == 0
    assert (out / "adapter.safetensors").is_file() and (out / "samples.png").is_file()


@pytest.mark.parametrize("ours, theirs", [
    (["--steps", "7", "--lr", "0.002", "--batch-size", "2", "--grad-accum", "3", "--checkpoint-every", "5", "--lr-schedule", "cosine",
      "--warmup-steps", "1", "--keep-checkpoints", "4", "--weight-decay", "0.1", "--class-dir", "/x", "--with-prior-preservation",
      "--num-class-images", "9", "--train-text-encoder", "--snr-gamma", "5", "--gradient-checkpointing", "--rank", "8", "--resume"],
     ["--max-train-steps", "7", "--learning-rate=0.002", "--train-batch-size", "2", "--gradient-accumulation-steps", "3", "--checkpointing-steps",
      "5", "--lr_scheduler", "cosine", "--lr_warmup_steps=1", "--checkpoints_total_limit", "4", "--adam_weight_decay", "0.1",
      "--class_data_dir", "/x", "--with_prior_preservation", "--num_class_images", "9", "--train_text_encoder", "--snr_gamma=5",
      "--gradient_checkpointing", "--rank=8", "--resume_from_checkpoint", "latest"]),
])
def test_earlier_and_diffusers_names_mean_our_options(ours, theirs, concept_dir, monkeypatch):
    import sbora_diffusion.concept.cli as command
    from sbora_diffusion.concept.train import TrainResult

    calls = []
    monkeypatch.setattr(command, "train", lambda *args, **kwargs: calls.append((args, kwargs)) or TrainResult(Path("o"), Path("o/a"), None, 0, [], False))
    base = ["--concept", str(concept_dir), "--model", "tiny"]
    assert main(base + ours) == 0 and main(base + theirs) == 0
    assert calls[0] == calls[1] and calls[0][1]["resume"] is True
    assert calls[0][1]["train_config"].steps == 7 and calls[0][1]["train_config"].train_text_encoder
