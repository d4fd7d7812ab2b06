"""Tiny models shared by the tests (random init, built in milliseconds)."""

from __future__ import annotations

import os

# A run on plain or AVX2 kernels (ATEN_CPU_CAPABILITY=default, as CI's second pass, or avx2)
# emulates a CPU without AVX-512, but oneDNN still sees the real one: on a CPU with AVX-512 BF16,
# PyTorch's bf16 scaled_dot_product_attention then takes a packed path that only the AVX-512
# kernels have ("pack_vnni2 is only supported when avx512 is supported"). Cap oneDNN to match
# (unless ONEDNN_MAX_CPU_ISA is given); oneDNN reads it at its first use, after this.
_ONEDNN_CAP = {"default": "SSE41", "avx2": "AVX2"}.get(os.environ.get("ATEN_CPU_CAPABILITY", ""))
if _ONEDNN_CAP:
    os.environ.setdefault("ONEDNN_MAX_CPU_ISA", _ONEDNN_CAP)

import pytest  # noqa: E402
import torch  # noqa: E402
from torch import nn


class TinyAttention(nn.Module):
    """Module names as in diffusers' Attention (to_q/to_k/to_v/to_out.0), with d_in != d_out."""

    def __init__(self, d: int = 24, d_ctx: int = 20, d_inner: int = 32):
        super().__init__()
        self.to_q = nn.Linear(d, d_inner, bias=False)
        self.to_k = nn.Linear(d_ctx, d_inner, bias=False)
        self.to_v = nn.Linear(d_ctx, d_inner, bias=False)
        self.to_out = nn.ModuleList([nn.Linear(d_inner, d), nn.Dropout(0.0)])
        self.norm = nn.LayerNorm(d)

    def forward(self, x: torch.Tensor, ctx: torch.Tensor | None = None) -> torch.Tensor:
        ctx = x if ctx is None else ctx
        q, k, v = self.to_q(x), self.to_k(ctx), self.to_v(ctx)  # (B, T, d_inner)
        attn = torch.softmax(q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5, dim=-1)
        return self.norm(x + self.to_out[0](attn @ v))


class TinyBlocks(nn.Module):
    def __init__(self):
        super().__init__()
        self.blocks = nn.ModuleList([TinyAttention(), TinyAttention()])
        self.ctx_proj = nn.Linear(24, 20)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        ctx = self.ctx_proj(x)
        for b in self.blocks:
            x = b(x, ctx)
        return x


def pytest_collection_modifyitems(items):
    """Files marked ``minutes`` (they train on the pocket base for minutes) are collected first. ``make test`` hands
    whole files to its processes in collection order (``--no-loadscope-reorder``; pytest-xdist's own order, by number
    of tests, sent the five-test test_placement.py last, where it ran alone for minutes after the rest had finished)."""
    items.sort(key=lambda item: item.get_closest_marker("minutes") is None)  # stable: otherwise the usual order


@pytest.fixture(scope="session", autouse=True)
def test_threads():
    """One intra-op thread by default: tiny models run faster, and a busy machine cannot oversubscribe it.

    ``SBORA_TEST_THREADS=2`` runs the suite on two threads (``make test-cpus``): results must not
    depend on how a reduction is split between threads.
    """
    before = torch.get_num_threads()
    torch.set_num_threads(int(os.environ.get("SBORA_TEST_THREADS", "1")))
    yield
    torch.set_num_threads(before)


@pytest.fixture
def tiny_model() -> TinyBlocks:
    torch.manual_seed(0)
    return TinyBlocks()


@pytest.fixture
def tiny_input() -> torch.Tensor:
    return torch.randn(2, 5, 24, generator=torch.Generator().manual_seed(1))


@pytest.fixture(scope="module")
def tiny_pipe():
    """The embedded tiny Stable Diffusion pipeline, built once per module; tests that change it deep-copy it first."""
    from sbora_diffusion.models import load_pipeline

    return load_pipeline("tiny")


def build_tiny_sdxl():
    """A few-MB StableDiffusionXLPipeline built from configs (random weights, seed 0) with SDXL's structure.

    Two text encoders of different widths (a CLIPTextModel of 32, a CLIPTextModelWithProjection of 48
    projecting to 24, so a mix-up of the two fails loudly), each with the real CLIP BPE tokenizer (the
    second pads with "!" as SDXL's does); a UNet with SDXL's "text_time" add-embedding (6 size/crop
    numbers x 8 + the pooled 24), cross-attention over the concatenated 32 + 48, no attention in its
    first block and transformer blocks at two levels below it (two layers deep in the lowest and the
    middle block); the tiny VAE with SDXL's latent scale; an Euler scheduler, as SDXL ships (load_pipeline
    swaps in DDIM). 64x64 images, 16x16x4 latents.
    """
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    from sbora_diffusion.models import TOKENIZER_MAX_LENGTH, clip_tokenizer, clip_tokenizer_files

    tokenizer = clip_tokenizer()
    files = clip_tokenizer_files()
    tokenizer_2 = CLIPTokenizer(vocab=str(files / "vocab.json"), merges=str(files / "merges.txt"),
                                model_max_length=TOKENIZER_MAX_LENGTH, pad_token="!")

    def text_config(tok, width: int, projection: int) -> CLIPTextConfig:
        return CLIPTextConfig(vocab_size=len(tok), hidden_size=width, intermediate_size=2 * width, num_hidden_layers=2,
                              num_attention_heads=4, max_position_embeddings=TOKENIZER_MAX_LENGTH, projection_dim=projection,
                              bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        vae = AutoencoderKL(
            in_channels=3, out_channels=3, latent_channels=4, layers_per_block=1, norm_num_groups=8, sample_size=64,
            down_block_types=("DownEncoderBlock2D",) * 3, up_block_types=("UpDecoderBlock2D",) * 3, block_out_channels=(16, 32, 32),
            scaling_factor=0.13025,
        )
        text_encoder = CLIPTextModel(text_config(tokenizer, 32, 32))
        text_encoder_2 = CLIPTextModelWithProjection(text_config(tokenizer_2, 48, 24))
        unet = UNet2DConditionModel(
            sample_size=16, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(16, 32, 64),
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
            attention_head_dim=(2, 4, 8), transformer_layers_per_block=(1, 1, 2), use_linear_projection=True,
            addition_embed_type="text_time", addition_time_embed_dim=8, projection_class_embeddings_input_dim=6 * 8 + 24,
            cross_attention_dim=32 + 48, norm_num_groups=8,
        )
    scheduler = EulerDiscreteScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                       steps_offset=1, timestep_spacing="leading")
    return StableDiffusionXLPipeline(vae=vae, text_encoder=text_encoder, text_encoder_2=text_encoder_2, tokenizer=tokenizer,
                                     tokenizer_2=tokenizer_2, unet=unet, scheduler=scheduler, add_watermarker=False)


@pytest.fixture(scope="session")
def tiny_sdxl_dir(tmp_path_factory):
    """The tiny SDXL pipeline saved as a diffusers folder (what --model takes), once per session."""
    folder = tmp_path_factory.mktemp("tiny-sdxl")
    build_tiny_sdxl().save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def tiny_sdxl(tiny_sdxl_dir):
    """The tiny SDXL pipeline loaded from its folder (load_pipeline); tests that change it deep-copy it first."""
    from sbora_diffusion.models import load_pipeline

    return load_pipeline(str(tiny_sdxl_dir))


TINY_CLIP = {  # a tiny open_clip architecture (random weights): the scoring code's tests
    "embed_dim": 32,
    "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "patch_size": 8, "head_width": 16},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
}


@pytest.fixture(scope="module")
def tiny_clip_files(tmp_path_factory):
    """(architecture JSON, safetensors weights) of a tiny random-init open_clip model."""
    import json

    import open_clip
    from safetensors.torch import save_file

    folder = tmp_path_factory.mktemp("clip")
    arch = folder / "tiny-test-clip.json"
    arch.write_text(json.dumps(TINY_CLIP))
    open_clip.add_model_config(arch)
    torch.manual_seed(0)
    model = open_clip.create_model("tiny-test-clip")
    weights = folder / "tiny-test-clip.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(weights))
    return arch, weights
