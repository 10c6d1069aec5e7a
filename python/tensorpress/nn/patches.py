"""A convolution's input patches (im2col): one home for the rows a conv multiplies by its
kernel matrix, used by rank selection and by compress()'s calibration statistics."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn


def im2col(x: Tensor, kernel_size, stride=1, padding=0, dilation=1) -> Tensor:
    """(N, C, H, W) -> (N * L, C * kh * kw), L = H_out * W_out: row (sample, position) holds
    the patch the kernel meets there (zero padding), channel-major as weight.reshape(out, -1)."""
    cols = F.unfold(x, kernel_size, dilation=dilation, padding=padding, stride=stride)  # (N, C kh kw, L)
    return cols.transpose(1, 2).reshape(-1, cols.shape[1])


def output_size(height_width, kernel_size, stride=1, padding=0, dilation=1) -> tuple[int, int]:
    """(H_out, W_out) of a conv with zero padding over (H, W) inputs (<= 0 when the kernel
    does not fit)."""
    k, s, p, d = (_pair(v) for v in (kernel_size, stride, padding, dilation))
    return tuple((height_width[i] + 2 * p[i] - d[i] * (k[i] - 1) - 1) // s[i] + 1 for i in range(2))


def _pair(v) -> tuple[int, int]:
    return (v, v) if isinstance(v, int) else (int(v[0]), int(v[1]))


def conv_patches(conv: nn.Conv2d, x: Tensor) -> Tensor:
    """(N, C, H, W) (or one (C, H, W) sample) -> the patches `conv` multiplies by
    weight.reshape(out, -1), its padding included (so W^ p + b reproduces the conv exactly)."""
    if x.dim() == 3:
        x = x.unsqueeze(0)
    padding = conv.padding
    if isinstance(padding, str) or conv.padding_mode != "zeros":
        # "same" may pad unevenly and other modes are not zeros: pad as nn.Conv2d does
        mode = "constant" if conv.padding_mode == "zeros" else conv.padding_mode
        x = F.pad(x, conv._reversed_padding_repeated_twice, mode=mode)
        padding = (0, 0)
    return im2col(x, conv.kernel_size, conv.stride, padding, conv.dilation)
