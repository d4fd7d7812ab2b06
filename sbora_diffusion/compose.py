r"""Multi-concept composition: several trained concepts in one image, without retraining (docs/architecture.md §4).

    python -m sbora_diffusion.compose --config configs/compositions/robot_duck.yaml [--field value ...]

Concepts trained with one seed in different slots (``train_concept.py --slot k``) change
disjoint columns (SBoRA-FA), rows (SBoRA-FB) or orthogonal basis rows (ortho) of every
weight, so in the composed model W + Σ_k w_k·ΔW_k each concept's update sits in its own part
of W, exactly as trained, and merging one never changes another's entries. That is a
statement about the weights, not the outputs: on concept i's own activations X_i the
composed layer still adds w_j·ΔW_j X_i of every other concept j, which disjoint slots do not
make zero (only inputs that vanish in the directions ΔW_j reads would). ``Composer`` puts N
concept adapters (UNet and text-encoder adapters plus learned token embeddings) onto one
base, each with a weight, and

- refuses, before the model changes and with what to do, a concept trained on another base
  model, tokens that clash (two concepts claiming one token), a name used twice, and
  adapters whose shapes do not fit the base;
- reports, per pair and per layer, the **weight overlap** from ``lora_factors()``
  (``adapters.overlap``: 0 for disjoint slots, shared SBoRA indices, ‖A_i A_jᵀ‖ through the
  B's for ortho/LoRA) and warns about pairs above ``overlap_threshold``; and beside it the
  **output cross-talk on calibration inputs** ‖ΔW_j X_i‖ / ‖ΔW_i X_i‖ (both directions), X_i
  the layer's inputs during a short run of concept i's own prompts under its own adapter
  (``Calibration``: by default up to 4 of its eval prompts, 2 denoising steps at 64 px; or
  the prompts you give: ``calibration_prompts`` per concept or a file of templates);
- runs **unmerged** (default: the cores stay beside the base and each call chooses the
  concepts and weights, ``adapters.active_adapters``; switching never reloads or touches the
  base, and threads may render different compositions on one model at once) or **merged**
  (W += w_k·ΔW_k: for SBoRA a sparse add to r columns/rows; ``unmerge`` restores the base
  bit-exactly);
- samples regionally (``regional.py``): each concept in its box or mask with its own prompt,
  the global prompt and the concepts without a region elsewhere; ``regional_mode`` says how far
  a region confines its concept: ``latent`` (default: the region denoised as its own crop, so
  nothing of the concept acts outside it), ``attention`` (the attention layers) or ``cross``
  (cross-attention only, Mix-of-Show: its adapters still act everywhere in self-attention).

**Fusion** says how the concepts' updates combine: ``fusion: sum`` is the plain sum above;
``fusion: gradient`` is Mix-of-Show's gradient fusion (``fusion.py``): per layer one fused
weight that reproduces each concept's outputs on its own prompts' activations, added to the
pipeline as one dense adapter, written to ``<output-dir>/fused.safetensors``. A fusion is an entry of
``FUSIONS``: given the composer, {concept: weight} and the sampler settings, it returns the
selection the composition runs (a fused adapter runs in the regions too, with their prompts).

The composition YAML (``configs/compositions/*.yaml``; every scalar field is also an option)::

    prompt: "a photo of <robot1> toy and <duck1> toy on the beach"   # the global prompt
    model: tiny                  # optional; default: the base the concepts were trained on
    concepts:
      - concept: robot           # its adapter: <outputs>/robot/sbora-fa/adapter.safetensors
        method: sbora-fa         #   (or adapter: PATH)
        slot: 0                  # the slot it was trained in (checked)
        weight: 1.0
        region: [0.0, 0.0, 0.5, 1.0]        # optional box x0, y0, x1, y1 (fractions), or mask: PNG
        prompt: "a photo of <robot1> toy"   # its regional prompt (default: a photo of {token} {class_word})
      - concept: duck
        slot: 1
        region: [0.5, 0.0, 1.0, 1.0]
        calibration_prompts: ["a photo of <duck1> toy in a pond"]   # optional: its cross-talk inputs
    seeds: [0, 1, 2, 3]
    calibration_prompts_file: prompts.txt   # optional: templates ({token}, {class_word}) for concepts without their own
    crosstalk: true                          # --no-crosstalk: weight overlap only

Writes into ``output_dir`` (default ``<outputs>/compositions/<name>``) ``<prompt#>-<slug>/<seed>.png``,
``manifest.jsonl`` (as ``generate``: image, prompt, seed, plus the concepts, mode and fusion),
``overlap.json`` (the report: weight overlap and output cross-talk, per pair and per layer) and
``overlap.md`` (its tables); gradient fusion adds ``fused.safetensors`` and ``fusion.json`` (its
per-layer errors).
"""

from __future__ import annotations

import contextlib
import copy
import json
import re
import sys
import threading
import time
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from PIL import Image

from sbora.adapters import AdapterFileError, active_adapters, adapted_layers, read_adapter, remove, set_adapter_weight
from sbora.adapters import merge as merge_adapter
from sbora.adapters import unmerge as unmerge_adapter
from sbora.adapters.config import DEFAULT_METHOD
from sbora.adapters.inject import check_adapter_name
from sbora.adapters.io import sibling_file, slot_layouts
from sbora.adapters.overlap import (
    CROSSTALK_MEANING,
    WEIGHT_OVERLAP_MEANING,
    calibration_energies,
    crosstalk_rows,
    crosstalk_summary,
    overlap_rows,
)
from sbora.adapters.registry import composable_methods, or_list
from sbora.adapters.slots import slot_clashes
from sbora.cli import Command, Invocation, Section, yaml_layer
from sbora.configuration import ConfigError, check_fields, from_dict
from sbora.fileio import write_json, write_text

from .concept.adapter import ADAPTER_FILE, load_concept_adapter
from .fusion import Fused, concept_prompts, fuse, save_fused
from .generate import DTYPES, default_device, dtype_for, save_images
from .kinds import PromptEmbeds, kind_of
from .regional import DEFAULT_MODE, MODES as REGIONAL_MODES, RegionalPrompt, RegionError, box_mask, image_mask, install_regional_processors, parse_box, regional_sampling
from .tokens import install_concept_tokens, resolve_token_ids

MODES = ("unmerged", "merged")
DEFAULT_OVERLAP_THRESHOLD = 1e-3  # above float32 round-off of orthogonal bases (~1e-7), far below real overlaps (~0.03+)
REGIONAL_PROMPT = "a photo of {token} {class_word}"
# The default calibration run of the output cross-talk: per concept up to 4 of its own prompts, 2 steps at 64 px.
CALIBRATION_STEPS, CALIBRATION_SIZE, CALIBRATION_PROMPTS = 2, 64, 4
_NAME = re.compile(r"[A-Za-z0-9_-]+")
# HF fast tokenizers are not safe to call from two threads at once ("Already borrowed"): one at a time.
_TOKENIZER_LOCK = threading.Lock()


class CompositionError(ConfigError):
    """Concepts that cannot be composed as asked; the message says what to do."""


# ------------------------------------------------------------------------------------ configs


@dataclass
class ConceptSpec:
    """One concept of a composition YAML."""

    concept: str = field(default="", metadata={"help": "the trained concept: its adapter is <outputs>/<concept>/<method>/adapter.safetensors"})
    method: str = field(default=DEFAULT_METHOD, metadata={"help": "the method folder the concept was trained into"})
    adapter: str | None = field(default=None, metadata={"help": "the adapter file itself (instead of concept and method)"})
    name: str | None = field(default=None, metadata={"help": "the concept's name in this composition (default: the one it was trained as)"})
    slot: int | None = field(default=None, metadata={"help": "the slot it was trained in (checked against the file)"})
    weight: float = field(default=1.0, metadata={"help": "scale of its update w_k (0..4)"})
    region: list[float] | None = field(default=None, metadata={"help": "box x0, y0, x1, y1 as fractions of the image (regional sampling)"})
    mask: str | None = field(default=None, metadata={"help": "mask image (white = the region) instead of a box"})
    prompt: str | None = field(default=None, metadata={"help": "its regional prompt (default: 'a photo of {token} {class_word}')"})
    calibration_prompts: list[str] | None = field(default=None, metadata={"help": "the prompts its output cross-talk is measured on "
                                                                                     "(default: up to 4 of its eval prompts)"})

    def validate(self) -> None:
        if not self.concept and not self.adapter:
            raise CompositionError("every entry of concepts needs concept: NAME (a trained concept under outputs/) or adapter: FILE")
        for what, value in (("concept", self.concept), ("method", self.method)):
            if value and not _NAME.fullmatch(value):
                raise CompositionError(f"{what} '{value}' is not a folder name under outputs/ (letters, digits, '_' or '-'); give adapter: FILE instead")
        check_fields(self, {"weight": (0, 4), "slot": (0, None)})
        if self.region is not None and self.mask:
            raise CompositionError(f"concept '{self.concept or self.adapter}' has both region and mask: give one of them")
        if self.region is not None:
            parse_box(self.region)

    def label(self) -> str:
        return self.name or self.concept or Path(self.adapter).parent.parent.name


@dataclass
class CompositionConfig:
    prompt: str = field(default="", metadata={"help": "the global prompt (the whole image); may hold the concepts' tokens"})
    concepts: list[ConceptSpec] = field(default_factory=list, metadata={"help": "the concepts (YAML only)"})
    name: str = field(default="composition", metadata={"help": "the composition's name: default output folder <outputs>/compositions/<name>"})
    negative_prompt: str = field(default="", metadata={"help": "negative prompt (classifier-free guidance)"})
    model: str | None = field(default=None, metadata={"help": "base model: embedded name, diffusers folder or hub id (none: the concepts' base)"})
    outputs: str = field(default="outputs", metadata={"help": "the folder trained concepts live in (<concept>/<method>/adapter.safetensors)"})
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2, 3], metadata={"help": "one image per seed (comma-separated)"})
    sample_steps: int = field(default=50, metadata={"help": "DDIM steps", "aliases": ("steps",)})
    guidance_scale: float = field(default=7.5, metadata={"help": "classifier-free guidance scale"})
    height: int | None = field(default=None, metadata={"help": "image height (none: the model's)"})
    width: int | None = field(default=None, metadata={"help": "image width (none: the model's)"})
    batch_size: int = field(default=4, metadata={"help": "images per pipeline call"})
    mode: str = field(default="unmerged", metadata={"help": "unmerged (cores beside the base, chosen per call) or merged (added into the weights)"})
    regional_mode: str = field(default=DEFAULT_MODE, metadata={"help": "how regions confine their concepts: latent (each region denoised as its own "
                                                                       "crop: the concept lands in its box), attention (attention layers only) or "
                                                                       "cross (cross-attention only, Mix-of-Show)"})
    fusion: str = field(default="sum", metadata={"help": "how the concepts' updates combine: sum (W + sum of w_k dW_k) or gradient "
                                                         "(Mix-of-Show: one fused weight per layer fitted to each concept's outputs)"})
    overlap_threshold: float = field(default=DEFAULT_OVERLAP_THRESHOLD, metadata={"help": "warn about a pair of concepts whose per-layer weight overlap (interference) exceeds this (0..1)"})
    allow_overlap: bool = field(default=False, metadata={"help": "compose concepts whose slots share columns/rows (same method and seed, "
                                                                 "meeting slot positions or different index layouts) instead of refusing them"})
    crosstalk: bool = field(default=True, metadata={"help": "also report the output cross-talk |dW_j X_i| / |dW_i X_i| on calibration inputs "
                                                            "(a short run of each concept's own prompts)"})
    calibration_prompts_file: str | None = field(default=None, metadata={"help": "text file of calibration prompts, one a line, "
                                                                                   "{token} and {class_word} filled in per concept (none: each "
                                                                                   "concept's calibration_prompts, else its eval prompts)"})
    calibration_steps: int = field(default=CALIBRATION_STEPS, metadata={"help": "denoising steps of each concept's calibration run"})
    calibration_size: int = field(default=CALIBRATION_SIZE, metadata={"help": "image size (pixels, both sides) of the calibration run"})
    output_dir: str | None = field(default=None, metadata={"help": "output folder (none: <outputs>/compositions/<name>)", "aliases": ("out",)})
    device: str = field(default="auto", metadata={"help": "cuda, cuda:1, cpu, ... or auto (CUDA when available)"})
    dtype: str | None = field(default=None, metadata={"help": f"weights dtype: {', '.join(DTYPES)} (none: float16 on CUDA, else float32)"})

    def validate(self) -> None:
        check_fields(self, {"sample_steps": (1, 1000), "guidance_scale": (0, 100), "height": (8, 4096), "width": (8, 4096),
                            "calibration_steps": (1, 1000), "calibration_size": (8, 4096),
                            "batch_size": (1, 64), "overlap_threshold": (0, 1)})
        if self.mode not in MODES:
            raise CompositionError(f"mode must be one of {', '.join(MODES)}, got '{self.mode}'")
        if self.fusion not in FUSIONS:
            raise CompositionError(f"fusion must be one of {', '.join(FUSIONS)}, got '{self.fusion}'")
        if self.regional_mode not in REGIONAL_MODES:
            raise CompositionError(f"regional_mode must be one of {', '.join(REGIONAL_MODES)}, got '{self.regional_mode}'")
        if self.dtype not in (None, *DTYPES):
            raise CompositionError(f"dtype must be one of {', '.join(DTYPES)}, got '{self.dtype}'")
        if not _NAME.fullmatch(self.name):
            raise CompositionError(f"name '{self.name}' must be made of letters, digits, '_' or '-' (it names the output folder)")
        if not self.seeds or any(s < 0 for s in self.seeds):
            raise CompositionError(f"seeds must be one or more non-negative integers, got {self.seeds}")
        if self.mode == "merged" and any(c.region is not None or c.mask for c in self.concepts):
            raise CompositionError("regions need mode: unmerged (each region runs only its concept's adapters)")
        if self.calibration_size % 8:
            raise CompositionError(f"calibration_size must be a multiple of 8, got {self.calibration_size}")


def load_composition(name_or_path: str | Path, **overrides) -> CompositionConfig:
    """``configs/compositions/NAME.yaml`` (or a YAML path), then field overrides; `name` defaults to the file's name."""
    data, source = composition_values(name_or_path)
    config = from_dict(CompositionConfig, {**data, **overrides}, source=source.removeprefix("from "))
    if not config.concepts:
        raise CompositionError(f"{source.removeprefix('from ')} lists no concepts: add a concepts: list (see configs/compositions/)")
    return config


def composition_values(name_or_path: str | Path) -> tuple[dict, str]:
    """(the fields of a composition YAML, "from <its path>"); `name` defaults to the file's name."""
    data, source = yaml_layer("compositions", name_or_path)
    data.setdefault("name", Path(str(name_or_path)).stem)
    return data, source


def adapter_path(spec: ConceptSpec, outputs: str | Path) -> Path:
    """The adapter file of `spec`; a missing one is an error with the command that trains it."""
    path = Path(spec.adapter).expanduser() if spec.adapter else Path(outputs) / spec.concept / spec.method / ADAPTER_FILE
    if not path.is_file():
        slot = f" --slot {spec.slot}" if spec.slot is not None else ""
        how = (f"train it first: python train_concept.py --concept {spec.concept} --method {spec.method}{slot}"
               if spec.concept else "check the path")
        raise CompositionError(f"concept '{spec.label()}': no adapter file at {path}; {how} (or set adapter: to its file)")
    return path


def find_concepts(outputs: str | Path) -> dict[str, Path]:
    """'<concept>/<method>' -> adapter file, for every concept trained into `outputs` (the trainer's layout).

    Only plain names (letters, digits, '_', '-') and files that really lie inside `outputs`
    (no link out of it) are listed.
    """
    root = Path(outputs).resolve()
    found: dict[str, Path] = {}
    if not root.is_dir():
        return found
    for concept_dir in sorted(root.iterdir()):
        if not (concept_dir.is_dir() and _NAME.fullmatch(concept_dir.name)):
            continue
        for method_dir in sorted(concept_dir.iterdir()):
            file = method_dir / ADAPTER_FILE
            if _NAME.fullmatch(method_dir.name) and file.is_file() and file.resolve().is_relative_to(root):
                found[f"{concept_dir.name}/{method_dir.name}"] = file
    return found


# ------------------------------------------------------------------------------------ composer


@dataclass
class LoadedConcept:
    """A concept put onto the composer's pipeline, as its adapter file describes it."""

    name: str  # the adapter name in the pipeline
    path: Path
    concept: str  # the name it was trained as
    method: str
    token: str | None
    class_word: str | None
    token_mode: str
    slot: int
    seed: int
    base_model: str | None
    weight: float
    vectors: tuple[torch.Tensor, ...] | None = field(default=None, repr=False)  # learned token embeddings (n, D_k), one per text encoder
    claims: frozenset = frozenset()  # token pieces (new tokens) or ids (rare tokens) it owns
    eval_prompts: tuple[str, ...] = ()  # its file's prompt templates ({token}, {class_word})
    slots: tuple = ()  # its files' slot layouts (adapters.slots.SlotLayout): what the slot check compares

    def regional_prompt(self) -> str:
        return REGIONAL_PROMPT.format(token=self.token or "", class_word=self.class_word or "").strip()

    def describe(self) -> dict:
        return {"name": self.name, "concept": self.concept, "method": self.method, "token": self.token,
                "class_word": self.class_word, "slot": self.slot, "weight": self.weight, "adapter": str(self.path)}


@dataclass
class Region:
    """A concept's region for ``Composer.render``: a box (fractions) or a mask picture, and its prompt."""

    concept: str
    box: str | Sequence[float] | None = None
    mask: Image.Image | None = None
    prompt: str | None = None


@dataclass
class Calibration:
    """The inputs the output cross-talk is measured on (``Composer.crosstalk``).

    Per concept i, one pipeline call of its calibration prompts (one image each, seed k for
    prompt k, `steps` DDIM steps at `size`×`size` pixels, guidance's unconditional half
    included, no VAE decoding) with only i's adapters on, at weight 1. Its prompts: `prompts`
    [i] if given (the token written out, or ``{token}``/``{class_word}``), else `templates`
    filled with its token and class word, else up to `max_prompts` of its file's eval
    prompts (``fusion.concept_prompts``: its regional prompt if it has none).
    """

    prompts: dict[str, list[str]] = field(default_factory=dict)
    templates: list[str] = field(default_factory=list)
    steps: int = CALIBRATION_STEPS
    size: int | None = CALIBRATION_SIZE  # None: the model's own size
    guidance_scale: float = 7.5
    max_prompts: int = CALIBRATION_PROMPTS

    def prompts_for(self, concept: LoadedConcept) -> tuple[list[str], str]:
        """(prompts, where they come from: "given", "templates" or "eval prompts") of `concept`."""

        def fill(templates: Sequence[str]) -> list[str]:
            try:
                return [t.format(token=concept.token or "", class_word=concept.class_word or "") for t in templates]
            except (KeyError, IndexError, ValueError) as e:
                raise CompositionError(f"calibration prompt of '{concept.name}' has a placeholder other than {{token}} and "
                                       f"{{class_word}} ({e}); write braces as {{{{ and }}}}") from None

        if self.prompts.get(concept.name):
            return fill(self.prompts[concept.name]), "given"
        if self.templates:
            return fill(self.templates), "templates"
        return concept_prompts(concept)[: self.max_prompts], "eval prompts"

    def settings(self) -> dict:
        return {"steps": self.steps, "size": self.size, "guidance_scale": self.guidance_scale, "max_prompts": self.max_prompts}


def read_prompt_file(path: str | Path) -> list[str]:
    """Prompts of a text file, one a line (blank lines and lines starting with '#' skipped)."""
    path = Path(path).expanduser()
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise CompositionError(f"cannot read calibration prompts from {path} ({e}); give a text file, one prompt a line") from None
    prompts = [line.strip() for line in lines if line.strip() and not line.lstrip().startswith("#")]
    if not prompts:
        raise CompositionError(f"{path} holds no calibration prompt: write one prompt a line")
    return prompts


def same_base(a: str | None, b: str | None) -> bool:
    """One base model named two ways (a relative and an absolute path) is still one base."""
    if not a or not b:
        return True
    pa, pb = Path(a).expanduser(), Path(b).expanduser()
    return a == b or (pa.exists() and pb.exists() and pa.resolve() == pb.resolve())


class Composer:
    """Concepts on one Stable Diffusion or SDXL pipeline, composed per call (see the module docstring; the pipeline's
    kind, ``kinds.py``, says which text encoders it has and how a prompt is encoded).

    ``load``, ``unload``, ``merge`` and ``unmerge`` change the model: call them while no
    ``render`` runs (the app holds its model lock). ``render`` itself changes nothing shared,
    so several threads may render at once.
    """

    def __init__(self, pipe, overlap_threshold: float = DEFAULT_OVERLAP_THRESHOLD):
        self.pipe = pipe
        self.kind = kind_of(pipe)  # SD 1.x/2.x or SDXL: its text encoders and prompt encoding (kinds.py)
        self.overlap_threshold = overlap_threshold
        self.concepts: dict[str, LoadedConcept] = {}
        self.merged: dict[str, float] = {}
        self.fused: dict[str, Fused] = {}  # fused adapters on the pipeline (``fusion.fuse``), by adapter name
        # What the text side looked like before any concept (per text encoder): unloading rebuilds the tokens from it.
        self._tokenizers = [copy.deepcopy(t) for t in self.kind.tokenizers(pipe)]
        self._tables = [te.get_input_embeddings() for te in self.kind.text_encoders(pipe)]
        self._pairs: dict[tuple[str, str], list[dict]] = {}
        self._calibrated: dict[str, dict] = {}  # concept -> its calibration run's energies (``crosstalk``)
        install_regional_processors(pipe.unet)

    @property
    def parts(self) -> tuple:
        return tuple(self.part_models.values())

    @property
    def part_models(self) -> dict:
        """The pipeline's adapted models by part name: unet, text_encoder (SDXL: text_encoder_2)."""
        return self.kind.parts(self.pipe)

    @property
    def base_model(self) -> str | None:
        return getattr(self.pipe, "base_model_id", None)

    # -- loading --------------------------------------------------------------------------

    def load(self, path: str | Path, name: str | None = None, weight: float = 1.0, slot: int | None = None,
             allow_overlap: bool = False) -> LoadedConcept:
        """Put the concept adapter at `path` onto the pipeline as `name` (default: its trained name).

        Everything is checked first (file, name, base model, slot, tokens, shapes); on any
        error the pipeline is left as it was. Adapters whose slots would share columns/rows
        with a loaded concept's (same method and seed, and positions that meet under their
        ranks, or different index layouts: ``adapters.slots.slot_clash``) are refused, naming
        both files and the slot to retrain in, unless `allow_overlap`.
        """
        path = Path(path)
        file = read_adapter(path)
        info = file.extra
        name = name or info.get("concept") or path.parent.parent.name
        try:
            check_adapter_name(name)
        except ValueError as e:
            raise CompositionError(f"{path}: {e}") from None
        if name in self.concepts:
            raise CompositionError(f"two concepts are named '{name}': give one of them another name (name: in the YAML)")
        for other in [self.base_model] + [c.base_model for c in self.concepts.values()]:
            if not same_base(file.base_model, other):
                raise CompositionError(
                    f"concept '{name}' ({path}) was trained on base model '{file.base_model}', but this composition runs on "
                    f"'{other}': compose concepts of one base (model: {file.base_model}), or retrain '{name}' on '{other}'"
                )
        if slot is not None and file.config.slot != slot:
            raise CompositionError(f"concept '{name}' ({path}) was trained in slot {file.config.slot}, the composition says slot {slot}: "
                                   f"fix slot: in the YAML, or retrain it with --slot {slot}")
        vectors = tuple(file.extra_tensors[t.token_tensor] for t in self.kind.texts if t.token_tensor in file.extra_tensors) or None
        mode = info.get("token_mode", "none") if vectors is not None else "none"
        token = info.get("token")
        claims = self._claims(token, mode)
        for other in self.concepts.values():
            if claims & other.claims:
                raise CompositionError(
                    f"concepts '{other.name}' and '{name}' both claim token '{token}' (learned embeddings for the same "
                    f"{'pieces' if mode == 'new' else 'word ids'}): compose only one of them, or retrain one with another --token"
                )
        # Slots partition a layer only at one rank, seed and layout: refuse adapters whose shares meet.
        try:
            files = [path] + [sibling_file(path, info[f"{t.part}_adapter"], "text-encoder adapter") for t in self.kind.texts if info.get(f"{t.part}_adapter")]
            slots = tuple(s for f in files if f.is_file() for s in slot_layouts(f, f"'{name}' ({f})"))
        except AdapterFileError as e:
            raise CompositionError(f"concept '{name}' cannot join this composition: {e}") from None
        clashes = slot_clashes([s for c in self.concepts.values() for s in c.slots], list(slots))
        if clashes and not allow_overlap:
            raise CompositionError(f"concept '{name}' cannot join this composition: " + "; ".join(clashes)
                                   + " (or compose them anyway, overlapping, with allow_overlap)")
        try:
            load_concept_adapter(self.pipe, path, name=name, weight=weight)
        except (AdapterFileError, ConfigError) as e:
            raise CompositionError(f"concept '{name}' cannot join this composition: {e}; train it on this base model "
                                   f"({self.base_model or 'the pipeline given'})") from None
        concept = LoadedConcept(
            name=name, path=path, concept=info.get("concept") or name, method=info.get("method") or file.config.method,
            token=token, class_word=info.get("class_word"), token_mode=mode, slot=file.config.slot, seed=file.config.seed,
            base_model=file.base_model, weight=weight, vectors=vectors, claims=claims,
            eval_prompts=tuple(p for p in info.get("eval_prompts") or () if isinstance(p, str)), slots=slots,
        )
        self.concepts[name] = concept
        return concept

    def _claims(self, token: str | None, mode: str) -> frozenset:
        if not token or mode == "none":
            return frozenset()
        if mode == "new":
            pieces = frozenset(p.lower() for p in token.split())
            vocab = self._tokenizers[0].get_vocab()
            taken = sorted(p for p in pieces if p in vocab)
            if taken:
                raise CompositionError(f"token '{token}' clashes with the base model's own vocabulary ({', '.join(taken)}); retrain the concept with another --token")
            return pieces
        return frozenset(resolve_token_ids(self._tokenizers[0], token, "rare"))

    def unload(self, name: str) -> None:
        """Take concept (or fused adapter) `name` off the pipeline: its adapters, the fused adapters built from it,
        and its token (the others' tokens are rebuilt)."""
        if name not in self.concepts and name not in self.fused:
            raise CompositionError(f"no concept named '{name}' is loaded; loaded: {', '.join(self.concepts) or 'none'}")
        if self.merged:
            raise CompositionError("the composition is merged into the weights: unmerge it before unloading a concept")
        for model in self.parts:
            if adapted_layers(model, name):
                remove(model, name)
        if self.fused.pop(name, None) is not None:
            return
        for fused in [f for f, info in self.fused.items() if name in info.members]:
            self.unload(fused)
        concept = self.concepts.pop(name)
        self._pairs = {k: v for k, v in self._pairs.items() if name not in k}
        if concept.vectors is not None:
            for k, text in enumerate(self.kind.texts):
                tokenizer, te = copy.deepcopy(self._tokenizers[k]), getattr(self.pipe, text.part)
                te.set_input_embeddings(self._tables[k])
                for c in self.concepts.values():
                    if c.vectors is not None:
                        install_concept_tokens(tokenizer, te, c.token, c.token_mode, vectors=c.vectors[k])
                setattr(self.pipe, text.tokenizer, tokenizer)

    def selection(self, weights: Mapping[str, float] | None = None) -> dict[str, float]:
        """{concept: weight}: `weights` checked against the loaded concepts and fused adapters (default: all concepts, at their load weights)."""
        if weights is None:
            return {n: c.weight for n, c in self.concepts.items()}
        unknown = sorted(set(weights) - set(self.concepts) - set(self.fused))
        if unknown:
            raise CompositionError(f"no concept named {', '.join(map(repr, unknown))} is loaded; loaded: {', '.join(self.concepts) or 'none'}")
        return dict(weights)

    # -- overlap --------------------------------------------------------------------------

    def overlap(self, names: Sequence[str] | None = None, crosstalk: bool = True, calibration: Calibration | None = None) -> OverlapReport:
        """The report on every pair of `names` (default: all loaded): per-layer weight overlap (interference, from
        the cores' factors) and, with `crosstalk` (the default), the output cross-talk on calibration inputs
        (``crosstalk``; `calibration` default: ``Calibration()``). Weight overlap alone is instant; the
        cross-talk runs each concept once (cached until the concepts or the calibration change)."""
        names = list(self.selection({n: 1.0 for n in names} if names is not None else None))
        rows = []
        for i, a in enumerate(names):
            for b in names[i + 1 :]:
                key = (a, b)
                if key not in self._pairs:
                    self._pairs[key] = overlap_rows(self.part_models, [a, b])
                rows += self._pairs[key]
        talk = self.crosstalk(names, calibration) if crosstalk else None
        return OverlapReport(rows, self.overlap_threshold, {n: self.concepts[n] for n in names if n in self.concepts}, crosstalk=talk)

    def crosstalk(self, names: Sequence[str] | None = None, calibration: Calibration | None = None) -> dict:
        """Output cross-talk ‖ΔW_j X_i‖ / ‖ΔW_i X_i‖ of every ordered pair of the concepts `names` (default: all), per layer.

        X_i: the inputs each layer sees while concept i alone (weight 1) runs its calibration
        prompts (`calibration`, see ``Calibration``); ``adapters.overlap.calibration_energies``
        reduces them to one number per layer and concept as the run ends. A concept's run is
        kept and reused while it, the concepts it was measured against and the calibration
        stay the same. Fused adapters are left out (they have no prompts of their own); with a
        merged composition nothing is measured (the runs need the concepts switchable).

        Returns ``{"layers": per-layer rows (``crosstalk_rows``), "pairs": per directed pair
        (``crosstalk_summary``), "calibration": {concept: {"prompts", "source"}}, "settings",
        "seconds": time of the runs made now, "skipped": why nothing was measured, or None}``.
        """
        calibration = calibration or Calibration()
        names = [n for n in (names if names is not None else self.concepts) if n in self.concepts]
        result = {"layers": [], "pairs": [], "calibration": {}, "settings": calibration.settings(), "seconds": 0.0, "skipped": None}
        if self.merged:
            result["skipped"] = "the composition is merged into the weights: unmerge it to measure cross-talk"
            return result
        if len(names) < 2:
            return result  # no pair: nothing to run
        prompts = {n: calibration.prompts_for(self.concepts[n]) for n in names}
        result["calibration"] = {n: {"prompts": p, "source": src} for n, (p, src) in prompts.items()}
        key = {n: json.dumps([p, calibration.settings()]) for n, (p, _) in prompts.items()}

        def fresh(n: str) -> bool:
            entry = self._calibrated.get(n)
            return (entry is not None and entry["key"] == key[n] and entry["concept"] is self.concepts[n]
                    and all(entry["against"].get(m) is self.concepts[m] for m in names))

        stale = [n for n in names if not fresh(n)]
        if stale:
            runs = {n: (1.0, lambda n=n: self._calibration_run(prompts[n][0], calibration)) for n in stale}
            start = time.perf_counter()
            energies = calibration_energies(self.part_models, runs, others=list(self.concepts))
            result["seconds"] = round(time.perf_counter() - start, 3)
            for n in stale:
                self._calibrated[n] = {"key": key[n], "concept": self.concepts[n], "against": dict(self.concepts), "energies": energies[n]}
        result["layers"] = crosstalk_rows({n: self._calibrated[n]["energies"] for n in names}, names)
        result["pairs"] = crosstalk_summary(result["layers"])
        return result

    def _calibration_run(self, prompts: Sequence[str], calibration: Calibration) -> None:
        """One pipeline call of `prompts` (seed k for prompt k), stopped before the VAE: what the layers see is the point."""
        pipe = self.pipe
        size = calibration.size or pipe.unet.config.sample_size * pipe.vae_scale_factor
        cfg = calibration.guidance_scale > 1 and pipe.unet.config.time_cond_proj_dim is None
        device = pipe._execution_device
        encoded = PromptEmbeds.cat([self._encode(p, "", cfg, device) for p in prompts])  # one row per prompt
        call = copy.copy(pipe)  # as ``render``: a call of its own, with its own scheduler
        call.scheduler = copy.deepcopy(pipe.scheduler)
        call.set_progress_bar_config(disable=True)
        call(**encoded.call_kwargs(1),
             generator=[torch.Generator().manual_seed(k) for k in range(len(prompts))], num_inference_steps=calibration.steps,
             guidance_scale=calibration.guidance_scale, height=size, width=size, output_type="latent")

    # -- merged mode ----------------------------------------------------------------------

    def merge(self, weights: Mapping[str, float] | None = None) -> None:
        """Add w_k·ΔW_k of each concept into the base weights (SBoRA: r columns/rows each)."""
        if self.merged:
            raise CompositionError("a composition is already merged: unmerge it first")
        selection = self.selection(weights)
        for name, w in selection.items():
            for model in self.parts:
                set_adapter_weight(model, name, w)
                merge_adapter(model, name)
            self.merged[name] = w

    def unmerge(self) -> None:
        """Take the merged concepts out again, last first: SBoRA restores the base bit-exactly."""
        for name in reversed(list(self.merged)):
            for model in self.parts:
                unmerge_adapter(model, name)
        self.merged = {}

    # -- sampling -------------------------------------------------------------------------

    def _encode(self, prompt: str, negative: str, cfg: bool, device) -> PromptEmbeds:
        """(1, T, D) embeddings of `prompt` (and of `negative` with guidance) under the current selection; SDXL's pooled ones too."""
        with _TOKENIZER_LOCK:
            return self.kind.encode_prompt(self.pipe, prompt, negative, cfg, device)

    def _region(self, region: Region, selection: dict[str, float], height: int, width: int, negative: str, cfg: bool,
                device) -> RegionalPrompt:
        concept = self.concepts.get(region.concept)
        # The region runs its concept, or the fused adapter of the selection that stands for it.
        owner = region.concept if region.concept in selection else next(
            (n for n in selection if n in self.fused and region.concept in self.fused[n].members), None)
        if concept is None or owner is None:
            raise RegionError(f"a region names concept '{region.concept}', which is not part of this composition "
                              f"({', '.join(selection) or 'none'})")
        if (region.box is None) == (region.mask is None):
            raise RegionError(f"the region of '{region.concept}' needs a box or a mask (one of them)")
        mask = box_mask(region.box, height, width) if region.box is not None else image_mask(region.mask, height, width)
        own = {owner: selection[owner]}
        with active_adapters(self.parts, own):
            embeds = self._encode(region.prompt or concept.regional_prompt(), negative, cfg, device)
        return RegionalPrompt(selection=own, cond=embeds.cond, uncond=embeds.uncond, mask=mask.to(device), pooled=embeds.pooled,
                              pooled_uncond=embeds.pooled_uncond)

    @torch.no_grad()
    def render(self, prompt: str, seeds: Sequence[int], weights: Mapping[str, float] | None = None, *,
               regions: Sequence[Region] = (), negative_prompt: str = "", steps: int = 50, guidance_scale: float = 7.5,
               height: int | None = None, width: int | None = None, batch_size: int = 4, regional_mode: str = DEFAULT_MODE) -> list[Image.Image]:
        """One image per seed of `prompt` with the concepts `weights` ({name: weight}; default all) active.

        Image k uses seed k through its own CPU generator, as ``generate.render``. With
        `regions`, each concept of a region is confined to it as `regional_mode` says
        (``regional.py``: ``latent``, the default, confines it in every layer; ``attention`` in
        the attention layers; ``cross`` in cross-attention only); outside the regions act the
        concepts that have none (in ``cross`` mode: all of them). In merged mode `weights` must be
        the merged ones.
        """
        selection = self.selection(weights)
        if regions and self.merged:
            raise RegionError("regional sampling needs unmerged concepts (each region runs only its own): unmerge first")
        pipe = self.pipe
        scale = pipe.vae_scale_factor
        height = height or pipe.unet.config.sample_size * scale
        width = width or pipe.unet.config.sample_size * scale
        if height % 8 or width % 8:
            raise CompositionError(f"height and width must be multiples of 8, got {height}x{width}")
        cfg = guidance_scale > 1 and pipe.unet.config.time_cond_proj_dim is None  # as the pipeline decides
        device = pipe._execution_device
        # A pipeline keeps per-call state (its scheduler's timesteps, guidance settings): each call
        # gets its own shallow copy with its own scheduler; the models themselves are shared.
        call = copy.copy(pipe)
        call.scheduler = copy.deepcopy(pipe.scheduler)
        call.set_progress_bar_config(disable=True)
        images: list[Image.Image] = []
        with active_adapters(self.parts, selection):
            embeds = self._encode(prompt, negative_prompt, cfg, device)
            prompts = [self._region(r, selection, height, width, negative_prompt, cfg, device) for r in regions]
        # Outside the regions: the concepts that have no region (all of them in cross mode, as Mix-of-Show).
        placed = {n for r in prompts for n in r.selection}
        background = selection if regional_mode == "cross" else {n: w for n, w in selection.items() if n not in placed}
        with active_adapters(self.parts, background):
            scope = regional_sampling(pipe.unet, prompts, (height // scale, width // scale), cfg, regional_mode) if prompts else contextlib.nullcontext()
            with scope:
                for i in range(0, len(seeds), batch_size):
                    chunk = list(seeds[i : i + batch_size])
                    n = len(chunk)
                    out = call(
                        **embeds.call_kwargs(n),
                        generator=[torch.Generator().manual_seed(int(s)) for s in chunk], num_inference_steps=steps,
                        guidance_scale=guidance_scale, height=height, width=width,
                    )
                    images += out.images
        return images


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.3g}"


class OverlapReport:
    """What a composition's concepts share, per pair and per layer: the weight overlap (``adapters.overlap.overlap_rows``)
    and, when measured, the output cross-talk on calibration inputs (``Composer.crosstalk``); see the two meanings above."""

    def __init__(self, rows: list[dict], threshold: float, concepts: Mapping[str, LoadedConcept], crosstalk: dict | None = None):
        self.rows, self.threshold, self.concepts, self.crosstalk = rows, threshold, dict(concepts), crosstalk

    def pairs(self) -> list[dict]:
        """Per pair a, b: the weight overlap (max interference, worst layer, layers above the threshold, shared SBoRA
        indices if comparable) and the output cross-talk: ``crosstalk`` (the two directed summaries, b on a's inputs and
        a on b's; None when not measured), ``median_crosstalk`` (the larger of the two medians over layers) and
        ``max_crosstalk`` (the largest layer of either direction)."""
        out: dict[frozenset, dict] = {}
        for row in self.rows:
            s = out.setdefault(frozenset(row["pair"]), {"pair": "+".join(row["pair"]), "layers": 0, "above": 0, "max_interference": 0.0,
                                                        "worst_layer": None, "shared_indices": None})
            s["layers"] += 1
            s["above"] += row["interference"] > self.threshold
            if row["interference"] >= s["max_interference"]:
                s["max_interference"], s["worst_layer"] = row["interference"], f"{row['part']}.{row['layer']}"
            if row["shared_indices"] is not None:
                s["shared_indices"] = (s["shared_indices"] or 0) + row["shared_indices"]
        for s in out.values():
            s.update(crosstalk=None, median_crosstalk=None, max_crosstalk=None)
        for d in (self.crosstalk or {}).get("pairs", ()):
            s = out.get(frozenset((d["inputs"], d["update"])))
            if s is None:
                continue
            s["crosstalk"] = (s["crosstalk"] or []) + [d]
            for k, v in (("median_crosstalk", d["median"]), ("max_crosstalk", d["max"])):
                if v is not None:
                    s[k] = v if s[k] is None else max(s[k], v)
        return list(out.values())

    def warnings(self) -> list[str]:
        messages = []
        for s in self.pairs():
            if s["above"]:
                a, b = s["pair"].split("+")
                ca, cb = self.concepts.get(a), self.concepts.get(b)
                why = ("a fused adapter" if ca is None or cb is None else f"slot {ca.slot} twice" if (ca.slot, ca.seed) == (cb.slot, cb.seed) else
                       f"seeds {ca.seed} and {cb.seed}" if ca.seed != cb.seed else f"{ca.method} and {cb.method}")
                shared = f", {s['shared_indices']} shared indices" if s["shared_indices"] else ""
                messages.append(
                    f"concepts {a} and {b} overlap on {s['above']} of {s['layers']} layers (interference up to "
                    f"{s['max_interference']:.3g} at {s['worst_layer']}{shared}; {why}): train them with the same --seed in "
                    f"different --slot values of {or_list(composable_methods())} so that their updates change disjoint parts of the weights"
                )
        return messages

    def lines(self) -> list[str]:
        """The report as text lines (what ``sbora-compose`` prints): per pair its weight overlap, then its cross-talk."""
        out = []
        for s in self.pairs():
            out.append(f"weight overlap {s['pair']}: max interference {s['max_interference']:.3g} over {s['layers']} layers"
                       + (f", {s['shared_indices']} shared indices" if s["shared_indices"] is not None else ""))
            for d in s["crosstalk"] or ():
                out.append(f"output cross-talk on calibration inputs, |dW_{d['update']} X_{d['inputs']}| / |dW_{d['inputs']} X_{d['inputs']}|: "
                           f"median {_fmt(d['median'])}, max {_fmt(d['max'])} ({d['worst_layer']}), overall {_fmt(d['overall'])} "
                           f"over {d['layers']} layers")
        if self.crosstalk and self.crosstalk.get("skipped"):
            out.append(f"output cross-talk not measured: {self.crosstalk['skipped']}")
        return out

    def markdown(self) -> str:
        """The report as Markdown: the per-pair table with both measures, what each guarantees, the calibration inputs."""
        lines = ["| concepts | weight overlap (max interference) | layers above " + f"{self.threshold:g}" + " | shared indices | "
                 "output cross-talk on calibration inputs (median over layers) | max (layer) |", "|---|---|---|---|---|---|"]
        for s in self.pairs():
            talk = "; ".join(f"{d['update']} on {d['inputs']}'s inputs {_fmt(d['median'])}" for d in s["crosstalk"] or ()) or "not measured"
            worst = max((d for d in s["crosstalk"] or () if d["max"] is not None), key=lambda d: d["max"], default=None)
            lines.append(f"| {s['pair']} | {s['max_interference']:.3g} | {s['above']} of {s['layers']} | "
                         f"{'-' if s['shared_indices'] is None else s['shared_indices']} | {talk} | "
                         f"{_fmt(worst['max']) + ' (' + worst['worst_layer'] + ')' if worst else '-'} |")
        lines += ["", WEIGHT_OVERLAP_MEANING, "", CROSSTALK_MEANING]
        if self.crosstalk:
            if self.crosstalk.get("skipped"):
                lines += ["", f"Output cross-talk not measured: {self.crosstalk['skipped']}."]
            settings = self.crosstalk["settings"]
            lines += ["", f"Calibration: {settings['steps']} denoising step(s) at {settings['size'] or 'the model size'} px, "
                          f"guidance {settings['guidance_scale']:g}, each concept alone at weight 1, on:"]
            lines += [f"- {n} ({c['source']}): " + "; ".join(c["prompts"]) for n, c in self.crosstalk["calibration"].items()]
        return "\n".join(lines)

    def to_json(self) -> dict:
        return {"threshold": self.threshold, "pairs": self.pairs(),
                "layers": [{**r, "pair": "+".join(r["pair"])} for r in self.rows],
                "crosstalk": self.crosstalk,
                "meaning": {"weight_overlap": WEIGHT_OVERLAP_MEANING, "output_crosstalk": CROSSTALK_MEANING}}


# ------------------------------------------------------------------------------------ fusion


def sum_fusion(composer: Composer, weights: dict[str, float], **render) -> dict[str, float]:
    """The plain sum W + Σ_k w_k·ΔW_k: every concept's own cores at its weight."""
    return dict(weights)


def gradient_fusion(composer: Composer, weights: dict[str, float], **render) -> dict[str, float]:
    """Mix-of-Show's gradient fusion (``fusion.py``): the concepts' fused adapter, alone at weight 1."""
    return {fuse(composer, weights, **render).name: 1.0} if weights else {}


# fusion name -> fuse(composer, {concept: weight}, **sampler settings of Composer.render) -> the selection the composition runs.
FUSIONS: dict[str, Callable[..., dict[str, float]]] = {"sum": sum_fusion, "gradient": gradient_fusion}


# ------------------------------------------------------------------------------------ command


def compose(config: CompositionConfig, pipe=None) -> dict:
    """Load the concepts of `config`, check them, render the composition and write its files; returns a summary.

    `pipe` (changed in place: the concepts are added to it) skips loading the base model.
    """
    config.validate()
    if not config.concepts:
        raise CompositionError("a composition needs at least one concept")
    paths = [adapter_path(spec, config.outputs) for spec in config.concepts]
    templates = read_prompt_file(config.calibration_prompts_file) if config.crosstalk and config.calibration_prompts_file else []
    masks = {}
    for spec in config.concepts:
        if spec.mask:
            try:
                with Image.open(spec.mask) as im:
                    im.load()
                    masks[spec.label()] = im.copy()
            except (OSError, ValueError, Image.DecompressionBombError) as e:
                raise RegionError(f"concept '{spec.label()}': cannot read mask {spec.mask} ({e}); give a black-and-white PNG") from None
    if pipe is None:
        from .models import load_pipeline

        bases = {read_adapter(p).base_model for p in paths} - {None}
        model = config.model or (bases.pop() if len(bases) == 1 else None)
        if model is None:
            raise CompositionError(f"the concepts were trained on different base models ({', '.join(sorted(bases))}): "
                                   "compose concepts of one base, or set model:")
        device = default_device(config.device)
        pipe = load_pipeline(model, device=device, dtype=dtype_for(config.dtype, device))
    composer = Composer(pipe, overlap_threshold=config.overlap_threshold)
    weights = {}
    for spec, path in zip(config.concepts, paths):
        concept = composer.load(path, name=spec.name, weight=spec.weight, slot=spec.slot, allow_overlap=config.allow_overlap)
        weights[concept.name] = spec.weight
    calibration = Calibration(
        prompts={name: spec.calibration_prompts for name, spec in zip(weights, config.concepts) if spec.calibration_prompts},
        templates=templates,
        steps=config.calibration_steps, size=config.calibration_size,
    )
    report = composer.overlap(list(weights), crosstalk=config.crosstalk, calibration=calibration)
    for message in report.warnings():
        warnings.warn(message, stacklevel=2)
    render = dict(negative_prompt=config.negative_prompt, steps=config.sample_steps, guidance_scale=config.guidance_scale,
                  height=config.height, width=config.width)
    selection = FUSIONS[config.fusion](composer, weights, **render)
    names = list(weights)
    regions = [Region(concept=n, box=spec.region, mask=masks.get(spec.label()), prompt=spec.prompt)
               for n, spec in zip(names, config.concepts) if spec.region is not None or spec.mask]
    if config.mode == "merged":
        composer.merge(selection)
    try:
        images = composer.render(config.prompt, config.seeds, selection, regions=regions, batch_size=config.batch_size,
                                 regional_mode=config.regional_mode, **render)
    finally:
        composer.unmerge()
    out = Path(config.output_dir) if config.output_dir else Path(config.outputs) / "compositions" / config.name
    described = []
    for n, spec in zip(names, config.concepts):
        region = {"region": spec.region} if spec.region is not None else {"mask": spec.mask} if spec.mask else {}
        described.append({**composer.concepts[n].describe(), **region, **({"prompt": spec.prompt} if spec.prompt else {})})
    records = save_images(images, [config.prompt], list(config.seeds), out, negative_prompt=config.negative_prompt,
                          concepts=described, mode=config.mode, fusion=config.fusion, base_model=composer.base_model,
                          **({"regional_mode": config.regional_mode} if regions else {}))
    write_json(out / "overlap.json", report.to_json())
    write_text(out / "overlap.md", report.markdown() + "\n")
    fusion = {}
    for fused in (composer.fused[n] for n in selection if n in composer.fused):
        fusion = {**fused.summary(), "adapter": str(save_fused(composer, fused, out / "fused.safetensors", concept=config.name))}
        write_json(out / "fusion.json", fused.to_json())
    return {"out": str(out), "images": len(records), "concepts": names, "overlap": report.pairs(), "warnings": report.warnings(),
            "fusion": fusion, "report": report.lines(), "crosstalk_seconds": report.crosstalk["seconds"] if report.crosstalk else None}


def _print_warning(message, category, filename, lineno, file=None, line=None) -> None:
    print(f"warning: {message}", file=sys.stderr)


def _run(invocation: Invocation) -> None:
    with warnings.catch_warnings():
        warnings.showwarning = _print_warning
        result = compose(invocation.configs["composition"])
    for line in result["report"]:
        print(line)
    fusion = result["fusion"]
    if fusion:
        print(f"gradient fusion of {fusion['layers']} layers in {fusion['seconds']:.1f} s: mean relative output error on the concepts' "
              f"own inputs {fusion['sum_error']:.3g} (plain sum) -> {fusion['fused_error']:.3g} (fused); wrote {fusion['adapter']}")
    print(f"wrote {result['images']} images, {Path(result['out']) / 'manifest.jsonl'} and {Path(result['out']) / 'overlap.json'} "
          f"(weight overlap and output cross-talk, per layer; tables in overlap.md)")


COMMAND = Command("sbora-compose", __doc__, _run, sections=(
    Section("composition", CompositionConfig, title="composition options (override the --config YAML; its concepts: list is YAML only)",
            option="config", load=composition_values, required=True, skip=("concepts",),
            option_help="composition YAML: a name from configs/compositions/ or a path"),
))
main = COMMAND.main


if __name__ == "__main__":
    sys.exit(main())
