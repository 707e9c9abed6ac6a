"""Entry point: ``python -m finetune_trainer <stage>`` (see cli.py)."""

import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
