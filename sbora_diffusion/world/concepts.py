"""Held-out concepts of the pocket world: objects never drawn in pretraining, with their photos.

Each concept is one fixed design (a sprite) of a class the world knows (``toy``, ``ball``,
``flag``, ``badge``), with features the world's random designs never have:

    robot       <robot1> toy     red box robot, yellow eyes, antenna with a blue ball (world toys: no antenna, no yellow eyes)
    duck        <duck1> toy      yellow rubber duck with an orange beak (world toys: no beaks)
    beachball   <beachball1> ball  ball of red/white/blue/yellow wedges (world balls: plain, stripes or dots)
    checkerflag <flag1> flag     purple and yellow checkered flag (world flags: stripes or a disc)
    boltbadge   <badge1> badge   navy shield, gold border, white lightning bolt (world badges: circle/star/square symbols)

``python -m sbora_diffusion.world.concepts`` writes 5 reference photos per concept
(varied position, size and background, drawn in the world's style at 64x64) to
``data/concepts/<name>/``, with a caption of each that names its place and background
(``metadata.jsonl``, read by the concept trainer's ``--caption-column text``) and its mask
(``masks/``, read by ``--background-loss-weight``), and the concept configs to ``configs/concepts/<name>.yaml``.
``view(name, seed)`` draws further photos of a concept (other seeds: the identification check);
``distractor(name, seed)`` a **colour-matched distractor**: an object of the concept's class in
the concept's own colours (its main colour, its accents) but of one of the world's random
designs, so that telling it from the concept takes the design, not the colour
(``identification.py``).
"""

from __future__ import annotations

import argparse
import json
import random
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, ImageDraw

from . import generator as g

PROJECT_ROOT = Path(__file__).resolve().parents[2]


def draw_robot(side: int, rng: random.Random) -> Image.Image:
    """The shipped example: red body and head, yellow eyes, dark arms and legs, antenna with a blue ball."""
    im = Image.new("RGBA", (side, side), (0, 0, 0, 0))
    d = ImageDraw.Draw(im)
    s = side / 100
    red, dark = (210, 40, 40, 255), (120, 20, 20, 255)
    w = max(1, int(2 * s))
    d.rectangle([30 * s, 45 * s, 70 * s, 80 * s], fill=red, outline=dark, width=w)  # body
    d.rectangle([35 * s, 20 * s, 65 * s, 45 * s], fill=red, outline=dark, width=w)  # head
    for x in (43, 57):
        d.ellipse([(x - 5) * s, 27 * s, (x + 5) * s, 37 * s], fill=(250, 220, 40, 255))  # eyes
    d.line([50 * s, 20 * s, 50 * s, 9 * s], fill=dark, width=max(1, int(3 * s)))
    d.ellipse([44 * s, 1 * s, 56 * s, 13 * s], fill=(40, 90, 220, 255))  # antenna ball
    d.rectangle([20 * s, 48 * s, 30 * s, 70 * s], fill=dark)  # arms
    d.rectangle([70 * s, 48 * s, 80 * s, 70 * s], fill=dark)
    d.rectangle([35 * s, 80 * s, 45 * s, 97 * s], fill=dark)  # legs
    d.rectangle([55 * s, 80 * s, 65 * s, 97 * s], fill=dark)
    return im.rotate(rng.uniform(-10, 10), resample=Image.BICUBIC)


def draw_duck(side: int, rng: random.Random) -> Image.Image:
    """A yellow rubber duck facing right: round body, head, orange beak, black eye, a wing."""
    im = Image.new("RGBA", (side, side), (0, 0, 0, 0))
    d = ImageDraw.Draw(im)
    s = side / 100
    yellow, edge, orange = (250, 205, 30, 255), (190, 140, 10, 255), (245, 120, 20, 255)
    w = max(1, int(2 * s))
    d.ellipse([8 * s, 45 * s, 88 * s, 95 * s], fill=yellow, outline=edge, width=w)  # body
    d.ellipse([45 * s, 12 * s, 85 * s, 52 * s], fill=yellow, outline=edge, width=w)  # head
    d.polygon([(82 * s, 30 * s), (99 * s, 36 * s), (82 * s, 42 * s)], fill=orange)  # beak
    d.ellipse([66 * s, 23 * s, 74 * s, 31 * s], fill=(15, 15, 15, 255))  # eye
    d.ellipse([22 * s, 58 * s, 58 * s, 80 * s], fill=(235, 180, 20, 255), outline=edge, width=w)  # wing
    d.polygon([(8 * s, 60 * s), (0, 48 * s), (16 * s, 54 * s)], fill=yellow)  # tail
    return im.rotate(rng.uniform(-10, 10), resample=Image.BICUBIC)


def draw_beachball(side: int, rng: random.Random) -> Image.Image:
    """A ball of six wedges, red / white / blue / yellow, with a white cap in the middle."""
    im = Image.new("RGBA", (side, side), (0, 0, 0, 0))
    d = ImageDraw.Draw(im)
    m = max(1, side // 16)
    box = [m, m, side - 1 - m, side - 1 - m]
    colours = [(220, 30, 30), (250, 250, 250), (30, 80, 220), (250, 250, 250), (250, 210, 30), (250, 250, 250)]
    start = rng.uniform(0, 60)
    for k, c in enumerate(colours):
        d.pieslice(box, start + 60 * k, start + 60 * (k + 1), fill=c + (255,))
    c = side / 2
    r = side * 0.1
    d.ellipse([c - r, c - r, c + r, c + r], fill=(250, 250, 250, 255))
    d.ellipse(box, outline=(90, 90, 90, 255), width=max(1, side // 20))
    return im


def draw_checkerflag(side: int, rng: random.Random) -> Image.Image:
    """A flag on a dark pole, checkered purple and yellow (4x3 squares)."""
    im = Image.new("RGBA", (side, side), (0, 0, 0, 0))
    d = ImageDraw.Draw(im)
    s = side / 100
    d.rectangle([8 * s, 4 * s, 14 * s, 98 * s], fill=(60, 60, 60, 255))
    x0, y0, x1, y1 = 14 * s, 8 * s, 96 * s, 66 * s
    cols, rows = 4, 3
    for i in range(cols):
        for j in range(rows):
            c = (135, 50, 185, 255) if (i + j) % 2 == 0 else (245, 215, 35, 255)
            d.rectangle([x0 + (x1 - x0) * i / cols, y0 + (y1 - y0) * j / rows,
                         x0 + (x1 - x0) * (i + 1) / cols, y0 + (y1 - y0) * (j + 1) / rows], fill=c)
    d.rectangle([x0, y0, x1, y1], outline=(60, 20, 90, 255), width=max(1, int(2 * s)))
    return im.rotate(rng.uniform(-6, 6), resample=Image.BICUBIC)


def draw_boltbadge(side: int, rng: random.Random) -> Image.Image:
    """A navy shield with a thick gold border and a white lightning bolt."""
    im = Image.new("RGBA", (side, side), (0, 0, 0, 0))
    d = ImageDraw.Draw(im)
    s = side / 100
    pts = [(10 * s, 5 * s), (90 * s, 5 * s), (90 * s, 52 * s), (50 * s, 97 * s), (10 * s, 52 * s)]
    d.polygon(pts, fill=(25, 35, 110, 255), outline=(235, 185, 40, 255), width=max(2, int(9 * s)))
    bolt = [(56, 14), (30, 52), (47, 52), (38, 84), (70, 42), (53, 42), (64, 14)]
    d.polygon([(x * s, y * s) for x, y in bolt], fill=(250, 250, 250, 255))
    return im.rotate(rng.uniform(-8, 8), resample=Image.BICUBIC)


@dataclass(frozen=True)
class HeldOutConcept:
    name: str
    token: str
    class_word: str
    draw: Callable[[int, random.Random], Image.Image]
    description: str
    palette: tuple[tuple[int, int, int], ...]  # the sprite's colours, main first: what its distractors are drawn in


CONCEPTS: dict[str, HeldOutConcept] = {
    c.name: c
    for c in [
        HeldOutConcept("robot", "<robot1>", "toy", draw_robot, "a red toy robot (yellow eyes, blue antenna ball)",
                       ((210, 40, 40), (250, 220, 40), (40, 90, 220))),
        HeldOutConcept("duck", "<duck1>", "toy", draw_duck, "a yellow rubber duck toy with an orange beak",
                       ((250, 205, 30), (245, 120, 20))),
        HeldOutConcept("beachball", "<beachball1>", "ball", draw_beachball, "a beach ball of red, white, blue and yellow wedges",
                       ((220, 30, 30), (250, 250, 250), (30, 80, 220), (250, 210, 30))),
        HeldOutConcept("checkerflag", "<flag1>", "flag", draw_checkerflag, "a purple and yellow checkered flag",
                       ((135, 50, 185), (245, 215, 35))),
        HeldOutConcept("boltbadge", "<badge1>", "badge", draw_boltbadge, "a navy shield badge with a gold border and a white lightning bolt",
                       ((25, 35, 110), (235, 185, 40), (250, 250, 250))),
    ]
}
NUM_REFERENCES = 5
# Reference photos: varied backgrounds (scenes and plain colours), positions and sizes.
REFERENCE_BACKGROUNDS = ("plain-white", "grass", "table", "plain-blue", "snow", "plain-gray", "beach", "plain-pink")


def view(name: str, seed: int, background: str | None = None, position: str | None = None, size: str | None = None,
         style: str = "photo", with_mask: bool = False) -> Image.Image | tuple[Image.Image, Image.Image]:
    """One 64x64 photo of a held-out concept, in the world's style (the rest drawn from `seed`); with `with_mask`
    also its mask (64x64 grayscale: 255 on the concept, 0 elsewhere, box-filtered at the edges like the photo)."""
    if name not in CONCEPTS:
        raise KeyError(f"unknown held-out concept {name!r}; known: {', '.join(CONCEPTS)}")
    rng = random.Random(f"{name}/{seed}")
    background = background or rng.choice(g.BACKGROUNDS)
    spec = g.ObjectSpec("toy", "red", size or rng.choice(["medium", "big", "big"]), position or rng.choice(g.POSITIONS))
    cx, cy, side = g.place(spec, rng)
    sprite = CONCEPTS[name].draw(side, rng)
    image = g.compose(background, [(sprite, cx, cy)], style, rng)[0]
    if not with_mask:
        return image
    mask = Image.new("L", (g.CANVAS, g.CANVAS), 0)
    mask.paste(sprite.getchannel("A"), (cx - sprite.width // 2, cy - sprite.height // 2))  # where compose pastes the sprite
    return image, mask.resize((g.SIZE, g.SIZE), Image.BOX)


def distractor(name: str, seed: int, background: str | None = None, position: str | None = None, size: str | None = None,
               style: str = "photo") -> Image.Image:
    """One 64x64 photo of a colour-matched distractor of a held-out concept: the world's random design of its class
    in its palette, placed and lit like ``view``."""
    concept = CONCEPTS[name]
    rng = random.Random(f"{name}/distractor/{seed}")
    background = background or rng.choice(g.BACKGROUNDS)
    spec = g.ObjectSpec(concept.class_word, "red", size or rng.choice(["medium", "big", "big"]), position or rng.choice(g.POSITIONS))
    cx, cy, side = g.place(spec, rng)
    main, *accents = concept.palette
    sprite = g.CLASS_DRAWERS[concept.class_word](main, side, rng, accents=accents).rotate(rng.uniform(-10, 10), resample=Image.BICUBIC)
    return g.compose(background, [(sprite, cx, cy)], style, rng)[0]


def reference_settings(name: str) -> list[dict]:
    """How each shipped reference photo is drawn: ``view``'s seed, background, position and size."""
    offset = list(CONCEPTS).index(name)
    return [{"seed": 1000 + i, "background": REFERENCE_BACKGROUNDS[(i + 2 * offset) % len(REFERENCE_BACKGROUNDS)],
             "position": ("left", "right", "center")[(i + offset) % 3], "size": ("big", "medium", "big", "big", "medium")[i]}
            for i in range(NUM_REFERENCES)]


def references(name: str, with_masks: bool = False) -> list:
    """The concept's shipped reference photos (deterministic); with `with_masks`, (photo, mask) pairs."""
    return [view(name, **settings, with_mask=with_masks) for settings in reference_settings(name)]


def reference_captions(name: str) -> list[str]:
    """Each reference photo's caption template in the world's words, naming its place and background (the concept
    trainer's ``--caption-column text``): "a photo of {token} {class_word} on the left, on the grass"."""
    return [f"a photo of {{token}} {{class_word}} {g.POSITION_PHRASES[s['position']]}, {g.background_phrase(s['background'])}"
            for s in reference_settings(name)]


CONFIG_TEMPLATE = """\
# Held-out concept of the pocket world: {description}; {n} procedurally drawn photos
# (python -m sbora_diffusion.world.concepts). Never shown to the pocket base or CLIP in pretraining.
name: {name}
instance_dir: data/concepts/{name}
token: "{token}"
class_word: {class_word}
instance_prompt: "a photo of {{token}} {{class_word}}"
class_prompt: "a photo of {{class_word}}"
validation_prompts:
  - "a photo of {{token}} {{class_word}}"
  - "a photo of {{token}} {{class_word}} on the beach"
eval_prompts:
  - "a photo of {{token}} {{class_word}}"
  - "a photo of {{token}} {{class_word}} on the beach"
  - "a photo of {{token}} {{class_word}} in the snow"
  - "a photo of {{token}} {{class_word}} on a wooden table"
  - "a painting of {{token}} {{class_word}}"
"""


def write(root: Path = PROJECT_ROOT, names: list[str] | None = None, configs: bool = True, overwrite_configs: bool = False) -> None:
    """Write the reference photos (replacing old ones) and any missing concept configs."""
    for name in names or list(CONCEPTS):
        c = CONCEPTS[name]
        folder = root / "data" / "concepts" / name
        folder.mkdir(parents=True, exist_ok=True)
        for old in [*folder.glob(f"{name}_*.png"), *folder.glob(f"masks/{name}_*.png")]:
            old.unlink()
        (folder / "masks").mkdir(exist_ok=True)
        for i, (im, mask) in enumerate(references(name, with_masks=True)):
            im.save(folder / f"{name}_{i}.png", optimize=True)
            mask.save(folder / "masks" / f"{name}_{i}.png", optimize=True)  # the concept trainer's --background-loss-weight
        lines = [json.dumps({"file_name": f"{name}_{i}.png", "text": text}) for i, text in enumerate(reference_captions(name))]
        (folder / "metadata.jsonl").write_text("\n".join(lines) + "\n")  # 🤗 imagefolder captions (--caption-column text)
        config = root / "configs" / "concepts" / f"{name}.yaml"
        if configs and (overwrite_configs or not config.exists()):
            text = CONFIG_TEMPLATE.format(description=c.description, n=NUM_REFERENCES, name=name, token=c.token, class_word=c.class_word)
            config.write_text(text)
        print(f"{name}: {NUM_REFERENCES} photos in {folder}")


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--root", type=Path, default=PROJECT_ROOT, help="repository root (data/concepts/ and configs/concepts/ under it)")
    ap.add_argument("--concept", action="append", choices=list(CONCEPTS), help="only these concepts (default: all)")
    ap.add_argument("--no-configs", action="store_true", help="write the photos only, not configs/concepts/<name>.yaml")
    ap.add_argument("--overwrite-configs", action="store_true", help="rewrite existing concept configs (default: keep them)")
    args = ap.parse_args(argv)
    write(args.root, args.concept, not args.no_configs, args.overwrite_configs)


if __name__ == "__main__":
    main()
