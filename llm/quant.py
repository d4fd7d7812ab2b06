"""QSBoRA: a quantized frozen base with full-precision adapters on top (as QLoRA, with SBoRA cores).

Two ways to quantize the base's linear layers (``lm_head`` is kept, as bitsandbytes does):

- ``nf4``: 4-bit NormalFloat through bitsandbytes' ``Linear4bit`` (the QLoRA format; meant
  for CUDA, recent bitsandbytes also runs it on the CPU).
- ``int8``: weight-only int8, per output channel and symmetric, ``W ≈ scale[:, None]·q``
  with ``q ∈ [-127, 127]``; dequantized on the fly in the forward pass. A small own
  quantizer: no library needed, runs anywhere.

Both layers are ``nn.Linear`` subclasses, so ``inject`` wraps them like any linear layer and
the adapter cores stay in full precision. Merging an adapter into a quantized weight is
refused by ``AdaptedLinear`` (non-floating weights); :func:`dequantize_model` first turns
every quantized layer back into a plain ``nn.Linear`` holding the dequantized weight, after
which merging is exact with respect to the model that was trained.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from sbora.adapters import AdaptedLinear
from sbora.adapters.inject import replace_module

QUANT_MODES = ("none", "int8", "nf4", "auto")
SKIP = ("lm_head",)  # the output head (often tied to the embeddings) stays in full precision


class Int8Linear(nn.Linear):
    """Weight-only int8 linear layer: int8 weight (d_out, d_in) and fp scale (d_out,)."""

    def __init__(self, linear: nn.Linear):
        nn.Module.__init__(self)  # skip nn.Linear.__init__: it would allocate and init a float weight
        self.in_features, self.out_features = linear.in_features, linear.out_features
        w = linear.weight.detach().float()  # (d_out, d_in)
        scale = (w.abs().amax(dim=1) / 127).clamp(min=torch.finfo(torch.float32).tiny)  # (d_out,)
        q = torch.round(w / scale[:, None]).clamp(-127, 127).to(torch.int8)
        self.weight = nn.Parameter(q, requires_grad=False)
        self.register_buffer("weight_scale", scale.to(linear.weight.dtype))
        self.bias = None if linear.bias is None else nn.Parameter(linear.bias.detach().clone(), requires_grad=False)

    def dequantize(self) -> torch.Tensor:
        return self.weight.to(self.weight_scale.dtype) * self.weight_scale[:, None]  # (d_out, d_in)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bias = None if self.bias is None else self.bias.to(x.dtype)
        return F.linear(x, self.dequantize().to(x.dtype), bias)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, int8"


def _bitsandbytes():
    try:
        import bitsandbytes
    except ImportError:
        raise ImportError("--quantize nf4 needs bitsandbytes: `pip install .[cuda]` (or `pip install bitsandbytes`), or use --quantize int8") from None
    return bitsandbytes


def _nf4_linear(linear: nn.Linear, compute_dtype: torch.dtype) -> nn.Module:
    bnb = _bitsandbytes()
    layer = bnb.nn.Linear4bit(
        linear.in_features, linear.out_features, bias=linear.bias is not None, compute_dtype=compute_dtype,
        quant_type="nf4", device="meta",
    )
    layer.weight = bnb.nn.Params4bit(linear.weight.detach().float(), requires_grad=False, quant_type="nf4")
    if linear.bias is not None:
        layer.bias = nn.Parameter(linear.bias.detach().clone(), requires_grad=False)
    return layer.to(linear.weight.device)  # bitsandbytes quantizes when the weight is moved to its device


def resolve_mode(mode: str) -> str:
    """``auto`` -> ``nf4`` where CUDA is present, else ``int8``; others pass through (checked)."""
    if mode not in QUANT_MODES:
        raise ValueError(f"unknown quantization '{mode}'; choose one of {', '.join(QUANT_MODES)}")
    if mode == "auto":
        return "nf4" if torch.cuda.is_available() else "int8"
    return mode


def quantize_model(model: nn.Module, mode: str, compute_dtype: torch.dtype = torch.float32) -> int:
    """Quantize every plain ``nn.Linear`` of `model` (not ``lm_head``) in place; returns how many.

    Call it before injecting adapters, with the model already on its device (bitsandbytes
    quantizes on the device the weight lives on). `compute_dtype` is nf4's matmul dtype.
    """
    mode = resolve_mode(mode)
    if mode == "none":
        return 0
    targets = [
        p for p, m in model.named_modules()
        if type(m) is nn.Linear and p.rpartition(".")[2] not in SKIP
    ]
    if any(isinstance(m, AdaptedLinear) for m in model.modules()):
        raise ValueError("quantize the base before injecting adapters: the adapters are trained on the quantized weights")
    for p in targets:
        linear = model.get_submodule(p)
        replace_module(model, p, Int8Linear(linear) if mode == "int8" else _nf4_linear(linear, compute_dtype))
    return len(targets)


def _dequantized(layer: nn.Module) -> nn.Linear | None:
    """A plain nn.Linear equal to quantized `layer`, or None if `layer` is not quantized."""
    if isinstance(layer, Int8Linear):
        weight = layer.dequantize()
    elif type(layer).__name__ == "Linear4bit":  # bitsandbytes, only ever imported when used
        weight = _bitsandbytes().functional.dequantize_4bit(layer.weight.data, layer.weight.quant_state)
    else:
        return None
    plain = nn.Linear(layer.in_features, layer.out_features, bias=layer.bias is not None, device="meta")
    plain.weight = nn.Parameter(weight.detach().clone(), requires_grad=False)
    if layer.bias is not None:
        plain.bias = nn.Parameter(layer.bias.detach().clone().to(weight.dtype), requires_grad=False)
    return plain


def dequantize_model(model: nn.Module) -> int:
    """Replace every quantized linear layer (also inside AdaptedLinear) by its dequantized nn.Linear; returns how many."""
    count = 0
    for path, module in list(model.named_modules()):
        plain = _dequantized(module)
        if plain is None:
            continue
        parent = model.get_submodule(path.rpartition(".")[0]) if "." in path else model
        if isinstance(parent, AdaptedLinear):
            parent.base_layer = plain
        else:
            replace_module(model, path, plain)
        count += 1
    return count


def is_quantized(model: nn.Module) -> bool:
    return any(isinstance(m, Int8Linear) or type(m).__name__ == "Linear4bit" for m in model.modules())
