"""A learned processing normaliser: maps a radiograph processed another way back to the look of the training images.

A grader trained on one site's processing (kneeKL224 is CLAHE-enhanced by a third party) changes its grade when
the same knee arrives enhanced again, equalised or with another tone curve. Those changes are smooth local tone
mappings, so the normaliser predicts, from a low-resolution view of the image (local mean, spread and maximum on
a 4x4 pixel grid), smooth maps of a per-pixel quadratic tone curve and applies them at full resolution, in the
spirit of HDRNet (Gharbi et al., "Deep Bilateral Learning for Real-Time Image Enhancement", SIGGRAPH 2017,
https://arxiv.org/abs/1707.02880). Its output layer starts at zero, so a new normaliser is the identity and
a trained grader keeps its answers until the normaliser is trained (in front of the frozen grader, towards the
grader's own answer on the stored image: `klgrade train --train-only normaliser`).

With `detail`, it also predicts a smooth map of a detail gain, applied to the image's fine detail (the image less
its Gaussian blur of `DETAIL_SIGMA`): negative where the image came sharpened (unsharp masking adds that band) or
noisier, positive where it came blurred. Those changes are not tone mappings; the grader moved 14-17% of grades with
them (docs/results.md, robustness).
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F
from kornia.filters import gaussian_blur2d

DETAIL_SIGMA = 1.5
"""Pixels (at the network's resolution) of the blur that the detail band is the image less."""


def _conv_block(in_channels: int, out_channels: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(in_channels, out_channels, 3, padding=1), nn.GELU(),
                         nn.Conv2d(out_channels, out_channels, 3, padding=1), nn.GELU())


class ProcessingNormaliser(nn.Module):
    """(B, 1, H, W) normalised image -> the same image with a locally varying quadratic tone curve applied.

    Args:
        width: channels of the low-resolution network.
        cell: side in pixels of the grid cells the curve's coefficients are predicted on (then interpolated).
        detail: also scale the fine detail by a predicted smooth gain (zero-initialised, as the curve).
    """

    def __init__(self, width: int = 24, cell: int = 4, detail: bool = False):
        super().__init__()
        self.cell = cell
        self.encode = _conv_block(3, width)
        self.encode_coarse = _conv_block(width, 2 * width)
        self.global_context = nn.Linear(2 * width, 2 * width)
        self.decode = _conv_block(3 * width, width)
        self.coefficients = nn.Conv2d(width, 3, 1)
        nn.init.zeros_(self.coefficients.weight)
        nn.init.zeros_(self.coefficients.bias)
        self.detail_gain = nn.Conv2d(width, 1, 1) if detail else None
        if self.detail_gain is not None:
            nn.init.zeros_(self.detail_gain.weight)
            nn.init.zeros_(self.detail_gain.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mean = F.avg_pool2d(x, self.cell)
        spread = (F.avg_pool2d(x * x, self.cell) - mean * mean).clamp_min(0).sqrt()
        fine = self.encode(torch.cat([mean, spread, F.max_pool2d(x, self.cell)], dim=1))
        coarse = self.encode_coarse(F.avg_pool2d(fine, 2))
        coarse = coarse + self.global_context(coarse.mean(dim=(2, 3)))[:, :, None, None]
        fine = self.decode(torch.cat([fine, F.interpolate(coarse, size=fine.shape[-2:], mode="bilinear")], dim=1))
        offset, gain, bend = F.interpolate(self.coefficients(fine), size=x.shape[-2:], mode="bilinear").chunk(3, dim=1)
        toned = x + offset + gain * x + bend * x * x
        if self.detail_gain is None:
            return toned
        kernel = 2 * math.ceil(3 * DETAIL_SIGMA) + 1
        detail = x - gaussian_blur2d(x, kernel, (DETAIL_SIGMA, DETAIL_SIGMA))
        return toned + F.interpolate(self.detail_gain(fine), size=x.shape[-2:], mode="bilinear") * detail
