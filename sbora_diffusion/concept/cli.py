"""The concept trainer's command line (``train_concept.py``, ``sbora-train-concept``) on the toolkit's
command frame (``sbora/cli.py``): every field of the concept (``--concept``), adapter (``--method``)
and training (``--config``) configs an option; --help shows the values this command line will use
and where they come from; diffusers' DreamBooth-LoRA names work as aliases."""

from __future__ import annotations

import argparse
import sys

from sbora.adapters import AdapterConfig
from sbora.adapters.config import DEFAULT_METHOD
from sbora.adapters.registry import CONCEPT, check_trained_method, method_help
from sbora.cli import Command, Flag, Invocation, Section, yaml_layer
from sbora.configuration import ConfigError

from ..models import DEFAULT_MODEL
from .config import ConceptConfig, concept_values, literal_prompt_token
from .options import TrainConfig, default_train_config
from .train import __doc__ as TRAINER_DOC
from .train import train


# diffusers' DreamBooth-LoRA script (train_dreambooth_lora.py) names beyond the fields' own
# aliases (and the frame's --resume_from_checkpoint): a diffusers command line runs by changing
# only the script's name.
DIFFUSERS_ALIASES = {"pretrained-model-name-or-path": "model", "instance-data-dir": "concept"}
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


def method_layer(method: str) -> tuple[dict, str]:
    """(values, where from) of --method: a method of the registry that this trainer trains, or a YAML path."""
    check_trained_method(method, CONCEPT)
    return yaml_layer("methods", method)


def prepare(args: argparse.Namespace, overrides: dict[str, dict]) -> dict[str, dict]:
    """The command line's values as the trainer takes them: --validation-prompt replaces the concept's validation
    prompts; a literal instance prompt (diffusers' "a photo of sks dog") names the token, which stays plain text
    unless --token-mode says otherwise."""
    if args.report_to not in REPORT_TO:
        raise ConfigError(f"--report_to {args.report_to}: this toolkit logs to tensorboard (<output-dir>/logs) and log.jsonl only; drop it "
                          "or pass tensorboard")
    concept, train_over = overrides["concept"], overrides["train"]
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
    return overrides


def run(invocation: Invocation) -> None:
    args = invocation.args
    result = train(invocation.configs["concept"], args.method, args.model, train_config=invocation.configs["train"],
                   adapter_overrides=invocation.overrides["adapter"], resume=invocation.resume)
    if result.is_main_process:
        print(f"done: {result.step} steps, final loss {result.losses[-1] if result.losses else float('nan'):.4f}\n"
              f"  adapter  {result.adapter_path}\n  samples  {result.out_dir / 'samples.png'} (base | adapted, per prompt and seed)\n"
              f"  generate python -m sbora_diffusion.generate --adapter {result.adapter_path}")
        if result.scores:
            sc = result.scores
            print(f"  CLIP-I   {sc['clip_i_base']:.3f} (base) -> {sc['clip_i_adapted']:.3f} (adapted): samples vs the concept's "
                  f"{sc['references']} photos, {sc['clip_model']} CLIP, {sc['images']} images each ({result.out_dir / 'scores.json'})")


COMMAND = Command(
    "train_concept.py", TRAINER_DOC, run,
    sections=(
        Section("concept", ConceptConfig, title="concept options (override the concept's YAML or folder)", option="concept", load=concept_values,
                required=True, option_help="concept name (configs/concepts/NAME.yaml), a concept YAML file, or a folder of images"),
        Section("adapter", AdapterConfig, title="adapter options (override configs/methods/<method>.yaml)", option="method", load=method_layer,
                default=DEFAULT_METHOD, skip=("method", "delta"),  # --delta: TrainConfig's (the procedures')
                option_help=f"adapter method: {method_help(CONCEPT)} (configs/methods/METHOD.yaml), or a YAML path"),
        Section("train", TrainConfig, title="training options (override the training YAML)", option="config", kind="train",
                default=lambda context: default_train_config(context.value("model")),
                default_source="configs/train/<model>.yaml of an embedded --model that has one, else configs/train/default.yaml",
                option_help="training config: configs/train/NAME.yaml or a YAML path"),
    ),
    flags=(
        Flag("model", f"base model: '{DEFAULT_MODEL}' (embedded, offline), a local diffusers folder, or a hub id", DEFAULT_MODEL),
        Flag("validation-prompt", "a validation prompt, taken whole (commas included); repeat for several; replaces the concept's "
             "validation_prompts", action="append", metavar="PROMPT"),
        Flag("report-to", "where training is logged: tensorboard (logs/, plus log.jsonl); the only tracker here", "tensorboard"),
    ),
    aliases=DIFFUSERS_ALIASES, refused=DIFFUSERS_REFUSED, refused_by="diffusers", resumable=True, prepare=prepare,
    note=("A diffusers DreamBooth-LoRA command line runs as it is, with train_concept.py as the script. --seed is the adapter's seed "
          "(its index sets); the seed of data order and noise is --train-seed. A literal --instance-prompt such as 'a photo of sks dog' "
          "trains 'sks' as the token, as plain text (--token-mode none) unless --token-mode says otherwise."),
)
main = COMMAND.main


if __name__ == "__main__":
    sys.exit(main())
