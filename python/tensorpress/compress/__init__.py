"""Data-driven post-training compression of whole models (calibrate -> ranks -> fit -> swap -> report)."""

from tensorpress.compress.api import METHODS, STRUCTURES, compress, eligible_layers, select_targets
from tensorpress.compress.batchnorm import FoldedBatchNorm
from tensorpress.compress.calibrate import CalibrationBatchError
from tensorpress.compress.lowrank import LowRankFit, fit_activation, fit_svd
from tensorpress.compress.report import CompressionReport, LayerAccount, LayerReport
from tensorpress.compress.saving import CompressedFileError, load_compressed, save_compressed
from tensorpress.compress.stats import GramStats

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
