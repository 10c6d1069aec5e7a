"""Training of compressed networks: tenBCD (gradient-free block coordinate descent) and a backprop baseline."""

from tensorpress.train.backprop import accuracy, train_backprop
from tensorpress.train.projections import prune_projection, tt_project, tt_reconstruct
from tensorpress.train.spec import ConvSpec, TTSpec, ranks_for_ratio, resolve_tt_spec
from tensorpress.train.tenbcd import DivergenceError, TenBCD, one_hot
from tensorpress.train.updates import relu_prox, update_u_hidden, update_u_out, update_v_hidden, update_v_out, update_w

__all__ = [
    "TenBCD",
    "DivergenceError",
    "one_hot",
    "TTSpec",
    "ConvSpec",
    "ranks_for_ratio",
    "resolve_tt_spec",
    "tt_project",
    "tt_reconstruct",
    "prune_projection",
    "relu_prox",
    "update_v_out",
    "update_u_out",
    "update_u_hidden",
    "update_v_hidden",
    "update_w",
    "train_backprop",
    "accuracy",
]
