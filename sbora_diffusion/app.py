r"""The multi-concept app: compose trained concepts in one image, and train new ones, in a browser.

    sbora-app [--outputs outputs] [--model tiny] [--host 127.0.0.1] [--port 7860]

**Generate**: the base model; every concept trained into the outputs folder (the trainer's
``<concept>/<method>/adapter.safetensors``) with its sample image, token and class word, an
on/off switch, a weight and an optional region (a typed box, or a sketch on a canvas) with
its own prompt, and where regions confine their concepts (the whole UNet, the default; the
attention layers; or cross-attention only, as Mix-of-Show); a prompt box that takes the tokens;
seed, steps, guidance, the number of images and the fusion (plain sum, or Mix-of-Show's
gradient fusion); a gallery that shows each image whole (small ones upscaled by whole pixels),
with the generation time, the settings used, the overlap report of the chosen concepts (weight
overlap, and output cross-talk on calibration inputs) and warnings (e.g. a token in the
prompt whose concept is off). The page's controls and the API share one range per setting.
**Train**: 3-20 photos (or one of the shipped example concepts, which fills in its name,
class word and token), a name and class word, method, rank (the method's own proposed, as
the command line) and slot (the next free one for that method and rank proposed; a taken
one refused); training runs in a background worker with a live progress bar, loss curve and
status (making samples after the last step; its time stops when the run ends), and the new
concept appears in Generate when done. Messages name the page's fields, not command-line flags.

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

from sbora.adapters import AdapterConfig, AdapterFileError, load_adapter_config, read_adapter
from sbora.adapters.config import DEFAULT_METHOD
from sbora.adapters.io import slot_layouts
from sbora.adapters.overlap import CROSSTALK_MEANING, WEIGHT_OVERLAP_MEANING
from sbora.adapters.inject import build_cores
from sbora.adapters.registry import CONCEPT, METHOD_SPECS, trained_methods
from sbora.adapters.slots import SlotLayout, free_slot, slot_clash
from sbora.checkpoint import load_checkpoint
from sbora.cli import EXPECTED, Command, Invocation, Section
from sbora.configuration import CONFIG_DIR, ConfigError, check_fields
from sbora.engine import TrainingInterrupted
from sbora.fileio import atomic_folder
from sbora.rundir import RunDir

from .compose import FUSIONS, Composer, Region, same_base, find_concepts
from .concept.config import IMAGE_SUFFIXES, ConceptConfig, ConceptError, load_concept, open_rgb, safe_name
from .concept.options import load_train_config
from .concept.train import train
from .generate import default_device
from .models import DEFAULT_MODEL, load_pipeline
from .regional import DEFAULT_MODE as DEFAULT_REGIONAL_MODE, MODES as REGIONAL_MODES, parse_box

CONCEPT_ID = re.compile(r"[A-Za-z0-9_-]{1,64}/[A-Za-z0-9_-]{1,64}")
NEW_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,39}")
CLASS_WORD = re.compile(r"[^\W\d_][\w '-]{0,39}")
MIN_PHOTOS = 3
MAX_PIXELS = 40_000_000  # per photo: a 40-megapixel picture decodes to 120 MB; larger ones are refused before decoding
MAX_PROMPT = 1000
MAX_CONCEPTS = 8
MAX_RANK = 128
MAX_SLOT = 255
LOSS_WINDOW = 25  # steps in the Train tab's running mean of the loss
TRAINED_METHODS = sorted(trained_methods(CONCEPT))  # the Train tab's methods: exactly the registry's that train_concept.py trains
# One range per generation setting, for the page's controls and the API's checks alike.
WEIGHT_RANGE = (0.0, 2.0)
GUIDANCE_RANGE = (0.0, 20.0)
MAX_SEED = 2**31 - 1
SHOWN_SIZE = 256  # the page shows smaller images upscaled (nearest neighbour, whole pixels) to at least this many pixels a side
# Where a region confines its concept, per ``regional.MODES`` (the page's choices: "<where> (<mode>)").
REGIONAL_MODE_WHERE = {"latent": "the whole UNet", "attention": "the attention layers", "cross": "cross-attention only"}


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
    device: str = field(default="auto", metadata={"help": "cuda, cuda:1, cpu, ... or auto (CUDA when available)"})

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
    rank: int = 0
    slots: tuple[SlotLayout, ...] = ()  # its share of each layer's slots (method, rank, slot, seed, layout): the slot check's input

    @property
    def adapter_name(self) -> str:
        return self.id.replace("/", "__")  # unique, and a valid adapter name (letters, digits, '_', '-')


@dataclass
class TrainJob:
    """One background training run, as the Train tab and the train API follow it."""

    concept: str  # the card id it will produce
    total: int
    first: int = 0  # the step it starts from: a continued run's checkpoint step, else 0
    stop: threading.Event = field(default_factory=threading.Event)
    step: int = 0
    losses: list[float] = field(default_factory=list)
    status: str = "running"  # running, done, stopped, failed
    error: str | None = None
    warning: str | None = None  # what the user should know about the result (shown beside the run's status)
    started: float = field(default_factory=time.monotonic)
    ended: float | None = None  # when the run ended: the elapsed time stops there
    finished: threading.Event = field(default_factory=threading.Event)

    def __post_init__(self):
        self.step = self.first

    def on_step(self, step: int, loss: float) -> None:
        self.step = step
        self.losses.append(float(loss))

    # The trainer's thread appends to `losses` while the page's timer reads them: each reader takes one copy (a slice)
    # and works on that, or its lengths could disagree mid-read.

    def recent_loss(self) -> float | None:
        """The mean loss of the last LOSS_WINDOW steps: one step's loss swings with its noise level and photos."""
        window = self.losses[-LOSS_WINDOW:]
        return sum(window) / len(window) if window else None

    def curve(self) -> pd.DataFrame | None:
        """The loss plot's rows: each step's loss and its running mean over LOSS_WINDOW steps (long format, one series each);
        None (an empty plot) before the first step: Gradio's plot, once sent an empty table, draws no series afterwards."""
        losses = self.losses[:]
        if not losses:
            return None
        n = len(losses)
        mean = pd.Series(losses, dtype=float).rolling(LOSS_WINDOW, min_periods=1).mean()
        return pd.DataFrame({"step": list(range(self.first + 1, self.first + n + 1)) * 2, "loss": losses + mean.tolist(),
                             "series": ["each step"] * n + [f"mean of {LOSS_WINDOW} steps"] * n})

    @property
    def phase(self) -> str:
        """What a running job is doing: preparing (before its first step), training, or making samples (after its last)."""
        if self.status != "running":
            return self.status
        return "preparing" if self.step == self.first else "making samples" if self.step >= self.total else "training"

    def end(self, status: str, error: str | None = None) -> None:
        self.ended = time.monotonic()
        self.status, self.error = status, error

    @property
    def seconds(self) -> float:
        return round((self.ended if self.ended is not None else time.monotonic()) - self.started, 1)

    def summary(self) -> dict:
        return {"concept": self.concept, "status": self.status, "phase": self.phase, "step": self.step, "steps": self.total,
                "loss": self.losses[-1] if self.losses else None, "error": self.error, "warning": self.warning,
                "seconds": self.seconds}


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
        self.device = default_device(config.device)
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
                    slots = tuple(slot_layouts(path, cid))
                except AdapterFileError as e:
                    print(f"warning: skipping {path}: {e}", file=sys.stderr)
                    continue
                info = file.extra
                sample = next((f for f in (path.parent / "preview.png", path.parent / "samples.png") if f.is_file()), None)  # (older runs: the grid)
                card = Card(id=cid, path=path, stamp=stamp, token=str(info.get("token") or ""), class_word=str(info.get("class_word") or ""),
                            method=str(info.get("method") or file.config.method), slot=file.config.slot, base_model=file.base_model,
                            sample=sample, rank=file.config.rank, slots=slots)
                self._cards[cid] = card
            if same_base(card.base_model, self.config.model):
                cards[cid] = card
        return cards

    def _card(self, cid: object, cards: dict[str, Card]) -> Card:
        if not isinstance(cid, str) or not CONCEPT_ID.fullmatch(cid):
            raise AppInputError(f"{cid!r} is not a concept name: use one listed by the app, '<concept>/<method>' (e.g. 'robot/{DEFAULT_METHOD}')")
        if cid not in cards:
            raise AppInputError(f"no concept '{cid}' in the outputs folder; available: {', '.join(cards) or 'none yet (train one first)'}")
        return cards[cid]

    def partition(self, method: str, skip: str | None = None) -> tuple[str, list[SlotLayout]]:
        """The slots a new `method` concept shares with the listed ones: the index layout it trains with (the one most
        listed concepts of this method and seed use, so that it composes with them; else the method's own) and the
        slot layouts of those concepts (all but `skip`'s) in that layout."""
        defaults = method_defaults(method)
        theirs = [s for c in self.cards().values() if c.id != skip for s in c.slots if s.method == method and s.seed == defaults.seed]
        counts = {}
        for s in theirs:
            counts[s.layout] = counts.get(s.layout, 0) + 1
        layout = max(sorted(counts), key=lambda name: (counts[name], name == defaults.index_layout)) if counts else defaults.index_layout
        return layout, [s for s in theirs if s.layout == layout]

    def other_layouts(self, method: str, skip: str | None = None) -> list[str]:
        """The listed concepts of `method` (same seed) in another index layout than a new one's: it cannot be used with them."""
        layout, _ = self.partition(method, skip)
        seed = method_defaults(method).seed
        return sorted({c.id for c in self.cards().values() if c.id != skip for s in c.slots
                       if s.method == method and s.seed == seed and s.layout != layout})

    def next_slot(self, method: str = DEFAULT_METHOD, rank: int | None = None, skip: str | None = None) -> int:
        """The smallest slot whose share of each layer no listed concept of `method` (same seed and layout) holds at
        `rank` (none: the method's own): a new concept there composes with all of them. 0 for a method without slots."""
        if not has_slots(method):
            return 0
        rank = method_defaults(method).rank if rank in (None, "") else int(rank)
        _, theirs = self.partition(method, skip)
        return free_slot(rank, [s.positions for s in theirs])

    def slot_clash(self, method: str, rank: int, slot: int, skip: str | None = None) -> str | None:
        """Why slot `slot` at `rank` of `method` would share indices with a listed concept of its layout (``partition``),
        worded for the page; None if it shares none."""
        if not has_slots(method):
            return None
        layout, theirs = self.partition(method, skip)
        planned = SlotLayout("the new concept", method, rank, slot, method_defaults(method).seed, layout)
        for other in theirs:
            if slot_clash(other, planned, theirs) is not None:
                return (f"slot {slot} at rank {rank} takes indices that {other.source} (slot {other.slot}, rank {other.rank}) already "
                        f"uses: the two {method} concepts would interfere when used together. Use slot "
                        f"{free_slot(rank, [s.positions for s in theirs])}, the next free one for {method} at rank {rank}")
        return None

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
                 num_images: int = 1, masks: dict | None = None, fusion: str = "sum",
                 regional_mode: str = DEFAULT_REGIONAL_MODE) -> tuple[list[tuple[Image.Image, int]], dict]:
        """Images of `prompt` with `concepts` ({id: weight}) active; returns [(image, seed)] and an info dict.

        A concept's region is a box in `regions` ({id: [x0, y0, x1, y1]} or "x0, y0, x1, y1") or a
        picture in `masks` ({id: PIL image}, white = inside), with its prompt in `region_prompts`.
        `regional_mode` (``regional.MODES``) says where a region confines its concept: latent (the
        default: the region denoised as its own crop, nothing of the concept acts outside),
        attention (in the attention layers only) or cross (in cross-attention only, Mix-of-Show's).
        `fusion` is a name of ``compose.FUSIONS``: sum, or gradient (fitted once per set of
        concepts, weights and sampler settings, then reused).
        """
        cfg = self.config
        all_cards = self.cards()
        if not isinstance(concepts, dict):
            raise AppInputError(f"concepts must map concept names to weights, e.g. {{'robot/{DEFAULT_METHOD}': 1.0}}")
        if len(concepts) > MAX_CONCEPTS:
            raise AppInputError(f"at most {MAX_CONCEPTS} concepts at once, got {len(concepts)}")
        chosen = {}
        for cid, weight in concepts.items():
            card = self._card(cid, all_cards)
            chosen[card.id] = _number(weight, f"weight of {cid}", *WEIGHT_RANGE)
        regions, region_prompts, masks = dict(regions or {}), dict(region_prompts or {}), dict(masks or {})
        for cid in list(regions) + list(region_prompts) + list(masks):
            self._card(cid, all_cards)
            if cid not in chosen:
                raise AppInputError(f"a region is given for '{cid}', which is not switched on")
        seed = int(_number(seed, "seed", 0, MAX_SEED, integer=True))
        steps = int(_number(steps, "steps", 1, cfg.max_steps, integer=True))
        n = int(_number(num_images, "number of images", 1, cfg.max_images, integer=True))
        guidance = _number(guidance_scale, "guidance", *GUIDANCE_RANGE)
        if fusion not in FUSIONS:
            raise AppInputError(f"fusion must be one of {', '.join(FUSIONS)}, got {fusion!r}")
        if not isinstance(regional_mode, str) or regional_mode not in REGIONAL_MODES:
            raise AppInputError(f"regional mode must be one of {', '.join(REGIONAL_MODES)} (where a region confines its concept: "
                                f"{'; '.join(f'{m}: {REGIONAL_MODE_WHERE.get(m, m)}' for m in REGIONAL_MODES)}), got {regional_mode!r}")
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
            try:
                self._ensure_loaded(cards)
            except ConfigError as e:  # e.g. two concepts whose slots clash: said with the page's names and fields
                raise AppInputError(for_page(_rename(str(e), {c.adapter_name: c.id for c in all_cards.values()}))) from None
            weights = {all_cards[cid].adapter_name: w for cid, w in chosen.items()}
            render = dict(negative_prompt=negative, steps=steps, guidance_scale=guidance)
            selection = FUSIONS[fusion](self.composer, weights, **render)
            fused = [self.composer.fused[n].summary() for n in selection if n in self.composer.fused]
            report = self.composer.overlap(list(weights))
            regional = [Region(concept=all_cards[cid].adapter_name, box=boxes.get(cid), mask=masks.get(cid) if cid not in boxes else None,
                               prompt=_text(region_prompts.get(cid), "regional prompt") or None)
                        for cid in chosen if cid in boxes or cid in masks]
            images = self.composer.render(prompt, seeds, selection, regions=regional, batch_size=n, regional_mode=regional_mode, **render)
        ids = {all_cards[cid].adapter_name: cid for cid in chosen}
        pairs = [{**p, "pair": "+".join(ids[x] for x in p["pair"].split("+")),
                  "crosstalk": None if p.get("crosstalk") is None else
                  [{**d, "inputs": ids.get(d["inputs"], d["inputs"]), "update": ids.get(d["update"], d["update"])} for d in p["crosstalk"]]}
                 for p in report.pairs()]
        talk = report.crosstalk or {}
        warnings = [for_page(_rename(w, ids)) for w in report.warnings()]
        warnings += _switched_off_tokens([prompt, *region_prompts.values()], all_cards, chosen)
        info = {"seconds": round(time.perf_counter() - start, 2), "prompt": prompt, "seeds": seeds, "concepts": chosen,
                "steps": steps, "guidance_scale": guidance, "negative_prompt": negative,
                "regions": {cid: list(boxes[cid]) if cid in boxes else "sketch" for cid in chosen if cid in boxes or cid in masks},
                "regional_mode": regional_mode, "overlap": pairs, "warnings": warnings, "overlap_threshold": report.threshold,
                "crosstalk_calibration": {ids.get(n, n): c for n, c in (talk.get("calibration") or {}).items()},
                "crosstalk_settings": talk.get("settings"), "crosstalk_skipped": talk.get("skipped"),
                "model": self.config.model, "fusion": fusion, "fused": fused[0] if fused else None}
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
                       method: str = DEFAULT_METHOD, rank: int | None = None, slot: int | None = None, steps: int | None = None,
                       overwrite: bool = False, resume: bool = False) -> TrainJob:
        """Check the request, save the photos, and start training in a background thread; returns the job.

        rank: none takes the method's own (configs/methods/<method>.yaml, as the command line does); slot: none
        takes the next free one; a slot whose indices a trained concept of the same method and seed uses is refused.
        resume: go on from the run's newest checkpoint (an interrupted run, or a finished one to more steps), with the
        rank, slot and index layout it was trained with and the photos it started from (the command line's --resume).
        """
        cfg = self.config
        if not isinstance(method, str) or method not in TRAINED_METHODS:  # exactly the registry's methods the concept trainer trains
            raise AppInputError(f"unknown method {method!r}; pick one of {', '.join(TRAINED_METHODS)}")
        rank = method_defaults(method).rank if rank in (None, "") else int(_number(rank, "rank", 1, MAX_RANK, integer=True))
        photos = list(photos or [])
        if example:
            if example not in self.examples:
                raise AppInputError(f"no example concept {example!r}; examples: {', '.join(self.examples) or 'none'}")
            if photos:
                raise AppInputError("give either photos or an example concept, not both")
            concept = self.examples[example]
            if (name or "").strip() not in ("", concept.key) or (class_word or "").strip() not in ("", concept.class_word):
                raise AppInputError(f"the example '{example}' trains as concept '{concept.key}' with class word '{concept.class_word}' "
                                    f"(token {concept.token}); to train under another name, upload photos instead of picking the example")
        else:
            concept = self._new_concept(name, class_word, None if resume else len(photos))
            if resume:
                if photos:
                    raise AppInputError("a continued run trains on the photos it started from: leave the upload empty")
                concept = self._saved_photos(concept)
        for card in self.cards().values():
            if card.token.lower() == concept.token.lower() and card.id.split("/")[0] != concept.key:
                raise AppInputError(f"concept '{card.id}' already uses token {card.token}: pick another name")
        cid = f"{concept.key}/{method}"
        out_dir = self.outputs / concept.key / method
        first, layout = 0, None
        if resume:
            if overwrite:
                raise AppInputError("tick either “Continue” (resume=True) or “Replace” (overwrite=True), not both")
            first, trained = self._checkpoint(out_dir, cid)
            rank, slot, layout = trained["rank"], trained["slot"], trained["layout"]  # the run's own: a resume must match them
        replacing = cid if overwrite else None  # a run being replaced does not hold its slot against itself
        if slot in (None, ""):
            slot = self.next_slot(method, rank, skip=replacing)
        else:
            slot = int(_number(slot, "slot", 0, MAX_SLOT, integer=True))
            # (this concept's own earlier run is no clash: it is replaced, or the output folder's check below refuses)
            clash = self.slot_clash(method, rank, slot, skip=cid)
            if clash is not None:
                raise AppInputError(clash)
        overrides = {"rank": rank, "slot": slot}
        if has_slots(method):  # the index layout of the concepts it is to compose with (``partition``), or a continued run's own
            overrides["layout"] = layout or self.partition(method, skip=cid)[0]
        self._check_fits(method, overrides)
        with self.job_lock:
            if self.job is not None and self.job.status == "running":
                raise AppInputError(f"a training run is going on ({self.job.concept}, step {self.job.step} of {self.job.total}): "
                                    "wait for it to finish or stop it")
            train_config = load_train_config(cfg.train_config, cfg.model, output_dir=str(out_dir), overwrite=bool(overwrite),
                                             **({"steps": int(_number(steps, "steps", 1, cfg.max_train_steps, integer=True))}
                                                if steps not in (None, "") else {}))
            if train_config.steps > cfg.max_train_steps:
                raise AppInputError(f"the training config asks for {train_config.steps} steps; this app allows at most {cfg.max_train_steps}")
            if train_config.steps <= first:
                raise AppInputError(f"{cid}'s run is at step {first} already: ask for more steps (the “Steps” field) to train on")
            try:
                RunDir(out_dir, resume=resume, overwrite=train_config.overwrite).check()  # refuse an existing run unless told, before any file is written
            except ConfigError as e:
                raise AppInputError(for_page(str(e))) from None
            if not example and not resume:
                concept = self._save_photos(concept, photos)
            job = TrainJob(concept=cid, total=train_config.steps, first=first)
            self.job = job
        if has_slots(method):
            apart = self.other_layouts(method, skip=cid)
            if apart:  # concepts of both layouts already listed: the new one can join only one group
                job.warning = (f"{', '.join(apart)} use another index layout than {overrides['layout']}: {cid} cannot be used "
                               f"together with them (their indices meet at random); retrain them to use them together")
        worker = threading.Thread(target=self._train, args=(job, concept, method, train_config, overrides, resume), daemon=True,
                                  name=f"train {cid}")
        worker.start()
        return job

    def _new_concept(self, name: str, class_word: str, count: int | None) -> ConceptConfig:
        """A concept from the page's fields; `count` uploaded photos (None: a continued run's, checked by ``_saved_photos``)."""
        if not isinstance(name, str) or not NEW_NAME.fullmatch(name) or safe_name(name) != name:
            raise AppInputError(f"concept name {name!r} is not allowed: use 1-40 letters, digits, '_' or '-', starting with a letter or digit "
                                "(and not a word like 'train' that names a model method)")
        if not isinstance(class_word, str) or not CLASS_WORD.fullmatch(class_word.strip()):
            raise AppInputError(f"class word {class_word!r} is not allowed: one or a few words (letters), e.g. 'dog' or 'toy'")
        if count is not None and not MIN_PHOTOS <= count <= self.config.max_photos:
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
        return self._saved_photos(concept)

    def _check_fits(self, method: str, overrides: dict) -> None:
        """Refuse a rank or slot that the UNet's adapted layers cannot hold before the run starts (injection's own check)."""
        try:
            build_cores(self.pipe.unet, load_adapter_config(method, **overrides))
        except ConfigError as e:
            raise AppInputError(for_page(str(e))) from None

    def proposed_slot(self, method: str = DEFAULT_METHOD, rank: int | None = None, name: str = "", overwrite: bool = False) -> int:
        """The page's slot proposal: the next free one, where a run being replaced (“Replace” ticked) holds none."""
        return self.next_slot(method, rank, skip=f"{(name or '').strip()}/{method}" if overwrite else None)

    def _saved_photos(self, concept: ConceptConfig) -> ConceptConfig:
        """`concept` on the photos saved for it (<outputs>/<name>/photos): a new run's, or a continued run's from its first."""
        saved = ConceptConfig(name=concept.name, token=concept.token, class_word=concept.class_word,
                              instance_dir=str(self.outputs / concept.key / "photos"))
        try:
            enough = len(saved.instance_images()) >= MIN_PHOTOS  # the trainer's own listing of a photo folder
        except ConfigError:
            enough = False
        if not enough:
            raise AppInputError(f"no saved photos of '{concept.key}' to continue its run with: train it from photos first")
        return saved

    def _checkpoint(self, out_dir: Path, cid: str) -> tuple[int, dict]:
        """A run's newest checkpoint, for a continued run: its step and the adapter settings it was trained with."""
        try:
            state, _ = load_checkpoint(RunDir(out_dir, resume=True).checkpoint_source())
        except ConfigError:
            raise AppInputError(f"{cid} has no run to continue (no checkpoint): untick “Continue” to train it from the start") from None
        trained = (state.get("fingerprint") or {}).get("adapter")
        if not trained:
            raise AppInputError(f"{cid}'s checkpoint does not say how it was trained: tick “Replace” to train it again from the start")
        return int(state["step"]), trained

    def _train(self, job: TrainJob, concept: ConceptConfig, method: str, train_config, overrides: dict, resume: bool = False) -> None:
        try:
            result = train(concept, method, self.config.model, train_config=train_config, adapter_overrides=overrides, resume=resume,
                           stop_event=job.stop, on_step=job.on_step)
            job.step = result.step
            self.trained += 1  # before the status says done: a page that sees "done" lists the new concept
            job.end("done")
        except TrainingInterrupted as e:
            job.end("stopped", f"stopped at step {e.step}; its checkpoint is kept: tick “Continue” (resume=True) and train again "
                               "to go on from it, or “Replace” (overwrite=True) to start over")
        except Exception as e:  # shown in the page; the app keeps running
            if not isinstance(e, EXPECTED):
                traceback.print_exc()
            job.end("failed", for_page(str(e).strip() or type(e).__name__))
        finally:
            if job.status == "running":  # a BaseException (SystemExit, ...) went past the handlers above
                job.end("failed", "the training thread ended unexpectedly")
            job.finished.set()

    def stop_training(self) -> str:
        job = self.job
        if job is None or job.status != "running":
            return "no training run is going on"
        job.stop.set()
        return f"stopping {job.concept} at the next step boundary"


# ------------------------------------------------------------------------------------ helpers


@functools.lru_cache(maxsize=None)
def method_defaults(method: str) -> AdapterConfig:
    """The method's own config (configs/methods/<method>.yaml): the rank and seed the command line trains with."""
    return load_adapter_config(method)


def has_slots(method: str) -> bool:
    """Whether `method`'s concepts take slots (the registry's slot side): the slot proposal and check apply."""
    spec = METHOD_SPECS.get(method)
    return bool(spec and spec.composable)


# The trainer's and the composer's messages name command-line flags; the page has fields for them.
_PAGE_WORDS = [
    (re.compile(r"add --resume to continue it(?: \(e\.g\. with more steps\))?, --overwrite to (?:replace it|start over)"
                r"(?: \(the old files stay until the new run has finished\))?, or pass another --output-dir"),
     "tick “Continue the run from its last checkpoint” (the API's resume=True) to go on, “Replace an earlier run of this concept "
     "and method” (overwrite=True) to train it again from the start, or pick another concept name"),
    (re.compile(r"continue with the same command plus --resume"), "train it again with “Continue” ticked to go on from its checkpoint"),
    (re.compile(r"train them with the same --seed in different --slot values of"),
     "train them in different slots (the “Slot” field) of"),
    (re.compile(r" \(or compose them anyway, overlapping, with allow_overlap\)"), ""),  # not offered by the page
    (re.compile(r"--layout (\w+) --slot (\d+)"), r"slot \2 of the \1 index layout (the app trains in the layout of the listed concepts)"),
    (re.compile(r"--layout (\w+)"), r"the \1 index layout"),
    (re.compile(r"--rank (\d+) --slot (\d+)"), r"rank \1 in slot \2"),
    (re.compile(r"--slot (\d+)"), r"slot \1"),
    (re.compile(r"--rank (\d+)"), r"rank \1"),
    (re.compile(r"--overwrite\b"), "“Replace” (overwrite=True)"),
    (re.compile(r"--slot\b"), "the “Slot” field"),
    (re.compile(r"--rank\b"), "the “Rank”"),
    (re.compile(r"--steps\b"), "the “Steps” field"),
    (re.compile(r"--output-dir\b"), "another concept name"),
    (re.compile(r"--resume\b"), "“Continue” (resume=True)"),
    (re.compile(r"--token-mode\b"), "token mode"),
    (re.compile(r"--token\b"), "token (another concept name)"),
    (re.compile(r"--seed\b"), "seed"),
    (re.compile(r"--([a-z][\w-]*)"), r"the command line's \1 option"),  # any other flag: still no “--” in the page
]


def for_page(message: str) -> str:
    """A trainer's or composer's message worded for the page: its fields instead of command-line flags."""
    for pattern, words in _PAGE_WORDS:
        message = pattern.sub(words, message)
    return message


def _rename(message: str, names: dict[str, str]) -> str:
    """Concepts' adapter names (robot__sbora-fa) in a composer message replaced by the ids the page shows (robot/sbora-fa)."""
    for adapter_name, cid in names.items():
        message = message.replace(adapter_name, cid)
    return message


def _switched_off_tokens(prompts: list, cards: dict[str, Card], chosen: dict) -> list[str]:
    """Warnings for tokens in the prompts whose concepts are all switched off (the token means nothing without them)."""
    served = {cards[cid].token.lower() for cid in chosen}
    text = " ".join(p for p in prompts if isinstance(p, str))
    off: dict[str, list[str]] = {}
    for card in cards.values():
        token = card.token
        if token and token.lower() not in served and re.search(rf"(?<!\w){re.escape(token)}(?!\w)", text, re.IGNORECASE):
            off.setdefault(token, []).append(card.id)
    return [f"the prompt holds {token}, the token of {' / '.join(ids)}, which is switched off: the token means nothing to the model "
            f"without its concept; switch {ids[0]} on, or take {token} out of the prompt" for token, ids in off.items()]


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
             f"prompt: {_escape(info['prompt'])}",
             "", f"steps {info['steps']} · guidance {info['guidance_scale']:g} · fusion {info['fusion']} · concepts: "
                 + (", ".join(f"{_escape(cid)} ×{w:g}" for cid, w in info["concepts"].items()) or "none (the base alone)")]
    if info["overlap"]:
        lines += ["", f"Overlap between concepts (per layer; a warning above interference {info['overlap_threshold']:g}):", "",
                  "| concepts | weight overlap (max interference) | layers above | shared indices "
                  "| output cross-talk on calibration inputs (median over layers) | max cross-talk (layer) |", "|---|---|---|---|---|---|"]
        for p in info["overlap"]:
            talk = "; ".join(f"{_escape(d['update'])} on {_escape(d['inputs'])}'s inputs: {_g(d['median'])}"
                             for d in p.get("crosstalk") or ()) or "not measured"
            worst = max((d for d in p.get("crosstalk") or () if d["max"] is not None), key=lambda d: d["max"], default=None)
            most = "-" if worst is None else f"{_g(worst['max'])} ({_escape(worst['worst_layer'] or '?')})"
            lines.append(f"| {_escape(p['pair'])} | {p['max_interference']:.3g} | {p['above']} of {p['layers']} | "
                         f"{'-' if p['shared_indices'] is None else p['shared_indices']} | {talk} | {most} |")
        lines += ["", _escape(WEIGHT_OVERLAP_MEANING), "", _escape(CROSSTALK_MEANING)]
        calibration = info.get("crosstalk_calibration") or {}
        if calibration:
            settings = info.get("crosstalk_settings") or {}
            lines += ["", f"Cross-talk calibration inputs ({settings.get('steps')} denoising step(s) at {settings.get('size') or 'the model size'} px, "
                          "each concept alone at weight 1): "
                      + "; ".join(f"{_escape(cid)} ({c['source']}): {_escape(' / '.join(c['prompts']))}" for cid, c in calibration.items())]
        if info.get("crosstalk_skipped"):
            lines += ["", f"Output cross-talk not measured: {_escape(info['crosstalk_skipped'])}."]
    if info["fused"]:
        f = info["fused"]
        lines += ["", f"Gradient fusion of {f['layers']} layers ({f['seconds']:.1f} s): mean relative output error on the concepts' own "
                      f"inputs {f['sum_error']:.3g} with the plain sum, {f['fused_error']:.3g} fused."]
    if info["regions"]:
        mode = info.get("regional_mode", DEFAULT_REGIONAL_MODE)
        lines += ["", f"Regions (mode {mode}: each concept confined in {REGIONAL_MODE_WHERE.get(mode, mode)}): "
                  + ", ".join(f"{cid} {'sketch' if r == 'sketch' else tuple(r)}" for cid, r in info["regions"].items())]
    lines += [f"\n⚠️ {_escape(w)}" for w in info["warnings"]]
    return "\n".join(lines)


def _g(value: float | None) -> str:
    return "-" if value is None else f"{value:.3g}"


def _escape(text: str) -> str:
    return re.sub(r"([\\`*_{}\[\]<>()#+!|])", r"\\\1", text)


# ------------------------------------------------------------------------------------ UI


def build_ui(studio: Studio) -> gr.Blocks:
    cfg = studio.config
    methods = TRAINED_METHODS

    @shown_in_page
    def api_generate(prompt: str, concepts: dict[str, float], regions: dict[str, list[float]] | None = None,
                     region_prompts: dict[str, str] | None = None, negative_prompt: str = "", seed: int = 0, steps: int = 25,
                     guidance_scale: float = 7.5, num_images: int = 1, fusion: str = "sum",
                     regional_mode: str = DEFAULT_REGIONAL_MODE) -> tuple[list[FileData], dict]:
        """Generate images with trained concepts. concepts: {"<concept>/<method>": weight}; regions: {id: [x0, y0, x1, y1]}
        as fractions of the image (regional sampling) with optional region_prompts: {id: prompt}; regional_mode: where a
        region confines its concept: latent (the default: the whole UNet, the region denoised as its own crop), attention
        (the attention layers) or cross (cross-attention only, Mix-of-Show's); fusion: sum (plain sum of the updates) or
        gradient (Mix-of-Show's gradient fusion). Returns the PNG files and an info dict (seconds, seeds, regional_mode,
        overlap report: weight overlap and output cross-talk on calibration inputs per pair, warnings, fusion errors)."""
        images, info = studio.generate(prompt, concepts, regions, region_prompts, negative_prompt, seed, steps, guidance_scale, num_images,
                                       fusion=fusion, regional_mode=regional_mode)
        return [FileData(path=str(p)) for p in studio.save_images(images)], info

    @shown_in_page
    def api_train(name: str = "", class_word: str = "", photos: list[FileData] | None = None, example: str = "",
                  method: str = DEFAULT_METHOD, rank: int | None = None, slot: int | None = None, steps: int | None = None,
                  overwrite: bool = False, resume: bool = False) -> dict:
        """Train a concept from 3-20 photos (or a shipped example concept) and wait for it: returns its id
        ("<name>/<method>"), status, steps, final loss and seconds. rank: none takes the method's own (as the command
        line); slot: none takes the next free slot (a slot a trained concept of the same method already uses is refused);
        overwrite: replace an earlier run; resume: go on from its newest checkpoint (to `steps`, with its own rank and slot)."""
        job = studio.start_training(name, class_word, photos, example, method, rank, slot, steps, overwrite, resume)
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
        # This page's choices per concept ({id: {"on": ..., "weight": ..., "box": ..., "rp": ...}}), kept as they change:
        # listing the concepts again (Refresh, a finished run) renders the cards with them (a component's key alone does
        # not keep a checkbox's or a slider's value across a re-render).
        picks = gr.State({})
        with gr.Tab("Generate"):
            with gr.Row():
                with gr.Column(scale=2):
                    refresh = gr.Button("Refresh concepts", size="sm")
                    cards_area = gr.Column()
                    # One choice for every concept's region (outside the cards: a re-listing keeps it as it is).
                    regional_mode = gr.Radio([(f"{REGIONAL_MODE_WHERE.get(m, m)} ({m})", m) for m in reversed(REGIONAL_MODES)],
                                             value=DEFAULT_REGIONAL_MODE, label="Regions confine the concept in",
                                             info="latent: the region is denoised as its own crop, nothing of its concept acts outside; "
                                                  "attention: only the attention layers are confined; cross: only cross-attention "
                                                  "(Mix-of-Show's region-aware attention)", elem_id="regional-mode", interactive=True)
                with gr.Column(scale=3):
                    # interactive=True on every input: Generate's click is wired inside gr.render, and the page locks a
                    # component that no event (known when the page loads) takes as an input unless it is told otherwise.
                    prompt = gr.Textbox(label="Prompt (use the concepts' tokens; empty: 'a photo of' the chosen concepts)", lines=2,
                                        elem_id="prompt", interactive=True)
                    negative = gr.Textbox(label="Negative prompt", lines=1, elem_id="negative", interactive=True)
                    with gr.Row():
                        seed = gr.Number(label="Seed", value=0, precision=0, minimum=0, maximum=MAX_SEED, elem_id="seed", interactive=True)
                        steps = gr.Slider(1, cfg.max_steps, value=min(25, cfg.max_steps), step=1, label="Steps", elem_id="steps",
                                          interactive=True)
                        guidance = gr.Slider(*GUIDANCE_RANGE, value=7.5, step=0.5, label="Guidance", elem_id="guidance", interactive=True)
                        count = gr.Slider(1, cfg.max_images, value=1, step=1, label="Images", elem_id="images", interactive=True)
                    fusion = gr.Radio(list(FUSIONS), value="sum", label="Fusion (sum: the updates added; gradient: Mix-of-Show's fused weights, "
                                                                     "fitted once per set of concepts and settings)", elem_id="fusion",
                                      interactive=True)
                    go = gr.Button("Generate", variant="primary", elem_id="generate")
                    # Whole images: scaled to fit (object-fit contain), small ones shown upscaled by whole pixels, as PNG.
                    gallery = gr.Gallery(label="Images", columns=2, fit_columns=False, object_fit="contain", format="png",
                                         interactive=False, elem_id="gallery")
                    info = gr.Markdown(elem_id="info")

            with cards_area:
                @gr.render(inputs=[listing, picks], triggers=[demo.load, listing.change])
                def concept_cards(_version, picks_):
                    cards = list(studio.cards().values())
                    if not cards:
                        gr.Markdown(f"No trained concepts in `{studio.outputs}` yet: train one in the **Train** tab.")
                    controls = []
                    for card in cards:
                        mine = (picks_ or {}).get(card.id, {})
                        with gr.Group():
                            with gr.Row(equal_height=True):
                                picture = None if card.sample is None else _thumbnail(card.sample)
                                if picture is not None:
                                    gr.Image(value=picture, show_label=False, interactive=False, container=False,
                                             height=110, scale=2, min_width=120, buttons=[])
                                with gr.Column(scale=3, min_width=160):
                                    gr.Markdown(f"**{card.id}** · token `{card.token}` · class *{_escape(card.class_word)}* · "
                                                f"slot {card.slot} (rank {card.rank})")
                                    on = gr.Checkbox(label=f"use {card.id}", value=bool(mine.get("on", False)), key=f"on-{card.id}",
                                                     elem_classes="concept-switch", interactive=True)
                                    weight = gr.Slider(*WEIGHT_RANGE, value=mine.get("weight", 1.0), step=0.05, label=f"weight of {card.id}",
                                                       key=f"w-{card.id}", elem_classes="concept-weight", interactive=True)
                            with gr.Accordion("Region (optional)", open=bool(mine.get("box") or mine.get("rp"))):
                                box = gr.Textbox(label="Box x0, y0, x1, y1 (fractions of the image, e.g. 0, 0, 0.5, 1)",
                                                 value=mine.get("box", ""), key=f"box-{card.id}", interactive=True)
                                sketch = gr.Sketchpad(label="…or paint it (square = image)", type="pil",
                                                      canvas_size=(256, 256), fixed_canvas=True, layers=False, height=300,
                                                      brush=gr.Brush(default_size=32, colors=["#e8590c"], color_mode="fixed"),
                                                      key=f"sketch-{card.id}", elem_classes="region-sketch", interactive=True)
                                region_prompt = gr.Textbox(label="Regional prompt", placeholder=f"a photo of {card.token} {card.class_word}",
                                                           value=mine.get("rp", ""), key=f"rp-{card.id}", interactive=True)
                        for what, control in (("on", on), ("weight", weight), ("box", box), ("rp", region_prompt)):
                            control.change(functools.partial(remember, card.id, what), [picks, control], picks, api_visibility="private",
                                           queue=False, show_progress="hidden")
                        controls += [on, weight, box, sketch, region_prompt]
                    ids = [c.id for c in cards]
                    go.click(functools.partial(ui_generate, ids),
                             inputs=[prompt, negative, seed, steps, guidance, count, fusion, regional_mode, *controls],
                             outputs=[gallery, info], api_visibility="private", concurrency_id="generate", concurrency_limit=1)

        def remember(cid, what, picks_, value):
            picks_ = picks_ if isinstance(picks_, dict) else {}
            picks_.setdefault(cid, {})[what] = value  # in place: changes arriving together all stay
            return picks_

        @shown_in_page
        def ui_generate(ids, prompt_, negative_, seed_, steps_, guidance_, count_, fusion_, regional_mode_, *values):
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
                                           fusion=fusion_, regional_mode=regional_mode_)
            return [(shown(im), f"seed {s}") for im, s in images], overlap_markdown(data)

        with gr.Tab("Train"):
            with gr.Row():
                with gr.Column():
                    photos = gr.File(label=f"Photos ({MIN_PHOTOS}-{cfg.max_photos} images, at most {cfg.max_upload_mb:g} MB each)",
                                     file_count="multiple", file_types=["image"], elem_id="photos")
                    example = gr.Dropdown([""] + list(studio.examples), value="", label="…or a shipped example concept",
                                          elem_id="example", interactive=True)
                    with gr.Row():
                        name = gr.Textbox(label="Concept name", placeholder="e.g. mydog", elem_id="name", interactive=True)
                        class_word = gr.Textbox(label="Class word", placeholder="e.g. dog", elem_id="class-word", interactive=True)
                    token = gr.Markdown("Its token in prompts: `<name1>` (from the concept name)", elem_id="token")
                    with gr.Row():
                        first_method = DEFAULT_METHOD if DEFAULT_METHOD in methods else methods[0]
                        method = gr.Dropdown(methods, value=first_method, label="Method", elem_id="method", interactive=True)
                        slot = gr.Number(label="Slot (the next free one is proposed)", value=studio.next_slot(first_method), precision=0,
                                         minimum=0, maximum=MAX_SLOT, elem_id="slot", interactive=True)
                    rank = gr.Slider(1, MAX_RANK, value=method_defaults(first_method).rank, step=1, label="Rank",
                                     info="the method's own is proposed, as on the command line (configs/methods/<method>.yaml)",
                                     elem_id="rank", interactive=True)
                    with gr.Row():
                        train_steps = gr.Number(label="Steps", value=studio.default_train_steps, precision=0, minimum=1,
                                                maximum=cfg.max_train_steps, elem_id="train-steps", interactive=True)
                        overwrite = gr.Checkbox(label="Replace an earlier run of this concept and method", value=False, elem_id="replace",
                                                interactive=True)
                        resume = gr.Checkbox(label="Continue the run from its last checkpoint", value=False, elem_id="continue",
                                             info="an interrupted run, or a finished one to more steps; with its own rank, slot "
                                                  "and photos", interactive=True)
                    with gr.Row():
                        start = gr.Button("Train", variant="primary", elem_id="train")
                        stop = gr.Button("Stop", elem_id="stop")
                with gr.Column():
                    progress = gr.Slider(0, 1, value=0, step=1, label="Progress (steps)", interactive=False)
                    status = gr.Markdown("No training run yet.", elem_id="train-status")
                    loss_plot = gr.LinePlot(x="step", y="loss", color="series", title="Training loss", height=240)

        def pick_example(example_):
            """An example concept fills in (and holds) its name and class word, and shows its token."""
            concept = studio.examples.get(example_)
            if concept is None:
                return gr.update(value="", interactive=True), gr.update(value="", interactive=True), _token_text("")
            return (gr.update(value=concept.key, interactive=False), gr.update(value=concept.class_word, interactive=False),
                    f"Its token in prompts: `{concept.token}` (the example's)")

        example.change(pick_example, example, [name, class_word, token], api_visibility="private", queue=False)
        name.input(_token_text, name, token, api_visibility="private", queue=False, show_progress="hidden")
        # The method's own rank (as the command line), and the next free slot for that method and rank, where the run
        # “Replace” would replace holds none.
        method.change(lambda m, n, o: (method_defaults(m).rank, studio.proposed_slot(m, None, n, o)), [method, name, overwrite],
                      [rank, slot], api_visibility="private", queue=False)
        for control in (rank, name, overwrite):
            control.change(studio.proposed_slot, [method, rank, name, overwrite], slot, api_visibility="private", queue=False,
                           show_progress="hidden")

        @shown_in_page
        def ui_train(files, example_, name_, class_word_, method_, rank_, slot_, steps_, overwrite_, resume_):
            job = studio.start_training(name_, class_word_, files, example_, method_, rank_, slot_, steps_, overwrite_, resume_)
            if job.first:
                return f"Continuing **{job.concept}** from step {job.first} to {job.total}…"
            return f"Started **{job.concept}** ({job.total} steps)…"

        start.click(ui_train, [photos, example, name, class_word, method, rank, slot, train_steps, overwrite, resume], status,
                    api_visibility="private", concurrency_id="train-start", concurrency_limit=1)
        stop.click(studio.stop_training, None, status, api_visibility="private", queue=False)

        def poll(seen_, known_, listing_, method_, rank_, name_, overwrite_):
            """Every second: the training run's progress, and the concept list when a run has finished."""
            job = studio.job
            text = None if job is None else train_status(job)
            key = None if job is None else (id(job), job.step, job.status, text)
            outputs = [gr.skip()] * 4 + [key, gr.skip(), gr.skip()]
            if key != seen_ and job is not None:
                outputs[:3] = [gr.update(maximum=max(job.total, 1), value=job.step), text, job.curve()]
            trained = studio.trained
            if known_ != trained:
                outputs[3], outputs[5], outputs[6] = studio.proposed_slot(method_, rank_, name_, overwrite_), trained, listing_ + 1
            return outputs

        gr.Timer(1.0).tick(poll, [seen, known, listing, method, rank, name, overwrite], [progress, status, loss_plot, slot, seen, known, listing],
                           api_visibility="private", queue=False, show_progress="hidden")
        refresh.click(lambda n: n + 1, listing, listing, api_visibility="private", queue=False)
        demo.load(lambda m, r: (studio.trained, studio.next_slot(m, r)), [method, rank], [known, slot], api_visibility="private", queue=False)

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


def train_status(job: TrainJob) -> str:
    """The Train tab's status line: what the run is doing, its step, loss and time (which stops when the run ends)."""
    c, step, total = job.concept, job.step, job.total
    text = {"preparing": f"Preparing **{c}** (loading the model and the photos)…",
            "training": f"Training **{c}**: step {step} of {total}",
            "making samples": f"Trained **{c}** ({step} of {total} steps) · making samples… (the sample images, then the concept is ready)",
            "done": f"Done: **{c}** ({step} steps) is in the Generate tab",
            "stopped": f"Stopped **{c}**: {_escape(job.error or '')}",
            "failed": f"Training **{c}** failed: {_escape(job.error or '')}"}[job.phase]
    if job.losses:
        n = min(len(job.losses), LOSS_WINDOW)
        text += f" · loss {job.recent_loss():.4f}" + (f" (mean of the last {n} steps)" if n > 1 else "")
    text += f" · {_duration(job.seconds)}" + (" so far" if job.status == "running" else "")
    return text + (f"\n\n⚠️ {_escape(job.warning)}" if job.warning else "")


def _duration(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds} s" if seconds < 60 else f"{seconds // 60} min {seconds % 60:02d} s"


def _token_text(name: str) -> str:
    name = (name or "").strip()
    if NEW_NAME.fullmatch(name):
        return f"Its token in prompts: `<{name.lower()}1>`"
    return "Its token in prompts: `<name1>` (from the concept name)"


def shown(image: Image.Image, size: int = SHOWN_SIZE) -> Image.Image:
    """`image` as the page shows it: a small one upscaled by a whole factor (nearest neighbour: every pixel a sharp
    square, none invented) until its shorter side reaches `size` (its longer side at most 8·`size`); larger ones unchanged."""
    factor = min(math.ceil(size / max(1, min(image.size))), 8 * size // max(1, max(image.size)))
    if factor <= 1:
        return image
    return image.resize((image.width * factor, image.height * factor), Image.Resampling.NEAREST)


def _thumbnail(path: Path) -> Image.Image | None:
    """A card's picture, small; None (the card without one) when the file does not decode: the list still renders."""
    try:
        im = open_rgb(path)  # the project's one decoder: whatever it cannot read is a ConceptError
    except ConceptError as e:
        print(f"warning: not showing {path}: {e}", file=sys.stderr)
        return None
    im.thumbnail((384, 192))
    return im


# The gallery grows with its rows (its default caps the grid at 55% of the window and cuts the square cells'
# bottoms off), starts its images below its label and buttons (which otherwise cover their top corners), shows
# an image's caption (its seed, also in the text below) only under the pointer, and lets the browser scale images
# by whole pixels, as the app upscales them (square corners: none of the picture rounded off). The overlap table's
# headings break between words, not inside them (Gradio's tables break anywhere: "concep-ts").
CSS = """
#gallery .grid-wrap { max-height: none; }
#gallery .grid-container { padding-top: 28px; }
#gallery img { image-rendering: pixelated; }
#gallery .thumbnail-item, #gallery .thumbnail-item img { border-radius: 0; }
#gallery .thumbnail-item .caption-label { opacity: 0; }
#gallery .thumbnail-item:hover .caption-label { opacity: 1; }
#info table th { word-break: normal; overflow-wrap: normal; }
"""


def launch(studio: Studio, demo: gr.Blocks | None = None, block: bool = True) -> gr.Blocks:
    """Serve the app on the configured host and port (bounded queue, upload limit, nothing from the outputs folder served)."""
    cfg = studio.config
    demo = demo or build_ui(studio)
    demo.queue(max_size=cfg.max_queue, default_concurrency_limit=1)
    demo.launch(server_name=cfg.host, server_port=cfg.port, max_file_size=int(cfg.max_upload_mb * 1024 * 1024),
                 allowed_paths=[studio.images_dir], blocked_paths=[str(studio.outputs.resolve())], prevent_thread_lock=not block, show_error=True,
                 ssr_mode=False, quiet=not block, css=CSS)
    return demo


def _run(invocation: Invocation) -> None:
    studio = Studio(invocation.configs["app"])
    try:
        launch(studio)
    finally:
        studio.close()


COMMAND = Command("sbora-app", __doc__, _run, sections=(Section("app", AppConfig, title="app options"),))
main = COMMAND.main


if __name__ == "__main__":
    sys.exit(main())
