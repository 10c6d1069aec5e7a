"""Data-driven post-training compression of whole models (calibrate -> ranks -> fit -> swap -> report).

This subpackage is also the function: `tensorpress.compress(model, calib, ...)` calls
`tensorpress.compress.api.compress`, and `import tensorpress.compress` still gives the
subpackage (its tools: save_compressed, load_compressed, CompressionReport, ...). A module whose
class defines __call__ is how Python lets one name be both.
"""

import sys
import types

from tensorpress.compress.api import METHODS, STRUCTURES, compress, eligible_layers, select_targets
from tensorpress.compress.batchnorm import FoldedBatchNorm
from tensorpress.compress.calibrate import CalibrationBatchError
from tensorpress.compress.lowrank import LowRankFit, fit_activation, fit_svd
from tensorpress.compress.report import CompressionReport, LayerAccount, LayerReport
from tensorpress.compress.saving import CompressedFileError, load_compressed, save_compressed
from tensorpress.compress.stats import GramStats


class _CallableModule(types.ModuleType):
    def __call__(self, *args, **kwargs):
        return compress(*args, **kwargs)


_CallableModule.__call__.__doc__ = compress.__doc__
sys.modules[__name__].__class__ = _CallableModule

__all__ = [
    "compress",
    "CompressionReport",
    "LayerAccount",
    "LayerReport",
    "GramStats",
    "LowRankFit",
    "fit_activation",
    "fit_svd",
    "eligible_layers",
    "save_compressed",
    "load_compressed",
    "select_targets",
    "METHODS",
    "STRUCTURES",
    "CalibrationBatchError",
    "CompressedFileError",
    "FoldedBatchNorm",
]
