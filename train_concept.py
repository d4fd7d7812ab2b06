"""Single-concept training entry point: ``python train_concept.py --concept dog --method sbora-fa``.

Also works as ``accelerate launch train_concept.py ...``. The trainer lives in
``sbora_diffusion/concept/`` (data, loss, trainer) on the shared engine; ``--help`` lists every option.
"""

import sys

from sbora_diffusion.concept.cli import main

if __name__ == "__main__":
    sys.exit(main())
