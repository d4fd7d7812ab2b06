r"""Single-concept training: personalize Stable Diffusion (1.x/2.x or SDXL) to one concept from a few photos.

DreamBooth (Ruiz et al., 2023) with low-rank adapters instead of full fine-tuning, as in
Mix-of-Show and the SBoRA paper: any adapter method of the registry on the UNet's attention
(and optionally the CLIP text encoders), optionally a learned embedding for the concept's
token (Textual-Inversion style), optional prior preservation with class images. This module
brings the task; the loss, data, options and pipeline set-up have their modules in ``concept/``
and the loop (schedule, precision, checkpoints, resume, Ctrl-C, logs) is the shared engine's.
An SDXL base trains the same way: its kind (``kinds.py``) supplies both text encoders, each
with the concept's token, and the UNet's conditioning (pooled prompt, size/crop numbers).

    python train_concept.py --concept robot --method sbora-fa          # embedded offline default
    accelerate launch train_concept.py --concept dog --method sbora-fa \
        --model /path/to/stable-diffusion-v1-5 --mixed-precision fp16
    accelerate launch train_concept.py --concept dog --method sbora-fa \
        --model stabilityai/stable-diffusion-xl-base-1.0 --resolution 1024 --mixed-precision bf16

Outputs in ``outputs/<concept>/<method>/`` (or ``--output-dir``): adapter.safetensors
(+ adapter.text_encoder[_2].safetensors), config.yaml, samples.png (base | adapted, labelled),
preview.png (the adapted samples of the first prompt), log.jsonl, logs/ (tensorboard),
validation/step-*.png, checkpoints/step-*.pt. Everything is checked before that folder is
touched; a run replaces an earlier one only with --overwrite.
"""

from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass
from pathlib import Path

import torch

from sbora.adapters import active_adapters
from sbora.adapters.config import DEFAULT_METHOD
from sbora.engine import Engine, Micro, RunState, Setup, Task, fit
from sbora.fileio import write_json
from sbora.procedures import adapter_metadata, build_procedures

from ..clip_score import load_clip
from ..kinds import kind_of
from ..models import DEFAULT_MODEL, load_pipeline
from .adapter import ADAPTER_FILE, save_concept_adapter
from .config import ConceptConfig
from .data import class_image_paths, load_images, sample_batch, tokenize
from .loss import EncodedOnce, diffusion_loss
from .options import ConceptRun, TrainConfig, load_train_config, resolve_run
from .pipeline import check_resolution, prepare_for_training, set_up_adapters
from .samples import sample_grid, sample_images, sample_scores, save_png, save_samples

@dataclass
class TrainResult:
    out_dir: Path
    adapter_path: Path
    pipe: object
    step: int
    losses: list[float]
    is_main_process: bool = True
    scores: dict | None = None  # scores.json's content with --score-clip


class ConceptTask(Task):
    """DreamBooth with adapters as a task of the engine: the photos (and class images) and the diffusion loss."""

    def __init__(self, run: ConceptRun, pipe=None, scorer=None, on_step=None):
        self.run, self.concept, self.cfg, self.adapter = run, run.concept, run.cfg, run.adapter
        self.pipe, self.scorer, self.on_step = pipe, scorer, on_step
        self.desc, self.scores = f"train {run.concept.key}/{run.label}", None

    def setup(self, engine: Engine) -> Setup:
        run, cfg, concept = self.run, self.cfg, self.concept
        pipe = self.pipe = self.pipe if self.pipe is not None else load_pipeline(run.model)
        res = self.res = cfg.resolution or pipe.unet.config.sample_size * pipe.vae_scale_factor
        check_resolution(pipe, res)
        self.instance_images = load_images(run.instance_paths, res, run.mask_paths)
        self.validation_steps = cfg.validation_interval(len(run.instance_paths))
        named, groups, self.tokens = self.trainables(pipe)  # rank/target errors surface here
        kind = self.kind = kind_of(pipe)
        pipe.to(engine.device)
        self.class_images = []
        if cfg.with_prior_preservation:  # one process generates the missing class images (adapters off), the others read them
            with engine.accelerator.main_process_first(), engine.accelerator.autocast(), active_adapters(kind.parts(pipe).values(), {}):
                paths = class_image_paths(pipe, run.model, concept, cfg.num_class_images, res, cfg.sample_steps, cfg.guidance_scale)
                self.class_images = load_images(paths, res)
        train_te = run.te_adapter is not None or self.tokens is not None
        self.noise_scheduler = prepare_for_training(pipe, cfg, engine.weight_dtype, train_te)
        self.vae = EncodedOnce(pipe.vae)  # after prepare_for_training: in the dtype it encodes in
        texts = kind.text_encoders(pipe)
        self.unet, *self.text_encoders = engine.prepare(pipe.unet, *texts) if train_te else (*engine.prepare(pipe.unet), *texts)
        self.device = engine.device
        self.instance_ids = [tokenize(t, run.instance_prompts) for t in kind.tokenizers(pipe)]  # [(photos, 77)]; the token has joined the tokenizer
        self.class_ids = [tokenize(t, [concept.fill(concept.class_prompt)]) for t in kind.tokenizers(pipe)]  # [(1, 77)]
        models = kind.parts(pipe) if run.te_adapter else {"unet": pipe.unet}
        self.procedures = build_procedures(cfg, self.adapter, models, concept.key) if self.adapter else []
        fingerprint = {"adapter": self.adapter and dataclasses.asdict(self.adapter), "token_mode": cfg.token_mode, "token": concept.token,
                       "text_encoder_adapter": run.te_adapter and dataclasses.asdict(run.te_adapter)}
        return Setup(named, groups, fingerprint, self.procedures, run.resolved())

    def trainables(self, pipe) -> tuple[dict, list[dict], object]:
        """What trains: (named parameters, optimizer groups, the concept's token embeddings or None)."""
        return set_up_adapters(pipe, self.concept, self.adapter, self.run.te_adapter, self.cfg)

    def loss(self, micro: Micro) -> torch.Tensor:
        cfg = self.cfg
        pixels, ids, geometry, weights = sample_batch(self.instance_images, self.class_images, self.instance_ids, self.class_ids, cfg.batch_size,
                                                      self.res, cfg.center_crop, cfg.random_flip, micro.generator, cfg.background_loss_weight)
        condition = functools.partial(self.kind.condition, self.text_encoders, ids, geometry, self.device)
        return diffusion_loss(self.vae, self.noise_scheduler, self.unet, condition, pixels, n_instance=cfg.batch_size,
                              gen=micro.generator, pixel_weights=weights, **cfg.loss_options())

    def after_step(self, engine: Engine, step: int, loss: float) -> None:
        if self.on_step is not None:
            self.on_step(step, loss)
        if self.validation_steps and step % self.validation_steps == 0 and step < self.cfg.steps and engine.is_main:
            grid = sample_grid(*sample_images(self.pipe, self.concept, self.cfg, self.res, engine.accelerator.autocast))
            save_png(grid, engine.run_dir / "validation" / f"step-{step:06d}.png")
            engine.log_image("validation", grid, step)

    def save(self, engine: Engine, state: RunState) -> None:
        """The adapter file, samples.png (base | adapted), preview.png (adapted) and, with --score-clip, scores.json."""
        run, cfg = self.run, self.cfg
        save_concept_adapter(self.pipe, engine.run_dir / ADAPTER_FILE, run.concept.key, base_model=str(run.model),
                             info={**run.metadata(state.step), **adapter_metadata(self.procedures)}, tokens=self.tokens, token_mode=cfg.token_mode)
        prompts, base, adapted = sample_images(self.pipe, run.concept, cfg, self.res, engine.accelerator.autocast)
        save_samples(engine.run_dir, prompts, base, adapted)
        if self.scorer is not None:
            self.scores = sample_scores(self.scorer, cfg.score_clip, run.instance_paths, base, adapted)
            write_json(engine.run_dir / "scores.json", {"prompts": prompts, **self.scores})


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
    run = resolve_run(concept, method, model, cfg, adapter_overrides, concept_overrides)
    # The scoring CLIP is loaded before training: a wrong name or missing weights stop the run before its first step.
    scorer = load_clip(cfg.score_clip) if cfg.score_clip else None
    task = ConceptTask(run, pipe=pipe, scorer=scorer, on_step=on_step)
    state, engine = fit(task, cfg, run.out_dir, resume=resume, stop_event=stop_event)
    for m in kind_of(task.pipe).parts(task.pipe).values():
        m.eval()
    return TrainResult(out_dir=run.out_dir, adapter_path=run.out_dir / ADAPTER_FILE, pipe=task.pipe, step=state.step, losses=state.losses,
                       is_main_process=engine.is_main, scores=task.scores)
