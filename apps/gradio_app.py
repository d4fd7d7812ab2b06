r"""The multi-concept app: compose trained concepts in one image, and train new ones, in a browser.

    python -m apps.gradio_app [--outputs outputs] [--model tiny] [--host 127.0.0.1] [--port 7860]

**Generate**: the base model; every concept trained into the outputs folder (the trainer's
``<concept>/<method>/adapter.safetensors``) with its sample image, token and class word, an
on/off switch, a weight and an optional region (a typed box, or a sketch on a canvas) with
its own prompt; a prompt box that takes the tokens; seed, steps, guidance, the number of
images and the fusion (plain sum, or Mix-of-Show's gradient fusion); a gallery with the
generation time and the overlap report of the chosen concepts.
**Train**: 3-20 photos (or one of the shipped example concepts), a name and class word,
method, rank and slot (the next free slot proposed); training runs in a background worker
with a live progress bar and loss curve, and the new concept appears in Generate when done.

The UI only gathers inputs: ``Studio`` does the work with the same functions as the command
lines (``compose.Composer``, ``concept.train.train``). Scripts use the documented API::

    from gradio_client import Client, handle_file
    client = Client("http://127.0.0.1:7860/")
    files, info = client.predict(prompt="a photo of <robot1> toy and <duck1> toy",
                                 concepts={"robot/sbora-fa": 1.0, "duck/sbora-fa": 1.0}, api_name="/generate")
    result = client.predict(name="cube", class_word="toy", photos=[handle_file(p) for p in paths], api_name="/train")

Safe by default: it listens on 127.0.0.1 unless ``--host`` says otherwise; it lists and
loads adapters only from the outputs folder (concept names from the browser are looked up in
that listing, never joined into paths) and never serves files from it; uploads are limited
in number and size and must decode as images; requests wait in a bounded queue, one
generation at a time on the model and one training run at a time; errors are shown in the
page and the app keeps running.
"""

from __future__ import annotations

import os

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # an offline tool: no usage reports

import argparse
import functools
import math
import re
import sys
import tempfile
import threading
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path

import gradio as gr
import torch
from gradio.data_classes import FileData
import pandas as pd
from PIL import Image, ImageChops

from sbora_diffusion.adapters import METHODS, AdapterFileError, read_adapter
from sbora_diffusion.cli import EXPECTED, add_debug_flag, run_main
from sbora_diffusion.compose import FUSIONS, Composer, Region, same_base, find_concepts
from sbora_diffusion.concept.train import load_train_config, train
from sbora_diffusion.concepts import IMAGE_SUFFIXES, ConceptConfig, ConceptError, load_concept, open_rgb, safe_name
from sbora_diffusion.configuration import (
    CONFIG_DIR,
    ConfigError,
    add_arguments,
    check_fields,
    from_dict,
    overrides_from_args,
)
from sbora_diffusion.engine import TrainingInterrupted
from sbora_diffusion.fileio import atomic_folder
from sbora_diffusion.generate import default_device
from sbora_diffusion.models import DEFAULT_MODEL, load_pipeline
from sbora_diffusion.regional import parse_box
from sbora_diffusion.rundir import RunDir

CONCEPT_ID = re.compile(r"[A-Za-z0-9_-]{1,64}/[A-Za-z0-9_-]{1,64}")
NEW_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,39}")
CLASS_WORD = re.compile(r"[^\W\d_][\w '-]{0,39}")
MIN_PHOTOS = 3
MAX_PIXELS = 40_000_000  # per photo: a 40-megapixel picture decodes to 120 MB; larger ones are refused before decoding
MAX_PROMPT = 1000
MAX_CONCEPTS = 8
MAX_RANK = 128
MAX_SLOT = 255


class AppInputError(ConfigError):
    """A request the app refuses; the message (shown in the page) says what to change."""


@dataclass
class AppConfig:
    outputs: str = field(default="outputs", metadata={"help": "folder of trained concepts (<concept>/<method>/adapter.safetensors); new ones are trained into it"})
    model: str = field(default=DEFAULT_MODEL, metadata={"help": "base model: embedded name, diffusers folder or hub id"})
    host: str = field(default="127.0.0.1", metadata={"help": "address to listen on (0.0.0.0 opens the app to the network)"})
    port: int = field(default=7860, metadata={"help": "port to listen on"})
    train_config: str | None = field(default=None, metadata={"help": "training YAML of the Train tab: configs/train/NAME.yaml or a path (none: the model's default)"})
    max_photos: int = field(default=20, metadata={"help": "most photos one training run accepts"})
    max_upload_mb: float = field(default=10.0, metadata={"help": "largest upload, in MB per file"})
    max_queue: int = field(default=16, metadata={"help": "requests that may wait in the queue; more are turned away"})
    max_images: int = field(default=4, metadata={"help": "most images per generation"})
    max_steps: int = field(default=100, metadata={"help": "most sampling steps per generation"})
    max_train_steps: int = field(default=2000, metadata={"help": "most training steps one run may ask for"})
    device: str | None = field(default=None, metadata={"help": "cuda, cpu, ... (none: cuda if available)"})

    def validate(self) -> None:
        check_fields(self, {"port": (1, 65535), "max_photos": (MIN_PHOTOS, 1000), "max_upload_mb": (0, 1024, "open"),
                            "max_queue": (1, 10_000), "max_images": (1, 64), "max_steps": (1, 1000), "max_train_steps": (1, 1_000_000)})


@dataclass(frozen=True)
class Card:
    """A trained concept as the Generate tab shows it (read from its adapter file's metadata)."""

    id: str  # "<concept>/<method>": the only name the browser uses
    path: Path
    stamp: tuple[int, int]  # (mtime, size) of the file: a retrained concept is read and loaded again
    token: str
    class_word: str
    method: str
    slot: int
    base_model: str | None
    sample: Path | None

    @property
    def adapter_name(self) -> str:
        return self.id.replace("/", "__")  # unique, and a valid adapter name (letters, digits, '_', '-')


@dataclass
class TrainJob:
    """One background training run, as the Train tab and the train API follow it."""

    concept: str  # the card id it will produce
    total: int
    stop: threading.Event = field(default_factory=threading.Event)
    step: int = 0
    losses: list[float] = field(default_factory=list)
    status: str = "running"  # running, done, stopped, failed
    error: str | None = None
    started: float = field(default_factory=time.monotonic)
    finished: threading.Event = field(default_factory=threading.Event)

    def on_step(self, step: int, loss: float) -> None:
        self.step = step
        self.losses.append(float(loss))

    def summary(self) -> dict:
        return {"concept": self.concept, "status": self.status, "step": self.step, "steps": self.total,
                "loss": self.losses[-1] if self.losses else None, "error": self.error,
                "seconds": round(time.monotonic() - self.started, 1)}


def _example_concepts() -> dict[str, ConceptConfig]:
    """The shipped example concepts (configs/concepts/*.yaml) whose photos are present."""
    found = {}
    for path in sorted((CONFIG_DIR / "concepts").glob("*.yaml")):
        try:
            concept = load_concept(path)
            concept.instance_images()
        except ConfigError:
            continue
        found[path.stem] = concept
    return found


class Studio:
    """Everything the app does, without any UI: list concepts, generate, train."""

    def __init__(self, config: AppConfig, pipe=None):
        config.validate()
        self.config = config
        self.outputs = Path(config.outputs)
        self.outputs.mkdir(parents=True, exist_ok=True)
        self.device = config.device or default_device()
        if pipe is None:
            pipe = load_pipeline(config.model, device=self.device, dtype=torch.float16 if self.device.startswith("cuda") else None)
        self.pipe = pipe
        self.composer = Composer(pipe)
        self.model_lock = threading.Lock()  # one generation (or concept load) at a time on the model
        self.job_lock = threading.Lock()
        self.job: TrainJob | None = None
        self.trained = 0  # finished training runs: the Generate tab re-reads the concepts when it changes
        self.examples = _example_concepts()
        self.default_train_steps = load_train_config(config.train_config, config.model).steps
        self._cards: dict[str, Card] = {}
        self._loaded: dict[str, tuple[Path, tuple[int, int]]] = {}  # adapter name -> the file (and its stamp) it was loaded from
        self._images = tempfile.TemporaryDirectory(prefix="sbora-app-")

    @property
    def images_dir(self) -> str:
        """The only folder the app serves files from: the PNGs the generate API hands out."""
        return self._images.name

    def close(self) -> None:
        if self.job is not None:
            self.job.stop.set()
            self.job.finished.wait(60)
        self._images.cleanup()

    # -- concepts -------------------------------------------------------------------------

    def cards(self) -> dict[str, Card]:
        """The concepts trained into the outputs folder on this app's base model, by id (re-read when a file changes)."""
        cards = {}
        for cid, path in find_concepts(self.outputs).items():
            stat = path.stat()
            stamp = (stat.st_mtime_ns, stat.st_size)
            card = self._cards.get(cid)
            if card is None or card.stamp != stamp or card.path != path:
                try:
                    file = read_adapter(path)
                except AdapterFileError as e:
                    print(f"warning: skipping {path}: {e}", file=sys.stderr)
                    continue
                info = file.extra
                sample = path.parent / "samples.png"
                card = Card(id=cid, path=path, stamp=stamp, token=str(info.get("token") or ""), class_word=str(info.get("class_word") or ""),
                            method=str(info.get("method") or file.config.method), slot=file.config.slot, base_model=file.base_model,
                            sample=sample if sample.is_file() else None)
                self._cards[cid] = card
            if same_base(card.base_model, self.config.model):
                cards[cid] = card
        return cards

    def _card(self, cid: object, cards: dict[str, Card]) -> Card:
        if not isinstance(cid, str) or not CONCEPT_ID.fullmatch(cid):
            raise AppInputError(f"{cid!r} is not a concept name: use one listed by the app, '<concept>/<method>' (e.g. 'robot/sbora-fa')")
        if cid not in cards:
            raise AppInputError(f"no concept '{cid}' in the outputs folder; available: {', '.join(cards) or 'none yet (train one first)'}")
        return cards[cid]

    def next_slot(self) -> int:
        """The smallest slot no listed concept uses: a new concept there composes with all of them."""
        used = {card.slot for card in self.cards().values()}
        return next(k for k in range(len(used) + 1) if k not in used)

    def _ensure_loaded(self, cards: list[Card]) -> None:
        """Have exactly these concepts' current files on the model (call with the model lock held)."""
        wanted = {c.adapter_name: c for c in cards}
        for name in list(self.composer.concepts):
            card = wanted.get(name)
            if card is not None and self._loaded.get(name) != (card.path, card.stamp):
                self.composer.unload(name)  # retrained since it was loaded
        for name, card in wanted.items():
            if name in self.composer.concepts:
                continue
            try:
                self.composer.load(card.path, name=name)
            except ConfigError:
                idle = [n for n in self.composer.concepts if n not in wanted]
                if not idle:
                    raise
                for n in idle:  # concepts loaded for earlier requests may claim the same token: make room
                    self.composer.unload(n)
                self.composer.load(card.path, name=name)
            self._loaded[name] = (card.path, card.stamp)

    # -- generate -------------------------------------------------------------------------

    def generate(self, prompt: str, concepts: dict, regions: dict | None = None, region_prompts: dict | None = None,
                 negative_prompt: str = "", seed: int = 0, steps: int = 25, guidance_scale: float = 7.5,
                 num_images: int = 1, masks: dict | None = None, fusion: str = "sum") -> tuple[list[tuple[Image.Image, int]], dict]:
        """Images of `prompt` with `concepts` ({id: weight}) active; returns [(image, seed)] and an info dict.

        A concept's region is a box in `regions` ({id: [x0, y0, x1, y1]} or "x0, y0, x1, y1") or a
        picture in `masks` ({id: PIL image}, white = inside), with its prompt in `region_prompts`.
        `fusion` is a name of ``compose.FUSIONS``: sum, or gradient (fitted once per set of
        concepts, weights and sampler settings, then reused).
        """
        cfg = self.config
        all_cards = self.cards()
        if not isinstance(concepts, dict):
            raise AppInputError("concepts must map concept names to weights, e.g. {'robot/sbora-fa': 1.0}")
        if len(concepts) > MAX_CONCEPTS:
            raise AppInputError(f"at most {MAX_CONCEPTS} concepts at once, got {len(concepts)}")
        chosen = {}
        for cid, weight in concepts.items():
            card = self._card(cid, all_cards)
            chosen[card.id] = _number(weight, f"weight of {cid}", 0.0, 4.0)
        regions, region_prompts, masks = dict(regions or {}), dict(region_prompts or {}), dict(masks or {})
        for cid in list(regions) + list(region_prompts) + list(masks):
            self._card(cid, all_cards)
            if cid not in chosen:
                raise AppInputError(f"a region is given for '{cid}', which is not switched on")
        seed = int(_number(seed, "seed", 0, 2**31 - 1, integer=True))
        steps = int(_number(steps, "steps", 1, cfg.max_steps, integer=True))
        n = int(_number(num_images, "number of images", 1, cfg.max_images, integer=True))
        guidance = _number(guidance_scale, "guidance", 0.0, 30.0)
        if fusion not in FUSIONS:
            raise AppInputError(f"fusion must be one of {', '.join(FUSIONS)}, got {fusion!r}")
        prompt, negative = _text(prompt, "prompt"), _text(negative_prompt, "negative prompt")
        cards = [all_cards[cid] for cid in chosen]
        if not prompt.strip():
            prompt = "a photo of " + " and ".join(f"{c.token} {c.class_word}".strip() for c in cards) if cards else ""
            if not prompt:
                raise AppInputError("write a prompt, or switch on a concept")
        boxes = {cid: parse_box(box) for cid, box in regions.items() if box not in (None, "", [])}
        seeds = list(range(seed, seed + n))
        start = time.perf_counter()
        with self.model_lock:
            self._ensure_loaded(cards)
            weights = {all_cards[cid].adapter_name: w for cid, w in chosen.items()}
            render = dict(negative_prompt=negative, steps=steps, guidance_scale=guidance)
            selection = FUSIONS[fusion](self.composer, weights, **render)
            fused = [self.composer.fused[n].summary() for n in selection if n in self.composer.fused]
            report = self.composer.overlap(list(weights))
            regional = [Region(concept=all_cards[cid].adapter_name, box=boxes.get(cid), mask=masks.get(cid) if cid not in boxes else None,
                               prompt=_text(region_prompts.get(cid), "regional prompt") or None)
                        for cid in chosen if cid in boxes or cid in masks]
            images = self.composer.render(prompt, seeds, selection, regions=regional, batch_size=n, **render)
        ids = {all_cards[cid].adapter_name: cid for cid in chosen}
        pairs = [{**p, "pair": "+".join(ids[x] for x in p["pair"].split("+"))} for p in report.pairs()]
        info = {"seconds": round(time.perf_counter() - start, 2), "prompt": prompt, "seeds": seeds, "concepts": chosen,
                "regions": {cid: list(boxes[cid]) if cid in boxes else "sketch" for cid in chosen if cid in boxes or cid in masks}, "overlap": pairs, "warnings": report.warnings(),
                "overlap_threshold": report.threshold, "model": self.config.model, "fusion": fusion, "fused": fused[0] if fused else None}
        return list(zip(images, seeds)), info

    def save_images(self, images: list[tuple[Image.Image, int]]) -> list[Path]:
        """PNG files of `images` in the app's own temporary folder (what the API hands out)."""
        folder = Path(tempfile.mkdtemp(dir=self.images_dir))
        paths = []
        for image, seed in images:
            paths.append(folder / f"{seed:05d}.png")
            image.save(paths[-1], format="PNG")
        return paths

    # -- train ----------------------------------------------------------------------------

    def start_training(self, name: str = "", class_word: str = "", photos: list | None = None, example: str = "",
                       method: str = "sbora-fa", rank: int = 4, slot: int | None = None, steps: int | None = None,
                       overwrite: bool = False) -> TrainJob:
        """Check the request, save the photos, and start training in a background thread; returns the job."""
        cfg = self.config
        if method not in METHODS:
            raise AppInputError(f"unknown method {method!r}; pick one of {', '.join(sorted(METHODS))}")
        rank = int(_number(rank, "rank", 1, MAX_RANK, integer=True))
        slot = self.next_slot() if slot in (None, "") else int(_number(slot, "slot", 0, MAX_SLOT, integer=True))
        photos = list(photos or [])
        if example:
            if example not in self.examples:
                raise AppInputError(f"no example concept {example!r}; examples: {', '.join(self.examples) or 'none'}")
            if photos:
                raise AppInputError("give either photos or an example concept, not both")
            concept = self.examples[example]
        else:
            concept = self._new_concept(name, class_word, len(photos))
        for card in self.cards().values():
            if card.token.lower() == concept.token.lower() and card.id.split("/")[0] != concept.key:
                raise AppInputError(f"concept '{card.id}' already uses token {card.token}: pick another name")
        cid = f"{concept.key}/{method}"
        out_dir = self.outputs / concept.key / method
        with self.job_lock:
            if self.job is not None and self.job.status == "running":
                raise AppInputError(f"a training run is going on ({self.job.concept}, step {self.job.step} of {self.job.total}): "
                                    "wait for it to finish or stop it")
            train_config = load_train_config(cfg.train_config, cfg.model, output_dir=str(out_dir), overwrite=bool(overwrite),
                                             **({"steps": int(_number(steps, "steps", 1, cfg.max_train_steps, integer=True))}
                                                if steps not in (None, "") else {}))
            if train_config.steps > cfg.max_train_steps:
                raise AppInputError(f"the training config asks for {train_config.steps} steps; this app allows at most {cfg.max_train_steps}")
            RunDir(out_dir, overwrite=train_config.overwrite).check()  # refuse an existing run unless overwrite, before any file is written
            if not example:
                concept = self._save_photos(concept, photos)
            job = TrainJob(concept=cid, total=train_config.steps)
            self.job = job
        worker = threading.Thread(target=self._train, args=(job, concept, method, train_config, rank, slot), daemon=True,
                                  name=f"train {cid}")
        worker.start()
        return job

    def _new_concept(self, name: str, class_word: str, count: int) -> ConceptConfig:
        if not isinstance(name, str) or not NEW_NAME.fullmatch(name) or safe_name(name) != name:
            raise AppInputError(f"concept name {name!r} is not allowed: use 1-40 letters, digits, '_' or '-', starting with a letter or digit "
                                "(and not a word like 'train' that names a model method)")
        if not isinstance(class_word, str) or not CLASS_WORD.fullmatch(class_word.strip()):
            raise AppInputError(f"class word {class_word!r} is not allowed: one or a few words (letters), e.g. 'dog' or 'toy'")
        if not MIN_PHOTOS <= count <= self.config.max_photos:
            raise AppInputError(f"upload {MIN_PHOTOS} to {self.config.max_photos} photos of the concept, got {count}")
        return ConceptConfig(name=name, token=f"<{name.lower()}1>", class_word=class_word.strip(), instance_dir="(uploaded)")

    def _save_photos(self, concept: ConceptConfig, photos: list) -> ConceptConfig:
        """Check every upload (size, pixels, decodes as an image), then write them as PNGs to <outputs>/<name>/photos."""
        limit = self.config.max_upload_mb * 1024 * 1024
        decoded = []
        for i, photo in enumerate(photos):
            path = Path(photo["path"] if isinstance(photo, dict) else getattr(photo, "path", photo))
            label = f"photo {i + 1} ({_display_name(photo, path)})"
            if not path.is_file():
                raise AppInputError(f"{label} did not arrive; upload it again")
            if path.stat().st_size > limit:
                raise AppInputError(f"{label} is larger than {self.config.max_upload_mb:g} MB; resize it")
            try:
                with Image.open(path) as im:
                    width, height = im.size
            except (OSError, ValueError, Image.DecompressionBombError):
                raise AppInputError(f"{label} is not an image ({', '.join(IMAGE_SUFFIXES)}); upload photos only") from None
            if width * height > MAX_PIXELS:
                raise AppInputError(f"{label} has {width}x{height} pixels; resize it to at most {MAX_PIXELS // 1_000_000} megapixels")
            try:
                decoded.append(open_rgb(path))
            except ConceptError:
                raise AppInputError(f"{label} cannot be decoded as an image; upload a JPEG or PNG photo") from None
        folder = self.outputs / concept.key / "photos"
        with atomic_folder(folder) as tmp:
            for i, image in enumerate(decoded):
                image.save(tmp / f"photo_{i:02d}.png", format="PNG")
        return ConceptConfig(name=concept.name, token=concept.token, class_word=concept.class_word, instance_dir=str(folder))

    def _train(self, job: TrainJob, concept: ConceptConfig, method: str, train_config, rank: int, slot: int) -> None:
        try:
            result = train(concept, method, self.config.model, train_config=train_config, adapter_overrides={"rank": rank, "slot": slot},
                           stop_event=job.stop, on_step=job.on_step)
            job.step, job.status = result.step, "done"
        except TrainingInterrupted as e:
            job.status, job.error = "stopped", f"stopped at step {e.step} (a checkpoint is kept; train again with overwrite to start over)"
        except Exception as e:  # shown in the page; the app keeps running
            if not isinstance(e, EXPECTED):
                traceback.print_exc()
            job.status, job.error = "failed", str(e).strip() or type(e).__name__
        finally:
            if job.status == "done":
                self.trained += 1
            job.finished.set()

    def stop_training(self) -> str:
        job = self.job
        if job is None or job.status != "running":
            return "no training run is going on"
        job.stop.set()
        return f"stopping {job.concept} at the next step boundary"


# ------------------------------------------------------------------------------------ helpers


def _number(value, what: str, low: float, high: float, integer: bool = False) -> float:
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise AppInputError(f"{what} must be a number, got {value!r}") from None
    if isinstance(value, bool) or not math.isfinite(number) or not low <= number <= high or (integer and not number.is_integer()):
        kind = "a whole number" if integer else "a number"
        raise AppInputError(f"{what} must be {kind} from {low:g} to {high:g}, got {value!r}")
    return number


def _text(value, what: str) -> str:
    if value is None:
        return ""
    if not isinstance(value, str):
        raise AppInputError(f"{what} must be text")
    if len(value) > MAX_PROMPT:
        raise AppInputError(f"{what} is longer than {MAX_PROMPT} characters")
    return value


def _display_name(photo, path: Path) -> str:
    name = photo.get("orig_name") if isinstance(photo, dict) else getattr(photo, "orig_name", None)
    return str(name or path.name)[:80]


def shown_in_page(fn):
    """Errors become messages in the page (gr.Error); the app keeps running. Unexpected ones are logged too."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except gr.Error:
            raise
        except Exception as e:
            if not isinstance(e, EXPECTED):
                traceback.print_exc()
            raise gr.Error(str(e).strip() or type(e).__name__, print_exception=False) from None

    return wrapper


def overlap_markdown(info: dict) -> str:
    lines = [f"**{len(info['seeds'])} image(s) in {info['seconds']:.1f} s** · seeds {info['seeds'][0]}–{info['seeds'][-1]} · "
             f"prompt: {_escape(info['prompt'])}"]
    if info["overlap"]:
        lines += ["", f"Overlap between concepts (per-layer interference; warning above {info['overlap_threshold']:g}):", "",
                  "| concepts | max interference | layers above | shared indices |", "|---|---|---|---|"]
        lines += [f"| {p['pair']} | {p['max_interference']:.3g} | {p['above']} of {p['layers']} | "
                  f"{'-' if p['shared_indices'] is None else p['shared_indices']} |" for p in info["overlap"]]
    if info["fused"]:
        f = info["fused"]
        lines += ["", f"Gradient fusion of {f['layers']} layers ({f['seconds']:.1f} s): mean relative output error on the concepts' own "
                      f"inputs {f['sum_error']:.3g} with the plain sum, {f['fused_error']:.3g} fused."]
    if info["regions"]:
        lines += ["", "Regions: " + ", ".join(f"{cid} {'sketch' if r == 'sketch' else tuple(r)}" for cid, r in info["regions"].items())]
    lines += [f"\n⚠️ {_escape(w)}" for w in info["warnings"]]
    return "\n".join(lines)


def _escape(text: str) -> str:
    return re.sub(r"([\\`*_{}\[\]<>()#+!|])", r"\\\1", text)


# ------------------------------------------------------------------------------------ UI


def build_ui(studio: Studio) -> gr.Blocks:
    cfg = studio.config
    methods = sorted(METHODS)

    @shown_in_page
    def api_generate(prompt: str, concepts: dict[str, float], regions: dict[str, list[float]] | None = None,
                     region_prompts: dict[str, str] | None = None, negative_prompt: str = "", seed: int = 0, steps: int = 25,
                     guidance_scale: float = 7.5, num_images: int = 1, fusion: str = "sum") -> tuple[list[FileData], dict]:
        """Generate images with trained concepts. concepts: {"<concept>/<method>": weight}; regions: {id: [x0, y0, x1, y1]}
        as fractions of the image (regional sampling) with optional region_prompts: {id: prompt}; fusion: sum (plain sum
        of the updates) or gradient (Mix-of-Show's gradient fusion). Returns the PNG files and an info dict (seconds,
        seeds, overlap report, warnings, fusion errors)."""
        images, info = studio.generate(prompt, concepts, regions, region_prompts, negative_prompt, seed, steps, guidance_scale, num_images,
                                       fusion=fusion)
        return [FileData(path=str(p)) for p in studio.save_images(images)], info

    @shown_in_page
    def api_train(name: str = "", class_word: str = "", photos: list[FileData] | None = None, example: str = "",
                  method: str = "sbora-fa", rank: int = 4, slot: int | None = None, steps: int | None = None,
                  overwrite: bool = False) -> dict:
        """Train a concept from 3-20 photos (or a shipped example concept) and wait for it: returns its id
        ("<name>/<method>"), status, steps and final loss. slot: none proposes the next free slot."""
        job = studio.start_training(name, class_word, photos, example, method, rank, slot, steps, overwrite)
        job.finished.wait()
        if job.status != "done":
            raise AppInputError(f"training {job.concept} {job.status}: {job.error}")
        return job.summary()

    with gr.Blocks(title="SBoRA multi-concept studio") as demo:
        gr.Markdown(f"# SBoRA multi-concept studio\nBase model **{cfg.model}** · concepts trained into `{studio.outputs}`")
        # Bumped to list the concepts again (Refresh, or a training run finished). A hidden component, not a
        # gr.State: a State changed by an event does not re-run gr.render in the page.
        listing = gr.Number(0, visible=False, precision=0)
        known = gr.State(-1)  # the studio's count of finished runs when this page last listed the concepts
        seen = gr.State(None)  # the training progress this page shows
        with gr.Tab("Generate"):
            with gr.Row():
                with gr.Column(scale=2):
                    refresh = gr.Button("Refresh concepts", size="sm")
                    cards_area = gr.Column()
                with gr.Column(scale=3):
                    prompt = gr.Textbox(label="Prompt (use the concepts' tokens; empty: 'a photo of' the chosen concepts)", lines=2,
                                        elem_id="prompt")
                    negative = gr.Textbox(label="Negative prompt", lines=1)
                    with gr.Row():
                        seed = gr.Number(label="Seed", value=0, precision=0, minimum=0)
                        steps = gr.Slider(1, cfg.max_steps, value=min(25, cfg.max_steps), step=1, label="Steps")
                        guidance = gr.Slider(0, 20, value=7.5, step=0.5, label="Guidance")
                        count = gr.Slider(1, cfg.max_images, value=1, step=1, label="Images")
                    fusion = gr.Radio(list(FUSIONS), value="sum", label="Fusion (sum: the updates added; gradient: Mix-of-Show's fused weights, "
                                                                     "fitted once per set of concepts and settings)", elem_id="fusion")
                    go = gr.Button("Generate", variant="primary", elem_id="generate")
                    gallery = gr.Gallery(label="Images", columns=4, height=320, interactive=False, elem_id="gallery")
                    info = gr.Markdown(elem_id="info")

            with cards_area:
                @gr.render(inputs=listing)
                def concept_cards(_version):
                    cards = list(studio.cards().values())
                    if not cards:
                        gr.Markdown(f"No trained concepts in `{studio.outputs}` yet: train one in the **Train** tab.")
                    controls = []
                    for card in cards:
                        with gr.Group():
                            with gr.Row(equal_height=True):
                                if card.sample is not None:
                                    gr.Image(value=_thumbnail(card.sample), show_label=False, interactive=False, container=False,
                                             height=110, scale=2, min_width=120, buttons=[])
                                with gr.Column(scale=3, min_width=160):
                                    gr.Markdown(f"**{card.id}** · token `{card.token}` · class *{_escape(card.class_word)}* · slot {card.slot}")
                                    on = gr.Checkbox(label=f"use {card.id}", value=False, key=f"on-{card.id}", elem_classes="concept-switch")
                                    weight = gr.Slider(0, 2, value=1.0, step=0.05, label="weight", key=f"w-{card.id}")
                            with gr.Accordion("Region (optional)", open=False):
                                box = gr.Textbox(label="Box x0, y0, x1, y1 (fractions of the image, e.g. 0, 0, 0.5, 1)",
                                                 key=f"box-{card.id}")
                                sketch = gr.Sketchpad(label="…or paint it (square = image)", type="pil",
                                                      canvas_size=(256, 256), fixed_canvas=True, layers=False, height=300,
                                                      brush=gr.Brush(default_size=32, colors=["#e8590c"], color_mode="fixed"),
                                                      key=f"sketch-{card.id}", elem_classes="region-sketch")
                                region_prompt = gr.Textbox(label="Regional prompt", placeholder=f"a photo of {card.token} {card.class_word}",
                                                           key=f"rp-{card.id}")
                        controls += [on, weight, box, sketch, region_prompt]
                    ids = [c.id for c in cards]
                    go.click(functools.partial(ui_generate, ids), inputs=[prompt, negative, seed, steps, guidance, count, fusion, *controls],
                             outputs=[gallery, info], api_visibility="private", concurrency_id="generate", concurrency_limit=1)

        @shown_in_page
        def ui_generate(ids, prompt_, negative_, seed_, steps_, guidance_, count_, fusion_, *values):
            concepts, boxes, sketches, rprompts = {}, {}, {}, {}
            for i, cid in enumerate(ids):
                on, weight, box, sketch, rp = values[5 * i : 5 * i + 5]
                if on:
                    concepts[cid] = weight
                    if box and box.strip():
                        boxes[cid] = box
                    elif _sketched(sketch):
                        sketches[cid] = _sketch_mask(sketch)
                    if rp and rp.strip():
                        rprompts[cid] = rp
            images, data = studio.generate(prompt_, concepts, boxes, rprompts, negative_, seed_, steps_, guidance_, count_, masks=sketches,
                                           fusion=fusion_)
            return [(im, f"seed {s}") for im, s in images], overlap_markdown(data)

        with gr.Tab("Train"):
            with gr.Row():
                with gr.Column():
                    photos = gr.File(label=f"Photos ({MIN_PHOTOS}-{cfg.max_photos} images, at most {cfg.max_upload_mb:g} MB each)",
                                     file_count="multiple", file_types=["image"], elem_id="photos")
                    example = gr.Dropdown([""] + list(studio.examples), value="", label="…or a shipped example concept")
                    with gr.Row():
                        name = gr.Textbox(label="Concept name (its token is <name1>)", placeholder="e.g. mydog")
                        class_word = gr.Textbox(label="Class word", placeholder="e.g. dog")
                    with gr.Row():
                        method = gr.Dropdown(methods, value="sbora-fa" if "sbora-fa" in methods else methods[0], label="Method")
                        rank = gr.Slider(1, 64, value=4, step=1, label="Rank")
                        slot = gr.Number(label="Slot (the next free one is proposed)", value=studio.next_slot(), precision=0, minimum=0)
                    with gr.Row():
                        train_steps = gr.Number(label="Steps", value=studio.default_train_steps, precision=0, minimum=1,
                                                maximum=cfg.max_train_steps)
                        overwrite = gr.Checkbox(label="Replace an earlier run of this concept and method", value=False)
                    with gr.Row():
                        start = gr.Button("Train", variant="primary")
                        stop = gr.Button("Stop")
                with gr.Column():
                    progress = gr.Slider(0, 1, value=0, step=1, label="Progress (steps)", interactive=False)
                    status = gr.Markdown("No training run yet.")
                    loss_plot = gr.LinePlot(x="step", y="loss", title="Training loss", height=240)

        @shown_in_page
        def ui_train(files, example_, name_, class_word_, method_, rank_, slot_, steps_, overwrite_):
            job = studio.start_training(name_, class_word_, files, example_, method_, rank_, slot_, steps_, overwrite_)
            return f"Started **{job.concept}** ({job.total} steps)…"

        start.click(ui_train, [photos, example, name, class_word, method, rank, slot, train_steps, overwrite], status,
                    api_visibility="private", concurrency_id="train-start", concurrency_limit=1)
        stop.click(studio.stop_training, None, status, api_visibility="private", queue=False)

        def poll(seen_, known_, listing_):
            """Every second: the training run's progress, and the concept list when a run has finished."""
            job = studio.job
            key = None if job is None else (id(job), job.step, job.status)
            outputs = [gr.skip()] * 4 + [key, gr.skip(), gr.skip()]
            if key != seen_ and job is not None:
                summary = job.summary()
                text = {"running": f"Training **{job.concept}**: step {job.step} of {job.total}",
                        "done": f"Done: **{job.concept}** ({job.step} steps in {summary['seconds']:.0f} s) is in the Generate tab",
                        "stopped": f"Stopped **{job.concept}** at step {job.step}",
                        "failed": f"Training **{job.concept}** failed: {_escape(job.error or '')}"}[job.status]
                if summary["loss"] is not None:
                    text += f" · loss {summary['loss']:.4f}"
                curve = pd.DataFrame({"step": range(1, len(job.losses) + 1), "loss": job.losses})
                outputs[:3] = [gr.update(maximum=max(job.total, 1), value=job.step), text, curve]
            trained = studio.trained
            if known_ != trained:
                outputs[3], outputs[5], outputs[6] = studio.next_slot(), trained, listing_ + 1
            return outputs

        gr.Timer(1.0).tick(poll, [seen, known, listing], [progress, status, loss_plot, slot, seen, known, listing],
                           api_visibility="private", queue=False, show_progress="hidden")
        refresh.click(lambda n: n + 1, listing, listing, api_visibility="private", queue=False)
        demo.load(lambda: (studio.trained, studio.next_slot()), None, [known, slot], api_visibility="private", queue=False)

        gr.api(api_generate, api_name="generate", concurrency_id="generate", concurrency_limit=1)
        gr.api(api_train, api_name="train", concurrency_id="train", concurrency_limit=1)
    return demo


def _sketched(value) -> bool:
    return isinstance(value, dict) and any(layer is not None and layer.convert("RGBA").getchannel("A").getbbox() for layer in value.get("layers") or [])


def _sketch_mask(value) -> Image.Image:
    """The strokes of a sketchpad's layers as a white-on-black mask (whatever colour they were drawn in)."""
    mask = None
    for layer in value["layers"]:
        if layer is not None:
            alpha = layer.convert("RGBA").getchannel("A")
            mask = alpha if mask is None else ImageChops.lighter(mask, alpha)
    return mask


def _thumbnail(path: Path) -> Image.Image:
    with Image.open(path) as im:
        im = im.convert("RGB")
        im.thumbnail((384, 192))
        return im


def launch(studio: Studio, demo: gr.Blocks | None = None, block: bool = True) -> gr.Blocks:
    """Serve the app on the configured host and port (bounded queue, upload limit, nothing from the outputs folder served)."""
    cfg = studio.config
    demo = demo or build_ui(studio)
    demo.queue(max_size=cfg.max_queue, default_concurrency_limit=1)
    demo.launch(server_name=cfg.host, server_port=cfg.port, max_file_size=int(cfg.max_upload_mb * 1024 * 1024),
                 allowed_paths=[studio.images_dir], blocked_paths=[str(studio.outputs.resolve())], prevent_thread_lock=not block, show_error=True,
                 ssr_mode=False, quiet=not block)
    return demo


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m apps.gradio_app", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_debug_flag(p)
    add_arguments(p, AppConfig, title="options")
    return p


def _main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    config = from_dict(AppConfig, overrides_from_args(args, AppConfig), source="command line")
    studio = Studio(config)
    try:
        launch(studio)
    finally:
        studio.close()
    return 0


def main(argv: list[str] | None = None) -> int:
    return run_main(_main, argv)


if __name__ == "__main__":
    sys.exit(main())
