"""tensorpress: compress neural networks with tensor decompositions, and make them fast."""

# tp.compress is the subpackage, and calling it runs compress() (see tensorpress/compress/__init__.py)
from tensorpress import compress, decompose, linalg, nn, ops, rank, train
from tensorpress._ext import info

__version__ = "0.1.0"
__all__ = ["info", "nn", "ops", "decompose", "linalg", "rank", "train", "compress", "__version__"]
