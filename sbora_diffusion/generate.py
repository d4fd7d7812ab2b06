r"""Generate images from a base model plus (optionally) one concept adapter.

    python -m sbora_diffusion.generate --adapter outputs/robot/sbora-fa/adapter.safetensors \
        --prompt "a photo of {token} {class_word} on the beach" --num-images 4

Writes ``<output-dir>/<prompt#>-<slug>/<seed>.png`` and ``<output-dir>/manifest.jsonl`` (one JSON
object per image: image path relative to the folder, prompt, seed, concept, method, token, class_word).
Image k of a prompt uses seed k through its own torch.Generator (on the CPU, so a seed gives
the same starting noise on every device), as in Mix-of-Show's evaluation protocol.
"""

from __future__ import annotations

import json
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm

from sbora.cli import Command, Flag, Invocation, Section
from sbora.configuration import ConfigError, check_fields
from sbora.fileio import atomic_path, write_text

from .models import DEFAULT_MODEL, load_pipeline

DTYPES = ("float32", "float16", "bfloat16")


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


def default_device(device: str | None = None) -> str:
    """The device to run on: `device`, or for none/auto CUDA when available, else the CPU."""
    return device if device not in (None, "auto") else "cuda" if torch.cuda.is_available() else "cpu"


def dtype_for(dtype: str | None, device: str) -> torch.dtype | None:
    """The weights' dtype: `dtype`, else float16 on CUDA (None: the pipeline's float32)."""
    return getattr(torch, dtype) if dtype else (torch.float16 if device.startswith("cuda") else None)


@dataclass
class GenerateConfig:
    """What ``sbora-generate`` renders and how (its prompts are ``--prompt``, each taken whole)."""

    model: str | None = field(default=None, metadata={"help": f"base model: embedded name, diffusers folder or hub id (none: the adapter's base, else {DEFAULT_MODEL})"})
    adapter: str | None = field(default=None, metadata={"help": "concept adapter file (adapter.safetensors from train_concept.py)"})
    seeds: str | None = field(default=None, metadata={"help": "seeds, e.g. '0,1,2' or '0-49' (none: 0..num-images-1)"})
    num_images: int = field(default=4, metadata={"help": "images per prompt when --seeds is not given"})
    output_dir: str | None = field(default=None, metadata={"help": "output folder (none: <adapter folder>/generated, or outputs/generated)", "aliases": ("out",)})
    sample_steps: int = field(default=50, metadata={"help": "DDIM steps", "aliases": ("steps",)})
    guidance_scale: float = field(default=7.5, metadata={"help": "classifier-free guidance scale"})
    height: int | None = field(default=None, metadata={"help": "image height (none: the model's)"})
    width: int | None = field(default=None, metadata={"help": "image width (none: the model's)"})
    batch_size: int = field(default=4, metadata={"help": "images per pipeline call"})
    device: str = field(default="auto", metadata={"help": "cuda, cuda:1, cpu, ... or auto (CUDA when available)"})
    dtype: str | None = field(default=None, metadata={"help": f"weights dtype: {', '.join(DTYPES)} (none: float16 on CUDA, else float32)"})

    def validate(self) -> None:
        """Every numeric option in range before anything is loaded or written."""
        check_fields(self, {"num_images": (1, 10_000), "sample_steps": (1, 1000), "guidance_scale": (0, 100), "height": (8, 8192),
                            "width": (8, 8192), "batch_size": (1, 256)})
        if self.dtype not in (None, *DTYPES):
            raise ConfigError(f"dtype must be one of {', '.join(DTYPES)}, got '{self.dtype}'")


def _run(invocation: Invocation) -> None:
    from sbora.adapters import read_adapter

    cfg: GenerateConfig = invocation.configs["generate"]
    info, base = {}, None
    if cfg.adapter:
        file = read_adapter(cfg.adapter)
        info, base = file.extra, file.base_model
    prompts = invocation.args.prompt or info.get("eval_prompts")
    if not prompts:
        raise ConfigError("no prompts: pass --prompt (repeatable), or an --adapter saved with eval prompts")
    seeds = parse_seeds(cfg.seeds) if cfg.seeds else list(range(cfg.num_images))
    device = default_device(cfg.device)
    out = Path(cfg.output_dir) if cfg.output_dir else (Path(cfg.adapter).parent / "generated" if cfg.adapter else Path("outputs/generated"))
    pipe = load_pipeline(cfg.model or base or DEFAULT_MODEL, adapter=cfg.adapter, device=device, dtype=dtype_for(cfg.dtype, device))
    records = generate(
        pipe, prompts, seeds, out, concept=info.get("concept"), method=info.get("method"), token=info.get("token"),
        class_word=info.get("class_word"), steps=cfg.sample_steps, guidance_scale=cfg.guidance_scale,
        height=cfg.height, width=cfg.width, batch_size=cfg.batch_size,
    )
    print(f"wrote {len(records)} images and {out / 'manifest.jsonl'}")


COMMAND = Command(
    "sbora-generate", __doc__, _run, sections=(Section("generate", GenerateConfig, title="generation options"),),
    flags=(Flag("prompt", "prompt (repeat for several, each taken whole); may hold {token} and {class_word}", action="append", metavar="PROMPT",
                shown="the concept's eval prompts saved with the adapter"),),
)
main = COMMAND.main


if __name__ == "__main__":
    sys.exit(main())
