"""Image grids with labels: rows by prompt, columns by seed (and base vs adapted), as one PNG.

diffusers' ``make_image_grid`` lays the images out; this adds a caption strip on top (the
column labels) and one to the left of each row (its prompt, wrapped), so a grid says what
each image is without a separate file.
"""

from __future__ import annotations

import textwrap

from PIL import Image, ImageDraw, ImageFont

_BG, _FG = (255, 255, 255), (20, 20, 20)


def _font(size: int) -> ImageFont.ImageFont:
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow without FreeType sizes
        return ImageFont.load_default()


def labelled_grid(images: list[Image.Image], rows: int, cols: int, row_labels: list[str], col_labels: list[str]) -> Image.Image:
    """`images` row-major (rows x cols) under `col_labels`, each row after its `row_labels` entry."""
    from diffusers.utils import make_image_grid

    if len(images) != rows * cols or len(row_labels) != rows or len(col_labels) != cols:
        raise ValueError(f"labelled_grid: {len(images)} images, {len(row_labels)} row and {len(col_labels)} column labels for a {rows}x{cols} grid")
    grid = make_image_grid(images, rows=rows, cols=cols)
    w, h = images[0].size
    size = max(9, min(14, w // 8))
    font = _font(size)
    line = size + 3
    left = max(96, min(220, 2 * w))
    chars = max(8, left // max(1, size * 6 // 10))
    top = line * max(1, max(len(textwrap.wrap(c, max(4, w // max(1, size * 6 // 10)))) for c in col_labels)) + 4
    out = Image.new("RGB", (left + grid.width, top + grid.height), _BG)
    out.paste(grid, (left, top))
    draw = ImageDraw.Draw(out)
    for c, label in enumerate(col_labels):
        for k, text in enumerate(textwrap.wrap(label, max(4, w // max(1, size * 6 // 10)))):
            draw.text((left + c * w + 2, 2 + k * line), text, fill=_FG, font=font)
    for r, label in enumerate(row_labels):
        for k, text in enumerate(textwrap.wrap(label, chars)[: max(1, h // line)]):
            draw.text((3, top + r * h + 2 + k * line), text, fill=_FG, font=font)
    return out
