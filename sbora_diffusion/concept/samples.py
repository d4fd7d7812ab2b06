"""What a concept run shows of itself: the validation prompts drawn by the base and by the adapted
model side by side (samples.png, validation/step-*.png), a small picture of the adapted model's
own (preview.png, the app's concept card), and their CLIP-I against the photos."""

from __future__ import annotations

from pathlib import Path

import torch

from sbora.adapters import active_adapters
from sbora.fileio import atomic_path

from ..clip_score import image_alignment, replace_tokens, token_rules
from ..generate import render
from ..grids import labelled_grid
from ..kinds import kind_of
from .config import ConceptConfig
from .options import TrainConfig


def base_prompt(prompt: str, concept: ConceptConfig) -> str:
    """What the base model is asked beside the adapted one: the token replaced by the class word."""
    return replace_tokens(prompt, token_rules(concept.token, concept.class_word))


def sample_images(pipe, concept: ConceptConfig, cfg: TrainConfig, res: int, autocast) -> tuple[list[str], list, list]:
    """(prompts, base images, adapted images) of the validation prompts x seeds (seed-major per prompt)."""
    prompts = [concept.fill(p) for p in concept.validation_prompts]
    seeds = list(range(cfg.num_validation_images))
    kwargs = dict(steps=cfg.sample_steps, guidance_scale=cfg.guidance_scale, height=res, width=res)
    parts = kind_of(pipe).parts(pipe).values()
    for part in parts:
        part.eval()
    with torch.no_grad(), autocast():
        with active_adapters(parts, {}):
            base = render(pipe, [base_prompt(p, concept) for p in prompts], seeds, desc="samples (base)", **kwargs)
        adapted = render(pipe, prompts, seeds, desc="samples (adapted)", **kwargs)
    return prompts, base, adapted


def sample_grid(prompts: list[str], base: list, adapted: list) -> object:
    """Validation prompts (rows) x seeds, each as base model | adapted, labelled."""
    n = len(base) // len(prompts)
    images = [im for r in range(len(prompts)) for s in range(n) for im in (base[r * n + s], adapted[r * n + s])]
    labels = [f"{kind}, seed {s}" for s in range(n) for kind in ("base", "adapted")]
    return labelled_grid(images, rows=len(prompts), cols=2 * n, row_labels=prompts, col_labels=labels)


def preview_grid(adapted: list, per_prompt: int) -> object:
    """The run's card picture: the adapted images of the first validation prompt, at most four (2x2), unlabelled, so that
    a thumbnail shows the concept (the labelled grid is a wide strip of prompts x seeds x base | adapted)."""
    from diffusers.utils import make_image_grid

    images = adapted[: min(4, per_prompt)]
    rows = 2 if len(images) == 4 else 1
    return make_image_grid(images, rows=rows, cols=len(images) // rows)


def sample_scores(scorer, clip_model: str, references: list[Path], base: list, adapted: list) -> dict:
    """CLIP-I of the base's and the adapted samples against the concept's photos (clip_score's measure)."""
    refs = scorer.encode_images(references, desc="encode the concept's photos")  # (R, D)
    before = image_alignment(scorer.encode_images(base, desc="encode base samples"), refs)  # (N,)
    after = image_alignment(scorer.encode_images(adapted, desc="encode adapted samples"), refs)  # (N,)
    return {"clip_model": clip_model, "images": len(base), "references": len(references),
            "clip_i_base": float(before.mean()), "clip_i_adapted": float(after.mean()),
            "clip_i_per_image": {"base": before.tolist(), "adapted": after.tolist()}}


def save_samples(run_dir: Path, prompts: list[str], base: list, adapted: list) -> None:
    """A finished run's samples.png (the labelled grid) and preview.png (the card picture)."""
    save_png(sample_grid(prompts, base, adapted), run_dir / "samples.png")
    save_png(preview_grid(adapted, len(adapted) // len(prompts)), run_dir / "preview.png")


def save_png(image, path: Path) -> None:
    with atomic_path(path) as tmp:
        image.save(tmp, format="PNG")
