"""SBoRA toolkit core: the adapter cores and their files, training procedures, the training
engine, typed configs, the command frame and file I/O. Domain-neutral: the diffusion world
(``sbora_diffusion``) and the LLM world (``llm``) build on it; it imports neither
(docs/architecture.md)."""

import logging

__version__ = "0.1.0"

# peft imports bitsandbytes when it is installed, and bitsandbytes then warns on every run
# that an optional CPU 4-bit kernel (a hub download) is missing. Only the NF4 path on a CPU
# would use it, and that path works without it, so the line is noise for every command.
logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
