"""Prompt-following probes of a pocket base: colour, side, shape, two objects, and room for concepts.

Each image probe asks for scenes whose answer can be read back from pixels, reads it, and scores
it against a control that isolates the one attribute (issue #27, docs/architecture.md §5):

``colour``       "a <colour> <shape> on a gray background": the asked colour is the dominant
                 chromatic colour of the image. Control: the same images scored for another colour.
``side``         "a <colour> <shape> on the <left|right>, on a gray background", both sides with
                 the same seed: the asked colour's pixels lie mostly in the asked half. A base
                 that ignores the side word draws one image twice and scores 50% (chance by
                 design). Control: the same images scored for the swapped side.
``shape``        "a <colour> <shape> on a gray background": the shape reader (nearest neighbours
                 among world renders of the six shapes, on the object's silhouette) names the asked
                 shape. Control: the same images scored for another shape (chance 1/6).
``two_objects``  "a <c1> <s1> on the left and a <c2> <s2> on the right, on a gray background" and
                 the same words with left and right swapped, same seed: both colours mostly in
                 their asked halves. Control: the same images scored for the swapped arrangement.
``slots``        at rank 16, how many disjoint slots every targeted layer of the UNet and the text
                 encoder holds, for each method with slots (the same check that refuses a slot).

The background is named in every prompt (plain gray, far from every object colour) so that a
drawn scene (grass is green, the sea is blue) cannot stand in for the object's colour.
Everything is read by plain pixel rules, never by a model being measured, and the readers are
checked on the world's own renders of the same asks (``render_drawer``: they score ~100% there).
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
import torch
from PIL import Image

from . import generator as g

CHROMATIC = ("red", "orange", "yellow", "green", "blue", "purple", "pink")  # white and black are too close to some backgrounds
BACKGROUND = "gray"  # the plain background every probe prompt names
TARGETS = {"colour": 0.90, "side": 0.85, "shape": 0.60, "two_objects": 0.60, "slots": 4}  # issue #27's bars
SLOT_RANK = 16  # the concept trainer's default rank
COLOUR_TOL = 55.0  # RGB distance of a pixel to a named colour (the generator's read-back tolerance)
MIN_PIXELS = 12  # fewer pixels of a colour than this: the colour is absent
SILHOUETTE_TOL = 70.0  # object pixels differ from the background by more (a shadow darkens gray by ~55)
SILHOUETTE_SIDE = 20  # silhouettes are compared at this many pixels a side
REFERENCE_SEED0 = 30_000_000  # the shape reader's renders (never a probe's seed)


@dataclass(frozen=True)
class Ask:
    """One image to draw: its prompt, its noise seed, and the objects asked, as (colour, shape, side); side '' when not asked."""

    prompt: str
    seed: int
    objects: tuple[tuple[str, str, str], ...]


Drawer = Callable[[Sequence[Ask]], list[Image.Image]]


def _phrase(colour: str, shape: str, side: str) -> str:
    return f"a {colour} {shape}" + (f" {g.POSITION_PHRASES[side]}" if side else "")


def _prompt(objects: tuple[tuple[str, str, str], ...]) -> str:
    return " and ".join(_phrase(*o) for o in objects) + ("," if any(o[2] for o in objects) else "") + f" on a {BACKGROUND} background"


def _ask(objects: tuple[tuple[str, str, str], ...], seed: int) -> Ask:
    return Ask(_prompt(objects), seed, objects)


# ----------------------------------------------------------------------------- the asks of each probe


def colour_asks(count: int, first_seed: int) -> list[Ask]:
    return [_ask(((CHROMATIC[k % 7], g.SHAPES[(k // 7) % 6], ""),), first_seed + k) for k in range(count)]


def shape_asks(count: int, first_seed: int) -> list[Ask]:
    return [_ask(((CHROMATIC[(k // 6) % 7], g.SHAPES[k % 6], ""),), first_seed + k) for k in range(count)]


def side_asks(count: int, first_seed: int) -> list[Ask]:
    """`count` images in pairs: image 2j asks for the left, 2j+1 for the right, same words otherwise and same seed."""
    out = []
    for j in range(count // 2):
        colour, shape = CHROMATIC[j % 7], g.SHAPES[(j // 7) % 6]
        out += [_ask(((colour, shape, side),), first_seed + j) for side in ("left", "right")]
    return out


def two_object_asks(count: int, first_seed: int) -> list[Ask]:
    """`count` images in pairs: "c1 s1 on the left and c2 s2 on the right", then the same with left and right swapped, same seed."""
    out = []
    for j in range(count // 2):
        (c1, s1), (c2, s2) = (CHROMATIC[j % 7], g.SHAPES[j % 6]), (CHROMATIC[(j + 3) % 7], g.SHAPES[(j + 2) % 6])
        out += [_ask(((c1, s1, a), (c2, s2, b)), first_seed + j) for a, b in (("left", "right"), ("right", "left"))]
    return out


# ----------------------------------------------------------------------------- reading pixels


def colour_counts(image: Image.Image) -> dict[str, int]:
    return {c: int(g.colour_mask(image, c, COLOUR_TOL).sum()) for c in CHROMATIC}


def dominant_colour(image: Image.Image) -> str | None:
    """The chromatic colour with the most pixels, None when none has MIN_PIXELS."""
    counts = colour_counts(image)
    best = max(counts, key=counts.get)
    return best if counts[best] >= MIN_PIXELS else None


def colour_half(image: Image.Image, colour: str) -> str | None:
    """The half (left/right) that holds most pixels of `colour`; None when it is absent or split evenly."""
    return g.colour_side(image, colour, COLOUR_TOL, MIN_PIXELS)


def silhouette(image: Image.Image) -> np.ndarray | None:
    """The object's silhouette on a plain background, cropped square and resized: (SIDE, SIDE) in [0, 1]; None if empty.

    The background colour is the median of the image's border; a pixel belongs to the object
    when it is further from it than SILHOUETTE_TOL. Rows and columns with a single such pixel
    (noise) do not widen the crop.
    """
    a = np.asarray(image.convert("RGB"), dtype=np.float32)
    border = np.concatenate([a[:2].reshape(-1, 3), a[-2:].reshape(-1, 3), a[:, :2].reshape(-1, 3), a[:, -2:].reshape(-1, 3)])
    mask = np.linalg.norm(a - np.median(border, axis=0), axis=-1) > SILHOUETTE_TOL
    rows, cols = np.flatnonzero(mask.sum(1) >= 2), np.flatnonzero(mask.sum(0) >= 2)
    if len(rows) < 3 or len(cols) < 3:
        return None
    y0, y1, x0, x1 = rows[0], rows[-1] + 1, cols[0], cols[-1] + 1
    side = max(y1 - y0, x1 - x0)
    square = np.zeros((side, side), dtype=np.uint8)
    oy, ox = (side - (y1 - y0)) // 2, (side - (x1 - x0)) // 2
    square[oy : oy + y1 - y0, ox : ox + x1 - x0] = mask[y0:y1, x0:x1] * 255
    small = Image.fromarray(square).resize((SILHOUETTE_SIDE, SILHOUETTE_SIDE), Image.BILINEAR)
    return np.asarray(small, dtype=np.float32) / 255


@lru_cache(maxsize=1)
def _shape_references(per_shape: int = 40) -> tuple[np.ndarray, tuple[str, ...]]:
    """Silhouettes of world renders of every shape (all colours, sizes and positions): the shape reader's memory."""
    feats, labels = [], []
    for i in range(per_shape):
        for k, shape in enumerate(g.SHAPES):
            seed = REFERENCE_SEED0 + i * len(g.SHAPES) + k
            rng = random.Random(seed)
            s = g.render(shape, CHROMATIC[rng.randrange(7)], rng.choice(g.POSITIONS), f"plain-{BACKGROUND}",
                         rng.choice(list(g.SIZES)), seed=seed)
            feats.append(silhouette(s.image).ravel())
            labels.append(shape)
    return np.stack(feats), tuple(labels)


def read_shape(image: Image.Image, k: int = 5) -> str | None:
    """The shape drawn: majority of the `k` nearest reference silhouettes (L2); None when nothing stands out of the background."""
    sil = silhouette(image)
    if sil is None:
        return None
    feats, labels = _shape_references()
    nearest = np.argsort(((feats - sil.ravel()) ** 2).sum(1))[:k]
    votes = [labels[i] for i in nearest]
    return max(votes, key=lambda s: (votes.count(s), -votes.index(s)))  # most votes; a tie goes to the nearer


# ----------------------------------------------------------------------------- scoring


def _summary(hits: list[bool], control: list[bool], control_what: str, asks: Sequence[Ask], **extra) -> dict:
    return {
        "rate": float(np.mean(hits)), "hits": int(sum(hits)), "images": len(hits),
        "control": {"rate": float(np.mean(control)), "hits": int(sum(control)), "what": control_what},
        "seeds": [asks[0].seed, asks[-1].seed], "example_prompt": asks[0].prompt, **extra,
    }


def score_colour(images: Sequence[Image.Image], asks: Sequence[Ask]) -> dict:
    dominant = [dominant_colour(im) for im in images]
    hits = [d == a.objects[0][0] for d, a in zip(dominant, asks)]
    other = [CHROMATIC[(CHROMATIC.index(a.objects[0][0]) + 1) % 7] for a in asks]
    control = [d == o for d, o in zip(dominant, other)]
    return _summary(hits, control, "the same images scored for another colour (the next of the seven)", asks,
                    chance=1 / len(CHROMATIC), prompt_form=f"a <colour> <shape> on a {BACKGROUND} background")


def score_side(images: Sequence[Image.Image], asks: Sequence[Ask]) -> dict:
    read = [colour_half(im, a.objects[0][0]) for im, a in zip(images, asks)]
    hits = [r == a.objects[0][2] for r, a in zip(read, asks)]
    control = [r == {"left": "right", "right": "left"}[a.objects[0][2]] for r, a in zip(read, asks)]
    both = [hits[i] and hits[i + 1] for i in range(0, len(hits) - 1, 2)]
    return _summary(hits, control, "the same images scored for the swapped side", asks, chance=0.5,
                    pairs=len(both), pairs_both_right=int(sum(both)),
                    prompt_form=f"a <colour> <shape> on the <left|right>, on a {BACKGROUND} background (both sides, same seed)")


def score_shape(images: Sequence[Image.Image], asks: Sequence[Ask]) -> dict:
    read = [read_shape(im) for im in images]
    hits = [r == a.objects[0][1] for r, a in zip(read, asks)]
    other = [g.SHAPES[(g.SHAPES.index(a.objects[0][1]) + 1) % 6] for a in asks]
    control = [r == o for r, o in zip(read, other)]
    return _summary(hits, control, "the same images scored for another shape (the next of the six)", asks,
                    chance=1 / len(g.SHAPES), reader="5 nearest silhouettes among 240 world renders of the six shapes",
                    prompt_form=f"a <colour> <shape> on a {BACKGROUND} background")


def _objects_in_halves(image: Image.Image, objects) -> bool:
    return all(colour_half(image, colour) == side for colour, _, side in objects)


def score_two_objects(images: Sequence[Image.Image], asks: Sequence[Ask]) -> dict:
    swap = {"left": "right", "right": "left"}
    hits = [_objects_in_halves(im, a.objects) for im, a in zip(images, asks)]
    control = [_objects_in_halves(im, [(c, s, swap[side]) for c, s, side in a.objects]) for im, a in zip(images, asks)]
    return _summary(hits, control, "the same images scored for the swapped arrangement", asks,
                    prompt_form=f"a <c1> <s1> on the left and a <c2> <s2> on the right, on a {BACKGROUND} background "
                                "(and left/right swapped, same seed)")


PROBES: dict[str, tuple[Callable[[int, int], list[Ask]], Callable[[Sequence[Image.Image], Sequence[Ask]], dict]]] = {
    "colour": (colour_asks, score_colour),
    "side": (side_asks, score_side),
    "shape": (shape_asks, score_shape),
    "two_objects": (two_object_asks, score_two_objects),
}


def run_probes(draw: Drawer, counts: dict[str, int], first_seed: int) -> dict[str, dict]:
    """Every image probe named in `counts` (probe -> images; pair probes round down to even), drawn by `draw`."""
    unknown = sorted(set(counts) - set(PROBES))
    if unknown:
        raise ValueError(f"unknown probe(s) {', '.join(unknown)}; known: {', '.join(PROBES)}")
    out = {}
    for name, count in counts.items():
        make, score = PROBES[name]
        asks = make(count, first_seed)
        if not asks:
            raise ValueError(f"probe {name}: {count} images is too few (pair probes need at least 2)")
        out[name] = score(draw(asks), asks)
    return out


# ----------------------------------------------------------------------------- drawers


def pipeline_drawer(pipe, steps: int = 20, guidance: float = 5.0, batch: int = 16) -> Drawer:
    """Draw asks with a StableDiffusionPipeline at 64x64 (each image from its own seeded generator)."""

    @torch.no_grad()
    def draw(asks: Sequence[Ask]) -> list[Image.Image]:
        images: list[Image.Image] = []
        for i in range(0, len(asks), batch):
            chunk = asks[i : i + batch]
            images += pipe([a.prompt for a in chunk], num_inference_steps=steps, guidance_scale=guidance, height=g.SIZE, width=g.SIZE,
                           generator=[torch.Generator().manual_seed(a.seed) for a in chunk], output_type="pil").images
        return images

    return draw


def render_drawer(asks: Sequence[Ask]) -> list[Image.Image]:
    """The world's own drawing of each ask (a side left open is drawn at a random position): what a perfect base would draw."""
    out = []
    for a in asks:
        rng = random.Random(a.seed)
        sprites = []
        for colour, shape, side in a.objects:
            spec = g.ObjectSpec(shape, colour, rng.choice(list(g.SIZES)), side or rng.choice(g.POSITIONS), rng.getrandbits(32))
            cx, cy, px = g.place(spec, rng)
            sprites.append((g.draw_object(spec, px), cx, cy))
        out.append(g.compose(f"plain-{BACKGROUND}", sprites, "photo", rng)[0])
    return out


# ----------------------------------------------------------------------------- room for concepts


def slot_room(unet, text_encoder, rank: int = SLOT_RANK, cap: int = 16) -> dict:
    """Disjoint slots at `rank` that fit every targeted layer, per method with slots and model part (counted up to `cap`).

    Uses the adapters' own slot check (the one that refuses a slot that does not fit): ``concepts``
    is the least over methods and parts, ``limit`` the refusal that ends the smallest count.
    """
    from sbora.adapters import METHOD_SPECS, AdapterConfig
    from sbora.adapters.inject import build_cores
    from sbora.configuration import ConfigError

    parts = {"unet": (unet, ["sd-unet"]), "text_encoder": (text_encoder, ["clip-text"])}
    counts: dict[str, dict[str, int]] = {}
    limit, least = None, math.inf
    for method, spec in METHOD_SPECS.items():
        if not spec.composable or spec.base is not None:
            continue
        for part, (model, targets) in parts.items():
            fits, why = 0, None
            while fits < cap:
                try:
                    build_cores(model, AdapterConfig(method=method, rank=rank, slot=fits, targets=targets))
                except ConfigError as e:
                    why = str(e)
                    break
                fits += 1
            counts.setdefault(method, {})[part] = fits
            if fits < least:
                least, limit = fits, why
    return {"rank": rank, "per_method": counts, "concepts": int(least), "limit": limit, "counted_up_to": cap}


def unmet_targets(found: dict) -> list[str]:
    """The targets (``TARGETS``) that a measurement {"probes": run_probes(...), "slots": slot_room(...)} misses, by name."""
    unmet = [name for name, result in found["probes"].items() if result["rate"] < TARGETS[name]]
    return unmet + (["slots"] if found["slots"]["concepts"] < TARGETS["slots"] else [])


# ----------------------------------------------------------------------------- consistency with a record


def binomial_consistent(hits: int, n: int, p: float, alpha: float = 0.001) -> bool:
    """Whether `hits` of `n` lies inside the central (1 - alpha) range of Binomial(n, p) (exact tails).

    A recomputed small measurement agrees with a recorded rate p when it does; a record that
    overstates (or understates) the rate is caught once n is large enough to tell.
    """
    pmf = [math.comb(n, k) * p**k * (1 - p) ** (n - k) for k in range(n + 1)]
    return sum(pmf[:hits]) < 1 - alpha / 2 and sum(pmf[hits + 1 :]) < 1 - alpha / 2
