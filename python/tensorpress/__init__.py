"""tensorpress: compress neural networks with tensor decompositions, and make them fast."""
from tensorpress._ext import info
from tensorpress import decompose, linalg, nn, ops, rank

__version__ = "0.1.0"
__all__ = ["info", "nn", "ops", "decompose", "linalg", "rank", "__version__"]
