"""``python -m binq``: the command line, as ``binq`` (and what ``torchrun -m binq quantize ...`` runs)."""

import sys

from binq.cli import main

if __name__ == "__main__":
    sys.exit(main())
