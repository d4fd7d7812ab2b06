"""LLM fine-tuning on a tiny random LLaMA with a byte-level tokenizer: data, training, adapter
files, merge, resume, QSBoRA (int8 and NF4 bases) and multi-task composition."""

from __future__ import annotations

import json
import shutil
import socket
from pathlib import Path

import pytest
from numeric import assert_close_to_signal
import torch
from llm_helpers import save_tiny_base, tiny_llama, tiny_tokenizer
from transformers import AutoModelForCausalLM

from llm import data, train as train_mod
from llm.compose import ComposeConfig, compose, interference
from llm.compose import main as compose_main
from llm.evaluate import main as evaluate_main
from llm.data import IGNORE_INDEX, Example, arithmetic_split, encode_example, is_correct, last_number, read_jsonl
from llm.evaluate import EvalConfig, evaluate
from llm.models import BaseModelError, load_base
from llm.quant import Int8Linear, dequantize_model, is_quantized, quantize_model
from llm.train import TrainConfig, batch_indices, train
from sbora.adapters import adapter_parameters, inject, load_adapter, load_adapter_config, read_adapter
from sbora.configuration import ConfigError

pytestmark = pytest.mark.numeric  # also run under other CPU kernels and 2 threads (make test-cpus, .ci/run)

IDS = torch.tensor([[5, 70, 71, 72, 73, 74, 75, 76]])


def logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(IDS).logits


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory) -> Path:
    return save_tiny_base(tmp_path_factory.mktemp("tiny-llama"))


ADAPTER_FIELDS = ("rank", "alpha", "dropout", "targets", "slot", "seed", "layout")


def tiny_config(base_dir: Path, out: Path, **kw) -> TrainConfig:
    """A tiny run; the adapter's fields among `kw` (rank, targets, slot, ...) go into its nested adapter config."""
    adapter = {"rank": 4, **{k: kw.pop(k) for k in ADAPTER_FIELDS if k in kw}}
    defaults = dict(
        model=str(base_dir), output_dir=str(out), steps=4, batch_size=2, train_size=16, test_size=4, adapter=adapter, lr=0.05,
        warmup_steps=0, max_length=320, eval_limit=2, max_new_tokens=4, log_every=1, checkpoint_every=0, lr_schedule="constant",
    )
    return TrainConfig(**{**defaults, **kw})


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


# ---------------------------------------------------------------------------- data


def test_arithmetic_split_is_fixed_disjoint_and_correct():
    train_a, test_a = arithmetic_split(300, 50)
    train_b, test_b = arithmetic_split(100, 50)
    assert (len(train_a), len(test_a)) == (300, 50)
    assert test_a == test_b and train_a[:100] == train_b  # the split does not depend on the sizes asked
    assert not {e.input for e in train_a} & {e.input for e in test_a}
    for ex in train_a + test_a:
        assert ex.output.endswith(f"The answer is {ex.answer}.")
        for step in ex.output.split(". ")[:-1]:  # every worked step "a op b = c" is right
            left, right = step.rstrip(".").split(" = ")
            assert eval(left.replace("/", "//")) == int(right)
        assert 0 <= int(ex.answer) <= 60


@pytest.mark.parametrize(
    "text, number", [("so 3 + 4 = 7 apples.", "7"), ("The answer is 1,200.", "1200"), ("-3", "-3"), ("2.50", "2.5"), ("17.0", "17"), ("none", None)]
)
def test_last_number(text, number):
    assert last_number(text) == number


def test_exact_match_grading():
    assert is_correct("5 + 3 = 8. The answer is 8.", "8")
    assert not is_correct("The answer is 8, not 9", "8")  # the last number counts
    assert not is_correct("", "8")
    assert is_correct(" True. ", "true") and not is_correct("true false", "true")


def test_jsonl_loader_and_its_errors(tmp_path):
    good = write_jsonl(tmp_path / "t.jsonl", [{"instruction": "Add", "input": "2 and 3", "output": "5"}, {"instruction": "Say yes", "output": "Yes."}])
    examples = read_jsonl(good)
    assert examples == [Example("Add", "2 and 3", "5", "5"), Example("Say yes", "", "Yes.", "yes")]
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"instruction": "a", "output": "b"}\n{"instruction": "a"}\n')
    with pytest.raises(ValueError, match=r"bad.jsonl:2 needs string fields"):
        read_jsonl(bad)
    bad.write_text("{not json\n")
    with pytest.raises(ValueError, match=r"bad.jsonl:1 is not valid JSON"):
        read_jsonl(bad)
    with pytest.raises(ValueError, match="unknown task"):
        data.load_task("no-such-task")


def test_loss_only_on_the_response_tokens():
    tok = tiny_tokenizer()
    ex = Example("Add", "2 and 3", "The answer is 5.", "5")
    enc = encode_example(tok, ex, 200)
    n_prompt = len(tok(data.prompt_text(tok, ex), add_special_tokens=False)["input_ids"])
    assert enc["labels"][:n_prompt] == [IGNORE_INDEX] * n_prompt
    assert enc["labels"][n_prompt:] == enc["input_ids"][n_prompt:]
    assert tok.decode(enc["labels"][n_prompt:]) == "The answer is 5.<|im_end|>\n"
    with pytest.raises(ValueError, match="raise --max-length"):
        encode_example(tok, ex, 10)
    batch = data.collate([enc, encode_example(tok, Example("x", "", "y", "y"), 200)], pad_id=tok.pad_token_id)
    assert batch["input_ids"].shape == batch["labels"].shape == batch["attention_mask"].shape
    assert batch["attention_mask"][1].sum() < batch["attention_mask"][0].sum()
    assert (batch["labels"][1][batch["attention_mask"][1] == 0] == IGNORE_INDEX).all()


@pytest.mark.parametrize("task, name", [("arithmetic", "arithmetic"), ("d/math.v2.jsonl", "math_v2"), ("train.jsonl", "task_train"), ("double.jsonl", "task_double")])
def test_task_names_are_safe_adapter_names(task, name):
    assert data.task_name(task) == name


def test_batches_are_a_pure_function_of_seed_and_index():
    full = [batch_indices(10, 4, 3, k) for k in range(8)]
    assert [batch_indices(10, 4, 3, k) for k in range(5, 8)] == full[5:]  # a resumed run sees the same batches
    flat = [i for b in full for i in b]
    assert sorted(flat[:10]) == list(range(10)) and sorted(flat[10:20]) == list(range(10))  # whole epochs
    assert full != [batch_indices(10, 4, 4, k) for k in range(8)]
    with pytest.raises(ConfigError, match="fewer than one batch"):
        batch_indices(3, 4, 0, 0)


# ---------------------------------------------------------------------------- base models


def test_bad_bases_fail_fast_with_a_hint(tmp_path):
    with pytest.raises(BaseModelError, match="local"):
        load_base("nobody-here/no-such-model-xyz")
    with pytest.raises(BaseModelError, match="no config.json"):
        load_base(str(tmp_path))
    with pytest.raises(BaseModelError, match="no GGUF file"):
        load_base(str(tmp_path / "m.gguf"))


def test_a_cached_hub_model_loads_without_asking_the_network(base_dir, tmp_path, monkeypatch):
    """A hub id in the local cache loads with no network request: transformers 5 looks for a peft adapter_config.json
    on the hub even when asked for local files only, which offline retried for 23 s before the model loaded."""
    from huggingface_hub import constants

    revision = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "models--someone--tiny-llama"  # the hub cache's layout
    shutil.copytree(base_dir, repo / "snapshots" / revision)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(revision)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path))
    asked = []

    def no_network(host, *args, **kwargs):
        asked.append(host)
        raise socket.gaierror(f"no network in this test ({host})")

    monkeypatch.setattr(socket, "getaddrinfo", no_network)
    model, tokenizer = load_base("someone/tiny-llama")
    assert asked == []
    local, _ = load_base(str(base_dir))
    for (name, a), b in zip(local.state_dict().items(), model.state_dict().values()):
        assert torch.equal(a, b), name
    assert tokenizer.chat_template and tokenizer.pad_token is not None


# ---------------------------------------------------------------------------- training


def test_train_cli_writes_every_output_and_the_adapter_reloads(base_dir, tmp_path, capsys):
    out = tmp_path / "run"
    assert train_mod.main([
        "--base", str(base_dir), "--output-dir", str(out), "--steps", "3", "--batch-size", "2", "--train-size", "8", "--test-size", "3",
        "--rank", "4", "--lr", "0.05", "--warmup-steps", "0", "--max-length", "320", "--max-new-tokens", "4", "--log-every", "1",
        "--method", "sbora-fb", "--targets", "llama-mlp",
    ]) == 0
    assert "accuracy: adapted" in capsys.readouterr().out
    assert {p.name for p in out.iterdir()} >= {"adapter.safetensors", "config.yaml", "log.jsonl", "results.json", "results.md", "checkpoints"}
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert [h["step"] for h in log] == [1, 2, 3] and all(torch.isfinite(torch.tensor(h["loss"])) for h in log)
    results = json.loads((out / "results.json").read_text())
    assert results["n"] == 3 and results["adapted"]["total"] == results["zero_shot"]["total"] == 3
    assert "| base, zero-shot |" in (out / "results.md").read_text()
    file = read_adapter(out / "adapter.safetensors")
    assert file.config.method == "sbora-fb" and len(file.modules) == 2 * 7 and file.extra["task"] == "arithmetic"
    assert any(t.abs().sum() > 0 for k, t in file.tensors.items() if k.endswith(".A"))  # trained away from zero


def test_train_saves_loads_and_merges_to_a_plain_model(base_dir, tmp_path):
    result = train(tiny_config(base_dir, tmp_path / "run", merge=True, eval=False))
    assert result["adapted_layers"] == 8 and result["trainable_params"] == 2 * 4 * (32 + 16 + 16 + 32)  # B: r·d_out per q, k, v, o; k/v are 16 wide
    fresh, _ = load_base(str(base_dir))
    base_logits = logits(fresh)
    load_adapter(fresh, result["adapter"], name="arithmetic")
    adapted = logits(fresh)
    assert not torch.allclose(adapted, base_logits, atol=1e-4)
    plain = AutoModelForCausalLM.from_pretrained(result["merged"]).eval()  # plain transformers, no adapter code
    assert not any("cores" in n for n, _ in plain.named_parameters())
    assert_close_to_signal(logits(plain), adapted)


def test_jsonl_task_trains_and_evaluate_scores_base_and_adapter(base_dir, tmp_path):
    rows = [{"instruction": "Repeat the number", "input": str(i), "output": str(i)} for i in range(12)]
    task = write_jsonl(tmp_path / "echo.jsonl", rows)
    result = train(tiny_config(base_dir, tmp_path / "run", task=str(task), test_fraction=0.25, eval=False))
    assert Path(result["output_dir"]) == tmp_path / "run" and result["adapter_name"] == "echo"
    assert evaluate_main(["--base", str(base_dir), "--adapter", result["adapter"], "--task", str(task), "--test-fraction", "0.25", "--max-new-tokens", "3", "--output-dir", str(tmp_path / "ev")]) == 0
    report = json.loads((tmp_path / "ev" / "evaluation.json").read_text())
    assert report["n"] == 3 and report["task"] == "echo"
    base_only = evaluate(EvalConfig(model=str(base_dir), task=str(task), test_fraction=0.25, max_new_tokens=3, output_dir=str(tmp_path / "ev0")))
    assert base_only["adapted"] is None
    # Switching the adapter off really gives the base: same greedy generations.
    assert [s["generated"] for s in base_only["zero_shot"]["samples"]] == [s["generated"] for s in report["zero_shot"]["samples"]]
    assert report["adapters"] == [result["adapter"]] and "| adapted |" in (tmp_path / "ev" / "evaluation.md").read_text()
    # Evaluating into the training run's own folder writes beside its results, never over them.
    trained = train(tiny_config(base_dir, tmp_path / "scored", task=str(task), test_fraction=0.25, max_new_tokens=3))
    before = (tmp_path / "scored" / "results.json").read_bytes()
    assert evaluate_main(["--base", str(base_dir), "--adapter", trained["adapter"], "--task", str(task), "--test-fraction", "0.25", "--max-new-tokens", "3"]) == 0
    assert (tmp_path / "scored" / "results.json").read_bytes() == before and (tmp_path / "scored" / "evaluation.json").is_file()
    with pytest.raises(ConfigError, match="nothing to evaluate"):
        evaluate(EvalConfig(model=str(base_dir), zero_shot=False))
    with pytest.raises(ConfigError, match="merging into a quantized base is refused"):
        evaluate(EvalConfig(model=str(base_dir), adapter=[result["adapter"]], merge=True, quantize="int8"))


def test_val_size_trains_without_the_validation_problems_and_scores_them(base_dir, tmp_path):
    seen = []
    real = train_mod.InstructionDataset

    def recording(tokenizer, examples, *args, **kw):
        seen.extend(examples)
        return real(tokenizer, examples, *args, **kw)

    train_set, test_set = data.arithmetic_split(16, 4)
    rest, val = data.carve_validation(train_set, 5)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(train_mod, "InstructionDataset", recording)
        result = train(tiny_config(base_dir, tmp_path / "run", val_size=5, eval_limit=None, zero_shot=False))
    assert seen == rest  # trained on the rest only
    results = result["results"]
    assert results["split"] == "validation" and results["n"] == 5
    assert [s["question"] for s in results["adapted"]["samples"]] == [e.input for e in val]  # scored on the held-out problems, not the test split
    with pytest.raises(ValueError, match="cannot hold out"):
        train(tiny_config(base_dir, tmp_path / "too-many", val_size=16))


def test_peft_dora_trains_on_the_shared_engine_and_saves_a_peft_folder(base_dir, tmp_path):
    from peft import PeftModel

    from llm.peft_dora import dora_off

    model, tok = load_base(str(base_dir))
    before = logits(model)
    result = train(tiny_config(base_dir, tmp_path / "run", method="peft-dora"), model=model, tokenizer=tok)
    # LoRA's A and B (q, o: 32 -> 32; k, v: 32 -> 16) plus DoRA's magnitude per output row, two layers
    assert result["adapted_layers"] == 8 and result["trainable_params"] == 2 * (4 * (64 + 48 + 48 + 64) + (32 + 16 + 16 + 32))
    log = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    assert [h["step"] for h in log] == [1, 2, 3, 4]  # the engine's loop and log
    assert result["adapter"] == str(tmp_path / "run" / "adapter_model.safetensors")
    assert json.loads((tmp_path / "run" / "adapter_config.json").read_text())["use_dora"] is True
    trained = logits(model)
    assert not torch.allclose(trained, before, atol=1e-4)
    with dora_off(model):  # the zero-shot score runs the bare base
        torch.testing.assert_close(logits(model), before)
    assert result["results"]["zero_shot"]["total"] == result["results"]["adapted"]["total"] == 2
    fresh, _ = load_base(str(base_dir))
    reloaded = PeftModel.from_pretrained(fresh, str(tmp_path / "run")).eval()  # peft's own loader
    torch.testing.assert_close(logits(reloaded), trained)
    for flag in ({"delta": True}, {"select": "diffora"}, {"merge": True}, {"quantize": "int8"}):
        with pytest.raises(ConfigError, match=f"--{next(iter(flag))}"):
            train(tiny_config(base_dir, tmp_path / "refused", method="peft-dora", **flag))


# ---------------------------------------------------------------------------- QSBoRA


def test_int8_quantizer_error_is_half_a_step():
    linear = torch.nn.Linear(16, 8)
    q = Int8Linear(linear)
    assert q.weight.dtype == torch.int8 and not q.weight.requires_grad and q.weight_scale.shape == (8,)
    err = (q.dequantize() - linear.weight).abs()
    assert (err <= q.weight_scale[:, None] / 2 + 1e-7).all()
    x = torch.randn(3, 16)
    torch.testing.assert_close(q(x), torch.nn.functional.linear(x, q.dequantize(), linear.bias))


@pytest.mark.parametrize("mode", ["int8", "nf4"])
def test_qsbora_trains_on_a_quantized_base_and_merges_after_dequantizing(mode, tmp_path):
    tok = tiny_tokenizer()
    model = tiny_llama(tok)
    reference = logits(model)
    assert quantize_model(model, mode) == 2 * 7  # every projection, not lm_head
    assert type(model.lm_head) is torch.nn.Linear and is_quantized(model)
    frozen = {n: p.detach().clone() for n, p in model.named_parameters()}
    close = {"int8": 0.05, "nf4": 0.5}[mode]
    assert (logits(model) - reference).abs().max() < close  # quantized, but still the same model
    result = train(tiny_config(tmp_path, tmp_path / "run", quantize="none", eval=False), model=model, tokenizer=tok)
    for n, p in model.named_parameters():  # the quantized base did not move; the adapter did
        if "cores" in n:
            assert p.dtype == torch.float32 and p.abs().sum() > 0
        else:
            assert torch.equal(p, frozen[n.replace(".base_layer", "")])
    adapted = logits(model)
    with pytest.raises(TypeError, match="dequantize the base first"):
        from sbora.adapters import merge

        merge(model)
    assert dequantize_model(model) == 2 * 7 and not is_quantized(model)
    assert_close_to_signal(logits(model), adapted)  # dequantizing changes nothing
    assert Path(result["adapter"]).is_file()


def test_qsbora_option_quantizes_the_loaded_base(base_dir, tmp_path):
    result = train(tiny_config(base_dir, tmp_path / "run", quantize="auto", merge=True, eval=False))
    plain = AutoModelForCausalLM.from_pretrained(result["merged"])
    assert all(p.is_floating_point() for p in plain.parameters())
    fresh, _ = load_base(str(base_dir))
    quantize_model(fresh, "int8")
    load_adapter(fresh, result["adapter"])
    assert_close_to_signal(logits(plain), logits(fresh))


# ---------------------------------------------------------------------------- composition


def test_two_task_adapters_in_different_slots_compose_without_interference(base_dir, tmp_path):
    tasks = {}
    for slot, (task, fn) in enumerate({"twice": lambda i: 2 * i, "square": lambda i: i * i}.items()):
        rows = [{"instruction": task, "input": str(i), "output": str(fn(i))} for i in range(8)]
        path = write_jsonl(tmp_path / f"{task}.jsonl", rows)
        tasks[task] = train(tiny_config(base_dir, tmp_path / task, task=str(path), slot=slot, eval=False))["adapter"]
    both, _ = load_base(str(base_dir))
    for name, adapter in tasks.items():
        load_adapter(both, adapter, name=name)
    assert interference(both, "twice", "square") == 0.0
    unmerged = logits(both)
    assert compose_main(["--base", str(base_dir), "--adapter", ",".join(tasks.values()), "--output", str(tmp_path / "composed")]) == 0
    report = json.loads((tmp_path / "composed" / "compose.json").read_text())
    assert report["interference"] == {"twice+square": 0.0} and set(report["adapters"]) == {"twice", "square"}
    merged = AutoModelForCausalLM.from_pretrained(report["output"]).eval()
    assert_close_to_signal(logits(merged), unmerged)
    assert report["weights"] == [1.0, 1.0]
    # Scoring both adapters unmerged, or merged into the base, gives the same generations.
    common = dict(model=str(base_dir), adapter=list(tasks.values()), task=str(tmp_path / "twice.jsonl"), test_fraction=0.5, max_new_tokens=4)
    side_by_side = evaluate(EvalConfig(**common, output_dir=str(tmp_path / "ev1")))
    merged_scores = evaluate(EvalConfig(**common, merge=True, output_dir=str(tmp_path / "ev2")))
    assert merged_scores["zero_shot"] is None and side_by_side["zero_shot"]["total"] == 4
    assert [x["generated"] for x in merged_scores["adapted"]["samples"]] == [x["generated"] for x in side_by_side["adapted"]["samples"]]


def test_same_slot_composition_warns_about_interference(base_dir, tmp_path):
    model, tok = load_base(str(base_dir))
    for name in ("a", "b"):
        inject(model, load_adapter_config("sbora-fa", rank=4, targets=["llama"]), name=name)
        with torch.no_grad():
            for p in adapter_parameters(model, name):
                p.normal_()
    assert interference(model, "a", "b") > 0.1  # same slot: same columns
    from sbora.adapters import save_adapter

    files = [str(save_adapter(model, tmp_path / f"{n}.safetensors", name=n)) for n in ("a", "b")]
    with pytest.raises(ConfigError, match="(?s)a.safetensors.*slot 0.*b.safetensors.*slot 0.*--slot 1"):
        compose(ComposeConfig(model=str(base_dir), adapter=files, out=str(tmp_path / "out")))  # refused before loading
    with pytest.warns(UserWarning, match="interfere"):
        compose(ComposeConfig(model=str(base_dir), adapter=files, out=str(tmp_path / "out"), allow_overlap=True))
    with pytest.raises(ConfigError, match="at least two"):
        compose(ComposeConfig(model=str(base_dir), adapter=files[:1]))


def test_gpt2_conv1d_layers_are_adapted_and_merged_back_to_conv1d(tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel
    from transformers.pytorch_utils import Conv1D

    from llm.models import conv1d_to_linear

    tok = tiny_tokenizer()

    def tiny_gpt2():
        torch.manual_seed(0)
        return GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=2, n_head=4, vocab_size=len(tok), n_positions=512)).eval()

    reference = logits(tiny_gpt2())
    result = train(tiny_config(tmp_path, tmp_path / "run", targets=["c_attn", "c_proj"], merge=True, eval=False), model=tiny_gpt2(), tokenizer=tok)
    assert result["adapted_layers"] == 2 * 3  # attn.c_attn, attn.c_proj, mlp.c_proj per block
    merged = GPT2LMHeadModel.from_pretrained(result["merged"]).eval()
    assert isinstance(merged.transformer.h[0].attn.c_attn, Conv1D)  # saved in GPT-2's own layout
    base = tiny_gpt2()
    assert len(conv1d_to_linear(base)) == 2 * 4
    assert_close_to_signal(logits(base), reference)  # Conv1D -> Linear changes nothing
    load_adapter(base, result["adapter"])
    adapted = logits(base)
    assert not torch.allclose(adapted, reference, atol=1e-4)
    assert_close_to_signal(logits(merged), adapted)


# ---------------------------------------------------------------------------- reliability


def cli_args(base_dir, out, *extra):
    return ["--base", str(base_dir), "--output-dir", str(out), "--steps", "3", "--batch-size", "2", "--train-size", "8",
            "--test-size", "2", "--rank", "4", "--lr", "0.05", "--warmup-steps", "0", "--max-length", "320", "--max-new-tokens", "4",
            "--no-eval", *extra]


def test_a_second_run_is_refused_and_a_longer_resume_trains_on(base_dir, tmp_path, capsys):
    out = tmp_path / "run"
    assert train_mod.main(cli_args(base_dir, out, "--lr-schedule", "cosine")) == 0
    adapter = (out / "adapter.safetensors").read_bytes()
    capsys.readouterr()
    assert train_mod.main(cli_args(base_dir, out)) == 2
    assert "already holds a run" in capsys.readouterr().err and (out / "adapter.safetensors").read_bytes() == adapter
    assert train_mod.main(cli_args(base_dir, out, "--lr-schedule", "cosine", "--steps", "5", "--resume")) == 0
    assert "resumed from step 3" in capsys.readouterr().err
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert [h["step"] for h in log] == [1, 2, 3, 4, 5] and log[3]["lr"] > 0  # the schedule now spans 5 steps: not stuck at 0
    assert read_adapter(out / "adapter.safetensors").extra["steps"] == 5


def test_ctrl_c_while_the_adapter_is_scored_is_finished_by_resume(base_dir, tmp_path, monkeypatch, capsys):
    out = tmp_path / "run"

    def ctrl_c(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(train_mod.LLMTask, "save", ctrl_c)
    assert train_mod.main(cli_args(base_dir, out)) == 130
    assert "interrupted at step 3" in capsys.readouterr().err and not (out / "adapter.safetensors").exists()
    monkeypatch.undo()
    assert train_mod.main(cli_args(base_dir, out, "--resume")) == 0
    assert read_adapter(out / "adapter.safetensors").extra["steps"] == 3
    assert [json.loads(line)["step"] for line in (out / "log.jsonl").read_text().splitlines()] == [1, 2, 3]


@pytest.mark.parametrize("seed", [2, 5])
def test_ctrl_c_at_a_random_point_resumes_bit_exactly(seed, base_dir, tmp_path, monkeypatch):
    import os
    import random
    import signal

    from sbora.engine import TrainingInterrupted

    straight = train(tiny_config(base_dir, tmp_path / "a", eval=False, grad_accum=2))
    k, calls = random.Random(seed).randrange(8), []
    real = train_mod.collate

    def interrupting(*args, **kwargs):
        calls.append(1)
        if len(calls) == k + 1:
            os.kill(os.getpid(), signal.SIGINT)
        return real(*args, **kwargs)

    monkeypatch.setattr(train_mod, "collate", interrupting)
    with pytest.raises(TrainingInterrupted) as info:
        train(tiny_config(base_dir, tmp_path / "b", eval=False, grad_accum=2))
    assert info.value.step == k // 2 + 1 < 4
    monkeypatch.undo()
    resumed = train(tiny_config(base_dir, tmp_path / "b", eval=False, grad_accum=2), resume=True)
    a, b = read_adapter(straight["adapter"]).tensors, read_adapter(resumed["adapter"]).tensors
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_qsbora_runs_are_resolved_recorded_and_kept_apart(base_dir, tmp_path, monkeypatch, capsys):
    import yaml

    monkeypatch.chdir(tmp_path)
    result = train(tiny_config(base_dir, None, quantize="auto", eval=False, output_dir=None))
    assert result["quantize"] == "int8" and Path(result["output_dir"]) == Path("outputs/llm/arithmetic/sbora-fa-int8")
    assert "quantized to int8" in capsys.readouterr().err
    assert yaml.safe_load((Path(result["output_dir"]) / "config.yaml").read_text())["train"]["quantize"] == "int8"
    plain = train(tiny_config(base_dir, None, eval=False, output_dir=None))
    assert Path(plain["output_dir"]) == Path("outputs/llm/arithmetic/sbora-fa")


def test_sequences_are_checked_against_the_models_context(tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel

    tok = tiny_tokenizer()
    short = GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=1, n_head=4, vocab_size=len(tok), n_positions=64))
    with pytest.raises(ConfigError, match="max-length 320 exceeds the model's context of 64 positions"):
        train(tiny_config(tmp_path, tmp_path / "gpt2", targets=["c_attn"], eval=False), model=short, tokenizer=tok)
    assert not (tmp_path / "gpt2").exists()
    llama = tiny_llama(tok)
    llama.config.max_position_embeddings = 400
    with pytest.raises(ConfigError, match="with --max-new-tokens 300 it exceeds the model's context of 400"):
        train(tiny_config(tmp_path, tmp_path / "llama", max_new_tokens=300), model=llama, tokenizer=tok)
    rows = [{"instruction": "Repeat", "input": "x", "output": "y" * 400} for _ in range(8)]
    task = write_jsonl(tmp_path / "long.jsonl", rows)
    with pytest.raises(ValueError, match="more than max_length=320.*--truncate"):
        train(tiny_config(tmp_path, tmp_path / "long", task=str(task), eval=False), model=tiny_llama(tok), tokenizer=tok)
    assert not (tmp_path / "long").exists()
    result = train(tiny_config(tmp_path, tmp_path / "long", task=str(task), eval=False, truncate=True), model=tiny_llama(tok), tokenizer=tok)
    assert result["steps"] == 4


def test_llm_help_shows_the_values_the_run_will_use(capsys):
    with pytest.raises(SystemExit):
        train_mod.main(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "(default: 100; from configs/llm/train.yaml)" in text and "(default: 48; from configs/llm/train.yaml)" in text
    assert "(default: None)" not in text
    with pytest.raises(SystemExit):
        train_mod.main(["--config", "qsbora", "--help"])
    assert "(default: auto; from configs/llm/qsbora.yaml)" in " ".join(capsys.readouterr().out.split())


def test_earlier_and_transformers_names_mean_our_options():
    from sbora.cli import parse

    ours = ["--steps", "70", "--lr", "0.002", "--batch-size", "2", "--grad-accum", "3", "--checkpoint-every", "5", "--model", "/m", "--rank", "4",
            "--resume"]
    earlier = [*ours[:10], "--base", "/m", "--rank=4", "--resume"]
    theirs = ["--max_train_steps=70", "--learning_rate", "0.002", "--train-batch-size", "2", "--gradient_accumulation_steps", "3",
              "--checkpointing-steps", "5", "--model_name_or_path", "/m", "--rank", "4", "--resume_from_checkpoint", "latest"]
    parsed = [parse(train_mod.COMMAND, argv) for argv in (ours, earlier, theirs)]
    config = parsed[0].configs["config"]
    assert all(p.configs["config"] == config and p.resume is True for p in parsed)
    assert (config.steps, config.lr, config.model) == (70, 0.002, "/m")
    # the adapter's options land in the nested adapter config, over configs/llm/train.yaml's adapter: mapping
    assert config.adapter == {"targets": ["llama"], "rank": 4, "alpha": 32}
    assert parsed[0].configs["adapter"] == config.adapter_config()


# ---------------------------------------------------------------------------- output cross-talk


def test_compose_reports_output_crosstalk_on_each_tasks_examples(base_dir, tmp_path, capsys):
    from llm.compose import _text, task_examples
    from sbora.adapters import active_adapters

    tasks = {}
    for slot, (task, fn) in enumerate({"twice": lambda i: 2 * i, "square": lambda i: i * i}.items()):
        rows = [{"instruction": task, "input": str(i), "output": str(fn(i))} for i in range(8)]
        path = write_jsonl(tmp_path / f"{task}.jsonl", rows)
        tasks[task] = train(tiny_config(base_dir, tmp_path / task, task=str(path), slot=slot, eval=False))["adapter"]
    assert compose_main(["--base", str(base_dir), "--adapter", ",".join(tasks.values()), "--output", str(tmp_path / "composed")]) == 0
    printed = capsys.readouterr().out
    assert "weight overlap twice+square: max interference 0" in printed
    assert "output cross-talk on calibration inputs, |dW_square X_twice| / |dW_twice X_twice|: median" in printed
    report = json.loads((tmp_path / "composed" / "compose.json").read_text())
    assert report["interference"] == {"twice+square": 0.0}  # disjoint slots: nothing shared in W ...
    talk = report["crosstalk"]
    assert set(talk["pairs"]) == {"square on twice", "twice on square"}
    assert all(p["median"] > 0.01 and p["layers"] > 0 for p in talk["pairs"].values())  # ... yet each moves the other's outputs
    assert talk["calibration"]["twice"] == {"examples": 1, "source": f"test split of {tmp_path / 'twice.jsonl'}"}
    assert set(report["meaning"]) == {"weight_overlap", "output_crosstalk"}
    # One layer's ratio is the dense ‖ΔW_square Xᵀ‖ / ‖ΔW_twice Xᵀ‖ on the inputs twice's example gives it.
    model, tok = load_base(str(base_dir))
    for name, adapter in tasks.items():
        load_adapter(model, adapter, name=name)
    row = next(r for r in talk["layers"] if (r["inputs"], r["update"]) == ("twice", "square"))
    layer = model.get_submodule(row["layer"])
    seen = []
    handle = layer.register_forward_pre_hook(lambda m, args: seen.append(args[0].detach().reshape(-1, args[0].shape[-1]).double()))
    with torch.no_grad(), active_adapters(model, {"twice": 1.0}):
        for example in task_examples(tasks["twice"], 4)[0]:
            model(input_ids=tok(_text(tok, example), return_tensors="pt", add_special_tokens=False)["input_ids"])
    handle.remove()
    X = torch.cat(seen)
    dense = {n: (layer.cores[n].delta_weight().detach().double() @ X.T).norm().item() for n in ("twice", "square")}
    assert row["input_rows"] == X.shape[0] and row["crosstalk"] == pytest.approx(dense["square"] / dense["twice"], rel=1e-6)
    # Calibration inputs the user gives: one JSONL for both tasks (chat rows, or text as is).
    calib = write_jsonl(tmp_path / "calib.jsonl", [{"instruction": "twice", "input": "11"}, {"text": "square 5 = 25"}])
    given = compose(ComposeConfig(model=str(base_dir), adapter=list(tasks.values()), out=str(tmp_path / "given"), calibration=[str(calib)]))
    assert given["crosstalk"]["calibration"]["square"] == {"examples": 2, "source": f"file {calib}"}
    assert given["crosstalk"]["pairs"]["twice on square"]["median"] != talk["pairs"]["twice on square"]["median"]
    assert compose(ComposeConfig(model=str(base_dir), adapter=list(tasks.values()), out=str(tmp_path / "quick"), crosstalk=False))["crosstalk"] is None


def test_compose_without_calibration_inputs_says_so_and_takes_a_file(base_dir, tmp_path, capsys):
    from sbora.adapters import save_adapter

    model, _ = load_base(str(base_dir))
    for name in ("a", "b"):
        inject(model, load_adapter_config("sbora-fa", rank=4, targets=["llama"]), name=name)
        with torch.no_grad():
            for p in adapter_parameters(model, name):
                p.normal_()
    files = [str(save_adapter(model, tmp_path / f"{n}.safetensors", name=n)) for n in ("a", "b")]  # no task recorded
    with pytest.warns(UserWarning, match="interfere"):
        assert compose_main(["--base", str(base_dir), "--adapter", ",".join(files), "--output", str(tmp_path / "out"), "--allow-overlap"]) == 0
    printed = capsys.readouterr().out
    assert "output cross-talk on a's inputs not measured: its file names no task: give --calibration" in printed
    report = json.loads((tmp_path / "out" / "compose.json").read_text())
    assert report["crosstalk"]["pairs"] == {} and report["crosstalk"]["calibration"]["a"]["examples"] == 0
    calib = [str(write_jsonl(tmp_path / f"{n}.jsonl", [{"text": f"some text for {n}"}])) for n in ("a", "b")]
    with pytest.warns(UserWarning, match="interfere"):
        report = compose(ComposeConfig(model=str(base_dir), adapter=files, out=str(tmp_path / "out2"), calibration=calib, allow_overlap=True))
    assert set(report["crosstalk"]["pairs"]) == {"b on a", "a on b"}
    # Same slot: the two updates read the same columns, so each moves the other's outputs about as much as its own.
    assert all(0.2 < p["overall"] < 5 for p in report["crosstalk"]["pairs"].values())
    with pytest.raises(ConfigError, match="calibration files for 2 adapters"):
        compose(ComposeConfig(model=str(base_dir), adapter=files, calibration=calib + calib[:1]))
    with pytest.raises(FileNotFoundError, match="no calibration file"):
        compose(ComposeConfig(model=str(base_dir), adapter=files, out=str(tmp_path / "out3"), calibration=[str(tmp_path / "none.jsonl")],
                              allow_overlap=True))
