"""``python -m acnet`` (and ``torchrun -m acnet train ...``)."""

import sys

from .cli import main

sys.exit(main(sys.argv[1:]))
