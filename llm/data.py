"""Instruction data for LLM fine-tuning: the built-in arithmetic task, JSONL files, chat formatting.

Every example is ``(instruction, input, output, answer)``. It is rendered with the
tokenizer's own chat template (a user turn holding instruction and input, an assistant turn
holding the output); the loss sees only the assistant turn's tokens, its end-of-turn
marker included, so the model learns both the answer and where to stop.

The ``arithmetic`` task is a seeded generator of small word problems in the styles of the
arithmetic-reasoning sets the SBoRA paper trains on (AddSub: one addition or subtraction;
MultiArith: two steps; SingleEq: an unknown start or an equal share). Numbers stay small
so a 135M-parameter model can learn the format and the sums in a few hundred steps. The
split is fixed: the test problems come first from a constant seed, and the training
problems exclude every test question. Answers are graded on the last number generated.
``carve_validation`` holds a fixed part of any training set out for choosing hyperparameters,
so that learning rates are never picked on the test split.

Single-skill tasks for multi-task composition come from the same kind of seeded generator
(``GENERATED_TASKS``): ``addsub`` and ``multistep`` (one arithmetic template each) and the
text task ``reverse`` (write a list of words backwards, graded on the exact text);
``write_jsonl`` stores such a split as the JSONL files every command reads.
"""

from __future__ import annotations

import functools
import json
import random
import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from sbora.configuration import ConfigError
from sbora.fileio import write_text

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

ARITHMETIC = "arithmetic"
DATA_SEED = 20240705  # fixed: the arithmetic split must not depend on the training seed
IGNORE_INDEX = -100  # label of tokens without loss (prompt, padding)


@dataclass(frozen=True)
class Example:
    instruction: str
    input: str
    output: str
    answer: str  # what grading compares against: a number, or the normalized output


# ---------------------------------------------------------------------------- arithmetic task

_NAMES = [("Tom", "he"), ("Sara", "she"), ("Ali", "he"), ("Mia", "she"), ("Ben", "he"), ("Lena", "she"), ("Omar", "he"), ("Rosa", "she")]
_THINGS = ["apples", "marbles", "stickers", "books", "pencils", "cookies", "shells", "cards", "balloons", "coins"]
_INSTRUCTION = "Solve the math word problem. End with 'The answer is N.'"


def _addsub(rng: random.Random) -> tuple[str, str, int]:
    (name, he), obj = rng.choice(_NAMES), rng.choice(_THINGS)
    a, b = rng.randint(2, 20), rng.randint(2, 20)
    kind = rng.randrange(3)
    if kind == 0:
        return f"{name} had {a} {obj}. {he.capitalize()} found {b} more. How many {obj} does {name} have now?", f"{a} + {b} = {a + b}.", a + b
    if kind == 1:
        a, b = max(a, b) + 1, min(a, b)
        return f"{name} had {a} {obj}. {he.capitalize()} gave {b} to a friend. How many {obj} does {name} have left?", f"{a} - {b} = {a - b}.", a - b
    return f"There are {a} {obj} in a box and {b} {obj} on the table. How many {obj} are there in all?", f"{a} + {b} = {a + b}.", a + b


def _multiarith(rng: random.Random) -> tuple[str, str, int]:
    (name, he), obj = rng.choice(_NAMES), rng.choice(_THINGS)
    if rng.randrange(2) == 0:
        a, b = rng.randint(2, 6), rng.randint(2, 6)
        c = rng.randint(1, a * b - 1)
        return (
            f"{name} has {a} bags with {b} {obj} in each bag. {he.capitalize()} gives away {c} {obj}. How many {obj} are left?",
            f"{a} * {b} = {a * b}. {a * b} - {c} = {a * b - c}.",
            a * b - c,
        )
    a, b = rng.randint(2, 15), rng.randint(2, 15)
    c = rng.randint(1, a + b - 1)
    return (
        f"{name} had {a} {obj}. {he.capitalize()} bought {b} more and then lost {c}. How many {obj} does {name} have now?",
        f"{a} + {b} = {a + b}. {a + b} - {c} = {a + b - c}.",
        a + b - c,
    )


def _singleeq(rng: random.Random) -> tuple[str, str, int]:
    (name, he), obj = rng.choice(_NAMES), rng.choice(_THINGS)
    if rng.randrange(2) == 0:
        a, b = rng.randint(2, 20), rng.randint(2, 20)
        return (
            f"{name} had some {obj}. After getting {b} more, {he} has {a + b}. How many {obj} did {name} have at first?",
            f"{a + b} - {b} = {a}.",
            a,
        )
    q, k = rng.randint(2, 9), rng.randint(2, 6)
    return (
        f"{name} shares {q * k} {obj} equally among {k} friends. How many {obj} does each friend get?",
        f"{q * k} / {k} = {q}.",
        q,
    )


_TEMPLATES = (_addsub, _multiarith, _singleeq)
# The SBoRA paper's arithmetic sets that each template imitates, told apart by phrases only it uses.
ARITHMETIC_KINDS = {"AddSub": ("more. How many", "to a friend", "in a box"), "MultiArith": ("bags with", "then lost"),
                    "SingleEq": ("had some", "equally among")}


def arithmetic_kind(question: str) -> str:
    """Which template (AddSub, MultiArith, SingleEq) wrote an arithmetic question."""
    return next(kind for kind, phrases in ARITHMETIC_KINDS.items() if any(p in question for p in phrases))


def _from_template(template):
    def make(rng: random.Random) -> Example:
        question, work, answer = template(rng)
        return Example(_INSTRUCTION, question, f"{work} The answer is {answer}.", str(answer))

    return make


def _arithmetic_example(rng: random.Random) -> Example:
    return _from_template(rng.choice(_TEMPLATES))(rng)


_WORDS = ["apple", "river", "candle", "tiger", "window", "garden", "pencil", "cloud", "bottle", "rocket", "mirror", "forest",
          "ladder", "button", "castle", "pepper", "wallet", "island", "hammer", "violin", "carpet", "lemon", "anchor", "jacket",
          "kettle", "meadow", "needle", "orange", "pillow", "saddle", "tunnel", "basket", "spider", "helmet", "lizard", "marble"]


def _reverse_example(rng: random.Random) -> Example:
    words = rng.sample(_WORDS, rng.randint(3, 5))
    backwards = ", ".join(reversed(words))
    return Example("Write the words in reverse order, separated by commas.", ", ".join(words), backwards, backwards)


GENERATED_TASKS = {ARITHMETIC: _arithmetic_example, "addsub": _from_template(_addsub), "multistep": _from_template(_multiarith),
                   "reverse": _reverse_example}


def generated_split(kind: str, train_size: int, test_size: int) -> tuple[list[Example], list[Example]]:
    """A fixed split of a generated task: ``test_size`` test problems first, then ``train_size`` distinct others."""
    if kind not in GENERATED_TASKS:
        raise ValueError(f"unknown generated task '{kind}'; known: {', '.join(GENERATED_TASKS)}")
    rng, make = random.Random(DATA_SEED), GENERATED_TASKS[kind]
    test: dict[str, Example] = {}
    while len(test) < test_size:
        ex = make(rng)
        test.setdefault(ex.input, ex)
    train: dict[str, Example] = {}
    while len(train) < train_size:
        ex = make(rng)
        if ex.input not in test:
            train.setdefault(ex.input, ex)
    return list(train.values()), list(test.values())


def arithmetic_split(train_size: int = 2000, test_size: int = 200) -> tuple[list[Example], list[Example]]:
    """The fixed arithmetic split: ``test_size`` test problems, then ``train_size`` distinct others."""
    return generated_split(ARITHMETIC, train_size, test_size)


def carve_validation(train: list[Example], size: int, seed: int = DATA_SEED) -> tuple[list[Example], list[Example]]:
    """``(rest, validation)``: `size` training examples held out, the rest in their order.

    Seeded by the data, not by any training seed, so every method, learning rate and seed is
    chosen on the same validation problems and trained on the same rest."""
    if not 0 <= size < len(train):
        raise ValueError(f"cannot hold out {size} of {len(train)} training examples for validation; hold out fewer (at least one must remain)")
    held = set(random.Random(seed).sample(range(len(train)), size))
    return [ex for i, ex in enumerate(train) if i not in held], [ex for i, ex in enumerate(train) if i in held]


# ---------------------------------------------------------------------------- grading

_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?")


def last_number(text: str) -> str | None:
    """The last number in `text`, normalized (``1,200`` -> ``1200``, ``17.0`` -> ``17``); None if none."""
    found = _NUMBER.findall(text)
    if not found:
        return None
    value = float(found[-1].replace(",", "").rstrip("."))
    return str(int(value)) if value.is_integer() else str(value)


def _normalize(text: str) -> str:
    return " ".join(text.lower().strip().rstrip(".").split())


def reference_answer(output: str) -> str:
    """Grading target of a free-form output: its last number if it has one, else the normalized text."""
    return last_number(output) or _normalize(output)


def is_correct(generated: str, answer: str) -> bool:
    """Exact match: on the last number when the answer is a number, else on the normalized text."""
    if last_number(answer) == answer:
        return last_number(generated) == answer
    return _normalize(generated) == answer


# ---------------------------------------------------------------------------- JSONL files


def jsonl_lines(path: str | Path, missing: str = "no JSONL data file at {path}") -> list[tuple[int, object]]:
    """(line number, parsed value) of each non-blank line of a JSONL file; errors name the file and line.
    `missing` is the message for a file that is not there ({path} filled in)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(missing.format(path=path))
    rows = []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if line.strip():
            try:
                rows.append((n, json.loads(line)))
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{n} is not valid JSON ({e.msg})") from None
    return rows


def read_jsonl(path: str | Path) -> list[Example]:
    """Instruction data, one JSON object a line with ``instruction``, ``output`` and optional ``input``, ``answer``."""
    examples = []
    for n, row in jsonl_lines(path):
        if not isinstance(row, dict) or not isinstance(row.get("instruction"), str) or not isinstance(row.get("output"), str):
            raise ValueError(f"{path}:{n} needs string fields 'instruction' and 'output' (and optionally 'input', 'answer')")
        output = row["output"]
        answer = str(row["answer"]) if row.get("answer") is not None else reference_answer(output)
        examples.append(Example(row["instruction"], str(row.get("input") or ""), output, answer))
    if not examples:
        raise ValueError(f"{path} holds no examples")
    return examples


def write_jsonl(path: str | Path, examples: list[Example]) -> Path:
    """`examples` as a JSONL file that ``read_jsonl`` (and every ``--task``/``--eval-data``) reads back unchanged."""
    rows = [{"instruction": ex.instruction, "input": ex.input, "output": ex.output, "answer": ex.answer} for ex in examples]
    write_text(path, "".join(json.dumps(row) + "\n" for row in rows))
    return Path(path)


def split_examples(examples: list[Example], test_fraction: float, seed: int = DATA_SEED) -> tuple[list[Example], list[Example]]:
    """A fixed, seeded train/test split of one example list."""
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction}")
    order = list(range(len(examples)))
    random.Random(seed).shuffle(order)
    n_test = max(1, round(len(examples) * test_fraction))
    if n_test >= len(examples):
        raise ValueError(f"{len(examples)} examples are too few to hold out {test_fraction:.0%} for testing")
    return [examples[i] for i in order[n_test:]], [examples[i] for i in order[:n_test]]


def load_task(
    task: str, eval_data: str | None = None, train_size: int = 2000, test_size: int = 200, test_fraction: float = 0.1
) -> tuple[list[Example], list[Example]]:
    """``(train, test)`` for ``arithmetic`` or a JSONL file (test: `eval_data`, else a held-out fraction)."""
    if task == ARITHMETIC:
        train, test = arithmetic_split(train_size, test_size)
    elif task.endswith(".jsonl") or Path(task).is_file():
        train = read_jsonl(task)
        train, test = (train, []) if eval_data else split_examples(train, test_fraction)
    else:
        raise ValueError(f"unknown task '{task}': use '{ARITHMETIC}' or a path to a .jsonl file of instruction data")
    return train, read_jsonl(eval_data) if eval_data else test


def task_name(task: str) -> str:
    """A short name for a task (output folders, adapter names): ``arithmetic`` or the JSONL file's stem.

    Adapter names become keys of a torch ModuleDict: dots and other odd characters turn into
    ``_``, and a name that is a torch module attribute (``train``, ``half``...) gets a ``task_`` prefix.
    """
    if task == ARITHMETIC:
        return task
    name = re.sub(r"[^A-Za-z0-9_-]", "_", Path(task).stem) or "task"
    return f"task_{name}" if hasattr(torch.nn.ModuleDict(), name) else name


# ---------------------------------------------------------------------------- chat formatting


def _user_turn(example: Example) -> dict[str, str]:
    return {"role": "user", "content": example.instruction + (f"\n\n{example.input}" if example.input else "")}


def prompt_text(tokenizer: PreTrainedTokenizerBase, example: Example) -> str:
    """The chat-formatted prompt, ending where the assistant's answer starts."""
    return tokenizer.apply_chat_template([_user_turn(example)], add_generation_prompt=True, tokenize=False)


def encode_example(tokenizer: PreTrainedTokenizerBase, example: Example, max_length: int, truncate: bool = False) -> dict[str, list[int]]:
    """Token ids and labels: labels are IGNORE_INDEX on the prompt, the ids themselves on the answer.

    An example longer than `max_length` is an error unless `truncate` (the answer is cut).
    """
    prompt = prompt_text(tokenizer, example)
    full = tokenizer.apply_chat_template([_user_turn(example), {"role": "assistant", "content": example.output}], tokenize=False)
    if not full.startswith(prompt):
        raise ValueError("the tokenizer's chat template renders the prompt differently with and without the answer; use another template")
    prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    answer_ids = tokenizer(full[len(prompt) :], add_special_tokens=False)["input_ids"]
    if len(prompt_ids) >= max_length:
        raise ValueError(f"a prompt has {len(prompt_ids)} tokens, more than max_length={max_length}; raise --max-length (within the model's context)")
    if len(prompt_ids) + len(answer_ids) > max_length and not truncate:
        raise ValueError(f"an example has {len(prompt_ids) + len(answer_ids)} tokens, more than max_length={max_length}: "
                         "raise --max-length (within the model's context), or pass --truncate to cut such answers")
    ids = (prompt_ids + answer_ids)[:max_length]
    return {"input_ids": ids, "labels": [IGNORE_INDEX] * len(prompt_ids) + ids[len(prompt_ids) :]}


class InstructionDataset(torch.utils.data.Dataset):
    """Examples tokenized once, up front (they are short)."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase, examples: list[Example], max_length: int, truncate: bool = False):
        self.items = [encode_example(tokenizer, ex, max_length, truncate) for ex in examples]

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> dict[str, list[int]]:
        return self.items[i]


def collate(items: list[dict[str, list[int]]], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad a batch: ``input_ids``, ``attention_mask`` and ``labels``, each (B, T)."""
    length = max(len(it["input_ids"]) for it in items)
    ids = torch.full((len(items), length), pad_id, dtype=torch.long)
    labels = torch.full((len(items), length), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((len(items), length), dtype=torch.long)
    for row, it in enumerate(items):
        n = len(it["input_ids"])
        ids[row, :n] = torch.tensor(it["input_ids"])
        labels[row, :n] = torch.tensor(it["labels"])
        mask[row, :n] = 1
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


@functools.lru_cache(maxsize=4)
def _epoch_order(n: int, seed: int, epoch: int) -> tuple[int, ...]:
    return tuple(torch.randperm(n, generator=torch.Generator().manual_seed(seed * 100_003 + epoch)).tolist())


def batch_indices(n: int, batch_size: int, seed: int, k: int) -> list[int]:
    """Micro-batch `k` of the run: slice ``[k·B, (k+1)·B)`` of a stream of seeded epoch permutations.

    A pure function of (seed, k), so a resumed run, or any process of several, sees exactly
    the batches an uninterrupted single stream would.
    """
    if n < batch_size:
        raise ConfigError(f"{n} training examples are fewer than one batch of {batch_size}; lower --batch-size")
    return [_epoch_order(n, seed, e)[i] for e, i in (divmod(pos, n) for pos in range(k * batch_size, (k + 1) * batch_size))]
