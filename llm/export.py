"""The LLM world's exporter: an adapter of a transformers model, written as a peft adapter folder
(from the adapter and the base's config alone) or folded into its base. The command is the
core's ``sbora-export`` (``sbora/export.py``, which finds this exporter through the
``sbora.exporters`` entry point).
"""

from __future__ import annotations

from pathlib import Path

import torch

from sbora.adapters import AdapterFile, load_adapter
from sbora.adapters.formats import PEFT_CONFIG, lora_entries
from sbora.export import NAME, Exporter, ExportConfig, check_replaceable, write_peft_folder
from sbora.fileio import atomic_folder

from .models import CONV1D_PATHS, conv1d_to_linear, load_model, model_skeleton, save_merged, tokenizer_if_any


def export_model(model: torch.nn.Module, name: str, out: str | Path, base_model: str | None, task_type: str | None = "CAUSAL_LM") -> Path:
    """Write adapter `name` of a transformers model as a peft adapter folder that ``PeftModel.from_pretrained`` loads."""
    out = Path(out)
    check_replaceable(out, PEFT_CONFIG)
    entries = lora_entries(model, name)
    # GPT-2's Conv1D layers were made nn.Linear to carry adapters; peft adapts Conv1D with fan_in_fan_out.
    conv1d = set(getattr(model, CONV1D_PATHS, [])) & set(entries)
    with atomic_folder(out) as tmp:
        write_peft_folder(tmp, entries, base_model, task_type, fan_in_fan_out=bool(conv1d))
    return out


def _load_llm(model: str, adapter: str, weights: bool = True):
    """A transformers model with the adapter loaded as NAME; GPT-2 Conv1D layers made linear first.

    Without `weights` it is the base's skeleton, built from its config alone (``model_skeleton``):
    enough for a peft export, which needs only the adapter and the layers' widths. No tokenizer
    is loaded either way (see ``_merge_llm``).
    """
    lm = load_model(model) if weights else model_skeleton(model)
    conv1d_to_linear(lm)
    load_adapter(lm, adapter, name=NAME, base_model=model)
    return lm


def _merge_llm(model: str, adapter: str, out: Path) -> list[str]:
    """Fold the adapter into `model` and save it at `out` with the base's tokenizer, or without it
    (and a note saying so) when the tokenizer cannot be loaded here. Returns the notes."""
    tokenizer, why = tokenizer_if_any(model)
    save_merged(_load_llm(model, adapter), tokenizer, out)
    if tokenizer is None:
        return [f"the merged model was saved without a tokenizer: the tokenizer of {model} could not be loaded here ({why}); "
                f"copy its tokenizer files into {out}, or load the tokenizer from {model}"]
    return []


def export_llm(config: ExportConfig, file: AdapterFile) -> dict:
    """An LLM adapter, merged into --merge-into or written as a peft folder (``sbora.export.export`` checked the options)."""
    out = Path(config.out)
    if config.merge_into:
        notes = _merge_llm(config.merge_into, config.adapter, out)
        return {"written": [str(out)], "load": f'AutoModelForCausalLM.from_pretrained("{out}")', "notes": notes}
    # peft keys and widths come from the adapter and the base's config: no weights, no tokenizer.
    base = config.base_of(file)
    export_model(_load_llm(base, config.adapter, weights=False), NAME, out, base_model=file.base_model or base)
    return {"written": [str(out)], "load": f'PeftModel.from_pretrained(model, "{out}")'}


# claims=None: it takes every adapter that no other world claims (a transformers model's layers have no fixed names).
EXPORTER = Exporter(adapts="a transformers model", claims=None, formats=("peft",),
                    markers={"merge": "config.json", "peft": PEFT_CONFIG}, run=export_llm)
