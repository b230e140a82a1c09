"""Batched augmentation on the training device: upstream-processing changes, one affine warp and one intensity
change per image.

Domain augmentation (`DomainConfig`, one switch in the training config) imitates what happens to a
radiograph before klgrade sees it: local contrast enhanced again (CLAHE with a random clip limit and tile
grid) or reduced (blended with a large-scale smoothed copy, towards an unenhanced radiograph), gamma,
histogram equalisation, JPEG compression, down-then-up sampling, blur and noise; and, when asked, edge
enhancement (`sharpen_prob`: unsharp masking), another site's framing of the same knee (`reframe_prob`: cropped
tighter around the joint and tilted) and a lead side marker burnt in (`marker_prob`: an R or L anywhere in the
frame, some on a dark box).
The filters are kornia's, batched on the training device; on a CPU, CLAHE and JPEG run through OpenCV instead
(kornia's take 50 and 110 ms per 160-px image there, OpenCV's well under 1 ms), the rest stays kornia's. Random
parameters come from a seeded CPU generator (the same on every device); the warp runs as a single `grid_sample`
over the batch, so there is no per-image Python work in the training loop.
"""

from __future__ import annotations

import functools
import math
from dataclasses import asdict, dataclass

import cv2
import numpy as np
import torch
import torch.nn.functional as F
from kornia.enhance import adjust_gamma, equalize, equalize_clahe, jpeg_codec_differentiable
from kornia.filters import gaussian_blur2d


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


@dataclass(frozen=True)
class DomainConfig:
    """Strengths of the domain augmentation: each `*_prob` is the share of images that get that change.

    Args:
        clahe_prob, clahe_clip, clahe_grids: CLAHE with a clip limit drawn from `clahe_clip` and a tile grid
            from `clahe_grids` (one draw per group of images).
        soften_prob, soften_blend, soften_sigma: local contrast reduced: blend of weight drawn from
            `soften_blend` with a Gaussian-smoothed copy (sigma as a fraction of the side).
        gamma_prob, gamma: gamma drawn log-uniformly from this range.
        equalize_prob: histogram equalisation.
        jpeg_prob, jpeg_quality: JPEG compression at a quality drawn from this range.
        resample_prob, resample_min_side: down to a side drawn from [resample_min_side, side) and back up.
        blur_prob, blur_sigma: Gaussian blur, sigma in pixels.
        noise_prob, noise_std: additive Gaussian noise, std on [0, 1] intensities.
        reframe_prob, reframe_share, reframe_rotate_deg: a centred crop keeping a share of the side drawn from
            `reframe_share`, tilted by up to `reframe_rotate_deg`, resized back (reflected at the border). Off by
            default, so that recipes written before it draw the same random numbers. Only tighter: a wider field of
            view cannot be made from a crop.
        marker_prob, marker_height: a lead side marker burnt in (`marker_bank`), its letter `marker_height` shares
            of the side high. Off by default, as reframing.
        sharpen_prob, sharpen_sigma, sharpen_amount: edge enhancement as CR/DX consoles apply it (unsharp masking:
            the image plus `amount` times itself less its Gaussian blur of `sigma` pixels). Off by default, as
            reframing.
    """

    clahe_prob: float = 0.4
    clahe_clip: tuple[float, float] = (1.0, 6.0)
    clahe_grids: tuple[int, ...] = (4, 8)
    soften_prob: float = 0.25
    soften_blend: tuple[float, float] = (0.3, 0.8)
    soften_sigma: float = 0.1
    gamma_prob: float = 0.3
    gamma: tuple[float, float] = (0.6, 1.6)
    equalize_prob: float = 0.1
    jpeg_prob: float = 0.25
    jpeg_quality: tuple[float, float] = (20.0, 90.0)
    resample_prob: float = 0.25
    resample_min_side: int = 100
    blur_prob: float = 0.15
    blur_sigma: tuple[float, float] = (0.3, 1.5)
    noise_prob: float = 0.2
    noise_std: tuple[float, float] = (0.005, 0.04)
    reframe_prob: float = 0.0
    reframe_share: tuple[float, float] = (0.7, 0.95)
    reframe_rotate_deg: float = 8.0
    marker_prob: float = 0.0
    marker_height: tuple[float, float] = (0.06, 0.18)
    sharpen_prob: float = 0.0
    sharpen_sigma: tuple[float, float] = (0.7, 2.5)
    sharpen_amount: tuple[float, float] = (0.3, 1.5)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict) -> "DomainConfig":
        return cls(**{key: tuple(value) if isinstance(value, list) else value for key, value in values.items()})


def _per_image_uint8(images: torch.Tensor, function) -> torch.Tensor:
    """Run an OpenCV function over (B, 1, H, W) [0, 1] images as uint8 (the CPU path)."""
    grey = (images[:, 0].detach().cpu().numpy() * 255).round().astype(np.uint8)
    done = np.stack([function(image) for image in grey]).astype(np.float32) / 255
    return torch.from_numpy(done).unsqueeze(1).to(images.device, images.dtype)


def clahe(images: torch.Tensor, clip: float, grid: int) -> torch.Tensor:
    if images.is_cuda:
        return equalize_clahe(images.float(), clip_limit=clip, grid_size=(grid, grid))
    operator = cv2.createCLAHE(clipLimit=clip, tileGridSize=(grid, grid))
    return _per_image_uint8(images, operator.apply)


def jpeg(images: torch.Tensor, quality: torch.Tensor) -> torch.Tensor:
    if images.is_cuda:
        return jpeg_codec_differentiable(images.float().expand(-1, 3, -1, -1), quality).mean(1, keepdim=True)
    qualities = iter(quality.round().int().tolist())

    def roundtrip(image: np.ndarray) -> np.ndarray:
        encoded = cv2.imencode(".jpg", image, [cv2.IMWRITE_JPEG_QUALITY, next(qualities)])[1]
        return cv2.imdecode(encoded, cv2.IMREAD_GRAYSCALE)

    return _per_image_uint8(images, roundtrip)


def _chosen(n: int, prob: float, generator: torch.Generator) -> torch.Tensor:
    return torch.nonzero(torch.rand(n, generator=generator) < prob)[:, 0]


def _between(n: int, bounds: tuple[float, float], generator: torch.Generator) -> torch.Tensor:
    return bounds[0] + torch.rand(n, generator=generator) * (bounds[1] - bounds[0])


def domain_augment(images: torch.Tensor, config: DomainConfig, generator: torch.Generator) -> torch.Tensor:
    """Apply the upstream-processing changes of `config` to (B, 1, H, W) images in [0, 1]; returns a new tensor."""
    x = images.clone()
    n, side = x.shape[0], x.shape[-1]

    def update(index: torch.Tensor, function) -> None:
        if len(index):
            device_index = index.to(x.device)
            x[device_index] = function(x[device_index]).clamp(0, 1).to(x.dtype)

    for grid in config.clahe_grids:  # one clip limit per grid-size group keeps CLAHE batched
        clip = float(_between(1, config.clahe_clip, generator))
        update(_chosen(n, config.clahe_prob / len(config.clahe_grids), generator),
               lambda v, grid=grid, clip=clip: clahe(v, clip, grid))
    index = _chosen(n, config.soften_prob, generator)
    blend = _between(len(index), config.soften_blend, generator).view(-1, 1, 1, 1).to(x.device)
    sigma = config.soften_sigma * side
    kernel = 2 * int(3 * sigma) + 1
    update(index, lambda v: v + blend * (gaussian_blur2d(v.float(), kernel, (sigma, sigma)) - v))
    index = _chosen(n, config.gamma_prob, generator)
    low, high = math.log(config.gamma[0]), math.log(config.gamma[1])
    gamma = torch.exp(_between(len(index), (low, high), generator)).to(x.device)
    update(index, lambda v: adjust_gamma(v.float(), gamma))
    update(_chosen(n, config.equalize_prob, generator), lambda v: equalize(v.float()))
    index = _chosen(n, config.jpeg_prob, generator)
    quality = _between(len(index), config.jpeg_quality, generator).to(x.device)
    update(index, lambda v: jpeg(v, quality))
    index = _chosen(n, config.resample_prob, generator)
    small = int(_between(1, (config.resample_min_side, side), generator))
    update(index, lambda v: F.interpolate(F.interpolate(v.float(), size=(small, small), mode="area"), size=(side, side),
                                          mode="bilinear", align_corners=False))
    index = _chosen(n, config.blur_prob, generator)
    sigmas = _between(len(index), config.blur_sigma, generator).view(-1, 1).expand(-1, 2).to(x.device)
    update(index, lambda v: gaussian_blur2d(v.float(), 2 * math.ceil(3 * config.blur_sigma[1]) + 1, sigmas))
    index = _chosen(n, config.noise_prob, generator)
    std = _between(len(index), config.noise_std, generator).view(-1, 1, 1, 1)
    noise = torch.randn((len(index), *x.shape[1:]), generator=generator) * std
    update(index, lambda v: v + noise.to(v.device, v.dtype))
    if config.sharpen_prob > 0:
        index = _chosen(n, config.sharpen_prob, generator)
        sigmas = _between(len(index), config.sharpen_sigma, generator).view(-1, 1).expand(-1, 2).to(x.device)
        amount = _between(len(index), config.sharpen_amount, generator).view(-1, 1, 1, 1).to(x.device)
        kernel = 2 * math.ceil(3 * config.sharpen_sigma[1]) + 1
        update(index, lambda v: v + amount * (v.float() - gaussian_blur2d(v.float(), kernel, sigmas)))
    if config.reframe_prob > 0:
        index = _chosen(n, config.reframe_prob, generator)
        share = _between(len(index), config.reframe_share, generator)
        tilt = (torch.rand(len(index), generator=generator) * 2 - 1) * math.radians(config.reframe_rotate_deg)
        update(index, lambda v: reframe(v, share.to(v.device), tilt.to(v.device)))
    if config.marker_prob > 0:
        index = _chosen(n, config.marker_prob, generator)
        drawn = torch.randint(MARKER_BANK_SIZE, (len(index),), generator=generator)
        bank = marker_bank(side, tuple(config.marker_height), str(x.device))
        update(index, lambda v: burn_markers(v, bank[drawn.to(v.device)]))
    return x


MARKER_BANK_SIZE = 256
MARKER_FONTS = (cv2.FONT_HERSHEY_SIMPLEX, cv2.FONT_HERSHEY_DUPLEX, cv2.FONT_HERSHEY_TRIPLEX)


@functools.lru_cache(maxsize=4)
def marker_bank(side: int, height: tuple[float, float], device: str) -> torch.Tensor:
    """(MARKER_BANK_SIZE, 2, side, side) uint8 lead side markers, drawn once with OpenCV from a fixed seed and kept
    on the device, so that burning them in is one indexing per batch: channel 0 the letter's coverage (0-255,
    anti-aliased), channel 1 the dark box a third of them sit on (0/1). An R or L in one of three fonts, mirrored or
    not (a left knee is mirrored to the canonical side), anywhere in the frame: radiographers put them in a corner,
    but a tight crop brings them beside the joint (`benchmarks/robustness.py`'s `marker_joint` costs most)."""
    rng = np.random.default_rng(0)
    bank = np.zeros((MARKER_BANK_SIZE, 2, side, side), np.uint8)
    for letter_layer, box_layer in bank:
        letter, font = str(rng.choice(["R", "L"])), int(rng.choice(MARKER_FONTS))
        scale = rng.uniform(*height) * side / 22  # Hershey capitals are about 22 px high at scale 1
        thickness = max(1, round(rng.uniform(2.0, 4.0) * scale))
        (width, letter_height), _ = cv2.getTextSize(letter, font, scale, thickness)
        x = int(rng.integers(0, max(1, side - width)))
        y = int(rng.integers(min(letter_height, side - 1), side))
        cv2.putText(letter_layer, letter, (x, y), font, scale, 255, thickness, cv2.LINE_AA)
        if rng.random() < 1 / 3:
            pad = max(1, letter_height // 4)
            box_layer[max(0, y - letter_height - pad):y + pad, max(0, x - pad):x + width + pad] = 1
    mirrored = rng.random(MARKER_BANK_SIZE) < 0.5
    bank[mirrored] = bank[mirrored, :, :, ::-1]
    return torch.from_numpy(bank).to(device)


def burn_markers(images: torch.Tensor, markers: torch.Tensor) -> torch.Tensor:
    """(B, 1, H, W) images with `marker_bank` markers burnt in: the letter at each image's brightest level (lead
    stops the beam) over its box, black."""
    letter = markers[:, :1].to(images.dtype) / 255
    boxed = torch.where(markers[:, 1:] > 0, torch.zeros_like(images), images)
    return torch.maximum(boxed, letter * images.amax(dim=(2, 3), keepdim=True))


def reframe(images: torch.Tensor, share: torch.Tensor, tilt: torch.Tensor,
            padding: str = "reflection") -> torch.Tensor:
    """Centred crops keeping `share` of the side, rotated by `tilt` radians, resized back to the input side. A
    share above 1 frames wider: the image shrinks inside a margin filled by `padding` ("reflection", "border":
    the edge pixels repeated, "zeros": black)."""
    cos, sin, zero = torch.cos(tilt) * share, torch.sin(tilt) * share, torch.zeros_like(share)
    theta = torch.stack([torch.stack([cos, -sin, zero], 1), torch.stack([sin, cos, zero], 1)], 1).to(images.dtype)
    grid = F.affine_grid(theta, list(images.shape), align_corners=False)
    return F.grid_sample(images.float(), grid, mode="bilinear", padding_mode=padding, align_corners=False)
