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

DETAIL_SIGMA = 1.5
"""Pixels (at the network's resolution) of the blur that the detail band is the image less."""


def _gaussian(sigma: float) -> torch.Tensor:
    """A normalised 1-D Gaussian kernel of radius 3 sigma (here, not kornia: grading starts without it)."""
    offsets = torch.arange(-math.ceil(3 * sigma), math.ceil(3 * sigma) + 1, dtype=torch.float32)
    kernel = torch.exp(-offsets**2 / (2 * sigma**2))
    return kernel / kernel.sum()


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
        return toned + F.interpolate(self.detail_gain(fine), size=x.shape[-2:], mode="bilinear") * (x - self._blur(x))

    @staticmethod
    def _blur(x: torch.Tensor) -> torch.Tensor:
        """Separable Gaussian blur of `DETAIL_SIGMA`, the border reflected (the kernel made here: a buffer would
        stay on the meta device when a checkpoint is loaded, which fills only stored tensors)."""
        kernel = _gaussian(DETAIL_SIGMA).to(x.device, x.dtype)
        radius = len(kernel) // 2
        x = F.conv2d(F.pad(x, (radius, radius, 0, 0), mode="reflect"), kernel.view(1, 1, 1, -1))
        return F.conv2d(F.pad(x, (0, 0, radius, radius), mode="reflect"), kernel.view(1, 1, -1, 1))
