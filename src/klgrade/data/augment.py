"""Batched augmentation on the training device: one affine warp and one intensity change per image.

Random parameters come from a seeded CPU generator (the same on every device); the warp itself runs as a
single `grid_sample` over the batch, so there is no per-image Python work in the training loop.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class AugmentConfig:
    """Args:
    flip_prob: probability of a horizontal flip (left and right knees are mirror images).
    rotate_deg: maximum absolute rotation, degrees.
    scale: maximum relative zoom in or out.
    translate: maximum shift as a fraction of the image side.
    brightness: maximum additive change on [0, 1] intensities.
    contrast: maximum relative contrast change.
    """

    flip_prob: float = 0.5
    rotate_deg: float = 10.0
    scale: float = 0.1
    translate: float = 0.06
    brightness: float = 0.1
    contrast: float = 0.15

    def to_dict(self) -> dict:
        return asdict(self)


def _uniform(n: int, bound: float, generator: torch.Generator) -> torch.Tensor:
    return (torch.rand(n, generator=generator) * 2 - 1) * bound


def random_augment(images: torch.Tensor, config: AugmentConfig, generator: torch.Generator) -> torch.Tensor:
    """Augment a batch of (B, C, H, W) images with intensities in [0, 1]; returns a new tensor."""
    n = images.shape[0]
    angle = _uniform(n, math.radians(config.rotate_deg), generator)
    zoom = 1 + _uniform(n, config.scale, generator)
    shift = torch.stack([_uniform(n, config.translate * 2, generator), _uniform(n, config.translate * 2, generator)], 1)
    flip = torch.where(torch.rand(n, generator=generator) < config.flip_prob, -1.0, 1.0)
    gain = 1 + _uniform(n, config.contrast, generator)
    offset = _uniform(n, config.brightness, generator)

    cos, sin = torch.cos(angle) / zoom, torch.sin(angle) / zoom
    theta = torch.stack([torch.stack([cos * flip, -sin, shift[:, 0]], 1), torch.stack([sin * flip, cos, shift[:, 1]], 1)], 1)
    theta = theta.to(device=images.device, dtype=images.dtype)
    grid = F.affine_grid(theta, list(images.shape), align_corners=False)
    warped = F.grid_sample(images, grid, mode="bilinear", padding_mode="zeros", align_corners=False)

    gain = gain.to(images.device, images.dtype).view(n, 1, 1, 1)
    offset = offset.to(images.device, images.dtype).view(n, 1, 1, 1)
    mean = warped.mean(dim=(1, 2, 3), keepdim=True)
    return ((warped - mean) * gain + mean + offset).clamp(0, 1)
