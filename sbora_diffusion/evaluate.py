"""Evaluate personalized diffusion models with CLIP (the Mix-of-Show protocol the SBoRA paper uses).

Subcommands (``python -m sbora_diffusion.evaluate SUBCOMMAND --help``, or ``sbora-evaluate``):

- ``score``: CLIP-T and CLIP-I of a folder of generated images listed in a manifest.
- ``drift``: how far an adapter moves images of unrelated prompts away from the base model's
  images at the same seeds (concept leakage).
- ``run``: end to end for one concept and one or more trained adapters: generate the
  concept's evaluation prompts x seeds (seed k for image k), score them against the
  concept's photos, measure drift, and rebuild the results tables of the output folder.
- ``table``: rebuild ``results.{json,csv,md}`` from every ``result.json`` under a folder.

The scores themselves live in ``sbora_diffusion.clip_score``.
"""

from __future__ import annotations

import csv
import json
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path

from sbora.adapters import read_adapter
from sbora.cli import Command, Flag, Invocation, Section
from sbora.configuration import ConfigError, check_fields, to_dict
from sbora.fileio import atomic_path, write_json, write_text

from . import clip_score
from .clip_score import ClipScoreError, ClipScorer

RESULTS_NAME = "result.json"  # one per (concept, method) folder; `table` collects them
BASE_DRIFT = "base-drift"  # <concept>/base-drift/: the base model's images of the drift prompts
# Prompts with no personal concept in them: an adapter that leaks changes their images.
DRIFT_PROMPTS = (
    "a photo of a city street at night",
    "a bowl of fruit on a wooden table",
    "a mountain lake at sunrise",
    "a red sports car parked by the sea",
    "an oil painting of a lighthouse",
)


@dataclass
class ClipConfig:
    """How images are scored (shared by every subcommand)."""

    clip_model: str = field(default=clip_score.DEFAULT_CLIP_MODEL, metadata={"help": "pocket (the pocket world's CLIP, shipped: the offline default, for the pocket base's images), an open_clip architecture name (ViT-B-32: the paper's, for real Stable Diffusion images), a JSON architecture file (open_clip's model-config format), or local-dir:FOLDER"})
    clip_pretrained: str | None = field(default=clip_score.DEFAULT_CLIP_PRETRAINED, metadata={"help": "open_clip pretrained tag of an architecture name (ignored for pocket); also sets the tag's preprocessing and QuickGELU when --clip-weights gives the file ('none' for neither)"})
    clip_weights: str | None = field(default=None, metadata={"help": "local CLIP checkpoint (.safetensors or a weights_only state dict), for offline use"})
    clip_batch_size: int = field(default=32, metadata={"help": "images or texts per CLIP forward pass"})
    text_prefix: str = field(default=clip_score.DEFAULT_TEXT_PREFIX, metadata={"help": "text put before every prompt for CLIP-T (Mix-of-Show: 'A photo depicts ')"})
    device: str = field(default="auto", metadata={"help": "cpu, cuda, cuda:1, ... or auto (cuda when available)"})
    cache_dir: str | None = field(default="outputs/eval/cache", metadata={"help": "where reference-image embeddings are cached ('none' = no disk cache)"})

    def validate(self) -> None:
        check_fields(self, {"clip_batch_size": (1, 4096)})


@dataclass
class RunConfig(ClipConfig):
    """End-to-end evaluation (``run``); defaults follow Mix-of-Show (docs/architecture.md §5)."""

    model: str | None = field(default=None, metadata={"help": "base text-to-image model: an embedded name (pocket, tiny), a diffusers folder or a hub id (default: the adapters' base model)"})
    num_prompts: int = field(default=20, metadata={"help": "evaluation prompts per concept (the first N of the concept's eval_prompts)"})
    num_images: int = field(default=50, metadata={"help": "images per prompt; image k uses seed k"})
    sample_steps: int = field(default=50, metadata={"help": "sampling steps (DDIM)", "aliases": ("steps",)})
    guidance_scale: float = field(default=7.5, metadata={"help": "classifier-free guidance scale"})
    height: int | None = field(default=None, metadata={"help": "image height (default: the model's)"})
    width: int | None = field(default=None, metadata={"help": "image width (default: the model's)"})
    gen_batch_size: int = field(default=4, metadata={"help": "images per sampling batch"})
    drift_prompts: list[str] = field(default_factory=lambda: list(DRIFT_PROMPTS), metadata={"help": "prompts unrelated to the concept, for drift (YAML list; the command line splits on commas)"})
    drift_images: int = field(default=10, metadata={"help": "images per drift prompt (seeds 0..N-1); 0 skips drift"})
    category: str | None = field(default=None, metadata={"help": "the concept's category in the tables (e.g. character, object; SBoRA's columns)"})
    output_dir: str = field(default="outputs/eval", metadata={"help": "root folder: <concept>/<method>/ per run, results.{json,csv,md} over all runs"})

    def validate(self) -> None:
        super().validate()
        check_fields(self, {"num_prompts": (1, None), "num_images": (1, 100_000), "sample_steps": (1, 1000), "gen_batch_size": (1, 256),
                            "guidance_scale": (0, 100), "height": (8, 8192), "width": (8, 8192), "drift_images": (0, 100_000)})
        if self.drift_images and not self.drift_prompts:
            raise ConfigError("drift_images > 0 needs drift_prompts (or set drift_images 0 to skip drift)")


# ----------------------------------------------------------------------------- output files


def write_csv(path: Path, rows: list[dict]) -> Path:
    columns = list(dict.fromkeys(k for row in rows for k in row))  # union of keys, first-seen order
    with atomic_path(path) as tmp, open(tmp, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)
    return path


def write_report(json_path: Path, report: dict, settings: dict) -> None:
    """``report`` (from clip_score.score/drift) as JSON (settings, summary, per image) and per-image CSV."""
    write_json(json_path, {"settings": settings, **report})
    write_csv(json_path.with_suffix(".csv"), report["images"])


def scorer_from(cfg: ClipConfig) -> ClipScorer:
    return clip_score.load_clip(cfg.clip_model, cfg.clip_pretrained, cfg.clip_weights, cfg.device, cfg.clip_batch_size)


# ----------------------------------------------------------------------------- tables

TABLES = (
    ("Text alignment (CLIP-T, Mix-of-Show form 2.5·max(cos, 0))", "clip_t_mixofshow"),
    ("Text alignment (CLIP-T, plain cosine)", "clip_t_cosine"),
    ("Image alignment (CLIP-I, plain cosine)", "clip_i_cosine"),
    ("Drift on unrelated prompts (1 − cosine to the base model's images; lower is better)", "drift"),
)


def _mean(values: list[float]) -> float | None:
    return sum(values) / len(values) if values else None


def markdown_tables(results: list[dict]) -> str:
    """One table per metric, shaped like the SBoRA README's: a row per method; a column per
    concept, per category (mean over its concepts) and the mean over concepts."""
    concepts = list(dict.fromkeys(r["concept"] for r in results))
    methods = list(dict.fromkeys(r["method"] for r in results))
    category_of = {r["concept"]: r.get("category") for r in results}
    categories = list(dict.fromkeys(c for c in category_of.values() if c))
    value = {(r["method"], r["concept"]): r["summary"] for r in results}
    fmt = lambda v: "–" if v is None else f"{v:.4f}"  # noqa: E731
    parts = []
    for title, key in TABLES:
        if not any(key in r["summary"] for r in results):
            continue
        header = ["Method", *concepts, *categories, "Mean"]
        lines = [f"## {title}", "", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        for m in methods:
            per_concept = {c: value.get((m, c), {}).get(key) for c in concepts}
            cells = [per_concept[c] for c in concepts]
            cells += [_mean([v for c, v in per_concept.items() if v is not None and category_of[c] == cat]) for cat in categories]
            cells.append(_mean([v for v in per_concept.values() if v is not None]))
            lines.append("| " + " | ".join([m, *map(fmt, cells)]) + " |")
        parts.append("\n".join(lines))
    return "\n\n".join(parts) + "\n"


def rebuild_tables(root: str | Path) -> list[dict]:
    """Collect every ``<root>/<concept>/<method>/result.json`` into results.{json,csv,md}."""
    root = Path(root)
    results = [json.loads(p.read_text()) for p in sorted(root.glob(f"*/*/{RESULTS_NAME}"))]
    if not results:
        raise ClipScoreError(f"no {RESULTS_NAME} under {root}/<concept>/<method>/; run `sbora-evaluate run` first")
    write_json(root / "results.json", results)
    write_csv(root / "results.csv", [{"concept": r["concept"], "category": r.get("category"), "method": r["method"], **r["summary"]} for r in results])
    write_text(root / "results.md", markdown_tables(results))
    return results


# ----------------------------------------------------------------------------- end to end


def parse_adapter(spec: str) -> tuple[str | None, Path]:
    """``METHOD=PATH`` or ``PATH`` (the method is then read from the adapter file)."""
    method, sep, path = spec.partition("=")
    return (method, Path(path)) if sep else (None, Path(spec))


@dataclass
class _Adapter:
    method: str
    path: Path
    base_model: str | None


def _check_adapters(adapters: list[tuple[str | None, Path]]) -> list[_Adapter]:
    """Read every adapter file and its method label before any image is generated."""
    checked = []
    for method, path in adapters:
        file = read_adapter(path)
        method = method or file.extra.get("method") or file.config.method
        if not re.fullmatch(r"[\w.+-]+", method) or method == BASE_DRIFT:
            raise ClipScoreError(f"method label {method!r} must be letters, digits, '.', '+', '-' or '_' and not {BASE_DRIFT!r} (it names a folder)")
        checked.append(_Adapter(method, path, file.base_model))
    if len({a.method for a in checked}) != len(checked):
        raise ClipScoreError("two adapters carry the same method label; give each its own with METHOD=PATH")
    return checked


def run(cfg: RunConfig, concept, adapters: list[tuple[str | None, Path]], reference_dir: str | Path | None = None) -> list[dict]:
    """Generate, score and measure drift for each adapter of one concept; rebuild the tables.

    ``concept``: a ``ConceptConfig``; ``adapters``: (method label or None, adapter file).
    Writes ``<output_dir>/<concept>/<method>/`` (images/, scores.*, drift/, drift.*,
    result.json) and ``<output_dir>/<concept>/base-drift/``; returns the results.
    """
    import torch

    from .generate import generate
    from .models import DEFAULT_MODEL, load_pipeline

    checked = _check_adapters(adapters)
    bases = {cfg.model or a.base_model or DEFAULT_MODEL for a in checked}
    if len(bases) != 1:
        raise ClipScoreError(f"the adapters were trained on different base models ({', '.join(sorted(bases))}); evaluate them in separate runs or pass --model")
    model = bases.pop()
    reference_dir = Path(reference_dir or concept.instance_dir)
    clip_score.reference_images(reference_dir)  # a bad reference folder fails before any image is generated
    templates = concept.eval_prompts[: cfg.num_prompts]
    if not templates:
        raise ClipScoreError(f"concept {concept.name} has no eval_prompts; add them to its YAML config")
    scorer = scorer_from(cfg)
    device = clip_score.resolve_device(cfg.device)
    dtype = torch.float16 if device.type == "cuda" else None  # as the generate command does
    sample = dict(steps=cfg.sample_steps, guidance_scale=cfg.guidance_scale, height=cfg.height, width=cfg.width, batch_size=cfg.gen_batch_size)
    seeds, drift_seeds = list(range(cfg.num_images)), list(range(cfg.drift_images))
    root = Path(cfg.output_dir) / concept.name
    settings = {**to_dict(cfg), "model": model, "prompts": [concept.fill(t) for t in templates]}

    base_drift = None
    if drift_seeds:
        pipe = load_pipeline(model, device=device, dtype=dtype)
        generate(pipe, cfg.drift_prompts, drift_seeds, root / BASE_DRIFT, concept=concept.name, method="base", **sample)
        base_drift = clip_score.read_manifest(root / BASE_DRIFT / "manifest.jsonl")

    results = []
    for adapter in checked:
        out = root / adapter.method
        pipe = load_pipeline(model, adapter=adapter.path, device=device, dtype=dtype)
        generate(pipe, templates, seeds, out / "images", concept=concept.name, method=adapter.method,
                 token=concept.token, class_word=concept.class_word, **sample)
        report = clip_score.score(scorer, clip_score.read_manifest(out / "images" / "manifest.jsonl"), reference_dir,
                                  text_prefix=cfg.text_prefix, cache_dir=cfg.cache_dir)
        write_report(out / "scores.json", report, settings)
        summary = dict(report["summary"])
        if base_drift is not None:
            generate(pipe, cfg.drift_prompts, drift_seeds, out / "drift", concept=concept.name, method=adapter.method, **sample)
            drift_report = clip_score.drift(scorer, base_drift, clip_score.read_manifest(out / "drift" / "manifest.jsonl"))
            write_report(out / "drift.json", drift_report, settings)
            summary.update({k: drift_report["summary"][k] for k in ("drift_cosine", "drift")})
        result = {
            "concept": concept.name, "category": cfg.category, "method": adapter.method, "adapter": str(adapter.path),
            "reference_dir": str(reference_dir), "summary": summary,
            "labels": {k: v for k, v in clip_score.LABELS.items() if k in summary}, "settings": settings,
        }
        write_json(out / RESULTS_NAME, result)
        results.append(result)
    rebuild_tables(cfg.output_dir)
    return results


# ----------------------------------------------------------------------------- command line


def cmd_score(invocation: Invocation) -> None:
    cfg, args = invocation.configs["clip"], invocation.args
    if (args.token is None) != (args.class_word is None):
        raise ClipScoreError("--token and --class-word go together (or use --replace TOKEN=WORD)")
    replacements = clip_score.parse_replacements(args.replace or [])
    if args.token is not None:
        replacements.update(clip_score.token_rules(args.token, args.class_word))
    images = Path(args.images)
    entries = clip_score.read_manifest(args.manifest or images / "manifest.jsonl", images)
    if args.reference is not None:
        clip_score.reference_images(args.reference)  # fail before loading CLIP
    report = clip_score.score(scorer_from(cfg), entries, args.reference, replacements, cfg.text_prefix, cfg.cache_dir)
    output = Path(args.out or images / "scores.json")
    write_report(output, report, {**to_dict(cfg), "images": str(images), "reference": args.reference, "replacements": replacements})
    print(json.dumps(report["summary"], indent=2))
    print(f"wrote {output} and {output.with_suffix('.csv')}")


def cmd_drift(invocation: Invocation) -> None:
    cfg, args = invocation.configs["clip"], invocation.args
    base, adapted = Path(args.base_images), Path(args.adapted_images)
    base_entries = clip_score.read_manifest(args.base_manifest or base / "manifest.jsonl", base)
    adapted_entries = clip_score.read_manifest(args.adapted_manifest or adapted / "manifest.jsonl", adapted)
    report = clip_score.drift(scorer_from(cfg), base_entries, adapted_entries)
    output = Path(args.out or adapted / "drift.json")
    write_report(output, report, {**to_dict(cfg), "base": str(base), "adapted": str(adapted)})
    print(json.dumps(report["summary"], indent=2))
    print(f"wrote {output} and {output.with_suffix('.csv')}")


def cmd_run(invocation: Invocation) -> None:
    from .concept.config import load_concept

    cfg, args = invocation.configs["run"], invocation.args
    concept = load_concept(args.concept)
    if len(concept.eval_prompts) < cfg.num_prompts:
        print(f"note: concept {concept.name} has {len(concept.eval_prompts)} eval_prompts (< num_prompts {cfg.num_prompts}); using all of them", file=sys.stderr)
    results = run(cfg, concept, [parse_adapter(a) for a in args.adapter], args.reference)
    for r in results:
        print(f"{r['concept']} / {r['method']}: " + ", ".join(f"{k}={v:.4f}" for k, v in r["summary"].items() if isinstance(v, float)))
    print(f"tables: {Path(cfg.output_dir) / 'results.md'} (and .json, .csv)")


def cmd_table(invocation: Invocation) -> None:
    rebuild_tables(invocation.args.output_dir)
    print((Path(invocation.args.output_dir) / "results.md").read_text())


CLIP = Section("clip", ClipConfig, title="CLIP options")
RESULTS = "results JSON (none: {}); a per-{} CSV goes next to it"
COMMAND = Command("sbora-evaluate", __doc__, subcommands={
    "score": Command("score", "CLIP-T (and CLIP-I) of generated images listed in a manifest", cmd_score, sections=(CLIP,), flags=(
        Flag("images", "folder of generated images", required=True),
        Flag("manifest", "manifest.jsonl; image paths relative to IMAGES", shown="IMAGES/manifest.jsonl"),
        Flag("reference", "folder of the concept's photos, for CLIP-I (none: CLIP-T only)"),
        Flag("token", "concept token to replace in prompts, with --class-word: '<dog1> dog' and '<dog1>' become 'dog'", shown="the manifest's token"),
        Flag("class-word", "class word that replaces --token (e.g. dog)"),
        Flag("replace", "a literal replacement rule; repeatable; overrides the manifest's token/class_word", action="append", metavar="TOKEN=WORD"),
        Flag("out", RESULTS.format("IMAGES/scores.json", "image"), aliases=("output",)),
    )),
    "drift": Command("drift", "image cosine between base and adapted images at the same prompts and seeds", cmd_drift, sections=(CLIP,), flags=(
        Flag("base-images", "folder of the base model's images (with manifest.jsonl)", required=True, aliases=("base",)),
        Flag("adapted-images", "folder of the adapted model's images (with manifest.jsonl)", required=True, aliases=("adapted",)),
        Flag("base-manifest", "the base images' manifest", shown="BASE_IMAGES/manifest.jsonl"),
        Flag("adapted-manifest", "the adapted images' manifest", shown="ADAPTED_IMAGES/manifest.jsonl"),
        Flag("out", RESULTS.format("ADAPTED_IMAGES/drift.json", "pair"), aliases=("output",)),
    )),
    "run": Command("run", "generate, score and measure drift for trained adapters of one concept", cmd_run, sections=(
        Section("run", RunConfig, title="evaluation options (override the --config YAML)", option="config", kind="eval", default="default",
                option_help="evaluation config: a name in configs/eval/ or a YAML path"),
    ), flags=(
        Flag("concept", "concept name (configs/concepts/NAME.yaml) or a YAML path", required=True),
        Flag("adapter", "trained adapter file; repeatable; METHOD labels it (none: the method stored in the file)", required=True, action="append",
             metavar="[METHOD=]PATH"),
        Flag("reference", "the concept's photos for CLIP-I", shown="the concept's instance_dir"),
    )),
    "table": Command("table", "rebuild results.{json,csv,md} from every <concept>/<method>/result.json", cmd_table, flags=(
        Flag("output-dir", "root folder of `run`", "outputs/eval"),
    )),
})
main = COMMAND.main


if __name__ == "__main__":
    sys.exit(main())
