"""The concept trainer's data: a handful of photos (and class images), decoded once, cropped per batch.

Every random choice (which image, where to crop, whether to flip) is drawn from the
engine's generator, so a resumed run draws exactly the batches it would have drawn.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image

from ..concepts import ConceptConfig, image_files, open_rgb
from ..fileio import atomic_path
from ..generate import render


def load_images(paths: list[Path], resolution: int) -> list[torch.Tensor]:
    """Decode (as a person sees the photo), resize the shorter side to `resolution`; uint8 (3, H, W) each."""
    out = []
    for p in paths:
        im = open_rgb(p)
        scale = resolution / min(im.size)
        im = im.resize((max(resolution, round(im.width * scale)), max(resolution, round(im.height * scale))), resample=Image.BICUBIC)
        out.append(torch.from_numpy(np.asarray(im).copy()).permute(2, 0, 1))
    return out


def crop_batch(images: list[torch.Tensor], idx: torch.Tensor, res: int, center_crop: bool, random_flip: bool,
               gen: torch.Generator) -> torch.Tensor:
    """Crop (centre or random) and maybe flip the chosen images; (B, 3, res, res) in [-1, 1]."""
    batch = []
    for i in idx.tolist():
        im = images[i]
        h, w = im.shape[1:]
        if center_crop:
            top, left = (h - res) // 2, (w - res) // 2
        else:
            top = int(torch.randint(0, h - res + 1, (1,), generator=gen))
            left = int(torch.randint(0, w - res + 1, (1,), generator=gen))
        im = im[:, top : top + res, left : left + res]
        if random_flip and bool(torch.rand(1, generator=gen) < 0.5):
            im = im.flip(-1)
        batch.append(im)
    return torch.stack(batch).float() / 127.5 - 1.0


def sample_batch(instance_images, class_images, instance_ids, class_ids, batch_size: int, res: int, center_crop: bool,
                 random_flip: bool, gen: torch.Generator):
    """One micro-batch: B random instance images (+ B class images with prior preservation) and their prompt ids."""
    idx = torch.randint(0, len(instance_images), (batch_size,), generator=gen)
    pixels, ids = crop_batch(instance_images, idx, res, center_crop, random_flip, gen), instance_ids  # (B, 3, res, res), (B, 77)
    if class_images:
        cidx = torch.randint(0, len(class_images), (batch_size,), generator=gen)
        pixels = torch.cat([pixels, crop_batch(class_images, cidx, res, center_crop, random_flip, gen)])  # (2B, 3, res, res)
        ids = torch.cat([instance_ids, class_ids])
    return pixels, ids


def tokenize(tokenizer, prompt: str, n: int) -> torch.Tensor:
    ids = tokenizer(prompt, padding="max_length", max_length=tokenizer.model_max_length, truncation=True, return_tensors="pt").input_ids
    return ids.expand(n, -1)  # (n, 77)


def class_image_paths(pipe, model: str, concept: ConceptConfig, count: int, res: int, steps: int, guidance_scale: float) -> list[Path]:
    """The concept's class images: its class_dir, or generated once with the base model and cached.

    Generated ones live in ``<cache>/class_images/<model>-<prompt>-<res>px/`` (see
    ``models.cache_dir``) and are shared by every run with the same base and class prompt.
    Call with all adapters off: the images must come from the base model.
    """
    from ..models import cache_dir

    if concept.class_dir:
        return image_files(concept.class_dir, what="class images", hint="give a folder of class images, or class_dir: null to generate them")[:count]
    slug = "".join(c if c.isalnum() else "-" for c in f"{Path(model).name}/{concept.fill(concept.class_prompt)}-{res}px")
    folder = cache_dir() / "class_images" / slug
    have = sorted(folder.glob("*.png")) if folder.is_dir() else []
    if len(have) < count:
        seeds = list(range(len(have), count))
        images = render(pipe, [concept.fill(concept.class_prompt)], seeds, steps=steps, guidance_scale=guidance_scale,
                        height=res, width=res, desc="class images")
        for seed, image in zip(seeds, images):
            with atomic_path(folder / f"{seed:05d}.png") as tmp:
                image.save(tmp, format="PNG")
    return sorted(folder.glob("*.png"))[:count]
