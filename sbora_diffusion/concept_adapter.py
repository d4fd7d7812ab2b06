"""Concept adapter files: everything one trained concept adds to a Stable Diffusion pipeline.

One file per model part, in the foundation's adapter format (``adapters/io.py``):

    adapter.safetensors                the UNet adapter (the file users pass around), plus
                                       ``_extra.token_embeddings`` (n, D) when the concept's
                                       token embeddings were trained, and in its ``extra``
                                       metadata: concept, method, token, class_word, token_mode,
                                       token_ids, eval_prompts, text_encoder_adapter
    adapter.text_encoder.safetensors   the text-encoder adapter, only when it was trained; the
                                       main file names it in ``extra.text_encoder_adapter``

``load_concept_adapter(pipe, "adapter.safetensors")`` restores all of it. It also takes a
diffusers or kohya LoRA file (``adapters/formats.py``): its UNet and text-encoder parts.
"""

from __future__ import annotations

from pathlib import Path

import torch

from .adapters import AdapterFile, AdapterFileError, adapted_layers, load_adapter, read_adapter, remove, save_adapter
from .adapters.formats import lora_parts
from .adapters.io import sibling_file
from .configuration import ConfigError
from .tokens import ConceptTokenEmbedding, concept_token_extra, install_concept_tokens, resolve_token_ids

TOKEN_TENSOR = "token_embeddings"


def text_encoder_file(path: str | Path) -> Path:
    path = Path(path)
    return path.with_name(f"{path.stem}.text_encoder{path.suffix}")


def save_concept_adapter(
    pipe, path: str | Path, name: str, base_model: str, info: dict,
    tokens: ConceptTokenEmbedding | None = None, token_mode: str = "none",
) -> Path:
    """Write adapter `name` of the pipeline's UNet (and text encoder, if adapted) plus token embeddings.

    `info` goes into the metadata (concept, method, token, class_word, eval_prompts, ...).
    The text-encoder file is written first, so the main file never names a missing one.
    """
    path = Path(path)
    extra, extra_tensors = dict(info), {}
    if tokens is not None:
        extra.update(concept_token_extra(tokens, info["token"], token_mode))
        extra_tensors[TOKEN_TENSOR] = tokens.vectors.detach().float()
    if adapted_layers(pipe.text_encoder, name):
        te = save_adapter(pipe.text_encoder, text_encoder_file(path), name=name, base_model=base_model)
        extra["text_encoder_adapter"] = te.name
    return save_adapter(pipe.unet, path, name=name, base_model=base_model, extra_tensors=extra_tensors, extra=extra)


def load_concept_adapter(pipe, path: str | Path, name: str | None = None, weight: float = 1.0) -> AdapterFile:
    """Put a trained concept into `pipe`: UNet adapter, text-encoder adapter, token embeddings.

    The adapter is named `name` (default: the concept's name from the file). On any error
    the adapters already added are taken out again.
    """
    path = Path(path)
    file = read_adapter(path)
    info = file.extra
    name = name or info.get("concept") or "default"
    if info.get("text_encoder_adapter"):
        te_path = sibling_file(path, info["text_encoder_adapter"], "text-encoder adapter")
    else:  # an imported diffusers/kohya LoRA keeps its text-encoder part in the same file
        te_path = path if "text_encoder" in lora_parts(file) else None
    te_file = read_adapter(te_path) if te_path else None
    vectors = file.extra_tensors.get(TOKEN_TENSOR)
    if vectors is not None and info.get("token_mode") == "rare":
        ids = resolve_token_ids(pipe.tokenizer, info["token"], "rare")
        if ids != info.get("token_ids"):
            raise AdapterFileError(
                f"{path}: token '{info['token']}' tokenizes to {ids} here but to {info.get('token_ids')} when trained; "
                "load it onto the base model it was trained on"
            )
    base_model = getattr(pipe, "base_model_id", None)
    load_adapter(pipe.unet, path, name=name, weight=weight, base_model=base_model)
    try:
        if te_file is not None:
            load_adapter(pipe.text_encoder, te_path, name=name, weight=weight, base_model=base_model)
        if vectors is not None:
            install_concept_tokens(pipe.tokenizer, pipe.text_encoder, info["token"], info["token_mode"], vectors=vectors)
    except (AdapterFileError, ConfigError) as e:
        for model in (pipe.unet, pipe.text_encoder):
            if adapted_layers(model, name):
                remove(model, name)
        raise AdapterFileError(f"{path}: {e}") from None
    return file


def token_embeddings(text_encoder: torch.nn.Module) -> ConceptTokenEmbedding | None:
    """The outermost concept-token wrapper of `text_encoder`, if any."""
    table = text_encoder.get_input_embeddings()
    return table if isinstance(table, ConceptTokenEmbedding) else None
