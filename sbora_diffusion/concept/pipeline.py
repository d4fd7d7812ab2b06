"""The pipeline's side of a concept run: what is frozen, what trains (the adapters on the UNet and,
optionally, every text encoder; the concept token's embeddings), the dtype of the frozen weights,
gradient checkpointing, the training noise scheduler and the resolution check. The pipeline kind
(``kinds.py``) says which text encoders there are."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from sbora.adapters import AdapterConfig, adapter_parameters, inject
from sbora.configuration import ConfigError

from ..kinds import kind_of
from ..tokens import install_concept_tokens
from .config import ConceptConfig
from .options import TrainConfig

if TYPE_CHECKING:
    from diffusers import DDPMScheduler


def set_up_adapters(pipe, concept: ConceptConfig, adapter: AdapterConfig, te_adapter: AdapterConfig | None, cfg: TrainConfig):
    """Freeze the base, inject the adapters (UNet; with `te_adapter` every text encoder) and token embeddings;
    return (named params, optimizer groups, tokens)."""
    kind = kind_of(pipe)
    for part in (*kind.parts(pipe).values(), pipe.vae):
        part.requires_grad_(False)
    name = concept.key
    inject(pipe.unet, kind.unet_adapter(adapter), name=name)
    groups = [{"params": adapter_parameters(pipe.unet, name)}]
    if te_adapter is not None:
        for text_encoder in kind.text_encoders(pipe):
            inject(text_encoder, te_adapter, name=name)
            groups.append({"params": adapter_parameters(text_encoder, name), "lr": cfg.text_encoder_lr or cfg.lr})
    token_groups, tokens = concept_token(pipe, concept, cfg)
    return trainable_parameters(pipe), groups + token_groups, tokens


def concept_token(pipe, concept: ConceptConfig, cfg: TrainConfig) -> tuple[list[dict], list | None]:
    """The concept token's learned embeddings (``--token-mode``), one per text encoder (its tokenizer gets the
    token too): (their optimizer group, or none; the embeddings or None)."""
    if cfg.token_mode == "none":
        return [], None
    kind = kind_of(pipe)
    tokens = [install_concept_tokens(tokenizer, text_encoder, concept.token, cfg.token_mode, init_word=concept.class_word)
              for tokenizer, text_encoder in zip(kind.tokenizers(pipe), kind.text_encoders(pipe))]
    return [{"params": [t.vectors for t in tokens], "lr": cfg.token_lr, "weight_decay": 0.0}], tokens


def trainable_parameters(pipe) -> dict:
    """Every trainable tensor of the UNet and text encoders, by name (the checkpoints' keys)."""
    return {f"{part}.{n}": p for part, model in kind_of(pipe).parts(pipe).items() for n, p in model.named_parameters() if p.requires_grad}


def cast_frozen(pipe, dtype: torch.dtype) -> None:
    """Frozen weights to the mixed-precision dtype; trainable ones stay fp32 (as diffusers' scripts), and so does
    a VAE that its pipeline kind keeps in float32 (SDXL's)."""
    kind = kind_of(pipe)
    for part in (*kind.parts(pipe).values(), *(() if kind.vae_float32 else (pipe.vae,))):
        for p in part.parameters():
            if not p.requires_grad:
                p.data = p.data.to(dtype)


def prepare_for_training(pipe, cfg: TrainConfig, dtype: torch.dtype, train_text_encoders: bool) -> DDPMScheduler:
    """Cast the frozen weights, turn on gradient checkpointing (``--gradient-checkpointing``; the text encoders only when
    they train); return the noise scheduler the loss adds noise with (the pipeline's, ``--prediction-type`` applied)."""
    cast_frozen(pipe, dtype)
    if cfg.gradient_checkpointing:
        pipe.unet.enable_gradient_checkpointing()
        for te in kind_of(pipe).text_encoders(pipe) if train_text_encoders else ():
            # transformers 5 name; older releases only have gradient_checkpointing_enable
            (getattr(te, "activation_checkpointing_enable", None) or te.gradient_checkpointing_enable)()
    from diffusers import DDPMScheduler  # here: importing diffusers takes seconds, which `--help` should not wait for

    return DDPMScheduler.from_config(pipe.scheduler.config, **({"prediction_type": cfg.prediction_type} if cfg.prediction_type else {}))


def check_resolution(pipe, res: int) -> None:
    """Images become latents through the VAE: the resolution must be a multiple of its factor."""
    if res % pipe.vae_scale_factor:
        raise ConfigError(f"resolution {res} does not fit this model: it must be a multiple of {pipe.vae_scale_factor} (its VAE's factor)")
