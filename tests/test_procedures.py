"""Training procedures on the shared engine: Delta-LoRA (both forms agree with the telescoped sum, nothing
before K, SBoRA-FA's r columns, compact exact files, dropout refused) and DiffoRA selection (useful modules
kept, deterministic, budget, pruned modules gone), on toy models and through both real CLIs, with exact resume."""

from __future__ import annotations

import copy
import json
import math
import threading
from pathlib import Path

import pytest
from numeric import assert_close_to_signal
import torch
from conftest import TinyBlocks
from llm_helpers import save_tiny_base
from PIL import Image

from llm import train as llm_train
from sbora.adapters import (
    METHODS,
    AdapterConfig,
    active_adapters,
    adapted_layers,
    adapter_parameters,
    inject,
    load_adapter,
    merge,
    read_adapter,
    save_adapter,
    unmerge,
)
from sbora.checkpoint import list_checkpoints, read_checkpoint
from sbora_diffusion.concept.cli import main as concept_main
from sbora_diffusion.concept.options import TrainConfig
from sbora_diffusion.concept.train import train as concept_train
from sbora_diffusion.concept.config import ConceptConfig
from sbora.configuration import ConfigError
from sbora.engine import Engine, EngineConfig, TrainingInterrupted
from sbora_diffusion.models import load_pipeline
from sbora.procedures import DeltaLoRA, DiffoRA, ProcedureConfig

pytestmark = pytest.mark.numeric  # also run under other CPU kernels and 2 threads (make test-cpus, .ci/run)

R = 4
FIVE_BY = torch.randn(2, 5, 24, generator=torch.Generator().manual_seed(7))  # a fixed probe input of TinyBlocks


def randomize(params, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in params:
            p.add_(torch.randn(p.shape, generator=g) * 0.2 + (0.3 if p.ndim == 0 else 0.0))


def delta_model(method: str, **kw) -> TinyBlocks:
    torch.manual_seed(0)
    model = TinyBlocks().requires_grad_(False)
    inject(model, AdapterConfig(method=method, rank=R, alpha=8.0, targets=["sd-unet"], delta=True, **kw))
    return model


# ---- the Delta-LoRA core over the whole registry ----------------------------------------------


@pytest.mark.parametrize("method", sorted(METHODS))
def test_delta_core_forward_factors_merge_and_file(method, tmp_path):
    model = delta_model(method)
    torch.manual_seed(0)
    base = TinyBlocks()
    assert torch.equal(model(FIVE_BY), base(FIVE_BY))  # a fresh Delta-LoRA adapter changes nothing
    randomize(adapter_parameters(model), 1)
    own = {p: layer.cores["default"].lora_factors()[0].shape[0] for p, layer in adapted_layers(model).items()}  # k per layer
    for layer in adapted_layers(model).values():
        layer.cores["default"].start_delta(2.0)  # step K
    randomize(adapter_parameters(model), 2)  # steps K+1.. moved the factors on
    for path, layer in adapted_layers(model).items():
        core = layer.cores["default"]
        A, B, s = core.lora_factors()
        k = own[path]
        assert A.shape == (2 * k, layer.in_features) and B.shape == (layer.out_features, 2 * k)  # rank <= 2k
        assert torch.equal(core.delta_weight(), (B @ A) * s)
        x = torch.randn(3, 7, layer.in_features)
        torch.testing.assert_close(layer(x) - layer.base_layer(x), x @ core.delta_weight().T, atol=1e-5, rtol=1e-5)
        assert core.weight_shift() > 0
    # Gradients reach the core's own parameters only: W and the step-K factors are frozen buffers or frozen weights.
    model(FIVE_BY).square().sum().backward()
    trained = {id(p) for p in adapter_parameters(model)}
    assert all((p.grad is not None) == (id(p) in trained) for p in model.parameters())
    assert all({"A_K", "B_K", "delta_lambda"} <= dict(c.named_buffers()).keys() for c in (l.cores["default"] for l in adapted_layers(model).values()))
    # The file: the core's tensors plus A_K, B_K and λ; loading runs the very same forward.
    y = model(FIVE_BY)
    save_adapter(model, tmp_path / "a.safetensors")
    file = read_adapter(tmp_path / "a.safetensors")
    assert file.config.delta and all(float(t) == 2.0 for k, t in file.tensors.items() if k.endswith("delta_lambda"))
    torch.manual_seed(0)
    fresh = TinyBlocks()
    w0 = {k: v.clone() for k, v in fresh.state_dict().items()}
    load_adapter(fresh, tmp_path / "a.safetensors")
    assert torch.equal(fresh(FIVE_BY), y)
    merge(fresh)
    torch.testing.assert_close(fresh(FIVE_BY), y, atol=1e-5, rtol=1e-5)
    unmerge(fresh)
    for k, v in fresh.state_dict().items():
        if ".cores." not in k:
            assert (v - w0[k.replace("base_layer.", "")]).abs().max() <= 1e-6, k


@pytest.mark.parametrize("method", sorted(METHODS))
def test_scale_multiplies_delta_weight(method):
    torch.manual_seed(0)
    model = TinyBlocks()
    inject(model, AdapterConfig(method=method, rank=R, alpha=8.0, targets=["sd-unet"]))
    randomize(adapter_parameters(model), 3)
    for layer in adapted_layers(model).values():
        core = layer.cores["default"]
        before = core.delta_weight().detach().clone()
        core.scale_(0.3)
        torch.testing.assert_close(core.delta_weight(), 0.3 * before, atol=1e-6, rtol=1e-5)


def test_lora_delta_file_is_compact(tmp_path):
    model = delta_model("lora")
    randomize(adapter_parameters(model), 1)
    for layer in adapted_layers(model).values():
        layer.cores["default"].start_delta(0.5)
    save_adapter(model, tmp_path / "a.safetensors")
    file = read_adapter(tmp_path / "a.safetensors")
    shapes = {k.rsplit(".", 1)[1]: tuple(t.shape) for k, t in file.tensors.items() if k.startswith("blocks.0.to_q.")}
    assert shapes == {"A": (R, 24), "B": (32, R), "A_K": (R, 24), "B_K": (32, R), "delta_lambda": ()}  # never a dense 32x24


def test_dropout_is_refused():
    with pytest.raises(ConfigError, match="Delta-LoRA needs dropout 0.*--dropout 0"):
        AdapterConfig(method="lora", dropout=0.1, delta=True).validate()
    cfg = ProcedureConfig(steps=10, delta=True)
    with pytest.raises(ConfigError, match="Delta-LoRA needs dropout 0"):
        cfg.adapter_with_procedures(AdapterConfig(method="sbora-fa", dropout=0.05))


# ---- Delta-LoRA on the engine: the paper's in-place form vs ours -------------------------------


def teacher_loss(model):
    torch.manual_seed(1)
    teacher = TinyBlocks()

    def loss_fn(prepared, micro):
        x = torch.randn(4, 5, 24, generator=micro.generator)
        with torch.no_grad():
            target = teacher(x)
        return (prepared(x) - target).square().mean()

    return loss_fn


def run_toy(out: Path, model, procedures=(), steps: int = 6, loss=None, **cfg):
    engine = Engine(EngineConfig(**{"steps": steps, "lr": 0.02, "checkpoint_every": 0, "log_every": 1, "output_dir": str(out), **cfg}), out)
    (prepared,) = engine.prepare(model)
    named = {n: p for n, p in model.named_parameters() if p.requires_grad}
    engine.setup(named, [{"params": list(named.values())}], procedures=list(procedures))
    loss_fn = loss or teacher_loss(model)
    state = engine.run(lambda micro: loss_fn(prepared, micro))
    engine.finish()
    return engine, state


class InPlaceDelta:
    """The paper's form, written into W: after each optimizer step t > K, W += λ·s·(B_t A_t − B_{t−1} A_{t−1})."""

    def __init__(self, model, lam: float, start: int):
        self.model, self.lam, self.start = model, lam, start
        self.unchanged: list[bool] = []  # per step: W still bit-identical to W_0

    def factors(self) -> dict:
        return {p: tuple(t.detach().clone() if torch.is_tensor(t) else t for t in l.cores["default"].lora_factors())
                for p, l in adapted_layers(self.model).items()}

    def setup(self, engine):
        self.w0 = {p: l.base_layer.weight.detach().clone() for p, l in adapted_layers(self.model).items()}
        self.prev = self.factors()

    @torch.no_grad()
    def after_optimizer_step(self, engine, step):
        now = self.factors()
        if step == self.start:
            self.at_start = now
        if step > self.start:
            for p, layer in adapted_layers(self.model).items():
                (A0, B0, s), (A1, B1, _) = self.prev[p], now[p]
                layer.base_layer.weight.add_(self.lam * s * (B1 @ A1 - B0 @ A0))
        self.prev = now
        self.unchanged.append(all(torch.equal(l.base_layer.weight, self.w0[p]) for p, l in adapted_layers(self.model).items()))


class Probe:
    """Records, after every step (and after the procedures listed before it), what a test wants to see."""

    def __init__(self, fn):
        self.fn, self.seen = fn, []

    def after_optimizer_step(self, engine, step):
        self.seen.append(self.fn(step))


def test_in_place_and_branch_forms_agree_and_equal_the_telescoped_sum(tmp_path):
    lam, K, T = 2.0, 2, 6
    torch.manual_seed(0)
    plain = TinyBlocks().requires_grad_(False)
    inject(plain, AdapterConfig(method="lora", rank=R, alpha=8.0, targets=["sd-unet"]))
    branch = delta_model("lora")
    paths = list(adapted_layers(branch))
    in_place = InPlaceDelta(plain, lam, K)
    ours = DeltaLoRA({"": branch}, "default", lam, K)
    probe = Probe(lambda step: [l.cores["default"]._lambda for l in adapted_layers(branch).values()])
    run_toy(tmp_path / "a", plain, [in_place], steps=T)
    engine, _ = run_toy(tmp_path / "b", branch, [ours, probe], steps=T)
    # No update before K: W untouched through step K in the paper's form, the branch off in ours.
    assert in_place.unchanged == [True] * K + [False] * (T - K)
    assert [set(v) for v in probe.seen] == [{0.0}] * (K - 1) + [{lam}] * (T - K + 1)
    log = [json.loads(line) for line in (tmp_path / "b" / "log.jsonl").read_text().splitlines()]
    assert [r["weight_shift"] for r in log[: K - 1]] == [0.0] * (K - 1) and all(r["weight_shift"] > 1e-4 for r in log[K:])
    for p in paths:
        W_plain = adapted_layers(plain)[p].base_layer.weight
        core = adapted_layers(branch)[p].cores["default"]
        A_T, B_T, s = adapted_layers(plain)[p].cores["default"].lora_factors()
        A_K, B_K, _ = in_place.at_start[p]
        telescoped = lam * s * (B_T @ A_T - B_K @ A_K)
        # The paper's accumulated W equals the telescoped formula ...
        torch.testing.assert_close(W_plain - in_place.w0[p], telescoped, atol=1e-6, rtol=1e-5)
        # ... and ours carries the same move (from its own factors and its step-K copies), W itself never written.
        assert torch.equal(adapted_layers(branch)[p].base_layer.weight, in_place.w0[p])
        torch.testing.assert_close(core.A_K, A_K, atol=1e-6, rtol=1e-5)
        torch.testing.assert_close(core.B_K, B_K, atol=1e-6, rtol=1e-5)
        ours_shift = core.delta_weight() - core.scale * core.B @ core.A
        torch.testing.assert_close(ours_shift, telescoped, atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(in_place.w0[p] + core.delta_weight(), W_plain + (B_T @ A_T) * s, atol=1e-5, rtol=1e-4)
        assert telescoped.abs().max() > 1e-3  # the comparisons above compared something real
    torch.testing.assert_close(branch(FIVE_BY), plain(FIVE_BY), atol=1e-5, rtol=1e-4)
    # W gets no gradient and no optimizer state: the optimizer holds exactly the adapters' own parameters.
    assert {id(p) for g in engine.optimizer.param_groups for p in g["params"]} == {id(p) for p in adapter_parameters(branch)}


def test_sbora_fa_delta_moves_only_its_r_columns(tmp_path):
    model = delta_model("sbora-fa")
    w0 = {p: l.base_layer.weight.detach().clone() for p, l in adapted_layers(model).items()}
    run_toy(tmp_path / "a", model, [DeltaLoRA({"": model}, "default", 2.0, 1)], steps=4)
    for p, layer in adapted_layers(model).items():
        core = layer.cores["default"]
        assert torch.equal(layer.base_layer.weight, w0[p])
        shift = core.delta_weight() - core.scale * core.B @ core.one_hot()  # W_T − W_0 of the paper's form
        others = [i for i in range(layer.in_features) if i not in set(core.indices.tolist())]
        assert torch.count_nonzero(shift[:, others]) == 0 and torch.count_nonzero(core.delta_weight()[:, others]) == 0
        assert shift[:, core.indices].abs().min(dim=0).values.gt(0).all()  # every one of the r columns moved


# ---- DiffoRA on a constructed problem -------------------------------------------------------------


class Switchboard(torch.nn.Module):
    """Two modules read the task's input x, four read noise z that carries no information about the target."""

    def __init__(self):
        super().__init__()
        self.signal = torch.nn.ModuleList([torch.nn.Linear(8, 8) for _ in range(2)])
        self.noise = torch.nn.ModuleList([torch.nn.Linear(8, 8) for _ in range(4)])

    def forward(self, xz: torch.Tensor) -> torch.Tensor:
        x, z = xz.unbind(0)
        return sum(m(x) for m in self.signal) + sum(m(z) for m in self.noise)


def switchboard():
    """The model with a LoRA on all six modules, and a loss that only the signal modules can lower."""
    torch.manual_seed(0)
    model = Switchboard().requires_grad_(False)
    teacher = copy.deepcopy(model)
    T = torch.randn(8, 8, generator=torch.Generator().manual_seed(3))  # the residual: a function of x alone
    inject(model, AdapterConfig(method="lora", rank=2, alpha=2.0, targets=[f"signal.{i}" for i in range(2)] + [f"noise.{i}" for i in range(4)]))

    def loss_fn(prepared, micro):
        xz = torch.randn(2, 32, 8, generator=micro.generator)
        with torch.no_grad():
            target = teacher(xz) + xz[0] @ T
        return (prepared(xz) - target).square().mean()

    return model, loss_fn


def select_run(out: Path, model, loss_fn, probes=((), ()), keep_ratio: float = 1 / 3, param_budget: int | None = None):
    selection = DiffoRA({"": model}, "default", keep_ratio, param_budget, 6, gate_lr=0.05)
    engine, _ = run_toy(out, model, [*probes[0], selection, *probes[1]], steps=16, loss=loss_fn, lr=0.05)
    return engine, selection


def test_diffora_keeps_the_useful_modules_and_removes_the_rest_everywhere(tmp_path, capsys):
    model, loss_fn = switchboard()
    before, after = {}, {}

    def outputs(store):  # every adapted module's output at the cut, just before or just after it
        return lambda step: step == 6 and store.update({p: l(torch.ones(3, 8)).detach() for p, l in adapted_layers(model).items()})

    engine, selection = select_run(tmp_path / "a", model, loss_fn, probes=([Probe(outputs(before))], [Probe(outputs(after))]))
    meta = selection.metadata()["diffora"]
    assert sorted(meta["kept"]) == ["signal.0", "signal.1"] and sorted(meta["dropped"]) == [f"noise.{i}" for i in range(4)]
    assert meta["selected_at_step"] == 6 and min(meta["gates"][k] for k in meta["kept"]) > max(meta["gates"][k] for k in meta["dropped"])
    assert "DiffoRA selection at step 6: kept 2 of 6 modules, 64 of 192 adapter parameters" in capsys.readouterr().err
    # The kept modules compute what they computed under their gates (folded in); the others are gone.
    assert sorted(after) == sorted(meta["kept"]) and len(before) == 6
    for p in after:
        torch.testing.assert_close(after[p], before[p], atol=1e-6, rtol=1e-5)
    # Gone from the model, the optimizer (and its state), the checkpoint and the saved file.
    assert sorted(adapted_layers(model)) == sorted(meta["kept"]) and all(type(m) is torch.nn.Linear for m in model.noise)
    kept_params = {id(p) for p in adapter_parameters(model)}
    assert {id(p) for g in engine.optimizer.param_groups for p in g["params"]} == kept_params == {id(p) for p in engine.optimizer.state}
    assert not any("noise" in n or n.startswith("diffora.gate") for n in engine.named_params)
    final = read_checkpoint(list_checkpoints(tmp_path / "a" / "checkpoints")[-1])
    assert sorted(final["trainable"]) == sorted(engine.named_params) and final["procedures"]["DiffoRA"]["kept"] == meta["kept"]
    save_adapter(model, tmp_path / "a.safetensors", extra=selection.metadata())
    file = read_adapter(tmp_path / "a.safetensors")
    assert sorted(file.modules) == sorted(meta["kept"]) and not any(k.startswith("noise") for k in file.tensors)
    assert file.extra["diffora"]["gates"] == meta["gates"]
    log = [json.loads(line) for line in (tmp_path / "a" / "log.jsonl").read_text().splitlines()]
    assert all("gate/noise.3" in r for r in log[:6]) and all(r["modules_kept"] == 2 and "gate/noise.3" not in r for r in log[6:])


def test_diffora_same_seed_same_selection_and_the_budget_holds(tmp_path):
    _, one = select_run(tmp_path / "a", *switchboard())
    _, two = select_run(tmp_path / "b", *switchboard())
    assert one.metadata() == two.metadata()  # kept, dropped and every gate value, bit for bit
    engine, budget = select_run(tmp_path / "c", *switchboard(), param_budget=40)  # a rank-2 LoRA on 8x8 holds 32
    meta = budget.metadata()["diffora"]
    assert meta["adapter_params"] == 32 <= 40 and meta["kept"] == [max(meta["gates"], key=meta["gates"].get)]
    assert sum(p.numel() for p in engine.named_params.values()) == 32
    with pytest.raises(ConfigError, match="--param-budget 20 cannot hold one adapted module.*at least 32"):
        select_run(tmp_path / "d", *switchboard(), param_budget=20)


def test_procedure_options_are_checked_before_anything_runs():
    with pytest.raises(ConfigError, match="DiffoRA's cut at step 10.*1 <= step < steps = 10"):
        ProcedureConfig(steps=10, select="diffora", select_warmup=10).validate()
    with pytest.raises(ConfigError, match="delta_start must be whole optimizer steps"):
        ProcedureConfig(delta_start=2.5).validate()
    with pytest.raises(ConfigError, match="0 < keep_ratio <= 1"):
        ProcedureConfig(keep_ratio=0).validate()
    with pytest.raises(ConfigError, match="select must be one of none, diffora"):
        ProcedureConfig(select="darts").validate()
    with pytest.raises(ConfigError, match="W would never move"):
        ProcedureConfig(steps=10, delta=True, delta_start=10).adapter_with_procedures(AdapterConfig(method="lora"))
    with pytest.raises(ConfigError, match="at or after the cut \\(step 4\\).*at least 4"):
        ProcedureConfig(steps=20, delta=True, delta_start=2, select="diffora", select_warmup=0.2).adapter_with_procedures(AdapterConfig(method="lora"))
    assert ProcedureConfig(steps=100, delta_start=0.25).adapter_with_procedures(AdapterConfig(method="lora", delta=True)).delta


# ---- the concept trainer (tiny SD pipeline) -----------------------------------------------------


@pytest.fixture(scope="module")
def concept_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("concept")
    for i, bg in enumerate([(20, 40, 200), (240, 240, 200), (30, 120, 30)]):
        im = Image.new("RGB", (40, 36), bg)
        im.paste((220, 30, 30), (8 + i * 4, 8, 24 + i * 4, 28))
        im.save(folder / f"img{i}.png")
    return folder


def unet_out(pipe) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    unet = pipe.unet
    latents = torch.randn(1, unet.config.in_channels, 4, 4, generator=g)
    ids = pipe.tokenizer("a photo of <thing1> toy", padding="max_length", max_length=pipe.tokenizer.model_max_length, return_tensors="pt").input_ids
    with torch.no_grad():
        return unet(latents, 10, encoder_hidden_states=pipe.text_encoder(ids)[0]).sample


def test_concept_delta_and_diffora_resume_exactly_and_reload_exactly(tiny_pipe, concept_dir, tmp_path):
    concept = ConceptConfig(name="thing", instance_dir=str(concept_dir), token="<thing1>", class_word="toy", validation_prompts=["a photo of {token} {class_word}"])

    def cfg(out):
        return TrainConfig(steps=6, resolution=32, lr=1e-3, sample_steps=2, num_validation_images=1, checkpoint_every=0,
                           train_text_encoder=True, output_dir=str(out), delta=True, delta_start=3, select="diffora", select_warmup=2,
                           keep_ratio=0.25, gate_lr=0.05)

    def run(out, stop_at=None, resume=False):
        event = threading.Event()
        return concept_train(concept, "sbora-fa", train_config=cfg(out), adapter_overrides={"rank": 4}, pipe=copy.deepcopy(tiny_pipe),
                             resume=resume, stop_event=event, on_step=lambda step, loss: step == stop_at and event.set())

    straight = run(tmp_path / "a")
    with pytest.raises(TrainingInterrupted) as first:
        run(tmp_path / "b", stop_at=1)  # gates still training
    with pytest.raises(TrainingInterrupted) as second:
        run(tmp_path / "b", stop_at=4, resume=True)  # after the cut (2) and Delta-LoRA's start (3)
    assert (first.value.step, second.value.step) == (1, 4)
    resumed = run(tmp_path / "b", resume=True)
    assert resumed.losses == straight.losses[4:]
    for name in ("adapter.safetensors", "adapter.text_encoder.safetensors"):
        a, b = read_adapter(straight.out_dir / name), read_adapter(resumed.out_dir / name)
        assert a.modules == b.modules and a.tensors.keys() == b.tensors.keys()
        assert all(torch.equal(a.tensors[k], b.tensors[k]) for k in a.tensors), name
    file = read_adapter(straight.adapter_path)
    assert file.extra["diffora"] == read_adapter(resumed.adapter_path).extra["diffora"]
    assert file.extra["delta_lora"] == {"lambda": 2.0, "start_step": 3, "started": True}
    kept = file.extra["diffora"]["kept"]
    total = len(kept) + len(file.extra["diffora"]["dropped"])
    assert len(kept) == math.ceil(0.25 * total) and {k.split(".")[0] for k in kept} == {"unet", "text_encoder"}
    assert sorted(file.modules) == sorted(k[len("unet."):] for k in kept if k.startswith("unet."))
    assert all(float(t) == 2.0 for k, t in file.tensors.items() if k.endswith("delta_lambda"))
    # Loading the files reproduces the trained pipeline's outputs (W's in-place Delta-LoRA writes vs the file's
    # telescoped form: the same values by other arithmetic, so up to round-off).
    reloaded = load_pipeline("tiny", adapter=straight.adapter_path)
    trained = unet_out(straight.pipe)
    assert_close_to_signal(unet_out(reloaded), trained)
    with active_adapters((reloaded.unet, reloaded.text_encoder), {}):  # the adapters off: something else, far beyond round-off
        assert (unet_out(reloaded) - trained).abs().max() > 1e-3 * trained.abs().max()


def test_concept_cli_delta_and_diffora(concept_dir, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    quick = ["--model", "tiny", "--steps", "3", "--resolution", "32", "--rank", "4", "--sample-steps", "2",
             "--num-validation-images", "1", "--checkpoint-every", "0"]
    assert concept_main(["--concept", str(concept_dir), "--method", "sbora-fa", "--select", "diffora", "--select-warmup", "1",
                         "--keep-ratio", "0.25", "--gate-lr", "0.05", "--delta", "--delta-start", "2", *quick]) == 0
    err = capsys.readouterr().err
    assert "DiffoRA selection at step 1: kept" in err and "Delta-LoRA: from step 2 on" in err
    out = tmp_path / "outputs" / Path(str(concept_dir)).name / "sbora-fa-delta-diffora"  # what the options add shows in the folder
    file = read_adapter(out / "adapter.safetensors")
    assert file.config.method == "sbora-fa" and file.config.delta
    assert sorted(file.modules) == sorted(k[len("unet."):] for k in file.extra["diffora"]["kept"])
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert any(k.startswith("gate/unet.") for k in log[0]) and [r["modules_kept"] for r in log] == [len(file.modules)] * 3
    assert [r["weight_shift"] > 0 for r in log] == [False, False, True]
    assert concept_main(["--concept", str(concept_dir), "--method", "delta-lora", "--delta-start", "1", "--output-dir", "dl", *quick]) == 0
    file = read_adapter(tmp_path / "dl" / "adapter.safetensors")
    assert file.config.method == "lora" and file.config.delta and file.extra["delta_lora"]["start_step"] == 1
    assert concept_main(["--concept", str(concept_dir), "--method", "delta-lora", "--dropout", "0.1", "--output-dir", "x", *quick]) == 2
    assert "Delta-LoRA needs dropout 0" in capsys.readouterr().err and not (tmp_path / "x").exists()


# ---- the LLM trainer (tiny LLaMA) ------------------------------------------------------------------


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory) -> Path:
    return save_tiny_base(tmp_path_factory.mktemp("tiny-llama"))


def llm_args(base_dir: Path, out: Path, *extra: str) -> list[str]:
    return ["--base", str(base_dir), "--output-dir", str(out), "--batch-size", "2", "--train-size", "16", "--rank", "4", "--lr", "0.05",
            "--warmup-steps", "0", "--lr-schedule", "constant", "--max-length", "320", "--no-eval", "--checkpoint-every", "0", *extra]


def test_llm_delta_lora_resumes_exactly_and_reloads_exactly(base_dir, tmp_path, capsys):
    from llm.models import load_base
    from sbora.cli import parse

    options = ("--method", "delta-lora", "--delta-start", "1", "--delta-lambda", "0.5")
    # Straight through the Python API on a model we keep; interrupted and resumed through the CLI.
    trained, tokenizer = load_base(str(base_dir))
    cfg = parse(llm_train.COMMAND, llm_args(base_dir, tmp_path / "a", *options, "--steps", "5")).configs["config"]  # what the CLI reads
    llm_train.train(cfg, model=trained, tokenizer=tokenizer)
    assert llm_train.main(llm_args(base_dir, tmp_path / "b", *options, "--steps", "3")) == 0
    assert llm_train.main(llm_args(base_dir, tmp_path / "b", *options, "--steps", "5", "--resume")) == 0
    a, b = read_adapter(tmp_path / "a" / "adapter.safetensors"), read_adapter(tmp_path / "b" / "adapter.safetensors")
    assert a.tensors.keys() == b.tensors.keys() and all(torch.equal(a.tensors[k], b.tensors[k]) for k in a.tensors)
    assert a.config.delta and a.config.method == "lora" and a.extra["delta_lora"] == {"lambda": 0.5, "start_step": 1, "started": True}
    # Other procedure options than the checkpoint's are refused on resume.
    assert llm_train.main(llm_args(base_dir, tmp_path / "b", *options[:-1], "2", "--steps", "7", "--resume")) == 2
    assert "other settings (DeltaLoRA" in capsys.readouterr().err
    # The file alone gives the trained model's logits (up to round-off); the base alone differs.
    loaded, _ = load_base(str(base_dir))
    ids = torch.tensor([[5, 70, 71, 72, 73]])
    with torch.no_grad():
        base_logits = loaded(ids).logits
        load_adapter(loaded, tmp_path / "a" / "adapter.safetensors", name="arithmetic")
        assert_close_to_signal(loaded(ids).logits, trained(ids).logits)
        assert (base_logits - trained(ids).logits).abs().max() > 1e-3 * base_logits.abs().max()
    assert llm_train.main(llm_args(base_dir, tmp_path / "x", "--method", "delta-lora", "--dropout", "0.1", "--steps", "3")) == 2
    assert "Delta-LoRA needs dropout 0" in capsys.readouterr().err


def test_llm_cli_diffora_with_a_budget(base_dir, tmp_path, capsys):
    out = tmp_path / "s"
    assert llm_train.main(llm_args(base_dir, out, "--method", "sbora-fa", "--select", "diffora", "--select-warmup", "2",
                                   "--param-budget", "200", "--gate-lr", "0.1", "--steps", "4")) == 0
    captured = capsys.readouterr()
    summary = json.loads(captured.out[captured.out.index("{"):])
    assert "DiffoRA selection at step 2" in captured.err
    file = read_adapter(out / "adapter.safetensors")
    meta = file.extra["diffora"]
    assert meta["param_budget"] == 200 and meta["adapter_params"] <= 200 and meta["adapter_params_before"] == 2 * 4 * (32 + 16 + 16 + 32)
    assert summary["trainable_params"] == meta["adapter_params"] and summary["adapted_layers"] == len(file.modules) == len(meta["kept"])
    assert sorted(file.modules) == sorted(meta["kept"]) and set(meta["dropped"]).isdisjoint(file.modules)
    assert sum(t.numel() for k, t in file.tensors.items() if k.endswith(".B")) == meta["adapter_params"]
