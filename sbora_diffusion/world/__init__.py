"""The pocket world: a procedural text-to-image world small enough to pretrain on 2 CPU cores.

``generator``   seeded 64x64 scenes of shapes and class objects with captions
``concepts``    held-out concepts (never in pretraining) with their reference photos
``pretrain``    the pretraining script of the pocket base (VAE, latents, UNet + text encoder) and CLIP, on the engine
``probes``      what a pocket base follows: colour, side, shape, two objects (each with its control), room for concepts
``weights/``    the shipped pocket-sd pipeline folder and pocket-clip open_clip folder
"""

from pathlib import Path

WEIGHTS_DIR = Path(__file__).resolve().parent / "weights"
POCKET_SD_DIR = WEIGHTS_DIR / "pocket-sd"
POCKET_CLIP_DIR = WEIGHTS_DIR / "pocket-clip"
