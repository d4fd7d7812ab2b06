"""Tiny trained concepts for the composition and app tests: a few coloured photos, two training
steps at 32 px (under a second each), written in the trainer's layout <outputs>/<name>/<method>/."""

from __future__ import annotations

import copy
from pathlib import Path

from PIL import Image

from sbora_diffusion.concept.options import TrainConfig
from sbora_diffusion.concept.train import train
from sbora_diffusion.concept.config import ConceptConfig

# name -> (background, foreground) colours of its photos
COLOURS = {"alpha": ((20, 40, 200), (220, 30, 30)), "beta": ((240, 240, 200), (30, 160, 40)),
           "gamma": ((30, 30, 30), (250, 220, 0)), "delta": ((200, 200, 250), (120, 0, 160))}


def photos(folder: Path, name: str, count: int = 3) -> Path:
    """`count` small photos of a square of the concept's colour on its background."""
    folder.mkdir(parents=True, exist_ok=True)
    bg, fg = COLOURS[name]
    for i in range(count):
        im = Image.new("RGB", (40, 36), bg)
        im.paste(fg, (6 + 3 * i, 8, 22 + 3 * i, 28))
        im.save(folder / f"{name}_{i}.png")
    return folder


def quick_config(out_dir: Path, steps: int = 2) -> TrainConfig:
    """Two steps at 32 px with one 2-step sample image: a second on a CPU."""
    return TrainConfig(steps=steps, resolution=32, lr=1e-2, validation_steps=0, num_validation_images=1, sample_steps=2,
                       checkpoint_every=0, output_dir=str(out_dir))


QUICK_YAML = "steps: 2\nresolution: 32\nlr: 1.0e-2\nvalidation_steps: 0\nnum_validation_images: 1\nsample_steps: 2\ncheckpoint_every: 0\n"


def train_tiny_concept(pipe, outputs: Path, name: str, slot: int, method: str = "sbora-fa", token: str | None = None,
                       rank: int = 4, seed: int = 0, layout: str | None = None) -> Path:
    """Train concept `name` (token <name1>) on a copy of `pipe` into <outputs>/<name>/<method>/; returns its adapter file.
    `layout`: the SBoRA index layout (none: the default)."""
    concept = ConceptConfig(name=name, instance_dir=str(photos(outputs.parent / "photos" / name, name)), token=token or f"<{name}1>",
                            class_word="toy", validation_prompts=["a photo of {token} {class_word}"])
    result = train(concept, method, train_config=quick_config(outputs / name / method), pipe=copy.deepcopy(pipe),
                   adapter_overrides={"rank": rank, "slot": slot, "seed": seed, **({"layout": layout} if layout else {})})
    return result.adapter_path
