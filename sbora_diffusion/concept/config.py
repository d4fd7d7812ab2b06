"""Concept configs: what one personalized concept is (DreamBooth-style; Mix-of-Show's prompts).

``configs/concepts/<name>.yaml`` names the folder of instance photos, the concept token
(e.g. ``<dog1>``), its class word (``dog``), the instance prompt the photos are trained
with, and the validation and evaluation prompts. Prompt templates hold ``{token}`` and may
hold ``{class_word}``. Relative folders in a YAML file are relative to the repository root
(the folder that holds ``configs/``). A bare folder of images is a concept too: its name is
the folder's name, the rest are the defaults below (override them on the command line).

Any name a file system allows works: the display name is kept as given, and a safe internal
name (``ConceptConfig.key``: ASCII letters, digits, ``_`` and ``-``, plus a short hash when the
name had to change) names the adapter and the output folder, so a name never steers a path.

Photos are decoded as a person sees them (``open_rgb``): EXIF orientation applied, colour
profiles converted to sRGB, 16-bit images scaled (not clipped), transparency composited on
white, palettes and CMYK converted; what cannot be shown faithfully is an error naming the file.
"""

from __future__ import annotations

import hashlib
import io
import json
import re
import unicodedata
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, ImageCms, ImageOps, UnidentifiedImageError

from sbora.configuration import ConfigError, from_dict, load_yaml, resolve_named_config

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".jfif", ".webp", ".bmp", ".tif", ".tiff", ".gif", ".avif", ".mpo")
# Photo formats Pillow cannot decode here: named in an error instead of being skipped silently.
UNSUPPORTED_SUFFIXES = {".heic": "HEIC", ".heif": "HEIF", ".dng": "raw DNG", ".cr2": "raw CR2", ".cr3": "raw CR3",
                        ".nef": "raw NEF", ".arw": "raw ARW", ".orf": "raw ORF", ".rw2": "raw RW2", ".raw": "raw", ".jxl": "JPEG XL"}
PROJECT_ROOT = Path(__file__).resolve().parents[2]  # the repository (data/concepts/ lives there)


class ConceptError(ConfigError):
    """A concept's images or config cannot be used; the message says what to fix."""


@dataclass
class ConceptConfig:
    name: str = field(default="concept", metadata={"help": "concept name (output folder outputs/<name>/<method>/)"})
    instance_dir: str = field(default="", metadata={"help": "folder of the concept's photos (.png/.jpg/.jpeg/.webp/.bmp)"})
    token: str = field(default="<concept1>", metadata={"help": "the concept's token in prompts, e.g. <dog1>"})
    class_word: str = field(default="object", metadata={"help": "the concept's class, e.g. dog (prior preservation, CLIP-T prompts)"})
    instance_prompt: str = field(
        default="a photo of {token} {class_word}", metadata={"help": "prompt the photos are trained with ({token}, {class_word})"}
    )
    class_prompt: str = field(default="a photo of {class_word}", metadata={"help": "prompt of the class images (prior preservation)"})
    class_dir: str | None = field(
        default=None, metadata={"help": "folder of class images for prior preservation (none: generate them once with the base model)",
                                "aliases": ("class-data-dir",)}
    )
    validation_prompts: list[str] = field(
        default_factory=lambda: ["a photo of {token} {class_word}", "a photo of {token} {class_word} on the beach"],
        metadata={"help": "prompts of the validation grids saved while training"},
    )
    eval_prompts: list[str] = field(
        default_factory=lambda: [
            "a photo of {token} {class_word}", "a photo of {token} {class_word} on the beach",
            "a photo of {token} {class_word} in the snow", "a painting of {token} {class_word}",
        ],
        metadata={"help": "prompts for evaluation (CLIP-T/CLIP-I) images"},
    )

    def validate(self) -> None:
        if not self.token.strip():
            raise ConceptError("the concept token is empty; set e.g. token: '<dog1>'")
        for what, template in [("instance_prompt", self.instance_prompt), ("class_prompt", self.class_prompt)] + [
            ("validation_prompts", p) for p in self.validation_prompts
        ] + [("eval_prompts", p) for p in self.eval_prompts]:
            try:
                template.format(token="", class_word="")
            except (KeyError, IndexError, ValueError) as e:
                raise ConceptError(f"{what} '{template}' has a bad placeholder ({e}); use only {{token}} and {{class_word}}") from None
        if "{token}" not in self.instance_prompt:
            raise ConceptError(f"instance_prompt '{self.instance_prompt}' must contain {{token}}")

    @property
    def key(self) -> str:
        """The safe internal name: adapter name and output folder (see the module docstring)."""
        return safe_name(self.name)

    def fill(self, template: str) -> str:
        """A prompt template with the token and class word put in."""
        return template.format(token=self.token, class_word=self.class_word)

    def instance_prompts(self, paths: list[Path], caption_column: str | None = None) -> list[str]:
        """Each photo's training prompt, filled: the instance prompt, or with `caption_column` the photo's own caption from
        ``metadata.jsonl`` in the concept's folder (🤗 datasets' imagefolder layout: one JSON object per line with the
        photo's ``file_name`` and the column). Per-photo captions can name what is not the concept (the background, the
        place in the picture), so that the concept's token and adapter need not learn it (DreamBooth, Ruiz et al. 2023)."""
        if caption_column is None:
            return [self.fill(self.instance_prompt)] * len(paths)
        table = Path(self.instance_dir) / "metadata.jsonl"
        example = json.dumps({"file_name": paths[0].name, caption_column: f"a photo of {{token}} {self.class_word} on the beach"})
        if not table.is_file():
            raise ConceptError(f"caption_column '{caption_column}': {table} does not exist; write one line per photo, e.g. {example}, "
                               f"or leave caption_column unset to train every photo with instance_prompt")
        try:
            text = table.read_text(encoding="utf-8-sig")  # -sig: a byte-order mark some editors write is not part of line 1
        except UnicodeDecodeError as e:
            raise ConceptError(f"{table} is not UTF-8 text ({e.reason} at byte {e.start}); save it as UTF-8") from None
        captions = {}
        for n, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise ConceptError(f"{table}, line {n}: not a JSON object ({e.msg}); write lines like {example}") from None
            if not isinstance(row, dict) or not isinstance(row.get("file_name"), str) or not isinstance(row.get(caption_column), str):
                raise ConceptError(f"{table}, line {n}: needs a \"file_name\" and a \"{caption_column}\" text, like {example}")
            path = (table.parent / row["file_name"]).resolve()
            if path in captions:
                raise ConceptError(f"{table}, line {n}: a second caption for {row['file_name']}; give each photo one line")
            captions[path] = row[caption_column]
        missing = [p.name for p in paths if p.resolve() not in captions]
        if missing:
            raise ConceptError(f"{table} has no \"{caption_column}\" caption for {first_names(missing)}; "
                               f"give every photo a line, like {example}")
        prompts = []
        for p in paths:
            caption = captions[p.resolve()]
            try:
                prompt = self.fill(caption)
            except (KeyError, IndexError, ValueError) as e:
                raise ConceptError(f"{table}: the caption of {p.name} ('{caption}') has a bad placeholder ({e}); use only {{token}} and {{class_word}}") from None
            if self.token not in prompt:
                raise ConceptError(f"{table}: the caption of {p.name} ('{caption}') does not name the concept; put {{token}} in it")
            prompts.append(prompt)
        return prompts

    def instance_masks(self, paths: list[Path]) -> list[Path]:
        """Each photo's mask, ``masks/<photo name>.png`` in the concept's folder (white on the concept, black elsewhere):
        what a loss that weighs the background less (``--background-loss-weight``) reads."""
        masks = [Path(self.instance_dir) / "masks" / f"{p.stem}.png" for p in paths]
        missing = [m.name for m in masks if not m.is_file()]
        if missing:
            raise ConceptError(f"no mask for {first_names(missing)} in {Path(self.instance_dir) / 'masks'}: "
                               f"give each photo a mask of the same size (white on the {self.class_word}, black elsewhere), "
                               f"or leave background_loss_weight at 1")
        return masks

    def instance_images(self) -> list[Path]:
        """The concept's photos, sorted; a clear error if the folder or the photos are missing."""
        return image_files(self.instance_dir, what=f"concept '{self.name}'", hint=self._hint())

    def _hint(self) -> str:
        readme = Path(self.instance_dir) / "README.txt"
        extra = f" (see {readme})" if readme.is_file() else ""
        return f"put 3-20 photos of your {self.class_word} ({', '.join(IMAGE_SUFFIXES)}) in {self.instance_dir}{extra}"


def safe_name(name: str) -> str:
    """`name` itself when it is made of ASCII letters, digits, '_' and '-' (and is a usable adapter name),
    else an ASCII transliteration plus 8 hex digits of the name's hash: unique per name, never a path."""
    from sbora.adapters.inject import check_adapter_name

    slug = re.sub(r"[^A-Za-z0-9_-]+", "_", unicodedata.normalize("NFKD", name).encode("ascii", "ignore").decode()).strip("_-")[:40]
    try:
        if slug == name:
            check_adapter_name(slug)
            return slug
    except ValueError:
        pass
    return f"{slug or 'concept'}-{hashlib.sha256(name.encode()).hexdigest()[:8]}"


def first_names(names: list[str], n: int = 5) -> str:
    """The first `n` names, comma-separated, and " ..." when there are more: a message's list of files."""
    return ", ".join(names[:n]) + (" ..." if len(names) > n else "")


def image_files(folder: str | Path, what: str = "image folder", hint: str = "") -> list[Path]:
    """Image files directly in `folder`, sorted by name; ConceptError if there are none, or if some
    are photos in a format that cannot be decoded here (named, instead of being skipped)."""
    folder = Path(folder)
    hint = f": {hint}" if hint else ""
    if not str(folder) or not folder.is_dir():
        raise ConceptError(f"{what}: image folder {folder} does not exist{hint}")
    files = sorted(p for p in folder.iterdir() if p.is_file() and not p.name.startswith("."))
    unsupported = [p for p in files if p.suffix.lower() in UNSUPPORTED_SUFFIXES]
    if unsupported:
        names = first_names([p.name for p in unsupported])
        kinds = ", ".join(sorted({UNSUPPORTED_SUFFIXES[p.suffix.lower()] for p in unsupported}))
        raise ConceptError(f"{what}: {names} in {folder}: {kinds} photos cannot be decoded here; convert them to JPEG or PNG "
                           f"(any photo app exports them), or move them out of the folder")
    found = [p for p in files if p.suffix.lower() in IMAGE_SUFFIXES]
    if not found:
        raise ConceptError(f"{what}: no images in {folder}{hint}")
    return found


_WHITE = (255, 255, 255)


def open_rgb(path: Path) -> Image.Image:
    """Decode one image fully, as a person would see it, as 8-bit sRGB (see the module docstring).

    A file that cannot be decoded faithfully (corrupt, truncated, floating-point pixels, an
    unusable colour profile, too large) is a ConceptError that names it.
    """
    try:
        with Image.open(path) as im:
            im.load()  # the first frame of an animation or multi-picture file
            return _display_rgb(ImageOps.exif_transpose(im), path)
    except ConceptError:
        raise
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, Image.DecompressionBombError, ImageCms.PyCMSError) as e:
        raise ConceptError(f"cannot read image {path} ({e}); replace or delete it") from None


def _display_rgb(im: Image.Image, path: Path) -> Image.Image:
    if im.mode in ("I;16", "I;16L", "I;16B", "I;16N", "I"):
        a = np.asarray(im, dtype=np.int64)
        if a.min() < 0 or a.max() > 65535:
            raise ConceptError(f"cannot read image {path}: 32-bit pixel values {a.min()}..{a.max()} have no known display range; save it as an 8- or 16-bit PNG")
        im = Image.fromarray(np.rint(a / 257.0).astype(np.uint8), "L")  # 16-bit: scale, never clip
    elif im.mode == "F":
        raise ConceptError(f"cannot read image {path}: floating-point pixels (HDR or scientific data) have no known display range; save it as an 8- or 16-bit PNG or a JPEG")
    icc = im.info.get("icc_profile")
    if im.mode == "LAB":
        im = ImageCms.applyTransform(im, ImageCms.buildTransform(ImageCms.createProfile("LAB"), ImageCms.createProfile("sRGB"), "LAB", "RGB"))
    elif icc and im.mode in ("RGB", "RGBA", "CMYK", "L"):
        out = "RGBA" if im.mode == "RGBA" else "RGB"
        im = ImageCms.profileToProfile(im, ImageCms.ImageCmsProfile(io.BytesIO(icc)), ImageCms.createProfile("sRGB"), outputMode=out)
    if im.mode in ("RGBA", "LA", "La", "RGBa", "PA") or "transparency" in im.info:
        rgba = im.convert("RGBA")  # palette and colour-key transparency too
        canvas = Image.new("RGBA", rgba.size, _WHITE + (255,))
        im = Image.alpha_composite(canvas, rgba)
    return im.convert("RGB")


def literal_prompt_token(prompt: str, class_prompt: str | None = None) -> tuple[str, str | None]:
    """(identifier, class word) of a literal DreamBooth prompt as diffusers' scripts take it
    ("a photo of sks dog" -> ("sks", "dog")): the one word that the class prompt lacks, else the
    word before the last one. A ConceptError when neither rule finds one."""
    words = prompt.split()
    if class_prompt:
        known = {w.lower() for w in class_prompt.split()}
        extra = [i for i, w in enumerate(words) if w.lower() not in known]
        if len(extra) == 1:
            i = extra[0]
            return words[i], (words[i + 1] if i + 1 < len(words) else None)
    if len(words) >= 2:
        return words[-2], words[-1]
    raise ConceptError(f"instance prompt '{prompt}' names no concept token: write it as 'a photo of {{token}} {{class_word}}' "
                       "with --token, or as diffusers does, 'a photo of sks dog' (the rare word before the class word)")


def _resolve_dir(value: str | None) -> str | None:
    if not value:
        return value
    p = Path(value).expanduser()
    return str(p if p.is_absolute() else PROJECT_ROOT / p)


def load_concept(name_or_path: str | Path, **overrides) -> ConceptConfig:
    """``configs/concepts/NAME.yaml``, a YAML path, or a folder of images; then field overrides.

    Paths in overrides (e.g. ``instance_dir`` from the command line) are taken as given.
    """
    data, source = concept_values(name_or_path)
    overrides = {k: v for k, v in overrides.items() if v is not None}
    config = from_dict(ConceptConfig, {**data, **overrides}, source=source.removeprefix("from "))
    config.validate()
    return config


def concept_values(name_or_path: str | Path) -> tuple[dict, str]:
    """(the fields a concept name, YAML or folder of images gives, "from concept '<name>'"); the YAML's
    folders resolved against the repository. A ConceptError when there is no such concept."""
    folder = Path(name_or_path).expanduser()
    source = f"from concept '{name_or_path}'"
    if folder.is_dir():
        name = folder.resolve().name
        return {"name": name, "instance_dir": str(folder), "token": f"<{safe_name(name).lower()}1>"}, source
    if ("/" in str(name_or_path) or "\\" in str(name_or_path)) and not folder.exists():
        raise ConceptError(f"{folder} does not exist: pass a folder of images, a concept YAML file, or a name from configs/concepts/")
    try:
        path = resolve_named_config("concepts", name_or_path)
    except ConfigError as e:
        raise ConceptError(f"{e}; or pass a folder of images as --concept") from None
    data = load_yaml(path)
    data.setdefault("name", path.stem)
    data.setdefault("instance_dir", f"data/concepts/{data['name']}")
    for key in ("instance_dir", "class_dir"):
        data[key] = _resolve_dir(data.get(key))
    return data, source
