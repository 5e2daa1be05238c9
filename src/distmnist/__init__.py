"""distmnist: one MNIST model trained three ways (raw DDP, Lightning Trainer, Lightning Fabric)."""

from distmnist.core.errors import DistMnistError

__version__ = "0.1.0"
__all__ = ["DistMnistError", "__version__"]
