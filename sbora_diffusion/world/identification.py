"""Is the concept in the image? Identification of the held-out concepts against colour-matched distractors (issue #27).

An image asked for concept c counts as **identified** when the design probe
(``design_probe.py``: a small CNN trained on world renders) names c among eleven groups: the five
held-out concepts; for each, its colour-matched distractors (``concepts.distractor``: the world's
own designs of the concept's class in the concept's colours); and any other world object. The
distractors are the control that isolates the design: an image that got the robot's red and a
toy's shape but not its antenna and yellow eyes is named "robot~distractor", so colour alone does
not pass; a plain ball of any colour is "other".

Three verdicts per image, from the probe's eleven scores:

- ``identified``: c has the highest score of all eleven (the measure the targets use);
- ``among_concepts``: c has the highest score of the five concepts (which concept is it?);
- ``beats_distractors``: c scores above its own distractors (is it c's design, not just c's colours?).

``controls(probe)`` gives what the measure itself does on photos whose answer is known: fresh
photos of each concept (other seeds than any the probe saw; should be identified); fresh
distractors, other objects of its class, and its own photos smeared into a coloured blob
(should not), each also sent through the pocket VAE as generated images are.

    python -m sbora_diffusion.world.identification     # train the design probe, measure its controls, write both to weights/design-probe/
"""

from __future__ import annotations

import argparse
import random
import time
from collections.abc import Sequence

import torch
from PIL import Image

from sbora.fileio import sha256, write_json

from .concepts import CONCEPTS, distractor, view
from .design_probe import (GROUPS, PROBE_FILE, RECORD_FILE, DesignProbe, save_probe, smear, through_vae, to_tensor, train_probe, vae_sha256,
                           world_object)

CONTROL_SEED0 = 10_000  # fresh photos of the controls (the probe trained on seeds from design_probe.TRAIN_SEED0)


@torch.no_grad()
def identify(probe: DesignProbe, name: str, images: Sequence[Image.Image]) -> dict[str, list]:
    """Per image of `images` (asked for concept `name`): the group the probe names, and the three verdicts (module docstring)."""
    if name not in CONCEPTS:
        raise KeyError(f"unknown held-out concept {name!r}; known: {', '.join(CONCEPTS)}")
    probe.eval()
    logits = torch.cat([probe(to_tensor(list(images[i : i + 256]))) for i in range(0, len(images), 256)])  # (M, 10)
    c, decoy, k = GROUPS.index(name), GROUPS.index(f"{name}~distractor"), len(CONCEPTS)
    named = logits.argmax(1)
    return {"named": [GROUPS[j] for j in named.tolist()], "identified": (named == c).tolist(),
            "among_concepts": (logits[:, :k].argmax(1) == c).tolist(), "beats_distractors": (logits[:, c] > logits[:, decoy]).tolist()}


def rate(hits: Sequence[bool]) -> float:
    return sum(hits) / len(hits) if hits else float("nan")


def controls(probe: DesignProbe, views: int = 32, vae: bool = True) -> dict[str, dict[str, float]]:
    """Per concept: the share of `views` fresh photos of it that are identified, and the shares of as many fresh
    distractors of it, and of other world objects of its class, that are taken for it; with `vae` the same again
    after a pocket-VAE round trip."""
    out = {}
    for n in CONCEPTS:
        photos = [view(n, CONTROL_SEED0 + k) for k in range(views)]
        sets = {"photos_identified": photos, "distractors_taken_for_it": [distractor(n, CONTROL_SEED0 + k) for k in range(views)],
                "others_taken_for_it": class_objects(CONCEPTS[n].class_word, views),
                "smeared_photos_taken_for_it": [smear(im, random.Random(k)) for k, im in enumerate(photos)]}
        row = {"views": views, **{key: rate(identify(probe, n, images)["identified"]) for key, images in sets.items()}}
        if vae:
            row |= {f"vae_{key}": rate(identify(probe, n, through_vae(images))["identified"]) for key, images in sets.items()}
        out[n] = row
    return out


def class_objects(class_word: str, count: int) -> list[Image.Image]:
    """Fresh world photos of objects of `class_word` in random colours (what a base draws for "a photo of <class>")."""
    return [world_object(lambda _: class_word, random.Random(f"{class_word}/other/{k}"), CONTROL_SEED0 + k, sizes=("medium", "big"))
            for k in range(count)]


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(prog="python -m sbora_diffusion.world.identification",
                                     description="Train the design probe on world renders, measure its controls, write weights/design-probe/")
    parser.add_argument("--per-group", type=int, default=300, help="training renders per group (11 groups; each also through the VAE)")
    parser.add_argument("--epochs", type=int, default=8, help="passes over the training renders")
    parser.add_argument("--views", type=int, default=32, help="fresh photos (and distractors) per concept in the controls")
    parser.add_argument("--threads", type=int, default=1, help="torch threads")
    args = parser.parse_args(argv)
    for flag, value in (("--per-group", args.per_group), ("--epochs", args.epochs), ("--views", args.views), ("--threads", args.threads)):
        if value < 1:
            parser.error(f"{flag} must be at least 1, got {value}")
    torch.set_num_threads(args.threads)
    t0 = time.time()
    probe = train_probe(args.per_group, args.epochs)
    seconds = time.time() - t0
    found = controls(probe, views=args.views)
    save_probe(probe)
    record = {"command": " ".join(["python -m sbora_diffusion.world.identification", *(argv or [])]), "per_group": args.per_group,
              "epochs": args.epochs, "threads": args.threads, "train_seconds": round(seconds, 1), "vae_sha256": vae_sha256(),
              "model_sha256": sha256(PROBE_FILE), "controls": found}
    write_json(RECORD_FILE, record)
    for n, row in found.items():
        print(n, {k: round(v, 3) for k, v in row.items()})
    return record


if __name__ == "__main__":
    main()
