"""CLIP alignment scores for personalized text-to-image models: CLIP-T, CLIP-I and drift.

Follows the evaluation protocol of Mix-of-Show (Gu et al., NeurIPS 2023), which the SBoRA
paper (Po et al.) reuses for its single-concept results:

- **CLIP-T** (text alignment): cosine between a generated image and its prompt, where the
  concept token is replaced by its class word ("a <dog1> on the beach" -> "a dog on the
  beach"; "a photo of <dog1> dog" -> "a photo of dog") and prefixed with "A photo depicts ". Reported twice, labelled: the plain cosine
  and Mix-of-Show's ``2.5·max(cos, 0)`` (the CLIPScore form; SBoRA's text-alignment table is
  on this scale).
- **CLIP-I** (image alignment): mean cosine over all (generated, reference) image pairs;
  reported as the plain cosine (SBoRA's image-alignment table is on this scale).
- **Drift** (concept leakage): for prompts unrelated to the concept, the cosine between the
  base model's image and the adapted model's image at the same prompt and seed; drift is
  ``1 - cos`` (0 when the adapter leaves unrelated prompts alone).

Images come as a folder plus a ``manifest.jsonl`` (one JSON object per image, written by
``sbora_diffusion.generate``): ``image`` (path relative to the folder) and ``prompt`` are
required; ``seed``, ``concept``, ``method``, ``token`` and ``class_word`` are optional.
Models are open_clip models; weights are loaded only through safetensors or
``torch.load(weights_only=True)``, and a model with no weights at hand fails fast. The
offline default is the pocket world's CLIP (``pocket``, shipped in the repository, for the
pocket base's images); the paper scores real Stable Diffusion images with OpenAI's ViT-B/32
(``ViT-B-32`` + ``openai``).
"""

from __future__ import annotations

import hashlib
import json
import os
import pickle
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from sbora.fileio import atomic_path
from sbora.hub import hub_reachable

from .concept.config import ConceptError, image_files, open_rgb

# The pocket world's CLIP, shipped in the repository (sbora_diffusion/world/weights/pocket-clip, an
# open_clip local-dir folder): ``load_clip("pocket")`` / ``--clip-model pocket``, any pretrained tag ignored.
# It is the offline default; images of real Stable Diffusion models are scored with the paper's
# OpenAI ViT-B/32 (``--clip-model ViT-B-32``, whose tag DEFAULT_CLIP_PRETRAINED is).
POCKET_CLIP_MODEL = "pocket"
DEFAULT_CLIP_MODEL = POCKET_CLIP_MODEL
DEFAULT_CLIP_PRETRAINED = "openai"
DEFAULT_TEXT_PREFIX = "A photo depicts "
MIX_OF_SHOW_SCALE = 2.5

# Metric labels written next to the numbers, so a results file explains itself.
LABELS = {
    "clip_t_cosine": "CLIP-T, plain cosine between image and prompt (token -> class word)",
    "clip_t_mixofshow": f"CLIP-T, Mix-of-Show/CLIPScore form {MIX_OF_SHOW_SCALE}*max(cos, 0)",
    "clip_i_cosine": "CLIP-I, mean plain cosine over all (generated, reference) image pairs",
    "drift_cosine": "mean cosine between base and adapted images at the same prompt and seed",
    "drift": "1 - drift_cosine (0 = unrelated prompts untouched by the adapter)",
}


class ClipScoreError(ValueError):
    """Bad scoring input (manifest, images, references, weights); the message says what to do."""


# ----------------------------------------------------------------------------- inputs


@dataclass(frozen=True)
class ManifestEntry:
    """One generated image as listed in a manifest."""

    image: Path  # absolute path of the image file
    prompt: str
    seed: int | None = None
    concept: str | None = None
    method: str | None = None
    token: str | None = None
    class_word: str | None = None
    name: str = ""  # the manifest's own (relative) image path, for reports


def read_manifest(path: str | Path, images_dir: str | Path | None = None) -> list[ManifestEntry]:
    """Read a manifest.jsonl; image paths are relative to ``images_dir`` (default: its folder).

    Every line is checked, and every image must exist, before anything is scored.
    """
    path = Path(path)
    if not path.is_file():
        raise ClipScoreError(f"no manifest at {path}; pass --manifest FILE (one JSON object per image, as written by the generate command)")
    root = Path(images_dir) if images_dir is not None else path.parent
    entries = []
    for n, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        where = f"{path}, line {n}"
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise ClipScoreError(f"{where} is not valid JSON ({e.msg}); each line must be one JSON object") from None
        if not isinstance(row, dict):
            raise ClipScoreError(f"{where} must be a JSON object with at least 'image' and 'prompt'")
        missing = [k for k in ("image", "prompt") if not isinstance(row.get(k), str) or not row.get(k)]
        if missing:
            raise ClipScoreError(f"{where} lacks a string {' and '.join(repr(k) for k in missing)}; every line needs 'image' and 'prompt'")
        seed = row.get("seed")
        if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
            raise ClipScoreError(f"{where}: 'seed' must be an integer, got {seed!r}")
        image = root / row["image"]
        if not image.is_file():
            raise ClipScoreError(f"{where} names image {row['image']!r}, but {image} does not exist; regenerate it or fix the manifest")
        entries.append(
            ManifestEntry(
                image=image, prompt=row["prompt"], seed=seed, name=row["image"],
                **{k: (str(row[k]) if row.get(k) is not None else None) for k in ("concept", "method", "token", "class_word")},
            )
        )
    if not entries:
        raise ClipScoreError(f"{path} lists no images")
    return entries


def reference_images(folder: str | Path) -> list[Path]:
    """The image files directly in ``folder`` (sorted); an empty or missing folder is an error."""
    try:
        return image_files(folder, what="reference photos", hint="CLIP-I needs the concept's photos; pass --reference DIR")
    except ConceptError as e:
        raise ClipScoreError(str(e)) from None


def replace_tokens(prompt: str, replacements: dict[str, str]) -> str:
    """Replace every occurrence of each token by its word, longest token first.

    Longest first so that "<dog10>" is not half-replaced by the rule for "<dog1>".
    """
    for token in sorted(replacements, key=len, reverse=True):
        prompt = prompt.replace(token, replacements[token])
    return prompt


def parse_replacements(items: Iterable[str]) -> dict[str, str]:
    """``["<dog1>=dog", ...]`` -> ``{"<dog1>": "dog"}`` (the ``--replace TOKEN=WORD`` option)."""
    out = {}
    for item in items:
        token, sep, word = item.partition("=")
        if not sep or not token:
            raise ClipScoreError(f"--replace expects TOKEN=WORD (e.g. '<dog1>=dog'), got {item!r}")
        out[token] = word
    return out


def token_rules(token: str, class_word: str) -> dict[str, str]:
    """Rules for one concept: "<dog1> dog" -> "dog" (the DreamBooth idiom), then "<dog1>" -> "dog"."""
    return {f"{token} {class_word}": class_word, token: class_word}


def scoring_text(entry: ManifestEntry, replacements: dict[str, str], prefix: str) -> str:
    """The text CLIP-T compares the image with: prefix + prompt with tokens replaced.

    The manifest's own token/class_word apply (``token_rules``) unless ``replacements``
    names that token; ``replacements`` are applied literally and win.
    """
    rules = {}
    if entry.token and entry.class_word is not None and entry.token not in replacements:
        rules = token_rules(entry.token, entry.class_word)
    rules.update(replacements)
    return prefix + replace_tokens(entry.prompt, rules)


# ----------------------------------------------------------------------------- model


def resolve_device(device: str | torch.device | None) -> torch.device:
    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def _tag_checkpoint(model: str, pretrained: str, tag_cfg: dict) -> str:
    """The local file for an open_clip pretrained tag: from the cache, else downloaded, else a clear error."""
    from huggingface_hub import hf_hub_download
    from open_clip.constants import HF_SAFE_WEIGHTS_NAME, HF_WEIGHTS_NAME
    from open_clip.pretrained import download_pretrained

    # open_clip's convention: "org/repo/filename", or "org/repo/" for the default file name.
    repo, filename = os.path.split(tag_cfg.get("hf_hub", ""))
    if repo:
        for name in (HF_SAFE_WEIGHTS_NAME, filename or HF_WEIGHTS_NAME):
            try:
                return hf_hub_download(repo, name, local_files_only=True)
            except Exception:  # noqa: BLE001 - any failure here means "not in the cache"
                pass
    if repo and hub_reachable():
        return download_pretrained(tag_cfg)
    where = f" (Hugging Face repo {repo})" if repo else ""
    raise ClipScoreError(
        f"no weights for CLIP model {model} '{pretrained}'{where} in the local cache, and no network to download them. "
        f"Pass --clip-weights PATH with an open_clip checkpoint for {model} (.safetensors, or a state dict "
        f"readable by torch.load(weights_only=True)), or use --clip-model local-dir:FOLDER "
        f"(open_clip_config.json + weights), or run once with network access to fill the cache."
    )


class ClipScorer:
    """An open_clip model with its preprocessing and tokenizer; encodes in batches to unit vectors."""

    def __init__(self, model, preprocess, tokenizer, identity: str, device: torch.device, batch_size: int = 32):
        if batch_size < 1:
            raise ClipScoreError(f"batch size must be >= 1, got {batch_size}")
        self.model = model.eval().to(device)
        self.preprocess = preprocess
        self.tokenizer = tokenizer
        self.identity = identity  # names the weights, for the reference-embedding cache key
        self.device = device
        self.batch_size = batch_size
        self._reference_cache: dict[str, torch.Tensor] = {}

    @torch.no_grad()
    def encode_images(self, images: list, desc: str = "encode images") -> torch.Tensor:
        """(N, D) unit-norm float32 image embeddings on the CPU, of image files or PIL images."""
        from PIL import Image

        out = []
        for i in tqdm(range(0, len(images), self.batch_size), desc=desc, unit="batch", leave=False):
            chunk = [im.convert("RGB") if isinstance(im, Image.Image) else open_rgb(im) for im in images[i : i + self.batch_size]]
            batch = torch.stack([self.preprocess(im) for im in chunk])  # (b, 3, H, W)
            out.append(self.model.encode_image(batch.to(self.device), normalize=True).float().cpu())  # (b, D)
        return torch.cat(out)

    @torch.no_grad()
    def encode_texts(self, texts: list[str], desc: str = "encode texts") -> torch.Tensor:
        """(N, D) unit-norm float32 text embeddings on the CPU."""
        out = []
        for i in tqdm(range(0, len(texts), self.batch_size), desc=desc, unit="batch", leave=False):
            tokens = self.tokenizer(texts[i : i + self.batch_size]).to(self.device)  # (b, context_length)
            out.append(self.model.encode_text(tokens, normalize=True).float().cpu())  # (b, D)
        return torch.cat(out)

    def reference_embeddings(self, folder: str | Path, cache_dir: str | Path | None = None) -> torch.Tensor:
        """(R, D) embeddings of a reference folder, cached in memory and (optionally) on disk.

        The cache key covers the model identity and every file's name, size and mtime, so
        an edited folder or other weights are re-encoded.
        """
        images = reference_images(folder)
        stamp = [(p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in images]
        key = hashlib.sha256(json.dumps([self.identity, str(Path(folder).resolve()), stamp]).encode()).hexdigest()[:24]
        if key in self._reference_cache:
            return self._reference_cache[key]
        cache_file = Path(cache_dir) / f"reference-{key}.safetensors" if cache_dir is not None else None
        emb = None
        if cache_file is not None and cache_file.is_file():
            try:
                emb = load_file(str(cache_file))["embeddings"]
            except Exception:  # noqa: BLE001 - an unreadable cache entry is simply re-encoded and rewritten
                emb = None
        if emb is None:
            emb = self.encode_images(images, desc=f"encode references ({Path(folder).name})")
            if cache_file is not None:
                with atomic_path(cache_file) as tmp:
                    save_file({"embeddings": emb.contiguous()}, str(tmp), metadata={"folder": str(folder), "model": self.identity})
        self._reference_cache[key] = emb
        return emb


def load_clip(
    model: str = DEFAULT_CLIP_MODEL,
    pretrained: str | None = DEFAULT_CLIP_PRETRAINED,
    weights: str | Path | None = None,
    device: str | torch.device | None = None,
    batch_size: int = 32,
) -> ClipScorer:
    """Build an open_clip scorer.

    ``model``: an open_clip architecture name (``ViT-B-32``), a JSON architecture file
    (open_clip's model-config format; its stem becomes the name), ``local-dir:FOLDER``, or
    ``pocket`` (the pocket world's CLIP shipped in the repository; ``pretrained`` is ignored).
    ``pretrained``: an open_clip tag (``openai``); it also sets the tag's preprocessing and
    QuickGELU, even when ``weights`` gives the file. ``weights``: a local checkpoint.
    """
    import open_clip

    if model == POCKET_CLIP_MODEL:
        from .world import POCKET_CLIP_DIR

        if not (POCKET_CLIP_DIR / "open_clip_config.json").is_file():
            raise ClipScoreError(f"the pocket CLIP is missing ({POCKET_CLIP_DIR}); restore it from the repository")
        model, pretrained = f"local-dir:{POCKET_CLIP_DIR}", None
    if model.endswith(".json"):
        if not Path(model).is_file():
            raise ClipScoreError(f"CLIP architecture file {model} does not exist")
        open_clip.add_model_config(model)
        model = Path(model).stem
    local_dir = model.startswith("local-dir:")
    if local_dir and weights is not None:
        raise ClipScoreError("--clip-weights does not combine with a local-dir: model (its folder holds the weights); give one or the other")
    if not local_dir and model not in open_clip.list_models():
        raise ClipScoreError(f"unknown open_clip model {model!r}; e.g. ViT-B-32, ViT-L-14 (open_clip.list_models()), a JSON architecture file, or local-dir:FOLDER")
    tag_cfg = open_clip.get_pretrained_cfg(model, pretrained) if pretrained and not local_dir else {}
    if pretrained and not local_dir and not tag_cfg and weights is None:
        tags = ", ".join(open_clip.list_pretrained_tags_by_model(model)) or "(none)"
        raise ClipScoreError(f"unknown pretrained tag {pretrained!r} for {model}; known: {tags}; or pass --clip-weights PATH")
    if weights is not None:
        weights = Path(weights)
        if not weights.is_file():
            raise ClipScoreError(f"--clip-weights {weights} does not exist")
        checkpoint = str(weights)
    elif local_dir:
        checkpoint = None
    elif tag_cfg:
        checkpoint = _tag_checkpoint(model, pretrained, tag_cfg)
    else:
        raise ClipScoreError(f"no weights for {model}: pass --clip-pretrained TAG or --clip-weights PATH (random weights give meaningless scores)")
    # The tag's training-time settings: OpenAI's weights need QuickGELU and their own normalisation.
    try:
        clip, _, preprocess = open_clip.create_model_and_transforms(
            model,
            pretrained=checkpoint,
            force_quick_gelu=bool(tag_cfg.get("quick_gelu", False)),
            image_mean=tag_cfg.get("mean"),
            image_std=tag_cfg.get("std"),
            image_interpolation=tag_cfg.get("interpolation"),
            image_resize_mode=tag_cfg.get("resize_mode"),
            weights_only=True,
        )
    except (RuntimeError, OSError, ValueError, KeyError, pickle.UnpicklingError) as e:
        source = checkpoint or model
        raise ClipScoreError(
            f"could not load CLIP weights {source} into {model}: {e}. The file must be an open_clip "
            f"checkpoint for this architecture, as safetensors or a plain state dict (pickled objects "
            f"such as OpenAI's TorchScript .pt are refused; convert them first)"
        ) from None
    tokenizer = open_clip.get_tokenizer(model)
    stamp = ""
    if checkpoint is not None:
        st = Path(checkpoint).stat()
        stamp = f"{Path(checkpoint).resolve()}:{st.st_size}:{st.st_mtime_ns}"
    elif local_dir:  # the folder's files name the weights
        folder = Path(model[len("local-dir:"):])
        stamp = ";".join(f"{p.resolve()}:{p.stat().st_size}:{p.stat().st_mtime_ns}" for p in sorted(folder.iterdir()) if p.is_file())
    identity = f"{model}|{pretrained or ''}|{stamp}"
    return ClipScorer(clip, preprocess, tokenizer, identity, resolve_device(device), batch_size)


# ----------------------------------------------------------------------------- scores


def mix_of_show(cos: torch.Tensor) -> torch.Tensor:
    """Mix-of-Show's (CLIPScore's) text-alignment scale: 2.5·max(cos, 0), in [0, 2.5]."""
    return MIX_OF_SHOW_SCALE * cos.clamp(min=0)


def image_alignment(images: torch.Tensor, references: torch.Tensor) -> torch.Tensor:
    """CLIP-I per image: mean cosine of (N, D) unit image embeddings to (R, D) reference embeddings -> (N,)."""
    return (images @ references.T).clamp(-1, 1).mean(-1)


def score(
    scorer: ClipScorer,
    entries: list[ManifestEntry],
    reference_dir: str | Path | None = None,
    replacements: dict[str, str] | None = None,
    text_prefix: str = DEFAULT_TEXT_PREFIX,
    cache_dir: str | Path | None = None,
) -> dict:
    """CLIP-T for every image (and CLIP-I against ``reference_dir`` if given).

    Returns ``{"summary": {metric: mean}, "images": [per-image rows], "labels": ...}``.
    CLIP-I's overall mean is the mean over all (generated, reference) pairs, which equals the
    mean of the per-image means because every image meets the same references.
    """
    replacements = replacements or {}
    texts = [scoring_text(e, replacements, text_prefix) for e in entries]
    refs = scorer.reference_embeddings(reference_dir, cache_dir) if reference_dir is not None else None  # (R, D)
    img = scorer.encode_images([e.image for e in entries], desc="encode generated images")  # (N, D)
    txt = scorer.encode_texts(texts)  # (N, D)
    clip_t = (img * txt).sum(-1).clamp(-1, 1)  # (N,)
    clip_i = image_alignment(img, refs) if refs is not None else None  # (N,)
    rows = []
    for i, e in enumerate(entries):
        row = {
            "image": e.name, "prompt": e.prompt, "text": texts[i], "seed": e.seed, "concept": e.concept, "method": e.method,
            "clip_t_cosine": float(clip_t[i]), "clip_t_mixofshow": float(mix_of_show(clip_t[i])),
        }
        if clip_i is not None:
            row["clip_i_cosine"] = float(clip_i[i])
        rows.append(row)
    summary = {"num_images": len(entries), "clip_t_cosine": float(clip_t.mean()), "clip_t_mixofshow": float(mix_of_show(clip_t).mean())}
    if clip_i is not None:
        summary.update(num_references=int(refs.shape[0]), clip_i_cosine=float(clip_i.mean()))
    return {"summary": summary, "images": rows, "labels": {k: v for k, v in LABELS.items() if k in summary}}


def drift(scorer: ClipScorer, base: list[ManifestEntry], adapted: list[ManifestEntry]) -> dict:
    """Image cosine between base and adapted images paired by (prompt, seed); drift = 1 - cos."""
    key = lambda e: (e.prompt, e.seed)  # noqa: E731
    base_by_key = {}
    for e in base:
        if key(e) in base_by_key:
            raise ClipScoreError(f"the base manifest lists prompt {e.prompt!r} with seed {e.seed} twice; pairs must be unique")
        base_by_key[key(e)] = e
    pairs = [(base_by_key[key(e)], e) for e in adapted if key(e) in base_by_key]
    if not pairs:
        raise ClipScoreError("no (prompt, seed) pair appears in both the base and the adapted manifest; generate both with the same prompts and seeds")
    b = scorer.encode_images([p[0].image for p in pairs], desc="encode base images")  # (P, D)
    a = scorer.encode_images([p[1].image for p in pairs], desc="encode adapted images")  # (P, D)
    cos = (a * b).sum(-1).clamp(-1, 1)  # (P,)
    rows = [
        {"base_image": pb.name, "adapted_image": pa.name, "prompt": pa.prompt, "seed": pa.seed, "drift_cosine": float(c), "drift": float(1 - c)}
        for (pb, pa), c in zip(pairs, cos)
    ]
    summary = {"num_pairs": len(pairs), "unpaired_adapted": len(adapted) - len(pairs), "drift_cosine": float(cos.mean()), "drift": float(1 - cos.mean())}
    return {"summary": summary, "images": rows, "labels": {k: LABELS[k] for k in ("drift_cosine", "drift")}}
