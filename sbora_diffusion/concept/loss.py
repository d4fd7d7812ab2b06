"""The concept trainer's loss: DreamBooth's denoising loss, with prior preservation, v-prediction and Min-SNR-γ.

    L = E_t ‖ε̂(z_t, t, c) − target‖²   (target: the noise ε, or the velocity v for v-prediction)

with z_t = √ᾱ_t z_0 + √(1−ᾱ_t) ε for the VAE latents z_0 of the batch. With prior preservation
the batch is [instance; class] and the class half adds ``prior_loss_weight`` × its loss.
Min-SNR-γ (Hang et al., 2023) weights each sample by min(SNR_t, γ)/SNR_t (/(SNR_t+1) for v).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def diffusion_loss(vae, noise_scheduler, unet, text_encoder, pixels, input_ids, *, n_instance: int, gen: torch.Generator,
                   prior_loss_weight: float = 1.0, snr_gamma: float | None = None, noise_offset: float = 0.0) -> torch.Tensor:
    """Loss of one micro-batch; every random draw (latent sample, noise, timesteps) from `gen`."""
    device = pixels.device
    with torch.no_grad():
        dist = vae.encode(pixels.to(vae.dtype)).latent_dist
        latents = dist.sample(generator=gen) * vae.config.scaling_factor  # (B, 4, h, w)
    latents = latents.float()
    noise = torch.randn(latents.shape, generator=gen).to(device)
    if noise_offset:
        noise = noise + noise_offset * torch.randn((*latents.shape[:2], 1, 1), generator=gen).to(device)
    t = torch.randint(0, noise_scheduler.config.num_train_timesteps, (latents.shape[0],), generator=gen).to(device)
    noisy = noise_scheduler.add_noise(latents, noise, t)
    context = text_encoder(input_ids.to(device))[0]  # (B, 77, D)
    pred = unet(noisy, t, context).sample.float()
    v_prediction = noise_scheduler.config.prediction_type == "v_prediction"
    target = noise_scheduler.get_velocity(latents, noise, t) if v_prediction else noise
    per_sample = F.mse_loss(pred, target, reduction="none").mean(dim=(1, 2, 3))  # (B,)
    if snr_gamma is not None:
        from diffusers.training_utils import compute_snr

        snr = compute_snr(noise_scheduler, t)
        per_sample = per_sample * torch.clamp(snr, max=snr_gamma) / (snr + 1 if v_prediction else snr)
    loss = per_sample[:n_instance].mean()
    if per_sample.shape[0] > n_instance:
        loss = loss + prior_loss_weight * per_sample[n_instance:].mean()
    return loss
