"""`python -m distmnist.predict` (and torchrun -m): the tool lives in distmnist/tools/predict.py."""

import sys

from distmnist.tools.predict import main

if __name__ == "__main__":
    sys.exit(main())
