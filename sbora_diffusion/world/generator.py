"""The pocket world: seeded procedural 64x64 RGB scenes of one or two objects, with captions.

Vocabulary (every word below is a word the pocket base and the pocket CLIP were trained on):

- nouns: geometric shapes (``SHAPES``: circle, square, triangle, star, heart, diamond) and
  object classes drawn as random procedural designs (``CLASSES``: toy, ball, flag, badge); a
  class object is a new design every time (a toy figurine with random body, head, eyes and
  limbs; a ball with a random pattern; a striped flag; a badge with a symbol), so the world
  knows the class words that held-out concepts use without ever showing those concepts;
- colours (``COLOURS``) of the object (a class object's main colour);
- sizes: ``small`` and ``big`` (medium objects are never named);
- positions: ``on the left``, ``on the right``, ``in the center`` for one object, left and
  right for two;
- backgrounds: scenes (``on the beach``, ``in the snow``, ``on the grass``, ``on a wooden
  table``) and plain colours (``on a blue background``);
- styles: photos (optionally prefixed "a photo of") and paintings ("a painting of": brush
  strokes and a wooden frame).

Captions come in short and long forms drawn at random ("a red circle", "a red circle on the
left", "a photo of a small red circle on the left, on the beach", "a red circle on the left
and a blue square on the right, on a green background"), so the base answers short prompts
as well as long ones. ``caption(meta, form="long")`` rebuilds the full caption of a sample
from its metadata (every attribute named).

Everything is drawn from ``random.Random(seed)``: the same seed gives the same image,
caption and metadata on every machine (PIL drawing only, no numpy randomness). Images are
drawn at twice the size and box-filtered down to 64x64 (anti-aliased edges).
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

SIZE = 64  # final image side
SCALE = 2  # drawn at SCALE*SIZE, then box-filtered down
CANVAS = SIZE * SCALE

# Object colours: name -> RGB. Every one is far (RGB distance) from every other.
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (215, 35, 35),
    "orange": (245, 135, 20),
    "yellow": (245, 215, 35),
    "green": (35, 165, 60),
    "blue": (35, 75, 215),
    "purple": (135, 50, 185),
    "pink": (245, 125, 195),
    "white": (248, 248, 248),
    "black": (25, 25, 25),
}
SHAPES = ("circle", "square", "triangle", "star", "heart", "diamond")
CLASSES = ("toy", "ball", "flag", "badge")
NOUNS = SHAPES + CLASSES
SIZES = {"small": (14, 18), "medium": (20, 26), "big": (29, 35)}  # object side in final pixels
POSITIONS = ("left", "right", "center")
POSITION_PHRASES = {"left": "on the left", "right": "on the right", "center": "in the center"}

# Backgrounds: scenes (drawn regions, named in words) and plain colours.
SCENES = {"beach": "on the beach", "snow": "in the snow", "grass": "on the grass", "table": "on a wooden table"}
PLAIN = {"white": (236, 236, 236), "gray": (128, 128, 128), "black": (20, 20, 24), "green": (95, 175, 110),
         "blue": (95, 140, 225), "yellow": (235, 215, 120), "pink": (240, 195, 215)}
BACKGROUNDS = tuple(SCENES) + tuple(f"plain-{c}" for c in PLAIN)
STYLES = ("photo", "painting")

# Colours a scene is made of (for the "is the object visible on it" rule).
SCENE_COLOURS = {
    "beach": [(150, 200, 240), (40, 120, 180), (232, 212, 165)],
    "snow": [(200, 215, 235), (242, 245, 250)],
    "grass": [(150, 200, 240), (75, 150, 55)],
    "table": [(225, 215, 195), (150, 100, 60)],
}
MIN_CONTRAST = 90  # an object colour must be at least this far (RGB distance) from every colour of its background


def background_colours(background: str) -> list[tuple[int, int, int]]:
    if background.startswith("plain-"):
        return [PLAIN[background[6:]]]
    return SCENE_COLOURS[background]


def _dist(a, b) -> float:
    return math.sqrt(sum((x - y) ** 2 for x, y in zip(a, b)))


def visible_on(colour: str, background: str) -> bool:
    """Whether an object of `colour` stands out on `background` (and is not its namesake)."""
    if background == f"plain-{colour}":
        return False
    return all(_dist(COLOURS[colour], c) >= MIN_CONTRAST for c in background_colours(background))


def shade(rgb, f: float) -> tuple[int, int, int]:
    """Darken (f < 1) or lighten towards white (f > 1)."""
    if f <= 1:
        return tuple(int(c * f) for c in rgb)
    return tuple(int(c + (255 - c) * (f - 1)) for c in rgb)


def outline_of(rgb) -> tuple[int, int, int]:
    return (90, 90, 90) if sum(rgb) < 150 else shade(rgb, 0.55)


# ----------------------------------------------------------------------------- objects


@dataclass
class ObjectSpec:
    """One object: what it is (noun, colour) and its design (for class objects: a seed of the random design)."""

    noun: str
    colour: str
    size: str = "medium"  # small / medium / big
    position: str = "left"  # left / right / center
    design: int = 0  # seed of a class object's random design (and a shape's small tilt)


def _rgba(side: int) -> tuple[Image.Image, ImageDraw.ImageDraw]:
    im = Image.new("RGBA", (side, side), (0, 0, 0, 0))
    return im, ImageDraw.Draw(im)


def _star_points(cx, cy, r_out, r_in, n=5, rot=-math.pi / 2):
    pts = []
    for k in range(2 * n):
        r = r_out if k % 2 == 0 else r_in
        a = rot + k * math.pi / n
        pts.append((cx + r * math.cos(a), cy + r * math.sin(a)))
    return pts


def _heart_points(cx, cy, r, n=40):
    pts = []
    for k in range(n):
        t = 2 * math.pi * k / n
        x = 16 * math.sin(t) ** 3
        y = -(13 * math.cos(t) - 5 * math.cos(2 * t) - 2 * math.cos(3 * t) - math.cos(4 * t))
        pts.append((cx + r * x / 17, cy + r * (y + 2) / 17))
    return pts


def draw_shape(shape: str, rgb, side: int, width: int | None = None) -> Image.Image:
    """A filled geometric shape with a darker outline on a transparent `side`x`side` square."""
    im, d = _rgba(side)
    w = width if width is not None else max(1, side // 14)
    out = outline_of(rgb) + (255,)
    fill = tuple(rgb) + (255,)
    m = w  # margin so the outline stays inside
    c = side / 2
    if shape == "circle":
        d.ellipse([m, m, side - 1 - m, side - 1 - m], fill=fill, outline=out, width=w)
    elif shape == "square":
        k = side * 0.1
        d.rectangle([m + k, m + k, side - 1 - m - k, side - 1 - m - k], fill=fill, outline=out, width=w)
    elif shape == "triangle":
        d.polygon([(c, m), (side - 1 - m, side - 1 - m * 2), (m, side - 1 - m * 2)], fill=fill, outline=out, width=w)
    elif shape == "star":
        d.polygon(_star_points(c, c + side * 0.04, c - m, (c - m) * 0.45), fill=fill, outline=out, width=w)
    elif shape == "heart":
        d.polygon(_heart_points(c, c, c - m), fill=fill, outline=out, width=w)
    elif shape == "diamond":
        d.polygon([(c, m), (side - 1 - m * 1.6, c), (c, side - 1 - m), (m * 1.6, c)], fill=fill, outline=out, width=w)
    else:
        raise ValueError(f"unknown shape {shape!r}; known: {', '.join(SHAPES)}")
    return im


def _accent(rng: random.Random, main: str, exclude: tuple[str, ...] = (), accents: Sequence[tuple[int, int, int]] = ()) -> tuple[int, int, int]:
    """A second colour: one of `accents` when given (a colour-matched design), else any other named colour."""
    if accents:
        return tuple(rng.choice(list(accents)))
    names = [c for c in COLOURS if c != main and c not in exclude]
    return COLOURS[rng.choice(names)]


def draw_toy(rgb, side: int, rng: random.Random, main: str = "", accents: Sequence = ()) -> Image.Image:
    """A random toy figurine: body, head, eyes, optional ears, arms, legs or wheels (never an antenna).

    The main colour covers body and head; limbs are a darker shade or an accent colour. Eyes
    are white with black pupils or plain black dots (never yellow).
    """
    im, d = _rgba(side)
    s = side / 100
    dark = shade(rgb, 0.6) + (255,)
    fill = tuple(rgb) + (255,)
    out = outline_of(rgb) + (255,)
    limb = dark if rng.random() < 0.6 else _accent(rng, main, ("white",), accents) + (255,)
    w = max(1, int(2 * s))
    bw = rng.uniform(30, 46)  # body half-width
    body_top, body_bot = rng.uniform(46, 54), rng.uniform(78, 84)
    body_kind = rng.choice(["rect", "round", "ellipse"])
    box = [(50 - bw / 1.5) * s, body_top * s, (50 + bw / 1.5) * s, body_bot * s]
    if rng.random() < 0.7:  # arms
        ay = body_top + 3
        d.rectangle([(50 - bw / 1.5 - 9) * s, ay * s, (50 - bw / 1.5 + 1) * s, (ay + 20) * s], fill=limb)
        d.rectangle([(50 + bw / 1.5 - 1) * s, ay * s, (50 + bw / 1.5 + 9) * s, (ay + 20) * s], fill=limb)
    if rng.random() < 0.7:  # legs
        for x in (40, 60):
            d.rectangle([(x - 6) * s, (body_bot - 2) * s, (x + 6) * s, 97 * s], fill=limb)
    else:  # wheels
        for x in (36, 64):
            d.ellipse([(x - 8) * s, (body_bot - 6) * s, (x + 8) * s, (body_bot + 10) * s], fill=(40, 40, 40, 255))
    if body_kind == "rect":
        d.rectangle(box, fill=fill, outline=out, width=w)
    elif body_kind == "round":
        d.rounded_rectangle(box, radius=8 * s, fill=fill, outline=out, width=w)
    else:
        d.ellipse(box, fill=fill, outline=out, width=w)
    hw = rng.uniform(14, 20)  # head half-width
    head_top = body_top - 2 * hw + 2
    head = [(50 - hw) * s, head_top * s, (50 + hw) * s, (body_top + 2) * s]
    ears = rng.choice(["none", "round", "pointed"])
    if ears == "round":
        for x in (50 - hw, 50 + hw):
            d.ellipse([(x - 6) * s, (head_top - 4) * s, (x + 6) * s, (head_top + 8) * s], fill=fill, outline=out, width=w)
    elif ears == "pointed":
        for sgn in (-1, 1):
            x = 50 + sgn * hw * 0.7
            d.polygon([((x - 6) * s, (head_top + 4) * s), ((x + 6) * s, (head_top + 4) * s), (x * s, (head_top - 9) * s)], fill=fill, outline=out)
    if rng.random() < 0.5:
        d.ellipse(head, fill=fill, outline=out, width=w)
    else:
        d.rounded_rectangle(head, radius=rng.uniform(0, 6) * s, fill=fill, outline=out, width=w)
    ey = head_top + hw * rng.uniform(0.75, 1.05)
    er = rng.uniform(3, 5)
    for x in (50 - hw * 0.45, 50 + hw * 0.45):
        if rng.random() < 0.5 and sum(rgb) > 150:
            d.ellipse([(x - er) * s, (ey - er) * s, (x + er) * s, (ey + er) * s], fill=(250, 250, 250, 255))
            d.ellipse([(x - er / 2) * s, (ey - er / 2) * s, (x + er / 2) * s, (ey + er / 2) * s], fill=(10, 10, 10, 255))
        else:
            eye = (10, 10, 10, 255) if sum(rgb) > 150 else (250, 250, 250, 255)
            d.ellipse([(x - er / 1.5) * s, (ey - er / 1.5) * s, (x + er / 1.5) * s, (ey + er / 1.5) * s], fill=eye)
    if rng.random() < 0.5:  # mouth
        my = ey + hw * 0.45
        d.line([(50 - hw * 0.3) * s, my * s, (50 + hw * 0.3) * s, my * s], fill=(20, 20, 20, 255), width=w)
    return im


def draw_ball(rgb, side: int, rng: random.Random, main: str = "", accents: Sequence = ()) -> Image.Image:
    """A ball with a random pattern: plain with a highlight, one or two stripes, or dots (never wedges)."""
    im, d = _rgba(side)
    m = max(1, side // 16)
    fill = tuple(rgb) + (255,)
    out = outline_of(rgb) + (255,)
    d.ellipse([m, m, side - 1 - m, side - 1 - m], fill=fill)
    acc = _accent(rng, main, accents=accents) + (255,)
    kind = rng.choice(["plain", "stripe", "stripes", "dots"])
    mask = Image.new("L", (side, side), 0)
    ImageDraw.Draw(mask).ellipse([m, m, side - 1 - m, side - 1 - m], fill=255)
    pat, pd = _rgba(side)
    if kind == "stripe":
        h = side * rng.uniform(0.12, 0.2)
        pd.rectangle([0, side / 2 - h / 2, side, side / 2 + h / 2], fill=acc)
    elif kind == "stripes":
        h = side * 0.1
        for y in (0.33, 0.67):
            pd.rectangle([0, side * y - h / 2, side, side * y + h / 2], fill=acc)
    elif kind == "dots":
        r = side * 0.07
        for _ in range(rng.randint(4, 7)):
            x, y = rng.uniform(0.2, 0.8) * side, rng.uniform(0.2, 0.8) * side
            pd.ellipse([x - r, y - r, x + r, y + r], fill=acc)
    pat.putalpha(Image.fromarray(np.minimum(np.asarray(pat.getchannel("A")), np.asarray(mask))))
    im.alpha_composite(pat)
    d = ImageDraw.Draw(im)
    d.ellipse([m, m, side - 1 - m, side - 1 - m], outline=out, width=max(1, side // 16))
    hl = side * 0.1
    d.ellipse([side * 0.3 - hl, side * 0.3 - hl, side * 0.3 + hl, side * 0.3 + hl], fill=shade(rgb, 1.5) + (255,))
    return im


def draw_flag(rgb, side: int, rng: random.Random, main: str = "", accents: Sequence = ()) -> Image.Image:
    """A flag on a pole: two or three stripes (horizontal or vertical), or a plain field with a disc (never checkered)."""
    im, d = _rgba(side)
    s = side / 100
    pole = (120, 90, 60, 255) if rng.random() < 0.5 else (150, 150, 150, 255)
    d.rectangle([8 * s, 4 * s, 14 * s, 98 * s], fill=pole)
    x0, y0, x1, y1 = 14 * s, 8 * s, 96 * s, rng.uniform(58, 70) * s
    fill = tuple(rgb) + (255,)
    d.rectangle([x0, y0, x1, y1], fill=fill)
    acc = _accent(rng, main, accents=accents) + (255,)
    kind = rng.choice(["h2", "h3", "v3", "disc"])
    if kind == "h2":
        d.rectangle([x0, (y0 + y1) / 2, x1, y1], fill=acc)
    elif kind == "h3":
        d.rectangle([x0, y0 + (y1 - y0) / 3, x1, y0 + 2 * (y1 - y0) / 3], fill=acc)
    elif kind == "v3":
        d.rectangle([x0 + (x1 - x0) / 3, y0, x0 + 2 * (x1 - x0) / 3, y1], fill=acc)
    else:
        cx, cy, r = (x0 + x1) / 2, (y0 + y1) / 2, (y1 - y0) * 0.3
        d.ellipse([cx - r, cy - r, cx + r, cy + r], fill=acc)
    d.rectangle([x0, y0, x1, y1], outline=outline_of(rgb) + (255,), width=max(1, int(2 * s)))
    return im


def draw_badge(rgb, side: int, rng: random.Random, main: str = "", accents: Sequence = ()) -> Image.Image:
    """A badge: a disc, shield or hexagon with a border and a simple symbol (circle, star, square; never a bolt)."""
    im, d = _rgba(side)
    s = side / 100
    fill = tuple(rgb) + (255,)
    border = _accent(rng, main, accents=accents) + (255,)
    w = max(2, int(7 * s))
    kind = rng.choice(["disc", "shield", "hexagon"])
    if kind == "disc":
        d.ellipse([4 * s, 4 * s, 96 * s, 96 * s], fill=fill, outline=border, width=w)
    elif kind == "shield":
        pts = [(10 * s, 6 * s), (90 * s, 6 * s), (90 * s, 50 * s), (50 * s, 96 * s), (10 * s, 50 * s)]
        d.polygon(pts, fill=fill, outline=border, width=w)
    else:
        pts = [(50 * s + 46 * s * math.cos(a), 50 * s + 46 * s * math.sin(a)) for a in [math.pi / 6 + k * math.pi / 3 for k in range(6)]]
        d.polygon(pts, fill=fill, outline=border, width=w)
    sym = rng.choice(["circle", "star", "square"])
    sc = border
    if sym == "circle":
        d.ellipse([36 * s, 34 * s, 64 * s, 62 * s], fill=sc)
    elif sym == "star":
        d.polygon(_star_points(50 * s, 48 * s, 18 * s, 8 * s), fill=sc)
    else:
        d.rectangle([38 * s, 36 * s, 62 * s, 60 * s], fill=sc)
    return im


CLASS_DRAWERS: dict[str, Callable] = {"toy": draw_toy, "ball": draw_ball, "flag": draw_flag, "badge": draw_badge}


def draw_object(spec: ObjectSpec, side: int) -> Image.Image:
    """The RGBA sprite of an object at `side` canvas pixels (its design from ``spec.design``)."""
    rgb = COLOURS[spec.colour]
    rng = random.Random(spec.design)
    if spec.noun in SHAPES:
        im = draw_shape(spec.noun, rgb, side)
        tilt = rng.uniform(-15, 15) if spec.noun not in ("circle",) else 0.0
    elif spec.noun in CLASS_DRAWERS:
        im = CLASS_DRAWERS[spec.noun](rgb, side, rng, spec.colour)
        tilt = rng.uniform(-10, 10)
    else:
        raise ValueError(f"unknown noun {spec.noun!r}; known: {', '.join(NOUNS)}")
    return im.rotate(tilt, resample=Image.BICUBIC) if tilt else im


# ----------------------------------------------------------------------------- backgrounds


def draw_background(background: str, rng: random.Random) -> Image.Image:
    """A CANVAS x CANVAS RGB background: a scene with a little texture, or a plain colour."""
    n = CANVAS
    if background.startswith("plain-"):
        return Image.new("RGB", (n, n), PLAIN[background[6:]])
    im = Image.new("RGB", (n, n))
    d = ImageDraw.Draw(im)
    if background == "beach":
        sky, sea, sand = SCENE_COLOURS["beach"]
        h1, h2 = rng.randint(int(n * 0.3), int(n * 0.42)), 0
        h2 = h1 + rng.randint(int(n * 0.1), int(n * 0.16))
        d.rectangle([0, 0, n, h1], fill=sky)
        d.rectangle([0, h1, n, h2], fill=sea)
        d.rectangle([0, h2, n, n], fill=sand)
        for _ in range(3):  # wave crests
            y = rng.randint(h1 + 2, h2 - 2)
            x = rng.randint(0, n)
            d.line([x, y, x + rng.randint(10, 30), y], fill=(200, 225, 240), width=2)
        for _ in range(60):  # sand grains
            x, y = rng.randint(0, n), rng.randint(h2, n)
            d.point((x, y), fill=shade(sand, 0.85))
    elif background == "snow":
        sky, snow = SCENE_COLOURS["snow"]
        h = rng.randint(int(n * 0.35), int(n * 0.5))
        d.rectangle([0, 0, n, n], fill=sky)
        pts = [(0, n)] + [(x, h + int(6 * math.sin(x / 13 + rng.random()))) for x in range(0, n + 8, 8)] + [(n, n)]
        d.polygon(pts, fill=snow)
        for _ in range(25):  # snowflakes
            x, y = rng.randint(0, n), rng.randint(0, h)
            d.ellipse([x - 1, y - 1, x + 1, y + 1], fill=(250, 250, 255))
    elif background == "grass":
        sky, grass = SCENE_COLOURS["grass"]
        h = rng.randint(int(n * 0.3), int(n * 0.45))
        d.rectangle([0, 0, n, h], fill=sky)
        d.rectangle([0, h, n, n], fill=grass)
        for _ in range(90):  # blades
            x, y = rng.randint(0, n), rng.randint(h, n)
            d.line([x, y, x + rng.randint(-2, 2), y - rng.randint(3, 7)], fill=shade(grass, rng.uniform(0.75, 1.2)), width=1)
    elif background == "table":
        wall, wood = SCENE_COLOURS["table"]
        h = rng.randint(int(n * 0.25), int(n * 0.4))
        d.rectangle([0, 0, n, h], fill=wall)
        d.rectangle([0, h, n, n], fill=wood)
        for _ in range(9):  # grain
            y = rng.randint(h + 3, n)
            d.line([0, y, n, y + rng.randint(-3, 3)], fill=shade(wood, 0.8), width=1)
        d.line([0, h, n, h], fill=shade(wood, 0.6), width=2)
    else:
        raise ValueError(f"unknown background {background!r}; known: {', '.join(BACKGROUNDS)}")
    return im


def paint(im: Image.Image, rng: random.Random) -> Image.Image:
    """The painting style: short brush strokes in the picture's own colours, inside a wooden frame."""
    n = im.width
    px = im.load()
    out = im.copy()
    d = ImageDraw.Draw(out)
    angle = rng.uniform(0, math.pi)
    for _ in range(450):
        x, y = rng.randrange(n), rng.randrange(n)
        r, g, b = px[x, y]
        j = rng.randint(-14, 14)
        col = (max(0, min(255, r + j)), max(0, min(255, g + j)), max(0, min(255, b + j)))
        a = angle + rng.uniform(-0.4, 0.4)
        ln = rng.uniform(1.5, 3.5)
        d.line([x - ln * math.cos(a), y - ln * math.sin(a), x + ln * math.cos(a), y + ln * math.sin(a)], fill=col, width=2)
    f = 7  # frame width at canvas scale
    d.rectangle([0, 0, n - 1, n - 1], outline=(150, 100, 40), width=f)
    d.rectangle([f - 1, f - 1, n - f, n - f], outline=(90, 55, 20), width=2)
    return out


# ----------------------------------------------------------------------------- scenes


@dataclass
class Sample:
    """One world image with its caption and what was drawn."""

    image: Image.Image  # 64x64 RGB
    caption: str
    objects: list[ObjectSpec]
    background: str
    style: str
    boxes: list[tuple[int, int, int, int]] = field(default_factory=list)  # (x0, y0, x1, y1) per object, final pixels
    seed: int | None = None

    @property
    def meta(self) -> dict:
        return {
            "caption": self.caption, "background": self.background, "style": self.style, "seed": self.seed,
            "objects": [vars(o) | {"box": list(b)} for o, b in zip(self.objects, self.boxes)],
        }


def place(spec: ObjectSpec, rng: random.Random) -> tuple[int, int, int]:
    """(centre x, centre y, side) in canvas pixels for an object of this size and position."""
    lo, hi = SIZES[spec.size]
    side = rng.randint(lo, hi) * SCALE
    half = side // 2
    if spec.position == "center":
        cx = CANVAS // 2 + rng.randint(-3, 3) * SCALE
    else:
        # left objects keep their centre in the left third-ish, clear of the middle
        edge_lo, edge_hi = half + 1 * SCALE, CANVAS // 2 - max(half // 2, 5 * SCALE)
        cx = rng.randint(edge_lo, max(edge_lo, edge_hi))
        if spec.position == "right":
            cx = CANVAS - cx
    cy_lo, cy_hi = max(half + 2 * SCALE, int(CANVAS * 0.35)), min(CANVAS - half - 2 * SCALE, int(CANVAS * 0.7))
    cy = rng.randint(min(cy_lo, cy_hi), max(cy_lo, cy_hi))
    return cx, cy, side


def compose(
    background: str, sprites: list[tuple[Image.Image, int, int]], style: str, rng: random.Random
) -> tuple[Image.Image, list[tuple[int, int, int, int]]]:
    """Paste RGBA sprites (sprite, centre x, centre y in canvas pixels) on a background; 64x64 RGB out.

    Returns the image and each sprite's box in final pixels. Used for world scenes and for
    the held-out concepts alike (same backgrounds, same painting style).
    """
    im = draw_background(background, rng)
    boxes = []
    for sprite, cx, cy in sprites:
        x0, y0 = cx - sprite.width // 2, cy - sprite.height // 2
        shadow = Image.new("RGBA", sprite.size, (0, 0, 0, 0))
        shadow.putalpha(sprite.getchannel("A").point(lambda a: a * 0.25))
        im.paste(shadow.filter(ImageFilter.GaussianBlur(2)), (x0 + 2, y0 + 3), shadow.filter(ImageFilter.GaussianBlur(2)))
        im.paste(sprite, (x0, y0), sprite)
        bbox = sprite.getchannel("A").getbbox() or (0, 0, 0, 0)
        boxes.append(tuple(int(v) // SCALE for v in (x0 + bbox[0], y0 + bbox[1], x0 + bbox[2], y0 + bbox[3])))
    if style == "painting":
        im = paint(im, rng)
    return im.resize((SIZE, SIZE), Image.BOX), boxes


def _noun_phrase(o: ObjectSpec, rng: random.Random | None, article: bool = True, with_size: bool = True, with_colour: bool = True) -> str:
    words = []
    if with_size and o.size != "medium":
        words.append(o.size)
    if with_colour:
        words.append(o.colour)
    words.append(o.noun)
    phrase = " ".join(words)
    return (("an " if phrase[0] in "aeiou" else "a ") + phrase) if article else phrase


def background_phrase(background: str) -> str:
    """How captions name a background: "on the beach", "on a blue background"."""
    return SCENES[background] if background in SCENES else f"on a {background[6:]} background"


def caption(sample_or_meta, form: str = "long", rng: random.Random | None = None) -> str:
    """A caption of a sample. ``long``: every attribute named (deterministic). ``random``: the
    generator's mix of short and long forms (needs `rng`). ``short``: noun phrase(s) and positions."""
    if isinstance(sample_or_meta, Sample):
        objects, background, style = sample_or_meta.objects, sample_or_meta.background, sample_or_meta.style
    else:
        objects = [ObjectSpec(**{k: v for k, v in o.items() if k != "box"}) for o in sample_or_meta["objects"]]
        background, style = sample_or_meta["background"], sample_or_meta["style"]
    bg_phrase = background_phrase(background)
    if form == "long":
        if len(objects) == 1:
            body = f"{_noun_phrase(objects[0], None)} {POSITION_PHRASES[objects[0].position]}"
        else:
            body = " and ".join(f"{_noun_phrase(o, None)} {POSITION_PHRASES[o.position]}" for o in objects)
        prefix = "a painting of " if style == "painting" else "a photo of "
        return f"{prefix}{body}, {bg_phrase}"
    if form == "short":
        return " and ".join(f"{_noun_phrase(o, None, with_size=False)} {POSITION_PHRASES[o.position]}" for o in objects)
    if form != "random" or rng is None:
        raise ValueError("form must be 'long', 'short' or 'random' (with an rng)")
    # The random mix: each part is named with some probability; a painting always says so.
    if style == "painting":
        prefix = "a painting of "
    else:
        prefix = "a photo of " if rng.random() < 0.35 else ""
    if len(objects) == 1:
        o = objects[0]
        article = not (prefix and rng.random() < 0.15)  # "a photo of red toy" (like "a photo of <tok> toy")
        np_ = _noun_phrase(o, rng, article=article, with_size=rng.random() < 0.6, with_colour=rng.random() < 0.9)
        pos = rng.random() < 0.7
        body = np_ + (" " + POSITION_PHRASES[o.position] if pos else "")
    else:
        parts = [f"{_noun_phrase(o, rng, with_size=rng.random() < 0.6)} {POSITION_PHRASES[o.position]}" for o in objects]
        if rng.random() < 0.5:
            parts.reverse()
        body = " and ".join(parts)
    if rng.random() < 0.55:
        sep = ", " if (rng.random() < 0.5 or len(objects) > 1) else " "
        body = body + sep + bg_phrase
    return prefix + body


def random_object(rng: random.Random, background: str, position: str, exclude_colour: str | None = None) -> ObjectSpec:
    noun = rng.choice(SHAPES) if rng.random() < 0.55 else rng.choice(CLASSES)
    colours = [c for c in COLOURS if visible_on(c, background) and c != exclude_colour]
    return ObjectSpec(
        noun=noun, colour=rng.choice(colours), size=rng.choice(list(SIZES)), position=position, design=rng.getrandbits(32)
    )


def sample(seed: int, two_prob: float = 0.3, painting_prob: float = 0.1) -> Sample:
    """The world image, caption and metadata for `seed` (deterministic)."""
    rng = random.Random(seed)
    background = rng.choice(BACKGROUNDS)
    style = "painting" if rng.random() < painting_prob else "photo"
    if rng.random() < two_prob:
        a = random_object(rng, background, "left")
        b = random_object(rng, background, "right", exclude_colour=a.colour)
        if a.size == "big" and b.size == "big":
            b.size = "medium"
        objects = [a, b]
    else:
        objects = [random_object(rng, background, rng.choice(POSITIONS))]
    sprites = []
    for o in objects:
        cx, cy, side = place(o, rng)
        sprites.append((draw_object(o, side), cx, cy))
    image, boxes = compose(background, sprites, style, rng)
    s = Sample(image=image, caption="", objects=objects, background=background, style=style, boxes=boxes, seed=seed)
    s.caption = caption(s, "random", rng)
    return s


def second_view(s: Sample, seed: int) -> Image.Image:
    """The same object(s) (same designs and colours) drawn again at other places, sizes and on
    another background: the positive pair of the pocket CLIP's instance loss."""
    rng = random.Random(seed)
    background = rng.choice([b for b in BACKGROUNDS if all(visible_on(o.colour, b) for o in s.objects)])
    sprites = []
    positions = ["left", "right"] if len(s.objects) > 1 else [rng.choice(POSITIONS)]
    for o, p in zip(s.objects, positions):
        o2 = ObjectSpec(o.noun, o.colour, rng.choice(list(SIZES)), p, o.design)
        cx, cy, side = place(o2, rng)
        sprites.append((draw_object(o2, side), cx, cy))
    return compose(background, sprites, "painting" if rng.random() < 0.1 else "photo", rng)[0]


def render(noun: str, colour: str, position: str = "left", background: str = "plain-gray", size: str = "medium",
           style: str = "photo", seed: int = 0) -> Sample:
    """One object with chosen attributes (the rest from `seed`); its caption is the long form."""
    rng = random.Random(seed)
    o = ObjectSpec(noun, colour, size, position, rng.getrandbits(32))
    cx, cy, side = place(o, rng)
    image, boxes = compose(background, [(draw_object(o, side), cx, cy)], style, rng)
    s = Sample(image=image, caption="", objects=[o], background=background, style=style, boxes=boxes, seed=seed)
    s.caption = caption(s, "long")
    return s


# ----------------------------------------------------------------------------- reading pixels back


def colour_mask(image, colour: str, tol: float = 55.0) -> np.ndarray:
    """(H, W) bool: pixels within `tol` (RGB distance) of the named colour."""
    a = np.asarray(image.convert("RGB") if isinstance(image, Image.Image) else image, dtype=np.float32)
    return np.linalg.norm(a - np.array(COLOURS[colour], dtype=np.float32), axis=-1) < tol


def colour_side(image, colour: str, tol: float = 55.0, min_pixels: int = 12) -> str | None:
    """Which half (``left``/``right``) holds most pixels of `colour`, or None if fewer than `min_pixels`.

    The read-back used by the tests (captions match pixels) and by the prompt-following
    measure of the pocket base (asked colour in the asked half).
    """
    m = colour_mask(image, colour, tol)
    n = int(m.sum())
    if n < min_pixels:
        return None
    half = m.shape[1] // 2
    left, right = int(m[:, :half].sum()), int(m[:, half:].sum())
    return "left" if left > right else "right" if right > left else None


def dominant_colour(image, box: tuple[int, int, int, int], background: str, tol: float = 55.0) -> str | None:
    """The named colour with the most pixels inside `box` (background-coloured names skipped)."""
    x0, y0, x1, y1 = box
    crop = np.asarray(image.convert("RGB"), dtype=np.float32)[y0:y1, x0:x1]
    best, best_n = None, 0
    for name, rgb in COLOURS.items():
        if not visible_on(name, background):
            continue
        n = int((np.linalg.norm(crop - np.array(rgb, dtype=np.float32), axis=-1) < tol).sum())
        if n > best_n:
            best, best_n = name, n
    return best
