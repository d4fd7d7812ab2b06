"""The concept trainer's options (``TrainConfig``: the engine's and the procedures' plus
DreamBooth's), the training YAMLs they load from (``configs/train/``), and ``ConceptRun``:
one run's concept, method, adapters and output folder, resolved and checked before that
folder is touched."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path

from sbora.adapters import AdapterConfig, load_adapter_config
from sbora.adapters.registry import CONCEPT, check_trained_method
from sbora.configuration import CONFIG_DIR, ConfigError, check_fields, from_dict, load_yaml, override, resolve_named_config
from sbora.procedures import ProcedureConfig

from ..models import DEFAULT_MODEL
from ..tokens import TOKEN_MODES
from .config import ConceptConfig, load_concept, safe_name
from .loss import TIMESTEP_BIAS


@dataclass
class TrainConfig(ProcedureConfig):
    resolution: int | None = field(default=None, metadata={"help": "training/sampling resolution in pixels (none: the model's native size)"})
    text_encoder_lr: float | None = field(default=None, metadata={"help": "learning rate of the text-encoder adapter (none: --lr)"})
    token_lr: float = field(default=1e-3, metadata={"help": "learning rate of the concept's token embeddings"})
    gradient_checkpointing: bool = field(default=False, metadata={"help": "recompute activations in the backward pass: less memory, more compute"})
    train_text_encoder: bool = field(default=False, metadata={"help": "also put adapters on the CLIP text encoder"})
    text_encoder_targets: list[str] = field(default_factory=lambda: ["clip-text"], metadata={"help": "targets of the text-encoder adapter (presets clip-text, clip-text-mlp, or suffixes)"})
    token_mode: str = field(default="new", metadata={"help": "concept token embeddings: new (add the token, learn it), rare (learn an existing word's embedding), none (token stays plain text)"})
    with_prior_preservation: bool = field(default=False, metadata={"help": "DreamBooth prior preservation with class images"})
    prior_loss_weight: float = field(default=1.0, metadata={"help": "weight of the class-image loss"})
    num_class_images: int = field(default=100, metadata={"help": "class images to use; missing ones are generated once with the base model and cached"})
    prediction_type: str | None = field(default=None, metadata={"help": "epsilon or v_prediction (none: the scheduler config's)"})
    snr_gamma: float | None = field(default=None, metadata={"help": "Min-SNR-gamma loss weighting (5.0 is the paper's; none: off)"})
    noise_offset: float = field(default=0.0, metadata={"help": "noise offset (e.g. 0.05; 0: off)"})
    input_perturbation: float = field(default=0.0, metadata={"help": "extra noise in the UNet's input alone, not its target (diffusers' "
                                                                     "--input_perturbation, Ning et al. 2023; e.g. 0.1; 0: off)"})
    center_crop: bool = field(default=True, metadata={"help": "centre crop after resizing (else a random crop each time)"})
    random_flip: bool = field(default=False, metadata={"help": "flip images horizontally at random (off: keeps asymmetric concepts right)"})
    timestep_bias_strategy: str = field(default="none", metadata={"help": "draw the training timesteps uniformly (none), or more often at the clean end "
                                                                         "(earlier) or the noisy end (later), as diffusers' --timestep_bias_strategy"})
    timestep_bias_multiplier: float = field(default=1.0, metadata={"help": "how many times as often the biased timesteps are drawn (1: no bias)"})
    timestep_bias_portion: float = field(default=0.25, metadata={"help": "the share of the timesteps that is biased"})
    background_loss_weight: float = field(default=1.0, metadata={"help": "weight of the loss outside each photo's mask (masks/<photo>.png in the concept's "
                                                                         "folder, white on the concept), as kohya's masked loss: 0 trains on the concept's "
                                                                         "pixels alone; 1: every pixel alike, no masks needed"})
    caption_column: str | None = field(default=None, metadata={"help": "train each photo with its own caption, this column of metadata.jsonl in the "
                                                                       "concept's folder (🤗 datasets' imagefolder layout; {token} and {class_word} filled), as "
                                                                       "diffusers' --caption_column; none: instance_prompt for every photo"})
    validation_steps: int = field(default=0, metadata={"help": "save a validation grid every N steps (0: only the final samples.png)"})
    validation_epochs: int | None = field(default=None, metadata={"help": "as diffusers' scripts: a validation grid every N epochs of the photos "
                                                                          "(an epoch: ceil(photos / batch size / grad accum) steps); replaces --validation-steps"})
    num_validation_images: int = field(default=2, metadata={"help": "images per validation prompt (seeds 0..N-1)"})
    sample_steps: int = field(default=25, metadata={"help": "DDIM steps of validation, sample and class images"})
    guidance_scale: float = field(default=7.5, metadata={"help": "classifier-free guidance of validation, sample and class images"})
    score_clip: str | None = field(default=None, metadata={"help": "CLIP that scores the final samples against the concept's photos (CLIP-I of the base's and the adapted "
                                                                   "images, printed and saved to scores.json): pocket, ViT-B-32 (+ its openai weights), local-dir:FOLDER; none: off"})

    def validate(self) -> None:
        super().validate()
        check_fields(self, {
            "resolution": (8, 4096), "text_encoder_lr": (0, None, "open"), "token_lr": (0, None), "prior_loss_weight": (0, None),
            "num_class_images": (1, None), "snr_gamma": (0, None, "open"), "noise_offset": (0, 1), "input_perturbation": (0, 1),
            "background_loss_weight": (0, 1),
            "timestep_bias_multiplier": (0, None, "open"), "timestep_bias_portion": (0, 1, "open"),
            "validation_steps": (0, None), "validation_epochs": (1, None),
            "num_validation_images": (1, 64), "sample_steps": (1, 1000), "guidance_scale": (0, 100),
        })
        if self.token_mode not in TOKEN_MODES:
            raise ConfigError(f"token_mode must be one of {', '.join(TOKEN_MODES)}, got '{self.token_mode}'")
        if self.timestep_bias_strategy not in TIMESTEP_BIAS:
            raise ConfigError(f"timestep_bias_strategy must be one of {', '.join(TIMESTEP_BIAS)}, got '{self.timestep_bias_strategy}'")
        if self.prediction_type not in (None, "epsilon", "v_prediction"):
            raise ConfigError(f"prediction_type must be epsilon or v_prediction, got '{self.prediction_type}'")

    def loss_options(self) -> dict:
        """The diffusion loss's settings (``loss.diffusion_loss``)."""
        return {"prior_loss_weight": self.prior_loss_weight, "snr_gamma": self.snr_gamma, "noise_offset": self.noise_offset,
                "input_perturbation": self.input_perturbation, "timestep_bias": (self.timestep_bias_strategy, self.timestep_bias_multiplier, self.timestep_bias_portion)}

    def validation_interval(self, photos: int) -> int:
        """Steps between validation grids (0: none). diffusers' epoch is one pass over the photos (or the
        class images, if more) in batches, with accumulation."""
        if not self.validation_epochs:
            return self.validation_steps
        images = max(photos, self.num_class_images if self.with_prior_preservation else 0)
        return self.validation_epochs * math.ceil(math.ceil(images / self.batch_size) / self.grad_accum)


def default_train_config(model: str = DEFAULT_MODEL) -> str:
    """The training YAML of a base model: ``configs/train/<model>.yaml`` for an embedded base that has one (its own
    short settings), else ``default``."""
    return model if (CONFIG_DIR / "train" / f"{model}.yaml").is_file() else "default"


def train_config_path(name_or_path: str | None = None, model: str = DEFAULT_MODEL) -> Path:
    """``configs/train/<name>.yaml`` (or a YAML path); without a name the model's (``default_train_config``)."""
    return resolve_named_config("train", name_or_path or default_train_config(model))


def load_train_config(name_or_path: str | None = None, model: str = DEFAULT_MODEL, **overrides) -> TrainConfig:
    path = train_config_path(name_or_path, model)
    return from_dict(TrainConfig, {**load_yaml(path), **overrides}, source=str(path))


@dataclass
class ConceptRun:
    """One concept run, resolved: what trains (UNet adapter, text-encoder adapter or None) on which photos, and where it goes."""

    concept: ConceptConfig
    method: str  # as given: a registry name or a method YAML's path
    label: str  # the output folder's method part (procedures included, e.g. sbora-fa-delta)
    model: str
    adapter: AdapterConfig | None  # None: no adapter trains (the quality benchmark's full-UNet ceiling)
    te_adapter: AdapterConfig | None
    cfg: TrainConfig
    instance_paths: list[Path]
    out_dir: Path
    instance_prompts: list[str] = field(init=False)  # one per photo: its caption (--caption-column) or the instance prompt
    mask_paths: list[Path] | None = field(init=False)  # one per photo with --background-loss-weight below 1, else None

    def __post_init__(self):  # a bad caption or a missing mask stops here, before the output folder is touched
        self.instance_prompts = self.concept.instance_prompts(self.instance_paths, self.cfg.caption_column)
        self.mask_paths = self.concept.instance_masks(self.instance_paths) if self.cfg.background_loss_weight < 1 else None

    def resolved(self) -> dict:
        """config.yaml's content."""
        return {"model": self.model, "method": self.method, "concept": dataclasses.asdict(self.concept), "concept_key": self.concept.key,
                "adapter": self.adapter and dataclasses.asdict(self.adapter), "text_encoder_adapter": self.te_adapter and dataclasses.asdict(self.te_adapter),
                "train": dataclasses.asdict(self.cfg)}

    def metadata(self, steps: int) -> dict:
        """What the adapter file records about the concept (the app and compose read it)."""
        c = self.concept
        return {"concept": c.key, "display_name": c.name, "method": self.label, "token": c.token, "class_word": c.class_word,
                "token_mode": self.cfg.token_mode, "eval_prompts": c.eval_prompts, "validation_prompts": c.validation_prompts, "steps": steps}


def resolve_run(concept: str | ConceptConfig, method: str, model: str, cfg: TrainConfig, adapter_overrides: dict | None = None,
                concept_overrides: dict | None = None) -> ConceptRun:
    """Everything that can be wrong in the options is checked here, before the output folder is touched:
    the concept and its photos, the method (one of the registry's that this trainer trains, or a YAML path)."""
    concept = concept if isinstance(concept, ConceptConfig) else load_concept(concept, **(concept_overrides or {}))
    instance_paths = concept.instance_images()
    check_trained_method(method, CONCEPT)
    adapter = load_adapter_config(method, **(adapter_overrides or {}))
    # The folder's method part: the method name, or a safe form of a method YAML's file name.
    label = cfg.label_with_procedures(adapter.method if method == adapter.method else safe_name(Path(method).stem), adapter)
    adapter = cfg.adapter_with_procedures(adapter)
    te_adapter = override(adapter, {"targets": cfg.text_encoder_targets}) if cfg.train_text_encoder else None
    out_dir = Path(cfg.output_dir) if cfg.output_dir else Path("outputs") / concept.key / label
    return ConceptRun(concept, method, label, model, adapter, te_adapter, cfg, instance_paths, out_dir)
