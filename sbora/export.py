r"""Export an adapter as a standard LoRA (diffusers, kohya for A1111/ComfyUI, peft), or fold it into its base.

    sbora-export --adapter outputs/dog/sbora-fa/adapter.safetensors --format diffusers --out dog-lora.safetensors
    sbora-export --adapter outputs/llm/math/sbora-fa/adapter.safetensors --format peft --out math-peft
    sbora-export --adapter outputs/dog/sbora-fa/adapter.safetensors --merge-into /models/sd15 --out sd15-dog

What is written (every method exactly, through its cores' ``lora_factors``; keys and metadata
in ``adapters/formats.py``):

    diffusers   OUT (.safetensors): the UNet and text-encoder LoRA with the LoRA metadata diffusers
                reads (rank and alpha per module); learned token embeddings go to
                <OUT stem>.learned_embeds.safetensors, for ``pipe.load_textual_inversion``
                (SDXL: ``text_encoder_2.`` keys too, and the token file holds ``clip_l`` and ``clip_g``)
    kohya       OUT (.safetensors) in kohya keys with ``.alpha`` (A1111, ComfyUI, diffusers;
                SDXL: ``lora_te1_`` / ``lora_te2_``); the same embedding file beside it
    peft        OUT/ a peft adapter folder (LLM adapters: made from the adapter and the base's
                config alone, without its weights or tokenizer); a concept gets OUT/unet/ and
                OUT/text_encoder/ (SDXL: and OUT/text_encoder_2/; one peft folder per model) and
                OUT/learned_embeds.safetensors
    --merge-into MODEL   OUT/ a plain diffusers pipeline folder, SD or SDXL (or transformers model folder)
                with the adapter, and a concept's token embeddings, folded into the weights; a
                transformers model gets its base's tokenizer beside it when that loads here
                (else it is saved without one, and a note says so)

--adapter takes this toolkit's adapter files (a concept's adapter.safetensors with its
text-encoder file and tokens, or an LLM adapter) and diffusers, kohya or peft LoRA files, so
it also converts between those. The layers are rebuilt on the adapter's base model (SBoRA's
one-hot factor needs the layer's width): ``--model``, by default the one the file records.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from importlib.metadata import entry_points
from pathlib import Path

import torch
from safetensors.torch import save_file

from .adapters import AdapterFile, read_adapter
from .adapters.formats import PEFT_CONFIG, PEFT_WEIGHTS, peft_adapter
from .adapters.registry import EXPORT_FORMATS, spec_of
from .cli import Command, Invocation, Section
from .configuration import ConfigError
from .fileio import atomic_path, write_json

FORMATS = EXPORT_FORMATS  # the registry's: each method's spec says which of them its adapters go to
NAME = "export"  # the adapter's name inside the model while it is exported
EXPORTERS = "sbora.exporters"  # the entry-point group through which each world offers its exporter (pyproject.toml)


@dataclass
class ExportConfig:
    adapter: str | None = field(default=None, metadata={"help": "the adapter: a concept's adapter.safetensors, an LLM adapter, or a diffusers/kohya/peft LoRA file or folder"})
    format: str | None = field(default=None, metadata={"help": "diffusers, kohya or peft (or give --merge-into)"})
    out: str | None = field(default=None, metadata={"help": "where to write: a .safetensors file (diffusers, kohya) or a folder (peft, --merge-into)"})
    merge_into: str | None = field(default=None, metadata={"help": "fold the adapter into this base (a diffusers pipeline folder or transformers model folder) and save it at --out"})
    model: str | None = field(default=None, metadata={"help": "the base model the adapter was made for, to rebuild its layers (none: the one the adapter file records)",
                                                       "aliases": ("base",)})

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

    def base_of(self, file: AdapterFile) -> str:
        """The base to rebuild the adapter's layers on: --model, else the one the file records."""
        base = self.model or file.base_model
        if not base:
            raise ConfigError(f"{self.adapter} does not record its base model; pass --model (the pipeline or model it was made for)")
        return base


@dataclass(frozen=True)
class Exporter:
    """What a world (diffusion, LLM) offers the command: which adapters it takes and how it writes them."""

    adapts: str  # what its adapters adapt, for messages: "a Stable Diffusion pipeline"
    claims: Callable[[AdapterFile], bool] | None  # whether an adapter file is this world's; None: every file no other world claims
    formats: tuple[str, ...]  # the --format values it writes
    markers: dict[str, str]  # "merge" / "peft": the file that marks an earlier export of that kind in a folder --out
    run: Callable[[ExportConfig, AdapterFile], dict]  # the export itself (see ``export``'s return value)


# ---------------------------------------------------------------------------- writers the worlds share


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


def write_peft_folder(folder: Path, entries: dict, base_model: str | None, task_type: str | None = None, fan_in_fan_out: bool = False) -> None:
    """adapter_model.safetensors + adapter_config.json of one model's LoRA `entries` (``lora_entries``), into `folder`."""
    tensors, config = peft_adapter(entries, base_model, task_type, fan_in_fan_out=fan_in_fan_out)
    folder.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(folder / PEFT_WEIGHTS), metadata={"format": "pt"})
    write_json(folder / PEFT_CONFIG, config)


# ---------------------------------------------------------------------------- the command


def exporters() -> list[Exporter]:
    """The installed worlds' exporters (entry points of group ``sbora.exporters``): the core imports no world."""
    return [ep.load() for ep in entry_points(group=EXPORTERS)]


def exporter_for(file: AdapterFile, adapter: str) -> Exporter:
    """The world whose exporter claims the file, else the one that takes what no other claims."""
    found = [e for e in exporters() if e.claims is not None and e.claims(file)] or [e for e in exporters() if e.claims is None]
    if not found:
        raise ConfigError(f"no installed exporter takes {adapter} (installed: {', '.join(e.adapts for e in exporters()) or 'none'}); "
                          "reinstall the toolkit (pip install -e .) so that its exporters are registered")
    return found[0]


def export(config: ExportConfig) -> dict:
    """Run one export (see the module docstring); returns {"written": [paths], "load": a line of Python that loads it},
    plus "notes": [lines for the user] when something was left out (a merged LLM saved without its tokenizer)."""
    config.validate()
    file = read_adapter(config.adapter)
    spec = spec_of(file.config)  # the method's spec: the formats it goes to (imported LoRA files: LoRA's)
    if config.format and config.format not in spec.export_formats:
        raise ConfigError(f"{config.adapter} is a {spec.label} adapter (--method {spec.name}), which exports to "
                          f"{', '.join(spec.export_formats) or 'no format'}, not {config.format}")
    world = exporter_for(file, config.adapter)
    if config.format and config.format not in world.formats:
        raise ConfigError(f"{config.adapter} adapts {world.adapts}: export it with --format {' or '.join(world.formats)}")
    # Every check on --out before a base model is loaded (that can take minutes).
    out = Path(config.out)
    if config.merge_into:
        check_replaceable(out, world.markers["merge"])
    elif config.format == "peft":
        check_replaceable(out, world.markers["peft"])
    elif out.is_dir():
        raise ConfigError(f"{out} is a folder; give a .safetensors file name")
    return world.run(config, file)


def _run(invocation: Invocation) -> None:
    result = export(invocation.configs["export"])
    for note in result.get("notes", []):
        print(f"note: {note}", file=sys.stderr)
    print("\n".join(f"wrote {p}" for p in result["written"]) + f"\nload it with: {result['load']}")


COMMAND = Command("sbora-export", __doc__, _run, sections=(Section("export", ExportConfig, title="export options"),))
main = COMMAND.main


if __name__ == "__main__":
    sys.exit(main())
