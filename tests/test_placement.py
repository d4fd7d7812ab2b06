"""Where a concept's pixels land under regional sampling (issue #25), on the pocket base with
concepts really trained (the demo's budget: demo_robot and pocket_duck in conftest).

A box must place its concept: with a neutral global prompt and the concept's prompt only in
its box, the concept's colour (the robot's red, the duck's yellow) lies mostly inside its box,
and the same seeds with the box on the other side put it on the other side (the control that
isolates "follows the box" from "lands there anyway"). Measured with benchmarks/placement.py's
own functions on fewer seeds and steps; the full measurement, every mode, is that benchmark.
"""

from __future__ import annotations

import pytest

from benchmarks.placement import LEFT, RIGHT, TARGET, PlacementConfig, added_colour, box_share, cases, colour_mask, measure, parse_hues
from sbora_diffusion.compose import Composer
from sbora_diffusion.models import load_pipeline


@pytest.fixture(scope="module")
def placed(demo_robot, pocket_duck, tmp_path_factory):
    composer = Composer(load_pipeline("pocket"))
    composer.load(demo_robot.adapter_path, name="robot")
    composer.load(pocket_duck.adapter_path, name="duck")
    config = PlacementConfig(seeds=12, steps=20, modes=["latent"], out_dir=str(tmp_path_factory.mktemp("placement")))
    res: dict = {}
    measure(config, res, lambda: None, composer=composer)
    return config, res


@pytest.mark.parametrize("kind", ["one concept", "two concepts"])
def test_a_box_places_its_concept_on_the_pocket_base(kind, placed):
    config, res = placed
    s = res["summary"]["latent"][kind]
    assert s["drawn"] >= 8, s  # enough images draw the concept for the rate to mean something
    assert s["rate"] >= TARGET, s  # >= 85% of them have most of its colour inside its box


def test_moving_the_box_moves_the_concept(placed):
    """The control: the same seeds with the box on the other side. Of the images that draw a concept alone,
    the share with its colour mostly in the left half must follow the box (a box that did nothing would
    leave it where it was: the same share both ways)."""
    config, res = placed
    modes = res["modes"]["latent"]
    for concept in config.concepts:
        def in_left(side: str) -> float:
            drawn = [r for r in modes[f"{concept} {side}"]["rows"][concept] if r["pixels"] >= config.min_pixels]
            return sum((r["inside"] if side == "left" else 1 - r["inside"]) > 0.5 for r in drawn) / len(drawn)

        assert in_left("left") - in_left("right") >= 0.7, concept


def test_the_colour_measure_reads_boxes_and_hues():
    from PIL import Image, ImageDraw

    im = Image.new("RGB", (64, 64), (120, 120, 200))
    ImageDraw.Draw(im).rectangle([4, 20, 20, 36], fill=(220, 20, 20))  # red, left half
    ImageDraw.Draw(im).rectangle([40, 20, 52, 30], fill=(240, 210, 20))  # yellow, right half
    red, yellow = colour_mask(im, parse_hues("340-20")), colour_mask(im, parse_hues("40-65"))
    assert red.sum() == 17 * 17 and yellow.sum() == 13 * 11
    assert box_share(red, LEFT) == (289, 1.0) and box_share(yellow, LEFT) == (143, 0.0) and box_share(yellow, RIGHT) == (143, 1.0)
    assert set(cases(["a", "b"])) == {"a left", "a right", "b left", "b right", "a left + b right", "a right + b left"}
    base = Image.new("RGB", (64, 64), (120, 120, 200))
    ImageDraw.Draw(base).rectangle([4, 20, 12, 36], fill=(220, 20, 20))  # red the base drew anyway
    assert added_colour(im, base, parse_hues("340-20")).sum() == 17 * 17 - 9 * 17  # only what the concept added
