"""tensorpress: compress neural networks with tensor decompositions, and make them fast."""

from tensorpress import decompose, linalg, nn, ops, rank, train
from tensorpress._ext import info

# the function shadows the subpackage's attribute on purpose (tp.compress(model, ...));
# `from tensorpress.compress import ...` still reaches the subpackage
from tensorpress.compress.api import compress

__version__ = "0.1.0"
__all__ = ["info", "nn", "ops", "decompose", "linalg", "rank", "train", "compress", "__version__"]
