"""tensorpress: compress neural networks with tensor decompositions, and make them fast."""
from tensorpress._ext import info
from tensorpress import nn, ops, decompose

__version__ = "0.1.0"
__all__ = ["info", "nn", "ops", "decompose", "__version__"]
