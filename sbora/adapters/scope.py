"""Call-scoped adapter selection: which adapters a forward pass uses, without touching the model.

    with active_adapters(pipe.unet, {"dog": 0.8, "cat": 1.0}):
        pipe.unet(...)          # every AdaptedLinear runs exactly dog at 0.8 and cat at 1.0

The selection lives in a ``contextvars.ContextVar`` that ``AdaptedLinear.forward`` reads, so
it belongs to the calling thread (or asyncio task) alone: two threads can run one shared
model with different selections at the same time, and a regional attention processor can
run concept A for one region and concept B for another inside one forward pass (nested
scopes: the innermost wins). Outside any scope the layers' own switches apply
(``set_adapter_enabled`` / ``set_adapter_weight``), as before. peft passes ``adapter_names``
per call for the same reason.

A merged adapter is part of the base weights and cannot be switched per call: a scope that
leaves it out, or gives it another weight, is refused.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping
from contextvars import ContextVar
from types import MappingProxyType

_SELECTION: ContextVar[Mapping[str, float] | None] = ContextVar("sbora_active_adapters", default=None)


def current_selection() -> Mapping[str, float] | None:
    """The innermost scope's {adapter: weight}, or None outside any scope."""
    return _SELECTION.get()


@contextlib.contextmanager
def selection_scope(selection: Mapping[str, float]) -> Iterator[None]:
    """Set the selection for the block (unchecked; ``inject.active_adapters`` checks names first)."""
    token = _SELECTION.set(MappingProxyType({n: float(w) for n, w in selection.items()}))
    try:
        yield
    finally:
        _SELECTION.reset(token)
