"""distmnist: one MNIST model trained three ways (raw DDP, Lightning Trainer, Lightning Fabric)."""

import sys

from distmnist.core.errors import DistMnistError, quiet_ctrl_c_while_starting

# `python -m distmnist...` (sys.argv[0] is "-m" while the package is imported): a Ctrl-C during the seconds that
# importing torch and Lightning takes is one line and exit 130, not a KeyboardInterrupt traceback from an import
if sys.argv[:1] == ["-m"]:
    quiet_ctrl_c_while_starting()

__version__ = "0.1.0"
__all__ = ["DistMnistError", "__version__"]
