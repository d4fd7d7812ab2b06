"""The prompt-following probes of the pocket base (issue #27): their readers, their controls, and the
shipped base's record recomputed on a small count."""

import json

import pytest

from sbora_diffusion.world import POCKET_SD_DIR
from sbora_diffusion.world import generator as g
from sbora_diffusion.world import pretrain as wp
from sbora_diffusion.world import probes

COUNTS = {"colour": 14, "side": 14, "shape": 12, "two_objects": 14}


def test_the_readers_read_the_worlds_own_renders():
    """The world's drawing of every ask scores 100% on every probe, and 0% on its control."""
    found = probes.run_probes(probes.render_drawer, COUNTS, first_seed=7_000_000)
    for name, result in found.items():
        assert result["images"] == COUNTS[name]
        assert result["rate"] == 1.0, (name, result)
        assert result["control"]["rate"] == 0.0, (name, result)


def _drawer_ignoring(attribute: str):
    """A base that draws every ask right except `attribute`, which it leaves fixed (red, the left, a circle, the order of mention)."""

    def draw(asks):
        fixed = []
        for a in asks:
            objects = a.objects
            if attribute == "colour":
                objects = tuple(("red", s, side) for _, s, side in objects)
            elif attribute == "side" and len(objects) == 1:
                objects = tuple((c, s, "left") for c, s, _ in objects)
            elif attribute == "side":
                objects = ((objects[0][0], objects[0][1], "left"), (objects[1][0], objects[1][1], "right"))
            elif attribute == "shape":
                objects = tuple((c, "circle", side) for c, _, side in objects)
            fixed.append(probes.Ask(a.prompt, a.seed, objects))
        return probes.render_drawer(fixed)

    return draw


def test_a_base_that_ignores_an_attribute_scores_chance():
    """What each probe's control is for: a base deaf to the attribute scores its chance, not more."""
    assert probes.run_probes(_drawer_ignoring("colour"), {"colour": 14}, 7_000_000)["colour"]["rate"] == pytest.approx(1 / 7)
    assert probes.run_probes(_drawer_ignoring("shape"), {"shape": 12}, 7_000_000)["shape"]["rate"] == pytest.approx(1 / 6)
    side = probes.run_probes(_drawer_ignoring("side"), {"side": 14, "two_objects": 14}, 7_000_000)
    assert side["side"]["rate"] == 0.5 and side["side"]["pairs_both_right"] == 0  # the swap: one of each pair, never both
    assert side["two_objects"]["rate"] == 0.5 and side["two_objects"]["control"]["rate"] == 0.5


def test_probe_prompts_and_pairs():
    side = probes.side_asks(4, 100)
    assert [a.prompt for a in side[:2]] == ["a red circle on the left, on a gray background", "a red circle on the right, on a gray background"]
    assert [a.seed for a in side] == [100, 100, 101, 101]  # both sides of a pair from one seed
    two = probes.two_object_asks(2, 5)
    assert two[0].prompt == "a red circle on the left and a green triangle on the right, on a gray background"
    assert two[1].prompt == "a red circle on the right and a green triangle on the left, on a gray background"
    assert probes.colour_asks(1, 0)[0].prompt == "a red circle on a gray background"
    assert f"plain-{probes.BACKGROUND}" in g.BACKGROUNDS and set(probes.CHROMATIC) <= set(g.COLOURS)  # words the world's captions use
    with pytest.raises(ValueError, match="unknown probe"):
        probes.run_probes(probes.render_drawer, {"texture": 4}, 0)
    with pytest.raises(ValueError, match="too few"):
        probes.run_probes(probes.render_drawer, {"side": 1}, 0)


def test_binomial_consistency():
    assert probes.binomial_consistent(6, 12, 0.5)
    assert not probes.binomial_consistent(0, 12, 0.9)  # a record of 90% is not what 0 of 12 shows
    assert not probes.binomial_consistent(12, 12, 0.2)
    assert probes.binomial_consistent(0, 12, 0.0) and not probes.binomial_consistent(1, 12, 0.0)
    assert probes.binomial_consistent(12, 12, 1.0) and not probes.binomial_consistent(11, 12, 1.0)


def _unet(first: int, cross: int):
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(first, 2 * first),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=cross, attention_head_dim=8, norm_num_groups=8,
    )


def test_slot_room_counts_the_slots_that_fit():
    """At rank 16, a 32-wide text embedding (cross-attention keys and values) holds two slots; 64-wide layers hold four."""
    from transformers import CLIPTextConfig, CLIPTextModel

    def text(width):
        return CLIPTextModel(CLIPTextConfig(vocab_size=100, hidden_size=width, intermediate_size=2 * width, num_hidden_layers=1,
                                            num_attention_heads=4, max_position_embeddings=16))

    narrow = probes.slot_room(_unet(48, 32), text(32))
    assert narrow["concepts"] == 2 and "attn2.to_k: slot 2 with rank 16 needs 48 input indices but the layer has 32" in narrow["limit"]
    assert narrow["per_method"]["sbora-fa"] == {"unet": 2, "text_encoder": 2}
    assert narrow["per_method"]["sbora-fb"] == {"unet": 3, "text_encoder": 2}  # rows: the 48-wide outputs
    wide = probes.slot_room(_unet(64, 64), text(64))
    assert wide["concepts"] == 4 and set(wide["per_method"]) == {"sbora-fa", "sbora-fb", "ortho"}


def test_the_shipped_base_measures_what_its_record_says():
    """The probes on 12-14 images each (seeds the record did not use), at the record's steps and guidance: every hit count
    lies inside the 99.9% binomial range of the recorded rate, and the room for concepts is the recorded one."""
    record = json.loads((POCKET_SD_DIR / wp.RECORD_NAME).read_text())["measurements"]
    pipe = wp.load_pocket_sd(POCKET_SD_DIR)
    some = record["probes"]["colour"]
    found = probes.run_probes(probes.pipeline_drawer(pipe, some["steps"], some["guidance_scale"]), COUNTS, first_seed=2_000_000)
    for name, result in found.items():
        recorded = record["probes"][name]
        assert probes.binomial_consistent(result["hits"], result["images"], recorded["rate"]), (name, result["hits"], recorded["rate"])
    assert probes.slot_room(pipe.unet, pipe.text_encoder)["concepts"] == record["slots"]["concepts"]


def test_records_hold_no_path_of_this_machine():
    for folder in (POCKET_SD_DIR, POCKET_SD_DIR.parent / "pocket-clip"):
        text = (folder / wp.RECORD_NAME).read_text()
        assert str(wp.REPO_ROOT) not in text and '"/tmp' not in text and " /tmp" not in text, folder


def test_the_probes_run_inside_the_pretraining_measure():
    """measure_base puts every probe and the slot count side by side, with the sampling settings."""
    pipe = wp.load_pocket_sd(POCKET_SD_DIR)
    found = wp.measure_base(pipe, images=2, steps=2, guidance=5.0, first_seed=0)
    assert set(found["probes"]) == set(probes.PROBES) and found["slots"]["rank"] == 16
    assert all(r["steps"] == 2 and r["images"] == 2 for r in found["probes"].values())
    assert set(probes.unmet_targets(found)) <= set(probes.TARGETS)
