"""The diffusion world's exporter: a concept (UNet and text-encoder adapters, learned token) or
a diffusers/kohya/peft LoRA of a Stable Diffusion or SDXL pipeline, written as diffusers, kohya or
peft LoRA files or folded into the pipeline. SDXL files carry both text encoders (diffusers'
``text_encoder_2.`` keys, kohya's ``lora_te1_`` / ``lora_te2_``), and the token goes to an SDXL
textual-inversion file (``clip_l`` and ``clip_g`` tensors, as A1111, ComfyUI and diffusers'
SDXL scripts write them). The command is the core's ``sbora-export``
(``sbora/export.py``, which finds this exporter through the ``sbora.exporters`` entry point);
``python -m sbora_diffusion.export`` runs the same command.
"""

from __future__ import annotations

import sys
from pathlib import Path

import diffusers
import torch
from safetensors.torch import save_file

from sbora.adapters import AdapterFile, adapted_layers, merge_and_unload
from sbora.adapters.formats import PEFT_CONFIG, PEFT_PREFIX, diffusers_lora, kohya_lora, lora_entries, textual_inversion
from sbora.export import NAME, Exporter, ExportConfig, check_replaceable, main, write_peft_folder, write_safetensors
from sbora.fileio import atomic_folder

from .concept.adapter import load_concept_adapter
from .kinds import PipelineKind, kind_of
from .models import load_pipeline
from .tokens import ConceptTokenEmbedding

EMBEDDINGS = "learned_embeds.safetensors"  # the name diffusers' textual-inversion script gives its file
UNET_ROOTS = ("down_blocks.", "mid_block.", "up_blocks.", "time_embedding.", "add_embedding.", "encoder_hid_proj")


def token_file(kind: PipelineKind, token: str, vectors: torch.Tensor | list[torch.Tensor]) -> dict[str, torch.Tensor]:
    """The textual-inversion file of a concept token: diffusers' {token: (n, D)} for one text encoder, and for
    SDXL one tensor per text encoder under its key ({"clip_l": (n, D1), "clip_g": (n, D2)})."""
    vectors = [vectors] if isinstance(vectors, torch.Tensor) else list(vectors)
    if len(kind.texts) == 1:
        return textual_inversion(token, vectors[0])
    return {text.embedding_key: v.detach().float().cpu().contiguous() for text, v in zip(kind.texts, vectors, strict=True)}


def export_pipeline(pipe, name: str, fmt: str, out: str | Path, token: str | None = None,
                    vectors: torch.Tensor | list[torch.Tensor] | None = None, info: dict | None = None) -> list[Path]:
    """Write adapter `name` of `pipe` (UNet and text encoders) as a `fmt` LoRA, plus the token's embeddings if given
    (`vectors`: one (n, D) tensor per text encoder).

    Returns the paths written (see ``sbora/export.py`` for the layout of each format).
    """
    kind = kind_of(pipe)
    parts = {part: model for part, model in kind.parts(pipe).items() if adapted_layers(model, name)}
    if not parts:
        raise ValueError(f"the pipeline has no adapter named '{name}' to export")
    out, info = Path(out), info or {}
    embeddings = token_file(kind, token, vectors) if vectors is not None else None
    if fmt == "peft":
        check_replaceable(out, f"{next(iter(parts))}/{PEFT_CONFIG}")
        with atomic_folder(out) as tmp:
            for part, model in parts.items():
                write_peft_folder(tmp / part, lora_entries(model, name), info.get("base_model"))
            if embeddings is not None:
                save_file(embeddings, str(tmp / EMBEDDINGS))
        return [out / part for part in parts] + ([out / EMBEDDINGS] if embeddings is not None else [])
    entries = {part: lora_entries(model, name) for part, model in parts.items()}
    if fmt == "diffusers":
        tensors, header = diffusers_lora(entries, info)
    else:
        tensors, header = kohya_lora(entries, info, prefixes={"unet": "lora_unet_", **{t.part: t.kohya for t in kind.texts}})
    written = [write_safetensors(tensors, out, header)]
    if embeddings is not None:
        written.append(write_safetensors(embeddings, out.with_name(f"{out.stem}.{EMBEDDINGS}")))
    return written


def fold_concept_tokens(pipe) -> None:
    """Write learned concept-token vectors into each text encoder's own token table and drop their wrappers.

    New tokens get rows of their own (the table grows to the tokenizer's size); a rare token's
    rows are overwritten. The plain text encoders then embed every prompt as the wrapped ones did.
    """
    kind = kind_of(pipe)
    for tokenizer, text_encoder in zip(kind.tokenizers(pipe), kind.text_encoders(pipe)):
        wrappers = []
        table = text_encoder.get_input_embeddings()
        while isinstance(table, ConceptTokenEmbedding):
            wrappers.append(table)
            table = table.base
        if not wrappers:
            continue
        text_encoder.set_input_embeddings(table)
        text_encoder.resize_token_embeddings(len(tokenizer), mean_resizing=False)
        weight = text_encoder.get_input_embeddings().weight
        with torch.no_grad():
            for wrapper in reversed(wrappers):  # innermost first: an outer wrapper answers its ids before the inner ones
                weight[wrapper.token_ids] = wrapper.vectors.to(weight.dtype)


def is_pipeline_adapter(file: AdapterFile) -> bool:
    """Whether a file adapts a Stable Diffusion or SDXL pipeline (UNet paths, or diffusers/kohya keys) rather than a transformers model."""
    return file.format in ("diffusers", "kohya") or any(m.removeprefix(PEFT_PREFIX).startswith(UNET_ROOTS) for m in file.modules)


def _load_pipeline(model: str, adapter: str):
    """`model` with the concept from `adapter` loaded as NAME; returns (pipe, file)."""
    pipe = load_pipeline(model)
    return pipe, load_concept_adapter(pipe, adapter, name=NAME)


def _restore_scheduler(pipe, model_dir: str) -> None:
    """Put back the pipeline folder's own scheduler (``load_pipeline`` swaps in DDIM for sampling)."""
    if not (Path(model_dir) / "scheduler").is_dir():
        return
    library, cls = diffusers.DiffusionPipeline.load_config(model_dir)["scheduler"]
    if library == "diffusers" and hasattr(diffusers, cls):
        pipe.scheduler = getattr(diffusers, cls).from_pretrained(model_dir, subfolder="scheduler")


def export_concept(config: ExportConfig, file: AdapterFile) -> dict:
    """A pipeline adapter, merged into --merge-into or written as --format (``sbora.export.export`` checked the options)."""
    out = Path(config.out)
    if config.merge_into:
        pipe, _ = _load_pipeline(config.merge_into, config.adapter)
        _restore_scheduler(pipe, config.merge_into)
        fold_concept_tokens(pipe)
        kind = kind_of(pipe)
        for model in kind.parts(pipe).values():
            merge_and_unload(model)
        with atomic_folder(out) as tmp:
            pipe.save_pretrained(tmp)
        return {"written": [str(out)], "load": f'{kind.pipeline_classes[0]}.from_pretrained("{out}")'}
    base = config.base_of(file)
    pipe, loaded = _load_pipeline(base, config.adapter)
    info = {k: loaded.extra[k] for k in ("concept", "method", "token", "class_word") if k in loaded.extra}
    kind = kind_of(pipe)
    vectors = [loaded.extra_tensors[t.token_tensor] for t in kind.texts if t.token_tensor in loaded.extra_tensors] or None
    written = export_pipeline(pipe, NAME, config.format, out, token=info.get("token"), vectors=vectors,
                              info={"base_model": loaded.base_model or base, **info})
    target = f'PeftModel.from_pretrained(pipe.unet, "{out / "unet"}")' if config.format == "peft" else f'pipe.load_lora_weights("{out}")'
    if vectors is not None and config.format != "peft":
        target += "; " + load_token_line(kind, info["token"], written[-1])
    return {"written": [str(p) for p in written], "load": target}


def load_token_line(kind: PipelineKind, token: str, path: Path) -> str:
    """The Python that loads a token file (``token_file``) into a diffusers pipeline of `kind`."""
    if len(kind.texts) == 1:
        return f'pipe.load_textual_inversion("{path}")'
    # Each key holds the token's (n, D_k) vectors, loaded as one (multi-vector) token as the single-encoder file is.
    return f'from safetensors.torch import load_file; state = load_file("{path}"); ' + "; ".join(
        f'pipe.load_textual_inversion(state["{t.embedding_key}"], token={token!r}, text_encoder=pipe.{t.part}, tokenizer=pipe.{t.tokenizer})'
        for t in kind.texts)


EXPORTER = Exporter(adapts="a Stable Diffusion or SDXL pipeline", claims=is_pipeline_adapter, formats=("diffusers", "kohya", "peft"),
                    markers={"merge": "model_index.json", "peft": f"unet/{PEFT_CONFIG}"}, run=export_concept)

if __name__ == "__main__":
    sys.exit(main())
