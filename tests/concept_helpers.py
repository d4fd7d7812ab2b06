"""Tiny trained concepts for the composition and app tests: a few coloured photos, two training
steps at 32 px (under a second each), written in the trainer's layout <outputs>/<name>/<method>/;
and the regional check that SD and SDXL share (``regional_attention_maps_are_confined``)."""

from __future__ import annotations

import copy
from pathlib import Path

import torch
from PIL import Image

from sbora.adapters import active_adapters, adapter_parameters
from sbora_diffusion.concept.config import ConceptConfig
from sbora_diffusion.concept.options import TrainConfig
from sbora_diffusion.concept.train import train
from sbora_diffusion.regional import RegionalPrompt, box_mask, regional_sampling

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


def regional_attention_maps_are_confined(composer, mode: str, context_dim: int, **unet_kwargs) -> dict[str, torch.Tensor]:
    """Concepts alpha (left half) and beta (right half) in two regions: perturbing one concept's adapters moves every
    position of its own half of each cross-attention output and nothing of the other half, and restoring them restores
    the outputs exactly. Returns the reference outputs per attn2 path, (h, w, C), for the caller's checks of the levels."""
    unet = composer.pipe.unet
    selection = {"alpha": 1.0, "beta": 1.0}
    g = torch.Generator().manual_seed(0)
    inputs = {}  # what every cross-attention layer sees in one UNet call on 8x8 latents (a 32 px image)

    def keep(path):
        def hook(module, args, kwargs):
            inputs[path] = (args[0], kwargs["encoder_hidden_states"])
        return hook

    hooks = [m.register_forward_pre_hook(keep(p), with_kwargs=True) for p, m in unet.named_modules() if p.endswith("attn2")]
    with torch.no_grad(), active_adapters(composer.parts, selection):
        unet(torch.randn(1, 4, 8, 8, generator=g), 10, torch.randn(1, 77, context_dim, generator=g), **unet_kwargs)
    for h in hooks:
        h.remove()
    regions = [RegionalPrompt({"alpha": 1.0}, torch.randn(1, 77, context_dim, generator=g), None, box_mask([0, 0, 0.5, 1], 32, 32)),
               RegionalPrompt({"beta": 1.0}, torch.randn(1, 77, context_dim, generator=g), None, box_mask([0.5, 0, 1, 1], 32, 32))]

    def maps() -> dict[str, torch.Tensor]:
        out = {}
        with torch.no_grad(), active_adapters(composer.parts, selection), regional_sampling(unet, regions, (8, 8), cfg=False, mode=mode):
            for path, (hidden, context) in inputs.items():
                y = unet.get_submodule(path)(hidden, encoder_hidden_states=context)  # (1, h*w, C)
                side = int(y.shape[1] ** 0.5)
                out[path] = y[0].view(side, side, -1)
        return out

    reference = maps()
    for name in ("beta", "alpha"):
        params = adapter_parameters(unet, name)
        saved = [p.detach().clone() for p in params]
        with torch.no_grad():
            for p in params:
                p.mul_(3.0).add_(0.5)
        changed = maps()
        with torch.no_grad():
            for p, s in zip(params, saved):
                p.copy_(s)
        for path, ref in reference.items():
            half = ref.shape[1] // 2
            diff = (changed[path] - ref).abs().sum(-1)  # (h, w): how much each position's output moved
            mine, theirs = (diff[:, half:], diff[:, :half]) if name == "beta" else (diff[:, :half], diff[:, half:])
            assert torch.all(theirs == 0), (name, path)  # the other region's attention output is untouched
            assert torch.all(mine > 0), (name, path)
    assert all(torch.equal(maps()[p], reference[p]) for p in reference)
    return reference
