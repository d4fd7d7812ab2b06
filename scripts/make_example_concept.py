"""Draw the example concept shipped in data/concepts/robot/: a red toy robot, five photos.

Procedural (PIL only, fixed seed), so the repository needs no downloaded photos: the same
toy (red body, yellow eyes, blue antenna ball) at different places, sizes and tilts on
different backgrounds. Run it again to rebuild the images: ``python scripts/make_example_concept.py``.
"""

from __future__ import annotations

import random
from pathlib import Path

from PIL import Image, ImageDraw, ImageFilter

OUT = Path(__file__).resolve().parent.parent / "data" / "concepts" / "robot"
SIZE = 128
BACKGROUNDS = [((120, 180, 235), (90, 160, 80)), ((235, 225, 200), (170, 120, 80)), ((60, 60, 80), (110, 110, 120)),
               ((250, 240, 150), (230, 200, 120)), ((200, 230, 240), (245, 245, 250))]  # (sky/wall, floor)


def draw_robot(size: int, rng: random.Random) -> Image.Image:
    """The toy on a transparent square: body, head, eyes, antenna, arms, legs."""
    im = Image.new("RGBA", (size, size), (0, 0, 0, 0))
    d = ImageDraw.Draw(im)
    s = size / 100
    red, dark = (210, 40, 40, 255), (120, 20, 20, 255)
    d.rectangle([30 * s, 45 * s, 70 * s, 80 * s], fill=red, outline=dark, width=max(1, int(2 * s)))  # body
    d.rectangle([35 * s, 20 * s, 65 * s, 45 * s], fill=red, outline=dark, width=max(1, int(2 * s)))  # head
    for x in (42, 58):
        d.ellipse([(x - 4) * s, 28 * s, (x + 4) * s, 36 * s], fill=(250, 220, 40, 255))  # eyes
    d.line([50 * s, 20 * s, 50 * s, 10 * s], fill=dark, width=max(1, int(2 * s)))
    d.ellipse([46 * s, 5 * s, 54 * s, 13 * s], fill=(40, 90, 220, 255))  # antenna ball
    d.rectangle([20 * s, 48 * s, 30 * s, 70 * s], fill=dark)  # arms
    d.rectangle([70 * s, 48 * s, 80 * s, 70 * s], fill=dark)
    d.rectangle([35 * s, 80 * s, 45 * s, 95 * s], fill=dark)  # legs
    d.rectangle([55 * s, 80 * s, 65 * s, 95 * s], fill=dark)
    return im.rotate(rng.uniform(-12, 12), resample=Image.BICUBIC)


def photo(i: int, rng: random.Random) -> Image.Image:
    top, floor = BACKGROUNDS[i % len(BACKGROUNDS)]
    im = Image.new("RGB", (SIZE, SIZE), top)
    horizon = rng.randint(70, 95)
    ImageDraw.Draw(im).rectangle([0, horizon, SIZE, SIZE], fill=floor)
    toy = draw_robot(rng.randint(60, 95), rng)
    x = rng.randint(0, SIZE - toy.width)
    y = min(SIZE - toy.height, horizon - toy.height // 2 + rng.randint(0, 10))
    im.paste(toy, (x, y), toy)
    return im.filter(ImageFilter.GaussianBlur(0.6))  # a little camera softness


def main() -> None:
    rng = random.Random(0)
    OUT.mkdir(parents=True, exist_ok=True)
    for i in range(5):
        photo(i, rng).save(OUT / f"robot_{i}.png", optimize=True)
    print(f"wrote 5 images to {OUT}")


if __name__ == "__main__":
    main()
