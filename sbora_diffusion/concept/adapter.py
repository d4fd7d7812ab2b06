"""Concept adapter files: everything one trained concept adds to a Stable Diffusion or SDXL pipeline.

One file per model part, in the foundation's adapter format (``adapters/io.py``):

    adapter.safetensors                  the UNet adapter (the file users pass around), plus
                                         ``_extra.token_embeddings`` (n, D) when the concept's
                                         token embeddings were trained (SDXL: and
                                         ``_extra.token_embeddings_2`` (n, D2) for its second text
                                         encoder), and in its ``extra`` metadata: concept, method,
                                         token, class_word, token_mode, token_ids (SDXL: and
                                         token_ids_2), eval_prompts, pipeline_kind ("sd" or "sdxl";
                                         a file without it is SD's), text_encoder_adapter
                                         (SDXL: text_encoder_2_adapter)
    adapter.text_encoder.safetensors     the text-encoder adapter, only when it was trained; the
                                         main file names it in ``extra.text_encoder_adapter``
    adapter.text_encoder_2.safetensors   SDXL's second text encoder's, likewise

The names come from the pipeline's kind (``kinds.TextPart``). ``load_concept_adapter(pipe,
"adapter.safetensors")`` restores all of it, and refuses a concept of the other kind (an SD 1.x
concept on an SDXL base, or the reverse). It also takes a diffusers or kohya LoRA file
(``adapters/formats.py``): its UNet and text-encoder parts.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch

from sbora.adapters import AdapterFile, AdapterFileError, adapted_layers, load_adapter, read_adapter, remove, save_adapter
from sbora.adapters.file import FORMAT
from sbora.adapters.formats import lora_parts
from sbora.adapters.io import sibling_file
from sbora.configuration import ConfigError

from ..kinds import KIND_KEY, SDXL, PipelineKind, kind_named, kind_of
from ..tokens import ConceptTokenEmbedding, concept_token_extra, install_concept_tokens, resolve_token_ids

ADAPTER_FILE = "adapter.safetensors"  # a concept run's adapter (the trainer writes it; compose finds it by concept and method)


def part_file(path: str | Path, part: str) -> Path:
    """The file of a model part's adapter beside the main one: adapter.text_encoder.safetensors, ..."""
    path = Path(path)
    return path.with_name(f"{path.stem}.{part}{path.suffix}")


def save_concept_adapter(
    pipe, path: str | Path, name: str, base_model: str, info: dict,
    tokens: ConceptTokenEmbedding | Sequence[ConceptTokenEmbedding] | None = None, token_mode: str = "none",
) -> Path:
    """Write adapter `name` of the pipeline's UNet (and text encoders, if adapted) plus token embeddings.

    `info` goes into the metadata (concept, method, token, class_word, eval_prompts, ...), with
    the pipeline's kind. `tokens`: the token embeddings of each text encoder, in the kind's order.
    The text-encoder files are written first, so the main file never names a missing one.
    """
    path, kind = Path(path), kind_of(pipe)
    extra, extra_tensors = {**info, KIND_KEY: kind.name}, {}
    tokens = [tokens] if isinstance(tokens, ConceptTokenEmbedding) else list(tokens or ())
    if tokens:
        extra.update(concept_token_extra(tokens[0], info["token"], token_mode))
    for text, wrapper in zip(kind.texts, tokens):
        extra[text.token_ids] = wrapper.token_ids.tolist()
        extra_tensors[text.token_tensor] = wrapper.vectors.detach().float()
    for text in kind.texts:
        model = getattr(pipe, text.part)
        if adapted_layers(model, name):
            extra[f"{text.part}_adapter"] = save_adapter(model, part_file(path, text.part), name=name, base_model=base_model).name
    return save_adapter(pipe.unet, path, name=name, base_model=base_model, extra_tensors=extra_tensors, extra=extra)


def file_kind(file: AdapterFile, source: str) -> PipelineKind | None:
    """The pipeline kind a file was made for: the one it records; an imported LoRA's from its parts
    (a second text encoder: SDXL; else unknown, and its shapes decide)."""
    if file.format == FORMAT:
        return kind_named(file.extra.get(KIND_KEY), source)
    return SDXL if SDXL.texts[-1].part in lora_parts(file) else None


def check_kind(pipe, file: AdapterFile, source: str) -> None:
    """Refuse a concept made for the other kind of pipeline, saying which base it needs."""
    made_for, kind = file_kind(file, source), kind_of(pipe)
    if made_for is not None and made_for != kind:
        base = f" ('{file.base_model}')" if file.base_model else ""
        raise AdapterFileError(f"{source} was trained on a {made_for.label} pipeline{base}, and this pipeline is {kind.label}: "
                               f"load it onto a {made_for.label} base (--model), or retrain the concept on this one")


def load_concept_adapter(pipe, path: str | Path, name: str | None = None, weight: float = 1.0) -> AdapterFile:
    """Put a trained concept into `pipe`: UNet adapter, text-encoder adapters, token embeddings.

    The adapter is named `name` (default: the concept's name from the file). On any error
    the adapters already added are taken out again.
    """
    path, kind = Path(path), kind_of(pipe)
    file = read_adapter(path)
    check_kind(pipe, file, str(path))
    info = file.extra
    name = name or info.get("concept") or "default"
    texts = []  # (text part, its adapter file or None, its token vectors or None)
    for text in kind.texts:
        if info.get(f"{text.part}_adapter"):
            te_path = sibling_file(path, info[f"{text.part}_adapter"], "text-encoder adapter")
        else:  # an imported diffusers/kohya LoRA keeps its text-encoder parts in the same file
            te_path = path if text.part in lora_parts(file) else None
        if te_path is not None and te_path != path:
            read_adapter(te_path)  # checked before the model changes
        texts.append((text, te_path, file.extra_tensors.get(text.token_tensor)))
    for text, _, vectors in texts:
        if vectors is None or info.get("token_mode") != "rare":
            continue  # a new token's ids are whatever its tokenizer gives it when it is added
        ids = resolve_token_ids(getattr(pipe, text.tokenizer), info["token"], "rare")
        if ids != info.get(text.token_ids):
            raise AdapterFileError(
                f"{path}: token '{info['token']}' tokenizes to {ids} here but to {info.get(text.token_ids)} when trained; "
                "load it onto the base model it was trained on"
            )
    base_model = getattr(pipe, "base_model_id", None)
    load_adapter(pipe.unet, path, name=name, weight=weight, base_model=base_model, aliases=kind.unet_aliases(pipe.unet))
    try:
        for text, te_path, _ in texts:
            if te_path is not None:
                load_adapter(getattr(pipe, text.part), te_path, name=name, weight=weight, base_model=base_model, part=text.part)
        for text, _, vectors in texts:
            if vectors is not None:
                install_concept_tokens(getattr(pipe, text.tokenizer), getattr(pipe, text.part), info["token"], info["token_mode"],
                                       vectors=vectors)
    except (AdapterFileError, ConfigError) as e:
        for model in kind.parts(pipe).values():
            if adapted_layers(model, name):
                remove(model, name)
        raise AdapterFileError(f"{path}: {e}") from None
    return file


def token_embeddings(text_encoder: torch.nn.Module) -> ConceptTokenEmbedding | None:
    """The outermost concept-token wrapper of `text_encoder`, if any."""
    table = text_encoder.get_input_embeddings()
    return table if isinstance(table, ConceptTokenEmbedding) else None
