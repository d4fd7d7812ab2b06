r"""Generate images from a base model plus (optionally) one concept adapter.

    python -m sbora_diffusion.generate --adapter outputs/robot/sbora-fa/adapter.safetensors \
        --prompt "a photo of {token} {class_word} on the beach" --num-images 4

Writes ``<out>/<prompt#>-<slug>/<seed>.png`` and ``<out>/manifest.jsonl`` (one JSON object
per image: image path relative to <out>, prompt, seed, concept, method, token, class_word).
Image k of a prompt uses seed k through its own torch.Generator (on the CPU, so a seed gives
the same starting noise on every device), as in Mix-of-Show's evaluation protocol.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

import torch
from tqdm.auto import tqdm

from .configuration import ConfigError
from .fileio import atomic_path, write_text


def render(pipe, prompts: list[str], seeds: list[int], *, steps: int = 50, guidance_scale: float = 7.5,
           height: int | None = None, width: int | None = None, batch_size: int = 4, desc: str = "generate") -> list:
    """One PIL image per (prompt, seed), prompt-major: [p0s0, p0s1, ..., p1s0, ...]."""
    jobs = [(p, s) for p in prompts for s in seeds]
    images = []
    pipe.set_progress_bar_config(disable=True)  # one bar over all images instead of one per call
    with tqdm(total=len(jobs), desc=desc, unit="img") as bar:
        for i in range(0, len(jobs), batch_size):
            chunk = jobs[i : i + batch_size]
            out = pipe(
                prompt=[p for p, _ in chunk], generator=[torch.Generator().manual_seed(s) for _, s in chunk],
                num_inference_steps=steps, guidance_scale=guidance_scale, height=height, width=width,
            )
            images += out.images
            bar.update(len(chunk))
    return images


def _slug(text: str, limit: int = 40) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")[:limit] or "prompt"


def fill_prompt(template: str, token: str | None, class_word: str | None) -> str:
    """Put the concept's token and class word into ``{token}``/``{class_word}`` placeholders, if any."""
    if "{" not in template:
        return template
    try:
        return template.format(token=token or "", class_word=class_word or "")
    except (KeyError, IndexError, ValueError) as e:
        raise ConfigError(f"prompt '{template}' has a bad placeholder ({e}); use only {{token}} and {{class_word}}") from None


def generate(pipe, prompts: list[str], seeds: list[int], out_dir, *, concept=None, method=None, token=None,
             class_word=None, steps=50, guidance_scale=7.5, height=None, width=None, batch_size=4) -> list[dict]:
    """Render every (prompt, seed) pair, write PNGs and ``manifest.jsonl`` under `out_dir`; return the records.

    Prompts may hold ``{token}`` and ``{class_word}``; the manifest records the filled prompt.
    """
    if not prompts or not seeds:
        raise ConfigError("generate needs at least one prompt and one seed")
    filled = [fill_prompt(p, token, class_word) for p in prompts]
    images = render(pipe, filled, list(seeds), steps=steps, guidance_scale=guidance_scale, height=height,
                    width=width, batch_size=batch_size)
    return save_images(images, filled, list(seeds), out_dir, concept=concept, method=method, token=token, class_word=class_word)


def save_images(images: list, prompts: list[str], seeds: list[int], out_dir, **fields) -> list[dict]:
    """Write prompt-major `images` as ``<out>/<prompt#>-<slug>/<seed>.png`` plus ``manifest.jsonl``; return the records.

    Each record holds image (relative to `out_dir`), prompt and seed, then `fields` (the same for every image).
    """
    out_dir = Path(out_dir)
    records = []
    for k, image in enumerate(images):
        pi, si = divmod(k, len(seeds))
        rel = Path(f"{pi:03d}-{_slug(prompts[pi])}") / f"{seeds[si]:05d}.png"
        with atomic_path(out_dir / rel) as tmp:
            image.save(tmp, format="PNG")
        records.append({"image": rel.as_posix(), "prompt": prompts[pi], "seed": int(seeds[si]), **fields})
    write_text(out_dir / "manifest.jsonl", "".join(json.dumps(r) + "\n" for r in records))
    return records


def parse_seeds(text: str) -> list[int]:
    """'0,1,5' or '0-3' (inclusive) -> list of ints."""
    seeds: list[int] = []
    try:
        for part in filter(None, (p.strip() for p in text.split(","))):
            lo, _, hi = part.partition("-")
            seeds += list(range(int(lo), int(hi) + 1)) if hi else [int(lo)]
    except ValueError:
        raise ConfigError(f"--seeds expects integers like '0,1,2' or '0-3', got '{text}'") from None
    if not seeds or len(seeds) > 100_000 or not all(0 <= s < 2**63 for s in seeds):
        raise ConfigError(f"--seeds '{text}' gives {len(seeds)} seeds; give 1 to 100000 seeds, each in 0..2^63-1")
    return seeds


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def build_parser() -> argparse.ArgumentParser:
    from .models import DEFAULT_MODEL

    p = argparse.ArgumentParser(prog="sbora-generate", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help=f"base model: embedded name, diffusers folder or hub id (default: the adapter's base, else {DEFAULT_MODEL})")
    p.add_argument("--adapter", default=None, help="concept adapter file (adapter.safetensors from train_concept.py)")
    p.add_argument("--prompt", action="append", default=None, help="prompt (repeat for several); may hold {token} and {class_word}. Default: the concept's eval prompts saved with the adapter")
    p.add_argument("--seeds", default=None, help="seeds, e.g. '0,1,2' or '0-49' (default: 0..num-images-1)")
    p.add_argument("--num-images", type=int, default=4, help="images per prompt when --seeds is not given (default: 4)")
    p.add_argument("--out", default=None, help="output folder (default: <adapter folder>/generated, or outputs/generated)")
    p.add_argument("--steps", type=int, default=50, help="DDIM steps (default: 50)")
    p.add_argument("--guidance-scale", type=float, default=7.5, help="classifier-free guidance scale (default: 7.5)")
    p.add_argument("--height", type=int, default=None, help="image height (default: the model's)")
    p.add_argument("--width", type=int, default=None, help="image width (default: the model's)")
    p.add_argument("--batch-size", type=int, default=4, help="images per pipeline call (default: 4)")
    p.add_argument("--device", default=None, help="cuda, cpu, ... (default: cuda if available)")
    p.add_argument("--dtype", choices=["float32", "float16", "bfloat16"], default=None, help="weights dtype (default: float16 on CUDA, else float32)")
    return p


def check_options(args: argparse.Namespace) -> None:
    """Every numeric option in range before anything is loaded or written."""
    from .configuration import check_fields

    check_fields(args, {"num_images": (1, 10_000), "steps": (1, 1000), "guidance_scale": (0, 100), "height": (8, 8192),
                        "width": (8, 8192), "batch_size": (1, 256)})


def _main(argv: list[str]) -> int:
    from .adapters import read_adapter
    from .models import DEFAULT_MODEL, load_pipeline

    args = build_parser().parse_args(argv)
    check_options(args)
    info, base = {}, None
    if args.adapter:
        file = read_adapter(args.adapter)
        info, base = file.extra, file.base_model
    prompts = args.prompt or info.get("eval_prompts")
    if not prompts:
        raise ConfigError("no prompts: pass --prompt (repeatable), or an --adapter saved with eval prompts")
    seeds = parse_seeds(args.seeds) if args.seeds else list(range(args.num_images))
    device = args.device or default_device()
    dtype = getattr(torch, args.dtype) if args.dtype else (torch.float16 if device.startswith("cuda") else None)
    out = Path(args.out) if args.out else (Path(args.adapter).parent / "generated" if args.adapter else Path("outputs/generated"))
    pipe = load_pipeline(args.model or base or DEFAULT_MODEL, adapter=args.adapter, device=device, dtype=dtype)
    records = generate(
        pipe, prompts, seeds, out, concept=info.get("concept"), method=info.get("method"), token=info.get("token"),
        class_word=info.get("class_word"), steps=args.steps, guidance_scale=args.guidance_scale,
        height=args.height, width=args.width, batch_size=args.batch_size,
    )
    print(f"wrote {len(records)} images and {out / 'manifest.jsonl'}")
    return 0


def main(argv: list[str] | None = None) -> int:
    from .cli import run_main

    return run_main(_main, argv)


if __name__ == "__main__":
    sys.exit(main())
