"""``python -m mobilenetv2`` and ``torchrun -m mobilenetv2``."""

import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
