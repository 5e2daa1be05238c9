"""`python -m distmnist.evaluate` (and torchrun -m): the tool lives in distmnist/tools/evaluate.py."""

import sys

from distmnist.tools.evaluate import main

if __name__ == "__main__":
    sys.exit(main())
