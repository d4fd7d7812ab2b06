"""Learnable concept-token embeddings (DreamBooth's rare token / Textual Inversion's new token).

The text encoder's token table stays frozen and bit-identical: a small wrapper around it
answers the concept's token ids with its own learned vectors and every other id with the
frozen table. Two modes:

    new   each whitespace-separated piece of the token ("<dog1>") is added to the tokenizer
          as a new token (ids >= the table size); its vector starts at the class word's
          mean embedding ("dog").
    rare  the token is ordinary text ("sks"); the ids it tokenizes to get learned vectors,
          starting at their frozen rows.

Wrappers nest, so several concepts (each with its own tokens) can sit in one text encoder.
Adapter files store the vectors as the extra tensor ``token_embeddings`` and the tokens,
mode and ids in their ``extra`` metadata (see ``concept_token_extra``).

Not Mix-of-Show's ED-LoRA embedding (Gu et al., NeurIPS 2023). ED-LoRA gives each concept
token piece (two per concept, "<c1> <c2>") one input embedding per UNet cross-attention layer
(16 in SD 1.5): the prompt goes through the text encoder once per layer, with that layer's
embeddings, and each cross-attention layer reads its own encoding (P+-style, 16× the text
encoder's work per prompt). Here each piece has ONE input embedding, encoded once and read by
every cross-attention layer (Textual Inversion's and DreamBooth's reading). The LoRA part
matches: our adapter on the UNet plus the optional one on the text encoder
(``--train-text-encoder``) is ED-LoRA's LoRA on both.
"""

from __future__ import annotations

import torch
from torch import nn

from sbora.configuration import ConfigError

TOKEN_MODES = ("new", "rare", "none")


class ConceptTokenEmbedding(nn.Module):
    """``base(ids)`` except at ``token_ids``, which read the learned ``vectors`` instead."""

    def __init__(self, base: nn.Module, token_ids: list[int], vectors: torch.Tensor):
        super().__init__()
        self.base = base
        self.register_buffer("token_ids", torch.tensor(token_ids, dtype=torch.long, device=vectors.device))
        self.vectors = nn.Parameter(vectors.detach().clone())  # (n, D)

    @property
    def weight(self) -> torch.Tensor:  # code that reads the table (e.g. its dtype/device) sees the frozen one
        return self.base.weight

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        match = ids.unsqueeze(-1) == self.token_ids  # (..., T, n)
        hit = match.any(-1)  # (..., T)
        # Our ids may lie beyond the frozen table (new tokens): look up a harmless id there instead.
        out = self.base(ids.masked_fill(hit, 0))  # (..., T, D)
        learned = self.vectors.to(out.dtype)[match.long().argmax(-1)]  # (..., T, D)
        return torch.where(hit.unsqueeze(-1), learned, out)


def _table(text_encoder: nn.Module) -> nn.Module:
    return text_encoder.get_input_embeddings()


def token_pieces(token: str) -> list[str]:
    return token.split()


def resolve_token_ids(tokenizer, token: str, mode: str) -> list[int]:
    """The ids the concept's token occupies: after ``add_new_tokens`` for mode 'new'."""
    if mode == "new":
        return tokenizer.convert_tokens_to_ids(token_pieces(token))
    return tokenizer(token, add_special_tokens=False).input_ids


def add_new_tokens(tokenizer, token: str) -> None:
    """Add each piece of `token` to the tokenizer; refuses pieces it already knows."""
    vocab = tokenizer.get_vocab()
    known = [p for p in token_pieces(token) if p in vocab or p.lower() in vocab]
    if known:
        raise ConfigError(
            f"token piece(s) {', '.join(known)} already exist in the tokenizer's vocabulary; pick an unused token "
            "such as '<dog1>', or train with --token-mode rare to learn the embedding of an existing word"
        )
    tokenizer.add_tokens(token_pieces(token))


def install_concept_tokens(
    tokenizer, text_encoder: nn.Module, token: str, mode: str, init_word: str | None = None,
    vectors: torch.Tensor | None = None,
) -> ConceptTokenEmbedding:
    """Give `token` learnable embeddings in `text_encoder` (see the module docstring for modes).

    `vectors` (n, D) sets them (loading a trained file); else they start from the class word
    (mode 'new') or from their own frozen rows (mode 'rare').
    """
    if mode not in ("new", "rare"):
        raise ConfigError(f"token mode must be 'new' or 'rare' to install embeddings, got '{mode}'")
    if not token_pieces(token):
        raise ConfigError("the concept token is empty; set token: '<name1>' in the concept config")
    table = _table(text_encoder)
    if mode == "new":
        add_new_tokens(tokenizer, token)
    ids = resolve_token_ids(tokenizer, token, mode)
    if vectors is None:
        with torch.no_grad():
            if mode == "new":
                init_ids = tokenizer(init_word or "", add_special_tokens=False).input_ids
                if not init_ids:
                    raise ConfigError("new-token mode needs a class word to start the token embeddings from")
                mean = table(torch.tensor(init_ids, device=table.weight.device)).float().mean(0)  # (D,)
                vectors = mean.expand(len(ids), -1)
            else:
                vectors = table(torch.tensor(ids, device=table.weight.device)).float()
    if vectors.shape != (len(ids), table.weight.shape[1]):
        raise ConfigError(
            f"token embeddings of shape {tuple(vectors.shape)} do not fit token '{token}' "
            f"({len(ids)} id(s)) in a text encoder of width {table.weight.shape[1]}"
        )
    wrapper = ConceptTokenEmbedding(table, ids, vectors.float().to(table.weight.device))
    text_encoder.set_input_embeddings(wrapper)
    return wrapper


def concept_token_extra(wrapper: ConceptTokenEmbedding, token: str, mode: str) -> dict:
    """What an adapter file needs to restore the tokens: written to its ``extra`` metadata."""
    return {"token": token, "token_mode": mode, "token_ids": wrapper.token_ids.tolist()}
