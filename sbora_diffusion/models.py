"""Base text-to-image models, resolved in one place (docs/architecture.md §6).

``load_pipeline(model)`` accepts

    "pocket"           the embedded offline default: the pocket world's pretrained base (64x64
                       images of shapes and toys, sbora_diffusion.world), a StableDiffusionPipeline
                       shipped in the repository (world/weights/pocket-sd, local files only);
    "tiny"             a few-MB StableDiffusionPipeline built locally and deterministically from
                       configs (random weights, fixed seed: the same weights on every call), with
                       the real CLIP BPE tokenizer written from open_clip's vocabulary file: for
                       unit tests (its images are noise);
    a local folder     a diffusers pipeline folder: SD 1.x / 2.x (e.g. a Stable Diffusion 1.5
                       download) or SDXL (a ``StableDiffusionXLPipeline``: its model_index.json
                       says which, ``pipeline_kind``; the kinds differ in ``kinds.py``);
    a hub id           ``runwayml/stable-diffusion-v1-5``, ``stabilityai/stable-diffusion-xl-base-1.0``:
                       from the local Hugging Face cache, or
                       downloaded when the hub can be reached; without network it fails at once
                       with a message to pass a local path.

Every pipeline comes back with a DDIM scheduler for sampling (the evaluation protocol's
sampler); trainers derive their DDPM noise scheduler from the same config. New embedded
bases go into ``EMBEDDED``; the first one is the default.
"""

from __future__ import annotations

import gzip
import json
from collections.abc import Callable
from pathlib import Path

import torch

from sbora.configuration import ConfigError
from sbora.fileio import cache_dir, write_text
from sbora.hub import hub_reachable

from .kinds import KINDS, PipelineKind

TOKENIZER_MAX_LENGTH = 77  # CLIP's context length


class ModelResolutionError(ConfigError):
    """The base model cannot be found or loaded; the message says what to pass instead."""


def clip_tokenizer_files() -> Path:
    """``vocab.json`` + ``merges.txt`` for ``CLIPTokenizer``, written once from open_clip's BPE file.

    Same vocabulary and merges as OpenAI CLIP (open_clip's ``SimpleTokenizer`` reads them the
    same way): 256 byte symbols, the same with ``</w>``, one symbol per merge, then the two
    special tokens.
    """
    folder = cache_dir() / "clip-tokenizer"
    if (folder / "vocab.json").is_file() and (folder / "merges.txt").is_file():
        return folder
    from open_clip.tokenizer import bytes_to_unicode, default_bpe

    lines = gzip.open(default_bpe()).read().decode("utf-8").split("\n")
    merges = lines[1 : 49152 - 256 - 2 + 1]  # the merges CLIP uses (first line is a header)
    symbols = list(bytes_to_unicode().values())
    vocab = symbols + [s + "</w>" for s in symbols] + ["".join(m.split()) for m in merges]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    write_text(folder / "vocab.json", json.dumps({t: i for i, t in enumerate(vocab)}, ensure_ascii=False))
    write_text(folder / "merges.txt", "#version: 0.2\n" + "\n".join(merges) + "\n")
    return folder


def clip_tokenizer():
    from transformers import CLIPTokenizer

    folder = clip_tokenizer_files()
    return CLIPTokenizer(
        vocab=str(folder / "vocab.json"), merges=str(folder / "merges.txt"), model_max_length=TOKENIZER_MAX_LENGTH
    )


def sd_noise_scheduler_config(prediction_type: str = "epsilon") -> dict:
    """Stable Diffusion 1.x's training schedule (scaled-linear betas, 1000 steps)."""
    return dict(
        num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
        clip_sample=False, set_alpha_to_one=False, steps_offset=1, prediction_type=prediction_type,
    )


def build_tiny_pipeline():
    """The embedded default: 64x64 images, 16x16x4 latents, a 2-layer width-32 CLIP text encoder.

    Built under a forked, fixed-seed RNG, so every call gives bit-identical weights and the
    caller's random state is left alone (a resumed training run relies on that).
    """
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    tokenizer = clip_tokenizer()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        vae = AutoencoderKL(
            in_channels=3, out_channels=3, latent_channels=4, layers_per_block=1, norm_num_groups=8, sample_size=64,
            down_block_types=("DownEncoderBlock2D",) * 3, up_block_types=("UpDecoderBlock2D",) * 3,
            block_out_channels=(16, 32, 32),
        )
        unet = UNet2DConditionModel(
            sample_size=16, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 64),
            down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
            cross_attention_dim=32, attention_head_dim=8, norm_num_groups=8,
        )
        text_encoder = CLIPTextModel(CLIPTextConfig(
            vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
            num_attention_heads=4, max_position_embeddings=TOKENIZER_MAX_LENGTH, projection_dim=32,
            bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
        ))
    pipe = StableDiffusionPipeline(
        vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
        scheduler=DDIMScheduler(**sd_noise_scheduler_config()),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )
    return pipe


def load_pocket_pipeline():
    """The pocket base: a StableDiffusionPipeline pretrained on the pocket world (sbora_diffusion.world)."""
    from diffusers import StableDiffusionPipeline

    from .world import POCKET_SD_DIR

    if not (POCKET_SD_DIR / "model_index.json").is_file():
        raise ModelResolutionError(
            f"the pocket base is missing ({POCKET_SD_DIR} has no model_index.json); restore it from the repository "
            "or rebuild it with python -m sbora_diffusion.world.pretrain all"
        )
    return StableDiffusionPipeline.from_pretrained(
        str(POCKET_SD_DIR), local_files_only=True, safety_checker=None, requires_safety_checker=False
    )


# Embedded offline bases: name -> builder. The first entry's name is DEFAULT_MODEL.
EMBEDDED: dict[str, Callable] = {"pocket": load_pocket_pipeline, "tiny": build_tiny_pipeline}
DEFAULT_MODEL = next(iter(EMBEDDED))


def pipeline_kind(index: dict, source: str) -> PipelineKind:
    """The kind of the pipeline whose ``model_index.json`` is `index`: SDXL for a ``StableDiffusionXLPipeline``,
    else Stable Diffusion 1.x/2.x (any other folder is loaded as a ``StableDiffusionPipeline``, as always);
    another SDXL pipeline (the refiner, img2img, inpainting) is refused, naming what to pass."""
    name = index.get("_class_name") or ""
    for kind in KINDS.values():
        if name in kind.pipeline_classes:
            return kind
    if "text_encoder_2" in index or "XL" in name:
        raise ModelResolutionError(
            f"{source} is a {name or 'pipeline with a second text encoder'}; this toolkit trains and samples text-to-image "
            f"pipelines: {', '.join(c for k in KINDS.values() for c in k.pipeline_classes)}. For SDXL pass the base model "
            "(e.g. stabilityai/stable-diffusion-xl-base-1.0), not the refiner"
        )
    return KINDS["sd"]


def _from_pretrained(source: str, dtype, **kwargs):
    from diffusers import DiffusionPipeline

    index = DiffusionPipeline.load_config(source, **kwargs)  # model_index.json: which pipeline it is
    return pipeline_kind(index, source).load(source, dtype, **kwargs)


def _load_base(model: str, dtype):
    if model in EMBEDDED:
        pipe = EMBEDDED[model]()
        return pipe.to(dtype=dtype) if dtype is not None else pipe
    path = Path(model).expanduser()
    if path.is_file():
        raise ModelResolutionError(
            f"{path} is a single file; pass a diffusers pipeline folder instead (convert a single-file checkpoint with "
            "StableDiffusionPipeline.from_single_file(...).save_pretrained(folder), StableDiffusionXLPipeline's for an SDXL "
            "checkpoint, where its configs can be had)"
        )
    if path.exists():
        if not (path / "model_index.json").is_file():
            raise ModelResolutionError(
                f"{path} is not a diffusers pipeline folder (no model_index.json); pass a Stable Diffusion or SDXL folder "
                f"saved with save_pretrained (unet/, vae/, text_encoder/, tokenizer/, scheduler/), or --model {DEFAULT_MODEL}"
            )
        try:
            return _from_pretrained(str(path), dtype, local_files_only=True)
        except ModelResolutionError:
            raise
        except Exception as e:
            raise ModelResolutionError(f"cannot load the Stable Diffusion pipeline in {path}: {e}") from None
    if model.count("/") != 1 or model.startswith((".", "/", "~")):
        raise ModelResolutionError(
            f"model '{model}' is neither an embedded base ({', '.join(EMBEDDED)}), an existing folder, "
            "nor a hub id of the form owner/name"
        )
    try:
        return _from_pretrained(model, dtype, local_files_only=True)  # already in the local hub cache
    except ModelResolutionError:
        raise
    except Exception:
        pass
    if not hub_reachable():
        raise ModelResolutionError(
            f"cannot fetch '{model}': it is not in the local Hugging Face cache and the hub cannot be reached "
            "(no network). Download it elsewhere and pass its local folder, e.g. --model /path/to/stable-diffusion-v1-5, "
            f"or use the embedded offline default --model {DEFAULT_MODEL}"
        )
    try:
        return _from_pretrained(model, dtype)
    except ModelResolutionError:
        raise
    except Exception as e:
        raise ModelResolutionError(f"cannot load '{model}' from the hub: {e}") from None


def load_pipeline(model: str = DEFAULT_MODEL, adapter: str | Path | None = None, device=None, dtype=None):
    """A StableDiffusionPipeline or StableDiffusionXLPipeline for `model` (see the module docstring), DDIM sampler,
    no safety checker.

    `adapter`: a concept adapter file written by the trainer; its UNet and text-encoder
    adapters and learned token embeddings are all restored (``concept.adapter.load_concept_adapter``).
    """
    from diffusers import DDIMScheduler

    pipe = _load_base(str(model), dtype)
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    pipe.base_model_id = str(model)
    if adapter is not None:
        from .concept.adapter import load_concept_adapter

        load_concept_adapter(pipe, adapter)
    if device is not None:
        pipe.to(device)
    return pipe
