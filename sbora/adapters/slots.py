"""Slot layouts of adapter files: which share of a layer's index space (or ortho basis) each adapter
holds, and whether two adapters of one layer can write the same columns/rows (the slot check of
compositions, the app's slot proposals). A method's slot side and index layouts come from the
registry (``registry.METHOD_SPECS``): its positions k·r…(k+1)·r−1 index the layer's permutation
(SBoRA: ``base.layout_permutation``) or ortho's basis columns (the same for every layout).
"""

from __future__ import annotations

from dataclasses import dataclass

from .config import LAYOUTS
from .registry import METHOD_SPECS


@dataclass(frozen=True)
class SlotLayout:
    """Which share of a layer's index space (or ortho basis) an adapter holds: enough to tell,
    without any tensor, whether two adapters of one layer can write the same columns/rows."""

    source: str  # the file (or name) it belongs to, for messages
    method: str
    rank: int
    slot: int
    seed: int
    layout: str
    modules: frozenset = frozenset()  # the module paths it adapts (empty: unknown, assumed shared)

    @property
    def space(self) -> str | None:
        """What its slots partition: None for methods without slots (LoRA, DiffLoRA, ...)."""
        spec = METHOD_SPECS.get(self.method)
        return spec.slot_space if spec else None

    @property
    def positions(self) -> range:
        return range(self.slot * self.rank, (self.slot + 1) * self.rank)

    def describe(self) -> str:
        layout = f", layout {self.layout} (v{LAYOUTS[self.layout]})" if _has_layouts(self.method) else ""
        return f"{self.method} rank {self.rank} slot {self.slot}, seed {self.seed}{layout}"


def _has_layouts(method: str) -> bool:
    """Whether `method`'s indices depend on the index layout (SBoRA's permutations; ortho's basis columns do not)."""
    spec = METHOD_SPECS.get(method)
    return bool(spec and spec.layouts)


def free_slot(rank: int, taken: list[range]) -> int:
    """The smallest slot k whose positions k·r…(k+1)·r−1 meet none of `taken`."""
    k = 0
    while any(k * rank < t.stop and t.start < (k + 1) * rank for t in taken):
        k += 1
    return k


def slot_clash(a: SlotLayout, b: SlotLayout, others: list[SlotLayout] = ()) -> str | None:
    """Why `a` and `b` (one layer's adapters) may write the same columns/rows, and what to retrain `b` with; None if they cannot.

    They clash when they are of one method with slots (same side), one seed, share a module,
    and either their layouts differ (SBoRA: unrelated index sets) or their positions
    intersect (slot k at rank r holds positions k·r…(k+1)·r−1, so equal ranks in different
    slots never meet, but a rank-4 slot 1 lies inside a rank-8 slot 0). Different seeds or
    methods are not slots of one partition: ``adapters.overlap`` measures those.
    """
    if a.space is None or a.method != b.method or a.seed != b.seed or (a.modules and b.modules and not a.modules & b.modules):
        return None
    taken = [x.positions for x in (a, *others) if x.method == b.method and x.seed == b.seed and x.layout == b.layout]
    if _has_layouts(b.method) and a.layout != b.layout:
        why = (f"their {a.space} come from different index layouts ({a.layout} v{LAYOUTS[a.layout]} and {b.layout} "
               f"v{LAYOUTS[b.layout]}), so they share some at random")
        same = [x.positions for x in (a, *others) if x.method == b.method and x.seed == b.seed and x.layout == a.layout]
        fix = (f"retrain {b.source} with --layout {a.layout} --slot {free_slot(b.rank, same)} (rank {b.rank}), "
               f"or retrain {a.source} with --layout {b.layout}")
    else:
        shared = range(max(a.positions.start, b.positions.start), min(a.positions.stop, b.positions.stop))
        if not shared:
            return None
        why = (f"slot k at rank r holds positions k·r…(k+1)·r−1 of each layer's {a.space}, so {a.positions.start}…"
               f"{a.positions.stop - 1} and {b.positions.start}…{b.positions.stop - 1} share {len(shared)} per layer")
        fix = f"retrain {b.source} with --slot {free_slot(b.rank, taken)} (rank {b.rank})"
        if a.rank != b.rank:
            fix += f", or with --rank {a.rank} --slot {free_slot(a.rank, taken)}"
    return f"{a.source} ({a.describe()}) and {b.source} ({b.describe()}) would write the same {a.space}: {why}; {fix}"


def slot_clashes(loaded: list[SlotLayout], new: list[SlotLayout]) -> list[str]:
    """Every clash (``slot_clash``) between the adapters `new` and the `loaded` ones, one message each."""
    return [m for b in new for a in loaded if (m := slot_clash(a, b, loaded)) is not None]
