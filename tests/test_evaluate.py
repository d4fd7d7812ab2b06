"""CLIP scoring (sbora_diffusion.clip_score) and its command line (sbora_diffusion.evaluate).

A small random-init open_clip model is built offline from a JSON architecture file and saved
as safetensors, so every test goes through the same loading path as real weights
(``--clip-model FILE.json --clip-weights FILE.safetensors``).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from sbora_diffusion import clip_score, evaluate
from sbora_diffusion.clip_score import ClipScoreError

@pytest.fixture(scope="module")
def scorer(tiny_clip_files) -> clip_score.ClipScorer:
    arch, weights = tiny_clip_files
    return clip_score.load_clip(str(arch), pretrained=None, weights=weights, device="cpu", batch_size=3)


def clip_args(tiny_clip_files) -> list[str]:
    arch, weights = tiny_clip_files
    return ["--clip-model", str(arch), "--clip-pretrained", "none", "--clip-weights", str(weights), "--device", "cpu"]


def save_image(path: Path, seed: int, size: int = 40) -> Path:
    rng = np.random.default_rng(seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(path)
    return path


def write_manifest(folder: Path, rows: list[dict]) -> Path:
    path = folder / "manifest.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture
def generated(tmp_path) -> Path:
    """Four images of concept <dog1> (class word dog) with their manifest."""
    folder = tmp_path / "images"
    prompts = ["a <dog1> on the beach", "a <dog1> in the snow"]
    rows = []
    for i in range(4):
        save_image(folder / f"{i:03d}.png", seed=i)
        rows.append({"image": f"{i:03d}.png", "prompt": prompts[i % 2], "seed": i // 2, "concept": "dog", "method": "sbora-fa", "token": "<dog1>", "class_word": "dog"})
    write_manifest(folder, rows)
    return folder


@pytest.fixture
def reference(tmp_path, generated) -> Path:
    """Reference photos: a copy of generated image 000 plus one other image."""
    folder = tmp_path / "reference"
    folder.mkdir()
    (folder / "a.png").write_bytes((generated / "000.png").read_bytes())
    save_image(folder / "b.jpg", seed=99)
    (folder / "notes.txt").write_text("not an image, ignored")
    return folder


def test_image_against_itself_scores_one_and_all_scores_in_range(scorer, generated, tmp_path):
    refdir = tmp_path / "self"
    refdir.mkdir()
    (refdir / "only.png").write_bytes((generated / "000.png").read_bytes())
    entries = clip_score.read_manifest(generated / "manifest.jsonl")
    report = clip_score.score(scorer, entries, refdir)
    rows = report["images"]
    assert rows[0]["clip_i_cosine"] == pytest.approx(1.0, abs=1e-5)
    assert all(r["clip_i_cosine"] < 0.9999 for r in rows[1:])  # other images are not the reference
    for r in rows:
        assert -1.0 <= r["clip_t_cosine"] <= 1.0 and -1.0 <= r["clip_i_cosine"] <= 1.0
        assert r["clip_t_mixofshow"] == pytest.approx(2.5 * max(r["clip_t_cosine"], 0.0))
        assert 0.0 <= r["clip_t_mixofshow"] <= 2.5
    summary = report["summary"]
    assert summary["num_images"] == 4 and summary["num_references"] == 1
    assert summary["clip_t_cosine"] == pytest.approx(np.mean([r["clip_t_cosine"] for r in rows]))
    assert summary["clip_i_cosine"] == pytest.approx(np.mean([r["clip_i_cosine"] for r in rows]))
    assert set(report["labels"]) == {"clip_t_cosine", "clip_t_mixofshow", "clip_i_cosine"}


def test_clip_i_is_the_mean_over_all_pairs_and_scores_are_deterministic(scorer, tiny_clip_files, generated, reference, tmp_path):
    entries = clip_score.read_manifest(generated / "manifest.jsonl")
    cache = tmp_path / "cache"
    first = clip_score.score(scorer, entries, reference, cache_dir=cache)
    # Mean over all (generated, reference) pairs, computed here pair by pair.
    gen = scorer.encode_images([e.image for e in entries])  # (4, D)
    refs = scorer.encode_images(clip_score.reference_images(reference))  # (2, D): the .txt is ignored
    assert refs.shape[0] == 2
    pairs = [float(g @ r) for g in gen for r in refs]
    assert first["summary"]["clip_i_cosine"] == pytest.approx(np.mean(pairs), abs=1e-6)
    # A fresh scorer (same weights) reads the reference embeddings from the disk cache and agrees exactly.
    assert len(list(cache.glob("reference-*.safetensors"))) == 1
    arch, weights = tiny_clip_files
    fresh = clip_score.load_clip(str(arch), pretrained=None, weights=weights, device="cpu", batch_size=3)
    encoded = []
    original = fresh.encode_images
    fresh.encode_images = lambda paths, desc="": encoded.append(desc) or original(paths, desc)
    assert clip_score.score(fresh, entries, reference, cache_dir=cache) == first
    assert encoded == ["encode generated images"]  # the references came from the cache
    # A broken cache entry is re-encoded, not trusted.
    cached = next(cache.glob("reference-*.safetensors"))
    cached.write_bytes(b"garbage")
    fresh = clip_score.load_clip(str(arch), pretrained=None, weights=weights, device="cpu", batch_size=3)
    assert clip_score.score(fresh, entries, reference, cache_dir=cache) == first
    # A changed reference folder is a new cache entry, not a stale hit.
    save_image(reference / "c.png", seed=7)
    third = clip_score.score(fresh, entries, reference, cache_dir=cache)
    assert third["summary"]["num_references"] == 3 and len(list(cache.glob("reference-*.safetensors"))) == 2


def test_token_replacement_is_exact(scorer, generated):
    assert clip_score.replace_tokens("a <dog1> and a <dog10>", {"<dog1>": "dog", "<dog10>": "puppy"}) == "a dog and a puppy"
    assert clip_score.replace_tokens("a <dog1>", {}) == "a <dog1>"
    assert clip_score.parse_replacements(["<dog1>=corgi dog", "sks=dog"]) == {"<dog1>": "corgi dog", "sks": "dog"}
    entries = clip_score.read_manifest(generated / "manifest.jsonl")
    # From the manifest's token/class_word, with Mix-of-Show's prefix:
    report = clip_score.score(scorer, entries[:2])
    assert [r["text"] for r in report["images"]] == ["A photo depicts a dog on the beach", "A photo depicts a dog in the snow"]
    # Explicit rules win over the manifest's; the prefix is configurable.
    report = clip_score.score(scorer, entries[:2], replacements={"<dog1>": "corgi"}, text_prefix="")
    assert [r["text"] for r in report["images"]] == ["a corgi on the beach", "a corgi in the snow"]
    # CLIP-T is the cosine with exactly that text.
    img = scorer.encode_images([entries[0].image])
    txt = scorer.encode_texts(["a corgi on the beach"])
    assert report["images"][0]["clip_t_cosine"] == pytest.approx(float(img[0] @ txt[0]), abs=1e-6)


def test_drift_of_base_against_itself_is_zero(scorer, generated, tmp_path):
    base = clip_score.read_manifest(generated / "manifest.jsonl")
    same = clip_score.drift(scorer, base, base)
    assert same["summary"]["num_pairs"] == 4
    assert same["summary"]["drift"] == pytest.approx(0.0, abs=1e-6)
    assert same["summary"]["drift_cosine"] == pytest.approx(1.0, abs=1e-6)
    # Different images at the same (prompt, seed) drift; pairing is by (prompt, seed), not by order.
    moved = tmp_path / "adapted"
    rows = [json.loads(line) for line in (generated / "manifest.jsonl").read_text().splitlines()]
    for i, row in enumerate(reversed(rows)):
        save_image(moved / row["image"], seed=100 + i)
    write_manifest(moved, list(reversed(rows)))
    report = clip_score.drift(scorer, base, clip_score.read_manifest(moved / "manifest.jsonl"))
    assert report["summary"]["drift"] > 1e-3
    for r in report["images"]:
        assert r["base_image"] == r["adapted_image"] and r["drift"] == pytest.approx(1 - r["drift_cosine"])
    with pytest.raises(ClipScoreError, match="no \\(prompt, seed\\) pair"):
        clip_score.drift(scorer, base, [clip_score.ManifestEntry(image=base[0].image, prompt="other", seed=0)])


def test_score_command_writes_json_and_csv(tiny_clip_files, generated, reference, tmp_path, capsys):
    out = tmp_path / "out" / "scores.json"
    assert 0 == evaluate.main(["score", "--images", str(generated), "--reference", str(reference), "--replace", "<dog1>=corgi",
                   "--output", str(out), "--cache-dir", str(tmp_path / "cache"), *clip_args(tiny_clip_files)])
    data = json.loads(out.read_text())
    assert data["summary"]["num_images"] == 4 and data["summary"]["num_references"] == 2
    assert data["images"][0]["text"] == "A photo depicts a corgi on the beach"
    assert data["settings"]["replacements"] == {"<dog1>": "corgi"}
    csv_lines = out.with_suffix(".csv").read_text().splitlines()
    assert len(csv_lines) == 5 and "clip_t_mixofshow" in csv_lines[0] and "clip_i_cosine" in csv_lines[0]
    assert "clip_i_cosine" in capsys.readouterr().out
    # The drift command on the same folder twice: zero.
    assert 0 == evaluate.main(["drift", "--base", str(generated), "--adapted", str(generated), "--output", str(tmp_path / "drift.json"), *clip_args(tiny_clip_files)])
    assert json.loads((tmp_path / "drift.json").read_text())["summary"]["drift"] == pytest.approx(0.0, abs=1e-6)


@pytest.mark.parametrize(
    "line, message",
    [
        ("{not json", "line 2 is not valid JSON"),
        (json.dumps({"image": "000.png"}), "lacks a string 'prompt'"),
        (json.dumps(["000.png", "a dog"]), "must be a JSON object"),
        (json.dumps({"image": "000.png", "prompt": "a dog", "seed": "one"}), "'seed' must be an integer"),
        (json.dumps({"image": "gone.png", "prompt": "a dog"}), "'gone.png'.*does not exist"),
    ],
)
def test_bad_manifest_or_missing_image_is_a_clear_error(generated, line, message):
    manifest = generated / "manifest.jsonl"
    manifest.write_text(manifest.read_text().splitlines()[0] + "\n" + line + "\n")
    with pytest.raises(ClipScoreError, match=message):
        clip_score.read_manifest(manifest)


def test_bad_inputs_on_the_command_line_fail_cleanly(tiny_clip_files, generated, tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "readme.txt").write_text("no photos here")
    out = tmp_path / "scores.json"
    cases = [
        (["--images", str(generated), "--reference", str(empty)], "no images in"),
        (["--images", str(generated), "--reference", str(tmp_path / "nowhere")], "does not exist"),
        (["--images", str(tmp_path)], "no manifest at"),
        (["--images", str(generated), "--replace", "no-equals-sign"], "TOKEN=WORD"),
        (["--images", str(generated), "--token", "<dog1>"], "--token and --class-word go together"),
    ]
    for argv, message in cases:
        assert evaluate.main(["score", *argv, "--output", str(out), *clip_args(tiny_clip_files)]) == 2
        assert message in capsys.readouterr().err
        assert not out.exists()  # nothing half-written
    (generated / "001.png").write_text("not a png")
    assert evaluate.main(["score", "--images", str(generated), "--output", str(out), *clip_args(tiny_clip_files)]) == 2
    assert "cannot read image" in capsys.readouterr().err and not out.exists()
    with pytest.raises(ClipScoreError, match="no manifest"):
        clip_score.read_manifest(tmp_path / "missing.jsonl")
    (tmp_path / "blank.jsonl").write_text("\n")
    with pytest.raises(ClipScoreError, match="lists no images"):
        clip_score.read_manifest(tmp_path / "blank.jsonl")


def test_clip_weights_load_safely_or_fail_clearly(tiny_clip_files, tmp_path, monkeypatch):
    import huggingface_hub.constants

    arch, weights = tiny_clip_files
    # The paper's model with nothing cached and no network: a fast, clear error (no download attempt).
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hf-cache"))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(ClipScoreError, match="--clip-weights PATH"):
        clip_score.load_clip("ViT-B-32", "openai")
    assert clip_score.DEFAULT_CLIP_MODEL == "pocket"  # the offline default needs no download
    with monkeypatch.context() as m:  # a missing pocket CLIP says how to get it back
        m.setattr("sbora_diffusion.world.POCKET_CLIP_DIR", tmp_path / "gone")
        with pytest.raises(ClipScoreError, match="pocket CLIP is missing"):
            clip_score.load_clip()
    with pytest.raises(ClipScoreError, match="does not exist"):
        clip_score.load_clip(str(arch), None, weights=tmp_path / "missing.safetensors")
    with pytest.raises(ClipScoreError, match="unknown open_clip model"):
        clip_score.load_clip("no-such-model", None, weights=weights)
    with pytest.raises(ClipScoreError, match="unknown pretrained tag"):
        clip_score.load_clip("ViT-B-32", "no-such-tag")
    # A pickled checkpoint is refused (torch.load with weights_only=True), not executed.
    pickled = tmp_path / "pickled.pt"
    torch.save({"state_dict": {"x": torch.zeros(1)}, "obj": Path("x")}, pickled)
    with pytest.raises(ClipScoreError, match="could not load CLIP weights"):
        clip_score.load_clip(str(arch), None, weights=pickled)
    # A plain state dict saved with torch.save loads (weights_only) and gives the same model.
    from safetensors.torch import load_file

    state = tmp_path / "state.pt"
    torch.save(load_file(str(weights)), state)
    a = clip_score.load_clip(str(arch), None, weights=state, device="cpu")
    b = clip_score.load_clip(str(arch), None, weights=weights, device="cpu")
    assert torch.equal(a.encode_texts(["a dog"]), b.encode_texts(["a dog"]))


def test_markdown_tables_follow_the_sbora_readme_shape():
    results = [
        {"concept": "dog", "category": "object", "method": "sbora-fa", "summary": {"clip_t_mixofshow": 0.7, "clip_i_cosine": 0.8}},
        {"concept": "cat", "category": "object", "method": "sbora-fa", "summary": {"clip_t_mixofshow": 0.5, "clip_i_cosine": 0.6}},
        {"concept": "hermione", "category": "character", "method": "sbora-fa", "summary": {"clip_t_mixofshow": 0.9, "clip_i_cosine": 0.7}},
        {"concept": "dog", "category": "object", "method": "lora", "summary": {"clip_t_mixofshow": 0.6, "clip_i_cosine": 0.9}},
    ]
    md = evaluate.markdown_tables(results)
    sections = md.split("## ")[1:]
    assert [s.splitlines()[0] for s in sections] == [evaluate.TABLES[0][0], evaluate.TABLES[2][0]]  # only metrics present
    text = sections[0].splitlines()
    assert text[2] == "| Method | dog | cat | hermione | object | character | Mean |"
    assert text[4] == "| sbora-fa | 0.7000 | 0.5000 | 0.9000 | 0.6000 | 0.9000 | 0.7000 |"
    assert text[5] == "| lora | 0.6000 | – | – | 0.6000 | – | 0.6000 |"
    image = sections[1].splitlines()
    assert image[4] == "| sbora-fa | 0.8000 | 0.6000 | 0.7000 | 0.7000 | 0.7000 | 0.7000 |"


def test_run_end_to_end_on_the_tiny_pipeline(tiny_clip_files, reference, tmp_path, monkeypatch):
    """Two adapters of one concept: a zero-init one (identical to the base: drift 0) and a perturbed one."""
    from sbora.adapters import AdapterConfig, AdapterFileError, adapter_parameters, inject
    from sbora_diffusion.concept.adapter import save_concept_adapter
    from sbora_diffusion.concept.config import load_concept
    from sbora_diffusion.models import load_pipeline

    concept_yaml = tmp_path / "dog.yaml"
    concept_yaml.write_text(json.dumps({
        "name": "dog", "instance_dir": str(reference), "token": "<dog1>", "class_word": "dog",
        "eval_prompts": ["a photo of {token} {class_word}", "a {token} on the beach", "unused {token}"],
    }))
    info = {"concept": "dog", "method": "sbora-fa", "token": "<dog1>", "class_word": "dog"}
    files = {}
    for label, scale in (("zero", 0.0), ("moved", 1.0)):
        pipe = load_pipeline("tiny")
        inject(pipe.unet, AdapterConfig(method="sbora-fa", rank=4, targets=["sd-unet"]), name="dog")
        with torch.no_grad():
            for p in adapter_parameters(pipe.unet, "dog"):
                p.copy_(scale * torch.randn(p.shape, generator=torch.Generator().manual_seed(0)))
        files[label] = save_concept_adapter(pipe, tmp_path / label / "adapter.safetensors", "dog", "tiny", info)
    monkeypatch.chdir(tmp_path)  # the default cache folder is relative to the working directory
    # Through the command line: the default YAML (configs/eval/default.yaml) plus overrides.
    assert 0 == evaluate.main([
        "run", "--concept", str(concept_yaml), "--adapter", f"zero={files['zero']}", "--adapter", str(files["moved"]),
        *clip_args(tiny_clip_files), "--cache-dir", "none", "--num-prompts", "2", "--num-images", "2", "--steps", "2",
        "--drift-prompts", "a bowl of fruit", "--drift-images", "2", "--category", "animal", "--output-dir", str(tmp_path / "eval"),
    ])
    results = [json.loads((tmp_path / "eval" / "dog" / m / "result.json").read_text()) for m in ("zero", "sbora-fa")]
    assert results[0]["settings"]["guidance_scale"] == 7.5 and results[0]["settings"]["model"] == "tiny"  # YAML default, adapter's base
    root = tmp_path / "eval"
    rows = [json.loads(line) for line in (root / "dog" / "sbora-fa" / "images" / "manifest.jsonl").read_text().splitlines()]
    assert [(r["prompt"], r["seed"]) for r in rows] == [
        ("a photo of <dog1> dog", 0), ("a photo of <dog1> dog", 1), ("a <dog1> on the beach", 0), ("a <dog1> on the beach", 1)]
    scores = json.loads((root / "dog" / "sbora-fa" / "scores.json").read_text())
    assert [r["text"] for r in scores["images"]][::2] == ["A photo depicts a photo of dog", "A photo depicts a dog on the beach"]
    zero, moved = (r["summary"] for r in results)
    assert zero["drift"] == pytest.approx(0.0, abs=1e-6)  # a zero-init adapter is the base model
    assert moved["drift"] > 1e-4
    for s in (zero, moved):
        assert s["num_images"] == 4 and s["num_references"] == 2
        assert -1 <= s["clip_t_cosine"] <= 1 and -1 <= s["clip_i_cosine"] <= 1 and 0 <= s["clip_t_mixofshow"] <= 2.5
    assert not (tmp_path / "outputs").exists()  # --cache-dir none: no embedding cache written
    assert [r["method"] for r in json.loads((root / "results.json").read_text())] == ["sbora-fa", "zero"]
    md = (root / "results.md").read_text()
    assert "| Method | dog | animal | Mean |" in md and f"| zero | {zero['drift']:.4f} |" in md
    assert len((root / "results.csv").read_text().splitlines()) == 3
    assert evaluate.rebuild_tables(root) == json.loads((root / "results.json").read_text())
    # Bad input fails before anything is generated.
    arch, weights = tiny_clip_files
    cfg = evaluate.RunConfig(clip_model=str(arch), clip_pretrained=None, clip_weights=str(weights), output_dir=str(tmp_path / "bad"))
    concept = load_concept(concept_yaml)
    with pytest.raises(ClipScoreError, match="same method label"):
        evaluate.run(cfg, concept, [("a", files["zero"]), ("a", files["moved"])])
    with pytest.raises(ClipScoreError, match="no images in"):
        evaluate.run(cfg, concept, [(None, files["moved"])], reference_dir=tmp_path / "zero")
    with pytest.raises(AdapterFileError, match="no adapter file"):
        evaluate.run(cfg, concept, [(None, tmp_path / "missing.safetensors")])
    assert not (tmp_path / "bad").exists()
