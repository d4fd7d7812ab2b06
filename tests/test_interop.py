"""Interoperability with the real clients: diffusers (load_lora_weights, set_adapters, kohya path,
load_textual_inversion), peft (PeftModel.from_pretrained), imports of their files, the export CLI."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from llm_helpers import save_tiny_base, tiny_llama, tiny_tokenizer
from numeric import assert_close_to_signal
from safetensors import safe_open
from safetensors.torch import save_file

from sbora.adapters import (
    METHODS,
    AdaptedLinear,
    AdapterConfig,
    AdapterFileError,
    active_adapters,
    adapted_layers,
    adapter_parameters,
    inject,
    load_adapter,
    read_adapter,
    save_adapter,
)
from sbora.adapters.formats import DIFFUSERS_METADATA, classic_clip_path
from sbora_diffusion.concept.adapter import load_concept_adapter, save_concept_adapter
from llm.export import export_model
from sbora.export import main
from sbora_diffusion.export import export_pipeline
from sbora_diffusion.tokens import install_concept_tokens

pytestmark = pytest.mark.numeric  # also run under other CPU kernels and 2 threads (make test-cpus, .ci/run)

# Every core, and Delta-LoRA (its file keeps the telescoped factors; the export carries the whole rank-2k update).
METHOD_NAMES = sorted(METHODS) + ["lora+delta", "sbora-fa+delta"]
TOL = 1e-4
PROMPT = "a photo of a dog on the beach"


def images(pipe, prompt: str = PROMPT):
    """Two DDIM steps at 32x32 from seed 0: every part of the pipeline (text encoder, UNet, VAE) matters."""
    pipe.set_progress_bar_config(disable=True)
    return pipe([prompt], num_inference_steps=2, generator=torch.Generator().manual_seed(0), output_type="np", height=32, width=32).images


def adapter_config(method: str, **kw) -> AdapterConfig:
    """`method`, or "<method>+delta" for that core with Delta-LoRA."""
    core, _, delta = method.partition("+")
    return AdapterConfig(method=core, delta=bool(delta), **kw)


def randomize(models, name: str, seed: int = 0) -> None:
    """Non-zero adapter weights (DiffLoRA's τ away from 0), so a wrong export shows. Delta-LoRA cores
    start their telescoped branch (λ = 2) from these weights and then move on to others."""
    def draw(g):
        with torch.no_grad():
            for model in models:
                for p in adapter_parameters(model, name):
                    p.copy_(torch.randn(p.shape, generator=g) * 0.2 + (0.3 if p.ndim == 0 else 0.0))

    g = torch.Generator().manual_seed(seed)
    draw(g)
    delta = [layer.cores[name] for model in models for layer in adapted_layers(model, name).values() if hasattr(layer.cores[name], "start_delta")]
    if delta:
        for core in delta:
            core.start_delta(2.0)
        draw(g)


def concept(base, method: str, name: str = "c", slot: int = 0, seed: int = 0, into=None):
    """A copy of `base` (or `into` itself) with a trained-looking concept `name`: UNet rank 4, text encoder rank 2, scales 1.5."""
    pipe = into if into is not None else copy.deepcopy(base)
    inject(pipe.unet, adapter_config(method, rank=4, alpha=6.0, slot=slot, targets=["sd-unet"]), name=name)
    inject(pipe.text_encoder, adapter_config(method, rank=2, alpha=3.0, slot=slot, targets=["clip-text"]), name=name)
    randomize([pipe.unet, pipe.text_encoder], name, seed)
    return pipe


def untouched(*models) -> bool:
    return not any(isinstance(m, AdaptedLinear) for model in models for m in model.modules())


@pytest.fixture(scope="module")
def base(tiny_pipe):
    return tiny_pipe


@pytest.fixture(scope="module")
def base_images(base):
    return images(base)


# ---- diffusers ---------------------------------------------------------------------------


@pytest.mark.parametrize("method", METHOD_NAMES)
def test_diffusers_load_lora_weights_equals_our_injection(method, base, base_images, tmp_path):
    ours = concept(base, method)
    expected = images(ours)
    assert abs(expected - base_images).max() > 1e-2  # the adapter changes the images: a lost factor would show
    (path,) = export_pipeline(ours, "c", "diffusers", tmp_path / "lora.safetensors")
    with safe_open(str(path), framework="pt") as f:
        fields = json.loads(f.metadata()[DIFFUSERS_METADATA])
        keys = list(f.keys())
    assert {"unet.r", "unet.lora_alpha", "text_encoder.r", "text_encoder.lora_alpha"} <= set(fields)
    assert any(k.startswith("text_encoder.") for k in keys) and any(k.startswith("unet.") for k in keys)
    theirs = copy.deepcopy(base)
    theirs.load_lora_weights(str(path), adapter_name="c")
    assert abs(images(theirs) - expected).max() <= TOL


@pytest.mark.parametrize("method", ["sbora-fb", "difflora"])
def test_kohya_file_loads_through_diffusers_kohya_path(method, base, tmp_path):
    ours = concept(base, method)
    (path,) = export_pipeline(ours, "c", "kohya", tmp_path / "lora.safetensors")
    with safe_open(str(path), framework="pt") as f:
        keys = list(f.keys())
    assert all(k.startswith(("lora_unet_", "lora_te_")) for k in keys)
    assert "lora_te_text_model_encoder_layers_0_self_attn_q_proj.alpha" in keys  # the names A1111 and ComfyUI look up
    theirs = copy.deepcopy(base)
    theirs.load_lora_weights(str(path), adapter_name="c")
    assert abs(images(theirs) - images(ours)).max() <= TOL


def test_set_adapters_with_two_exported_concepts_equals_our_composition(base, tmp_path):
    ours = concept(base, "sbora-fa", name="a", slot=0, seed=1)
    concept(base, "lora", name="b", seed=2, into=ours)
    theirs = copy.deepcopy(base)
    for name in ("a", "b"):
        (path,) = export_pipeline(ours, name, "diffusers", tmp_path / f"{name}.safetensors")
        theirs.load_lora_weights(str(path), adapter_name=name)
    theirs.set_adapters(["a", "b"], [0.7, 0.3])
    with active_adapters([ours.unet, ours.text_encoder], {"a": 0.7, "b": 0.3}):
        expected = images(ours)
    with active_adapters([ours.unet, ours.text_encoder], {"a": 1.0, "b": 1.0}):
        assert abs(images(ours) - expected).max() > 1e-2  # the weights matter
    assert abs(images(theirs) - expected).max() <= TOL


@pytest.mark.parametrize("token, mode", [("<c1>", "new"), ("sks", "rare")])
def test_load_textual_inversion_reproduces_our_token(token, mode, base, tmp_path):
    ours = concept(base, "sbora-fa")
    tokens = install_concept_tokens(ours.tokenizer, ours.text_encoder, token, mode, init_word="dog")
    with torch.no_grad():
        tokens.vectors.add_(torch.randn(tokens.vectors.shape, generator=torch.Generator().manual_seed(3)))
    prompt = f"a photo of {token} dog"
    adapter = save_concept_adapter(ours, tmp_path / "dog" / "adapter.safetensors", "c", base_model="tiny",
                                   info={"concept": "dog", "token": token, "class_word": "dog"}, tokens=tokens, token_mode=mode)
    assert main(["--adapter", str(adapter), "--format", "diffusers", "--out", str(tmp_path / "dog.safetensors")]) == 0
    theirs = copy.deepcopy(base)
    theirs.load_lora_weights(str(tmp_path / "dog.safetensors"), adapter_name="dog")
    without_token = images(theirs, prompt)
    theirs.load_textual_inversion(str(tmp_path / "dog.learned_embeds.safetensors"))
    expected = images(ours, prompt)
    assert abs(without_token - expected).max() > 1e-2  # the learned embedding matters
    assert abs(images(theirs, prompt) - expected).max() <= TOL


# ---- peft ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def llm_base(tmp_path_factory):
    return save_tiny_base(tmp_path_factory.mktemp("tiny-llama"))


IDS = torch.tensor([[1, 40, 41, 42, 77, 90, 100, 3]])


def logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=IDS).logits


@pytest.mark.parametrize("method", METHOD_NAMES)
def test_peft_from_pretrained_equals_our_logits(method, llm_base, tmp_path):
    from peft import PeftModel

    ours = tiny_llama(tiny_tokenizer())
    inject(ours, adapter_config(method, rank=4, alpha=6.0, targets=["llama"]), name="task")
    randomize([ours], "task")
    expected = logits(ours)
    assert (expected - logits(tiny_llama(tiny_tokenizer()))).abs().max() > 1e-2
    adapter = save_adapter(ours, tmp_path / "adapter.safetensors", name="task", base_model=str(llm_base))
    assert main(["--adapter", str(adapter), "--format", "peft", "--out", str(tmp_path / "peft")]) == 0
    theirs = PeftModel.from_pretrained(tiny_llama(tiny_tokenizer()), str(tmp_path / "peft")).eval()
    assert (logits(theirs) - expected).abs().max() <= 1e-5
    # and back: the peft folder imports as LoRA cores that give the same logits
    back = tiny_llama(tiny_tokenizer())
    load_adapter(back, tmp_path / "peft", name="task")
    assert (logits(back) - expected).abs().max() <= 1e-5


def base_without_fast_tokenizer(folder, tokenizer: str):
    """A tiny LLaMA folder (config and weights) whose tokenizer cannot be loaded here: no tokenizer files
    ("none"), or only a slow sentencepiece one ("slow") that transformers converts with sentencepiece or tiktoken."""
    from llm.models import tokenizer_if_any

    tiny_llama(tiny_tokenizer()).save_pretrained(folder)
    if tokenizer == "slow":
        (folder / "tokenizer.model").write_bytes(b"\x0a\x05hello")
        (folder / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "LlamaTokenizer"}))
    assert tokenizer_if_any(str(folder))[0] is None  # the case this is about
    return folder


@pytest.mark.parametrize("tokenizer", ["none", "slow"])
def test_peft_export_needs_only_the_adapter_and_the_base_config(tokenizer, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = base_without_fast_tokenizer(tmp_path / "base", tokenizer)
    ours = tiny_llama(tiny_tokenizer())
    inject(ours, adapter_config("sbora-fa", rank=4, alpha=6.0, targets=["llama"]), name="task")
    randomize([ours], "task")
    adapter = save_adapter(ours, tmp_path / "adapter.safetensors", name="task", base_model=str(base))
    (base / "model.safetensors").rename(tmp_path / "weights")  # the export must not read the base's weights either
    assert main(["--adapter", str(adapter), "--format", "peft", "--out", str(tmp_path / "peft")]) == 0
    (tmp_path / "weights").rename(base / "model.safetensors")
    theirs = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), str(tmp_path / "peft")).eval()
    expected = logits(ours)
    assert (expected - logits(tiny_llama(tiny_tokenizer()))).abs().max() > 1e-2
    assert_close_to_signal(logits(theirs), expected)


def test_merge_into_a_base_without_a_loadable_tokenizer_saves_the_model_and_says_so(tmp_path, capsys):
    from transformers import AutoModelForCausalLM

    base = base_without_fast_tokenizer(tmp_path / "base", "slow")
    ours = tiny_llama(tiny_tokenizer())
    inject(ours, AdapterConfig(method="lora", rank=4, alpha=6.0, targets=["llama"]), name="task")
    randomize([ours], "task")
    adapter = save_adapter(ours, tmp_path / "adapter.safetensors", name="task", base_model=str(base))
    assert main(["--adapter", str(adapter), "--merge-into", str(base), "--out", str(tmp_path / "merged")]) == 0
    err = capsys.readouterr().err
    assert "note: the merged model was saved without a tokenizer" in err and ("sentencepiece" in err or "tiktoken" in err), err
    assert not [p.name for p in (tmp_path / "merged").iterdir() if p.name.startswith("tokenizer")]
    assert_close_to_signal(logits(AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()), logits(ours))


def test_peft_folders_of_a_concept_load_with_peft(base, tmp_path):
    from peft import PeftModel

    ours = concept(base, "sbora-fb")
    written = export_pipeline(ours, "c", "peft", tmp_path / "peft", info={"base_model": "tiny"})
    assert [p.name for p in written] == ["unet", "text_encoder"]
    g = torch.Generator().manual_seed(4)
    ids, sample, context = torch.randint(0, 400, (1, 8), generator=g), torch.randn(1, 4, 8, 8, generator=g), torch.randn(1, 8, 32, generator=g)
    plain = copy.deepcopy(base)
    with torch.no_grad():
        te = PeftModel.from_pretrained(plain.text_encoder, str(tmp_path / "peft" / "text_encoder"))
        assert (te(input_ids=ids).last_hidden_state - ours.text_encoder(input_ids=ids).last_hidden_state).abs().max() <= 1e-5
        unet = PeftModel.from_pretrained(plain.unet, str(tmp_path / "peft" / "unet"))
        expected = ours.unet(sample, 10, context).sample
        assert (expected - base.unet(sample, 10, context).sample).abs().max() > 1e-2
        assert (unet(sample, 10, context).sample - expected).abs().max() <= 1e-5


def test_gpt2_conv1d_layers_export_with_fan_in_fan_out(tmp_path):
    from peft import PeftModel
    from transformers import GPT2Config, GPT2LMHeadModel

    from llm.models import conv1d_to_linear

    def gpt2():
        torch.manual_seed(0)
        return GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=2, n_head=4, vocab_size=300, n_positions=32)).eval()

    ours = gpt2()
    conv1d_to_linear(ours)
    inject(ours, AdapterConfig(method="sbora-fa", rank=4, alpha=6.0, targets=["c_attn", "c_proj"]), name="task")
    randomize([ours], "task")
    export_model(ours, "task", tmp_path / "peft", base_model=None)
    assert json.loads((tmp_path / "peft" / "adapter_config.json").read_text())["fan_in_fan_out"]
    theirs = PeftModel.from_pretrained(gpt2(), str(tmp_path / "peft")).eval()
    assert (logits(theirs) - logits(ours)).abs().max() <= 1e-5


# ---- import -> export -> import ----------------------------------------------------------


def core_state(model, name: str) -> dict:
    return {f"{p}.{k}": (t, layer.cores[name].config.rank, layer.cores[name].scale)
            for p, layer in adapted_layers(model, name).items() for k, t in layer.cores[name].state_dict().items()}


def assert_same_cores(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k][0], b[k][0]) and a[k][1:] == b[k][1:], k


def test_peft_file_made_by_peft_round_trips_exactly(tmp_path):
    from peft import LoraConfig, PeftModel, get_peft_model

    config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "o_proj"], use_rslora=True,
                        rank_pattern={"model.layers.0.self_attn.q_proj": 2}, alpha_pattern={"model.layers.1.self_attn.v_proj": 3})
    made = get_peft_model(tiny_llama(tiny_tokenizer()), config)
    with torch.no_grad():
        for n, p in made.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.3, generator=torch.Generator().manual_seed(len(n)))
    made.save_pretrained(tmp_path / "peft")
    expected = logits(made.eval())
    first = tiny_llama(tiny_tokenizer())
    load_adapter(first, tmp_path / "peft", name="task")
    assert (logits(first) - expected).abs().max() <= 1e-5
    export_model(first, "task", tmp_path / "again", base_model=None)
    theirs = PeftModel.from_pretrained(tiny_llama(tiny_tokenizer()), str(tmp_path / "again")).eval()
    assert (logits(theirs) - expected).abs().max() <= 1e-5
    second = tiny_llama(tiny_tokenizer())
    load_adapter(second, tmp_path / "again", name="task")
    assert_same_cores(core_state(first, "task"), core_state(second, "task"))


def test_diffusers_file_made_by_diffusers_round_trips_exactly(base, tmp_path):
    from diffusers import StableDiffusionPipeline
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    made = copy.deepcopy(base)
    odd = "^mid_block.attentions.0.transformer_blocks.0.attn2.to_q"
    made.unet.add_adapter(LoraConfig(r=4, lora_alpha=2, target_modules=["to_q", "to_v", "to_out.0"], rank_pattern={odd: 2}, alpha_pattern={odd: 5}))
    with torch.no_grad():
        for n, p in made.unet.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.3, generator=torch.Generator().manual_seed(len(n)))
    StableDiffusionPipeline.save_lora_weights(tmp_path / "made", unet_lora_layers=get_peft_model_state_dict(made.unet),
                                              unet_lora_adapter_metadata=made.unet.peft_config["default"].to_dict())
    expected = images(made)
    first = copy.deepcopy(base)
    load_concept_adapter(first, tmp_path / "made" / "pytorch_lora_weights.safetensors", name="x")
    assert abs(images(first) - expected).max() <= TOL
    (path,) = export_pipeline(first, "x", "diffusers", tmp_path / "again.safetensors")
    second = copy.deepcopy(base)
    load_concept_adapter(second, path, name="x")
    assert_same_cores(core_state(first.unet, "x"), core_state(second.unet, "x"))
    # kohya carries one alpha per part: the odd module's scale moves into its lora_up, the update stays
    (path,) = export_pipeline(first, "x", "kohya", tmp_path / "kohya.safetensors")
    third = copy.deepcopy(base)
    load_concept_adapter(third, path, name="x")
    for p, layer in adapted_layers(first.unet, "x").items():
        assert torch.allclose(third.unet.get_submodule(p).cores["x"].delta_weight(), layer.cores["x"].delta_weight(), atol=1e-6), p


def kohya_tensors(pipe, ranks=(4, 2), alphas=(2.0, 3.0, 4.0)) -> dict[str, torch.Tensor]:
    """A kohya file as trainers write it, with per-module ranks and alphas (UNet attention + text-encoder attention)."""
    g, tensors, i = torch.Generator().manual_seed(5), {}, 0
    for prefix, model, suffixes in (("lora_unet_", pipe.unet, ("to_q", "to_k", "to_out.0")),
                                    ("lora_te_text_model_", pipe.text_encoder, ("q_proj", "out_proj"))):
        for path, m in model.named_modules():
            if isinstance(m, torch.nn.Linear) and path.endswith(suffixes):
                name, k = prefix + path.replace(".", "_"), ranks[i % len(ranks)]
                tensors[f"{name}.lora_down.weight"] = torch.randn(k, m.in_features, generator=g) * 0.3
                tensors[f"{name}.lora_up.weight"] = torch.randn(m.out_features, k, generator=g) * 0.3
                tensors[f"{name}.alpha"] = torch.tensor(alphas[i % len(alphas)])
                i += 1
    return tensors


def test_kohya_file_with_per_module_ranks_and_alphas(base, tmp_path):
    tensors = kohya_tensors(base)
    save_file(tensors, str(tmp_path / "k.safetensors"))
    ours = copy.deepcopy(base)
    load_concept_adapter(ours, tmp_path / "k.safetensors", name="k")
    q = "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"
    name = "lora_unet_" + q.replace(".", "_")
    k = tensors[f"{name}.lora_down.weight"].shape[0]
    delta = tensors[f"{name}.alpha"] / k * tensors[f"{name}.lora_up.weight"] @ tensors[f"{name}.lora_down.weight"]
    assert torch.allclose(ours.unet.get_submodule(q).cores["k"].delta_weight(), delta, atol=1e-6)
    assert adapted_layers(ours.text_encoder, "k")
    expected = images(ours)
    for fmt in ("diffusers", "kohya"):  # per-module ranks/alphas: metadata patterns, or alphas folded into lora_up
        (path,) = export_pipeline(ours, "k", fmt, tmp_path / f"{fmt}.safetensors")
        theirs = copy.deepcopy(base)
        theirs.load_lora_weights(str(path), adapter_name="k")
        assert abs(images(theirs) - expected).max() <= TOL, fmt
    with safe_open(str(tmp_path / "diffusers.safetensors"), framework="pt") as f:
        fields = json.loads(f.metadata()[DIFFUSERS_METADATA])
    assert fields["unet.rank_pattern"] and fields["unet.alpha_pattern"]
    again = copy.deepcopy(base)
    load_concept_adapter(again, tmp_path / "diffusers.safetensors", name="k")
    assert_same_cores(core_state(ours.unet, "k"), core_state(again.unet, "k"))
    assert_same_cores(core_state(ours.text_encoder, "k"), core_state(again.text_encoder, "k"))


def test_downloaded_lora_composes_with_an_sbora_concept(base, tmp_path):
    from sbora_diffusion.compose import Composer

    # one alpha per part: diffusers' kohya reader (the reference here) mis-scales per-module alphas
    save_file(kohya_tensors(base, alphas=(3.0,)), str(tmp_path / "style.safetensors"))
    sbora = concept(base, "sbora-fa", name="dog", seed=6)
    dog = save_concept_adapter(sbora, tmp_path / "dog" / "adapter.safetensors", "dog", base_model="tiny", info={"concept": "dog"})
    composer = Composer(copy.deepcopy(base))
    composer.load(dog)
    composer.load(tmp_path / "style.safetensors", name="style")
    with active_adapters(composer.parts, {"dog": 0.7, "style": 0.3}):
        ours = images(composer.pipe)
    theirs = copy.deepcopy(base)
    theirs.load_lora_weights(str(export_pipeline(sbora, "dog", "diffusers", tmp_path / "dog.safetensors")[0]), adapter_name="dog")
    theirs.load_lora_weights(str(tmp_path / "style.safetensors"), adapter_name="style")
    theirs.set_adapters(["dog", "style"], [0.7, 0.3])
    assert abs(images(theirs) - ours).max() <= TOL


# ---- every LoRA layout diffusers reads ---------------------------------------------------
# diffusers' Stable Diffusion loaders rename these layouts to peft names before loading
# (diffusers/utils/state_dict_utils.py: KEYS_TO_ALWAYS_REPLACE, UNET_TO_DIFFUSERS, DIFFUSERS_TO_PEFT,
# DIFFUSERS_OLD_TO_PEFT). Each file is written by diffusers' own save function and judged by
# diffusers' own loading of it.

PROCESSOR = {"to_q": "to_q", "to_k": "to_k", "to_v": "to_v", "to_out.0": "to_out",  # the UNet's attention
             "q_proj": "to_q", "k_proj": "to_k", "v_proj": "to_v", "out_proj": "to_out"}  # the text encoder's


def peft_names(path: str, factor: str) -> str:
    return f"{path}.lora_{'A' if factor == 'down' else 'B'}.weight"


def lora_dot(path: str, factor: str) -> str:  # UNET_TO_DIFFUSERS ".lora.down"
    return f"{path}.lora.{factor}.weight"


def linear_layer(path: str, factor: str) -> str:  # DIFFUSERS_TO_PEFT ".lora_linear_layer.down"
    return f"{path}.lora_linear_layer.{factor}.weight"


def processor(sep: str):
    """Attention-processor names (``<attention>.processor.to_q_lora.down.weight``); None for a layer outside attention."""
    def name(path: str, factor: str) -> str | None:
        attention, leaf = next(((path[: -len(leaf) - 1], leaf) for leaf in PROCESSOR if path.endswith(f".{leaf}")), (None, None))
        return None if attention is None else f"{attention}{sep}.{PROCESSOR[leaf]}_lora.{factor}.weight"
    return name


# layout: (UNet key namer, text-encoder key namer or None, the part prefixes diffusers' pipeline loader wants)
LAYOUTS = {
    "peft lora_A/lora_B": (peft_names, peft_names),
    "DreamBooth-LoRA script: unet lora.down, text encoder lora_linear_layer": (lora_dot, linear_layer),
    "attention processors": (processor(".processor"), processor("")),
    "unet.save_attn_procs: no part prefix": (processor(".processor"), None),
}
UNET_LEAVES, TE_LEAVES = ("to_q", "to_k", "to_v", "to_out.0", "ff.net.0.proj"), ("q_proj", "k_proj", "v_proj", "out_proj", "fc1")


def layout_file(pipe, layout: str, alphas: str | None, folder):
    """A LoRA in `layout` for the tiny pipeline's UNet and text encoder, saved by diffusers' own save function.

    Ranks alternate 4, 2 per module (uniform 4 with metadata). `alphas`: None (scale 1, diffusers'
    default), "keys" (``<module>.alpha`` network alphas) or "metadata" (``lora_adapter_metadata``).
    """
    from diffusers import StableDiffusionPipeline

    g, parts, i = torch.Generator().manual_seed(7), {}, 0
    unet_name, te_name = LAYOUTS[layout]
    for part, model, leaves, namer in (("unet", pipe.unet, UNET_LEAVES, unet_name), ("text_encoder", pipe.text_encoder, TE_LEAVES, te_name)):
        if namer is None:
            continue
        layers = parts.setdefault(part, {})
        for path, m in model.named_modules():
            file_path = classic_clip_path(path) if part == "text_encoder" else path
            if not (isinstance(m, torch.nn.Linear) and path.endswith(leaves) and namer(file_path, "down")):
                continue
            k = 4 if alphas == "metadata" else (4, 2)[i % 2]
            layers[namer(file_path, "down")] = torch.randn(k, m.in_features, generator=g) * 0.3
            layers[namer(file_path, "up")] = torch.randn(m.out_features, k, generator=g) * 0.3
            if alphas == "keys":  # per-module alphas on the UNet; one on the text encoder (see diffusers_load)
                layers[f"{file_path}.alpha"] = torch.tensor((3.0, 6.0, 3.0)[i % 3] if part == "unet" else 1.5)
            i += 1
    if te_name is None:  # unet.save_attn_procs wrote the UNet's keys without a prefix
        StableDiffusionPipeline.write_lora_layers(parts["unet"], str(folder), is_main_process=True, weight_name=None,
                                                  save_function=None, safe_serialization=True)
        return folder / "pytorch_lora_weights.safetensors"
    metadata = {}
    if alphas == "metadata":
        metadata = {"unet_lora_adapter_metadata": {"r": 4, "lora_alpha": 8.0, "target_modules": list(UNET_LEAVES)},
                    "text_encoder_lora_adapter_metadata": {"r": 4, "lora_alpha": 2.0, "target_modules": list(TE_LEAVES)}}
    StableDiffusionPipeline.save_lora_weights(str(folder), unet_lora_layers=parts["unet"], text_encoder_lora_layers=parts["text_encoder"], **metadata)
    return folder / "pytorch_lora_weights.safetensors"


def diffusers_load(pipe, file) -> None:
    """diffusers' own loading of `file` into `pipe` as adapter "x"."""
    from diffusers import StableDiffusionPipeline

    with safe_open(str(file), framework="pt") as f:
        keys = list(f.keys())
    if not any(k.startswith(("unet.", "text_encoder.")) for k in keys):
        pipe.unet.load_lora_adapter(str(file), prefix=None, adapter_name="x")  # a bare UNet file: the model's own loader
    elif not any(k.endswith(".alpha") for k in keys):
        pipe.load_lora_weights(str(file), adapter_name="x")
    else:
        # The pipeline loader takes network alphas only from a kohya file it converted: hand them over as it does.
        # (Its text-encoder loader matches them by classic CLIP names, which transformers >= 5 dropped, so the
        # text encoder's alphas are one value here, which it applies to every module.)
        state, _ = StableDiffusionPipeline.lora_state_dict(str(file))
        alphas = {k: float(state.pop(k)) for k in [k for k in state if k.endswith(".alpha")]}
        StableDiffusionPipeline.load_lora_into_unet(state, alphas, pipe.unet, adapter_name="x")
        StableDiffusionPipeline.load_lora_into_text_encoder(state, alphas, pipe.text_encoder, adapter_name="x")


def part_outputs(pipe) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(4)
    ids, sample, context = torch.randint(0, 400, (1, 8), generator=g), torch.randn(1, 4, 8, 8, generator=g), torch.randn(1, 8, 32, generator=g)
    with torch.no_grad():
        return pipe.unet(sample, 10, context).sample, pipe.text_encoder(input_ids=ids).last_hidden_state


@pytest.mark.parametrize("layout, alphas", [
    ("peft lora_A/lora_B", None),
    ("DreamBooth-LoRA script: unet lora.down, text encoder lora_linear_layer", None),
    ("DreamBooth-LoRA script: unet lora.down, text encoder lora_linear_layer", "keys"),
    ("DreamBooth-LoRA script: unet lora.down, text encoder lora_linear_layer", "metadata"),
    ("attention processors", None),
    ("attention processors", "keys"),
    ("unet.save_attn_procs: no part prefix", None),
])
def test_every_diffusers_layout_imports_as_diffusers_loads_it(layout, alphas, base, tmp_path):
    file = layout_file(base, layout, alphas, tmp_path / "lora")
    theirs = copy.deepcopy(base)
    diffusers_load(theirs, file)
    ours = copy.deepcopy(base)
    load_concept_adapter(ours, file, name="x")
    plain_unet, plain_te = part_outputs(base)
    unet, te = part_outputs(theirs)
    assert (unet - plain_unet).abs().max() > 0.1 * plain_unet.abs().max()  # the LoRA matters: a lost module would show
    ours_unet, ours_te = part_outputs(ours)
    assert_close_to_signal(ours_unet, unet)
    if LAYOUTS[layout][1] is not None:
        assert (te - plain_te).abs().max() > 0.1 * plain_te.abs().max()
        assert_close_to_signal(ours_te, te)
    else:
        assert untouched(ours.text_encoder)
    # and the import is the exact LoRA: ΔW = alpha/k · up @ down of one module, read from the file
    with safe_open(str(file), framework="pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    q = "mid_block.attentions.0.transformer_blocks.0.attn1.to_q"
    prefix = "unet." if LAYOUTS[layout][1] is not None else ""
    down, up = (tensors[prefix + LAYOUTS[layout][0](q, factor)] for factor in ("down", "up"))
    alpha = {"keys": float(tensors[f"unet.{q}.alpha"]) if alphas == "keys" else 0, "metadata": 8.0}.get(alphas) or down.shape[0]
    assert_close_to_signal(ours.unet.get_submodule(q).cores["x"].delta_weight(), alpha / down.shape[0] * up @ down)


# ---- bad files -----------------------------------------------------------------------------


def _kohya_case(change):
    def make(pipe):
        tensors = kohya_tensors(pipe)
        change(tensors)
        return tensors
    return make


Q = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"
ATTN = "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1"
SDXL_ON_SD = r"trained on a Stable Diffusion XL pipeline, and this pipeline is Stable Diffusion 1\.x/2\.x: load it onto a Stable Diffusion XL base"
LAYOUT_LIST = r"it reads peft/diffusers <module>\.lora_A\.weight.*lora\.down\.weight.*lora_linear_layer.*attention processors.*kohya"


@pytest.mark.parametrize("case, make, message", [
    ("unknown key", _kohya_case(lambda t: t.__setitem__(f"{Q}.hada_w1_a", torch.zeros(2, 2))), rf"key {Q}\.hada_w1_a is not part of a plain kohya LoRA"),
    ("wrong shape", _kohya_case(lambda t: t.__setitem__(f"{Q}.lora_down.weight", torch.zeros(4, 7))), rf"{Q}\.lora_down\.weight: file has \(4, 7\), the layer .*to_q needs \(4, 32\)"),
    ("rank mismatch", _kohya_case(lambda t: t.__setitem__(f"{Q}.lora_up.weight", torch.zeros(32, 3))), rf"key {Q}\.lora_up\.weight has shape \(32, 3\) but .* has rank 4"),
    ("missing partner", _kohya_case(lambda t: t.pop(f"{Q}.lora_up.weight")), rf"has no partner {Q}\.lora_up\.weight"),
    ("another base", _kohya_case(lambda t: t.update({k.replace("down_blocks_0", "down_blocks_7"): v.clone() for k, v in t.items() if k.startswith(Q)})), r"lora_unet_down_blocks_7_.*_to_q\.lora_down\.weight: UNet2DConditionModel has no linear layer"),
    ("convolution", _kohya_case(lambda t: t.__setitem__(f"{Q}.lora_down.weight", torch.zeros(4, 32, 1, 1))), "a convolution's LoRA"),
    ("SDXL", lambda pipe: {"text_encoder_2.x.lora_A.weight": torch.zeros(2, 4), "text_encoder_2.x.lora_B.weight": torch.zeros(4, 2)}, SDXL_ON_SD),
    ("SDXL, old layout", lambda pipe: {"text_encoder_2.text_model.encoder.layers.0.self_attn.to_q_lora.down.weight": torch.zeros(2, 32),
                                       "text_encoder_2.text_model.encoder.layers.0.self_attn.to_q_lora.up.weight": torch.zeros(32, 2)}, SDXL_ON_SD),
    ("SDXL, kohya", lambda pipe: {"lora_te2_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight": torch.zeros(2, 32),
                                  "lora_te2_text_model_encoder_layers_0_self_attn_q_proj.lora_up.weight": torch.zeros(32, 2)}, SDXL_ON_SD),
    ("unknown layout", lambda pipe: {f"{ATTN}.to_q.lora_magnitude_vector": torch.ones(32)},
     rf"key {ATTN}\.to_q\.lora_magnitude_vector is in no LoRA layout this toolkit reads; {LAYOUT_LIST}"),
    ("unknown key in an old layout", lambda pipe: {f"{ATTN}.to_q.lora.down.weight": torch.zeros(4, 32), f"{ATTN}.to_q.lora.up.weight": torch.zeros(32, 4),
                                                   f"{ATTN}.to_q.lora_magnitude_vector": torch.ones(32)},
     r"key .*to_q\.lora_magnitude_vector is not part of a plain diffusers LoRA in the layouts this toolkit reads \(peft/diffusers .*attention processors"),
    ("missing partner, old layout", lambda pipe: {f"{ATTN}.processor.to_q_lora.down.weight": torch.zeros(4, 32)},
     rf"key {ATTN}\.processor\.to_q_lora\.down\.weight has no partner {ATTN}\.processor\.to_q_lora\.up\.weight"),
    ("one factor in two layouts", lambda pipe: {f"{ATTN}.to_q.lora.down.weight": torch.zeros(4, 32), f"{ATTN}.to_q.lora_A.weight": torch.zeros(4, 32),
                                                f"{ATTN}.to_q.lora.up.weight": torch.zeros(32, 4)}, "hold the same LoRA factor in two layouts"),
    ("wrong shape, old layout", lambda pipe: {f"{ATTN}.processor.to_out_lora.down.weight": torch.zeros(4, 7), f"{ATTN}.processor.to_out_lora.up.weight": torch.zeros(32, 4)},
     rf"{ATTN}\.processor\.to_out_lora\.down\.weight: file has \(4, 7\), the layer .*attn1\.to_out\.0 needs \(4, 32\)"),
    ("LLM file", lambda pipe: {"base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight": torch.zeros(2, 32),
                               "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight": torch.zeros(32, 2)},
     r"made for another model:\n  base_model\.model\.model\.layers\.0\.self_attn\.q_proj\.lora_A\.weight: UNet2DConditionModel has no linear layer"),
    ("not a LoRA", lambda pipe: {"x": torch.zeros(2)}, "not an adapter of this toolkit.*nor a diffusers, kohya or peft LoRA"),
])
def test_bad_lora_files_are_clear_errors_that_change_nothing(case, make, message, base, tmp_path):
    path = tmp_path / "bad.safetensors"
    save_file(make(base), str(path))
    pipe = copy.deepcopy(base)
    with pytest.raises(AdapterFileError, match=message):
        load_concept_adapter(pipe, path)
    assert untouched(pipe.unet, pipe.text_encoder)


def test_alpha_keys_beside_lora_metadata_are_refused(base, tmp_path):
    tensors = {f"{ATTN}.to_q.lora.down.weight": torch.zeros(4, 32), f"{ATTN}.to_q.lora.up.weight": torch.zeros(32, 4), f"{ATTN}.to_q.alpha": torch.tensor(2.0)}
    save_file(tensors, str(tmp_path / "both.safetensors"), metadata={"format": "pt", DIFFUSERS_METADATA: json.dumps({"unet.r": 4, "unet.lora_alpha": 8})})
    pipe = copy.deepcopy(base)
    with pytest.raises(AdapterFileError, match=rf"key {ATTN}\.to_q\.alpha gives an alpha, and the lora_adapter_metadata header gives LoRA alphas too"):
        load_concept_adapter(pipe, tmp_path / "both.safetensors")
    assert untouched(pipe.unet, pipe.text_encoder)


def test_unet_lora_into_an_llm_names_the_key(base, tmp_path):
    save_file(kohya_tensors(base), str(tmp_path / "k.safetensors"))
    model = tiny_llama(tiny_tokenizer())
    with pytest.raises(AdapterFileError, match=r"made for another model:\n  lora_(unet|te)_.*lora_down\.weight: LlamaForCausalLM has no linear layer"):
        load_adapter(model, tmp_path / "k.safetensors")
    assert untouched(model)
    assert read_adapter(tmp_path / "k.safetensors").format == "kohya"


# ---- the command -------------------------------------------------------------------------


def test_merge_into_saves_a_plain_pipeline_with_the_concept_folded_in(base, tmp_path):
    from diffusers import EulerDiscreteScheduler, StableDiffusionPipeline

    model_dir = tmp_path / "base"
    plain = copy.deepcopy(base)
    plain.scheduler = EulerDiscreteScheduler.from_config(plain.scheduler.config)
    plain.save_pretrained(model_dir)
    ours = concept(base, "ortho")
    tokens = install_concept_tokens(ours.tokenizer, ours.text_encoder, "<c1>", "new", init_word="dog")
    with torch.no_grad():
        tokens.vectors.add_(1.0)
    adapter = save_concept_adapter(ours, tmp_path / "c" / "adapter.safetensors", "c", base_model="tiny",
                                   info={"concept": "c", "token": "<c1>"}, tokens=tokens, token_mode="new")
    out = tmp_path / "merged"
    assert main(["--adapter", str(adapter), "--merge-into", str(model_dir), "--out", str(out)]) == 0
    merged = StableDiffusionPipeline.from_pretrained(out, safety_checker=None, requires_safety_checker=False)
    assert isinstance(merged.scheduler, EulerDiscreteScheduler)  # the folder's own sampler is kept
    assert untouched(merged.unet, merged.text_encoder)
    merged.scheduler = copy.deepcopy(base.scheduler)
    assert abs(images(merged, "a photo of <c1> dog") - images(ours, "a photo of <c1> dog")).max() <= TOL


def test_merge_into_saves_a_plain_transformers_model(llm_base, tmp_path):
    from transformers import AutoModelForCausalLM

    ours = tiny_llama(tiny_tokenizer())
    inject(ours, AdapterConfig(method="sbora-fb", rank=4, alpha=6.0, targets=["llama"]), name="task")
    randomize([ours], "task")
    adapter = save_adapter(ours, tmp_path / "adapter.safetensors", name="task", base_model=str(llm_base))
    assert main(["--adapter", str(adapter), "--merge-into", str(llm_base), "--out", str(tmp_path / "merged")]) == 0
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    assert (logits(merged) - logits(ours)).abs().max() <= 1e-5


@pytest.mark.parametrize("args, message", [
    (["--format", "diffusers", "--out", "x.safetensors"], "give --adapter PATH and --out PATH"),
    (["--adapter", "{lm}", "--out", "{tmp}/x.safetensors"], "either --format diffusers|kohya|peft or --merge-into"),
    (["--adapter", "{lm}", "--format", "onnx", "--out", "{tmp}/x"], "unknown --format 'onnx'"),
    (["--adapter", "{lm}", "--format", "kohya", "--out", "{tmp}/x.bin"], "must be a .safetensors file name"),
    (["--adapter", "{lm}", "--format", "diffusers", "--out", "{tmp}/x.safetensors"], "adapts a transformers model.*--format peft"),
    (["--adapter", "{lm}", "--format", "peft", "--out", "{tmp}"], "already exists and is not an earlier export"),
    (["--adapter", "{nobase}", "--format", "peft", "--out", "{tmp}/p"], "does not record its base model; pass --model"),
    (["--adapter", "{tmp}/missing.safetensors", "--format", "peft", "--out", "{tmp}/p"], "no adapter file at"),
])
def test_cli_errors_are_one_line(args, message, llm_base, tmp_path, capsys):
    import re

    ours = tiny_llama(tiny_tokenizer())
    inject(ours, AdapterConfig(method="lora", rank=2, targets=["llama"]), name="task")
    lm = save_adapter(ours, tmp_path / "lm.safetensors", name="task", base_model=str(llm_base))
    nobase = save_adapter(ours, tmp_path / "nobase.safetensors", name="task")
    before = sorted(tmp_path.iterdir())
    argv = [a.format(lm=lm, nobase=nobase, tmp=tmp_path) for a in args]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and re.search(message, err), err
    assert sorted(tmp_path.iterdir()) == before  # nothing written
