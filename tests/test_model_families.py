"""The target presets on tiny diffusers / transformers models, and the peft pairing."""

from __future__ import annotations

import pytest
from numeric import assert_close_to_signal
import torch

from sbora.adapters import AdapterConfig, adapted_layers, adapter_parameters, inject, merge_and_unload

pytestmark = pytest.mark.numeric  # also run under other CPU kernels and 2 threads (make test-cpus, .ci/run)


def tiny_unet():
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    return UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(16, 32),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=24, attention_head_dim=4, norm_num_groups=8,
    )


def tiny_clip_text():
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(0)
    return CLIPTextModel(CLIPTextConfig(hidden_size=24, intermediate_size=48, num_hidden_layers=2, num_attention_heads=2, vocab_size=100, max_position_embeddings=16))


def tiny_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, vocab_size=100))


def run_unet(m):
    return m(torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0)), 10, encoder_hidden_states=torch.randn(1, 3, 24, generator=torch.Generator().manual_seed(1))).sample


def run_text(m):
    return m(torch.tensor([[1, 5, 7, 9]])).last_hidden_state


def run_llama(m):
    return m(torch.tensor([[1, 5, 7, 9]])).logits


@pytest.mark.parametrize(
    "build, run, targets, per_block, blocks",
    [
        (tiny_unet, run_unet, ["sd-unet"], 8, 4),  # attn1+attn2 x 4 projections; down 1 + mid 1 + up 2 blocks
        (tiny_clip_text, run_text, ["clip-text"], 4, 2),
        (tiny_clip_text, run_text, ["clip-text-mlp"], 6, 2),
        (tiny_llama, run_llama, ["llama"], 4, 2),
        (tiny_llama, run_llama, ["llama-mlp"], 7, 2),
    ],
)
@pytest.mark.parametrize("method", ["sbora-fa", "lora"])
def test_presets_match_the_attention_layers(build, run, targets, per_block, blocks, method):
    model = build().eval()
    with torch.no_grad():
        y0 = run(model)
    wrapped = inject(model, AdapterConfig(method=method, rank=2, targets=targets))
    assert len(wrapped) == per_block * blocks
    # std 0.1 makes each ΔW about the size of W: the adapters move the outputs by 50-150% of their
    # largest value, while the intermediates stay where float32 round-off is ~1e-6 of the output on
    # every kernel (at std 0.5 the attention logits reach hundreds and round-off grows a hundredfold).
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in adapter_parameters(model):
            p.copy_(0.1 * torch.randn(p.shape, generator=g))
        y1 = run(model)
    assert (y1 - y0).abs().max() > 0.05 * y1.abs().max()  # the adapters act, far beyond round-off
    merge_and_unload(model)
    assert not adapted_layers(model)
    with torch.no_grad():
        assert_close_to_signal(run(model), y1)  # merged vs unmerged: other kernels, round-off at the outputs' size


def test_peft_pairs_with_transformers_without_its_integration():
    """peft (our numerical reference) works on a transformers model through peft's own API;
    nothing of ours calls transformers' peft integration (which wants a newer peft)."""
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(tiny_llama(), LoraConfig(r=2, target_modules=["q_proj", "v_proj"]))
    assert model.num_parameters(only_trainable=True) == 2 * 2 * (2 * 32 + 32 + 16)  # q: 32->32, v: 32->16
    assert run_llama(model).shape == (1, 4, 100)
    import pathlib

    root = pathlib.Path(__file__).parents[1]
    for file in [*root.glob("sbora_diffusion/**/*.py"), *root.glob("llm/**/*.py"), *root.glob("apps/**/*.py")]:
        text = file.read_text()
        assert "integrations.peft" not in text and ".load_adapter(" not in text.replace("def load_adapter(", ""), file
