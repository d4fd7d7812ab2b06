"""The concept trainer's data: a handful of photos (and class images), decoded once, cropped per batch.

Every random choice (which image, where to crop, whether to flip) is drawn from the
engine's generator, so a resumed run draws exactly the batches it would have drawn.

Each batch also says where its pixels came from, per image: the photo's original height and
width, the crop's top and left in the resized photo, and the target height and width — the
numbers SDXL's size/crop micro-conditioning reads (``add_time_ids``, as diffusers'
train_dreambooth_lora_sdxl.py computes them); Stable Diffusion 1.x ignores them.
"""

from __future__ import annotations

from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
from PIL import Image

from sbora.fileio import atomic_path, cache_dir

from ..generate import render
from .config import ConceptConfig, ConceptError, image_files, open_rgb


class Photo(NamedTuple):
    pixels: torch.Tensor  # uint8 (3, H, W), the shorter side at the training resolution
    size: tuple[int, int]  # the photo's own (height, width) before resizing
    mask: torch.Tensor | None = None  # uint8 (1, H, W): 255 on the concept (--background-loss-weight), None: all of it


def load_images(paths: list[Path], resolution: int, masks: list[Path] | None = None) -> list[Photo]:
    """Decode (as a person sees the photo), resize the shorter side to `resolution`; each photo's mask (same size)
    resized alike."""
    out = []
    for k, p in enumerate(paths):
        im = open_rgb(p)
        size = (im.height, im.width)
        scale = resolution / min(im.size)
        shape = (max(resolution, round(im.width * scale)), max(resolution, round(im.height * scale)))
        mask = None
        if masks is not None:
            m = open_rgb(masks[k]).convert("L")  # decoded and turned as the photo is
            if m.size != im.size:
                raise ConceptError(f"the mask {masks[k]} is {m.width}x{m.height} but its photo {p.name} is {im.width}x{im.height}; "
                                   f"draw the mask at the photo's size")
            if m.getextrema()[1] == 0:
                raise ConceptError(f"the mask {masks[k]} is black everywhere, so its photo would teach nothing of the concept; "
                                   f"paint the concept white")
            mask = torch.from_numpy(np.asarray(m.resize(shape, resample=Image.BILINEAR)).copy())[None]  # (1, H, W)
        out.append(Photo(torch.from_numpy(np.asarray(im.resize(shape, resample=Image.BICUBIC)).copy()).permute(2, 0, 1), size, mask))
    return out


def crop_batch(images: list[Photo], idx: torch.Tensor, res: int, center_crop: bool, random_flip: bool,
               gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Crop (centre or random) and maybe flip the chosen images and their masks alike: (B, 3, res, res) in [-1, 1],
    each one's (original height, width, crop top, left, res, res) as a (B, 6) tensor, and the masks (B, 1, res, res)
    in [0, 1] (ones for a photo without a mask)."""
    batch, geometry, masks = [], [], []
    for i in idx.tolist():
        im, size, mask = images[i]
        mask = torch.full_like(im[:1], 255) if mask is None else mask
        h, w = im.shape[1:]
        if center_crop:
            top, left = (h - res) // 2, (w - res) // 2
        else:
            top = int(torch.randint(0, h - res + 1, (1,), generator=gen))
            left = int(torch.randint(0, w - res + 1, (1,), generator=gen))
        im, mask = im[:, top : top + res, left : left + res], mask[:, top : top + res, left : left + res]
        if random_flip and bool(torch.rand(1, generator=gen) < 0.5):
            im, mask = im.flip(-1), mask.flip(-1)
        batch.append(im)
        masks.append(mask)
        geometry.append([*size, top, left, res, res])
    return torch.stack(batch).float() / 127.5 - 1.0, torch.tensor(geometry, dtype=torch.float32), torch.stack(masks).float() / 255


def sample_batch(instance_images, class_images, instance_ids: list[torch.Tensor], class_ids: list[torch.Tensor], batch_size: int,
                 res: int, center_crop: bool, random_flip: bool, gen: torch.Generator, background_weight: float = 1.0):
    """One micro-batch: B random instance images (+ B class images with prior preservation), their prompt ids
    (one tensor per text encoder), their geometry (``crop_batch``) and their pixels' loss weights: 1 on the concept
    (its mask), `background_weight` elsewhere, 1 on class images; None when `background_weight` is 1 (every pixel
    alike). `instance_ids` holds one row per photo (its caption's ids), `class_ids` the class prompt's one row."""
    idx = torch.randint(0, len(instance_images), (batch_size,), generator=gen)
    pixels, geometry, masks = crop_batch(instance_images, idx, res, center_crop, random_flip, gen)  # (B, 3, res, res), (B, 6), (B, 1, res, res)
    ids = [i[idx] for i in instance_ids]  # [(B, 77)]: each photo with its own prompt
    if class_images:
        cidx = torch.randint(0, len(class_images), (batch_size,), generator=gen)
        class_batch = crop_batch(class_images, cidx, res, center_crop, random_flip, gen)
        pixels, geometry, masks = (torch.cat(pair) for pair in zip((pixels, geometry, masks), class_batch))  # 2B of each
        ids = [torch.cat([i, c.expand(batch_size, -1)]) for i, c in zip(ids, class_ids, strict=True)]  # [(2B, 77)]
    return pixels, ids, geometry, (background_weight + (1 - background_weight) * masks if background_weight < 1 else None)


def tokenize(tokenizer, prompts: list[str]) -> torch.Tensor:
    """(len(prompts), 77) ids, padded to the tokenizer's length."""
    return tokenizer(prompts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True, return_tensors="pt").input_ids


def class_image_paths(pipe, model: str, concept: ConceptConfig, count: int, res: int, steps: int, guidance_scale: float) -> list[Path]:
    """The concept's class images: its class_dir, or generated once with the base model and cached.

    Generated ones live in ``<cache>/class_images/<model>-<prompt>-<res>px-<steps>steps-cfg<guidance>/``
    (see ``sbora.fileio.cache_dir``) and are shared by every run with the same base, class prompt and
    sampling: images drawn with fewer DDIM steps (a cheap run's) never stand in for another run's.
    Call with all adapters off: the images must come from the base model.
    """
    if concept.class_dir:
        return image_files(concept.class_dir, what="class images", hint="give a folder of class images, or class_dir: null to generate them")[:count]
    slug = "".join(c if c.isalnum() else "-" for c in f"{Path(model).name}/{concept.fill(concept.class_prompt)}-{res}px-{steps}steps-cfg{guidance_scale:g}")
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
