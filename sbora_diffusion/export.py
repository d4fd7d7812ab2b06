r"""Export an adapter as a standard LoRA (diffusers, kohya for A1111/ComfyUI, peft), or fold it into its base.

    python -m sbora_diffusion.export --adapter outputs/dog/sbora-fa/adapter.safetensors --format diffusers --out dog-lora.safetensors
    python -m sbora_diffusion.export --adapter outputs/llm/math/sbora-fa/adapter.safetensors --format peft --out math-peft
    python -m sbora_diffusion.export --adapter outputs/dog/sbora-fa/adapter.safetensors --merge-into /models/sd15 --out sd15-dog

What is written (every method exactly, through its cores' ``lora_factors``; keys and metadata
in ``adapters/formats.py``):

    diffusers   OUT (.safetensors): the UNet and text-encoder LoRA with the LoRA metadata diffusers
                reads (rank and alpha per module); learned token embeddings go to
                <OUT stem>.learned_embeds.safetensors, for ``pipe.load_textual_inversion``
    kohya       OUT (.safetensors) in kohya keys with ``.alpha`` (A1111, ComfyUI, diffusers);
                the same embedding file beside it
    peft        OUT/ a peft adapter folder (LLM adapters: made from the adapter and the base's
                config alone, without its weights or tokenizer); a concept gets OUT/unet/ and
                OUT/text_encoder/ (one peft folder per model) and OUT/learned_embeds.safetensors
    --merge-into MODEL   OUT/ a plain diffusers pipeline folder (or transformers model folder)
                with the adapter, and a concept's token embeddings, folded into the weights; a
                transformers model gets its base's tokenizer beside it when that loads here
                (else it is saved without one, and a note says so)

--adapter takes this toolkit's adapter files (a concept's adapter.safetensors with its
text-encoder file and tokens, or an LLM adapter) and diffusers, kohya or peft LoRA files, so
it also converts between those. The layers are rebuilt on the adapter's base model (SBoRA's
one-hot factor needs the layer's width): ``--base``, by default the one the file records.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import save_file

from .adapters import AdapterFile, adapted_layers, load_adapter, merge_and_unload, read_adapter
from .adapters.formats import PARTS, PEFT_CONFIG, PEFT_PREFIX, PEFT_WEIGHTS, diffusers_lora, kohya_lora, lora_entries, peft_adapter, textual_inversion
from .adapters.registry import EXPORT_FORMATS, spec_of
from .cli import add_debug_flag, run_main
from .configuration import ConfigError, add_arguments, from_dict, overrides_from_args
from .fileio import atomic_folder, atomic_path, write_json

FORMATS = EXPORT_FORMATS  # the registry's: each method's spec says which of them its adapters go to
EMBEDDINGS = "learned_embeds.safetensors"  # the name diffusers' textual-inversion script gives its file
UNET_ROOTS = ("down_blocks.", "mid_block.", "up_blocks.", "time_embedding.", "add_embedding.", "encoder_hid_proj")
NAME = "export"  # the adapter's name inside the model while it is exported


@dataclass
class ExportConfig:
    adapter: str | None = field(default=None, metadata={"help": "the adapter: a concept's adapter.safetensors, an LLM adapter, or a diffusers/kohya/peft LoRA file or folder"})
    format: str | None = field(default=None, metadata={"help": "diffusers, kohya or peft (or give --merge-into)"})
    out: str | None = field(default=None, metadata={"help": "where to write: a .safetensors file (diffusers, kohya) or a folder (peft, --merge-into)"})
    merge_into: str | None = field(default=None, metadata={"help": "fold the adapter into this base (a diffusers pipeline folder or transformers model folder) and save it at --out"})
    base: str | None = field(default=None, metadata={"help": "the base model the adapter was made for, to rebuild its layers (default: the one the adapter file records)"})

    def validate(self) -> None:
        if not self.adapter or not self.out:
            raise ConfigError("give --adapter PATH and --out PATH")
        if bool(self.format) == bool(self.merge_into):
            raise ConfigError("give either --format diffusers|kohya|peft or --merge-into MODEL_DIR, not both or neither")
        if self.format and self.format not in FORMATS:
            raise ConfigError(f"unknown --format '{self.format}'; choose one of {', '.join(FORMATS)}")
        if self.format in ("diffusers", "kohya") and Path(self.out).suffix != ".safetensors":
            raise ConfigError(f"--out must be a .safetensors file name for --format {self.format}, e.g. lora.safetensors")
        if Path(self.out).resolve() == Path(self.adapter).resolve():
            raise ConfigError("--out is the adapter itself; write the export somewhere else")


# ---------------------------------------------------------------------------- writers


def write_safetensors(tensors: dict[str, torch.Tensor], path: Path, metadata: dict[str, str] | None = None) -> Path:
    if path.is_dir():
        raise ConfigError(f"{path} is a folder; give a .safetensors file name")
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata=metadata)
    return path


def check_replaceable(folder: Path, marker: str) -> None:
    """Refuse to replace an existing folder that is not an earlier output of the same kind (it holds no `marker`)."""
    if folder.is_file() or (folder.is_dir() and any(folder.iterdir()) and not (folder / marker).exists()):
        raise ConfigError(f"{folder} already exists and is not an earlier export (no {marker} in it); pick a new --out or remove it")


def _peft_files(folder: Path, model: torch.nn.Module, name: str, base_model: str | None, task_type: str | None = None) -> None:
    """adapter_model.safetensors + adapter_config.json of adapter `name` of `model`, into `folder`."""
    from llm.models import CONV1D_PATHS

    entries = lora_entries(model, name)
    # GPT-2's Conv1D layers were made nn.Linear to carry adapters; peft adapts Conv1D with fan_in_fan_out.
    conv1d = set(getattr(model, CONV1D_PATHS, [])) & set(entries)
    tensors, config = peft_adapter(entries, base_model, task_type, fan_in_fan_out=bool(conv1d))
    folder.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(folder / PEFT_WEIGHTS), metadata={"format": "pt"})
    write_json(folder / PEFT_CONFIG, config)


def export_pipeline(pipe, name: str, fmt: str, out: str | Path, token: str | None = None, vectors: torch.Tensor | None = None,
                    info: dict | None = None) -> list[Path]:
    """Write adapter `name` of `pipe` (UNet and text encoder) as a `fmt` LoRA, plus the token's embeddings if given.

    Returns the paths written (see the module docstring for the layout of each format).
    """
    parts = {part: getattr(pipe, part) for part in PARTS if adapted_layers(getattr(pipe, part), name)}
    if not parts:
        raise ValueError(f"the pipeline has no adapter named '{name}' to export")
    out, info = Path(out), info or {}
    embeddings = textual_inversion(token, vectors) if vectors is not None else None
    if fmt == "peft":
        check_replaceable(out, f"{next(iter(parts))}/{PEFT_CONFIG}")
        with atomic_folder(out) as tmp:
            for part, model in parts.items():
                _peft_files(tmp / part, model, name, info.get("base_model"))
            if embeddings is not None:
                save_file(embeddings, str(tmp / EMBEDDINGS))
        return [out / part for part in parts] + ([out / EMBEDDINGS] if embeddings is not None else [])
    entries = {part: lora_entries(model, name) for part, model in parts.items()}
    tensors, header = (diffusers_lora if fmt == "diffusers" else kohya_lora)(entries, info)
    written = [write_safetensors(tensors, out, header)]
    if embeddings is not None:
        written.append(write_safetensors(embeddings, out.with_name(f"{out.stem}.{EMBEDDINGS}")))
    return written


def export_model(model: torch.nn.Module, name: str, out: str | Path, base_model: str | None, task_type: str | None = "CAUSAL_LM") -> Path:
    """Write adapter `name` of a transformers model as a peft adapter folder that ``PeftModel.from_pretrained`` loads."""
    out = Path(out)
    check_replaceable(out, PEFT_CONFIG)
    with atomic_folder(out) as tmp:
        _peft_files(tmp, model, name, base_model, task_type)
    return out


def fold_concept_tokens(pipe) -> None:
    """Write learned concept-token vectors into the text encoder's own token table and drop their wrappers.

    New tokens get rows of their own (the table grows to the tokenizer's size); a rare token's
    rows are overwritten. The plain text encoder then embeds every prompt as the wrapped one did.
    """
    from .tokens import ConceptTokenEmbedding

    text_encoder, wrappers = pipe.text_encoder, []
    table = text_encoder.get_input_embeddings()
    while isinstance(table, ConceptTokenEmbedding):
        wrappers.append(table)
        table = table.base
    if not wrappers:
        return
    text_encoder.set_input_embeddings(table)
    text_encoder.resize_token_embeddings(len(pipe.tokenizer), mean_resizing=False)
    weight = text_encoder.get_input_embeddings().weight
    with torch.no_grad():
        for wrapper in reversed(wrappers):  # innermost first: an outer wrapper answers its ids before the inner ones
            weight[wrapper.token_ids] = wrapper.vectors.to(weight.dtype)


# ---------------------------------------------------------------------------- the command


def is_pipeline_adapter(file: AdapterFile) -> bool:
    """Whether a file adapts a Stable Diffusion pipeline (UNet paths, or diffusers/kohya keys) rather than a transformers model."""
    return file.format in ("diffusers", "kohya") or any(m.removeprefix(PEFT_PREFIX).startswith(UNET_ROOTS) for m in file.modules)


def _base(config: ExportConfig, file: AdapterFile) -> str:
    base = config.base or file.base_model
    if not base:
        raise ConfigError(f"{config.adapter} does not record its base model; pass --base (the pipeline or model it was made for)")
    return base


def _load_pipeline(model: str, adapter: str):
    """`model` with the concept from `adapter` loaded as NAME; returns (pipe, file)."""
    from .concept_adapter import load_concept_adapter
    from .models import load_pipeline

    pipe = load_pipeline(model)
    return pipe, load_concept_adapter(pipe, adapter, name=NAME)


def _load_llm(model: str, adapter: str, weights: bool = True):
    """A transformers model with the adapter loaded as NAME; GPT-2 Conv1D layers made linear first.

    Without `weights` it is the base's skeleton, built from its config alone (``model_skeleton``):
    enough for a peft export, which needs only the adapter and the layers' widths. No tokenizer
    is loaded either way (see ``_merge_llm``).
    """
    from llm.models import conv1d_to_linear, load_model, model_skeleton  # late: the LLM side is only needed for LLM adapters

    lm = load_model(model) if weights else model_skeleton(model)
    conv1d_to_linear(lm)
    load_adapter(lm, adapter, name=NAME, base_model=model)
    return lm


def _merge_llm(model: str, adapter: str, out: Path) -> list[str]:
    """Fold the adapter into `model` and save it at `out` with the base's tokenizer, or without it
    (and a note saying so) when the tokenizer cannot be loaded here. Returns the notes."""
    from llm.models import save_merged, tokenizer_if_any

    tokenizer, why = tokenizer_if_any(model)
    save_merged(_load_llm(model, adapter), tokenizer, out)
    if tokenizer is None:
        return [f"the merged model was saved without a tokenizer: the tokenizer of {model} could not be loaded here ({why}); "
                f"copy its tokenizer files into {out}, or load the tokenizer from {model}"]
    return []


def _restore_scheduler(pipe, model_dir: str) -> None:
    """Put back the pipeline folder's own scheduler (``load_pipeline`` swaps in DDIM for sampling)."""
    import diffusers

    if not (Path(model_dir) / "scheduler").is_dir():
        return
    library, cls = diffusers.DiffusionPipeline.load_config(model_dir)["scheduler"]
    if library == "diffusers" and hasattr(diffusers, cls):
        pipe.scheduler = getattr(diffusers, cls).from_pretrained(model_dir, subfolder="scheduler")


def export(config: ExportConfig) -> dict:
    """Run one export (see the module docstring); returns {"written": [paths], "load": a line of Python that loads it},
    plus "notes": [lines for the user] when something was left out (a merged LLM saved without its tokenizer)."""
    config.validate()
    file = read_adapter(config.adapter)
    spec = spec_of(file.config)  # the method's spec: the formats it goes to (imported LoRA files: LoRA's)
    if config.format and config.format not in spec.export_formats:
        raise ConfigError(f"{config.adapter} is a {spec.label} adapter (--method {spec.name}), which exports to "
                          f"{', '.join(spec.export_formats) or 'no format'}, not {config.format}")
    out, pipeline = Path(config.out), is_pipeline_adapter(file)
    if not pipeline and config.format in ("diffusers", "kohya"):
        raise ConfigError(f"{config.adapter} adapts a transformers model, not a Stable Diffusion pipeline: export it with --format peft")
    # Every check on --out before a base model is loaded (that can take minutes).
    if config.merge_into:
        check_replaceable(out, "model_index.json" if pipeline else "config.json")
    elif config.format == "peft":
        check_replaceable(out, f"unet/{PEFT_CONFIG}" if pipeline else PEFT_CONFIG)
    elif out.is_dir():
        raise ConfigError(f"{out} is a folder; give a .safetensors file name")
    if config.merge_into:
        if pipeline:
            pipe, _ = _load_pipeline(config.merge_into, config.adapter)
            _restore_scheduler(pipe, config.merge_into)
            fold_concept_tokens(pipe)
            for model in (pipe.unet, pipe.text_encoder):
                merge_and_unload(model)
            with atomic_folder(out) as tmp:
                pipe.save_pretrained(tmp)
            load = f'StableDiffusionPipeline.from_pretrained("{out}")'
        else:
            notes = _merge_llm(config.merge_into, config.adapter, out)
            load = f'AutoModelForCausalLM.from_pretrained("{out}")'
            return {"written": [str(out)], "load": load, "notes": notes}
        return {"written": [str(out)], "load": load}
    base = _base(config, file)
    if pipeline:
        pipe, loaded = _load_pipeline(base, config.adapter)
        info = {k: loaded.extra[k] for k in ("concept", "method", "token", "class_word") if k in loaded.extra}
        vectors = loaded.extra_tensors.get("token_embeddings")
        written = export_pipeline(pipe, NAME, config.format, out, token=info.get("token"), vectors=vectors,
                                  info={"base_model": loaded.base_model or base, **info})
        target = f'PeftModel.from_pretrained(pipe.unet, "{out / "unet"}")' if config.format == "peft" else f'pipe.load_lora_weights("{out}")'
        if vectors is not None and config.format != "peft":
            target += f'; pipe.load_textual_inversion("{written[-1]}")'
        return {"written": [str(p) for p in written], "load": target}
    # peft keys and widths come from the adapter and the base's config: no weights, no tokenizer.
    export_model(_load_llm(base, config.adapter, weights=False), NAME, out, base_model=file.base_model or base)
    return {"written": [str(out)], "load": f'PeftModel.from_pretrained(model, "{out}")'}


def _main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="sbora-export", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_debug_flag(parser)
    add_arguments(parser, ExportConfig, title="export options")
    config = from_dict(ExportConfig, overrides_from_args(parser.parse_args(argv), ExportConfig), source="command line")
    result = export(config)
    for note in result.get("notes", []):
        print(f"note: {note}", file=sys.stderr)
    print("\n".join(f"wrote {p}" for p in result["written"]) + f"\nload it with: {result['load']}")
    return 0


def main(argv: list[str] | None = None) -> int:
    return run_main(_main, argv)


if __name__ == "__main__":
    sys.exit(main())
