"""A deletion test of Grad-CAM maps: does hiding what the map points at hurt the prediction more than hiding
as much at random?

Masked pixels are filled from a blurred copy of the image (the same fill for both masks), so the test removes
detail, not intensity. Random masks are smooth like a Grad-CAM map: uniform noise on a coarse grid, upsampled.
"""

from __future__ import annotations

import cv2
import numpy as np
import torch
import torch.nn.functional as F

MASKED_SHARE = 0.2
BLUR_SIGMA = 0.05
"""Sigma of the fill's Gaussian blur, as a fraction of the image side."""
RANDOM_GRID = 8
"""Random maps are uniform noise on a (side / RANDOM_GRID)^2 grid, upsampled: as smooth as a Grad-CAM map."""


def top_share_mask(score_map: np.ndarray, share: float = MASKED_SHARE) -> np.ndarray:
    """Boolean mask of the `share` of pixels with the highest values (ties broken by position)."""
    order = np.argsort(score_map.ravel(), kind="stable")[::-1]
    mask = np.zeros(score_map.size, dtype=bool)
    mask[order[: int(round(share * score_map.size))]] = True
    return mask.reshape(score_map.shape)


def random_map(side: int, generator: torch.Generator) -> np.ndarray:
    grid = max(2, side // RANDOM_GRID)
    noise = torch.rand(1, 1, grid, grid, generator=generator)
    return F.interpolate(noise, size=(side, side), mode="bilinear", align_corners=False)[0, 0].numpy()


def masked(image_uint8: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """The image with the masked pixels taken from its blurred copy."""
    blurred = cv2.GaussianBlur(image_uint8, (0, 0), BLUR_SIGMA * image_uint8.shape[0])
    return np.where(mask, blurred, image_uint8)
