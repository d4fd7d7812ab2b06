"""Stable Diffusion XL through the same cores and commands, on the tiny SDXL pipeline of conftest.py
(two text encoders of different widths, the "text_time" add-embedding): kind detection and presets,
training (every concept method, both text encoders and tokens, micro-conditioning, prior preservation),
kind checks, generation, composition (merge, regional modes, gradient fusion, the app), export to
diffusers/kohya/textual inversion read by diffusers' own StableDiffusionXLPipeline, and imports."""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest
import torch
from concept_helpers import photos, quick_config, regional_attention_maps_are_confined, train_tiny_concept
from numeric import assert_close_to_signal, differ, same_image
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from sbora.adapters import (
    AdaptedLinear,
    AdapterConfig,
    AdapterFileError,
    adapted_layers,
    adapter_parameters,
    inject,
    match_targets,
    merge,
    read_adapter,
    unmerge,
)
from sbora.adapters.formats import DIFFUSERS_METADATA
from sbora.adapters.registry import CONCEPT, method_spec, trained_methods
from sbora.export import ExportConfig, export
from sbora.export import main as export_main
from sbora_diffusion.compose import Composer, Region
from sbora_diffusion.concept.adapter import load_concept_adapter
from sbora_diffusion.concept.config import ConceptConfig
from sbora_diffusion.concept.train import train
from sbora_diffusion.export import export_pipeline
from sbora_diffusion.generate import main as generate_main
from sbora_diffusion.generate import render
from sbora_diffusion.kinds import SD, SDXL, kind_of
from sbora_diffusion.models import ModelResolutionError, load_pipeline, pipeline_kind

pytestmark = pytest.mark.numeric  # also run under other CPU kernels and 2 threads (make test-cpus, .ci/run)

RENDER = dict(steps=2, height=32, width=32)
TOL = 1e-4  # diffusers' own pipeline against ours, on [0, 1] images (test_interop's tolerance)
PARTS = ("unet", "text_encoder", "text_encoder_2")


def base_state(model) -> dict[str, torch.Tensor]:
    """A model's frozen weights under their original names (adapter and token wrappers looked through)."""
    out = {}
    for k, v in model.state_dict().items():
        if ".cores." in k or ".dropouts." in k or k.endswith((".vectors", ".token_ids")):
            continue
        out[k.replace(".base_layer.", ".").replace(".token_embedding.base.", ".token_embedding.")] = v.clone()
    return out


def untouched(pipe) -> bool:
    return not any(isinstance(m, AdaptedLinear) for part in PARTS for m in getattr(pipe, part).modules())


def np_images(pipe, prompt: str = "a photo of a dog on the beach"):
    """Two DDIM steps at 32x32 from seed 0, as floats in [0, 1]: every part of the pipeline matters."""
    pipe.set_progress_bar_config(disable=True)
    return pipe([prompt], num_inference_steps=2, generator=torch.Generator().manual_seed(0), output_type="np", height=32, width=32).images


def concept(folder, name: str = "thing", **kw) -> ConceptConfig:
    return ConceptConfig(name=name, instance_dir=str(photos(folder, "alpha")), token=f"<{name}1>", class_word="toy",
                         validation_prompts=["a photo of {token} {class_word}"], **kw)


@pytest.fixture(scope="module")
def trained_te(tiny_sdxl, tmp_path_factory):
    """SBoRA-FA with adapters on both text encoders and the token in both, two steps."""
    root = tmp_path_factory.mktemp("sdxl-te")
    cfg = quick_config(root / "run")
    cfg.train_text_encoder = True
    return train(concept(root / "photos"), "sbora-fa", train_config=cfg, pipe=copy.deepcopy(tiny_sdxl), adapter_overrides={"rank": 4})


# ----------------------------------------------------------------------------- the pipeline and its kind


def test_tiny_sdxl_loads_as_an_sdxl_pipeline_and_other_folders_by_their_class(tiny_sdxl, tiny_sdxl_dir, tiny_pipe, tmp_path):
    assert type(tiny_sdxl).__name__ == "StableDiffusionXLPipeline" and type(tiny_sdxl.scheduler).__name__ == "DDIMScheduler"
    assert kind_of(tiny_sdxl) is SDXL and kind_of(tiny_pipe) is SD
    assert list(SDXL.parts(tiny_sdxl)) == list(PARTS)
    index = json.loads((tiny_sdxl_dir / "model_index.json").read_text())
    assert pipeline_kind(index, "x") is SDXL and pipeline_kind({"_class_name": "StableDiffusionPipeline"}, "x") is SD
    assert tiny_sdxl.text_encoder.config.hidden_size == 32 and tiny_sdxl.text_encoder_2.config.hidden_size == 48
    assert tiny_sdxl.unet.config.addition_embed_type == "text_time" and tiny_sdxl.tokenizer_2.pad_token == "!"
    refiner = tmp_path / "refiner"
    refiner.mkdir()
    (refiner / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionXLImg2ImgPipeline", "text_encoder_2": ["x", "y"]}))
    with pytest.raises(ModelResolutionError, match="StableDiffusionXLImg2ImgPipeline.*StableDiffusionXLPipeline.*not the refiner"):
        load_pipeline(str(refiner))


def test_sdxl_presets_reach_every_transformer_block_at_every_level(tiny_sdxl):
    unet = tiny_sdxl.unet
    attention = [p for p, m in unet.named_modules() if p.endswith((".attn1", ".attn2"))]
    blocks = [p for p in attention if ".transformer_blocks." in p]
    assert attention == blocks and {p.split(".")[0] for p in blocks} == {"down_blocks", "mid_block", "up_blocks"}
    matched = set(match_targets(unet, AdapterConfig(targets=["sdxl-unet"])))
    assert matched == {f"{p}.{leaf}" for p in attention for leaf in ("to_q", "to_k", "to_v", "to_out.0")}
    full = set(match_targets(unet, AdapterConfig(targets=["sdxl-unet-full"])))
    assert full > matched and {p.rsplit(".", 1)[-1] for p in full - matched} == {"proj_in", "proj_out", "proj", "2"}
    assert SDXL.unet_adapter(AdapterConfig(targets=["sd-unet", "x"])).targets == ["sdxl-unet", "x"]


# ----------------------------------------------------------------------------- training


@pytest.mark.parametrize("method", trained_methods(CONCEPT))
def test_one_training_step_per_method_trains_its_adapter_and_both_tokens(method, tiny_sdxl, tmp_path):
    pipe = copy.deepcopy(tiny_sdxl)
    before = {part: base_state(getattr(pipe, part)) for part in (*PARTS, "vae")}
    cfg = quick_config(tmp_path / "run", steps=1)
    result = train(concept(tmp_path / "photos"), method, train_config=cfg, pipe=pipe, adapter_overrides={"rank": 4})
    assert result.step == 1 and np.isfinite(result.losses).all()
    tokens = [pipe.text_encoder.get_input_embeddings(), pipe.text_encoder_2.get_input_embeddings()]
    trainable = {id(p) for part in (*PARTS, "vae") for p in getattr(pipe, part).parameters() if p.requires_grad}
    assert trainable == {id(p) for p in adapter_parameters(pipe.unet, "thing")} | {id(t.vectors) for t in tokens}
    for part, state in before.items():  # the base, both text encoders and the VAE bit-identical
        after = base_state(getattr(pipe, part))
        assert after.keys() == state.keys() and all(torch.equal(after[k], state[k]) for k in state), part
    file = read_adapter(result.adapter_path)
    assert file.extra["pipeline_kind"] == "sdxl" and file.config.method == method_spec(method).config_method
    assert any(t.abs().sum() > 0 for k, t in file.tensors.items() if k.endswith((".B", ".A", ".delta_W")))
    vectors = file.extra_tensors
    assert vectors["token_embeddings"].shape == (1, 32) and vectors["token_embeddings_2"].shape == (1, 48)
    for part, text, key in (("text_encoder", "tokenizer", "token_embeddings"), ("text_encoder_2", "tokenizer_2", "token_embeddings_2")):
        table = getattr(pipe, part).get_input_embeddings().base
        init = table(torch.tensor(getattr(pipe, text)("toy", add_special_tokens=False).input_ids)).mean(0, keepdim=True)
        assert not torch.equal(vectors[key], init), part  # each encoder's token moved from the class word
    # Merge and unmerge of the trained adapter: the same outputs merged, the base bit-exactly after.
    g = torch.Generator().manual_seed(0)
    x, ctx = torch.randn(1, 4, 4, 4, generator=g), torch.randn(1, 77, 80, generator=g)
    added = {"text_embeds": torch.randn(1, 24, generator=g), "time_ids": torch.tensor([[32.0, 32, 0, 0, 32, 32]])}
    weights = base_state(pipe.unet)
    with torch.no_grad():
        unmerged = pipe.unet(x, 10, ctx, added_cond_kwargs=added).sample
        merge(pipe.unet, "thing")
        merged = pipe.unet(x, 10, ctx, added_cond_kwargs=added).sample
        unmerge(pipe.unet, "thing")
    assert_close_to_signal(merged, unmerged)
    restored = base_state(pipe.unet)
    for k, v in weights.items():
        if method_spec(method).slot_side in ("columns", "rows"):  # SBoRA's sparse add and subtract: bit-exact
            assert torch.equal(restored[k], v), k
        else:  # a dense s·B·A added and taken off again: float32 round-off
            assert_close_to_signal(restored[k], v, rel=1e-6)


def test_text_encoder_adapters_on_both_encoders_reload_to_the_same_images(trained_te, tiny_sdxl_dir, tmp_path):
    out = trained_te.out_dir
    assert {f.name for f in out.glob("adapter*.safetensors")} == {
        "adapter.safetensors", "adapter.text_encoder.safetensors", "adapter.text_encoder_2.safetensors"}
    file = read_adapter(trained_te.adapter_path)
    assert file.extra["text_encoder_2_adapter"] == "adapter.text_encoder_2.safetensors" and file.config.targets == ["sdxl-unet"]
    assert read_adapter(out / "adapter.text_encoder_2.safetensors").config.targets == ["clip-text"]
    widths = {p: layer.in_features for p, layer in adapted_layers(trained_te.pipe.text_encoder_2, "thing").items()}
    assert len(widths) == 2 * 4 and set(widths.values()) == {48}
    prompt = "a photo of <thing1> toy"
    trained = render(trained_te.pipe, [prompt], [0], **RENDER)
    reloaded = load_pipeline(str(tiny_sdxl_dir), adapter=trained_te.adapter_path)
    assert same_image(trained[0], render(reloaded, [prompt], [0], **RENDER)[0])
    # The generate command: the base (an SDXL folder) and the prompts come from the adapter file.
    gen = tmp_path / "gen"
    assert generate_main(["--adapter", str(trained_te.adapter_path), "--seeds", "0", "--steps", "2", "--height", "32", "--width", "32",
                          "--out", str(gen), "--batch-size", "1", "--prompt", "a photo of {token} {class_word}"]) == 0
    (record,) = [json.loads(line) for line in (gen / "manifest.jsonl").read_text().splitlines()]
    assert record["prompt"] == prompt and same_image(trained[0], Image.open(gen / record["image"]))


def test_the_loss_conditions_on_pooled_prompts_and_size_crop_numbers_with_prior_preservation(tiny_sdxl, tmp_path):
    """Photos of 40x36 at 32 px: resized to 36x32, centre-cropped at left 2; class images of 32x32 uncropped."""
    class_dir = tmp_path / "class"
    class_dir.mkdir()
    for i in range(2):
        Image.new("RGB", (32, 32), (10 * i, 90, 30)).save(class_dir / f"{i}.png")
    pipe = copy.deepcopy(tiny_sdxl)
    seen = []
    pipe.unet.register_forward_pre_hook(lambda m, args, kwargs: seen.append(kwargs.get("added_cond_kwargs")) if m.training else None,
                                        with_kwargs=True)
    cfg = quick_config(tmp_path / "run", steps=2)
    cfg.with_prior_preservation, cfg.num_class_images, cfg.validation_steps = True, 2, 1
    cfg.token_lr = 0.0  # the token's vectors stay where they started: the pooled prompts below are the ones the UNet saw
    result = train(concept(tmp_path / "photos", class_dir=str(class_dir)), "lora", train_config=cfg, pipe=pipe,
                   adapter_overrides={"rank": 4})
    assert len(seen) == 2 and all(s["time_ids"].tolist() == [[36, 40, 0, 2, 32, 32], [32, 32, 0, 0, 32, 32]] for s in seen)
    # The pooled prompt: the second text encoder's projection of the instance prompt, then of the class prompt.
    pooled = seen[-1]["text_embeds"]
    with torch.no_grad():
        for row, prompt in enumerate(("a photo of <thing1> toy", "a photo of toy")):
            ids = pipe.tokenizer_2(prompt, padding="max_length", max_length=77, return_tensors="pt").input_ids
            assert_close_to_signal(pooled[row], pipe.text_encoder_2(ids)[0][0])
    assert (result.out_dir / "validation" / "step-000001.png").is_file() and (result.out_dir / "samples.png").is_file()


def test_mixed_precision_keeps_the_sdxl_vae_in_float32(tiny_sdxl, tmp_path):
    """SDXL's VAE overflows in float16, so it stays float32 (and encodes outside autocast) while the rest is halved."""
    pipe = copy.deepcopy(tiny_sdxl)
    encoded = []  # CPU autocast runs convolutions in bf16: a float32 encoding ran outside it
    pipe.vae.encoder.register_forward_hook(lambda m, args, out: encoded.append(out.dtype))
    cfg = quick_config(tmp_path / "run", steps=1)
    cfg.mixed_precision = "bf16"
    result = train(concept(tmp_path / "photos"), "sbora-fa", train_config=cfg, pipe=pipe, adapter_overrides={"rank": 4})
    assert np.isfinite(result.losses).all() and encoded[:1] == [torch.float32]
    assert pipe.vae.dtype == torch.float32
    assert pipe.text_encoder_2.text_projection.weight.dtype == pipe.unet.conv_in.weight.dtype == torch.bfloat16
    assert {p.dtype for p in adapter_parameters(pipe.unet, "thing")} == {torch.float32}


def test_a_resumed_run_continues_exactly_with_both_text_encoders(tiny_sdxl, tmp_path):
    def run(folder, steps, resume=False):
        cfg = quick_config(folder, steps=steps)
        cfg.train_text_encoder = True
        return train(concept(tmp_path / "photos"), "lora", train_config=cfg, pipe=copy.deepcopy(tiny_sdxl), adapter_overrides={"rank": 2},
                     resume=resume)

    straight = run(tmp_path / "a", 2)
    run(tmp_path / "b", 1)
    resumed = run(tmp_path / "b", 2, resume=True)
    assert resumed.step == 2 and resumed.losses == straight.losses[1:]
    for name in ("adapter.safetensors", "adapter.text_encoder.safetensors", "adapter.text_encoder_2.safetensors"):
        a, b = read_adapter(straight.out_dir / name), read_adapter(resumed.out_dir / name)
        assert a.tensors.keys() == b.tensors.keys() and all(torch.equal(a.tensors[k], b.tensors[k]) for k in a.tensors), name
        assert all(torch.equal(a.extra_tensors[k], b.extra_tensors[k]) for k in a.extra_tensors) and len(a.extra_tensors) in (0, 2)


def test_the_command_line_trains_an_sdxl_folder(tiny_sdxl_dir, tmp_path):
    from sbora_diffusion.concept.cli import main

    out = tmp_path / "run"
    assert main(["--concept", str(photos(tmp_path / "photos", "beta")), "--method", "sbora-fb", "--model", str(tiny_sdxl_dir),
                 "--rank", "2", "--steps", "1", "--resolution", "32", "--sample-steps", "1", "--num-validation-images", "1",
                 "--validation-steps", "0", "--checkpoint-every", "0", "--output-dir", str(out)]) == 0
    file = read_adapter(out / "adapter.safetensors")
    assert file.extra["pipeline_kind"] == "sdxl" and file.base_model == str(tiny_sdxl_dir) and "token_embeddings_2" in file.extra_tensors


def test_a_concept_of_the_other_kind_is_refused_and_changes_nothing(trained_te, tiny_pipe, tiny_sdxl, tmp_path):
    sd = train(concept(tmp_path / "photos"), "sbora-fa", train_config=quick_config(tmp_path / "sd", steps=1),
               pipe=copy.deepcopy(tiny_pipe), adapter_overrides={"rank": 4})
    assert read_adapter(sd.adapter_path).extra["pipeline_kind"] == "sd"
    xl = copy.deepcopy(tiny_sdxl)
    with pytest.raises(AdapterFileError, match=r"trained on a Stable Diffusion 1\.x/2\.x pipeline \('tiny'\), and this pipeline is "
                                               r"Stable Diffusion XL: load it onto a Stable Diffusion 1\.x/2\.x base"):
        load_concept_adapter(xl, sd.adapter_path)
    assert untouched(xl) and len(xl.tokenizer) == len(tiny_sdxl.tokenizer)
    plain = copy.deepcopy(tiny_pipe)
    with pytest.raises(AdapterFileError, match=r"trained on a Stable Diffusion XL pipeline .*this pipeline is Stable Diffusion 1\.x/2\.x"):
        load_concept_adapter(plain, trained_te.adapter_path)
    assert not any(isinstance(m, AdaptedLinear) for part in ("unet", "text_encoder") for m in getattr(plain, part).modules())


# ----------------------------------------------------------------------------- composition


@pytest.fixture(scope="module")
def outputs(tiny_sdxl, tmp_path_factory):
    """alpha (slot 0) and beta (slot 1): SBoRA-FA rank 4 on the tiny SDXL, in the trainer's layout."""
    root = tmp_path_factory.mktemp("sdxl-compose") / "outputs"
    for name, slot in (("alpha", 0), ("beta", 1)):
        train_tiny_concept(tiny_sdxl, root, name, slot)
    return root


@pytest.fixture
def composer(tiny_sdxl, outputs):
    c = Composer(copy.deepcopy(tiny_sdxl))
    c.load(outputs / "alpha" / "sbora-fa" / "adapter.safetensors")
    c.load(outputs / "beta" / "sbora-fa" / "adapter.safetensors", weight=0.7)
    return c


def test_composition_merges_exactly_and_disjoint_slots_do_not_overlap(composer):
    before = {p: base_state(m) for p, m in composer.part_models.items()}
    selection = {"alpha": 1.0, "beta": 0.7}
    unmerged = composer.render("a photo of <alpha1> toy and <beta1> toy", [0], selection, **RENDER)
    composer.merge(selection)
    merged = composer.render("a photo of <alpha1> toy and <beta1> toy", [0], selection, **RENDER)
    composer.unmerge()
    assert same_image(merged[0], unmerged[0])
    assert all(torch.equal(v, before[p][k]) for p, m in composer.part_models.items() for k, v in base_state(m).items())
    report = composer.overlap(crosstalk=False)
    assert report.pairs()[0]["max_interference"] == 0.0 and report.pairs()[0]["shared_indices"] == 0
    # Unloading a concept takes its token out of both tokenizers and text encoders.
    composer.unload("beta")
    assert "<beta1>" not in composer.pipe.tokenizer.get_vocab() and "<beta1>" not in composer.pipe.tokenizer_2.get_vocab()
    assert "<alpha1>" in composer.pipe.tokenizer_2.get_vocab()


@pytest.mark.parametrize("mode", ["latent", "attention", "cross"])
def test_one_full_image_region_equals_plain_composition_in_every_mode(mode, composer):
    prompt = "a photo of <alpha1> toy on the beach"
    plain = composer.render(prompt, [0], {"alpha": 1.0}, **RENDER)
    regional = composer.render(prompt, [0], {"alpha": 1.0}, regions=[Region("alpha", box=[0, 0, 1, 1], prompt=prompt)],
                               regional_mode=mode, **RENDER)
    assert same_image(plain[0], regional[0])
    if mode == "latent":  # the region's own call runs its prompt whole, SDXL's pooled prompt included
        own = "a red cube"
        alone = composer.render(own, [0], {"alpha": 1.0}, **RENDER)
        region = composer.render(prompt, [0], {"alpha": 1.0}, regions=[Region("alpha", box=[0, 0, 1, 1], prompt=own)], **RENDER)
        assert same_image(alone[0], region[0]) and differ(alone[0], plain[0])


@pytest.mark.parametrize("mode", ["cross", "attention"])
def test_two_regions_confine_each_concept_at_every_attention_level(mode, composer):
    g = torch.Generator().manual_seed(1)
    added = {"text_embeds": torch.randn(1, 24, generator=g), "time_ids": torch.tensor([[32.0, 32, 0, 0, 32, 32]])}
    reference = regional_attention_maps_are_confined(composer, mode, context_dim=80, added_cond_kwargs=added)
    levels = {p.split(".")[0] + ":" + str(m.shape[0]) for p, m in reference.items()}
    assert {m.shape[0] for m in reference.values()} == {4, 2} and {"down_blocks:2", "mid_block:2", "up_blocks:4"} <= levels


def test_gradient_fusion_and_the_app_generate_on_sdxl(tiny_sdxl, tiny_sdxl_dir, outputs, tmp_path):
    from sbora_diffusion.app import AppConfig, Studio

    studio = Studio(AppConfig(outputs=str(outputs), model=str(tiny_sdxl_dir)), pipe=copy.deepcopy(tiny_sdxl))
    concepts = {"alpha/sbora-fa": 1.0, "beta/sbora-fa": 1.0}
    images, info = studio.generate("", concepts, regions={"alpha/sbora-fa": [0, 0, 0.5, 1]}, steps=2)
    assert len(images) == 1 and images[0][0].size == (64, 64) and info["overlap"][0]["max_interference"] == 0.0
    fused_images, info = studio.generate("a photo of <alpha1> toy and <beta1> toy", concepts, steps=2, fusion="gradient")
    fused = info["fused"]
    assert fused["layers"] == len(adapted_layers(studio.pipe.unet, "alpha__sbora-fa")) and fused["fused_error"] < fused["sum_error"]
    # The fused adapter saves as a concept file with both encoders' tokens, and loads back onto a fresh SDXL.
    from sbora_diffusion.fusion import save_fused

    path = save_fused(studio.composer, studio.composer.fused[next(iter(studio.composer.fused))], tmp_path / "fused.safetensors")
    file = read_adapter(path)
    assert file.extra["pipeline_kind"] == "sdxl" and file.extra_tensors["token_embeddings_2"].shape == (2, 48)
    again = copy.deepcopy(tiny_sdxl)
    load_concept_adapter(again, path)
    assert "<alpha1>" in again.tokenizer_2.get_vocab() and adapted_layers(again.unet, "fused")
    studio.close()


# ----------------------------------------------------------------------------- export and import


def randomized(base, method: str, name: str = "c", seed: int = 0):
    """A copy of `base` with a trained-looking concept: UNet rank 4, both text encoders rank 2, non-zero weights."""
    pipe = copy.deepcopy(base)
    inject(pipe.unet, AdapterConfig(method=method, rank=4, alpha=6.0, targets=["sdxl-unet"]), name=name)
    for part in ("text_encoder", "text_encoder_2"):
        inject(getattr(pipe, part), AdapterConfig(method=method, rank=2, alpha=3.0, targets=["clip-text"]), name=name)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for part in PARTS:
            for p in adapter_parameters(getattr(pipe, part), name):
                p.copy_(torch.randn(p.shape, generator=g) * 0.2 + (0.3 if p.ndim == 0 else 0.0))
    return pipe


def diffusers_pipeline(folder):
    """diffusers' own StableDiffusionXLPipeline of the folder, with the DDIM sampler ours uses."""
    from diffusers import DDIMScheduler, StableDiffusionXLPipeline

    pipe = StableDiffusionXLPipeline.from_pretrained(str(folder))
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    return pipe


def assert_both_load_it(path, expected, tiny_sdxl, tiny_sdxl_dir) -> None:
    """diffusers' StableDiffusionXLPipeline.load_lora_weights and our loader (an import) both give `expected` from the LoRA file."""
    theirs = diffusers_pipeline(tiny_sdxl_dir)
    theirs.load_lora_weights(str(path), adapter_name="c")
    assert np.abs(np_images(theirs) - expected).max() <= TOL
    again = copy.deepcopy(tiny_sdxl)
    load_concept_adapter(again, path)
    assert np.abs(np_images(again) - expected).max() <= TOL


@pytest.mark.parametrize("method, fmt", [("sbora-fa", "diffusers"), ("sbora-fb", "diffusers"), ("ortho", "kohya"), ("lora", "kohya"),
                                         ("difflora", "diffusers")])
def test_stable_diffusion_xl_pipeline_load_lora_weights_equals_our_adapters(method, fmt, tiny_sdxl, tiny_sdxl_dir, tmp_path):
    ours = randomized(tiny_sdxl, method)
    expected = np_images(ours)
    assert np.abs(expected - np_images(tiny_sdxl)).max() > 1e-2
    (path,) = export_pipeline(ours, "c", fmt, tmp_path / "lora.safetensors")
    with safe_open(str(path), framework="pt") as f:
        keys, meta = list(f.keys()), f.metadata()
    prefixes = {"diffusers": ("unet.", "text_encoder.", "text_encoder_2."), "kohya": ("lora_unet_", "lora_te1_", "lora_te2_")}[fmt]
    assert all(any(k.startswith(p) for k in keys) for p in prefixes) and all(k.startswith(prefixes) for k in keys)
    if fmt == "diffusers":
        assert {"text_encoder_2.r", "text_encoder_2.lora_alpha"} <= set(json.loads(meta[DIFFUSERS_METADATA]))
    else:  # the names A1111 and ComfyUI look up for SDXL's two text encoders
        assert {"lora_te1_text_model_encoder_layers_0_self_attn_q_proj.alpha", "lora_te2_text_model_encoder_layers_0_self_attn_q_proj.alpha",
                "lora_unet_mid_block_attentions_0_transformer_blocks_1_attn2_to_k.alpha"} <= set(keys)
    assert_both_load_it(path, expected, tiny_sdxl, tiny_sdxl_dir)


def test_concept_export_with_its_sdxl_token_file_and_merged_pipeline(trained_te, tiny_sdxl_dir, tmp_path):
    prompt = "a photo of <thing1> toy"
    expected = np_images(trained_te.pipe, prompt)
    out = tmp_path / "thing.safetensors"
    result = export(ExportConfig(adapter=str(trained_te.adapter_path), format="diffusers", out=str(out)))
    embeds = load_file(str(tmp_path / "thing.learned_embeds.safetensors"))
    assert {k: tuple(v.shape) for k, v in embeds.items()} == {"clip_l": (1, 32), "clip_g": (1, 48)}
    theirs = diffusers_pipeline(tiny_sdxl_dir)
    theirs.load_lora_weights(str(out), adapter_name="thing")
    assert np.abs(np_images(theirs, prompt) - expected).max() > 1e-2  # without the tokens: they matter
    theirs = diffusers_pipeline(tiny_sdxl_dir)
    exec(result["load"], {"pipe": theirs})  # the line the export prints: the LoRA, then each encoder's token vectors
    assert result["load"].count("load_textual_inversion") == 2
    assert np.abs(np_images(theirs, prompt) - expected).max() <= TOL
    merged = tmp_path / "merged"
    assert export_main(["--adapter", str(trained_te.adapter_path), "--merge-into", str(tiny_sdxl_dir), "--out", str(merged)]) == 0
    assert np.abs(np_images(diffusers_pipeline(merged), prompt) - expected).max() <= TOL


def test_an_sdxl_lora_saved_the_diffusers_script_way_imports_as_it_loads_there(tiny_sdxl, tiny_sdxl_dir, tmp_path):
    """train_dreambooth_lora_sdxl.py's file: peft LoRA on the UNet and both text encoders, save_lora_weights with
    each part's LoraConfig as metadata (alphas other than the rank: the scales come from the metadata).

    The script puts the text encoders' LoRA on with transformers' add_adapter, which wants a newer peft
    than this environment's: peft's inject_adapter_in_model, which add_adapter calls, does the same."""
    from diffusers import StableDiffusionXLPipeline
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft import LoraConfig, get_peft_model_state_dict, inject_adapter_in_model

    made = diffusers_pipeline(tiny_sdxl_dir)
    configs = {"unet": LoraConfig(r=4, lora_alpha=8, init_lora_weights="gaussian", target_modules=["to_k", "to_q", "to_v", "to_out.0"])}
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)  # peft draws the A's from the global generator
        made.unet.add_adapter(configs["unet"])
        for part in ("text_encoder", "text_encoder_2"):
            configs[part] = LoraConfig(r=2, lora_alpha=3, init_lora_weights="gaussian", target_modules=["q_proj", "k_proj", "v_proj", "out_proj"])
            inject_adapter_in_model(configs[part], getattr(made, part))
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():  # trained-looking B's (peft starts them at zero); larger ones make the random UNet amplify round-off
        for part in PARTS:
            for n, p in getattr(made, part).named_parameters():
                if "lora_B" in n:
                    p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    StableDiffusionXLPipeline.save_lora_weights(
        tmp_path, **{f"{part}_lora_layers": convert_state_dict_to_diffusers(get_peft_model_state_dict(getattr(made, part))) for part in PARTS},
        **{f"{part}_lora_adapter_metadata": configs[part].to_dict() for part in PARTS},
    )
    file_path = tmp_path / "pytorch_lora_weights.safetensors"
    theirs = diffusers_pipeline(tiny_sdxl_dir)
    theirs.load_lora_weights(str(file_path), adapter_name="x")
    expected = np_images(theirs)
    assert np.abs(np_images(made) - expected).max() <= TOL  # the file holds the model that made it
    ours = copy.deepcopy(tiny_sdxl)
    file = load_concept_adapter(ours, file_path, name="imported")
    assert file.format == "diffusers"
    assert len(adapted_layers(ours.text_encoder_2, "imported")) == len(adapted_layers(ours.text_encoder, "imported")) == 2 * 4
    assert np.abs(np_images(ours) - expected).max() <= TOL
    assert np.abs(np_images(tiny_sdxl) - expected).max() > 1e-2


def test_a_kohya_sdxl_lora_in_stabilitys_block_names_imports_as_diffusers_reads_it(tiny_sdxl, tiny_sdxl_dir, tmp_path):
    """kohya's SDXL trainer names the UNet's layers by Stability's blocks (input_blocks.4.1 = down_blocks.1.attentions.0)."""
    ours = randomized(tiny_sdxl, "sbora-fa")
    expected = np_images(ours)
    (path,) = export_pipeline(ours, "c", "kohya", tmp_path / "diffusers-names.safetensors")
    aliases = {"lora_unet_" + p.replace(".", "_"): "lora_unet_" + a.replace(".", "_") for p, a in SDXL.unet_aliases(tiny_sdxl.unet).items()}
    assert aliases["lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn1_to_q"] == "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q"
    assert aliases["lora_unet_up_blocks_1_attentions_2_proj_in"] == "lora_unet_output_blocks_5_1_proj_in"
    assert aliases["lora_unet_mid_block_attentions_0_transformer_blocks_1_attn2_to_k"] == "lora_unet_middle_block_1_transformer_blocks_1_attn2_to_k"
    renamed = {}
    for key, t in load_file(str(path)).items():
        module, _, role = key.partition(".")
        renamed[f"{aliases.get(module, module)}.{role}"] = t
    assert sum(k.startswith(("lora_unet_input_blocks_", "lora_unet_middle_block_", "lora_unet_output_blocks_")) for k in renamed) == 136 * 3
    sgm = tmp_path / "sgm-names.safetensors"
    save_file(renamed, str(sgm))
    assert_both_load_it(sgm, expected, tiny_sdxl, tiny_sdxl_dir)


def test_the_training_cost_benchmark_builds_the_sdxl_unet_at_the_widths_it_accepts():
    from benchmarks.train_cost import PRESETS, TrainCostConfig, sdxl_channels
    from sbora.configuration import ConfigError

    assert sdxl_channels(1.0) == [320, 640, 1280] and sdxl_channels(0.5) == [160, 320, 640]
    for width in (0.25, 0.3, 0.0):  # 80 channels: not a multiple of the 32 norm groups; 96: not of the 5 heads
        with pytest.raises(ConfigError, match="multiple of 0.5"):
            TrainCostConfig(bases=["sdxl-unet"], sdxl_width=width).validate()
    assert PRESETS["sdxl"]["bases"] == ["sdxl-unet"] and "sdxl-unet" not in TrainCostConfig().bases  # only when asked for
