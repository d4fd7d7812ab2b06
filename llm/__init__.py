"""LLM fine-tuning with the shared adapter cores (SBoRA paper's LLM setting; docs/architecture.md §2, §3, §6).

models: base models (embedded SmolLM2 GGUF default, hub ids, local folders), devices, merged saves;
data: the arithmetic task and JSONL instruction data on the chat template; quant: QSBoRA bases;
train / evaluate / compose: the commands (``python -m llm.train`` ...) and their Python entry points.
"""

import sbora  # noqa: F401  (first: it quiets a bitsandbytes warning that transformers' imports would print)
