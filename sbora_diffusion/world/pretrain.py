"""Pretrain the pocket world's models on 2 CPU cores: the pocket base (and, with preset v1, the pocket CLIP).

    python -m sbora_diffusion.world.pretrain all --work /tmp/pocket-work                # every stage of preset v2 (the default)
    python -m sbora_diffusion.world.pretrain unet --work DIR --resume --unet-steps 8000 # train the UNet on from its newest checkpoint
    python -m sbora_diffusion.world.pretrain export measure --work DIR --out DIR/export # write and measure a candidate
    python -m sbora_diffusion.world.pretrain measure --preset v1 --work DIR --out sbora_diffusion/world/weights
                                                                                       # the probes on the shipped base, into its record
    python -m sbora_diffusion.world.pretrain all --work DIR --out DIR/export --init-from sbora_diffusion/world/weights/pocket-sd
                                                                                       # train the shipped base on, in a new work folder

Presets (``--preset``; every field below can then be overridden, ``--unet-steps 100``):

``v2``  (issue #27) text encoder and first UNet block 64 wide (four rank-16 slots fit every
        adapted layer), a VAE with twice the channels at full resolution (small shapes stay
        shapes), a text encoder trained from scratch with the UNet, a quarter of the captions
        in the long form (every attribute, position included), a constant learning rate after
        warm-up with EMA weights, so training can go on for as long as the probes ask; the
        UNet is probed at every checkpoint and stops once every target holds. The pocket CLIP
        is not retrained (``export`` writes only ``pocket-sd``).
``v1``  the first shipped base's architecture and settings (32-wide text tower from the
        pocket CLIP, 48-wide first block, cosine schedule). That base was trained by this
        script's earlier hand-written loops (git history before issue #27); on the engine
        the same command repeats it closely, not bit for bit.

Stages (each reads the previous stages' outputs from ``--work``, so any can be rerun alone):

``data``     render the training world (``--num-images`` seeded scenes, seeds 0..N-1) with a
             second view of every object (same design, other place and background);
``clip``     the pocket CLIP: an open_clip ``CLIP`` (ViT image tower on 64x64, text tower
             with CLIP's BPE vocabulary) trained with the contrastive caption loss plus an
             instance loss between the two views of each object;
``vae``      the AutoencoderKL (f = 4: 64x64x3 -> 16x16x4), L1 + MSE reconstruction and a small
             KL; its record states how well the shape probe reads its reconstructions;
``latents``  encode every training image once (posterior mean), fit the latent scaling factor;
``unet``     the UNet2DConditionModel on cached latents, jointly with the text encoder;
             epsilon prediction on SD's noise schedule, min-SNR weighting, 10% empty captions
             (classifier-free guidance), EMA weights (``sbora.procedures.EMA``); optionally a
             floor on the weight of the x0 error at large t (``--x0-weight-floor``: layout is
             decided there) and a hinge that keeps a caption's text states apart from its twin's
             with the sides swapped or another noun (``--text-contrast-weight``: without it the
             text encoder let "on the left" and "on the right" collapse);
``export``   write ``pocket-sd/`` (a StableDiffusionPipeline folder) and, when this work folder
             trained one, ``pocket-clip/`` (an open_clip ``local-dir:`` folder) into ``--out``,
             each with a record (commands, settings, stages, sha256 of every file);
``measure``  the probes (``probes.py``: colour, side, shape, two objects, each with its
             control; room for concepts) on held-out seeds, and retrieval / concept
             identification of a CLIP this work folder trained, written into the records in ``--out``.

``--init-from FOLDER`` (a pocket-sd folder that ``export`` wrote) trains a base on where it left
off, in a new work folder: its VAE and latent scale as they are (no ``vae`` stage), the UNet
stage starting from its UNet and text encoder (a fresh optimizer); the new record holds the
base's under ``initialised_from`` and adds its CPU time into ``cpu_seconds_in_all``.

Each training stage (clip, vae, unet) is one run of the toolkit's engine (``sbora/engine.py``)
in its own folder of ``--work`` (``clip/``, ``vae/``, ``unet/``): checkpoints every
``--checkpoint-every`` steps, all kept (hard-linked into ``checkpoints/<stage>/``, also across
resumes); the UNet is probed at each with its EMA weights (``unet_probes.jsonl``); Ctrl-C stops
at a step boundary with a checkpoint;
``--resume`` continues each stage from its newest checkpoint (with a larger step count it trains
on) and skips a stage that is already done; ``--overwrite`` retrains it. Records name paths
relative to the repository, and the work folder as ``$WORK``. Everything is seeded; CPU float32
training on a given torch build repeats closely but not bit for bit across machines.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import random
import shlex
import shutil
import sys
import time
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from sbora.fileio import sha256, write_json

from . import POCKET_CLIP_DIR, POCKET_SD_DIR, WEIGHTS_DIR
from . import generator as g
from . import probes

EVAL_SEED0 = 10_000_000  # held-out world images use seeds from here on (training uses 0..N-1)
SELECTION_SEED0 = 0  # the probes at training checkpoints (which decide when to stop) draw these seeds ...
HELDOUT_SEED0 = 1_000_000  # ... and the measure stage's, the record's numbers, these
IMAGE_MEAN = (0.5, 0.5, 0.5)
IMAGE_STD = (0.5, 0.5, 0.5)
CONTEXT_LENGTH = 77
REPO_ROOT = Path(__file__).resolve().parents[2]
RECORD_NAME = "pocket_record.json"
STAGES = ("data", "clip", "vae", "latents", "unet", "export", "measure")
TRAINED = {"clip": "clip", "vae": "vae", "unet": "unet"}  # training stage -> its field prefix


@dataclass
class Config:
    """Every knob of the run; the defaults are preset v2 (``PRESETS`` holds v1's differences)."""

    work: str = "/tmp/pocket-work"
    out: str = str(WEIGHTS_DIR)
    preset: str = "v2"
    init_from: str = ""  # a pocket-sd folder to train on from (the shipped base, say): its VAE as is, its UNet and text encoder as the start
    seed: int = 0
    threads: int = 1
    num_images: int = 50_000
    # architecture
    text_width: int = 64
    text_layers: int = 4
    text_heads: int = 4
    text_init: str = "scratch"  # scratch: trained from random weights with the UNet; clip: the pocket CLIP's text tower
    unet_channels: str = "64,96,96"
    vae_channels: str = "32,64,64"
    # the pocket CLIP
    clip_steps: int = 220
    clip_batch: int = 256
    clip_lr: float = 1e-3
    clip_instance_weight: float = 0.5
    # the VAE
    vae_steps: int = 3000
    vae_batch: int = 32
    vae_crop: int = 32  # train on random crops (4x cheaper than full 64x64 images) ...
    vae_full_fraction: float = 0.1  # ... except the last steps: full images, batch/4
    vae_lr: float = 1e-3
    vae_kl_weight: float = 1e-6
    # the UNet and text encoder
    unet_steps: int = 4500  # the budget of issue #27 (5 h of CPU in all); --resume with more steps trains on
    unet_batch: int = 64
    unet_lr: float = 1e-3
    unet_schedule: str = "constant_with_warmup"
    unet_warmup: int = 100
    text_lr: float = 1e-3
    caption_dropout: float = 0.1
    long_caption_fraction: float = 0.25  # captions in the long form: every attribute named, position included
    min_snr_gamma: float = 5.0
    x0_weight_floor: float = 0.0  # > 0: the loss weighs the x0 error at least this much at every t (see unet_loss_weight)
    text_contrast_weight: float = 0.0  # > 0: push a caption's text states apart from its side-swapped or noun-changed twin (see text_contrast)
    text_contrast_margin: float = 0.9  # ... while their cosine similarity is above this ("red" vs "blue": ~0.8)
    ema_decay: float = 0.999
    # checkpoints and measurements
    checkpoint_every: int = 500
    export_step: int = 0  # export: 0 = the UNet stage's newest checkpoint; N = its kept checkpoint at step N (the one the probes liked best)
    probe_images: int = 28  # per probe at each UNet checkpoint (selection seeds); 0: no probes while training
    stop_at_targets: bool = True  # the UNet stops at the first checkpoint where every probe meets its target
    measure_images: int = 112  # per probe in the measure stage (held-out seeds)
    measure_steps: int = 20
    measure_guidance: float = 5.0
    log_every: int = 20

    @property
    def work_dir(self) -> Path:
        return Path(self.work)

    def channels(self, name: str) -> tuple[int, ...]:
        value = getattr(self, f"{name}_channels")
        try:
            out = tuple(int(c) for c in value.split(","))
        except ValueError:
            out = ()
        if len(out) != 3 or min(out) < 8:
            raise ValueError(f"--{name}-channels must be three comma-separated widths >= 8, got {value!r}")
        return out


PRESETS: dict[str, dict] = {
    "v2": {},
    "v1": dict(
        threads=2, text_width=32, text_init="clip", unet_channels="48,96,96", vae_channels="16,32,64", vae_steps=2400,
        unet_steps=1400, unet_schedule="cosine", unet_warmup=50, text_lr=2e-4, long_caption_fraction=0.0,
        checkpoint_every=200, probe_images=0, stop_at_targets=False,
    ),
}


def preset_config(name: str, **overrides) -> Config:
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; known: {', '.join(PRESETS)}")
    return Config(**{**PRESETS[name], "preset": name, **overrides})


def log(msg: str) -> None:
    print(time.strftime("%H:%M:%S"), msg, flush=True)


def to_tensor(images: np.ndarray) -> torch.Tensor:
    """(N, 64, 64, 3) uint8 -> (N, 3, 64, 64) float in [-1, 1] (the CLIP's and the VAE's normalisation)."""
    return torch.from_numpy(np.array(images)).permute(0, 3, 1, 2).float().div(127.5).sub(1.0)  # a copy: `images` may be a read-only memory map


def to_images(x: torch.Tensor) -> list:
    """(N, 3, H, W) in [-1, 1] -> PIL images."""
    from PIL import Image

    arr = ((x.clamp(-1, 1).permute(0, 2, 3, 1).numpy() + 1) * 127.5).round().astype(np.uint8)
    return [Image.fromarray(a) for a in arr]


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


def stage_data(cfg: Config, resume: bool, overwrite: bool) -> dict:
    images, views, metas = render_world(list(range(cfg.num_images)), cfg.threads)
    np.save(cfg.work_dir / "images.npy", images)
    np.save(cfg.work_dir / "views.npy", views)
    (cfg.work_dir / "meta.json").write_text(json.dumps(metas))
    return {"num_images": len(metas), "two_object_fraction": float(np.mean([len(m["objects"]) == 2 for m in metas]))}


def load_data(cfg: Config, views: bool = False):
    if not (cfg.work_dir / "meta.json").is_file():
        raise FileNotFoundError(f"{cfg.work_dir} holds no rendered world (meta.json): run the data stage first")
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


def twin_meta(meta: dict, what: str, rng: random.Random) -> dict:
    """`meta` with one attribute changed: ``side`` swaps left and right (the center goes to a side), ``noun``
    gives the first object another noun of its kind (shape or object class)."""
    objects = [dict(o) for o in meta["objects"]]
    if what == "side":
        for o in objects:
            o["position"] = {"left": "right", "right": "left"}.get(o["position"]) or rng.choice(("left", "right"))
    elif what == "noun":
        kind = g.SHAPES if objects[0]["noun"] in g.SHAPES else g.CLASSES
        objects[0]["noun"] = rng.choice([n for n in kind if n != objects[0]["noun"]])
    else:
        raise ValueError(f"what must be 'side' or 'noun', got {what!r}")
    return {**meta, "objects": objects}


def caption_and_twin(meta: dict, rng: random.Random, long_fraction: float, what: str, twin_rng: random.Random) -> tuple[str, str]:
    """A training caption and its twin: the same draws (so the same words and form) for `meta` with `what` changed."""
    state = rng.getstate()
    caption = train_caption(meta, rng, long_fraction)
    again = random.Random()
    again.setstate(state)
    return caption, train_caption(twin_meta(meta, what, twin_rng), again, long_fraction)


def micro_rng(stage: str, cfg: Config, index: int) -> random.Random:
    """The data draws of one micro-batch: a pure function of its index, so a resumed run draws what an uninterrupted one would."""
    return random.Random(f"{stage}:{cfg.seed}:{index}")


# ----------------------------------------------------------------------------- models


def clip_model_cfg(cfg: Config) -> dict:
    return {
        "embed_dim": 64,
        "vision_cfg": {"image_size": 64, "layers": 4, "width": 96, "patch_size": 8, "head_width": 32, "mlp_ratio": 3},
        "text_cfg": {"context_length": CONTEXT_LENGTH, "vocab_size": 49408, "width": cfg.text_width, "heads": cfg.text_heads,
                     "layers": cfg.text_layers},
    }


CLIP_PREPROCESS_CFG = {"mean": list(IMAGE_MEAN), "std": list(IMAGE_STD), "interpolation": "bicubic", "resize_mode": "shortest"}


def vae_cfg(cfg: Config) -> dict:
    return dict(
        in_channels=3, out_channels=3, latent_channels=4, layers_per_block=1, norm_num_groups=8, sample_size=64,
        down_block_types=["DownEncoderBlock2D"] * 3, up_block_types=["UpDecoderBlock2D"] * 3, block_out_channels=list(cfg.channels("vae")),
    )


def unet_cfg(cfg: Config) -> dict:
    return dict(
        sample_size=16, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=list(cfg.channels("unet")),
        down_block_types=["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
        up_block_types=["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
        cross_attention_dim=cfg.text_width, attention_head_dim=8, norm_num_groups=16,
    )


def _seeded(seed: int, build):
    """`build()` under its own seed, the caller's random state untouched."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return build()


def build_clip(cfg: Config):
    from open_clip.model import CLIP

    return _seeded(cfg.seed, lambda: CLIP(**clip_model_cfg(cfg)))


def build_vae(cfg: Config):
    from diffusers import AutoencoderKL

    return _seeded(cfg.seed + 2, lambda: AutoencoderKL(**vae_cfg(cfg)))


def build_unet(cfg: Config):
    from diffusers import UNet2DConditionModel

    return _seeded(cfg.seed + 4, lambda: UNet2DConditionModel(**unet_cfg(cfg)))


def text_config(cfg: Config):
    from transformers import CLIPTextConfig

    from ..models import clip_tokenizer

    tok = clip_tokenizer()
    return CLIPTextConfig(
        vocab_size=len(tok), hidden_size=cfg.text_width, intermediate_size=4 * cfg.text_width, num_hidden_layers=cfg.text_layers,
        num_attention_heads=cfg.text_heads, max_position_embeddings=CONTEXT_LENGTH, hidden_act="gelu", layer_norm_eps=1e-5,
        projection_dim=cfg.text_width, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
    )


def init_base(cfg: Config) -> Path | None:
    """The pocket-sd folder of --init-from (None without it), checked to be one that ``export`` wrote."""
    if not cfg.init_from:
        return None
    base = Path(cfg.init_from)
    if not (base / "model_index.json").is_file() or not (base / RECORD_NAME).is_file():
        raise FileNotFoundError(f"--init-from {base}: not a pocket-sd folder (it needs model_index.json and {RECORD_NAME}); "
                                f"pass a folder that `export` wrote, e.g. {POCKET_SD_DIR.relative_to(REPO_ROOT)}")
    return base


def same_architecture(part: str, config, want: dict, base: Path) -> None:
    """Refuse a model of --init-from whose architecture is not this run's (the preset's, with its overrides)."""
    norm = lambda v: list(v) if isinstance(v, (list, tuple)) else v  # noqa: E731
    differ = {k: (norm(config[k]), norm(v)) for k, v in want.items() if norm(config[k]) != norm(v)}
    if differ:
        k, (have, asked) = next(iter(differ.items()))
        raise ValueError(f"--init-from {base}: its {part} has {k}={have}, this run's architecture {k}={asked}; "
                         "pass the preset (and width options) that base was trained with")


def trained_vae(cfg: Config):
    """The VAE of the stages after ``vae``: the vae stage's newest checkpoint, or --init-from's VAE as it is."""
    base = init_base(cfg)
    if base is None:
        return load_named(build_vae(cfg), read_stage(cfg, "vae")["trainable"], "vae").eval()
    from diffusers import AutoencoderKL

    vae = AutoencoderKL.from_pretrained(str(base / "vae"), local_files_only=True)
    same_architecture("VAE", vae.config, vae_cfg(cfg), base)
    return vae.eval()


def vae_source(cfg: Config) -> str:
    """Which VAE encoded the cached latents: a vae stage checkpoint, or --init-from's VAE (by its weights' hash)."""
    base = init_base(cfg)
    if base is None:
        return stage_checkpoint(cfg, "vae").name
    return "init-from:" + sha256(base / "vae" / "diffusion_pytorch_model.safetensors")[:16]


def initial_models(cfg: Config):
    """The text encoder and UNet the unet stage starts from: new ones (``build_*``), or --init-from's trained ones."""
    base = init_base(cfg)
    if base is None:
        return build_text_encoder(cfg), build_unet(cfg)
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextModel

    unet = UNet2DConditionModel.from_pretrained(str(base / "unet"), local_files_only=True)
    same_architecture("UNet", unet.config, unet_cfg(cfg), base)
    text_encoder = CLIPTextModel.from_pretrained(str(base / "text_encoder"), local_files_only=True)
    want = text_config(cfg).to_dict()
    same_architecture("text encoder", text_encoder.config.to_dict(),
                      {k: want[k] for k in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads")}, base)
    return text_encoder, unet


def build_text_encoder(cfg: Config):
    """The base's text encoder at its starting point: the trained pocket CLIP's text tower (text_init clip) or random weights."""
    from transformers import CLIPTextModel

    if cfg.text_init == "clip":
        clip = build_clip(cfg)
        load_named(clip, read_stage(cfg, "clip")["trainable"], "clip")
        return clip_text_to_hf(clip, cfg)
    if cfg.text_init == "scratch":
        return _seeded(cfg.seed + 6, lambda: CLIPTextModel(text_config(cfg)))
    raise ValueError(f"--text-init must be clip or scratch, got {cfg.text_init!r}")


def clip_text_to_hf(clip, cfg: Config) -> "CLIPTextModel":  # noqa: F821
    """The pocket CLIP's text tower as a transformers ``CLIPTextModel`` (same weights, same outputs).

    open_clip and transformers implement the same pre-LN causal transformer; the fused
    ``in_proj`` of ``nn.MultiheadAttention`` splits into q, k, v projections.
    """
    from transformers import CLIPTextModel

    config = text_config(cfg)
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


def named_parameters(parts: dict[str, torch.nn.Module]) -> dict[str, torch.nn.Parameter]:
    """Every parameter of the trained parts as "<part>.<name>": the engine's checkpoint keys."""
    return {f"{part}.{name}": p for part, model in parts.items() for name, p in model.named_parameters()}


@torch.no_grad()
def load_named(model: torch.nn.Module, tensors: dict[str, torch.Tensor], part: str) -> torch.nn.Module:
    """Copy `part`'s tensors (keys "<part>.<name>", as ``named_parameters`` gives them) into `model`'s parameters."""
    params = dict(model.named_parameters())
    missing = [n for n in params if f"{part}.{n}" not in tensors]
    if missing:
        raise ValueError(f"the checkpoint has no {part}.{missing[0]} (and {len(missing) - 1} more): it was trained with another architecture")
    for name, p in params.items():
        p.copy_(tensors[f"{part}.{name}"])
    return model


# ----------------------------------------------------------------------------- training stages on the engine


def stage_dir(cfg: Config, stage: str) -> Path:
    return cfg.work_dir / stage


def stage_checkpoint(cfg: Config, stage: str) -> Path | None:
    """The newest checkpoint of a training stage (its run in progress or its finished run); None before it ran."""
    from sbora.checkpoint import checkpoint_step, list_checkpoints
    from sbora.rundir import PARTIAL

    found = list_checkpoints(stage_dir(cfg, stage) / PARTIAL / "checkpoints") + list_checkpoints(stage_dir(cfg, stage) / "checkpoints")
    return max(found, key=checkpoint_step) if found else None


def keep_checkpoints(cfg: Config, stage: str) -> None:
    """Hard-link every checkpoint of a stage's run into ``checkpoints/<stage>/`` of the work folder.

    The engine keeps them all within one run, but a run resumed after it finished publishes only
    its own checkpoints; the links keep each one (no copy: same file), to measure or continue from.
    """
    from sbora.checkpoint import list_checkpoints
    from sbora.rundir import PARTIAL

    kept = cfg.work_dir / "checkpoints" / stage
    kept.mkdir(parents=True, exist_ok=True)
    for path in list_checkpoints(stage_dir(cfg, stage) / PARTIAL / "checkpoints") + list_checkpoints(stage_dir(cfg, stage) / "checkpoints"):
        if not (kept / path.name).exists():
            (kept / path.name).hardlink_to(path)


def read_stage_path(cfg: Config, stage: str) -> Path:
    path = stage_checkpoint(cfg, stage)
    if path is None:
        raise FileNotFoundError(f"{stage_dir(cfg, stage)} holds no checkpoint: run the {stage} stage first")
    return path


def read_stage(cfg: Config, stage: str) -> dict:
    from sbora.checkpoint import read_checkpoint

    return read_checkpoint(read_stage_path(cfg, stage))


def stage_fingerprint(cfg: Config, stage: str) -> dict:
    """The settings a stage's checkpoints must share to be resumed: its own options (its step count aside) and the architecture."""
    shared = ("seed", "num_images", "text_width", "text_layers", "text_heads", "text_init", "unet_channels", "vae_channels")
    own = {k: v for k, v in asdict(cfg).items() if k.startswith(TRAINED[stage] + "_") and k != f"{TRAINED[stage]}_steps"}
    if stage == "unet":
        own |= {k: getattr(cfg, k) for k in ("text_lr", "caption_dropout", "long_caption_fraction", "min_snr_gamma")}
        if cfg.x0_weight_floor or cfg.text_contrast_weight:  # added later: left out when off, so older checkpoints still resume
            own |= {k: getattr(cfg, k) for k in ("x0_weight_floor", "text_contrast_weight", "text_contrast_margin")}
        if init_base(cfg) is not None:  # trained on from a base: resumable only from that same base
            own["init_from"] = "unet:" + sha256(init_base(cfg) / "unet" / "diffusion_pytorch_model.safetensors")[:16]
    return {"pocket_stage": stage, **{k: getattr(cfg, k) for k in shared}, **own}


def make_engine(cfg: Config, stage: str, steps: int, lr: float, schedule: str, warmup: int, max_grad_norm: float, resume: bool, overwrite: bool):
    from sbora.engine import Engine, EngineConfig

    ecfg = EngineConfig(
        steps=steps, lr=lr, lr_schedule=schedule, warmup_steps=warmup, max_grad_norm=max_grad_norm, mixed_precision="no",
        cpu=True, train_seed=cfg.seed + 100 + STAGES.index(stage), log_every=cfg.log_every, checkpoint_every=cfg.checkpoint_every,
        keep_checkpoints=1_000_000, overwrite=overwrite,  # every stage checkpoint is kept: each can be measured and continued
    )
    return Engine(ecfg, stage_dir(cfg, stage), resume=resume and stage_checkpoint(cfg, stage) is not None, desc=f"pocket-{stage}")


class History:
    """The loss components of the last steps, for log lines and the stage's result."""

    def __init__(self, names: tuple[str, ...]):
        self.names, self.rows = names, []

    def add(self, *values: torch.Tensor) -> None:
        self.rows.append([float(v.detach()) for v in values])

    def mean(self, last: int) -> dict[str, float]:
        rows = np.array(self.rows[-last:]) if self.rows else np.full((1, len(self.names)), np.nan)
        return {n: float(v) for n, v in zip(self.names, np.nanmean(rows, 0))}


def spent_before(cfg: Config, stage: str, resumed: bool) -> dict:
    """Wall and CPU seconds a training stage spent in its earlier runs, up to its newest checkpoint.

    Kept in the stage folder's ``time.json`` at every checkpoint, so a run that was killed (not
    stopped) still counts up to where a resume picks it up."""
    path = stage_dir(cfg, stage) / "time.json"
    if resumed and path.is_file():
        return json.loads(path.read_text())
    return {"seconds": 0.0, "cpu_seconds": 0.0}


def note_spent(cfg: Config, stage: str, before: dict, t0: float, c0: float) -> dict:
    spent = {"seconds": round(before["seconds"] + time.time() - t0, 1), "cpu_seconds": round(before["cpu_seconds"] + time.process_time() - c0, 1)}
    write_json(stage_dir(cfg, stage) / "time.json", spent)  # atomic: a kill mid-write leaves the previous one
    return spent


def run_stage(engine, loss_fn, history: History, cfg: Config, stage: str, on_step=None) -> bool:
    """Train to the engine's step count (logging every --log-every steps); True when `on_step` stopped it early at its goal.

    Finished: its folder is published. Stopped at the goal: the run stays resumable in ``.partial``
    (a later --resume trains on). Ctrl-C: the checkpoint is kept and the interruption goes up.
    """
    from sbora.checkpoint import TrainingInterrupted

    t0, c0, goal = time.time(), time.process_time(), {"reached": False}
    before = spent_before(cfg, stage, engine.step > 0)

    def step_hook(step: int, loss: float) -> None:
        if step % cfg.checkpoint_every == 0:
            keep_checkpoints(cfg, stage)
            note_spent(cfg, stage, before, t0, c0)
        if step % cfg.log_every == 0 or step == engine.cfg.steps:
            means = " ".join(f"{k} {v:.4f}" for k, v in history.mean(cfg.log_every).items())
            log(f"{stage} step {step}/{engine.cfg.steps} {means} ({time.time() - t0:.0f}s)")
        if on_step is not None and on_step(step):
            goal["reached"] = True
            engine.stop.event.set()

    try:
        engine.run(loss_fn, step_hook)
    except TrainingInterrupted:
        engine.abort()
        keep_checkpoints(cfg, stage)
        note_spent(cfg, stage, before, t0, c0)
        if goal["reached"]:
            return True
        raise
    except BaseException as e:
        engine.abort(e)
        raise
    engine.finish()
    keep_checkpoints(cfg, stage)
    return False


def stage_clip(cfg: Config, resume: bool, overwrite: bool) -> dict:
    import open_clip

    images, views, metas = load_data(cfg, views=True)
    model = build_clip(cfg).train()
    with torch.no_grad():
        model.logit_scale.fill_(math.log(25.0))  # a sharper start than CLIP's 1/0.07 (short run)
    tokenizer = open_clip.tokenizer.SimpleTokenizer(context_length=CONTEXT_LENGTH)
    engine = make_engine(cfg, "clip", cfg.clip_steps, cfg.clip_lr, "cosine", min(30, cfg.clip_steps), 1.0, resume, overwrite)
    (model,) = engine.prepare(model)
    named = named_parameters({"clip": model})
    decays = {k: p.ndim >= 2 and "embedding" not in k for k, p in named.items()}
    groups = [{"params": [p for k, p in named.items() if decays[k]], "weight_decay": 0.05},
              {"params": [p for k, p in named.items() if not decays[k]], "weight_decay": 0.0}]
    engine.setup(named, groups, fingerprint=stage_fingerprint(cfg, "clip"))
    n, b, history = len(metas), cfg.clip_batch, History(("caption_loss", "instance_loss"))

    def loss_fn(micro):
        rng = micro_rng("clip", cfg, micro.index)
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
        inst_loss = F.cross_entropy(fv @ fx.T / 0.1, labels[: b // 2])  # each second view against every first view
        history.add(clip_loss, inst_loss)
        return clip_loss + cfg.clip_instance_weight * inst_loss

    run_stage(engine, loss_fn, history, cfg, "clip")
    return {"steps": engine.step, "batch": b, **{f"final_{k}": v for k, v in history.mean(cfg.log_every).items()}}


def stage_vae(cfg: Config, resume: bool, overwrite: bool) -> dict:
    images, metas = load_data(cfg)
    vae = build_vae(cfg).train()
    with torch.no_grad():  # start near-deterministic (posterior std ~0.02): noisy early latents slow the decoder down a lot
        vae.quant_conv.bias[4:].fill_(-8.0)
    engine = make_engine(cfg, "vae", cfg.vae_steps, cfg.vae_lr, "cosine", min(20, cfg.vae_steps), 0.0, resume, overwrite)
    (vae,) = engine.prepare(vae)
    named = named_parameters({"vae": vae})
    engine.setup(named, [{"params": list(named.values()), "weight_decay": 0.0}], fingerprint=stage_fingerprint(cfg, "vae"))
    n, history = len(metas), History(("l1", "mse", "kl"))
    crop_until = cfg.vae_steps * (1 - cfg.vae_full_fraction) if cfg.vae_crop < g.SIZE else 0

    def loss_fn(micro):
        rng = micro_rng("vae", cfg, micro.index)
        if micro.step < crop_until:
            x = to_tensor(images[sorted(rng.sample(range(n), cfg.vae_batch))])
            i, j = rng.randrange(0, g.SIZE - cfg.vae_crop + 1, 4), rng.randrange(0, g.SIZE - cfg.vae_crop + 1, 4)
            x = x[:, :, i : i + cfg.vae_crop, j : j + cfg.vae_crop]
        else:
            x = to_tensor(images[sorted(rng.sample(range(n), max(1, cfg.vae_batch * cfg.vae_crop**2 // g.SIZE**2)))])
        post = vae.encode(x).latent_dist
        rec = vae.decode(post.sample(generator=micro.generator)).sample
        l1, mse, kl = (rec - x).abs().mean(), (rec - x).pow(2).mean(), post.kl().mean()
        history.add(l1, mse, kl)
        return l1 + mse + cfg.vae_kl_weight * kl

    run_stage(engine, loss_fn, history, cfg, "vae")
    vae.eval()
    return {"steps": engine.step, "batch": cfg.vae_batch, **vae_error(vae, 256), **vae_shape_ceiling(vae)}


@torch.no_grad()
def vae_error(vae, count: int = 256) -> dict:
    """Reconstruction error on held-out world images (pixels in [0, 1]): MSE, PSNR, mean |error|."""
    images, _, _ = render_world(list(range(EVAL_SEED0, EVAL_SEED0 + count)), 1)
    x = to_tensor(images)
    rec = torch.cat([vae.decode(vae.encode(x[i : i + 64]).latent_dist.mode()).sample for i in range(0, count, 64)]).clamp(-1, 1)
    err = (rec - x) / 2  # in [0, 1] units
    mse = float(err.pow(2).mean())
    return {"heldout_mse": mse, "heldout_psnr_db": 10 * math.log10(1 / mse), "heldout_mae": float(err.abs().mean()), "heldout_images": count}


@torch.no_grad()
def vae_shape_ceiling(vae, count: int = 120) -> dict:
    """The shape probe on the VAE's reconstructions of the world's own renders: the most a base with this VAE can score."""
    asks = probes.shape_asks(count, EVAL_SEED0)
    x = to_tensor(np.stack([np.asarray(im) for im in probes.render_drawer(asks)]))
    rec = vae.decode(vae.encode(x).latent_dist.mode()).sample
    return {"shape_probe_on_reconstructions": probes.score_shape(to_images(rec), asks)["rate"], "shape_probe_images": count}


def stage_latents(cfg: Config, resume: bool, overwrite: bool) -> dict:
    vae = trained_vae(cfg)
    images, metas = load_data(cfg)
    out = np.empty((len(metas), 4, 16, 16), dtype=np.float32)
    with torch.no_grad():
        for i in range(0, len(metas), 256):
            out[i : i + 256] = vae.encode(to_tensor(images[i : i + 256])).latent_dist.mode().numpy()
    np.save(cfg.work_dir / "latents.npy", out)
    std = float(out.std())
    scaling = vae.config.scaling_factor if init_base(cfg) else 1.0 / std  # a base trained on keeps the latent scale its UNet knows
    (cfg.work_dir / "latents.json").write_text(json.dumps({"scaling_factor": scaling, "mean": float(out.mean()), "std": std}))
    return {"count": len(metas), "scaling_factor": scaling, "latent_mean": float(out.mean()), "latent_std": std,
            "vae_checkpoint": vae_source(cfg)}


def unet_loss_weight(snr: torch.Tensor, gamma: float, floor: float) -> torch.Tensor:
    """The weight of each sample's epsilon loss, given its timestep's SNR.

    An epsilon error is sqrt(snr) times the error of the implied x0 estimate, so the plain
    epsilon loss weighs the x0 error by snr: at t ~ 900 (snr ~ 0.01) the image's layout (where
    the object is, its silhouette, the background) counts ~100x less than detail at t ~ 300.
    Min-SNR (Hang et al., 2023, arXiv:2303.09556) caps that weight at `gamma` for the small t;
    `floor` > 0 also lifts it to at least `floor` for the large t, so that what the caption says
    about layout ("on the left") is learnt (the v2 base, trained without it, drew one layout for
    both sides). Returns (min(snr, gamma) + floor) / snr, i.e. 1 for plain epsilon loss when
    gamma is 0 and floor is 0.
    """
    x0_weight = (torch.clamp(snr, max=gamma) if gamma > 0 else snr) + floor
    return x0_weight / snr


def text_contrast(ctx: torch.Tensor, twin_ctx: torch.Tensor, margin: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Hinge on the cosine similarity of captions' text states and their twins' (all tokens, as the UNet reads them).

    Trained from scratch through the UNet's loss alone, v2's text encoder kept "on the left" and
    "on the right" 3% apart (cos 0.999; "red" vs "blue": 65%, cos 0.79), so nothing reached the
    UNet that could place an object, although the UNet learns sides within 300 steps when the
    conditioning states them loudly. The hinge pushes a caption and its twin (side swapped, or
    another noun) apart until their similarity is below `margin`, then lets them be.
    Returns (loss, the pairs' mean cosine similarity)."""
    cos = torch.nn.functional.cosine_similarity(ctx.flatten(1), twin_ctx.flatten(1), dim=1)  # (pairs,)
    return torch.relu(cos - margin).mean(), cos.detach().mean()


def stage_unet(cfg: Config, resume: bool, overwrite: bool) -> dict:
    from diffusers import DDPMScheduler

    from sbora.procedures import EMA

    from ..models import clip_tokenizer, sd_noise_scheduler_config

    latents = torch.from_numpy(np.load(cfg.work_dir / "latents.npy"))
    scaling = json.loads((cfg.work_dir / "latents.json").read_text())["scaling_factor"]
    metas = json.loads((cfg.work_dir / "meta.json").read_text())
    tokenizer = clip_tokenizer()
    text_encoder, unet = (m.train() for m in initial_models(cfg))
    vae = trained_vae(cfg)
    vae.register_to_config(scaling_factor=scaling)
    sched = DDPMScheduler.from_config(sd_noise_scheduler_config())
    snr = sched.alphas_cumprod / (1 - sched.alphas_cumprod)
    engine = make_engine(cfg, "unet", cfg.unet_steps, cfg.unet_lr, cfg.unet_schedule, cfg.unet_warmup, 1.0, resume, overwrite)
    unet, text_encoder = engine.prepare(unet, text_encoder)
    named = named_parameters({"unet": unet, "text_encoder": text_encoder})
    groups = [{"params": list(unet.parameters()), "lr": cfg.unet_lr, "weight_decay": 0.01},
              {"params": list(text_encoder.parameters()), "lr": cfg.text_lr, "weight_decay": 0.0}]
    ema = EMA(cfg.ema_decay)
    engine.setup(named, groups, fingerprint=stage_fingerprint(cfg, "unet"), procedures=[ema])
    n, b, history = len(metas), cfg.unet_batch, History(("mse", "weighted") + (("text_twin_cos",) if cfg.text_contrast_weight else ()))
    token_cache: dict[str, list[int]] = {}

    def tokens(caps: list[str]) -> torch.Tensor:
        missing = [c for c in set(caps) if c not in token_cache]
        if missing:
            ids = tokenizer(missing, padding="max_length", max_length=CONTEXT_LENGTH, truncation=True).input_ids
            token_cache.update(zip(missing, ids))
        return torch.tensor([token_cache[c] for c in caps])

    def loss_fn(micro):
        rng = micro_rng("unet", cfg, micro.index)
        idx = sorted(rng.sample(range(n), b))
        z = latents[idx] * scaling
        caps, twins = [], []  # twins: (position in the batch, twin caption) for text_contrast
        twin_rng = random.Random(f"twin:{cfg.seed}:{micro.index}")  # its own draws: the batch's captions are the same with or without twins
        for k, i in enumerate(idx):
            if rng.random() < cfg.caption_dropout:
                caps.append("")
            elif cfg.text_contrast_weight:
                cap, twin = caption_and_twin(metas[i], rng, cfg.long_caption_fraction, twin_rng.choice(("side", "noun")), twin_rng)
                caps.append(cap)
                if twin != cap:  # a caption that does not name the sides has no side twin
                    twins.append((k, twin))
            else:
                caps.append(train_caption(metas[i], rng, cfg.long_caption_fraction))
        ctx = text_encoder(tokens(caps))[0]  # (b, 77, width)
        noise = torch.randn(z.shape, generator=micro.generator)
        t = torch.randint(0, sched.config.num_train_timesteps, (b,), generator=micro.generator)
        pred = unet(sched.add_noise(z, noise, t), t, ctx).sample
        w = unet_loss_weight(snr[t], cfg.min_snr_gamma, cfg.x0_weight_floor)
        per = (pred - noise).pow(2).mean(dim=(1, 2, 3))
        loss = (w * per).mean()
        if not cfg.text_contrast_weight:
            history.add(per.mean(), loss)
            return loss
        hinge, twin_cos = torch.zeros(()), torch.tensor(float("nan"))  # (no twin in a batch of dropped captions)
        if twins:
            twin_ctx = text_encoder(tokens([c for _, c in twins]))[0]  # (pairs, 77, width)
            hinge, twin_cos = text_contrast(ctx[[k for k, _ in twins]], twin_ctx, cfg.text_contrast_margin)
        history.add(per.mean(), loss, twin_cos)
        return loss + cfg.text_contrast_weight * hinge

    probe_log = cfg.work_dir / "unet_probes.jsonl"
    state = {"last": None}

    def probe_at_checkpoint(step: int) -> bool:
        if not (cfg.probe_images and step % cfg.checkpoint_every == 0):
            return False
        t0 = time.time()
        averaged = ema.averaged()
        pipe = assemble(vae, load_named(copy.deepcopy(text_encoder), averaged, "text_encoder").eval(),
                        load_named(copy.deepcopy(unet), averaged, "unet").eval())
        found = measure_base(pipe, cfg.probe_images, cfg.measure_steps, cfg.measure_guidance, SELECTION_SEED0)
        unmet = probes.unmet_targets(found)
        state["last"] = {"step": step, "unmet": unmet, **{k: v["rate"] for k, v in found["probes"].items()}, "slots": found["slots"]["concepts"]}
        with open(probe_log, "a") as f:
            f.write(json.dumps({**state["last"], "images_per_probe": cfg.probe_images, "seconds": round(time.time() - t0, 1)}) + "\n")
        log(f"probes at step {step}: {json.dumps(state['last'])}")
        return cfg.stop_at_targets and not unmet

    stopped = run_stage(engine, loss_fn, history, cfg, "unet", probe_at_checkpoint)
    return {"steps": engine.step, "batch": b, "stopped_at_targets": engine.step if stopped else None, "last_probes": state["last"],
            **{f"final_{k}_last100": v for k, v in history.mean(100).items()}}


# ----------------------------------------------------------------------------- export


def assemble(vae, text_encoder, unet):
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    from ..models import clip_tokenizer, sd_noise_scheduler_config

    pipe = StableDiffusionPipeline(
        vae=vae, text_encoder=text_encoder, tokenizer=clip_tokenizer(), unet=unet,
        scheduler=DDIMScheduler(**sd_noise_scheduler_config()), safety_checker=None, feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def unet_checkpoint(cfg: Config) -> Path:
    """The UNet checkpoint to export: the newest, or with ``--export-step N`` the one kept at step N."""
    from sbora.checkpoint import checkpoint_step, list_checkpoints

    if not cfg.export_step:
        return read_stage_path(cfg, "unet")
    folder = cfg.work_dir / "checkpoints" / "unet"
    kept = {checkpoint_step(p): p for p in list_checkpoints(folder)}
    if cfg.export_step not in kept:
        raise FileNotFoundError(f"no UNet checkpoint at step {cfg.export_step} in {folder}; kept steps: {sorted(kept) or 'none'}")
    return kept[cfg.export_step]


def build_pipeline(cfg: Config, use_ema: bool = True):
    """The pocket StableDiffusionPipeline from the work folder's checkpoints (the UNet stage's averaged weights)."""
    from sbora.checkpoint import read_checkpoint
    from sbora.procedures import EMA

    vae = trained_vae(cfg)
    vae.register_to_config(scaling_factor=json.loads((cfg.work_dir / "latents.json").read_text())["scaling_factor"])
    ck = read_checkpoint(unet_checkpoint(cfg))
    weights = EMA.read(ck) if use_ema else ck["trainable"]
    text_encoder, unet = initial_models(cfg)
    unet, text_encoder = load_named(unet, weights, "unet"), load_named(text_encoder, weights, "text_encoder")
    return assemble(vae.eval(), text_encoder.eval(), unet.eval())


def checksums(folder: Path) -> dict[str, str]:
    """sha256 of every file under `folder` except the record itself, by relative path."""
    return {
        str(p.relative_to(folder)): sha256(p)
        for p in sorted(folder.rglob("*"))
        if p.is_file() and p.name != RECORD_NAME and not p.name.startswith(".")
    }


def stage_export(cfg: Config, resume: bool, overwrite: bool) -> dict:
    from ..models import clip_tokenizer_files

    out = Path(cfg.out)
    sd_dir, clip_dir = out / POCKET_SD_DIR.name, out / POCKET_CLIP_DIR.name
    pipe = build_pipeline(cfg)
    if sd_dir.exists():
        shutil.rmtree(sd_dir)
    pipe.save_pretrained(sd_dir, safe_serialization=True)
    # The slow-format tokenizer files (vocab.json + merges.txt, 1.5 MB) instead of tokenizer.json (3.6 MB):
    # the same CLIP BPE, and CLIPTokenizer.from_pretrained reads either.
    for name in ("vocab.json", "merges.txt"):
        shutil.copyfile(clip_tokenizer_files() / name, sd_dir / "tokenizer" / name)
    (sd_dir / "tokenizer" / "tokenizer.json").unlink(missing_ok=True)
    written = [sd_dir]
    if stage_checkpoint(cfg, "clip") is not None:  # this work folder trained a pocket CLIP: ship it too
        from safetensors.torch import save_file

        clip = load_named(build_clip(cfg), read_stage(cfg, "clip")["trainable"], "clip")
        if clip_dir.exists():
            shutil.rmtree(clip_dir)
        clip_dir.mkdir(parents=True)
        (clip_dir / "open_clip_config.json").write_text(json.dumps({"model_cfg": clip_model_cfg(cfg), "preprocess_cfg": CLIP_PREPROCESS_CFG}, indent=2) + "\n")
        save_file({k: v.contiguous() for k, v in clip.state_dict().items()}, str(clip_dir / "open_clip_model.safetensors"))
        written.append(clip_dir)
    return {"bytes": {d.name: sum(p.stat().st_size for p in d.rglob("*") if p.is_file()) for d in written}}


# ----------------------------------------------------------------------------- measurements


def measure_base(pipe, images: int, steps: int, guidance: float, first_seed: int) -> dict:
    """Every probe of ``probes.py`` on a pipeline: `images` per image probe, and the room for concepts."""
    counts = {name: images for name in probes.PROBES}
    found = probes.run_probes(probes.pipeline_drawer(pipe, steps, guidance), counts, first_seed)
    for result in found.values():
        result |= {"steps": steps, "guidance_scale": guidance}
    return {"probes": found, "slots": probes.slot_room(pipe.unet, pipe.text_encoder)}


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

    pipe = StableDiffusionPipeline.from_pretrained(str(folder), local_files_only=True, safety_checker=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def stage_measure(cfg: Config, resume: bool, overwrite: bool) -> dict:
    out = Path(cfg.out)
    pipe = load_pocket_sd(out / POCKET_SD_DIR.name)
    found = measure_base(pipe, cfg.measure_images, cfg.measure_steps, cfg.measure_guidance, HELDOUT_SEED0)
    log("probes: " + json.dumps({k: (v["rate"], v["control"]["rate"], v["images"]) for k, v in found["probes"].items()})
        + f", slots {found['slots']['concepts']}; unmet: {probes.unmet_targets(found) or 'none'}")
    asks = probes.side_asks(16, HELDOUT_SEED0) + probes.two_object_asks(16, HELDOUT_SEED0)
    save_grid(probes.pipeline_drawer(pipe, cfg.measure_steps, cfg.measure_guidance)(asks), cfg.work_dir / "probes.png", cols=16)
    result = {"base": {**found, "targets": probes.TARGETS, "unmet_targets": probes.unmet_targets(found), "seeds_from": HELDOUT_SEED0}}
    if stage_checkpoint(cfg, "clip") is not None:  # the CLIP this work folder trained (and exported)
        scorer = load_pocket_clip(out / POCKET_CLIP_DIR.name)
        result["clip"] = {"clip_retrieval": clip_retrieval(scorer), "concept_identification": concept_identification(scorer)}
        log(f"clip: {json.dumps(result['clip'])[:300]}")
    return result


def save_grid(images, path: Path, cols: int = 8) -> None:
    from PIL import Image

    rows = (len(images) + cols - 1) // cols
    grid = Image.new("RGB", (cols * 66, rows * 66), (255, 255, 255))
    for i, im in enumerate(images):
        grid.paste(im, ((i % cols) * 66, (i // cols) * 66))
    grid.save(path)


# ----------------------------------------------------------------------------- records


def portable(value, places: dict[Path, str]):
    """`value` with this machine's paths taken out: each of `places` by its name ($WORK, $OUT), the repository's as relative paths."""
    if isinstance(value, dict):
        return {k: portable(v, places) for k, v in value.items()}
    if isinstance(value, list):
        return [portable(v, places) for v in value]
    if isinstance(value, str):
        for path, name in sorted(places.items(), key=lambda kv: -len(str(kv[0]))):  # the longest first: a folder inside another
            value = value.replace(str(path), name)
        value = value.replace(str(REPO_ROOT) + "/", "").replace(str(REPO_ROOT), ".")
    return value


def record_places(cfg: Config, record_work: str | None = None) -> dict[Path, str]:
    """The run's folders as records name them: the work folder(s) as $WORK, --out and --init-from relative to the
    repository, else as $OUT and $BASE."""
    places = {}
    for work in {cfg.work, record_work} - {None}:
        places |= {Path(work): "$WORK", Path(work).resolve(): "$WORK"}
    for folder, name in ((cfg.out, "$OUT"), (cfg.init_from, "$BASE")):
        if folder and not Path(folder).resolve().is_relative_to(REPO_ROOT):
            places |= {Path(folder): name, Path(folder).resolve(): name}
    return places


def command_line(argv: list[str]) -> str:
    return "python -m sbora_diffusion.world.pretrain " + " ".join(shlex.quote(a) for a in argv)


def versions() -> dict:
    import diffusers
    import open_clip
    import transformers

    return {"torch": torch.__version__, "diffusers": diffusers.__version__, "transformers": transformers.__version__,
            "open_clip": open_clip.__version__}


def write_export_records(cfg: Config, results: dict) -> None:
    """The records of what ``export`` wrote: how each folder was made (every command, settings, stages, files)."""
    out = Path(cfg.out)
    common = {
        "commands": results["commands"], "preset": cfg.preset, "config": asdict(cfg), "threads": cfg.threads, "versions": versions(),
        "note": "CPU float32 training; seeded, repeats closely but not bit for bit on other machines or torch builds",
    }
    stages = {k: results[k] for k in ("data", "clip", "vae", "latents", "unet") if k in results}
    if cfg.export_step and "unet" in stages:  # an earlier checkpoint than the stage's last: the record says which
        stages["unet"] = stages["unet"] | {"exported_step": cfg.export_step}
    cpu = {k: v.get("cpu_seconds") for k, v in stages.items()}
    sd_dir = out / POCKET_SD_DIR.name
    base = results.get("init_from", {})  # trained on from a base: its making is part of this one's, its CPU time too
    lineage = {"cpu_seconds_in_all": round(sum(v or 0 for v in cpu.values()) + base.get("cpu_seconds_in_all", 0), 1)}
    if base:
        lineage["initialised_from"] = base
    text = ("CLIPTextModel initialised from the pocket CLIP's text tower, trained jointly with the UNet" if cfg.text_init == "clip"
            else "CLIPTextModel trained from random weights jointly with the UNet (the pocket CLIP is not part of this base)")
    records = {sd_dir: common | {
        "what": "pocket-sd: a StableDiffusionPipeline pretrained on the pocket world (StableDiffusionPipeline.from_pretrained(folder))",
        "architecture": {"vae": vae_cfg(cfg), "unet": unet_cfg(cfg), "text_encoder": {
            "what": text, "width": cfg.text_width, "layers": cfg.text_layers, "heads": cfg.text_heads, "vocabulary": "CLIP's BPE (49408)"}},
        "stages": stages, "stage_seconds": {k: v.get("seconds") for k, v in stages.items()},
        "stage_cpu_seconds": cpu, **lineage, "measurements": {}, "files": checksums(sd_dir),
    }}
    clip_dir = out / POCKET_CLIP_DIR.name
    if "clip" in stages:
        records[clip_dir] = common | {
            "what": "pocket-clip: an open_clip CLIP trained on the pocket world (open_clip.create_model_and_transforms('local-dir:FOLDER'))",
            "stages": {k: stages[k] for k in ("data", "clip")}, "measurements": {}, "files": checksums(clip_dir),
        }
    for folder, record in records.items():
        (folder / RECORD_NAME).write_text(json.dumps(portable(record, record_places(cfg)), indent=2) + "\n")


def update_measurements(cfg: Config, measured: dict, argv: list[str]) -> None:
    """Put the measure stage's numbers (and its command) into the records of the folders in --out; the rest of each record stays.

    Every record there is written back without this machine's paths (an older record may hold some)."""
    out = Path(cfg.out)
    numbers = {POCKET_SD_DIR.name: measured["base"], POCKET_CLIP_DIR.name: measured.get("clip", {})}
    if not (out / POCKET_SD_DIR.name / RECORD_NAME).is_file():
        raise FileNotFoundError(f"{out / POCKET_SD_DIR.name / RECORD_NAME} is missing: export before measuring (the record says how the base was made)")
    for name, found in numbers.items():
        path = out / name / RECORD_NAME
        if not path.is_file():
            continue
        record = json.loads(path.read_text())
        if found:
            record.setdefault("measurements", {}).update(found)
            record["measure_command"] = command_line(argv)
        path.write_text(json.dumps(portable(record, record_places(cfg, record.get("config", {}).get("work"))), indent=2) + "\n")


# ----------------------------------------------------------------------------- the command


def stage_done(cfg: Config, stage: str, results: dict) -> bool:
    """Whether --resume may skip a stage: the world is rendered, the latents encoded by the newest VAE, a
    training stage trained to its step count (or stopped at its targets there). Export and measure always run."""
    if stage == "data":
        return results.get("data", {}).get("num_images") == cfg.num_images and (cfg.work_dir / "meta.json").is_file()
    if stage == "latents":
        if init_base(cfg) is None and stage_checkpoint(cfg, "vae") is None:
            return False
        return results.get("latents", {}).get("vae_checkpoint") == vae_source(cfg) and (cfg.work_dir / "latents.npy").is_file()
    if stage not in TRAINED or (path := stage_checkpoint(cfg, stage)) is None:
        return False
    step = int(path.stem.split("-")[1])
    stopped = results.get(stage, {}).get("stopped_at_targets")
    return step >= getattr(cfg, f"{TRAINED[stage]}_steps") or (cfg.stop_at_targets and stopped == step)


def parse_args(argv: list[str]) -> tuple[Config, list[str], bool, bool]:
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--preset", default="v2")
    defaults = preset_config(pre.parse_known_args(argv)[0].preset)
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog="\n\n".join(__doc__.split("\n\n")[1:]),
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("stage", choices=STAGES + ("all",), nargs="+", help="stages to run, in order ('all': every stage the preset needs)")
    ap.add_argument("--resume", action="store_true", help="continue each training stage from its newest checkpoint; skip those already done")
    ap.add_argument("--overwrite", action="store_true", help="retrain stages whose folders already hold a run")
    for f in fields(Config):
        kind = type(getattr(defaults, f.name))
        parse = (lambda s: {"true": True, "1": True, "yes": True, "false": False, "0": False, "no": False}[s.lower()]) if kind is bool else kind
        ap.add_argument("--" + f.name.replace("_", "-"), type=parse, default=getattr(defaults, f.name), metavar=kind.__name__.upper())
    args = ap.parse_args(argv)
    cfg = replace(defaults, **{f.name: getattr(args, f.name) for f in fields(Config)})
    for name in ("unet", "vae"):
        cfg.channels(name)  # refused early: a bad width list
    for name, ok, want in (("x0_weight_floor", cfg.x0_weight_floor >= 0, ">= 0"), ("text_contrast_weight", cfg.text_contrast_weight >= 0, ">= 0"),
                           ("text_contrast_margin", -1 <= cfg.text_contrast_margin < 1, "in [-1, 1) (a cosine)"),
                           ("export_step", cfg.export_step >= 0, ">= 0 (0: the newest checkpoint)")):
        if not ok:
            raise ValueError(f"--{name.replace('_', '-')} must be {want}, got {getattr(cfg, name)}")
    trained_here = {"clip", "vae"} if cfg.init_from else set()  # trained on from a base: its VAE (and no CLIP) as they are
    if "all" in args.stage:
        stages = [s for s in STAGES if (s != "clip" or cfg.text_init == "clip") and s not in trained_here]
    else:
        stages = [s for s in STAGES if s in args.stage]
        if trained_here & set(stages):
            raise ValueError(f"--init-from uses that base's VAE as it is and trains no CLIP: leave out {' and '.join(sorted(trained_here & set(stages)))}")
    return cfg, stages, args.resume, args.overwrite


def main(argv: list[str] | None = None) -> int:
    from sbora.cli import run_main

    return run_main(_main, argv)


def _main(argv: list[str]) -> None:
    from sbora.checkpoint import TrainingInterrupted

    cfg, stages, resume, overwrite = parse_args(argv)
    torch.set_num_threads(cfg.threads)
    cfg.work_dir.mkdir(parents=True, exist_ok=True)
    results_path = cfg.work_dir / "results.json"
    results = json.loads(results_path.read_text()) if results_path.is_file() else {}
    if (base := init_base(cfg)) is not None:
        if (Path(cfg.out) / POCKET_SD_DIR.name).resolve() == base.resolve():
            raise ValueError(f"--out would overwrite the base this run trains on from ({base}): export to another folder, "
                             "measure it there and copy it over once it measures better")
        record = json.loads((base / RECORD_NAME).read_text())  # how the base was made: part of this run's record
        results["init_from"] = {k: record[k] for k in ("commands", "preset", "stages", "stage_cpu_seconds", "cpu_seconds_in_all", "measurements", "files")
                                if k in record}
        results["init_from"].setdefault("cpu_seconds_in_all", round(sum(v or 0 for v in record.get("stage_cpu_seconds", {}).values()), 1))
    else:
        results.pop("init_from", None)
    results["commands"] = results.get("commands", []) + [command_line(argv)]
    write_json(results_path, results)
    for stage in stages:
        if resume and stage_done(cfg, stage, results):
            log(f"stage {stage}: already done; skipped (--resume)")
            continue
        log(f"stage {stage}")
        t0, c0 = time.time(), time.process_time()
        resumed = resume and stage in TRAINED and stage_checkpoint(cfg, stage) is not None
        before = spent_before(cfg, stage, resumed)  # a resumed stage's time adds up, a killed run's to its last checkpoint
        commands = (results.get(stage, {}).get("commands", []) if resumed else []) + [command_line(argv)]
        try:
            res = globals()[f"stage_{stage}"](cfg, resume, overwrite)
        except TrainingInterrupted as e:  # stopped mid-stage: its time and command so far go into the results (and a later export's record)
            results[stage] = {"steps": e.step, "interrupted_at": e.step, **spent_before(cfg, stage, True), "commands": commands}
            write_json(results_path, results)
            raise
        spent = note_spent(cfg, stage, before, t0, c0) if stage in TRAINED else {
            "seconds": round(time.time() - t0, 1), "cpu_seconds": round(time.process_time() - c0, 1)}
        res |= spent | {"commands": commands}
        results[stage] = res
        write_json(results_path, results)
        log(f"stage {stage} done in {res['seconds']:.0f}s: {json.dumps({k: v for k, v in res.items() if k not in ('commands', 'base', 'clip')})[:400]}")
        if stage == "export":
            write_export_records(cfg, results)
        if stage == "measure":
            update_measurements(cfg, res, argv)


if __name__ == "__main__":
    sys.exit(main())
