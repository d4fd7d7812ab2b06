"""Regionally controllable sampling (Mix-of-Show's regional sampling, and MultiDiffusion's): each concept in its region.

    install_regional_processors(pipe.unet)                  # once, before sampling
    with active_adapters(parts, background), \
            regional_sampling(pipe.unet, regions, latent_size=(16, 16), cfg=True, mode="latent"):
        pipe(prompt_embeds=..., negative_prompt_embeds=..., ...)   # the global prompt

Each region holds a concept's selection (``{"robot": 1.0}``), its prompt's embeddings and a
mask. The caller's selection (``background``) is what acts outside every region: the concepts
that have no region. Three modes confine a region's concept to different parts of the UNet:

``cross``      Every cross-attention layer runs once for the global prompt (under the caller's
               selection) and once per region, with that region's prompt and only its concept
               active; the outputs are blended per position by the region masks, pooled to the
               layer's resolution, at every level of the UNet:

                   out = Σ_k m_k·attn_k + (1 − Σ_k m_k)·attn_global     (Σ_k m_k ≤ 1 where regions overlap)

               Self-attention and the ResNet blocks run under the caller's selection, everywhere
               (Mix-of-Show's region-aware cross-attention). On the pocket base a concept lands in
               its box in about 3 of 4 images that draw it (``benchmarks/placement.py``).
``attention``  As ``cross``, and self-attention too is blended the same way: inside a region its
               concept's adapters act on the queries, keys, values and output of self-attention
               (over the whole image's positions), outside only the background's do.
``latent``     MultiDiffusion (Bar-Tal et al., ICML 2023): at every denoising step each region is
               denoised as a picture of its own, the latent crop of its bounding box (rounded out
               to the UNet's downsampling factor), with its prompt and only its concept active;
               its noise prediction replaces the global one inside its mask:

                   ε = Σ_k m_k·ε_k(crop_k) + (1 − Σ_k m_k)·ε_global

               Nothing of a region's concept acts outside its box, in any layer, and the UNet
               draws the concept in the crop as it draws it in a whole image: it lands in its box.
               Costs one UNet call per region and step on its crop (about the crop's share of a
               full call).

SDXL's UNet is served the same way: the processors wrap its attention layers at every level
(the levels' sizes follow from the latent, ``_Regions.level_size``), and the prompts' embeddings
are its two text encoders' concatenated states. Its UNet also reads a pooled prompt through its
add-embedding ("text_embeds"), which acts on every position: the global prompt's in the
``cross`` and ``attention`` modes, the region's own in a region's ``latent`` call
(``RegionalPrompt.unet_kwargs``), whose size/crop numbers stay the whole image's.

One region over the whole image, with the global prompt and the composition's one concept, is
exactly plain composition in every mode: m = 1, and the global term (weight 0) is not even
computed. The regions live in a ContextVar, like the adapter selection: the processors and
the UNet hook are installed once and shared by every thread, each call reads its own thread's
regions, and outside ``regional_sampling`` both pass straight through.
"""

from __future__ import annotations

import contextlib
import functools
import math
from collections.abc import Iterator, Mapping, Sequence
from contextvars import ContextVar
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageOps

from sbora.adapters.scope import selection_scope
from sbora.configuration import ConfigError


class RegionError(ConfigError):
    """A region (box or mask) cannot be used; the message says what to give instead."""


@dataclass(frozen=True)
class RegionalPrompt:
    """One region: its concept's selection, its prompt's embeddings and its mask."""

    selection: Mapping[str, float]  # the adapters active inside the region, e.g. {"robot": 1.0}
    cond: torch.Tensor  # (1, T, D): the regional prompt's embeddings, encoded under `selection`
    uncond: torch.Tensor | None  # (1, T, D): the negative prompt's, when sampling with classifier-free guidance
    mask: torch.Tensor  # (H, W) in [0, 1], the image's aspect at any resolution (pooled to each layer's)
    pooled: torch.Tensor | None = None  # (1, P): SDXL's pooled regional prompt (the UNet's "text_embeds")
    pooled_uncond: torch.Tensor | None = None  # (1, P): the negative prompt's, with guidance

    def context(self, batch: int, cfg: bool) -> torch.Tensor:
        """Encoder states laid out like the pipeline's: [negative × n; prompt × n] with guidance, else prompt × batch."""
        return _layout(self.cond, self.uncond, batch, cfg)

    def unet_kwargs(self, kwargs: dict, batch: int, cfg: bool) -> dict:
        """The UNet call's other arguments for this region's own call: SDXL's pooled prompt ("text_embeds" of
        ``added_cond_kwargs``) is the region's; the size/crop numbers stay the image's (the crop is drawn as a whole picture)."""
        added = kwargs.get("added_cond_kwargs")
        if self.pooled is None or not added or "text_embeds" not in added:
            return kwargs
        return {**kwargs, "added_cond_kwargs": {**added, "text_embeds": _layout(self.pooled, self.pooled_uncond, batch, cfg)}}


def _layout(cond: torch.Tensor, uncond: torch.Tensor | None, batch: int, cfg: bool) -> torch.Tensor:
    """[uncond × n; cond × n] with guidance (n = batch / 2), else cond × batch, as the pipelines lay out their rows."""
    if not cfg:
        return cond.expand(batch, *cond.shape[1:])
    half = batch // 2
    return torch.cat([uncond.expand(half, *uncond.shape[1:]), cond.expand(half, *cond.shape[1:])])


MODES = ("cross", "attention", "latent")
DEFAULT_MODE = "latent"


class _Regions:
    """The regions of one sampling call, and their blending weights per layer resolution (cached)."""

    def __init__(self, regions: Sequence[RegionalPrompt], latent_size: tuple[int, int], cfg: bool, mode: str):
        self.regions, self.latent_size, self.cfg, self.mode = list(regions), latent_size, cfg, mode
        self.masks = torch.stack([r.mask.float() for r in self.regions])  # (R, H, W)
        self._levels: dict[tuple[int, int], tuple[torch.Tensor, torch.Tensor, list[bool], bool]] = {}

    def level_size(self, positions: int) -> tuple[int, int]:
        """(h, w) of a layer with `positions` tokens: the latent halved (rounding up, like the UNet) until it fits."""
        h, w = self.latent_size
        while h * w > positions:
            h, w = math.ceil(h / 2), math.ceil(w / 2)
        if h * w != positions:
            raise RegionError(f"a cross-attention layer with {positions} positions does not fit latents of {self.latent_size}; "
                              "pass the height and width the pipeline samples at")
        return h, w

    def level(self, size: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor, list[bool], bool]:
        """(R, h, w) region weights, (h, w) global weight, which regions touch this level, whether the global term does."""
        if size not in self._levels:
            m = F.adaptive_avg_pool2d(self.masks[None], size)[0]  # (R, h, w): the share of each cell a region covers
            total = m.sum(0)  # (h, w)
            m = m / total.clamp_min(1.0)  # overlapping regions share a cell instead of over-counting it
            rest = (1.0 - m.sum(0)).clamp_min(0.0)
            self._levels[size] = (m, rest, [bool(x.any()) for x in m], bool(rest.any()))
        return self._levels[size]


_REGIONS: ContextVar[_Regions | None] = ContextVar("sbora_regions", default=None)


class RegionalAttnProcessor:
    """Wraps a diffusers attention processor: regional attention inside ``regional_sampling`` (modes
    ``cross`` and ``attention``), else the wrapped one."""

    def __init__(self, inner):
        self.inner = inner

    # The same signature as diffusers' AttnProcessor2_0, so Attention.forward hands over the same arguments.
    def __call__(self, attn, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None = None,
                 attention_mask: torch.Tensor | None = None, temb: torch.Tensor | None = None, *args, **kwargs) -> torch.Tensor:
        state = _REGIONS.get()
        cross = encoder_hidden_states is not None and attn.is_cross_attention
        if state is None or state.mode == "latent" or not (cross or state.mode == "attention"):
            return self.inner(attn, hidden_states, encoder_hidden_states, attention_mask, temb, *args, **kwargs)
        batch = hidden_states.shape[0]
        # (B, N, C) from a transformer block, or (B, C, h, w) for a spatial attention block
        size = tuple(hidden_states.shape[-2:]) if hidden_states.ndim == 4 else state.level_size(hidden_states.shape[1])
        weights, rest, touched, global_needed = state.level(size)
        shape = (1, 1, *size) if hidden_states.ndim == 4 else (1, size[0] * size[1], 1)
        out = None
        if global_needed:
            out = self.inner(attn, hidden_states, encoder_hidden_states, attention_mask, temb, *args, **kwargs)
            out = out * rest.to(out).view(shape)
        for region, w, hit in zip(state.regions, weights, touched):
            if not hit:
                continue
            context = region.context(batch, state.cfg) if cross else encoder_hidden_states  # self-attention: its own states
            if cross and context.shape[0] != encoder_hidden_states.shape[0]:
                raise RegionError(f"regional prompts were prepared for {'guided' if state.cfg else 'unguided'} sampling, "
                                  f"but this call has {encoder_hidden_states.shape[0]} prompt rows for {batch} latents")
            with selection_scope(region.selection):
                part = self.inner(attn, hidden_states, context, attention_mask, temb, *args, **kwargs)
            part = part * w.to(part).view(shape)
            out = part if out is None else out + part
        return out


def _crop(mask: torch.Tensor, factor: int) -> tuple[slice, slice]:
    """The latent rows and columns of a region: its mask's bounding box, rounded out to multiples of
    `factor` (the UNet's downsampling, so the crop's levels line up with the whole latent's)."""

    def span(covered: torch.Tensor) -> slice:
        idx = covered.nonzero().flatten()
        return slice(int(idx.min()) // factor * factor, min(len(covered), -(-(int(idx.max()) + 1) // factor) * factor))

    return span(mask.sum(1) > 0), span(mask.sum(0) > 0)


_IN_REGION: ContextVar[bool] = ContextVar("sbora_in_region", default=False)


def _regional_forward(unet, sample: torch.Tensor, timestep, encoder_hidden_states: torch.Tensor | None = None, **kwargs):
    """The UNet's forward under ``regional_sampling``: in ``latent`` mode each region's crop, denoised on
    its own, replaces the global prediction inside its mask; otherwise (and in a region's own call) the plain forward."""
    forward = type(unet).forward
    state = _REGIONS.get()
    if state is None or state.mode != "latent" or _IN_REGION.get():
        return forward(unet, sample, timestep, encoder_hidden_states, **kwargs)
    return_dict = kwargs.pop("return_dict", True)
    weights, rest, touched, global_needed = state.level(tuple(sample.shape[-2:]))
    factor = 2 ** (len(unet.config.block_out_channels) - 1)
    eps = None
    if global_needed:  # the global prompt, under the caller's selection, where no region covers
        eps = forward(unet, sample, timestep, encoder_hidden_states, **kwargs, return_dict=False)[0] * rest.to(sample)
    token = _IN_REGION.set(True)
    try:
        for region, w, hit in zip(state.regions, weights, touched):
            if not hit:
                continue
            context = region.context(sample.shape[0], state.cfg)  # (B, T, D), laid out like the pipeline's
            if encoder_hidden_states is not None and context.shape[0] != encoder_hidden_states.shape[0]:
                raise RegionError(f"regional prompts were prepared for {'guided' if state.cfg else 'unguided'} sampling, "
                                  f"but this call has {encoder_hidden_states.shape[0]} prompt rows for {sample.shape[0]} latents")
            rows, cols = _crop(w, factor)
            with selection_scope(region.selection):  # (B, C, h', w'): the crop, denoised as a picture of its own
                part = forward(unet, sample[..., rows, cols], timestep, context, **region.unet_kwargs(kwargs, sample.shape[0], state.cfg),
                               return_dict=False)[0]
            placed = torch.zeros_like(sample)
            placed[..., rows, cols] = part * w[rows, cols].to(part)
            eps = placed if eps is None else eps + placed
    finally:
        _IN_REGION.reset(token)
    if not return_dict:
        return (eps,)
    from diffusers.models.unets.unet_2d_condition import UNet2DConditionOutput

    return UNet2DConditionOutput(sample=eps)


def install_regional_processors(unet) -> None:
    """Wrap every attention processor of `unet`, and its forward for the ``latent`` mode (once; idempotent).
    Outside ``regional_sampling`` nothing changes.

    Call it while no forward pass runs (when a composition is set up): it replaces processors.
    """
    processors = unet.attn_processors
    if not all(isinstance(p, RegionalAttnProcessor) for p in processors.values()):
        unet.set_attn_processor({k: p if isinstance(p, RegionalAttnProcessor) else RegionalAttnProcessor(p) for k, p in processors.items()})
    if not isinstance(unet.__dict__.get("forward"), functools.partial):
        unet.forward = functools.partial(_regional_forward, unet)


@contextlib.contextmanager
def regional_sampling(unet, regions: Sequence[RegionalPrompt], latent_size: tuple[int, int], cfg: bool,
                      mode: str = DEFAULT_MODE) -> Iterator[None]:
    """Within the block, this thread's UNet calls confine each region's concept to its region (module docstring).

    `latent_size` is the (h, w) of the latents sampled; `cfg` whether the pipeline runs
    classifier-free guidance (then every region needs its `uncond`); `mode` one of MODES.
    """
    if not all(isinstance(p, RegionalAttnProcessor) for p in unet.attn_processors.values()) or not isinstance(unet.__dict__.get("forward"), functools.partial):
        raise RuntimeError("the UNet has no regional attention processors: call install_regional_processors(unet) before sampling")
    if mode not in MODES:
        raise RegionError(f"regional mode must be one of {', '.join(MODES)}, got '{mode}'")
    if not regions:
        raise RegionError("regional sampling needs at least one region")
    shapes = {tuple(r.mask.shape) for r in regions}
    if len(shapes) != 1 or len(next(iter(shapes))) != 2:
        raise RegionError(f"region masks must all be 2-D and of one size, got {sorted(shapes)}")
    if cfg and any(r.uncond is None for r in regions):
        raise RegionError("classifier-free guidance needs each region's negative-prompt embeddings (uncond)")
    token = _REGIONS.set(_Regions(regions, latent_size, cfg, mode))
    try:
        yield
    finally:
        _REGIONS.reset(token)


# ----------------------------------------------------------------------------------- masks


def parse_box(value: str | Sequence[float]) -> tuple[float, float, float, float]:
    """A box as four fractions x0, y0, x1, y1 of the image's width and height ('0, 0, 0.5, 1' is the left half)."""
    what = "a region box must be four numbers x0, y0, x1, y1 with 0 <= x0 < x1 <= 1 and 0 <= y0 < y1 <= 1 (fractions of the image's width and height, e.g. '0, 0, 0.5, 1' for the left half)"
    try:
        parts = [float(v) for v in (value.replace(",", " ").split() if isinstance(value, str) else value)]
    except (TypeError, ValueError):
        raise RegionError(f"{what}; got {value!r}") from None
    if len(parts) != 4 or not all(math.isfinite(v) for v in parts):
        raise RegionError(f"{what}; got {value!r}")
    x0, y0, x1, y1 = parts
    if not (0 <= x0 < x1 <= 1 and 0 <= y0 < y1 <= 1):
        raise RegionError(f"{what}; got {value!r}")
    return x0, y0, x1, y1


def box_mask(box: str | Sequence[float], height: int, width: int) -> torch.Tensor:
    """(height, width) mask of a box: each pixel holds the share of it the box covers (exactly 1 inside)."""
    x0, y0, x1, y1 = parse_box(box)

    def coverage(lo: float, hi: float, n: int) -> torch.Tensor:
        cells = torch.arange(n, dtype=torch.float64)
        return (torch.minimum(cells + 1, torch.tensor(hi * n)) - torch.maximum(cells, torch.tensor(lo * n))).clamp(0, 1)

    return (coverage(y0, y1, height)[:, None] * coverage(x0, x1, width)[None, :]).float()  # (H, W)


def image_mask(image: Image.Image, height: int, width: int) -> torch.Tensor:
    """(height, width) mask from a picture: white is inside, black outside, greys in between.

    Any image mode: 16-bit and 32-bit greys are scaled to their range, transparent pixels
    count as outside (painted strokes on a clear canvas are the region), EXIF rotation applies.
    """
    try:
        image = ImageOps.exif_transpose(image)
        if image.mode in ("I;16", "I;16L", "I;16B", "I;16N", "I", "F"):
            a = np.asarray(image, dtype=np.float64)
            peak = 65535.0 if image.mode.startswith("I;16") else max(float(a.max()), 1.0)
            image = Image.fromarray(np.clip(np.rint(a / peak * 255), 0, 255).astype(np.uint8), "L")
        rgba = image.convert("RGBA")
    except (OSError, ValueError) as e:
        raise RegionError(f"cannot use this picture as a mask ({e}); save it as a black-and-white PNG") from None
    grey = Image.alpha_composite(Image.new("RGBA", rgba.size, (0, 0, 0, 255)), rgba).convert("L")
    # BOX: each pixel gets the share of the picture it covers, as box_mask and the per-layer pooling do
    mask = torch.from_numpy(np.asarray(grey.resize((width, height), Image.BOX), dtype=np.float32) / 255.0)
    return _nonempty(mask, "mask image")


def _nonempty(mask: torch.Tensor, what: str) -> torch.Tensor:
    if not mask.any():
        raise RegionError(f"the {what} covers no part of the image; draw or give a larger region")
    return mask
