r"""Single-concept training: personalize Stable Diffusion to one concept from a few photos.

DreamBooth (Ruiz et al., 2023) with low-rank adapters instead of full fine-tuning, as in
Mix-of-Show and the SBoRA paper: any adapter method of the registry on the UNet's attention
(and optionally the CLIP text encoder), optionally a learned embedding for the concept's
token (Textual-Inversion style, "new" or "rare" token), optional prior preservation with
class images. The loss is in ``concept/loss.py``, the data in ``concept/data.py``; the loop
(optimizer, schedule, precision, checkpoints, resume, Ctrl-C, logs) is the shared engine's.

    python train_concept.py --concept robot --method sbora-fa          # embedded offline default
    accelerate launch train_concept.py --concept dog --method sbora-fa \
        --model /path/to/stable-diffusion-v1-5 --mixed-precision fp16

Outputs in ``outputs/<concept>/<method>/`` (or ``--output-dir``): adapter.safetensors
(+ adapter.text_encoder.safetensors), config.yaml (everything resolved), samples.png (base
and adapted images side by side, labelled), log.jsonl, logs/ (tensorboard),
validation/step-*.png, checkpoints/step-*.pt. Everything is checked before that folder is
touched, and a run only replaces an earlier one with --overwrite (see ``rundir``).
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path

import torch
import yaml

from ..adapters import AdapterConfig, active_adapters, adapter_parameters, inject, load_adapter_config
from ..adapters.config import DEFAULT_METHOD
from ..adapters.registry import CONCEPT, check_trained_method, method_help
from ..cli import add_debug_flag, run_main
from ..concept_adapter import save_concept_adapter
from ..concepts import ConceptConfig, literal_prompt_token, load_concept, safe_name
from ..configuration import (
    CONFIG_DIR,
    ConfigError,
    add_arguments,
    aliases_help,
    canonical_argv,
    check_fields,
    field_aliases,
    from_dict,
    load_yaml,
    override,
    overrides_from_args,
    resolve_named_config,
    shown_path,
)
from ..engine import Engine, Micro
from ..fileio import atomic_path, write_json, write_text
from ..generate import render
from ..grids import labelled_grid
from ..models import DEFAULT_MODEL, load_pipeline
from ..procedures import ProcedureConfig, adapter_metadata, build_procedures
from ..tokens import TOKEN_MODES, install_concept_tokens
from .data import class_image_paths, load_images, sample_batch, tokenize
from .loss import diffusion_loss


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
    center_crop: bool = field(default=True, metadata={"help": "centre crop after resizing (else a random crop each time)"})
    random_flip: bool = field(default=False, metadata={"help": "flip images horizontally at random (off: keeps asymmetric concepts right)"})
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
            "num_class_images": (1, None), "snr_gamma": (0, None, "open"), "noise_offset": (0, 1), "validation_steps": (0, None), "validation_epochs": (1, None),
            "num_validation_images": (1, 64), "sample_steps": (1, 1000), "guidance_scale": (0, 100),
        })
        if self.token_mode not in TOKEN_MODES:
            raise ConfigError(f"token_mode must be one of {', '.join(TOKEN_MODES)}, got '{self.token_mode}'")
        if self.prediction_type not in (None, "epsilon", "v_prediction"):
            raise ConfigError(f"prediction_type must be epsilon or v_prediction, got '{self.prediction_type}'")


def train_config_path(name_or_path: str | None = None, model: str = DEFAULT_MODEL) -> Path:
    """``configs/train/<name>.yaml`` (or a YAML path); without a name ``configs/train/<model>.yaml``
    for an embedded base that has one (its own short settings), else ``configs/train/default.yaml``."""
    if name_or_path is None:
        name_or_path = model if (CONFIG_DIR / "train" / f"{model}.yaml").is_file() else "default"
    return resolve_named_config("train", name_or_path)


def load_train_config(name_or_path: str | None = None, model: str = DEFAULT_MODEL, **overrides) -> TrainConfig:
    path = train_config_path(name_or_path, model)
    return from_dict(TrainConfig, {**load_yaml(path), **overrides}, source=str(path))


def method_label(method: str, adapter: AdapterConfig) -> str:
    """The output folder's method part: the method name, or a safe form of a method YAML's file name."""
    return adapter.method if method == adapter.method else safe_name(Path(method).stem)


def default_output_dir(concept: ConceptConfig, label: str) -> Path:
    return Path("outputs") / concept.key / label


@dataclass
class TrainResult:
    out_dir: Path
    adapter_path: Path
    pipe: object
    step: int
    losses: list[float]
    is_main_process: bool = True
    scores: dict | None = None  # scores.json's content with --score-clip


def set_up_adapters(pipe, concept: ConceptConfig, adapter: AdapterConfig, te_adapter: AdapterConfig | None, cfg: TrainConfig):
    """Freeze the base, inject the adapters and token embeddings; return (named params, optimizer groups, tokens)."""
    for part in (pipe.unet, pipe.text_encoder, pipe.vae):
        part.requires_grad_(False)
    name = concept.key
    inject(pipe.unet, adapter, name=name)
    groups = [{"params": adapter_parameters(pipe.unet, name)}]
    if te_adapter is not None:
        inject(pipe.text_encoder, te_adapter, name=name)
        groups.append({"params": adapter_parameters(pipe.text_encoder, name), "lr": cfg.text_encoder_lr or cfg.lr})
    tokens = None
    if cfg.token_mode != "none":
        tokens = install_concept_tokens(pipe.tokenizer, pipe.text_encoder, concept.token, cfg.token_mode, init_word=concept.class_word)
        groups.append({"params": [tokens.vectors], "lr": cfg.token_lr, "weight_decay": 0.0})
    named = {f"{part}.{n}": p for part in ("unet", "text_encoder") for n, p in getattr(pipe, part).named_parameters() if p.requires_grad}
    return named, groups, tokens


def cast_frozen(pipe, dtype: torch.dtype) -> None:
    """Frozen weights to the mixed-precision dtype; trainable ones stay fp32 (as diffusers' scripts)."""
    for part in (pipe.unet, pipe.text_encoder, pipe.vae):
        for p in part.parameters():
            if not p.requires_grad:
                p.data = p.data.to(dtype)


def check_resolution(pipe, res: int) -> None:
    """Images become latents through the VAE: the resolution must be a multiple of its factor."""
    if res % pipe.vae_scale_factor:
        raise ConfigError(f"resolution {res} does not fit this model: it must be a multiple of {pipe.vae_scale_factor} (its VAE's factor)")


def base_prompt(prompt: str, concept: ConceptConfig) -> str:
    """What the base model is asked beside the adapted one: the token replaced by the class word."""
    from ..clip_score import replace_tokens, token_rules

    return replace_tokens(prompt, token_rules(concept.token, concept.class_word))


def sample_images(pipe, concept: ConceptConfig, cfg: TrainConfig, res: int, autocast) -> tuple[list[str], list, list]:
    """(prompts, base images, adapted images) of the validation prompts x seeds (seed-major per prompt)."""
    prompts = [concept.fill(p) for p in concept.validation_prompts]
    seeds = list(range(cfg.num_validation_images))
    kwargs = dict(steps=cfg.sample_steps, guidance_scale=cfg.guidance_scale, height=res, width=res)
    for part in (pipe.unet, pipe.text_encoder):
        part.eval()
    with torch.no_grad(), autocast():
        with active_adapters((pipe.unet, pipe.text_encoder), {}):
            base = render(pipe, [base_prompt(p, concept) for p in prompts], seeds, desc="samples (base)", **kwargs)
        adapted = render(pipe, prompts, seeds, desc="samples (adapted)", **kwargs)
    return prompts, base, adapted


def sample_grid(prompts: list[str], base: list, adapted: list) -> object:
    """Validation prompts (rows) x seeds, each as base model | adapted, labelled."""
    n = len(base) // len(prompts)
    images = [im for r in range(len(prompts)) for s in range(n) for im in (base[r * n + s], adapted[r * n + s])]
    labels = [f"{kind}, seed {s}" for s in range(n) for kind in ("base", "adapted")]
    return labelled_grid(images, rows=len(prompts), cols=2 * n, row_labels=prompts, col_labels=labels)


def sample_scores(scorer, clip_model: str, references: list[Path], base: list, adapted: list) -> dict:
    """CLIP-I of the base's and the adapted samples against the concept's photos (clip_score's measure)."""
    from ..clip_score import image_alignment

    refs = scorer.encode_images(references, desc="encode the concept's photos")  # (R, D)
    before = image_alignment(scorer.encode_images(base, desc="encode base samples"), refs)  # (N,)
    after = image_alignment(scorer.encode_images(adapted, desc="encode adapted samples"), refs)  # (N,)
    return {"clip_model": clip_model, "images": len(base), "references": len(references),
            "clip_i_base": float(before.mean()), "clip_i_adapted": float(after.mean()),
            "clip_i_per_image": {"base": before.tolist(), "adapted": after.tolist()}}


def save_png(image, path: Path) -> None:
    with atomic_path(path) as tmp:
        image.save(tmp, format="PNG")


def resolved_config(model: str, method: str, concept, adapter, te_adapter, cfg) -> dict:
    return {"model": model, "method": method, "concept": dataclasses.asdict(concept), "concept_key": concept.key,
            "adapter": dataclasses.asdict(adapter), "text_encoder_adapter": dataclasses.asdict(te_adapter) if te_adapter else None,
            "train": dataclasses.asdict(cfg)}


def train(
    concept: str | ConceptConfig, method: str = DEFAULT_METHOD, model: str | None = None, *,
    train_config: TrainConfig | None = None, adapter_overrides: dict | None = None, concept_overrides: dict | None = None,
    resume: bool | str = False, pipe=None, stop_event=None, on_step=None,
) -> TrainResult:
    """Train one concept adapter; see the module docstring. `pipe` (modified in place) skips loading
    `model`; `stop_event` (a threading.Event) stops at the next step boundary like Ctrl-C;
    `on_step(step, loss)` is called after every step (a progress display). `model` (the base's name,
    recorded in the adapter) defaults to the one `pipe` was loaded from, else DEFAULT_MODEL."""
    model = model or getattr(pipe, "base_model_id", None) or DEFAULT_MODEL
    cfg = train_config or load_train_config(model=model)
    # 1. Everything that can be wrong is checked before the output folder is touched.
    concept = concept if isinstance(concept, ConceptConfig) else load_concept(concept, **(concept_overrides or {}))
    instance_paths = concept.instance_images()
    check_trained_method(method, CONCEPT)  # a method of the registry this trainer trains, or a YAML path
    adapter = load_adapter_config(method, **(adapter_overrides or {}))
    label = cfg.label_with_procedures(method_label(method, adapter), adapter)
    adapter = cfg.adapter_with_procedures(adapter)
    te_adapter = override(adapter, {"targets": cfg.text_encoder_targets}) if cfg.train_text_encoder else None
    out_dir = Path(cfg.output_dir) if cfg.output_dir else default_output_dir(concept, label)
    if cfg.score_clip:  # loaded before training: a wrong name or missing weights stop the run before its first step
        from ..clip_score import load_clip

        scorer = load_clip(cfg.score_clip)
    engine = Engine(cfg, out_dir, resume=resume, desc=f"train {concept.key}/{label}", stop_event=stop_event)
    scores = None
    try:
        pipe = pipe if pipe is not None else load_pipeline(model)
        res = cfg.resolution or pipe.unet.config.sample_size * pipe.vae_scale_factor
        check_resolution(pipe, res)
        instance_images = load_images(instance_paths, res)
        validation_steps = cfg.validation_steps
        if cfg.validation_epochs:  # diffusers' epoch: one pass over the photos (or the class images, if more)
            epoch = math.ceil(math.ceil(max(len(instance_paths), cfg.num_class_images if cfg.with_prior_preservation else 0) / cfg.batch_size) / cfg.grad_accum)
            validation_steps = cfg.validation_epochs * epoch
        named, groups, tokens = set_up_adapters(pipe, concept, adapter, te_adapter, cfg)  # rank/target errors surface here
        pipe.to(engine.device)
        class_images = []
        if cfg.with_prior_preservation:
            # One process generates the missing class images (from the base: adapters off), the others then read them.
            with engine.accelerator.main_process_first(), engine.accelerator.autocast(), active_adapters((pipe.unet, pipe.text_encoder), {}):
                paths = class_image_paths(pipe, model, concept, cfg.num_class_images, res, cfg.sample_steps, cfg.guidance_scale)
                class_images = load_images(paths, res)
        cast_frozen(pipe, engine.weight_dtype)
        train_te = te_adapter is not None or tokens is not None
        if cfg.gradient_checkpointing:
            pipe.unet.enable_gradient_checkpointing()
            if train_te:
                te = pipe.text_encoder  # transformers 5 name; older releases only have gradient_checkpointing_enable
                (getattr(te, "activation_checkpointing_enable", None) or te.gradient_checkpointing_enable)()
        from diffusers import DDPMScheduler

        noise_scheduler = DDPMScheduler.from_config(pipe.scheduler.config, **({"prediction_type": cfg.prediction_type} if cfg.prediction_type else {}))
        unet, text_encoder = engine.prepare(pipe.unet, pipe.text_encoder) if train_te else (*engine.prepare(pipe.unet), pipe.text_encoder)
        fingerprint = {"adapter": dataclasses.asdict(adapter), "text_encoder_adapter": te_adapter and dataclasses.asdict(te_adapter),
                       "token_mode": cfg.token_mode, "token": concept.token}
        procedures = build_procedures(cfg, adapter, {"unet": pipe.unet, **({"text_encoder": pipe.text_encoder} if te_adapter else {})}, concept.key)
        engine.setup(named, groups, fingerprint=fingerprint, procedures=procedures)
        if engine.is_main:
            write_text(engine.run_dir / "config.yaml", yaml.safe_dump(resolved_config(model, method, concept, adapter, te_adapter, cfg), sort_keys=False))

        instance_ids = tokenize(pipe.tokenizer, concept.fill(concept.instance_prompt), cfg.batch_size)
        class_ids = tokenize(pipe.tokenizer, concept.fill(concept.class_prompt), cfg.batch_size)

        def loss_fn(micro: Micro) -> torch.Tensor:
            pixels, ids = sample_batch(instance_images, class_images, instance_ids, class_ids, cfg.batch_size, res,
                                       cfg.center_crop, cfg.random_flip, micro.generator)
            return diffusion_loss(pipe.vae, noise_scheduler, unet, text_encoder, pixels.to(engine.device), ids, n_instance=cfg.batch_size,
                                  gen=micro.generator, prior_loss_weight=cfg.prior_loss_weight, snr_gamma=cfg.snr_gamma,
                                  noise_offset=cfg.noise_offset)

        def after_step(step: int, loss: float) -> None:
            if on_step is not None:
                on_step(step, loss)
            if validation_steps and step % validation_steps == 0 and step < cfg.steps and engine.is_main:
                grid = sample_grid(*sample_images(pipe, concept, cfg, res, engine.accelerator.autocast))
                save_png(grid, engine.run_dir / "validation" / f"step-{step:06d}.png")
                engine.log_image("validation", grid, step)

        state = engine.run(loss_fn, after_step)
        adapter_path = out_dir / "adapter.safetensors"
        if engine.is_main:
            info = {"concept": concept.key, "display_name": concept.name, "method": label, "token": concept.token,
                    "class_word": concept.class_word, "token_mode": cfg.token_mode, "eval_prompts": concept.eval_prompts,
                    "validation_prompts": concept.validation_prompts, "steps": state.step, **adapter_metadata(procedures)}
            save_concept_adapter(pipe, engine.run_dir / adapter_path.name, concept.key, base_model=str(model), info=info,
                                 tokens=tokens, token_mode=cfg.token_mode)
            prompts, base, adapted = sample_images(pipe, concept, cfg, res, engine.accelerator.autocast)
            save_png(sample_grid(prompts, base, adapted), engine.run_dir / "samples.png")
            if cfg.score_clip:
                scores = sample_scores(scorer, cfg.score_clip, instance_paths, base, adapted)
                write_json(engine.run_dir / "scores.json", {"prompts": prompts, **scores})
        engine.finish()
    except BaseException as e:
        engine.abort(e)  # a Ctrl-C after the last step: TrainingInterrupted (finish with --resume)
        raise
    for m in (pipe.unet, pipe.text_encoder):
        m.eval()
    return TrainResult(out_dir=out_dir, adapter_path=adapter_path, pipe=pipe, step=state.step, losses=state.losses,
                       is_main_process=engine.is_main, scores=scores)


# ---------------------------------------------------------------------------------------------
# Command line: every field an option; --help shows the values this command line will use.

# diffusers' DreamBooth-LoRA script (train_dreambooth_lora.py) names beyond the fields' own
# aliases: a diffusers command line runs by changing only the script's name.
DIFFUSERS_ALIASES = {"pretrained-model-name-or-path": "model", "instance-data-dir": "concept", "resume-from-checkpoint": "resume"}
DIFFUSERS_REFUSED = {
    "num-train-epochs": "the run's length is counted in optimizer steps here: use --steps (or --max_train_steps)",
    "push-to-hub": "nothing is uploaded: the adapter is written to the output folder (sbora-export turns it into a diffusers or kohya file)",
    "hub-token": "nothing is uploaded: drop it", "hub-model-id": "nothing is uploaded: drop it",
    "logging-dir": "logs are written to <output-dir>/logs (tensorboard) and <output-dir>/log.jsonl",
    "allow-tf32": "TF32 is PyTorch's own setting (torch.backends.cuda.matmul.allow_tf32); drop it",
    "enable-xformers-memory-efficient-attention": "diffusers already uses PyTorch's fused scaled-dot-product attention; drop it",
    "dataloader-num-workers": "the photos are decoded once and kept in memory; drop it",
    "scale-lr": "give the learning rate you want with --lr (it is not scaled by batch size or processes)",
    "lr-num-cycles": "not settable here (cosine_with_restarts makes one cycle)", "lr-power": "not settable here (polynomial decays linearly)",
    "revision": "pass a local folder or a hub id with --model", "variant": "pass a local folder or a hub id with --model",
    "tokenizer-name": "the model's own tokenizer is used", "sample-batch-size": "class images are made one batch of seeds at a time",
    "prior-generation-precision": "class images are made in the run's --mixed-precision",
    "local-rank": "start several processes with torchrun or accelerate launch (they set LOCAL_RANK)",
    "pre-compute-text-embeddings": "not needed (the text encoder runs in each step)", "text-encoder-use-attention-mask": "not supported",
    "tokenizer-max-length": "the tokenizer's own length (77) is used", "class-labels-conditioning": "not supported",
    "validation-images": "not supported (validation is text-to-image)",
}
REPORT_TO = ("tensorboard", "all")  # what we log to: tensorboard (logs/) and log.jsonl


def cli_aliases() -> dict[str, str]:
    return {**field_aliases(ConceptConfig, AdapterConfig, TrainConfig), **DIFFUSERS_ALIASES}


def build_parser(argv: list[str] | None = None) -> argparse.ArgumentParser:
    argv = canonical_argv(argv or [], cli_aliases(), DIFFUSERS_REFUSED, "diffusers")
    pre = argparse.ArgumentParser(add_help=False)
    for flag in ("--concept", "--method", "--model", "--config"):
        pre.add_argument(flag)
    known, _ = pre.parse_known_args(argv)
    model, method = known.model or DEFAULT_MODEL, known.method or DEFAULT_METHOD
    epilog = aliases_help(cli_aliases(), DIFFUSERS_REFUSED, "diffusers", note=(
        "A diffusers DreamBooth-LoRA command line runs as it is, with train_concept.py as the script. --seed is the adapter's seed "
        "(its index sets); the seed of data order and noise is --train-seed. A literal --instance-prompt such as 'a photo of sks dog' "
        "trains 'sks' as the token, as plain text (--token-mode none) unless --token-mode says otherwise."))
    p = argparse.ArgumentParser(prog="train_concept.py", description=__doc__, epilog=epilog, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--concept", help="concept name (configs/concepts/NAME.yaml), a concept YAML file, or a folder of images (required)")
    p.add_argument("--method", default=DEFAULT_METHOD, help=f"adapter method: {method_help(CONCEPT)} (configs/methods/METHOD.yaml), "
                   f"or a YAML path (default: {DEFAULT_METHOD})")
    p.add_argument("--model", default=DEFAULT_MODEL, help=f"base model: '{DEFAULT_MODEL}' (embedded, offline), a local diffusers folder, or a hub id (default: {DEFAULT_MODEL})")
    p.add_argument("--config", default=None, help="training config: configs/train/NAME.yaml or a YAML path "
                   "(default: configs/train/<model>.yaml for an embedded model that has one, else configs/train/default.yaml)")
    p.add_argument("--resume", nargs="?", const=True, default=False, metavar="CHECKPOINT",
                   help="continue the run in the output folder from its newest checkpoint (or from the given step-N.pt file or folder; "
                   "'latest' = the newest); with a larger --steps it trains on, the schedule stretched over the new total; a run "
                   "interrupted after its last step is finished (samples, files) without training further")
    p.add_argument("--validation-prompt", action="append", default=None, metavar="PROMPT",
                   help="a validation prompt, taken whole (commas included); repeat for several; replaces the concept's validation_prompts")
    p.add_argument("--report-to", default="tensorboard", help="where training is logged: tensorboard (logs/, plus log.jsonl); the only tracker here")
    add_debug_flag(p)
    concept_cfg = concept_src = None
    if known.concept:
        try:
            concept_cfg = load_concept(known.concept)
            concept_src = f"concept '{known.concept}'"
        except ConfigError:
            pass
    add_arguments(p, ConceptConfig, defaults=concept_cfg, source=concept_src or "the concept's YAML or folder; give --concept to see its values")
    try:
        path = resolve_named_config("methods", method)
        add_arguments(p, AdapterConfig, skip=("method", "delta"), defaults=load_adapter_config(path), source=shown_path(path))
    except ConfigError:
        add_arguments(p, AdapterConfig, skip=("method", "delta"), source="the method's YAML")
    try:
        path = train_config_path(known.config, model)
        add_arguments(p, TrainConfig, defaults=from_dict(TrainConfig, load_yaml(path), source=str(path)), source=shown_path(path))
    except ConfigError:
        add_arguments(p, TrainConfig, source="the training YAML")
    return p


def concept_overrides_of(args: argparse.Namespace) -> tuple[dict, dict]:
    """(concept overrides, training overrides) of the command line; a literal instance prompt
    (diffusers' "a photo of sks dog") names the token, which stays plain text unless --token-mode says otherwise."""
    concept, train_over = overrides_from_args(args, ConceptConfig), overrides_from_args(args, TrainConfig)
    if args.validation_prompt:
        concept["validation_prompts"] = args.validation_prompt
    prompt = concept.get("instance_prompt")
    if prompt and "{token}" not in prompt:
        token, class_word = concept.get("token"), concept.get("class_word")
        if token is None or token not in prompt:
            token, found_class = literal_prompt_token(prompt, concept.get("class_prompt"))
            class_word = class_word or found_class
        concept.update(token=token, instance_prompt=prompt.replace(token, "{token}", 1), **({"class_word": class_word} if class_word else {}))
        train_over.setdefault("token_mode", "none")
        print(f"note: the instance prompt '{prompt}' trains the token '{token}' (class word '{concept.get('class_word', '')}'), "
              f"token mode {train_over['token_mode']}", file=sys.stderr)
    return concept, train_over


def _main(argv: list[str]) -> int:
    argv = canonical_argv(argv, cli_aliases(), DIFFUSERS_REFUSED, "diffusers")
    args = build_parser(argv).parse_args(argv)
    if not args.concept:
        raise ConfigError("give the concept: --concept NAME (configs/concepts/NAME.yaml), a concept YAML file, or a folder of images "
                          "(diffusers' --instance_data_dir works too)")
    if args.report_to not in REPORT_TO:
        raise ConfigError(f"--report_to {args.report_to}: this toolkit logs to tensorboard (<output-dir>/logs) and log.jsonl only; drop it "
                          "or pass tensorboard")
    concept_over, train_over = concept_overrides_of(args)
    cfg = load_train_config(args.config, args.model, **train_over)
    result = train(
        args.concept, args.method, args.model, train_config=cfg,
        adapter_overrides={k: v for k, v in overrides_from_args(args, AdapterConfig).items() if k not in ("method", "delta")},  # --delta: TrainConfig's
        concept_overrides=concept_over, resume=True if args.resume == "latest" else args.resume,
    )
    if result.is_main_process:
        print(f"done: {result.step} steps, final loss {result.losses[-1] if result.losses else float('nan'):.4f}\n"
              f"  adapter  {result.adapter_path}\n  samples  {result.out_dir / 'samples.png'} (base | adapted, per prompt and seed)\n"
              f"  generate python -m sbora_diffusion.generate --adapter {result.adapter_path}")
        if result.scores:
            sc = result.scores
            print(f"  CLIP-I   {sc['clip_i_base']:.3f} (base) -> {sc['clip_i_adapted']:.3f} (adapted): samples vs the concept's "
                  f"{sc['references']} photos, {sc['clip_model']} CLIP, {sc['images']} images each ({result.out_dir / 'scores.json'})")
    return 0


def main(argv: list[str] | None = None) -> int:
    return run_main(_main, argv)


if __name__ == "__main__":
    sys.exit(main())
