"""The design probe: image features that tell a held-out concept from its colour-matched distractors.

Why not the pocket CLIP: on the world's own fresh photos (no generation involved), nearest-reference
identification in the pocket CLIP's 64-d features (the five concepts' reference photos and eight
colour-matched distractors of each as candidates) found the right concept for only 38-69% of 16
fresh photos per concept, and took half of the duck's fresh distractors for the duck. A measure
that fails on the photos themselves cannot tell whether a trained adapter drew the concept. So
identification (``identification.py``) asks a small CNN trained on world renders to name which of
eleven groups (each held-out concept, each concept's distractors, any other world object) an
image shows.

The renders are what generated images are made of: ``concepts.view`` and ``concepts.distractor``
(any background, position, size; a fifth are paintings), each sent once through the pocket VAE
(encode, decode: the softness every generated image has), then blurred, noised and shifted in
brightness at random; the network sees every render both as drawn and after the VAE. Training is
deterministic (seeded) and takes a few minutes on one CPU thread; the weights ship as
``weights/design-probe/model.safetensors`` with a record of how they were made and what they
measure (``record.json``, both written by ``python -m sbora_diffusion.world.identification``).
The record names the VAE the probe was trained and measured through (its sha256): a probe trained
through another VAE than the shipped base's misjudges the base's images (the first probe, trained
through pocket base v1's VAE and kept after v2 shipped, took 53% of the duck's smeared photos for the
duck through v2's VAE, not the 19% its record said), so a test holds the two equal.
"""

from __future__ import annotations

import functools
import random
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageFilter
from safetensors.torch import load_file, save_file
from torch import nn

from sbora.fileio import atomic_path, sha256

from . import POCKET_SD_DIR, WEIGHTS_DIR
from . import generator as g
from .concepts import CONCEPTS, distractor, view

PROBE_DIR = WEIGHTS_DIR / "design-probe"
PROBE_FILE = PROBE_DIR / "model.safetensors"
RECORD_FILE = PROBE_DIR / "record.json"
OTHER = "other"  # any other world object: the classes and shapes in any colour (what a base draws for "a photo of ball"),
SMEARED_SHARE = 0.5  # ... and, for this share of its renders, a concept or distractor smeared into a coloured blob
GROUPS = (*CONCEPTS, *(f"{n}~distractor" for n in CONCEPTS), OTHER)  # the classes it learns to name
# The first probe's id (2026-12-05, trained through pocket base v1's VAE): the quality benchmark's units that name no
# probe were scored by it.
FIRST_PROBE = "2cb2a2a81345cd88"
TRAIN_SEED0 = 100_000  # render seeds of its training photos: far from the gallery's (0..) and the controls' (10000..)


class DesignProbe(nn.Module):
    """(B, 3, 64, 64) in [0, 1] -> (B, 128) unit features; ``head`` names the group during training."""

    def __init__(self, width: int = 32, groups: int = len(GROUPS)):
        super().__init__()
        w = width
        layers, cin = [], 3
        for cout in (w, 2 * w, 4 * w, 4 * w):  # 64 -> 32 -> 16 -> 8 -> 4
            layers += [nn.Conv2d(cin, cout, 3, stride=2, padding=1), nn.GroupNorm(8, cout), nn.SiLU()]
            cin = cout
        self.body = nn.Sequential(*layers)
        self.head = nn.Linear(cin, groups)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x).mean((2, 3))  # (B, C)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))  # (B, groups)

    @torch.no_grad()
    def encode_images(self, images: list, desc: str = "") -> torch.Tensor:
        """The scorer interface of ``clip_score.ClipScorer``: (N, D) unit features of PIL images."""
        self.eval()
        f = torch.cat([self.features(to_tensor(images[i : i + 256])) for i in range(0, len(images), 256)])
        return f / f.norm(dim=-1, keepdim=True).clamp_min(1e-12)


def to_tensor(images: list[Image.Image]) -> torch.Tensor:
    arrays = [np.asarray(im.convert("RGB").resize((64, 64), Image.BICUBIC), dtype=np.float32) / 255.0 for im in images]
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2)  # (B, 3, 64, 64)


def world_object(pick_noun: Callable[[random.Random], str], rng: random.Random, seed: int, style: str = "photo",
                 sizes: Sequence[str] = ("medium", "big", "big")) -> Image.Image:
    """A world photo of one object (the noun `pick_noun` draws) in a random colour visible on a random background."""
    background = rng.choice(g.BACKGROUNDS)
    colour = rng.choice([c for c in g.COLOURS if g.visible_on(c, background)])
    noun = pick_noun(rng)
    return g.render(noun, colour, rng.choice(g.POSITIONS), background, rng.choice(list(sizes)), style, seed).image


def smear(image: Image.Image, rng: random.Random) -> Image.Image:
    """Blurred until only colours and a blob remain (radius 2.5-4 px at 64x64): what identification must not accept."""
    return image.filter(ImageFilter.GaussianBlur(rng.uniform(2.5, 4.0)))


def render(group: int, seed: int) -> Image.Image:
    """A world photo of group `group` (a concept, a concept's distractors, or any other object: also a smeared concept or
    distractor), a fifth of them paintings."""
    rng = random.Random(seed)
    style = "painting" if rng.random() < 0.2 else "photo"
    if GROUPS[group] == OTHER and rng.random() < SMEARED_SHARE:  # a concept or distractor too blurred to show its design
        return smear(render(rng.randrange(len(GROUPS) - 1), seed), rng)
    if GROUPS[group] == OTHER:
        return world_object(lambda r: r.choice(g.CLASSES) if r.random() < 0.7 else r.choice(g.SHAPES), rng, seed, style)
    name = GROUPS[group].split("~")[0]
    return (view if group < len(CONCEPTS) else distractor)(name, seed, style=style)


def vae_sha256(vae_dir: Path = POCKET_SD_DIR / "vae") -> str:
    """The sha256 of the VAE weights that ``through_vae`` uses: the record's ``vae_sha256``."""
    return sha256(vae_dir / "diffusion_pytorch_model.safetensors")


@functools.lru_cache(maxsize=2)
def pocket_vae(vae_dir: Path = POCKET_SD_DIR / "vae"):
    from diffusers import AutoencoderKL

    return AutoencoderKL.from_pretrained(str(vae_dir), local_files_only=True).eval()


@torch.no_grad()
def through_vae(images: list[Image.Image], vae_dir: Path = POCKET_SD_DIR / "vae") -> list[Image.Image]:
    """Each image encoded and decoded by the pocket VAE (the latent mean): the softness of generated images."""
    vae = pocket_vae(vae_dir)
    out = []
    for i in range(0, len(images), 64):
        x = to_tensor(images[i : i + 64]) * 2 - 1
        y = vae.decode(vae.encode(x).latent_dist.mean).sample.clamp(-1, 1)
        out += [Image.fromarray(((a.permute(1, 2, 0).numpy() + 1) * 127.5).round().astype(np.uint8)) for a in y]
    return out


def augment(im: Image.Image, rng: random.Random) -> Image.Image:
    """Blur, brightness and noise at random: generated images differ from renders in all three."""
    if rng.random() < 0.5:
        im = im.filter(ImageFilter.GaussianBlur(rng.uniform(0.3, 1.2)))
    a = np.asarray(im, dtype=np.float32) * rng.uniform(0.85, 1.15)
    a = a + np.random.default_rng(rng.getrandbits(32)).normal(0, rng.uniform(0, 8), a.shape)
    return Image.fromarray(a.clip(0, 255).astype(np.uint8))


def train_probe(per_group: int = 300, epochs: int = 8, batch: int = 64, lr: float = 2e-3, seed: int = 0, vae: bool = True) -> DesignProbe:
    """The probe, trained on `per_group` renders of each group ("other": twice that; each also through the VAE when `vae`),
    deterministic in `seed`."""
    torch.manual_seed(seed)
    rng = random.Random(seed)
    # "other" gets twice the renders: it spans every other object and, half of the time, every smeared group
    count = {g: per_group * (2 if GROUPS[g] == OTHER else 1) for g in range(len(GROUPS))}
    labels = [g for g in range(len(GROUPS)) for _ in range(count[g])]
    images = [render(g, TRAIN_SEED0 + k) for g in range(len(GROUPS)) for k in range(count[g])]
    if vae:
        images, labels = images + through_vae(images), labels + labels
    batch = min(batch, len(images))  # a tiny run still takes steps
    probe = DesignProbe()
    opt = torch.optim.AdamW(probe.parameters(), lr=lr, weight_decay=1e-4)
    steps = epochs * (len(images) // batch)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps)
    y_all = torch.tensor(labels)
    probe.train()
    for _ in range(epochs):
        order = list(range(len(images)))
        rng.shuffle(order)
        for i in range(0, len(order) - batch + 1, batch):
            idx = order[i : i + batch]
            x = to_tensor([augment(images[j], rng) for j in idx])
            loss = nn.functional.cross_entropy(probe(x), y_all[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
    return probe.eval()


def _probe_file(path: Path) -> Path:
    if not path.is_file():
        raise FileNotFoundError(f"no design probe at {path}: make one with `python -m sbora_diffusion.world.identification`")
    return path


def probe_id(path: Path = PROBE_FILE) -> str:
    """Which probe scores identification: the first 16 hex digits of its weights' sha256."""
    return sha256(_probe_file(path))[:16]


def load_probe(path: Path = PROBE_FILE) -> DesignProbe:
    probe = DesignProbe()
    probe.load_state_dict(load_file(str(_probe_file(path))))
    return probe.eval()


def save_probe(probe: DesignProbe, path: Path = PROBE_FILE) -> None:
    with atomic_path(path) as tmp:
        save_file({k: v.contiguous() for k, v in probe.state_dict().items()}, str(tmp))
