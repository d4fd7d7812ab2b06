"""SBoRA index layouts and the slot check (docs/architecture.md §3-4, issue #25).

Slot k at rank r holds positions k·r…(k+1)·r−1 of a per-layer permutation: the ``scattered``
layout (version 1, every file written before layouts were recorded) permutes single indices,
the ``blocks`` layout (version 2, the default) permutes 16-wide blocks, so a slot's columns are
runs and a merge writes ⌈r/16⌉ cache lines per row. Equal ranks in different slots are disjoint
under both; different ranks or layouts may overlap, and compositions refuse those before sampling.
"""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from sbora.adapters import METHODS, AdapterConfig, inject, merge, read_adapter, save_adapter, unmerge
from sbora.adapters.base import BLOCK, cache_lines, index_runs, layer_generator, slot_indices
from sbora.adapters.slots import SlotLayout, slot_clash, slot_clashes
from sbora.adapters.io import slot_layouts
from sbora.adapters.ortho import orthogonal_rows
from sbora_diffusion.concept.train import train
from sbora_diffusion.concept.config import ConceptConfig
from sbora.configuration import ConfigError

from concept_helpers import photos, quick_config

pytestmark = pytest.mark.numeric  # also run under other CPU kernels and 2 threads (make test-cpus, .ci/run)

LAYOUTS = ("scattered", "blocks")
DIMS = (16, 33, 48, 96, 320)


def indices(method="sbora-fa", rank=4, slot=0, seed=0, layout="blocks", dim=96, path="down.attn1.to_q"):
    return slot_indices(AdapterConfig(method=method, rank=rank, slot=slot, seed=seed, layout=layout), dim, path, "input")


# ------------------------------------------------------------------------------- the layouts


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dim", DIMS)
def test_equal_rank_slots_are_disjoint_and_cover_the_layer(layout, dim):
    for rank in (1, 3, 4, 8, 12, 16, 32, 64):
        slots = [indices(rank=rank, slot=k, layout=layout, dim=dim) for k in range(dim // rank)]
        if not slots:
            continue
        allowed = torch.cat(slots)
        assert allowed.unique().numel() == allowed.numel() == rank * (dim // rank), (layout, dim, rank)
        assert allowed.min() >= 0 and allowed.max() < dim
        assert all(torch.equal(s, s.sort().values) for s in slots)


def test_scattered_is_the_legacy_permutation_of_single_indices():
    """Files older than layouts hold these indices: the scattered layout must re-derive them exactly."""
    for seed, path, dim, rank, slot in [(0, "a.to_q", 320, 16, 1), (3, "up.attn2.to_out.0", 96, 4, 5), (7, "x", 33, 8, 3)]:
        legacy = torch.randperm(dim, generator=layer_generator(seed, path, "input"))[slot * rank : (slot + 1) * rank].sort().values
        assert torch.equal(indices(rank=rank, slot=slot, seed=seed, layout="scattered", dim=dim, path=path), legacy)


@pytest.mark.parametrize("dim", (320, 640, 1280, 96))
def test_blocks_layout_touches_the_fewest_cache_lines(dim):
    for rank in (1, 2, 4, 8, 16, 32, 64):
        for slot in range(min(4, dim // rank)):
            I = indices(rank=rank, slot=slot, dim=dim)
            assert cache_lines(I, dim) == -(-rank // BLOCK)  # ⌈r/16⌉ lines of 16 floats per row
            assert len(index_runs(I)) <= max(1, rank // BLOCK)
    # The scattered layout touches nearly one line per index (up to r of the row's dim/16 lines).
    assert cache_lines(indices(rank=16, slot=1, layout="scattered", dim=dim), dim) >= min(9, dim // BLOCK - 1)


def test_blocks_of_a_width_16_does_not_divide_end_in_a_short_block():
    allowed = torch.cat([indices(rank=11, slot=k, dim=33) for k in range(3)])
    assert sorted(allowed.tolist()) == list(range(33))
    assert len(index_runs(indices(rank=33, slot=0, dim=33))) == 1  # every block, in any order, sorted back together


def test_layouts_are_seeded_per_layer_and_differ_between_layers_and_seeds():
    a = indices(rank=16, path="down.0.attn1.to_q", dim=320)
    assert torch.equal(a, indices(rank=16, path="down.0.attn1.to_q", dim=320))
    assert not torch.equal(a, indices(rank=16, path="down.0.attn1.to_k", dim=320))
    assert not torch.equal(a, indices(rank=16, path="down.0.attn1.to_q", seed=1, dim=320))
    firsts = {int(indices(rank=16, path=f"block.{i}.to_q", dim=320)[0]) for i in range(40)}
    assert len(firsts) > 8 and all(f % BLOCK == 0 for f in firsts)  # whole blocks, chosen at random per layer


LAYOUT_SCRIPT = """
import json, sys
from sbora.adapters import AdapterConfig
from sbora.adapters.base import slot_indices
out = {}
for layout in ("scattered", "blocks"):
    for method, role in (("sbora-fa", "input"), ("sbora-fb", "output")):
        for seed, path, dim, rank, slot in [(0, "a.to_q", 320, 16, 1), (5, "mid.attn2.to_out.0", 1280, 64, 3), (2, "x", 33, 4, 7)]:
            c = AdapterConfig(method=method, rank=rank, slot=slot, seed=seed, layout=layout)
            out[f"{layout}/{method}/{seed}/{path}/{dim}/{rank}/{slot}"] = slot_indices(c, dim, path, role).tolist()
json.dump(out, sys.stdout)
"""


def _layouts_here() -> dict:
    out = {}
    for layout in LAYOUTS:
        for method, role in (("sbora-fa", "input"), ("sbora-fb", "output")):
            for seed, path, dim, rank, slot in [(0, "a.to_q", 320, 16, 1), (5, "mid.attn2.to_out.0", 1280, 64, 3), (2, "x", 33, 4, 7)]:
                c = AdapterConfig(method=method, rank=rank, slot=slot, seed=seed, layout=layout)
                out[f"{layout}/{method}/{seed}/{path}/{dim}/{rank}/{slot}"] = slot_indices(c, dim, path, role).tolist()
    return out


@pytest.mark.parametrize("capability", [None, "default"])
def test_layout_is_identical_in_another_process(capability):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    if capability:
        env["ATEN_CPU_CAPABILITY"] = capability
    run = subprocess.run([sys.executable, "-c", LAYOUT_SCRIPT], capture_output=True, text=True, env=env, timeout=300,
                         cwd=Path(__file__).resolve().parents[1])
    assert run.returncode == 0, run.stderr
    assert json.loads(run.stdout) == _layouts_here()


def test_the_default_layout_is_the_papers_and_files_record_the_one_in_effect(tiny_model, tmp_path):
    """Scattered (the SBoRA paper's random indices) unless a config asks for blocks (the fast hot-swap layout)."""
    assert AdapterConfig(method="sbora-fa").index_layout == "scattered" and AdapterConfig(method="sbora-fb").index_layout == "scattered"
    assert AdapterConfig(method="sbora-fa", layout="blocks").index_layout == "blocks"
    for method in ("sbora-fa", "sbora-fb"):
        assert torch.equal(indices(method=method, layout=None, rank=8), indices(method=method, layout="scattered", rank=8))
    for method, layout, version in (("sbora-fa", "blocks", "2"), ("sbora-fb", None, "1")):
        with safe_open(str(_saved(tiny_model, tmp_path, method, method=method, rank=4, **({"layout": layout} if layout else {}))), framework="pt") as f:
            meta = f.metadata()
        assert json.loads(meta["config"])["layout"] == (layout or "scattered") and meta["layout_version"] == version


def test_unknown_layout_is_a_config_error():
    with pytest.raises(ConfigError, match="unknown index layout 'stripes'.*scattered, blocks"):
        AdapterConfig(layout="stripes").validate()


# ---------------------------------------------------------------------------- merge by runs


def _core(method, layout, rank, slot=0, d_in=96, d_out=80, seed=0):
    core = METHODS[method](d_in, d_out, AdapterConfig(method=method, rank=rank, slot=slot, layout=layout), "blk.to_q")
    with torch.no_grad():
        for p in core.parameters():
            p.copy_(torch.randn(p.shape, generator=torch.Generator().manual_seed(seed)))
    return core


@pytest.mark.parametrize("method", ["sbora-fa", "sbora-fb"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_merge_by_runs_equals_the_indexed_merge_and_unmerge_restores_bit_exactly(method, dtype):
    for rank in (4, 12, 16, 32):
        core = _core(method, "blocks", rank, slot=1)
        W0 = torch.randn(80, 96, generator=torch.Generator().manual_seed(3)).to(dtype)
        assert core._runs(W0) is not None  # blocks: few runs, the sliced path
        indexed = W0.clone()
        core._runs = lambda W: None  # the indexed path (index_select / index_copy_) of scattered indices
        core.merge_into(indexed, 0.7)
        del core._runs
        W = W0.clone()
        core.merge_into(W, 0.7)
        # The same sums; an element may round differently (fmadd in float32, or a bf16 product then a bf16 sum): an ulp or so.
        assert torch.allclose(W.float(), indexed.float(), rtol=1e-6, atol=1e-6) if dtype == torch.float32 else \
            ((W.float() - indexed.float()).abs() <= 2**-7 * (W0.float().abs() + W.float().abs() + 1)).all()
        untouched = torch.ones_like(W, dtype=torch.bool).index_fill_(core.axis, core.indices, False)
        assert torch.equal(W[untouched], W0[untouched])
        core.unmerge_from(W, 0.7)
        assert torch.equal(W, W0)
    scattered = _core(method, "scattered", 16, slot=1)
    assert scattered._runs(W0) is None  # single indices: index_select / index_copy_


@pytest.mark.parametrize("method", ["sbora-fa", "sbora-fb"])
def test_stacked_merges_by_runs_unmerge_in_any_order(method):
    a, b = _core(method, "blocks", 16, slot=0, seed=1), _core(method, "blocks", 4, slot=1, seed=2)  # overlapping: rank-4 slot 1 is in a's block
    W0 = torch.randn(80, 96, generator=torch.Generator().manual_seed(4))
    W = W0.clone()
    a.merge_into(W, 1.0)
    b.merge_into(W, 0.5)
    a.unmerge_from(W, 1.0)  # b changed a's columns since: a subtracts its update instead of restoring
    b.unmerge_from(W, 0.5)
    assert torch.allclose(W, W0, atol=1e-6)


def test_model_merge_with_the_blocks_layout_matches_the_unmerged_forward(tiny_model, tiny_input):
    for method in ("sbora-fa", "sbora-fb"):
        model = copy.deepcopy(tiny_model)
        before = {k: v.clone() for k, v in model.state_dict().items()}
        inject(model, AdapterConfig(method=method, rank=8, slot=1, layout="blocks", targets=["to_q", "to_v", "to_out.0"]))
        with torch.no_grad():
            for n, p in model.named_parameters():
                if ".cores." in n:
                    p.normal_(generator=torch.Generator().manual_seed(len(n)))
        y = model(tiny_input)
        merge(model, "default")
        assert torch.allclose(model(tiny_input), y, atol=1e-5)
        unmerge(model, "default")
        after = {k.replace(".base_layer.", "."): v for k, v in model.state_dict().items() if ".cores." not in k}
        assert after.keys() == before.keys() and all(torch.equal(after[k], v) for k, v in before.items())


# ------------------------------------------------------------------------------- files


def _saved(tiny_model, tmp_path, name, **config) -> Path:
    model = copy.deepcopy(tiny_model)
    inject(model, AdapterConfig(targets=["to_q", "to_v"], **config))
    return save_adapter(model, tmp_path / f"{name}.safetensors")


def _as_legacy(src: Path, dst: Path) -> Path:
    """`src` as a file written before layouts were recorded: no layout in its config, no layout_version."""
    with safe_open(str(src), framework="pt") as f:
        meta, tensors = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
    config = json.loads(meta["config"])
    del config["layout"], meta["layout_version"]
    save_file(tensors, str(dst), metadata={**meta, "config": json.dumps(config)})
    return dst


def test_files_record_the_slot_layout_and_old_files_read_as_scattered(tiny_model, tmp_path):
    new = _saved(tiny_model, tmp_path, "new", method="sbora-fa", rank=4, slot=2, seed=3, layout="blocks")
    with safe_open(str(new), framework="pt") as f:
        meta = f.metadata()
    assert json.loads(meta["config"])["layout"] == "blocks" and meta["layout_version"] == "2"
    (layout,) = slot_layouts(new)
    assert (layout.method, layout.rank, layout.slot, layout.seed, layout.layout) == ("sbora-fa", 4, 2, 3, "blocks")
    assert layout.modules == frozenset(read_adapter(new).modules) and len(layout.modules) == 4

    old = _as_legacy(_saved(tiny_model, tmp_path, "scattered", method="sbora-fa", rank=4, slot=2, seed=3, layout="scattered"),
                     tmp_path / "old.safetensors")
    assert read_adapter(old).config.layout == "scattered" and slot_layouts(old)[0].layout == "scattered"
    model = copy.deepcopy(tiny_model)
    from sbora.adapters import load_adapter

    load_adapter(model, old)  # its saved indices load, whatever today's default layout
    core = model.blocks[0].to_q.cores["default"]
    assert core.config.layout == "scattered" and torch.equal(core.indices, read_adapter(old).tensors["blocks.0.to_q.indices"])


def test_lora_files_have_no_slots(tiny_model, tmp_path):
    assert slot_layouts(_saved(tiny_model, tmp_path, "lora", method="lora", rank=4)) == [
        SlotLayout(str(tmp_path / "lora.safetensors"), "lora", 4, 0, 0, "scattered", frozenset(read_adapter(tmp_path / "lora.safetensors").modules))]
    assert slot_clashes(slot_layouts(tmp_path / "lora.safetensors"), slot_layouts(tmp_path / "lora.safetensors")) == []  # no slots


# --------------------------------------------------------------------------- the slot check


def S(method="sbora-fa", rank=4, slot=0, seed=0, layout="blocks", source="b", modules=frozenset()):
    return SlotLayout(source, method, rank, slot, seed, layout, modules)


@pytest.mark.parametrize("method", ["sbora-fa", "sbora-fb", "ortho"])
def test_slot_clash_follows_positions_ranks_seeds_and_layouts(method):
    m = dict(method=method)
    assert slot_clash(S(**m, rank=8, slot=0, source="a"), S(**m, rank=4, slot=1)) is not None  # 4..7 inside 0..7
    assert slot_clash(S(**m, rank=8, slot=0, source="a"), S(**m, rank=4, slot=2)) is None  # 8..11 after 0..7
    assert slot_clash(S(**m, rank=4, slot=1, source="a"), S(**m, rank=4, slot=1)) is not None  # the same slot twice
    assert slot_clash(S(**m, rank=4, slot=0, source="a"), S(**m, rank=4, slot=1)) is None
    assert slot_clash(S(**m, rank=8, slot=0, source="a"), S(**m, rank=4, slot=1, seed=1)) is None  # another seed: overlap's report
    assert slot_clash(S(**m, rank=4, slot=0, source="a", modules=frozenset({"x"})), S(**m, rank=4, slot=0, modules=frozenset({"y"}))) is None
    other = "sbora-fb" if method == "sbora-fa" else "sbora-fa"
    assert slot_clash(S(**m, source="a"), S(method=other)) is None  # different sides: not one partition
    assert slot_clash(S(method="lora", source="a"), S(method="lora")) is None  # no slots
    mixed = slot_clash(S(**m, rank=4, slot=0, source="a", layout="scattered"), S(**m, rank=4, slot=1))
    assert (mixed is not None) == (method != "ortho")  # ortho's basis does not depend on the layout


def test_slot_clash_message_names_both_files_and_a_free_slot():
    message = slot_clash(S(rank=8, slot=0, source="'robot' (r.safetensors)"), S(rank=4, slot=1, source="'duck' (d.safetensors)"))
    assert "'robot' (r.safetensors) (sbora-fa rank 8 slot 0, seed 0, layout blocks (v2))" in message
    assert "'duck' (d.safetensors) (sbora-fa rank 4 slot 1" in message and "0…7 and 4…7 share 4 per layer" in message
    assert "retrain 'duck' (d.safetensors) with --slot 2 (rank 4), or with --rank 8 --slot 1" in message
    layouts = slot_clash(S(source="old", layout="scattered"), S(slot=1, source="new"))
    assert "different index layouts (scattered v1 and blocks v2)" in layouts and "retrain new with --layout scattered --slot 1" in layouts
    taken = [S(rank=8, slot=0, source="a"), S(rank=4, slot=2, source="c")]
    (msg,) = slot_clashes(taken, [S(rank=4, slot=0)])
    assert "with --slot 3 (rank 4)" in msg  # past both loaded adapters


@pytest.mark.parametrize("layout", LAYOUTS)
def test_slot_clash_predicts_the_real_index_overlap(layout):
    """The check from metadata agrees with the index sets themselves, per layer and pair."""
    cases = [(r1, k1, r2, k2) for r1 in (4, 8, 16) for k1 in range(4) for r2 in (4, 8, 16) for k2 in range(4)]
    for method, role in (("sbora-fa", "input"), ("sbora-fb", "output")):
        for r1, k1, r2, k2 in cases:
            clash = slot_clash(S(method=method, rank=r1, slot=k1, layout=layout, source="a"), S(method=method, rank=r2, slot=k2, layout=layout))
            shared = [int(torch.isin(slot_indices(AdapterConfig(method=method, rank=r1, slot=k1, layout=layout), d, p, role),
                                     slot_indices(AdapterConfig(method=method, rank=r2, slot=k2, layout=layout), d, p, role)).sum())
                      for d, p in ((96, "a.to_q"), (320, "b.to_out.0"))]
            assert (clash is not None) == all(s > 0 for s in shared) and (clash is None) == all(s == 0 for s in shared), (method, r1, k1, r2, k2)


def test_orthogonal_slots_of_mixed_ranks_overlap_exactly_when_the_check_says_so():
    for r1, k1, r2, k2 in [(8, 0, 4, 1), (8, 0, 4, 2), (4, 3, 16, 0), (4, 4, 16, 0), (16, 1, 8, 3), (16, 1, 8, 4)]:
        A1 = orthogonal_rows(AdapterConfig(method="ortho", rank=r1, slot=k1), 100, "a.to_q")
        A2 = orthogonal_rows(AdapterConfig(method="ortho", rank=r2, slot=k2), 100, "a.to_q")
        overlap = (A1 @ A2.T).abs().max().item()
        clash = slot_clash(S(method="ortho", rank=r1, slot=k1, source="a"), S(method="ortho", rank=r2, slot=k2))
        assert (overlap > 0.999) if clash else (overlap < 1e-5), (r1, k1, r2, k2, overlap)


# ----------------------------------------------------------------------- compositions refuse


def tiny_concept(pipe, outputs: Path, name: str, rank: int, slot: int, layout: str = "blocks", legacy: bool = False) -> Path:
    """A two-step concept (as ``concept_helpers.train_tiny_concept``) with the given rank, slot and layout."""
    concept = ConceptConfig(name=name, instance_dir=str(photos(outputs.parent / "photos" / name, "alpha")), token=f"<{name}1>",
                            class_word="toy", validation_prompts=["a photo of {token} {class_word}"])
    path = train(concept, "sbora-fa", train_config=quick_config(outputs / name / "sbora-fa"), pipe=copy.deepcopy(pipe),
                 adapter_overrides={"rank": rank, "slot": slot, "layout": layout}).adapter_path
    if legacy:
        _as_legacy(path, path.with_suffix(".tmp"))
        path.with_suffix(".tmp").replace(path)
    return path


@pytest.fixture(scope="module")
def mixed(tiny_pipe, tmp_path_factory):
    """Concepts of mixed ranks, slots and layouts on the tiny pipeline (seed 0, SBoRA-FA)."""
    root = tmp_path_factory.mktemp("slots") / "outputs"
    specs = {"r8s0": (8, 0, "blocks", False), "r4s1": (4, 1, "blocks", False), "r4s2": (4, 2, "blocks", False),
             "old0": (4, 0, "scattered", True), "old1": (4, 1, "scattered", True)}
    return {name: tiny_concept(tiny_pipe, root, name, *spec) for name, spec in specs.items()}


def test_composer_refuses_concepts_whose_slots_meet_before_changing_the_pipeline(tiny_pipe, mixed):
    from sbora.adapters import adapter_names
    from sbora_diffusion.compose import Composer, CompositionError

    composer = Composer(copy.deepcopy(tiny_pipe))
    composer.load(mixed["r8s0"])
    state = adapter_names(composer.pipe.unet)
    with pytest.raises(CompositionError, match=r"(?s)concept 'r4s1' cannot join.*'r8s0' \(.*r8s0.*\) \(sbora-fa rank 8 slot 0.*"
                                               r"'r4s1' \(.*r4s1.*\) \(sbora-fa rank 4 slot 1.*share 4 per layer.*--slot 2 \(rank 4\)"):
        composer.load(mixed["r4s1"])
    assert adapter_names(composer.pipe.unet) == state and "r4s1" not in composer.concepts
    composer.load(mixed["r4s2"])  # positions 8..11 lie after rank 8's slot 0: composes
    with pytest.raises(CompositionError, match="different index layouts.*--layout blocks"):
        composer.load(mixed["old1"])
    composer.load(mixed["r4s1"], allow_overlap=True)  # asked for: loads, and the overlap report shows the shared columns
    assert composer.overlap(["r8s0", "r4s1"]).pairs()[0]["shared_indices"] > 0
    # Old files (no layout recorded) still compose with each other.
    old = Composer(copy.deepcopy(tiny_pipe))
    old.load(mixed["old0"])
    old.load(mixed["old1"])
    assert all(r["shared_indices"] == 0 for r in old.overlap().rows)


def test_llm_compose_refuses_meeting_slots_before_loading_any_model(tiny_model, tmp_path):
    from llm.compose import ComposeConfig, check_slots, compose

    a = _saved(tiny_model, tmp_path, "a", method="sbora-fb", rank=8, slot=0)
    b = _saved(tiny_model, tmp_path, "b", method="sbora-fb", rank=4, slot=1)
    c = _saved(tiny_model, tmp_path, "c", method="sbora-fb", rank=4, slot=2)
    with pytest.raises(ConfigError, match=f"(?s){a}.*rank 8 slot 0.*{b}.*rank 4 slot 1.*output rows.*--slot 3 \\(rank 4\\)"):
        compose(ComposeConfig(model=str(tmp_path / "no-such-base"), adapter=[str(a), str(c), str(b)]))
    check_slots([str(a), str(c)])
    check_slots([str(a), str(b)], allow_overlap=True)
