"""The tenBCD paper's CNN experiment as a configuration object (Li, Chung, Du, Wang, Zhou and Shen,
arXiv 2303.06815; the authors' notebook Tenbcd_CNN_sameset_V2.ipynb in their NN-BCD repository).

What the notebook runs (figures read from it, not its code):

* network: conv 3x3, stride 2, 32 filters, no padding, on 28x28 digits (13 x 13 x 32 = 5,408
  features, flattened position-major: feature p * 32 + c), ReLU; 5,408 -> 1,024 (TT), ReLU;
  1,024 -> 1,024 (TT), ReLU; 1,024 -> 10. No biases (fixed at zero). The conv and the output
  layer are free (no TT term).
* TT format: the weight as stored (out x in) reshaped row-major into a 10-way tensor, (26, 26, 4,
  4, 4, 4, 4, 2, 2, 2) for 1,024 x 5,408 and ten 4s for 1,024 x 1,024, a TT-SVD of that tensor
  at one rank cap for all 9 bonds, recomputed right after each W update; accuracy is measured
  with the two reconstructions (and the conv and output weights as they are).
* hyperparameters, unscaled by the number of samples: tau = 0.1, gamma = rho = 5, alpha = 1 (the
  proximal weight of V_N, U_i and of every W_i); every W_i starts as 0.01 * N(0, 1), the first TT
  targets are TT-SVDs of those at rank 700; a new TT projection always replaces the old one.
* data: 6,000 training digits (a seed-10 shuffle of the training split, first 10%), 999 test
  digits, pixels in [0, 1]; 2,000 iterations; seeds 10, 20, ..., 100 for 10 repetitions.

Differences that cannot be removed: the notebook draws its initial weights from the CUDA
generator (so the same seed gives other numbers here) and its TT-SVD is TensorLy's exact SVD in
float32; ``svd_method="auto"`` here solves the one large unfolding per iteration (676 x 8,192 at
rank 40) by subspace iteration warm-started from the previous iteration's subspace (near-optimal,
not exact; ``svd_method="lapack"`` is exact and several times slower).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from tensorpress._validate import is_int
from tensorpress.train.spec import ConvSpec, reshaped_tt_spec
from tensorpress.train.tenbcd import TenBCD

# the notebook's logged test accuracy (rank 40, first repetition, seed 10), by iteration
PAPER_LOGGED_TEST_ACC = {50: 0.54, 100: 0.86, 190: 0.93, 380: 0.96, 1000: 0.976, 1590: 0.982}
PAPER_RESHAPES = {1: (26, 26, 4, 4, 4, 4, 4, 2, 2, 2), 2: (4,) * 10}
PAPER_LAYER_SIZES = (784, 5408, 1024, 1024, 10)
PAPER_SEEDS = tuple(range(10, 101, 10))
VARIANTS = ("notebook", "n-scaled")


@dataclass(frozen=True)
class PaperCNN:
    """The paper's CNN configuration; ``build()`` gives the TenBCD model.

    Args:
        rank: the TT rank cap of both TT layers (the paper: 40 and 220).
        variant: "notebook" (default): the authors' configuration above, exactly. "n-scaled":
            this project's earlier configuration (TT-matrix layers with balanced factors, the
            weight terms scaled by n: tau = 1, a proximal weight 0.1 on W and a weight decay of
            0.01, each times n; TT layers start on random TT cores). It helps when only tens of
            iterations can be afforded: it converges in 20-40 iterations, but to a lower plateau
            (92.2% test accuracy at rank 40 by iteration 30-40 on 6,000 digits, where the
            notebook's configuration climbs for hundreds of iterations, to 97.6% at 1,000 in the
            authors' log).
        seed: the initialization's seed (the notebook's first repetition: 10).
        svd_method: the TT-SVD's SVD method ("auto": warm-started subspace iteration for the
            large unfolding; "lapack": exact).
        dtype, device: of the state (the notebook: float32 on a GPU).
        overrides: further TenBCD keyword arguments, applied last.
    """

    rank: int = 40
    variant: str = "notebook"
    seed: int = 10
    svd_method: str = "auto"
    dtype: torch.dtype = torch.float32
    device: str | None = None
    overrides: dict = field(default_factory=dict)

    def __post_init__(self):
        if self.variant not in VARIANTS:
            raise ValueError(f"variant: expected one of {VARIANTS}, got {self.variant!r}")
        if not is_int(self.rank) or self.rank < 1:
            raise ValueError(f"rank: expected an int >= 1, got {self.rank!r}")

    @property
    def conv(self) -> ConvSpec:
        flatten = "positions" if self.variant == "notebook" else "channels"
        return ConvSpec((1, 28, 28), out_channels=32, kernel_size=3, stride=2, flatten=flatten)

    def kwargs(self) -> dict:
        """The TenBCD keyword arguments of this configuration."""
        common = dict(conv=self.conv, seed=self.seed, svd_method=self.svd_method, dtype=self.dtype, device=self.device)
        if self.variant == "notebook":
            sizes = PAPER_LAYER_SIZES
            tt = {i: reshaped_tt_spec(sizes[i + 1], sizes[i], PAPER_RESHAPES[i], self.rank) for i in (1, 2)}
            kw = dict(
                tt_layers=tt,
                gamma=5.0,
                rho=5.0,
                alpha=1.0,
                tau=0.1,
                alpha_w=1.0,
                weight_decay=0.0,
                scale=None,
                init="normal",
                init_std=0.01,
                init_target_rank=700,
                projection_accept="always",
            )
        else:
            kw = dict(
                tt_layers={1: self.rank, 2: self.rank},
                gamma=5.0,
                rho=5.0,
                alpha=1.0,
                tau=1.0,
                alpha_w=0.1,
                weight_decay=0.01,
                scale="n",
                init="tt",
            )
        return {**common, **kw, **self.overrides}

    def build(self) -> TenBCD:
        return TenBCD(list(PAPER_LAYER_SIZES), **self.kwargs())
