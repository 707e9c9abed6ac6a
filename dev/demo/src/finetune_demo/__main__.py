"""`python -m finetune_demo`: the whole loop on the embedded cluster (see demo.py)."""

import sys

from .demo import main

if __name__ == "__main__":
    sys.exit(main())
