"""A one-minute tour of the adapter API on a tiny random UNet: inject SBoRA-FA, train a few
steps, save, reload into a fresh model and check that the outputs match. Offline, CPU."""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from diffusers import UNet2DConditionModel
from tqdm.auto import tqdm

from .adapters import AdapterConfig, adapter_parameters, inject, load_adapter, save_adapter


def tiny_unet() -> UNet2DConditionModel:
    torch.manual_seed(0)
    return UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 64),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32, attention_head_dim=8, norm_num_groups=8,
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--method", default="sbora-fa", help="adapter method (default: sbora-fa)")
    parser.add_argument("--steps", type=int, default=30, help="training steps (default: 30)")
    parser.add_argument("--output", default="outputs/demo/adapter.safetensors", help="where the adapter file goes")
    args = parser.parse_args(argv)

    unet = tiny_unet()
    wrapped = inject(unet, AdapterConfig(method=args.method, rank=4, targets=["sd-unet"]))
    params = adapter_parameters(unet)
    print(f"{args.method}: {len(wrapped)} layers adapted, {sum(p.numel() for p in params):,} trainable parameters")
    g = torch.Generator().manual_seed(0)
    latents, context = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 3, 32, generator=g)
    target = torch.randn(2, 4, 8, 8, generator=g)
    opt = torch.optim.AdamW(params, lr=1e-2)
    for _ in (bar := tqdm(range(args.steps), desc="train")):
        loss = torch.nn.functional.mse_loss(unet(latents, 10, encoder_hidden_states=context).sample, target)
        opt.zero_grad()
        loss.backward()
        opt.step()
        bar.set_postfix(loss=f"{loss.item():.4f}")
    path = save_adapter(unet, Path(args.output), base_model="demo-tiny-unet")
    fresh = tiny_unet()
    load_adapter(fresh, path)
    with torch.no_grad():
        same = torch.equal(fresh(latents, 10, encoder_hidden_states=context).sample, unet(latents, 10, encoder_hidden_states=context).sample)
    print(f"saved {path} ({path.stat().st_size:,} bytes); reloaded outputs identical: {same}")
    if not same:
        raise SystemExit(1)


if __name__ == "__main__":
    main()
