"""Training of compressed networks: tenBCD (gradient-free block coordinate descent) and a backprop baseline.

The block updates themselves (tensorpress.train.updates) are internal: TenBCD runs them.
"""

from tensorpress.train.backprop import accuracy, train_backprop
from tensorpress.train.paper import PAPER_LOGGED_TEST_ACC, PaperCNN
from tensorpress.train.projections import (
    prune_projection,
    tt_project,
    tt_project_reshaped,
    tt_reconstruct,
    tt_reconstruct_reshaped,
)
from tensorpress.train.spec import ConvSpec, ReshapedTTSpec, TTSpec, ranks_for_ratio, reshaped_tt_spec, resolve_tt_spec
from tensorpress.train.tenbcd import DivergenceError, TenBCD, one_hot

__all__ = [
    "TenBCD",
    "DivergenceError",
    "one_hot",
    "PaperCNN",
    "PAPER_LOGGED_TEST_ACC",
    "TTSpec",
    "ReshapedTTSpec",
    "reshaped_tt_spec",
    "ConvSpec",
    "ranks_for_ratio",
    "resolve_tt_spec",
    "tt_project",
    "tt_reconstruct",
    "tt_project_reshaped",
    "tt_reconstruct_reshaped",
    "prune_projection",
    "train_backprop",
    "accuracy",
]
