r"""Single-concept training: personalize Stable Diffusion to one concept from a few photos.

DreamBooth (Ruiz et al., 2023) with low-rank adapters instead of full fine-tuning, as in
Mix-of-Show and the SBoRA paper: any adapter method of the registry on the UNet's attention
(and optionally the CLIP text encoder), optionally a learned embedding for the concept's
token (Textual-Inversion style, "new" or "rare" token), optional prior preservation with
class images. Loss: MSE to the noise (epsilon) or to the velocity (v-prediction), as the
scheduler config says; optional Min-SNR-γ weighting (Hang et al., 2023) and noise offset.

    python train_concept.py --concept robot --method sbora-fa          # embedded tiny default
    accelerate launch train_concept.py --concept dog --method sbora-fa \
        --model /path/to/stable-diffusion-v1-5 --mixed-precision fp16

Outputs in ``outputs/<concept>/<method>/``: adapter.safetensors (+ adapter.text_encoder.safetensors),
config.yaml (everything resolved), samples.png, train_log.jsonl, logs/ (tensorboard),
validation/step-*.png, checkpoints/step-*.pt. Everything is checked before that folder is
created, so bad input leaves nothing behind.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
import yaml
from PIL import Image
from tqdm.auto import tqdm

from .adapters import AdapterConfig, adapted_layers, adapter_parameters, inject, load_adapter_config, set_adapter_enabled
from .checkpoint import capture_rng, list_checkpoints, load_checkpoint, restore_rng, save_checkpoint
from .concept_adapter import save_concept_adapter
from .concepts import ConceptConfig, ConceptError, image_files, load_concept, open_rgb
from .configuration import CONFIG_DIR, ConfigError, add_arguments, from_dict, load_yaml, override, overrides_from_args, resolve_named_config
from .fileio import atomic_path, write_text
from .generate import render
from .models import DEFAULT_MODEL, load_pipeline
from .tokens import TOKEN_MODES, install_concept_tokens


@dataclass
class TrainConfig:
    resolution: int | None = field(default=None, metadata={"help": "training/sampling resolution in pixels (none: the model's native size)"})
    train_batch_size: int = field(default=1, metadata={"help": "instance images per step and process (as many class images are added with prior preservation)"})
    max_train_steps: int = field(default=400, metadata={"help": "optimizer steps in total"})
    gradient_accumulation_steps: int = field(default=1, metadata={"help": "micro-batches per optimizer step"})
    learning_rate: float = field(default=1e-4, metadata={"help": "learning rate of the UNet adapter"})
    text_encoder_lr: float | None = field(default=None, metadata={"help": "learning rate of the text-encoder adapter (none: learning_rate)"})
    token_lr: float = field(default=1e-3, metadata={"help": "learning rate of the concept's token embeddings"})
    lr_scheduler: str = field(default="constant", metadata={"help": "diffusers schedule: constant, constant_with_warmup, linear, cosine, ..."})
    lr_warmup_steps: int = field(default=0, metadata={"help": "warm-up steps of the learning-rate schedule"})
    adam_beta1: float = field(default=0.9, metadata={"help": "Adam beta1"})
    adam_beta2: float = field(default=0.999, metadata={"help": "Adam beta2"})
    adam_weight_decay: float = field(default=1e-2, metadata={"help": "AdamW weight decay of the adapters (none on token embeddings)"})
    adam_epsilon: float = field(default=1e-8, metadata={"help": "Adam epsilon"})
    max_grad_norm: float = field(default=1.0, metadata={"help": "gradient clipping norm (0: no clipping)"})
    use_8bit_adam: bool = field(default=False, metadata={"help": "bitsandbytes 8-bit AdamW (needs CUDA and pip install bitsandbytes)"})
    mixed_precision: str = field(default="no", metadata={"help": "no, fp16 or bf16 (frozen weights in that dtype, adapters in fp32)"})
    gradient_checkpointing: bool = field(default=False, metadata={"help": "recompute activations in the backward pass: less memory, more compute"})
    train_text_encoder: bool = field(default=False, metadata={"help": "also put adapters on the CLIP text encoder"})
    text_encoder_targets: list[str] = field(default_factory=lambda: ["clip-text"], metadata={"help": "targets of the text-encoder adapter (presets clip-text, clip-text-mlp, or suffixes)"})
    token_mode: str = field(default="new", metadata={"help": "concept token embeddings: new (add the token, learn it), rare (learn an existing word's embedding), none (token stays plain text)"})
    with_prior_preservation: bool = field(default=False, metadata={"help": "DreamBooth prior preservation with class images"})
    prior_loss_weight: float = field(default=1.0, metadata={"help": "weight of the class-image loss"})
    num_class_images: int = field(default=100, metadata={"help": "class images to use; missing ones are generated once with the base model and cached"})
    prediction_type: str | None = field(default=None, metadata={"help": "epsilon or v_prediction (none: the scheduler config's)"})
    snr_gamma: float | None = field(default=None, metadata={"help": "Min-SNR-gamma loss weighting (5.0 is the paper's; none: off)"})
    noise_offset: float = field(default=0.0, metadata={"help": "noise offset (e.g. 0.05; 0: off)"})
    center_crop: bool = field(default=True, metadata={"help": "centre crop after resizing (else a random crop each time)"})
    random_flip: bool = field(default=False, metadata={"help": "flip images horizontally at random (off: keeps asymmetric concepts right)"})
    validation_steps: int = field(default=100, metadata={"help": "save a validation grid every N steps (0: only at the end)"})
    num_validation_images: int = field(default=2, metadata={"help": "images per validation prompt (seeds 0..N-1)"})
    sample_steps: int = field(default=25, metadata={"help": "DDIM steps of validation and class images"})
    guidance_scale: float = field(default=7.5, metadata={"help": "classifier-free guidance of validation and class images"})
    checkpointing_steps: int = field(default=200, metadata={"help": "write a resumable checkpoint every N steps (and at the end)"})
    checkpoints_total_limit: int = field(default=2, metadata={"help": "checkpoints to keep"})
    train_seed: int = field(default=0, metadata={"help": "seed of data order, noise, timesteps and validation"})
    output_dir: str = field(default="outputs", metadata={"help": "outputs go to <output_dir>/<concept>/<method>/"})

    def validate(self) -> None:
        positive = ["train_batch_size", "max_train_steps", "gradient_accumulation_steps", "num_validation_images", "sample_steps"]
        for name in positive:
            if getattr(self, name) <= 0:
                raise ConfigError(f"{name} must be positive, got {getattr(self, name)}")
        if self.resolution is not None and (self.resolution <= 0 or self.resolution % 8):
            raise ConfigError(f"resolution must be a positive multiple of 8, got {self.resolution}")
        if self.mixed_precision not in ("no", "fp16", "bf16"):
            raise ConfigError(f"mixed_precision must be no, fp16 or bf16, got '{self.mixed_precision}'")
        if self.token_mode not in TOKEN_MODES:
            raise ConfigError(f"token_mode must be one of {', '.join(TOKEN_MODES)}, got '{self.token_mode}'")
        if self.prediction_type not in (None, "epsilon", "v_prediction"):
            raise ConfigError(f"prediction_type must be epsilon or v_prediction, got '{self.prediction_type}'")


def load_train_config(name_or_path: str | None = None, model: str = DEFAULT_MODEL, **overrides) -> TrainConfig:
    """``configs/train/<name>.yaml`` (or a YAML path), then overrides.

    Without a name: ``configs/train/<model>.yaml`` for an embedded base that has one (the
    tiny default trains in about a minute with its own), else ``configs/train/default.yaml``.
    """
    if name_or_path is None:
        name_or_path = model if (CONFIG_DIR / "train" / f"{model}.yaml").is_file() else "default"
    path = resolve_named_config("train", name_or_path)
    config = from_dict(TrainConfig, load_yaml(path), source=str(path))
    return override(config, overrides, source="overrides") if overrides else config


@dataclass
class TrainResult:
    out_dir: Path
    adapter_path: Path
    pipe: object
    step: int
    losses: list[float]
    is_main_process: bool = True


# ---------------------------------------------------------------------------------------------
# Data: every image decoded and checked up front (a handful of photos, plus class images).


def load_images(paths: list[Path], resolution: int) -> list[torch.Tensor]:
    """Decode, resize the shorter side to `resolution`; uint8 (3, H, W) each."""
    out = []
    for p in paths:
        im = open_rgb(p)
        scale = resolution / min(im.size)
        im = im.resize((max(resolution, round(im.width * scale)), max(resolution, round(im.height * scale))), resample=Image.BICUBIC)
        out.append(torch.from_numpy(np.asarray(im).copy()).permute(2, 0, 1))
    return out


def crop_batch(images: list[torch.Tensor], idx: torch.Tensor, cfg: TrainConfig, res: int, gen: torch.Generator) -> torch.Tensor:
    """Crop (centre or random) and maybe flip the chosen images; (B, 3, res, res) in [-1, 1]."""
    batch = []
    for i in idx.tolist():
        im = images[i]
        h, w = im.shape[1:]
        if cfg.center_crop:
            top, left = (h - res) // 2, (w - res) // 2
        else:
            top = int(torch.randint(0, h - res + 1, (1,), generator=gen))
            left = int(torch.randint(0, w - res + 1, (1,), generator=gen))
        im = im[:, top : top + res, left : left + res]
        if cfg.random_flip and bool(torch.rand(1, generator=gen) < 0.5):
            im = im.flip(-1)
        batch.append(im)
    return torch.stack(batch).float() / 127.5 - 1.0


def sample_batch(instance_images, class_images, instance_ids, class_ids, cfg: TrainConfig, res: int, gen: torch.Generator):
    """One micro-batch: B random instance images (+ B class images with prior preservation) and their prompt ids."""
    idx = torch.randint(0, len(instance_images), (cfg.train_batch_size,), generator=gen)
    pixels, ids = crop_batch(instance_images, idx, cfg, res, gen), instance_ids  # (B, 3, res, res), (B, 77)
    if class_images:
        cidx = torch.randint(0, len(class_images), (cfg.train_batch_size,), generator=gen)
        pixels = torch.cat([pixels, crop_batch(class_images, cidx, cfg, res, gen)])  # (2B, 3, res, res)
        ids = torch.cat([instance_ids, class_ids])
    return pixels, ids


def tokenize(tokenizer, prompt: str, n: int) -> torch.Tensor:
    ids = tokenizer(prompt, padding="max_length", max_length=tokenizer.model_max_length, truncation=True, return_tensors="pt").input_ids
    return ids.expand(n, -1)  # (n, 77)


def class_image_paths(pipe, model: str, concept: ConceptConfig, cfg: TrainConfig, res: int) -> list[Path]:
    """The concept's class images: its class_dir, or generated once with the base model and cached.

    Generated ones live in ``<output_dir>/class_images/<model>-<prompt>-<res>px/`` and are
    shared by every method and concept with the same base and class prompt. Call with all
    adapters off: the images must come from the base model.
    """
    if concept.class_dir:
        return image_files(concept.class_dir, what="class images", hint="give a folder of class images, or class_dir: null to generate them")[: cfg.num_class_images]
    slug = "".join(c if c.isalnum() else "-" for c in f"{Path(model).name}/{concept.fill(concept.class_prompt)}-{res}px")
    folder = Path(cfg.output_dir) / "class_images" / slug
    have = sorted(folder.glob("*.png")) if folder.is_dir() else []
    if len(have) < cfg.num_class_images:
        seeds = list(range(len(have), cfg.num_class_images))
        images = render(pipe, [concept.fill(concept.class_prompt)], seeds, steps=cfg.sample_steps,
                        guidance_scale=cfg.guidance_scale, height=res, width=res, desc="class images")
        for seed, image in zip(seeds, images):
            with atomic_path(folder / f"{seed:05d}.png") as tmp:
                image.save(tmp, format="PNG")
    return sorted(folder.glob("*.png"))[: cfg.num_class_images]


# ---------------------------------------------------------------------------------------------
# Model set-up: adapters, token embeddings, precision, optimizer.


def make_optimizer(cfg: TrainConfig, groups: list[dict]) -> torch.optim.Optimizer:
    kwargs = dict(betas=(cfg.adam_beta1, cfg.adam_beta2), eps=cfg.adam_epsilon)
    if cfg.use_8bit_adam:
        import bitsandbytes as bnb  # checked by check_device_options

        return bnb.optim.AdamW8bit(groups, **kwargs)
    return torch.optim.AdamW(groups, **kwargs)


def check_device_options(cfg: TrainConfig) -> None:
    """Options that need CUDA, refused up front on a machine without it."""
    if cfg.mixed_precision == "fp16" and not torch.cuda.is_available():
        raise ConfigError("--mixed-precision fp16 needs a CUDA GPU (CPU autocast does not cover fp16); use bf16 or no on this machine")
    if not cfg.use_8bit_adam:
        return
    if not torch.cuda.is_available():
        raise ConfigError("--use-8bit-adam needs a CUDA GPU (bitsandbytes' 8-bit optimizers run on CUDA); drop the flag on this machine")
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        raise ConfigError("--use-8bit-adam needs the bitsandbytes package: pip install bitsandbytes (or drop the flag)") from None


def set_up_adapters(pipe, concept: ConceptConfig, adapter: AdapterConfig, te_adapter: AdapterConfig | None, cfg: TrainConfig):
    """Inject the adapters and token embeddings (frozen base); return the optimizer's param groups."""
    pipe.vae.requires_grad_(False)
    pipe.text_encoder.requires_grad_(False)
    inject(pipe.unet, adapter, name=concept.name)
    groups = [{"params": adapter_parameters(pipe.unet, concept.name), "lr": cfg.learning_rate, "weight_decay": cfg.adam_weight_decay}]
    if te_adapter is not None:
        inject(pipe.text_encoder, te_adapter, name=concept.name)
        groups.append({"params": adapter_parameters(pipe.text_encoder, concept.name),
                       "lr": cfg.text_encoder_lr or cfg.learning_rate, "weight_decay": cfg.adam_weight_decay})
    tokens = None
    if cfg.token_mode != "none":
        tokens = install_concept_tokens(pipe.tokenizer, pipe.text_encoder, concept.token, cfg.token_mode, init_word=concept.class_word)
        groups.append({"params": [tokens.vectors], "lr": cfg.token_lr, "weight_decay": 0.0})
    return groups, tokens


def switch_adapters(pipe, name: str, enabled: bool) -> None:
    for model in (pipe.unet, pipe.text_encoder):
        if adapted_layers(model, name):
            set_adapter_enabled(model, name, enabled)


def trainable_named(pipe) -> dict[str, torch.nn.Parameter]:
    """Every trainable parameter, by a stable name (checkpoint keys)."""
    return {f"{part}.{n}": p for part in ("unet", "text_encoder") for n, p in getattr(pipe, part).named_parameters() if p.requires_grad}


def restore_state(state: dict, params: dict, optimizer, lr_scheduler, gen: torch.Generator) -> int:
    """Put a checkpoint back exactly: trainable tensors, optimizer, schedule, every RNG; returns its step."""
    mismatch = sorted(set(params) ^ set(state["trainable"]))
    if mismatch or any(state["trainable"][k].shape != p.shape for k, p in params.items()):
        raise ConfigError("--resume: the checkpoint does not fit this run (method, rank, targets or token mode changed); "
                          f"train without --resume. Differing: {', '.join(mismatch[:5]) or 'tensor shapes'}")
    with torch.no_grad():
        for k, p in params.items():
            p.copy_(state["trainable"][k])
    optimizer.load_state_dict(state["optimizer"])
    lr_scheduler.load_state_dict(state["scheduler"])
    restore_rng(state["rng"])
    gen.set_state(state["generator"])
    return int(state["step"])


def cast_frozen(pipe, dtype: torch.dtype) -> None:
    """Frozen weights to the mixed-precision dtype; trainable ones stay fp32 (as diffusers' scripts)."""
    for part in (pipe.unet, pipe.text_encoder, pipe.vae):
        for p in part.parameters():
            if not p.requires_grad:
                p.data = p.data.to(dtype)


# ---------------------------------------------------------------------------------------------
# The loss of one micro-batch.


def diffusion_loss(pipe, noise_scheduler, unet, text_encoder, pixels, input_ids, cfg: TrainConfig, n_instance: int,
                   gen: torch.Generator) -> torch.Tensor:
    """Denoising loss; with prior preservation the batch is [instance; class] and the class half is weighted."""
    device, vae = pixels.device, pipe.vae
    with torch.no_grad():
        dist = vae.encode(pixels.to(vae.dtype)).latent_dist
        latents = dist.sample(generator=gen) * vae.config.scaling_factor  # (B, 4, h, w)
    latents = latents.float()
    noise = torch.randn(latents.shape, generator=gen).to(device)
    if cfg.noise_offset:
        noise = noise + cfg.noise_offset * torch.randn((*latents.shape[:2], 1, 1), generator=gen).to(device)
    t = torch.randint(0, noise_scheduler.config.num_train_timesteps, (latents.shape[0],), generator=gen).to(device)
    noisy = noise_scheduler.add_noise(latents, noise, t)
    context = text_encoder(input_ids.to(device))[0]  # (B, 77, D)
    pred = unet(noisy, t, context).sample.float()
    if noise_scheduler.config.prediction_type == "v_prediction":
        target = noise_scheduler.get_velocity(latents, noise, t)
    else:
        target = noise
    per_sample = F.mse_loss(pred, target, reduction="none").mean(dim=(1, 2, 3))  # (B,)
    if cfg.snr_gamma is not None:
        from diffusers.training_utils import compute_snr

        snr = compute_snr(noise_scheduler, t)
        weight = torch.clamp(snr, max=cfg.snr_gamma)
        per_sample = per_sample * weight / (snr + 1 if noise_scheduler.config.prediction_type == "v_prediction" else snr)
    loss = per_sample[:n_instance].mean()
    if per_sample.shape[0] > n_instance:
        loss = loss + cfg.prior_loss_weight * per_sample[n_instance:].mean()
    return loss


# ---------------------------------------------------------------------------------------------
# Outputs.


def save_grid(pipe, concept: ConceptConfig, cfg: TrainConfig, res: int, path: Path, autocast) -> "object":
    """Validation prompts x seeds 0..N-1 as one PNG grid (rows: prompts)."""
    from diffusers.utils import make_image_grid

    prompts = [concept.fill(p) for p in concept.validation_prompts]
    for model in (pipe.unet, pipe.text_encoder):
        model.eval()
    with torch.no_grad(), autocast():
        images = render(pipe, prompts, list(range(cfg.num_validation_images)), steps=cfg.sample_steps,
                        guidance_scale=cfg.guidance_scale, height=res, width=res, desc="validation")
    grid = make_image_grid(images, rows=len(prompts), cols=cfg.num_validation_images)
    with atomic_path(path) as tmp:
        grid.save(tmp, format="PNG")
    return grid


def resolved_config(model: str, method: str, concept, adapter, te_adapter, cfg) -> dict:
    return {"model": model, "method": method, "concept": dataclasses.asdict(concept), "adapter": dataclasses.asdict(adapter),
            "text_encoder_adapter": dataclasses.asdict(te_adapter) if te_adapter else None, "train": dataclasses.asdict(cfg)}


# ---------------------------------------------------------------------------------------------


def train(
    concept: str | ConceptConfig, method: str = "sbora-fa", model: str = DEFAULT_MODEL, *,
    train_config: TrainConfig | None = None, adapter_overrides: dict | None = None, concept_overrides: dict | None = None,
    resume: bool | str = False, pipe=None,
) -> TrainResult:
    """Train one concept adapter; see the module docstring. `pipe` (modified in place) skips loading `model`."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState
    from accelerate.utils import ProjectConfiguration, set_seed
    from diffusers import DDPMScheduler
    from diffusers.optimization import get_scheduler

    cfg = train_config or load_train_config(model=model)
    # 1. Everything that can be wrong is checked before anything is written.
    concept = concept if isinstance(concept, ConceptConfig) else load_concept(concept, **(concept_overrides or {}))
    instance_paths = concept.instance_images()
    adapter = load_adapter_config(method, **(adapter_overrides or {}))
    te_adapter = override(adapter, {"targets": cfg.text_encoder_targets}) if cfg.train_text_encoder else None
    check_device_options(cfg)
    out_dir = Path(cfg.output_dir) / concept.name / method
    ckpt_dir = out_dir / "checkpoints"
    if resume and not list_checkpoints(resume if isinstance(resume, str) else ckpt_dir):
        raise ConfigError(f"--resume: no checkpoint (step-*.pt) in {resume if isinstance(resume, str) else ckpt_dir}; train without --resume first")
    # accelerate keeps one process-wide state; each train() call (tests, notebooks) sets its own precision.
    AcceleratorState._reset_state(reset_partial_state=False)
    accelerator = Accelerator(
        mixed_precision=cfg.mixed_precision, gradient_accumulation_steps=cfg.gradient_accumulation_steps, log_with="tensorboard",
        project_config=ProjectConfiguration(project_dir=str(out_dir), logging_dir=str(out_dir / "logs")),
    )
    set_seed(cfg.train_seed)
    pipe = pipe if pipe is not None else load_pipeline(model)
    res = cfg.resolution or pipe.unet.config.sample_size * pipe.vae_scale_factor
    instance_images = load_images(instance_paths, res)
    groups, tokens = set_up_adapters(pipe, concept, adapter, te_adapter, cfg)  # rank/target errors surface here

    device = accelerator.device
    weight_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(accelerator.mixed_precision, torch.float32)
    pipe.to(device)
    class_images = []
    if cfg.with_prior_preservation:
        switch_adapters(pipe, concept.name, False)  # class images come from the base model
        # One process generates the missing class images, the others then read them.
        with accelerator.main_process_first(), accelerator.autocast():
            class_images = load_images(class_image_paths(pipe, model, concept, cfg, res), res)
        switch_adapters(pipe, concept.name, True)
    cast_frozen(pipe, weight_dtype)
    if cfg.gradient_checkpointing:
        pipe.unet.enable_gradient_checkpointing()
        if te_adapter is not None or tokens is not None:
            te = pipe.text_encoder  # transformers 5 name; older releases only have gradient_checkpointing_enable
            (getattr(te, "activation_checkpointing_enable", None) or te.gradient_checkpointing_enable)()

    noise_scheduler = DDPMScheduler.from_config(pipe.scheduler.config, **({"prediction_type": cfg.prediction_type} if cfg.prediction_type else {}))
    optimizer = make_optimizer(cfg, groups)
    lr_scheduler = get_scheduler(cfg.lr_scheduler, optimizer, num_warmup_steps=cfg.lr_warmup_steps * accelerator.num_processes,
                                 num_training_steps=cfg.max_train_steps * accelerator.num_processes)
    train_te = te_adapter is not None or tokens is not None
    unet = accelerator.prepare(pipe.unet)
    text_encoder = accelerator.prepare(pipe.text_encoder) if train_te else pipe.text_encoder
    optimizer, lr_scheduler = accelerator.prepare(optimizer, lr_scheduler)
    params = trainable_named(pipe)
    gen = torch.Generator().manual_seed(cfg.train_seed + accelerator.process_index)

    step = 0
    if resume:
        state = load_checkpoint(resume if isinstance(resume, str) else ckpt_dir)
        step = restore_state(state, params, optimizer, lr_scheduler, gen)

    # 2. From here on the output folder exists.
    if accelerator.is_main_process:
        if not resume and ckpt_dir.is_dir():
            print(f"starting over: removing the earlier run's checkpoints in {ckpt_dir} (pass --resume to continue it)")
            shutil.rmtree(ckpt_dir)
        write_text(out_dir / "config.yaml", yaml.safe_dump(resolved_config(model, method, concept, adapter, te_adapter, cfg), sort_keys=False))
    accelerator.init_trackers("train_concept", config={k: v if isinstance(v, (int, float, str, bool)) else str(v) for k, v in dataclasses.asdict(cfg).items()})
    autocast = accelerator.autocast

    def checkpoint() -> Path | None:
        if not accelerator.is_main_process:
            return None
        return save_checkpoint(ckpt_dir, {
            "step": step, "trainable": {k: p.detach().cpu() for k, p in params.items()},
            "optimizer": optimizer.state_dict(), "scheduler": lr_scheduler.state_dict(),
            "rng": capture_rng(), "generator": gen.get_state(),
        }, keep=cfg.checkpoints_total_limit)

    def sample_grid(path: Path) -> None:
        if accelerator.is_main_process:
            grid = save_grid(pipe, concept, cfg, res, path, autocast)
            tracker = accelerator.get_tracker("tensorboard", unwrap=True)
            tracker.add_image("validation", np.asarray(grid), step, dataformats="HWC")
        unet.train()
        text_encoder.train()

    instance_ids = tokenize(pipe.tokenizer, concept.fill(concept.instance_prompt), cfg.train_batch_size)
    class_ids = tokenize(pipe.tokenizer, concept.fill(concept.class_prompt), cfg.train_batch_size)
    losses: list[float] = []
    unet.train()
    text_encoder.train()
    bar = tqdm(total=cfg.max_train_steps, initial=step, desc=f"train {concept.name}/{method}", unit="step",
               disable=not accelerator.is_local_main_process)
    log = open(out_dir / "train_log.jsonl", "a" if resume else "w") if accelerator.is_main_process else None
    try:
        while step < cfg.max_train_steps:
            for _ in range(cfg.gradient_accumulation_steps):
                with accelerator.accumulate(unet, text_encoder):
                    pixels, ids = sample_batch(instance_images, class_images, instance_ids, class_ids, cfg, res, gen)
                    with autocast():
                        loss = diffusion_loss(pipe, noise_scheduler, unet, text_encoder, pixels.to(device), ids, cfg,
                                              cfg.train_batch_size, gen)
                    accelerator.backward(loss)
                    if accelerator.sync_gradients and cfg.max_grad_norm > 0:
                        accelerator.clip_grad_norm_(list(params.values()), cfg.max_grad_norm)
                    optimizer.step()
                    lr_scheduler.step()
                    optimizer.zero_grad(set_to_none=True)
            step += 1
            value = accelerator.gather(loss.detach()[None]).mean().item()
            if not math.isfinite(value):
                raise FloatingPointError(f"the loss became {value} at step {step}; lower --learning-rate or use --mixed-precision bf16/no")
            losses.append(value)
            lr = lr_scheduler.get_last_lr()[0]
            bar.update(1)
            bar.set_postfix(loss=f"{value:.4f}", lr=f"{lr:.2e}")
            accelerator.log({"loss": value, "lr": lr}, step=step)
            if log:
                log.write(json.dumps({"step": step, "loss": value, "lr": lr, "time": time.time()}) + "\n")
                log.flush()
            if cfg.checkpointing_steps and step % cfg.checkpointing_steps == 0 and step < cfg.max_train_steps:
                checkpoint()
            if cfg.validation_steps and step % cfg.validation_steps == 0 and step < cfg.max_train_steps:
                sample_grid(out_dir / "validation" / f"step-{step:06d}.png")
    except KeyboardInterrupt:
        bar.close()
        path = checkpoint()
        accelerator.end_training()
        print(f"\ninterrupted at step {step}: saved {path}; continue with the same command plus --resume", file=sys.stderr)
        raise SystemExit(130) from None
    finally:
        bar.close()
        if log:
            log.close()
    accelerator.wait_for_everyone()
    adapter_path = out_dir / "adapter.safetensors"
    if accelerator.is_main_process:
        checkpoint()
        info = {"concept": concept.name, "method": method, "token": concept.token, "class_word": concept.class_word,
                "token_mode": cfg.token_mode, "eval_prompts": concept.eval_prompts, "validation_prompts": concept.validation_prompts}
        save_concept_adapter(pipe, adapter_path, concept.name, base_model=str(model), info=info, tokens=tokens, token_mode=cfg.token_mode)
        sample_grid(out_dir / "samples.png")
    accelerator.end_training()
    for m in (pipe.unet, pipe.text_encoder):
        m.eval()
    return TrainResult(out_dir=out_dir, adapter_path=adapter_path, pipe=pipe, step=step, losses=losses,
                       is_main_process=accelerator.is_main_process)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="train_concept.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--concept", required=True, help="concept name (configs/concepts/NAME.yaml), a concept YAML file, or a folder of images")
    p.add_argument("--method", default="sbora-fa", help="adapter method: configs/methods/METHOD.yaml or a YAML path (default: sbora-fa)")
    p.add_argument("--model", default=DEFAULT_MODEL, help=f"base model: '{DEFAULT_MODEL}' (embedded, offline), a local diffusers folder, or a hub id (default: {DEFAULT_MODEL})")
    p.add_argument("--train-config", default=None, help="training config: configs/train/NAME.yaml or a YAML path "
                   "(default: configs/train/<model>.yaml for an embedded model that has one, else configs/train/default.yaml)")
    p.add_argument("--resume", nargs="?", const=True, default=False, metavar="CHECKPOINT",
                   help="continue from the newest checkpoint in the output folder (or the given file/folder): step, optimizer, scheduler and RNG")
    add_arguments(p, ConceptConfig)
    add_arguments(p, AdapterConfig, skip=("method",))
    add_arguments(p, TrainConfig)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        cfg = load_train_config(args.train_config, args.model, **overrides_from_args(args, TrainConfig))
        result = train(
            args.concept, args.method, args.model, train_config=cfg,
            adapter_overrides={k: v for k, v in overrides_from_args(args, AdapterConfig).items() if k != "method"},
            concept_overrides=overrides_from_args(args, ConceptConfig),
            resume=args.resume,
        )
    except (ConfigError, ConceptError, FloatingPointError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if not result.is_main_process:
        return 0
    print(f"done: {result.step} steps, final loss {result.losses[-1] if result.losses else float('nan'):.4f}\n"
          f"  adapter  {result.adapter_path}\n  samples  {result.out_dir / 'samples.png'}\n"
          f"  generate python -m sbora_diffusion.generate --adapter {result.adapter_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
