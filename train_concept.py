"""Single-concept training entry point: ``python train_concept.py --concept dog --method sbora-fa``.

Also works as ``accelerate launch train_concept.py ...``. The trainer lives in
``sbora_diffusion/train_concept.py``; ``--help`` lists every option.
"""

import sys

from sbora_diffusion.train_concept import main

if __name__ == "__main__":
    sys.exit(main())
