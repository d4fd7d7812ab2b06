"""The concept trainer's loss: DreamBooth's denoising loss, with prior preservation, v-prediction and Min-SNR-γ.

    L = E_t ‖ε̂(z_t, t, c) − target‖²   (target: the noise ε, or the velocity v for v-prediction)

with z_t = √ᾱ_t z_0 + √(1−ᾱ_t) ε for the VAE latents z_0 of the batch, c the batch's conditioning
(its prompts' text-encoder states, and SDXL's pooled prompt and size/crop numbers: the pipeline
kind's ``condition``, ``kinds.py``). With prior preservation
the batch is [instance; class] and the class half adds ``prior_loss_weight`` × its loss.
Min-SNR-γ (Hang et al., 2023) weights each sample by min(SNR_t, γ)/SNR_t (/(SNR_t+1) for v).
Timesteps are drawn uniformly, or biased to the clean or the noisy end (diffusers' timestep bias).
Input perturbation (Ning et al., 2023, "Input Perturbation Reduces Exposure Bias in Diffusion Models";
diffusers' ``--input_perturbation``) noises z_t with ε + γ ξ, ξ ~ N(0, I), while the target stays ε, so that
training sees inputs as off as the sampler's own.
A masked loss (kohya-ss sd-scripts' ``--masked_loss``) weighs each latent pixel's error by the share
of the concept in it, the background by ``background_loss_weight``: the mean over an image becomes
Σ w·e / Σ w, so that the photos' backgrounds count less (on the pocket world at 300 steps it did
not identify the concept more often; README, "Concepts at the demo's budget").

The VAE is frozen, so an image's posterior q(z_0 | x) never changes: ``EncodedOnce`` keeps each distinct
image's moments and draws z_0 from them, as diffusers' ``--cache_latents`` does, but per crop and flip as they
are drawn, so augmentation is kept. Each image is encoded alone, so its moments do not depend on the batch it
first came in (a resumed run draws the same latents as an unbroken one).
"""

from __future__ import annotations

import contextlib
import hashlib
from collections.abc import Callable
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

if TYPE_CHECKING:
    from diffusers.models.modeling_outputs import AutoencoderKLOutput


class EncodedOnce:
    """A frozen VAE in ``diffusion_loss``'s place that encodes each distinct image once (its pixels' sha256 is the key).

    On the pocket base a batch of four 64 px photos costs 0.075 s to encode against 0.3 s for the UNet's step on
    one CPU thread; a run sees a few photos, flipped or not, so after the first steps it encodes nothing. The pixels
    stay where the batch was drawn (the CPU): only a new image goes to the VAE's device, and hashing a 512 px image
    there takes 2-3 ms. Random crops of larger photos are seldom drawn twice: new entries stop at `budget_bytes`
    (then those encode each time).
    """

    def __init__(self, vae, budget_bytes: int = 256 << 20):
        self.vae, self.config, self.budget = vae, vae.config, budget_bytes
        self.moments: dict[bytes, torch.Tensor] = {}  # key -> (1, 2 * latent channels, h, w): the posterior's mean and log-variance
        self.used = 0

    @property
    def dtype(self) -> torch.dtype:
        return self.vae.dtype

    def encode(self, pixels: torch.Tensor) -> AutoencoderKLOutput:
        """The posterior of each image of `pixels` (B, 3, H, W), on any device, as ``AutoencoderKL.encode`` returns it."""
        vae, rows = self.vae, []
        # A float32 VAE (SDXL's under mixed precision: it overflows in float16) encodes in float32, outside the step's autocast.
        float32 = vae.dtype == torch.float32 and torch.is_autocast_enabled(vae.device.type)
        for x in pixels:  # (3, H, W)
            key = hashlib.sha256(x.detach().cpu().contiguous().flatten().view(torch.uint8).numpy()).digest()  # any dtype's bytes
            row = self.moments.get(key)
            if row is None:
                with torch.autocast(vae.device.type, enabled=False) if float32 else contextlib.nullcontext():
                    row = vae.encode(x[None].to(vae.device, vae.dtype)).latent_dist.parameters  # (1, 2C, h, w)
                if self.used + row.nbytes <= self.budget:
                    self.moments[key], self.used = row, self.used + row.nbytes
            rows.append(row)
        # Imported here: diffusers' model modules take seconds to import, which `--help` should not wait for.
        from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution
        from diffusers.models.modeling_outputs import AutoencoderKLOutput

        return AutoencoderKLOutput(latent_dist=DiagonalGaussianDistribution(torch.cat(rows)))  # (B, 2C, h, w)


def diffusion_loss(vae, noise_scheduler, unet, condition: Callable[[], tuple[torch.Tensor, dict]], pixels, *, n_instance: int,
                   gen: torch.Generator, prior_loss_weight: float = 1.0, snr_gamma: float | None = None,
                   noise_offset: float = 0.0, pixel_weights: torch.Tensor | None = None,
                   timestep_bias: tuple[str, float, float] = ("none", 1.0, 0.25), input_perturbation: float = 0.0) -> torch.Tensor:
    """Loss of one micro-batch; every random draw (latent sample, noise, timesteps) from `gen`.

    `vae` encodes `pixels` (B, 3, H, W) where they are (``EncodedOnce``); the loss runs on its latents' device.
    `condition()` runs the text encoders on the batch's prompts: (encoder hidden states (B, 77, D),
    further UNet keyword arguments). `pixel_weights` (B, 1, H, W), if given, weighs each image's error
    where its pixels lie (area-averaged to the latents; each image's weighted mean). `timestep_bias`:
    (strategy, multiplier, portion) of ``timestep_weights``. `input_perturbation`: γ, the extra noise in z_t alone.
    """
    with torch.no_grad():
        latents = (vae.encode(pixels).latent_dist.sample(generator=gen) * vae.config.scaling_factor).float()  # (B, 4, h, w)
    device = latents.device
    noise = torch.randn(latents.shape, generator=gen).to(device)
    if noise_offset:
        noise = noise + noise_offset * torch.randn((*latents.shape[:2], 1, 1), generator=gen).to(device)
    # Drawn only when set, as diffusers does, so that a run without it draws the same numbers as before it existed.
    noised = noise + input_perturbation * torch.randn(latents.shape, generator=gen).to(device) if input_perturbation else noise
    steps = noise_scheduler.config.num_train_timesteps
    bias = timestep_weights(steps, *timestep_bias)  # (steps,) or None: uniform
    t = (torch.randint(0, steps, (latents.shape[0],), generator=gen) if bias is None
         else torch.multinomial(bias, latents.shape[0], replacement=True, generator=gen)).to(device)
    noisy = noise_scheduler.add_noise(latents, noised, t)
    context, unet_kwargs = condition()  # (B, 77, D), {} or SDXL's added_cond_kwargs
    pred = unet(noisy, t, context, **unet_kwargs).sample.float()
    v_prediction = noise_scheduler.config.prediction_type == "v_prediction"
    target = noise_scheduler.get_velocity(latents, noise, t) if v_prediction else noise
    error = F.mse_loss(pred, target, reduction="none")  # (B, 4, h, w)
    if pixel_weights is None:
        per_sample = error.mean(dim=(1, 2, 3))  # (B,)
    else:
        w = F.interpolate(pixel_weights.to(device, torch.float32), size=error.shape[-2:], mode="area")  # (B, 1, h, w)
        per_sample = (error * w).sum(dim=(1, 2, 3)) / (w.sum(dim=(1, 2, 3)) * error.shape[1]).clamp(min=1e-8)  # (B,)
    if snr_gamma is not None:
        from diffusers.training_utils import compute_snr

        snr = compute_snr(noise_scheduler, t)
        per_sample = per_sample * torch.clamp(snr, max=snr_gamma) / (snr + 1 if v_prediction else snr)
    loss = per_sample[:n_instance].mean()
    if per_sample.shape[0] > n_instance:
        loss = loss + prior_loss_weight * per_sample[n_instance:].mean()
    return loss


TIMESTEP_BIAS = ("none", "earlier", "later")


def timestep_weights(num_timesteps: int, strategy: str, multiplier: float, portion: float) -> torch.Tensor | None:
    """How often each training timestep is drawn, as diffusers' ``--timestep_bias_strategy`` (its
    train_text_to_image_sdxl.py): the `portion` of the timesteps at the clean end (``earlier``, detail) or the
    noisy end (``later``, layout) drawn `multiplier` times as often as the rest. None: uniform (``none``)."""
    if strategy == "none" or multiplier == 1:
        return None
    weights = torch.ones(num_timesteps)
    n = max(1, int(portion * num_timesteps))
    weights[slice(0, n) if strategy == "earlier" else slice(num_timesteps - n, None)] *= multiplier
    return weights / weights.sum()  # (num_timesteps,)
