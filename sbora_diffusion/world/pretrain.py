"""Pretrain the pocket world's models on 2 CPU cores: the pocket CLIP and the pocket base.

    python -m sbora_diffusion.world.pretrain all --work /tmp/pocket-work     # the shipped run
    python -m sbora_diffusion.world.pretrain vae --work DIR --vae-steps 100  # one stage

Stages (each reads the previous stages' outputs from ``--work``, so any can be rerun alone):

``data``     render the training world (``--num-images`` seeded scenes, seeds 0..N-1) with a
             second view of every object (same design, other place and background);
``clip``     the pocket CLIP: an open_clip ``CLIP`` (ViT image tower on 64x64, text tower
             with CLIP's BPE vocabulary) trained with the contrastive caption loss plus an
             instance loss between the two views of each object (so image features tell
             unseen object designs apart: what CLIP-I needs);
``vae``      the AutoencoderKL (f = 4: 64x64x3 -> 16x16x4), L1 + MSE reconstruction and a small KL;
``latents``  encode every training image once (posterior mean), fit the latent scaling factor;
``unet``     the UNet2DConditionModel on cached latents, jointly with the text encoder, which
             starts as the pocket CLIP's text tower converted to a transformers
             ``CLIPTextModel`` (the way Stable Diffusion conditions on CLIP's text encoder);
             epsilon prediction on SD's noise schedule, min-SNR weighting, 10% empty captions
             (classifier-free guidance), EMA weights;
``export``   write ``pocket-sd/`` (a StableDiffusionPipeline folder) and ``pocket-clip/`` (an
             open_clip ``local-dir:`` folder) with a record (command, seed, steps, durations,
             measurements, sha256 of every file);
``measure``  prompt following of the exported base (asked colour in the asked half) and
             retrieval / concept identification of the exported CLIP, written into the records.

Everything is seeded; CPU float32 training on a given torch build repeats closely but
not bit for bit across machines.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import random
import shlex
import sys
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from . import POCKET_CLIP_DIR, POCKET_SD_DIR, WEIGHTS_DIR
from . import generator as g

EVAL_SEED0 = 10_000_000  # held-out world images use seeds from here on (training uses 0..N-1)
IMAGE_MEAN = (0.5, 0.5, 0.5)
IMAGE_STD = (0.5, 0.5, 0.5)

# Architectures. The text tower is shared in shape by the CLIP and the base's text encoder.
TEXT_WIDTH, TEXT_LAYERS, TEXT_HEADS, CONTEXT_LENGTH = 32, 4, 4, 77
CLIP_MODEL_CFG = {
    "embed_dim": 64,
    "vision_cfg": {"image_size": 64, "layers": 4, "width": 96, "patch_size": 8, "head_width": 32, "mlp_ratio": 3},
    "text_cfg": {"context_length": CONTEXT_LENGTH, "vocab_size": 49408, "width": TEXT_WIDTH, "heads": TEXT_HEADS, "layers": TEXT_LAYERS},
}
CLIP_PREPROCESS_CFG = {"mean": list(IMAGE_MEAN), "std": list(IMAGE_STD), "interpolation": "bicubic", "resize_mode": "shortest"}
VAE_CFG = dict(
    in_channels=3, out_channels=3, latent_channels=4, layers_per_block=1, norm_num_groups=8, sample_size=64,
    down_block_types=("DownEncoderBlock2D",) * 3, up_block_types=("UpDecoderBlock2D",) * 3, block_out_channels=(16, 32, 64),
)
UNET_CFG = dict(
    sample_size=16, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(48, 96, 96),
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    cross_attention_dim=TEXT_WIDTH, attention_head_dim=8, norm_num_groups=16,
)
PROMPT_COLOURS = ("red", "orange", "yellow", "green", "blue", "purple", "pink")  # the colour x half measure's colours


@dataclass
class Config:
    """Every knob of the run; the defaults are the shipped run."""

    work: str = "/tmp/pocket-work"
    out: str = str(WEIGHTS_DIR)
    seed: int = 0
    threads: int = 2
    num_images: int = 50_000
    clip_steps: int = 220
    clip_batch: int = 256
    clip_lr: float = 1e-3
    clip_instance_weight: float = 0.5
    vae_steps: int = 2400
    vae_batch: int = 32
    vae_crop: int = 32  # train on random crops (4x cheaper than full 64x64 images) ...
    vae_full_fraction: float = 0.1  # ... except the last steps: full images, batch/4
    vae_lr: float = 1e-3
    vae_kl_weight: float = 1e-6
    unet_steps: int = 1400
    unet_batch: int = 64
    unet_lr: float = 1e-3
    text_lr: float = 2e-4
    caption_dropout: float = 0.1
    min_snr_gamma: float = 5.0
    ema_decay: float = 0.999
    measure_prompts: int = 112
    measure_steps: int = 20
    measure_guidance: float = 5.0
    log_every: int = 20

    @property
    def work_dir(self) -> Path:
        return Path(self.work)


def log(msg: str) -> None:
    print(time.strftime("%H:%M:%S"), msg, flush=True)


def lr_at(step: int, total: int, peak: float, warmup: int) -> float:
    if step < warmup:
        return peak * (step + 1) / warmup
    p = (step - warmup) / max(1, total - warmup)
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, p))))


def set_lr(opt, lr_scale: float) -> None:
    for group in opt.param_groups:
        group["lr"] = group["base_lr"] * lr_scale


def to_tensor(images: np.ndarray) -> torch.Tensor:
    """(N, 64, 64, 3) uint8 -> (N, 3, 64, 64) float in [-1, 1] (the CLIP's and the VAE's normalisation)."""
    return torch.from_numpy(np.array(images)).permute(0, 3, 1, 2).float().div(127.5).sub(1.0)  # a copy: `images` may be a read-only memory map


# ----------------------------------------------------------------------------- data


def _render_chunk(seeds: list[int]) -> tuple[np.ndarray, np.ndarray, list[dict]]:
    images, views, metas = [], [], []
    for seed in seeds:
        s = g.sample(seed)
        images.append(np.asarray(s.image, dtype=np.uint8))
        views.append(np.asarray(g.second_view(s, seed + 1_000_000_000), dtype=np.uint8))
        metas.append(s.meta)
    return np.stack(images), np.stack(views), metas


def render_world(seeds: list[int], processes: int = 2) -> tuple[np.ndarray, np.ndarray, list[dict]]:
    """Images, second views and metadata of the given seeds (in order), rendered in `processes` workers."""
    chunks = [seeds[i : i + 500] for i in range(0, len(seeds), 500)]
    if processes > 1 and len(chunks) > 1:
        import multiprocessing as mp

        with mp.get_context("fork").Pool(processes) as pool:
            parts = pool.map(_render_chunk, chunks)
    else:
        parts = [_render_chunk(c) for c in chunks]
    return (np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts]), [m for p in parts for m in p[2]])


def stage_data(cfg: Config) -> dict:
    images, views, metas = render_world(list(range(cfg.num_images)), cfg.threads)
    cfg.work_dir.mkdir(parents=True, exist_ok=True)
    np.save(cfg.work_dir / "images.npy", images)
    np.save(cfg.work_dir / "views.npy", views)
    (cfg.work_dir / "meta.json").write_text(json.dumps(metas))
    return {"num_images": len(metas), "two_object_fraction": float(np.mean([len(m["objects"]) == 2 for m in metas]))}


def load_data(cfg: Config, views: bool = False):
    images = np.load(cfg.work_dir / "images.npy", mmap_mode="r")
    metas = json.loads((cfg.work_dir / "meta.json").read_text())
    if views:
        return images, np.load(cfg.work_dir / "views.npy", mmap_mode="r"), metas
    return images, metas


def train_caption(meta: dict, rng: random.Random, long_fraction: float = 0.0) -> str:
    """A caption for a training image, drawn afresh each time (short and long forms mixed)."""
    if rng.random() < long_fraction:
        return g.caption(meta, "long")
    return g.caption(meta, "random", rng)


# ----------------------------------------------------------------------------- CLIP


def build_clip():
    from open_clip.model import CLIP

    return CLIP(**CLIP_MODEL_CFG)


def stage_clip(cfg: Config) -> dict:
    import open_clip

    torch.manual_seed(cfg.seed)
    rng = random.Random(cfg.seed + 1)
    images, views, metas = load_data(cfg, views=True)
    model = build_clip().train()
    with torch.no_grad():
        model.logit_scale.fill_(math.log(25.0))  # a sharper start than CLIP's 1/0.07 (short run)
    tokenizer = open_clip.tokenizer.SimpleTokenizer(context_length=CONTEXT_LENGTH)
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2 and "embedding" not in n]
    no_decay = [p for n, p in model.named_parameters() if not (p.ndim >= 2 and "embedding" not in n)]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.05}, {"params": no_decay, "weight_decay": 0.0}], lr=cfg.clip_lr)
    for group in opt.param_groups:
        group["base_lr"] = cfg.clip_lr
    n, b = len(metas), cfg.clip_batch
    t0, hist = time.time(), []
    for step in range(cfg.clip_steps):
        set_lr(opt, lr_at(step, cfg.clip_steps, 1.0, 30))
        idx = sorted(rng.sample(range(n), b))
        x = to_tensor(images[idx])
        v = to_tensor(views[idx[: b // 2]])  # second views for half the batch (the instance loss)
        texts = tokenizer([train_caption(metas[i], rng, 0.5) for i in idx])
        fx = model.encode_image(x, normalize=True)  # (b, D)
        fv = model.encode_image(v, normalize=True)  # (b/2, D)
        ft = model.encode_text(texts, normalize=True)  # (b, D)
        scale = model.logit_scale.exp().clamp(max=100)
        labels = torch.arange(b)
        logits = scale * fx @ ft.T
        clip_loss = (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2
        inst = fv @ fx.T / 0.1  # (b/2, b): each second view against every first view
        inst_loss = F.cross_entropy(inst, labels[: b // 2])
        loss = clip_loss + cfg.clip_instance_weight * inst_loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        hist.append((clip_loss.item(), inst_loss.item()))
        if step % cfg.log_every == 0 or step == cfg.clip_steps - 1:
            c, i = np.mean(hist[-cfg.log_every :], axis=0)
            log(f"clip step {step}/{cfg.clip_steps} caption loss {c:.3f} instance loss {i:.3f} scale {float(scale):.1f} ({time.time() - t0:.0f}s)")
    torch.save(model.state_dict(), cfg.work_dir / "clip.pt")
    c, i = np.mean(hist[-cfg.log_every :], axis=0)
    return {"steps": cfg.clip_steps, "batch": b, "final_caption_loss": float(c), "final_instance_loss": float(i)}


def clip_text_to_hf(clip) -> "CLIPTextModel":  # noqa: F821
    """The pocket CLIP's text tower as a transformers ``CLIPTextModel`` (same weights, same outputs).

    open_clip and transformers implement the same pre-LN causal transformer; the fused
    ``in_proj`` of ``nn.MultiheadAttention`` splits into q, k, v projections.
    """
    from transformers import CLIPTextConfig, CLIPTextModel

    from ..models import clip_tokenizer

    tok = clip_tokenizer()
    width = clip.token_embedding.weight.shape[1]
    config = CLIPTextConfig(
        vocab_size=clip.token_embedding.weight.shape[0], hidden_size=width, intermediate_size=4 * width,
        num_hidden_layers=len(clip.transformer.resblocks), num_attention_heads=TEXT_HEADS,
        max_position_embeddings=clip.positional_embedding.shape[0], hidden_act="gelu", layer_norm_eps=1e-5,
        projection_dim=width, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
    )
    sd = clip.state_dict()
    out = {
        "text_model.embeddings.token_embedding.weight": sd["token_embedding.weight"],
        "text_model.embeddings.position_embedding.weight": sd["positional_embedding"],
        "text_model.final_layer_norm.weight": sd["ln_final.weight"],
        "text_model.final_layer_norm.bias": sd["ln_final.bias"],
    }
    for i in range(config.num_hidden_layers):
        p, q = f"transformer.resblocks.{i}.", f"text_model.encoder.layers.{i}."
        wq, wk, wv = sd[p + "attn.in_proj_weight"].chunk(3)
        bq, bk, bv = sd[p + "attn.in_proj_bias"].chunk(3)
        out |= {
            q + "self_attn.q_proj.weight": wq, q + "self_attn.q_proj.bias": bq,
            q + "self_attn.k_proj.weight": wk, q + "self_attn.k_proj.bias": bk,
            q + "self_attn.v_proj.weight": wv, q + "self_attn.v_proj.bias": bv,
            q + "self_attn.out_proj.weight": sd[p + "attn.out_proj.weight"], q + "self_attn.out_proj.bias": sd[p + "attn.out_proj.bias"],
            q + "layer_norm1.weight": sd[p + "ln_1.weight"], q + "layer_norm1.bias": sd[p + "ln_1.bias"],
            q + "layer_norm2.weight": sd[p + "ln_2.weight"], q + "layer_norm2.bias": sd[p + "ln_2.bias"],
            q + "mlp.fc1.weight": sd[p + "mlp.c_fc.weight"], q + "mlp.fc1.bias": sd[p + "mlp.c_fc.bias"],
            q + "mlp.fc2.weight": sd[p + "mlp.c_proj.weight"], q + "mlp.fc2.bias": sd[p + "mlp.c_proj.bias"],
        }
    model = CLIPTextModel(config)
    if not any(k.startswith("text_model.") for k in model.state_dict()):  # transformers 5 drops the prefix
        out = {k.removeprefix("text_model."): v for k, v in out.items()}
    missing, unexpected = model.load_state_dict({k: v.clone() for k, v in out.items()}, strict=False)
    missing = [k for k in missing if "position_ids" not in k]
    if missing or unexpected:
        raise RuntimeError(f"text tower conversion: missing {missing}, unexpected {unexpected}")
    return model


# ----------------------------------------------------------------------------- VAE


def build_vae():
    from diffusers import AutoencoderKL

    return AutoencoderKL(**VAE_CFG)


def stage_vae(cfg: Config) -> dict:
    torch.manual_seed(cfg.seed + 2)
    rng = random.Random(cfg.seed + 3)
    images, metas = load_data(cfg)
    vae = build_vae().train()
    with torch.no_grad():  # start near-deterministic (posterior std ~0.02): noisy early latents slow the decoder down a lot
        vae.quant_conv.bias[VAE_CFG["latent_channels"] :].fill_(-8.0)
    opt = torch.optim.AdamW(vae.parameters(), lr=cfg.vae_lr, weight_decay=0.0)
    for group in opt.param_groups:
        group["base_lr"] = cfg.vae_lr
    n, t0, hist = len(metas), time.time(), []
    for step in range(cfg.vae_steps):
        set_lr(opt, lr_at(step, cfg.vae_steps, 1.0, 20))
        if step < cfg.vae_steps * (1 - cfg.vae_full_fraction) and cfg.vae_crop < g.SIZE:
            x = to_tensor(images[sorted(rng.sample(range(n), cfg.vae_batch))])
            i, j = rng.randrange(0, g.SIZE - cfg.vae_crop + 1, 4), rng.randrange(0, g.SIZE - cfg.vae_crop + 1, 4)
            x = x[:, :, i : i + cfg.vae_crop, j : j + cfg.vae_crop]
        else:
            x = to_tensor(images[sorted(rng.sample(range(n), max(1, cfg.vae_batch * cfg.vae_crop**2 // g.SIZE**2)))])
        post = vae.encode(x).latent_dist
        rec = vae.decode(post.sample()).sample
        l1, mse = (rec - x).abs().mean(), (rec - x).pow(2).mean()
        kl = post.kl().mean()
        loss = l1 + mse + cfg.vae_kl_weight * kl
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        hist.append((l1.item(), mse.item(), kl.item()))
        if step % cfg.log_every == 0 or step == cfg.vae_steps - 1:
            a, m, k = np.mean(hist[-cfg.log_every :], axis=0)
            log(f"vae step {step}/{cfg.vae_steps} l1 {a:.4f} mse {m:.5f} kl {k:.0f} ({time.time() - t0:.0f}s)")
    vae.eval()
    torch.save(vae.state_dict(), cfg.work_dir / "vae.pt")
    return {"steps": cfg.vae_steps, "batch": cfg.vae_batch, **vae_error(vae, 256)}


@torch.no_grad()
def vae_error(vae, count: int = 256) -> dict:
    """Reconstruction error on held-out world images (pixels in [0, 1]): MSE, PSNR, mean |error|."""
    images, _, _ = render_world(list(range(EVAL_SEED0, EVAL_SEED0 + count)), 1)
    x = to_tensor(images)
    rec = torch.cat([vae.decode(vae.encode(x[i : i + 64]).latent_dist.mode()).sample for i in range(0, count, 64)]).clamp(-1, 1)
    err = (rec - x) / 2  # in [0, 1] units
    mse = float(err.pow(2).mean())
    return {"heldout_mse": mse, "heldout_psnr_db": 10 * math.log10(1 / mse), "heldout_mae": float(err.abs().mean()), "heldout_images": count}


def stage_latents(cfg: Config) -> dict:
    vae = build_vae()
    vae.load_state_dict(torch.load(cfg.work_dir / "vae.pt", weights_only=True))
    vae.eval()
    images, metas = load_data(cfg)
    out = np.empty((len(metas), 4, 16, 16), dtype=np.float32)
    t0 = time.time()
    with torch.no_grad():
        for i in range(0, len(metas), 256):
            out[i : i + 256] = vae.encode(to_tensor(images[i : i + 256])).latent_dist.mode().numpy()
    np.save(cfg.work_dir / "latents.npy", out)
    std = float(out.std())
    scaling = 1.0 / std
    (cfg.work_dir / "latents.json").write_text(json.dumps({"scaling_factor": scaling, "mean": float(out.mean()), "std": std}))
    log(f"latents: {len(metas)} in {time.time() - t0:.0f}s, std {std:.3f} -> scaling factor {scaling:.4f}")
    return {"count": len(metas), "scaling_factor": scaling, "latent_mean": float(out.mean()), "latent_std": std}


# ----------------------------------------------------------------------------- UNet


def build_unet():
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(**UNET_CFG)


def load_clip_model(path: Path):
    clip = build_clip()
    clip.load_state_dict(torch.load(path, weights_only=True))
    return clip.eval()


def stage_unet(cfg: Config) -> dict:
    from diffusers import DDPMScheduler

    from ..models import clip_tokenizer, sd_noise_scheduler_config

    torch.manual_seed(cfg.seed + 4)
    rng = random.Random(cfg.seed + 5)
    latents = torch.from_numpy(np.load(cfg.work_dir / "latents.npy"))
    scaling = json.loads((cfg.work_dir / "latents.json").read_text())["scaling_factor"]
    metas = json.loads((cfg.work_dir / "meta.json").read_text())
    tokenizer = clip_tokenizer()
    text_encoder = clip_text_to_hf(load_clip_model(cfg.work_dir / "clip.pt")).train()
    unet = build_unet().train()
    sched = DDPMScheduler.from_config(sd_noise_scheduler_config())
    alphas = sched.alphas_cumprod
    snr = alphas / (1 - alphas)
    opt = torch.optim.AdamW(
        [{"params": list(unet.parameters()), "lr": cfg.unet_lr, "base_lr": cfg.unet_lr, "weight_decay": 0.01},
         {"params": list(text_encoder.parameters()), "lr": cfg.text_lr, "base_lr": cfg.text_lr, "weight_decay": 0.0}]
    )
    ema = {k: v.detach().clone() for k, v in _ema_params(unet, text_encoder).items()}
    n, b, t0, hist = len(metas), cfg.unet_batch, time.time(), []
    token_cache: dict[str, list[int]] = {}

    def tokens(caps: list[str]) -> torch.Tensor:
        missing = [c for c in set(caps) if c not in token_cache]
        if missing:
            ids = tokenizer(missing, padding="max_length", max_length=CONTEXT_LENGTH, truncation=True).input_ids
            token_cache.update(zip(missing, ids))
        return torch.tensor([token_cache[c] for c in caps])

    for step in range(cfg.unet_steps):
        set_lr(opt, lr_at(step, cfg.unet_steps, 1.0, 50))
        idx = sorted(rng.sample(range(n), b))
        z = latents[idx] * scaling
        caps = ["" if rng.random() < cfg.caption_dropout else train_caption(metas[i], rng) for i in idx]
        ctx = text_encoder(tokens(caps))[0]  # (b, 77, width)
        noise = torch.randn_like(z)
        t = torch.randint(0, sched.config.num_train_timesteps, (b,))
        pred = unet(sched.add_noise(z, noise, t), t, ctx).sample
        w = torch.clamp(snr[t], max=cfg.min_snr_gamma) / snr[t] if cfg.min_snr_gamma > 0 else torch.ones(b)
        per = (pred - noise).pow(2).mean(dim=(1, 2, 3))
        loss = (w * per).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(list(unet.parameters()) + list(text_encoder.parameters()), 1.0)
        opt.step()
        decay = min(cfg.ema_decay, (1 + step) / (10 + step))
        with torch.no_grad():
            for k, v in _ema_params(unet, text_encoder).items():
                ema[k].mul_(decay).add_(v.detach(), alpha=1 - decay)
        hist.append((per.mean().item(), loss.item()))
        if step % cfg.log_every == 0 or step == cfg.unet_steps - 1:
            m, wl = np.mean(hist[-cfg.log_every :], axis=0)
            log(f"unet step {step}/{cfg.unet_steps} mse {m:.4f} weighted {wl:.4f} ({time.time() - t0:.0f}s)")
        if (step + 1) % 200 == 0 or step == cfg.unet_steps - 1:
            torch.save({"unet": unet.state_dict(), "text_encoder": text_encoder.state_dict(), "ema": ema, "step": step + 1},
                       cfg.work_dir / "unet.pt")
    m, wl = np.mean(hist[-100:], axis=0)
    return {"steps": cfg.unet_steps, "batch": b, "final_mse_last100": float(m), "final_weighted_loss_last100": float(wl)}


def _ema_params(unet, text_encoder) -> dict[str, torch.Tensor]:
    out = {f"unet.{k}": v for k, v in unet.named_parameters()}
    out |= {f"text_encoder.{k}": v for k, v in text_encoder.named_parameters()}
    return out


# ----------------------------------------------------------------------------- export


def build_pipeline(cfg: Config, use_ema: bool = True):
    """The pocket StableDiffusionPipeline from the work folder's checkpoints."""
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    from ..models import clip_tokenizer, sd_noise_scheduler_config

    vae = build_vae()
    vae.load_state_dict(torch.load(cfg.work_dir / "vae.pt", weights_only=True))
    vae.register_to_config(scaling_factor=json.loads((cfg.work_dir / "latents.json").read_text())["scaling_factor"])
    ck = torch.load(cfg.work_dir / "unet.pt", weights_only=True)
    unet = build_unet()
    unet.load_state_dict(ck["unet"])
    text_encoder = clip_text_to_hf(load_clip_model(cfg.work_dir / "clip.pt"))
    text_encoder.load_state_dict(ck["text_encoder"])
    if use_ema:
        with torch.no_grad():
            for k, v in _ema_params(unet, text_encoder).items():
                v.copy_(ck["ema"][k])
    return StableDiffusionPipeline(
        vae=vae.eval(), text_encoder=text_encoder.eval(), tokenizer=clip_tokenizer(), unet=unet.eval(),
        scheduler=DDIMScheduler(**sd_noise_scheduler_config()), safety_checker=None, feature_extractor=None,
        requires_safety_checker=False,
    )


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


RECORD_NAME = "pocket_record.json"


def checksums(folder: Path) -> dict[str, str]:
    """sha256 of every file under `folder` except the record itself, by relative path."""
    return {
        str(p.relative_to(folder)): sha256(p)
        for p in sorted(folder.rglob("*"))
        if p.is_file() and p.name != RECORD_NAME and not p.name.startswith(".")
    }


def stage_export(cfg: Config) -> dict:
    import shutil

    out = Path(cfg.out)
    sd_dir, clip_dir = out / POCKET_SD_DIR.name, out / POCKET_CLIP_DIR.name
    for d in (sd_dir, clip_dir):
        if d.exists():
            shutil.rmtree(d)
    pipe = build_pipeline(cfg)
    pipe.save_pretrained(sd_dir, safe_serialization=True)
    # The slow-format tokenizer files (vocab.json + merges.txt, 1.5 MB) instead of tokenizer.json (3.6 MB):
    # the same CLIP BPE, and CLIPTokenizer.from_pretrained reads either.
    from ..models import clip_tokenizer_files

    for name in ("vocab.json", "merges.txt"):
        shutil.copyfile(clip_tokenizer_files() / name, sd_dir / "tokenizer" / name)
    (sd_dir / "tokenizer" / "tokenizer.json").unlink(missing_ok=True)
    from safetensors.torch import save_file

    clip = load_clip_model(cfg.work_dir / "clip.pt")
    clip_dir.mkdir(parents=True)
    (clip_dir / "open_clip_config.json").write_text(json.dumps({"model_cfg": CLIP_MODEL_CFG, "preprocess_cfg": CLIP_PREPROCESS_CFG}, indent=2) + "\n")
    save_file({k: v.contiguous() for k, v in clip.state_dict().items()}, str(clip_dir / "open_clip_model.safetensors"))
    sizes = {d.name: sum(p.stat().st_size for p in d.rglob("*") if p.is_file()) for d in (sd_dir, clip_dir)}
    return {"bytes": sizes}


# ----------------------------------------------------------------------------- measurements


def prompt_following_prompts(count: int, seed: int = 0) -> list[tuple[str, str, str]]:
    """(prompt, colour, side) for the colour x half measure: "a <colour> <noun> on the <left|right>".

    Colours are the chromatic ones (white and black are too close to some backgrounds to be
    read back reliably); nouns cycle over every shape and class.
    """
    rng = random.Random(seed)
    out = []
    for i in range(count):
        colour = PROMPT_COLOURS[i % len(PROMPT_COLOURS)]
        side = ("left", "right")[(i // len(PROMPT_COLOURS)) % 2]
        noun = g.NOUNS[rng.randrange(len(g.NOUNS))]
        out.append((f"a {colour} {noun} on the {side}", colour, side))
    return out


@torch.no_grad()
def prompt_following(pipe, count: int = 112, steps: int = 20, guidance: float = 5.0, seed: int = 0, batch: int = 16) -> dict:
    """Rate at which the base draws the asked colour in the asked half, and the chance rate.

    Chance is measured, not assumed: the same images scored against the (colour, side) of
    another prompt of the run (a derangement), i.e. how often an image would "hit" a prompt it
    was not made for.
    """
    items = prompt_following_prompts(count, seed)
    images = []
    for i in range(0, count, batch):
        chunk = items[i : i + batch]
        gen = [torch.Generator().manual_seed(seed * 100_000 + i + k) for k in range(len(chunk))]
        images += pipe([p for p, _, _ in chunk], num_inference_steps=steps, guidance_scale=guidance, generator=gen,
                       height=64, width=64, output_type="pil").images
    hits = [g.colour_side(im, c) == s for im, (_, c, s) in zip(images, items)]
    colour_present = [g.colour_side(im, c) is not None for im, (_, c, _) in zip(images, items)]
    shift = 1 + len(PROMPT_COLOURS)  # another colour and the other side
    chance = [g.colour_side(im, items[(k + shift) % count][1]) == items[(k + shift) % count][2] for k, im in enumerate(images)]
    return {
        "rate": float(np.mean(hits)), "hits": int(sum(hits)), "images": count, "colour_present_rate": float(np.mean(colour_present)),
        "chance_rate_measured": float(np.mean(chance)), "steps": steps, "guidance_scale": guidance, "seed": seed,
        "prompt_form": "a <colour> <noun> on the <left|right>", "colours": list(PROMPT_COLOURS), "images_list": images,
    }


def heldout_world(count: int, start: int = EVAL_SEED0) -> list[g.Sample]:
    return [g.sample(s) for s in range(start, start + count)]


@torch.no_grad()
def clip_retrieval(scorer, count: int = 200, start: int = EVAL_SEED0) -> dict:
    """Held-out world images vs their long captions: caption->image and image->caption top-1 (pool of `count`)."""
    samples = heldout_world(count, start)
    img = scorer.encode_images([s.image for s in samples])
    txt = scorer.encode_texts([g.caption(s, "long") for s in samples])
    sim = img @ txt.T  # (images, captions)
    target = torch.arange(count)
    return {
        "pool": count, "captions": "long form (every attribute named)",
        "caption_to_image_top1": float((sim.argmax(0) == target).float().mean()),
        "image_to_caption_top1": float((sim.argmax(1) == target).float().mean()),
    }


@torch.no_grad()
def concept_identification(scorer, views_per_concept: int = 20) -> dict:
    """Nearest-reference identification of held-out concepts: each new photo of a concept is
    assigned the concept of its nearest shipped reference photo (cosine of CLIP image features)."""
    from .concepts import CONCEPTS, references, view

    names = list(CONCEPTS)
    ref = scorer.encode_images([im for n in names for im in references(n)])
    ref_owner = [n for n in names for _ in references(n)]
    per = {}
    for n in names:
        q = scorer.encode_images([view(n, 5000 + k) for k in range(views_per_concept)])
        nearest = (q @ ref.T).argmax(1)
        per[n] = float(np.mean([ref_owner[j] == n for j in nearest.tolist()]))
    return {"per_concept": per, "min": min(per.values()), "mean": float(np.mean(list(per.values()))), "views_per_concept": views_per_concept}


def load_pocket_clip(folder: Path = POCKET_CLIP_DIR):
    """The pocket CLIP of `folder` as the scoring command's ``ClipScorer`` (open_clip's own factory)."""
    from ..clip_score import load_clip

    return load_clip(f"local-dir:{folder}", None, device="cpu", batch_size=64)


def load_pocket_sd(folder: Path = POCKET_SD_DIR):
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(str(folder), torch_dtype=torch.float32, local_files_only=True,
                                                   safety_checker=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def stage_measure(cfg: Config) -> dict:
    out = Path(cfg.out)
    pipe = load_pocket_sd(out / POCKET_SD_DIR.name)
    t0 = time.time()
    pf = prompt_following(pipe, cfg.measure_prompts, cfg.measure_steps, cfg.measure_guidance)
    grid_images = pf.pop("images_list")
    save_grid(grid_images[:56], cfg.work_dir / "prompt_following.png", cols=14)
    pf["seconds"] = round(time.time() - t0, 1)
    log(f"prompt following: {pf['hits']}/{pf['images']} = {pf['rate']:.2f} (chance measured {pf['chance_rate_measured']:.2f})")
    scorer = load_pocket_clip(out / POCKET_CLIP_DIR.name)
    ret = clip_retrieval(scorer)
    ident = concept_identification(scorer)
    log(f"clip retrieval {ret}; concept identification {ident}")
    return {"prompt_following": pf, "clip_retrieval": ret, "concept_identification": ident}


def save_grid(images, path: Path, cols: int = 8) -> None:
    from PIL import Image

    rows = (len(images) + cols - 1) // cols
    grid = Image.new("RGB", (cols * 66, rows * 66), (255, 255, 255))
    for i, im in enumerate(images):
        grid.paste(im, ((i % cols) * 66, (i // cols) * 66))
    grid.save(path)


# ----------------------------------------------------------------------------- records


def write_records(cfg: Config, results: dict, argv: list[str]) -> None:
    out = Path(cfg.out)
    command = "python -m sbora_diffusion.world.pretrain " + " ".join(shlex.quote(a) for a in argv)
    common = {
        "command": command, "config": asdict(cfg), "torch": torch.__version__, "threads": cfg.threads,
        "note": "CPU float32 training; seeded, repeats closely but not bit for bit on other machines or torch builds",
    }
    import diffusers
    import open_clip
    import transformers

    common["versions"] = {"torch": torch.__version__, "diffusers": diffusers.__version__, "transformers": transformers.__version__,
                          "open_clip": open_clip.__version__}
    sd_dir, clip_dir = out / POCKET_SD_DIR.name, out / POCKET_CLIP_DIR.name
    stage_seconds = {k: v.get("seconds") for k, v in results.items() if isinstance(v, dict) and "seconds" in v}
    sd_record = common | {
        "what": "pocket-sd: a StableDiffusionPipeline pretrained on the pocket world (StableDiffusionPipeline.from_pretrained(folder))",
        "architecture": {"vae": {k: list(v) if isinstance(v, tuple) else v for k, v in VAE_CFG.items()},
                         "unet": {k: list(v) if isinstance(v, tuple) else v for k, v in UNET_CFG.items()},
                         "text_encoder": "CLIPTextModel initialised from the pocket CLIP's text tower, trained jointly with the UNet"},
        "stages": {k: results.get(k) for k in ("data", "clip", "vae", "latents", "unet")},
        "stage_seconds": stage_seconds,
        "measurements": {k: results["measure"][k] for k in ("prompt_following",)} if "measure" in results else {},
        "files": checksums(sd_dir),
    }
    clip_record = common | {
        "what": "pocket-clip: an open_clip CLIP trained on the pocket world (open_clip.create_model_and_transforms('local-dir:FOLDER'))",
        "stages": {k: results.get(k) for k in ("data", "clip")},
        "stage_seconds": {k: stage_seconds.get(k) for k in ("data", "clip")},
        "measurements": {k: results["measure"][k] for k in ("clip_retrieval", "concept_identification")} if "measure" in results else {},
        "files": checksums(clip_dir),
    }
    (sd_dir / RECORD_NAME).write_text(json.dumps(sd_record, indent=2) + "\n")
    (clip_dir / RECORD_NAME).write_text(json.dumps(clip_record, indent=2) + "\n")


STAGES = ("data", "clip", "vae", "latents", "unet", "export", "measure")


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("stage", choices=STAGES + ("all",), nargs="+", help="stages to run, in order ('all': every stage)")
    for f in fields(Config):
        ap.add_argument("--" + f.name.replace("_", "-"), type=type(f.default), default=f.default)
    args = ap.parse_args(argv)
    cfg = Config(**{f.name: getattr(args, f.name) for f in fields(Config)})
    torch.set_num_threads(cfg.threads)
    stages = list(STAGES) if "all" in args.stage else [s for s in STAGES if s in args.stage]
    cfg.work_dir.mkdir(parents=True, exist_ok=True)
    results_path = cfg.work_dir / "results.json"
    results = json.loads(results_path.read_text()) if results_path.is_file() else {}
    for stage in stages:
        log(f"stage {stage}")
        t0 = time.time()
        res = globals()[f"stage_{stage}"](cfg)
        res["seconds"] = round(time.time() - t0, 1)
        res["command"] = "python -m sbora_diffusion.world.pretrain " + " ".join(shlex.quote(a) for a in argv)
        results[stage] = res
        results_path.write_text(json.dumps(results, indent=2))
        log(f"stage {stage} done in {res['seconds']:.0f}s: {json.dumps({k: v for k, v in res.items() if k != 'per_concept'})[:400]}")
    if "export" in stages or "measure" in stages:
        write_records(cfg, results, argv)


if __name__ == "__main__":
    main()
