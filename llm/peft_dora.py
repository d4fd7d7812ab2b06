"""DoRA from peft as a baseline of the LLM trainer: ``--method peft-dora``.

DoRA (Liu et al. 2024) is not one of our cores: docs/architecture.md §3 takes it from peft, for
comparisons. So this path puts peft's own layers on the model
(``inject_adapter_in_model(LoraConfig(use_dora=True))``) and ``llm.train`` trains them on the
shared engine exactly like every other method: same data, batches, optimizer, schedule,
clipping, precision, checkpoints and resume. It takes LoRA's settings
(``configs/methods/lora.yaml`` with the run's --rank, --alpha, --dropout, --targets, --seed).

What differs is what the cores alone can do: the adapter is saved in peft's format (the run
folder is a peft adapter folder, ``adapter_config.json`` + ``adapter_model.safetensors``, which
``PeftModel.from_pretrained`` loads), and the training procedures (--delta, --select), --merge
and QSBoRA (--quantize) are refused.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn

from sbora.adapters import AdapterConfig
from sbora.adapters.formats import PEFT_CONFIG, PEFT_PREFIX, PEFT_WEIGHTS
from sbora.fileio import atomic_path, write_json

REFUSED = {"delta": "--delta", "select": "--select", "merge": "--merge", "quantize": "--quantize"}  # TrainConfig fields this path refuses


def lora_config(adapter: AdapterConfig, options: dict):
    """peft's ``LoraConfig`` from our LoRA settings and the method's peft options (the registry's ``peft_options``:
    ``use_dora=True`` for peft-dora)."""
    from peft import LoraConfig

    return LoraConfig(r=adapter.rank, lora_alpha=adapter.alpha, lora_dropout=adapter.dropout, use_rslora=adapter.rslora,
                      target_modules=adapter.target_suffixes(), **options)


def inject_dora(model: nn.Module, adapter: AdapterConfig, name: str, options: dict) -> None:
    """peft's layers (DoRA's, with ``options`` {"use_dora": True}) on `model` as adapter `name`, initialized from `adapter.seed`."""
    from peft import inject_adapter_in_model

    with torch.random.fork_rng(devices=[]):  # peft draws its Kaiming A from the global generator: seed it without moving the run's streams
        torch.manual_seed(adapter.seed)
        inject_adapter_in_model(lora_config(adapter, options), model, adapter_name=name)


def dora_layers(model: nn.Module) -> list[nn.Module]:
    from peft.tuners.lora import LoraLayer

    return [m for m in model.modules() if isinstance(m, LoraLayer)]


@contextlib.contextmanager
def dora_off(model: nn.Module) -> Iterator[None]:
    """The block runs the bare base (peft's layers switched off, then on again)."""
    layers = dora_layers(model)
    for layer in layers:
        layer.enable_adapters(False)
    try:
        yield
    finally:
        for layer in layers:
            layer.enable_adapters(True)


def save_dora(model: nn.Module, folder: str | Path, adapter: AdapterConfig, name: str, base_model: str | None, options: dict) -> Path:
    """Adapter `name` as a peft adapter folder (``PeftModel.from_pretrained(base, folder)``); returns the weights file."""
    from peft import get_peft_model_state_dict

    folder = Path(folder)
    tensors = {PEFT_PREFIX + k: v.detach().cpu().contiguous() for k, v in get_peft_model_state_dict(model, adapter_name=name).items()}
    with atomic_path(folder / PEFT_WEIGHTS) as tmp:
        save_file(tensors, str(tmp), metadata={"format": "pt"})
    config = lora_config(adapter, options)
    config.base_model_name_or_path, config.task_type = base_model, "CAUSAL_LM"
    write_json(folder / PEFT_CONFIG, {k: sorted(v) if isinstance(v, set) else v for k, v in config.to_dict().items()})
    return folder / PEFT_WEIGHTS
