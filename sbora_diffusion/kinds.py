r"""Pipeline kinds: what differs between a Stable Diffusion 1.x/2.x pipeline and an SDXL one, in one place.

diffusers' ``StableDiffusionPipeline`` conditions its UNet on one CLIP text encoder's last hidden
states (B, 77, D). ``StableDiffusionXLPipeline`` (Podell et al., "SDXL: Improving Latent Diffusion
Models for High-Resolution Image Synthesis", arXiv:2307.01952) has two text encoders — CLIP ViT-L
(``text_encoder``, a ``CLIPTextModel``) and OpenCLIP ViT-bigG (``text_encoder_2``, a
``CLIPTextModelWithProjection``), each with its tokenizer — and its UNet reads

    encoder_hidden_states   the two encoders' penultimate hidden states, concatenated: (B, 77, D1 + D2)
    added_cond_kwargs       "text_embeds": the second encoder's pooled projection (B, P), and
                            "time_ids": the six size/crop numbers of SDXL's micro-conditioning
                            (paper §2.2): original height, width, crop top, left, target height,
                            width (B, 6), fed through its "text_time" add-embedding.

Everything else — adapters, the training engine, composition, regional sampling, files — is one
code path that asks a ``PipelineKind`` for these differences:

    parts / text_encoders / tokenizers   the models of a pipeline by diffusers' attribute names
                                         (``text_encoder``, ``text_encoder_2``, ``tokenizer_2``, ...)
    TextPart                             per text encoder: its names in adapter files (``token_embeddings_2``,
                                         ``adapter.text_encoder_2.safetensors``), kohya key prefix and
                                         textual-inversion key (SDXL's ``clip_l`` / ``clip_g``)
    condition                            a training batch's UNet inputs from token ids (and, for SDXL,
                                         the batch's size/crop numbers), as diffusers' DreamBooth scripts
                                         (train_dreambooth_lora.py, train_dreambooth_lora_sdxl.py) build them
    encode_prompt                        a prompt's embeddings for sampling, from the pipeline's own
                                         ``encode_prompt``, and the keyword arguments of a pipeline call
    unet_adapter                         the kind's UNet target presets in place of SD's
    vae_float32                          whether mixed precision leaves the VAE in float32
    unet_aliases                         other names LoRA files give the UNet's layers (kohya's SDXL
                                         files: Stability's block names)

``kind_of(pipe)`` tells a loaded pipeline's kind (SDXL: it has a second text encoder);
``models.pipeline_kind`` tells a model folder's, from its ``model_index.json``. Adapter files
record ``KIND_KEY`` (``concept.adapter``), and loading refuses a file of the other kind.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from sbora.adapters import AdapterConfig, AdapterFileError

_DOWN_UP = re.compile(r"(?P<kind>down_blocks|up_blocks)\.(?P<block>\d+)\.attentions\.(?P<layer>\d+)\.(?P<rest>.+)")
KIND_KEY = "pipeline_kind"  # the adapter metadata entry (``extra``) that names the kind a concept was trained on


@dataclass(frozen=True)
class TextPart:
    """One text encoder of a pipeline kind and the names it goes by."""

    suffix: str  # diffusers' attribute names: text_encoder{suffix}, tokenizer{suffix} ("" or "_2")
    kohya: str  # its key prefix in kohya files: lora_te_ (SD), lora_te1_ / lora_te2_ (SDXL)
    embedding_key: str | None  # its vectors' key in a textual-inversion file (SDXL: clip_l, clip_g); None: the token itself

    @property
    def part(self) -> str:
        return f"text_encoder{self.suffix}"

    @property
    def tokenizer(self) -> str:
        return f"tokenizer{self.suffix}"

    @property
    def token_tensor(self) -> str:
        """The adapter file's extra tensor of this encoder's learned token embeddings (n, D)."""
        return f"token_embeddings{self.suffix}"

    @property
    def token_ids(self) -> str:
        """The adapter file's metadata entry of the ids the token has in this encoder's tokenizer."""
        return f"token_ids{self.suffix}"


@dataclass
class PromptEmbeds:
    """A prompt encoded for sampling: what a pipeline call takes instead of the prompt's text."""

    cond: torch.Tensor  # (1, T, D)
    uncond: torch.Tensor | None  # (1, T, D): the negative prompt's, with classifier-free guidance
    pooled: torch.Tensor | None = None  # (1, P): SDXL's pooled prompt
    pooled_uncond: torch.Tensor | None = None  # (1, P): the negative prompt's, with guidance

    @staticmethod
    def cat(prompts: Sequence[PromptEmbeds]) -> PromptEmbeds:
        """Several prompts as one batch, a row each: (k, T, D), (k, P)."""
        def rows(name: str) -> torch.Tensor | None:
            values = [getattr(p, name) for p in prompts]
            return None if values[0] is None else torch.cat(values)

        return PromptEmbeds(*(rows(f.name) for f in dataclasses.fields(PromptEmbeds)))

    def call_kwargs(self, n: int) -> dict:
        """The pipeline call's embedding arguments for `n` images of this prompt."""
        kwargs = {"prompt_embeds": self.cond.repeat(n, 1, 1),
                  "negative_prompt_embeds": self.uncond.repeat(n, 1, 1) if self.uncond is not None else None}
        if self.pooled is not None:
            kwargs.update(pooled_prompt_embeds=self.pooled.repeat(n, 1),
                          negative_pooled_prompt_embeds=self.pooled_uncond.repeat(n, 1) if self.pooled_uncond is not None else None)
        return kwargs


@dataclass(frozen=True)
class PipelineKind:
    """A kind of text-to-image pipeline: its diffusers classes, text encoders and conditioning (module docstring)."""

    name: str  # what adapter files record: "sd", "sdxl"
    label: str  # for messages
    pipeline_classes: tuple[str, ...]  # model_index.json class names of this kind; the first is its diffusers pipeline class
    texts: tuple[TextPart, ...]
    unet_presets: tuple[tuple[str, str], ...] = ()  # SD's UNet target preset -> this kind's
    # Mixed-precision training keeps the VAE in float32: SDXL's VAE overflows in float16 (NaN latents), which
    # is why diffusers' SDXL scripts keep it in float32 too. SD 1.x's VAE runs in the half precision.
    vae_float32: bool = False

    def parts(self, pipe) -> dict[str, nn.Module]:
        """The pipeline's adaptable models by part name: the UNet, then each text encoder."""
        return {"unet": pipe.unet, **{t.part: getattr(pipe, t.part) for t in self.texts}}

    def text_encoders(self, pipe) -> list[nn.Module]:
        return [getattr(pipe, t.part) for t in self.texts]

    def tokenizers(self, pipe) -> list:
        return [getattr(pipe, t.tokenizer) for t in self.texts]

    def unet_adapter(self, config: AdapterConfig) -> AdapterConfig:
        """`config` with SD's UNet target presets named as this kind's own."""
        presets = dict(self.unet_presets)
        if not any(t in presets for t in config.targets):
            return config
        return dataclasses.replace(config, targets=[presets.get(t, t) for t in config.targets])

    def unet_aliases(self, unet: nn.Module) -> dict[str, str]:
        """Other paths LoRA files name the UNet's layers by, layer path -> alias (``formats.fit_to_model``); SD's
        kohya files use diffusers' own names."""
        return {}

    def load(self, source: str, dtype, **kwargs):
        """The pipeline at `source` (a folder or hub id) with diffusers' ``from_pretrained``."""
        raise NotImplementedError

    def condition(self, encoders: Sequence[nn.Module], ids: Sequence[torch.Tensor], geometry: torch.Tensor,
                  device) -> tuple[torch.Tensor, dict]:
        """(encoder hidden states (B, T, D), further UNet keyword arguments) of a training batch.

        `ids`: one (B, 77) tensor per text encoder; `geometry`: (B, 6) original height and width,
        crop top and left, target height and width of each image (``concept.data.sample_batch``).
        """
        raise NotImplementedError

    def encode_prompt(self, pipe, prompt: str, negative: str, cfg: bool, device) -> PromptEmbeds:
        """`prompt` (and `negative`, with guidance `cfg`) encoded by the pipeline under the current adapter selection."""
        raise NotImplementedError


class StableDiffusion(PipelineKind):
    """Stable Diffusion 1.x/2.x: one CLIP text encoder, its last hidden states as the UNet's context."""

    def load(self, source: str, dtype, **kwargs):
        from diffusers import StableDiffusionPipeline

        return StableDiffusionPipeline.from_pretrained(source, torch_dtype=dtype, safety_checker=None, requires_safety_checker=False,
                                                       **kwargs)

    def condition(self, encoders, ids, geometry, device):
        return encoders[0](ids[0].to(device))[0], {}  # (B, 77, D)

    def encode_prompt(self, pipe, prompt, negative, cfg, device):
        cond, uncond = pipe.encode_prompt(prompt, device, 1, cfg, negative_prompt=negative)
        return PromptEmbeds(cond, uncond)


class StableDiffusionXL(PipelineKind):
    """SDXL: two text encoders (penultimate hidden states concatenated), the pooled prompt and the size/crop numbers."""

    def unet_aliases(self, unet):
        """Stability's block names of the attention blocks (generative-models' sgm UNet, which kohya's SDXL LoRAs
        name): down block b's attention l is input_blocks.{1 + b(n+1) + l}.1, the middle block's middle_block.1,
        up block b's attention l output_blocks.{b(n+1) + l}.1, n the layers per block, as diffusers'
        _maybe_map_sgm_blocks_to_diffusers reads them. Inside a block the names agree (transformer_blocks.0.attn1.to_q)."""
        n = unet.config.layers_per_block
        if not isinstance(n, int):  # per-block layer counts: not SDXL's layout
            return {}
        aliases = {}
        for path, _ in unet.named_modules():
            if m := _DOWN_UP.fullmatch(path):
                block, layer = int(m["block"]), int(m["layer"])
                index = 1 + block * (n + 1) + layer if m["kind"] == "down_blocks" else block * (n + 1) + layer
                aliases[path] = f"{'input_blocks' if m['kind'] == 'down_blocks' else 'output_blocks'}.{index}.1.{m['rest']}"
            elif path.startswith("mid_block.attentions.0."):
                aliases[path] = "middle_block.1." + path.removeprefix("mid_block.attentions.0.")
        return aliases

    def load(self, source: str, dtype, **kwargs):
        from diffusers import StableDiffusionXLPipeline

        return StableDiffusionXLPipeline.from_pretrained(source, torch_dtype=dtype, **kwargs)

    def condition(self, encoders, ids, geometry, device):
        states, pooled = [], None
        for encoder, part_ids in zip(encoders, ids, strict=True):
            out = encoder(part_ids.to(device), output_hidden_states=True)
            pooled = out[0]  # the last encoder's wins: CLIPTextModelWithProjection's text_embeds (B, P)
            states.append(out.hidden_states[-2])  # (B, 77, D_k): the penultimate layer, as SDXL reads it
        context = torch.cat(states, dim=-1)  # (B, 77, D1 + D2)
        added = {"text_embeds": pooled, "time_ids": geometry.to(device=device, dtype=context.dtype)}  # (B, P), (B, 6)
        return context, {"added_cond_kwargs": added}

    def encode_prompt(self, pipe, prompt, negative, cfg, device):
        # An empty negative prompt goes in as None: the pipeline then uses zero embeddings where its
        # force_zeros_for_empty_prompt says so, as a plain pipe(prompt) call does.
        cond, uncond, pooled, pooled_uncond = pipe.encode_prompt(prompt, device=device, num_images_per_prompt=1,
                                                                 do_classifier_free_guidance=cfg, negative_prompt=negative or None)
        return PromptEmbeds(cond, uncond if cfg else None, pooled, pooled_uncond if cfg else None)


SD = StableDiffusion("sd", "Stable Diffusion 1.x/2.x", ("StableDiffusionPipeline",), (TextPart("", "lora_te_", None),))
SDXL = StableDiffusionXL(
    "sdxl", "Stable Diffusion XL", ("StableDiffusionXLPipeline",),
    (TextPart("", "lora_te1_", "clip_l"), TextPart("_2", "lora_te2_", "clip_g")),
    unet_presets=(("sd-unet", "sdxl-unet"), ("sd-unet-full", "sdxl-unet-full")), vae_float32=True,
)
KINDS: dict[str, PipelineKind] = {kind.name: kind for kind in (SD, SDXL)}


def kind_of(pipe) -> PipelineKind:
    """The kind of a loaded pipeline: SDXL when it has a second text encoder, else Stable Diffusion 1.x/2.x."""
    return SDXL if getattr(pipe, "text_encoder_2", None) is not None else SD


def kind_named(name: str | None, source: str) -> PipelineKind:
    """The kind an adapter file records (none: SD, every file written before SDXL was supported)."""
    if name is None:
        return SD
    if name not in KINDS:
        raise AdapterFileError(f"{source} records pipeline kind {name!r}, which this toolkit does not know ({', '.join(KINDS)}); "
                               "update the toolkit or retrain the concept")
    return KINDS[name]
