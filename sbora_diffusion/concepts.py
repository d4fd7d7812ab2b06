"""Concept configs: what one personalized concept is (DreamBooth-style; Mix-of-Show's prompts).

``configs/concepts/<name>.yaml`` names the folder of instance photos, the concept token
(e.g. ``<dog1>``), its class word (``dog``), the instance prompt the photos are trained
with, and the validation and evaluation prompts. Prompt templates hold ``{token}`` and may
hold ``{class_word}``. Relative folders in a YAML file are relative to the repository root
(the folder that holds ``configs/``). A bare folder of images is a concept too: its name is
the folder's name, the rest are the defaults below (override them on the command line).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image, UnidentifiedImageError

from .configuration import CONFIG_DIR, ConfigError, from_dict, load_yaml, override, resolve_named_config

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
PROJECT_ROOT = CONFIG_DIR.parent


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
        default=None, metadata={"help": "folder of class images for prior preservation (none: generate them once with the base model)"}
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

    def fill(self, template: str) -> str:
        """A prompt template with the token and class word put in."""
        return template.format(token=self.token, class_word=self.class_word)

    def instance_images(self) -> list[Path]:
        """The concept's photos, sorted; a clear error if the folder or the photos are missing."""
        return image_files(self.instance_dir, what=f"concept '{self.name}'", hint=self._hint())

    def _hint(self) -> str:
        readme = Path(self.instance_dir) / "README.txt"
        extra = f" (see {readme})" if readme.is_file() else ""
        return f"put 3-20 photos of your {self.class_word} ({', '.join(IMAGE_SUFFIXES)}) in {self.instance_dir}{extra}"


def image_files(folder: str | Path, what: str = "image folder", hint: str = "") -> list[Path]:
    """Image files directly in `folder`, sorted by name; ConceptError if there are none."""
    folder = Path(folder)
    hint = f": {hint}" if hint else ""
    if not str(folder) or not folder.is_dir():
        raise ConceptError(f"{what}: image folder {folder} does not exist{hint}")
    found = sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    if not found:
        raise ConceptError(f"{what}: no images in {folder}{hint}")
    return found


def open_rgb(path: Path) -> Image.Image:
    """Decode one image fully (a truncated or corrupt file is a ConceptError naming it)."""
    try:
        with Image.open(path) as im:
            im.load()
            return im.convert("RGB")
    except (UnidentifiedImageError, OSError, SyntaxError) as e:
        raise ConceptError(f"cannot read image {path} ({e}); replace or delete it") from None


def _resolve_dir(value: str | None) -> str | None:
    if not value:
        return value
    p = Path(value).expanduser()
    return str(p if p.is_absolute() else PROJECT_ROOT / p)


def load_concept(name_or_path: str | Path, **overrides) -> ConceptConfig:
    """``configs/concepts/NAME.yaml``, a YAML path, or a folder of images; then field overrides.

    Paths in overrides (e.g. ``instance_dir`` from the command line) are taken as given.
    """
    folder = Path(name_or_path).expanduser()
    if folder.is_dir():
        config = ConceptConfig(name=folder.resolve().name, instance_dir=str(folder), token=f"<{folder.resolve().name}1>")
    elif ("/" in str(name_or_path) or "\\" in str(name_or_path)) and not folder.exists():
        raise ConceptError(f"{folder} does not exist: pass a folder of images, a concept YAML file, or a name from configs/concepts/")
    else:
        try:
            path = resolve_named_config("concepts", name_or_path)
        except ConfigError as e:
            raise ConceptError(f"{e}; or pass a folder of images as --concept") from None
        data = load_yaml(path)
        data.setdefault("name", path.stem)
        data.setdefault("instance_dir", f"data/concepts/{data['name']}")
        for key in ("instance_dir", "class_dir"):
            data[key] = _resolve_dir(data.get(key))
        config = from_dict(ConceptConfig, data, source=str(path))
    overrides = {k: v for k, v in overrides.items() if v is not None}
    if overrides:
        config = override(config, overrides, source="concept overrides")
    config.validate()
    return config
