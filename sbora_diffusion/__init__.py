"""SBoRA personalization toolkit: low-rank adapters for Stable Diffusion and LLMs."""

__version__ = "0.1.0"
