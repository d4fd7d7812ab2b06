"""Draw the held-out concepts shipped in data/concepts/ (the red toy robot and four others).

Procedural (PIL only, fixed seeds), so the repository needs no downloaded photos: each
concept is one fixed design drawn in the pocket world's style at 64x64, five photos at
different places, sizes and backgrounds. The drawings live in ``sbora_diffusion/world/concepts.py``;
this script rebuilds the photos (and writes any missing concept config):
``python scripts/make_example_concept.py`` (same as ``python -m sbora_diffusion.world.concepts``).
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from sbora_diffusion.world.concepts import main  # noqa: E402

if __name__ == "__main__":
    main()
