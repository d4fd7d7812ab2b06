"""Standard LoRA files: every adapter exported as diffusers/peft or kohya keys, and those files read back.

Every core's update is exactly a LoRA (``Core.lora_factors``: ΔW = s·B·A), so every method
exports exactly. A file states a per-module scale as ``alpha / k`` (k = the exported rank),
which is how diffusers, peft, A1111 and ComfyUI apply it:

    diffusers   unet.<path>.lora_A.weight (k, d_in), unet.<path>.lora_B.weight (d_out, k),
                text_encoder.text_model.<path>.lora_A.weight, ... (SDXL: and text_encoder_2.text_model.<path>...);
                header ``lora_adapter_metadata``: JSON of peft LoraConfig fields per part ("unet.r",
                "unet.lora_alpha", "unet.target_modules", "unet.rank_pattern", "unet.alpha_pattern",
                "text_encoder.r", ..., "text_encoder_2.r", ...). Without it diffusers assumes alpha = k (scale 1).
    kohya       lora_unet_<path with _>.lora_down.weight (k, d_in), .lora_up.weight (d_out, k),
                .alpha (a 0-d tensor); lora_te_text_model_<path with _>.*  (A1111, ComfyUI); an SDXL
                file's text encoders are lora_te1_ and lora_te2_ (the writer is given the prefixes)
    peft        base_model.model.<path>.lora_A.weight / lora_B.weight in adapter_model.safetensors,
                plus adapter_config.json (r, lora_alpha, target_modules, rank_pattern, alpha_pattern)

Exported alphas: the core's own alpha where ``alpha / k`` (``alpha / √k`` with rsLoRA, then
``use_rslora``) gives its scale exactly (LoRA, SBoRA, ortho), else ``s·k`` (DiffLoRA's rank 2r). A factor pair wider than the layer
(Custom Diffusion's A = I) is refolded to rank min(d_in, d_out). Patterns name full module
paths; the CLIP text encoder's are written without ``text_model.``, so they match the
classic layout and transformers ≥ 5's flattened ``CLIPTextModel`` alike (weights keep the
classic ``text_model.`` names that published LoRAs use, which diffusers strips when needed).

Kohya files carry one alpha per model part: diffusers' kohya reader applies the most common
alpha to every module (it cannot place per-module alphas on attention layers), so a module
whose scale differs has the ratio folded into its ``lora_up`` instead. A1111 and ComfyUI read
the same file with the same result.

Reading (``read_lora_file``) recognizes a file by its keys, checks each module's pair of
factors and its alpha, and returns an ``AdapterFile`` of LoRA cores whose module names are
still the file's own; ``fit_to_model`` then picks the part that belongs to the given model
(UNet or text encoder of a diffusers/kohya file), maps the names to its layers and checks
every shape, naming the file's key on any mismatch, before anything is changed.

Layouts read (ACCEPTED_LAYOUTS): the three above, and every older layout diffusers' Stable
Diffusion loaders still read, renamed to peft names first (``peft_key``) the way diffusers
renames them (diffusers/utils/state_dict_utils.py), then read as the 'diffusers' layout (with a
``unet.`` / ``text_encoder.`` prefix) or the 'peft' one (without, a UNet-only file):

    <module>.lora.down.weight / .lora.up.weight                 UNET_TO_DIFFUSERS; the DreamBooth-LoRA
                                                                script's pytorch_lora_weights.safetensors
    <module>.lora_linear_layer.down.weight / .up.weight         DIFFUSERS_TO_PEFT (its text encoder)
    <attention>.processor.to_q_lora.down.weight / .up.weight    attention processors (``save_attn_procs``):
                                                                to_q/to_k/to_v/to_out -> the UNet's to_q ...
                                                                to_out.0 (UNET_TO_DIFFUSERS), the text
                                                                encoder's q_proj ... out_proj (DIFFUSERS_OLD_TO_PEFT);
                                                                ".processor." is dropped (KEYS_TO_ALWAYS_REPLACE)
    unet.<module>.alpha, text_encoder.<module>.alpha            a network alpha: scale alpha / k, the rule
                                                                diffusers applies to network alphas (lora_alpha,
                                                                alpha_pattern); not together with the metadata header

A key in no layout is an error that lists these layouts. SDXL's second text encoder is the part
``text_encoder_2`` (``text_encoder_2.`` keys, kohya's ``lora_te2_``; its first is ``lora_te1_`` or
``lora_te_``); two text encoders name their layers alike, so ``fit_to_model`` is told which part a
model is. kohya's SDXL trainer names the UNet's layers by Stability's blocks
(``lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q``); the caller that knows the UNet's
layout gives those names as `aliases` of its layer paths (the diffusion world's pipeline kinds).
"""

from __future__ import annotations

import json
import math
import re
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
from torch import nn

from .config import AdapterConfig
from .inject import _linear_paths, adapted_layers
from .file import AdapterFile, AdapterFileError
from .layer import AdaptedLinear
from .registry import METHOD_SPECS

DIFFUSERS_METADATA = "lora_adapter_metadata"  # the header key diffusers reads its LoraConfig fields from
INFO_METADATA = "sbora_info"  # our provenance header: base model, concept, method, token
PARTS = ("unet", "text_encoder", "text_encoder_2")  # a pipeline's parts, in diffusers' names (SDXL has the second text encoder)
KOHYA_PREFIX = {"unet": "lora_unet_", "text_encoder": "lora_te_"}  # what kohya_lora writes unless told (one text encoder)
KOHYA_PARTS = {"lora_unet_": "unet", "lora_te_": "text_encoder", "lora_te1_": "text_encoder", "lora_te2_": "text_encoder_2"}  # reading
PEFT_PREFIX = "base_model.model."
PEFT_CONFIG = "adapter_config.json"
PEFT_WEIGHTS = "adapter_model.safetensors"

# Key grammar per format: (module name, role). Tried in this order: kohya and diffusers keys are
# also valid peft-style keys, so the more specific forms come first.
KEY_FORMS = {
    "kohya": re.compile(r"(lora_(?:unet|te|te1|te2)_[^.]+)\.(lora_down\.weight|lora_up\.weight|alpha)"),
    "diffusers": re.compile(r"((?:unet|text_encoder|text_encoder_2)\..+)\.(lora_A\.weight|lora_B\.weight|alpha)"),
    "peft": re.compile(r"(.+)\.(lora_A\.weight|lora_B\.weight)"),
}
ROLES = {"lora_down.weight": "A", "lora_A.weight": "A", "lora_up.weight": "B", "lora_B.weight": "B", "alpha": "alpha"}
SUFFIX = {"kohya": {"A": "lora_down.weight", "B": "lora_up.weight"}, "diffusers": {"A": "lora_A.weight", "B": "lora_B.weight"}}
SUFFIX["peft"] = SUFFIX["diffusers"]
LORA_CONFIG_DEFAULTS = {"r": 8, "lora_alpha": 8}  # peft's LoraConfig defaults, which apply when a config omits them

# diffusers' older key layouts, which its Stable Diffusion loaders (``load_lora_weights``,
# ``unet.load_lora_adapter``) rename to peft names before loading, by the tables of
# diffusers/utils/state_dict_utils.py: KEYS_TO_ALWAYS_REPLACE (".processor." -> "."),
# UNET_TO_DIFFUSERS (".lora.down" -> ".lora_A", ".to_q_lora.down" -> ".to_q.lora_A", ".to_out_lora" -> ".to_out.0"),
# DIFFUSERS_TO_PEFT (".lora_linear_layer.down" -> ".lora_A") and DIFFUSERS_OLD_TO_PEFT (the text
# encoder's ".to_q_lora.down" -> ".q_proj.lora_A", ".to_out_lora" -> ".out_proj"). ``peft_key``
# applies the same renaming, so each layout is then read as the peft-named keys of KEY_FORMS.
OLD_LAYOUTS = {
    "lora.down/up": re.compile(r"(?P<module>.+)\.lora\.(?P<factor>down|up)\.weight"),
    "lora_linear_layer": re.compile(r"(?P<module>.+)\.lora_linear_layer\.(?P<factor>down|up)\.weight"),
    "attention processor": re.compile(r"(?P<module>.+)\.(?P<proj>to_q|to_k|to_v|to_out)_lora\.(?P<factor>down|up)\.weight"),
}
PROCESSOR_LAYERS = {  # an attention processor's projections: the UNet's layers, the CLIP text encoder's
    "unet": {"to_q": "to_q", "to_k": "to_k", "to_v": "to_v", "to_out": "to_out.0"},
    "text_encoder": {"to_q": "q_proj", "to_k": "k_proj", "to_v": "v_proj", "to_out": "out_proj"},
}
ACCEPTED_LAYOUTS = (
    "peft/diffusers <module>.lora_A.weight + .lora_B.weight; diffusers' older <module>.lora.down.weight + .lora.up.weight, "
    "<module>.lora_linear_layer.down.weight + .up.weight and attention processors "
    "<attention>[.processor].to_q_lora.down.weight + .up.weight (to_q, to_k, to_v, to_out); these under a unet. or "
    "text_encoder. prefix (or none, for one model), with an optional <module>.alpha beside a prefixed module; "
    "kohya lora_unet_<path>/lora_te_<path> .lora_down.weight + .lora_up.weight + .alpha"
)


# ---------------------------------------------------------------------------- export


@dataclass
class LoraEntry:
    """One layer's update as a standard LoRA: ΔW = s·B·A, s = alpha / k (alpha / √k with rsLoRA), k = A.shape[0]."""

    A: torch.Tensor  # (k, d_in)
    B: torch.Tensor  # (d_out, k)
    alpha: float
    rslora: bool
    scale: float  # s

    @property
    def rank(self) -> int:
        return self.A.shape[0]

    @property
    def plain_alpha(self) -> float:
        """The alpha that gives s as alpha / k (for readers without rsLoRA)."""
        return self.scale * self.rank if self.rslora else self.alpha


@torch.no_grad()
def lora_entries(model: nn.Module, name: str) -> dict[str, LoraEntry]:
    """Module path -> the exact LoRA of adapter `name` on that layer, from its core's ``lora_factors``."""
    entries = {}
    for path, layer in adapted_layers(model, name).items():
        core = layer.cores[name]
        A, B, s = core.lora_factors()
        A, B = A.detach().float().cpu(), B.detach().float().cpu()
        if A.shape[0] > min(A.shape[1], B.shape[0]):
            # Wider than the layer (a full-rank A = I): one identity factor of the smaller side is
            # exact and smaller; B·A is exact when one of them is an identity.
            W = B @ A  # (d_out, d_in)
            A, B = (W, torch.eye(W.shape[0])) if W.shape[0] <= W.shape[1] else (torch.eye(W.shape[1]), W)
        k, alpha = A.shape[0], float(core.config.alpha)
        # Readers scale by alpha/k (alpha/√k with rsLoRA): keep the config's alpha where that is exactly s, else s·k.
        if core.config.rslora and alpha / math.sqrt(k) == s:
            entry = LoraEntry(A, B, alpha, True, s)
        else:
            entry = LoraEntry(A, B, alpha if alpha / k == s else float(s * k), False, s)
        entry.A, entry.B = entry.A.contiguous(), entry.B.contiguous()
        entries[path] = entry
    if not entries:
        raise ValueError(f"the model has no adapter named '{name}' to export")
    return entries


def _most_common(values: list):
    return Counter(values).most_common(1)[0][0]


def classic_clip_path(path: str) -> str:
    """A CLIP text-encoder module path in the classic layout (transformers ≥ 5 dropped ``text_model.``)."""
    return path if path.startswith("text_model.") else f"text_model.{path}"


def _file_path(part: str, path: str) -> str:
    return path if part == "unet" else classic_clip_path(path)


def _pattern_name(part: str, path: str) -> str:
    """The name a LoraConfig pattern uses: a suffix that matches either CLIP layout."""
    return path if part == "unet" else path.removeprefix("text_model.")


def lora_config_fields(entries: dict[str, LoraEntry], names: dict[str, str]) -> dict:
    """peft ``LoraConfig`` fields for `entries`: the most common rank and alpha, patterns for the modules that differ.

    `names` maps a module path to the name the receiving library matches against its modules.
    """
    rslora = all(e.rslora for e in entries.values())  # one flag per config: mixed parts use plain alphas
    alphas = {p: e.alpha if rslora else e.plain_alpha for p, e in entries.items()}
    r = _most_common([e.rank for e in entries.values()])
    alpha = _most_common(list(alphas.values()))
    return {
        "r": r,
        "lora_alpha": alpha,
        "use_rslora": rslora,
        "target_modules": [names[p] for p in entries],
        "rank_pattern": {names[p]: e.rank for p, e in entries.items() if e.rank != r},
        "alpha_pattern": {names[p]: a for p, a in alphas.items() if a != alpha},
    }


def diffusers_lora(parts: dict[str, dict[str, LoraEntry]], info: dict | None = None) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """(tensors, header) of a diffusers LoRA file for `parts` ({"unet": entries, "text_encoder": entries})."""
    tensors, fields = {}, {}
    for part, entries in parts.items():
        for path, e in entries.items():
            key = f"{part}.{_file_path(part, path)}"
            tensors[f"{key}.lora_A.weight"], tensors[f"{key}.lora_B.weight"] = e.A, e.B
        config = lora_config_fields(entries, {p: _pattern_name(part, p) for p in entries})
        fields.update({f"{part}.{k}": v for k, v in config.items()})
    return tensors, _header({"format": "pt", DIFFUSERS_METADATA: json.dumps(fields, sort_keys=True)}, info)


def kohya_lora(parts: dict[str, dict[str, LoraEntry]], info: dict | None = None,
               prefixes: dict[str, str] = KOHYA_PREFIX) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """(tensors, header) of a kohya-ss LoRA file (A1111, ComfyUI, diffusers' kohya reader): one alpha per part.
    `prefixes`: each part's key prefix (SDXL's text encoders: lora_te1_, lora_te2_)."""
    tensors = {}
    for part, entries in parts.items():
        alpha = _most_common([e.plain_alpha for e in entries.values()])
        for path, e in entries.items():
            name = prefixes[part] + _file_path(part, path).replace(".", "_")
            tensors[f"{name}.lora_down.weight"] = e.A
            tensors[f"{name}.lora_up.weight"] = e.B if e.plain_alpha == alpha else e.B * (e.plain_alpha / alpha)
            tensors[f"{name}.alpha"] = torch.tensor(alpha, dtype=torch.float32)
    return tensors, _header({"format": "pt"}, info)


def peft_adapter(entries: dict[str, LoraEntry], base_model: str | None, task_type: str | None = None,
                 fan_in_fan_out: bool = False) -> tuple[dict[str, torch.Tensor], dict]:
    """(tensors, adapter_config) of a peft LoRA adapter folder for one model."""
    tensors = {}
    for path, e in entries.items():
        tensors[f"{PEFT_PREFIX}{path}.lora_A.weight"], tensors[f"{PEFT_PREFIX}{path}.lora_B.weight"] = e.A, e.B
    config = {
        "peft_type": "LORA", "task_type": task_type, "base_model_name_or_path": base_model, "bias": "none",
        "lora_dropout": 0.0, "fan_in_fan_out": fan_in_fan_out, "use_dora": False,
        "init_lora_weights": True, "inference_mode": True, "modules_to_save": None,
        **lora_config_fields(entries, {p: p for p in entries}),
    }
    return tensors, config


def textual_inversion(token: str, vectors: torch.Tensor) -> dict[str, torch.Tensor]:
    """diffusers' textual-inversion file for a concept token: {token: (n, D)}.

    ``load_textual_inversion`` adds `token` (and ``token_1`` ... for n > 1, which it puts after
    `token` in every prompt) with these vectors: the same embeddings our token gets.
    """
    return {token: vectors.detach().float().cpu().contiguous()}


def _header(metadata: dict[str, str], info: dict | None) -> dict[str, str]:
    return {**metadata, INFO_METADATA: json.dumps(info)} if info else metadata


# ---------------------------------------------------------------------------- import


def refuse_peft_baseline(config: dict, source: str) -> None:
    """Refuse a peft config of a registry method that is peft's own layers and no LoRA (peft-dora: use_dora), naming it."""
    for spec in METHOD_SPECS.values():
        if spec.peft_backed and spec.peft_options and all(config.get(k) == v for k, v in spec.peft_options):
            options = ", ".join(k for k, _ in spec.peft_options)
            raise AdapterFileError(f"{source} is a {spec.label} adapter ({options}: --method {spec.name}), which exports to "
                                   f"{', '.join(spec.export_formats) or 'no format'}; only plain LoRA adapters can be imported")


def _fields(config: dict | None, source: str) -> dict | None:
    """LoraConfig fields of a file, or None when it has none (then alpha = k, as in diffusers and peft)."""
    if config is None:
        return None
    if config.get("peft_type", "LORA") != "LORA":
        raise AdapterFileError(f"{source} is a peft {config['peft_type']} adapter; only LoRA adapters can be imported")
    refuse_peft_baseline(config, source)
    return {**LORA_CONFIG_DEFAULTS, **config}


def _pattern_value(patterns: dict, names: list[str], default, source: str):
    """peft's rule: the first pattern that matches a module name as a dotted suffix (a regex) wins."""
    for pattern, value in (patterns or {}).items():
        try:
            if any(re.match(rf"(.*\.)?({pattern})$", n) for n in names):
                return value
        except re.error:
            raise AdapterFileError(f"{source}: its LoRA config has the pattern {pattern!r}, which is not a valid regex") from None
    return default


def _json(text: str, what: str, source: str) -> dict:
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise AdapterFileError(f"{source}: its {what} is not valid JSON ({e})") from None
    if not isinstance(data, dict):
        raise AdapterFileError(f"{source}: its {what} must be a JSON object")
    return data


def peft_key(key: str) -> str:
    """`key` renamed as diffusers' loaders rename it when it is in one of its older layouts (OLD_LAYOUTS):
    ``<module>.lora_A.weight`` / ``<module>.lora_B.weight``; any other key is returned as it is."""
    plain = key.replace(".processor.", ".")
    for form in OLD_LAYOUTS.values():
        m = form.fullmatch(plain)
        if m is None:
            continue
        module = m["module"]
        if "proj" in form.groupindex:
            part = "text_encoder" if plain.startswith(("text_encoder.", "text_encoder_2.")) else "unet"
            module = f"{module}.{PROCESSOR_LAYERS[part][m['proj']]}"
        return f"{module}.lora_{'A' if m['factor'] == 'down' else 'B'}.weight"
    return key


@dataclass
class ImportedLora(AdapterFile):
    """An imported LoRA file: module names are still the file's (in peft names), `keys` its own key of each factor."""

    keys: dict[str, str] = field(default_factory=dict)  # "<module>.A" / "<module>.B" -> the key in the file


def file_format(tensors: dict[str, torch.Tensor]) -> str | None:
    """'kohya', 'diffusers' or 'peft' by the file's keys; None when no key is a LoRA key of any of them."""
    return next((fmt for fmt, form in KEY_FORMS.items() if any(form.fullmatch(k) for k in tensors)), None)


def part_of(fmt: str, name: str) -> str:
    """The pipeline part (one of PARTS) a module of a diffusers/kohya file belongs to; '' for peft."""
    if fmt == "peft":
        return ""
    if fmt == "kohya":
        return next(part for prefix, part in KOHYA_PARTS.items() if name.startswith(prefix))
    return name.split(".", 1)[0]


def lora_parts(file: AdapterFile) -> set[str]:
    """The pipeline parts an imported diffusers/kohya file adapts (of PARTS); empty for any other file."""
    return {part_of(file.format, m) for m in file.modules} if file.format in ("diffusers", "kohya") else set()


def read_lora_file(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> AdapterFile | None:
    """A diffusers (any layout of ACCEPTED_LAYOUTS), kohya or peft LoRA file as LoRA cores (module names still
    the file's, in peft names); None if no key is a LoRA key."""
    source = str(path)
    if path.name == PEFT_WEIGHTS and (path.parent / PEFT_CONFIG).is_file():  # a peft folder: its config says what it is
        refuse_peft_baseline(_json((path.parent / PEFT_CONFIG).read_text(), PEFT_CONFIG, source), source)
    file_keys: dict[str, str] = {}  # peft-named key -> the file's key
    for key in tensors:
        renamed = peft_key(key)
        if renamed in file_keys:
            raise AdapterFileError(f"{source}: keys {file_keys[renamed]} and {key} hold the same LoRA factor in two layouts; the file is ambiguous")
        file_keys[renamed] = key
    tensors = {renamed: tensors[key] for renamed, key in file_keys.items()}
    fmt = file_format(tensors)
    if fmt is None:
        lora_like = next((key for key in file_keys.values() if "lora" in key.lower()), None)
        if lora_like is None:
            return None
        raise AdapterFileError(f"{source}: key {lora_like} is in no LoRA layout this toolkit reads; it reads {ACCEPTED_LAYOUTS}")
    modules: dict[str, dict[str, tuple[str, torch.Tensor]]] = {}
    for key, t in tensors.items():
        m = KEY_FORMS[fmt].fullmatch(key)
        if m is None:
            raise AdapterFileError(
                f"{source}: key {file_keys[key]} is not part of a plain {fmt} LoRA in the layouts this toolkit reads "
                f"({ACCEPTED_LAYOUTS}); DoRA, LoHa, LoKr and bias-carrying LoRAs cannot be imported"
            )
        name, role = m.group(1), ROLES[m.group(2)]
        modules.setdefault(name, {})[role] = (file_keys[key], t)
    if fmt == "diffusers":
        fields = _json(metadata[DIFFUSERS_METADATA], DIFFUSERS_METADATA, source) if DIFFUSERS_METADATA in metadata else None
        alpha_key = next((pair["alpha"][0] for pair in modules.values() if "alpha" in pair), None)
        if fields is not None and alpha_key is not None:  # diffusers refuses network alphas beside metadata too
            raise AdapterFileError(
                f"{source}: key {alpha_key} gives an alpha, and the {DIFFUSERS_METADATA} header gives LoRA alphas too; "
                "a file may carry one or the other"
            )
    elif fmt == "peft" and (path.parent / PEFT_CONFIG).is_file():
        fields = _json((path.parent / PEFT_CONFIG).read_text(), PEFT_CONFIG, source)
    else:
        fields = None
    info = _json(metadata[INFO_METADATA], INFO_METADATA, source) if INFO_METADATA in metadata else {}
    base_model = info.pop("base_model", None) or (fields or {}).get("base_model_name_or_path")
    scoped = {}  # part -> its LoraConfig fields (a diffusers file keeps "unet.r", "text_encoder.r", ...)
    configs, out = {}, {}
    for name, pair in modules.items():
        A, B = _factor_pair(fmt, name, pair, source)
        part = part_of(fmt, name)
        if part not in scoped and fields is not None:
            own = {f.removeprefix(f"{part}."): v for f, v in fields.items() if f.startswith(f"{part}.")} if part else fields
            scoped[part] = _fields(own, source)
        alpha, rslora = _alpha(fmt, name, A.shape[0], pair, scoped.get(part), source)
        configs[name] = (A.shape[0], alpha, rslora)
        out[f"{name}.A"], out[f"{name}.B"] = A, B
    k, alpha, rslora = _most_common(list(configs.values()))
    config = AdapterConfig(method="lora", rank=k, alpha=alpha, rslora=rslora, targets=list(modules))
    return ImportedLora(
        config=config, modules=list(modules), tensors=out, base_model=base_model, extra=info, format=fmt,
        module_configs={n: replace(config, rank=c[0], alpha=c[1], rslora=c[2]) for n, c in configs.items() if c != (k, alpha, rslora)},
        keys={f"{n}.{role}": pair[role][0] for n, pair in modules.items() for role in ("A", "B")},
    )


FACTOR_SUFFIXES = (("lora_A.weight", "lora_B.weight"), ("lora_down.weight", "lora_up.weight"), ("down.weight", "up.weight"))


def _partner(fmt: str, name: str, present: str, role: str) -> str:
    """The key, in the present key's own layout, of the missing factor `role` ('A' or 'B') of module `name`."""
    for pair in FACTOR_SUFFIXES:
        for have, want in (pair, pair[::-1]):
            if present.endswith(have):
                return present[: -len(have)] + want
    return f"{name}.{SUFFIX[fmt][role]}"  # the present key is the alpha


def _factor_pair(fmt: str, name: str, pair: dict, source: str) -> tuple[torch.Tensor, torch.Tensor]:
    for role in ("A", "B"):
        if role not in pair:
            present = next(key for key, _ in pair.values())
            raise AdapterFileError(f"{source}: key {present} has no partner {_partner(fmt, name, present, role)}; the file is incomplete")
    (key_a, A), (key_b, B) = pair["A"], pair["B"]
    for key, t in ((key_a, A), (key_b, B)):
        if t.ndim != 2 or not t.is_floating_point():
            kind = "a convolution's LoRA (LoCon)" if t.ndim == 4 else f"a {t.dtype} tensor of shape {tuple(t.shape)}"
            raise AdapterFileError(f"{source}: key {key} is {kind}; only float LoRA factors of linear layers can be imported")
    if A.shape[0] != B.shape[1]:
        raise AdapterFileError(f"{source}: key {key_b} has shape {tuple(B.shape)} but {key_a} has rank {A.shape[0]}; the factors do not pair up")
    return A.float(), B.float()


def _alpha(fmt: str, name: str, k: int, pair: dict, fields: dict | None, source: str) -> tuple[float, bool]:
    """(alpha, rsLoRA) of one module, by the rules its format's readers apply.

    An ``.alpha`` key (kohya's, or a diffusers file's network alpha) gives the scale alpha / k, as
    diffusers applies network alphas (its LoraConfig's lora_alpha / alpha_pattern); else the
    file's LoraConfig fields do; else alpha = k (scale 1), diffusers' and peft's default.
    """
    if "alpha" in pair:
        key, t = pair["alpha"]
        if t.numel() != 1:
            raise AdapterFileError(f"{source}: key {key} must hold one number, not a tensor of shape {tuple(t.shape)}")
        alpha = float(t.item())
        return (alpha or float(k)), False  # kohya reads a zero alpha as alpha = rank
    if fmt == "kohya" or fields is None:
        return float(k), False
    path = name.removeprefix(f"{part_of(fmt, name)}.").removeprefix(PEFT_PREFIX)
    names = [path, path.removeprefix("text_model.")]
    alpha = _pattern_value(fields.get("alpha_pattern"), names, fields["lora_alpha"], source)
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not math.isfinite(alpha):
        raise AdapterFileError(f"{source}: the LoRA alpha of {name} is {alpha!r}, not a finite number")
    return float(alpha), bool(fields.get("use_rslora", False))


def _file_names(fmt: str, path: str) -> list[str]:
    """The module names a `fmt` file may use for the model layer at `path` (in any part)."""
    clip = classic_clip_path(path)
    if fmt == "kohya":
        return ["lora_unet_" + path.replace(".", "_")] + [prefix + clip.replace(".", "_") for prefix in KOHYA_PARTS if prefix != "lora_unet_"]
    if fmt == "diffusers":
        return [f"unet.{path}"] + [f"{part}.{p}" for part in PARTS[1:] for p in (path, clip)]
    return [path, PEFT_PREFIX + path]


def fit_to_model(file: AdapterFile, model: nn.Module, source: str, part: str | None = None,
                 aliases: Mapping[str, str] | None = None) -> AdapterFile:
    """The part of an imported LoRA file that adapts `model`, renamed to its module paths and checked against its layers.

    A diffusers/kohya file holds a UNet part and text-encoder parts: `part` (one of PARTS) is
    taken if given, else the one whose modules are layers of `model`; the others are left for
    the other models. `aliases` maps a layer's path to another path the file may name it by
    (in any format's spelling). Every module of it must be a linear layer of `model` with
    matching widths; errors name the file's key.
    """
    layers = {p: (m.base_layer if isinstance(m, AdaptedLinear) else m) for p, m in _linear_paths(model).items()}
    lookup = {n: p for p in layers for n in _file_names(file.format, p)}
    lookup.update({n: p for p, alias in (aliases or {}).items() if p in layers for n in _file_names(file.format, alias)})
    by_part: dict[str, list[str]] = {}
    for name in file.modules:
        by_part.setdefault(part_of(file.format, name), []).append(name)
    if part is None or file.format == "peft":  # a peft file adapts one model
        part = max(by_part, key=lambda q: sum(n in lookup for n in by_part[q]))
    elif part not in by_part:
        raise AdapterFileError(f"{source} ({file.format} LoRA) has no {part} part; it adapts {', '.join(sorted(by_part))}")
    names = by_part[part]
    suffix, file_keys = SUFFIX[file.format], getattr(file, "keys", {})
    problems, paths = [], {}
    for name in names:
        key_a, key_b = (file_keys.get(f"{name}.{role}", f"{name}.{suffix[role]}") for role in ("A", "B"))
        path = lookup.get(name)
        if path is None:
            problems.append(f"{key_a}: {type(model).__name__} has no linear layer by that name")
            continue
        if path in paths.values():
            problems.append(f"{key_a}: a second LoRA for the layer {path}")
            continue
        paths[name] = path
        layer, A, B = layers[path], file.tensors[f"{name}.A"], file.tensors[f"{name}.B"]
        k = A.shape[0]
        if A.shape[1] != layer.in_features:
            problems.append(f"{key_a}: file has {tuple(A.shape)}, the layer {path} needs ({k}, {layer.in_features})")
        if B.shape[0] != layer.out_features:
            problems.append(f"{key_b}: file has {tuple(B.shape)}, the layer {path} needs ({layer.out_features}, {k})")
    if problems:
        what = "another base model" if len(paths) else "another model"
        shown = "\n  ".join(problems[:10]) + (f"\n  ... and {len(problems) - 10} more" if len(problems) > 10 else "")
        raise AdapterFileError(f"{source} ({file.format} LoRA) does not fit this {type(model).__name__}; it was made for {what}:\n  {shown}")
    leaves = sorted({p.rsplit(".", 1)[-1] for p in paths.values()})
    config = replace(file.config, targets=leaves)
    return AdapterFile(
        config=config, modules=[paths[n] for n in names],
        tensors={f"{paths[n]}.{t}": file.tensors[f"{n}.{t}"] for n in names for t in ("A", "B")},
        base_model=file.base_model, extra=file.extra, format=file.format,
        module_configs={paths[n]: replace(c, targets=leaves) for n, c in file.module_configs.items() if n in paths},
    )
