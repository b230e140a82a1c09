"""Grad-CAM (Selvaraju et al., ICCV 2017, https://arxiv.org/abs/1610.02391) via captum's `LayerGradCam`.

The explained layers are the model's own choice (`klgrade.models.gradcam_layers`): sets of layers tried in
order until one shows positive evidence, the last set being one through which all of the evidence flows (for
msa_net every pyramid level as the head pools it, their signed maps summed before the ReLU; for the baselines
their last stage). No grade can then be scored by a path that no map can show. What is explained is the predicted
grade's logit; for an ordinal (cumulative-logit) model it is the severity score, signed towards the grade
(`-s` for KL0, `+s` otherwise), because the log-probability of a confident end grade has no gradient.

A map with no positive evidence at all is reported as empty (`Explanation.empty`), never drawn as a picture
of nothing. Heatmaps are upsampled to the input size, smoothed slightly while still signed (the coarsest
level's cells are 32 px: where its negative evidence was clamped to zero, the map showed their square edges),
and scaled to [0, 1] per image (min to max of the positive evidence, as pytorch-grad-cam does, so that a map
positive everywhere still shows its peaks).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image, ImageDraw, ImageFont
from PIL.PngImagePlugin import PngInfo

from klgrade.constants import HEATMAP_MARK
from klgrade.models import gradcam_layers, ordinal_head

OVERLAY_SIDE = 448
"""Side (pixels) of the saved overlay: twice the network input, readable on screen."""
CAPTION_MARGIN = 8
"""Pixels left free either side of the caption's rows."""
HEATMAP_ALPHA = 0.6
"""Opacity of the colour map where the evidence is strong."""
FADE_BELOW = 0.3
"""Heat (of 1) below which the colour map fades out linearly: the radiograph shows where the evidence is weak."""
JOINT_BAND = (0.3, 0.7)
"""Rows (fraction of crop height) that hold the tibiofemoral joint space in centred knee crops."""
SMOOTHING = 1 / 20
"""Standard deviation of the Gaussian that smooths the signed map, as a share of the input side (8 px at 160 px)."""
EMPTY_RATIO = 1e-3
"""A map whose largest positive value is below this share of its largest absolute value shows no evidence."""
EXPLANATION_EMPTY = "explanation empty: no image region raised the score of this grade"


@dataclass
class Explanation:
    """Grad-CAM maps (B, H, W) in [0, 1] and, per image, whether the map is empty."""

    maps: np.ndarray
    empty: np.ndarray


def explained_scores(model: nn.Module):
    """The function Grad-CAM differentiates: (B, 1, H, W) -> (B, K) scores, one per grade.

    Classification models: their logits. Ordinal models: the severity score s of the cumulative-logit head,
    as -s for grade 0 and +s for the others (the evidence for "healthier" and for "more severe").
    """
    head = ordinal_head(model)
    if head is None:
        return model

    def severity(x: torch.Tensor) -> torch.Tensor:
        captured = []
        handle = head.register_forward_hook(lambda module, inputs, output: captured.append(inputs[0]))
        try:
            model(x)
        finally:
            handle.remove()
        score = head.score(captured[0])  # (B, 1)
        return torch.cat([-score, score.expand(-1, head.num_classes - 1)], dim=1)

    return severity


def signed_gradcam(model: nn.Module, inputs: torch.Tensor, targets: torch.Tensor,
                   layers: list[nn.Module]) -> torch.Tensor:
    """(B, H, W): the signed Grad-CAM maps of `layers`, upsampled to the input size and summed."""
    from captum.attr import LayerGradCam  # here, not at the top: ~1.5 s of start-up that grading alone never needs

    scores = explained_scores(model)
    total = torch.zeros(inputs.shape[0], *inputs.shape[-2:])
    with torch.enable_grad():
        for layer in layers:
            signed = LayerGradCam(scores, layer).attribute(inputs.float(), target=targets.tolist(),
                                                           relu_attributions=False).detach().float().cpu()
            total += F.interpolate(signed, size=inputs.shape[-2:], mode="bilinear", align_corners=False)[:, 0]
    return total


def is_empty(signed: torch.Tensor) -> torch.Tensor:
    """(B,) True where a signed map holds no positive evidence worth showing."""
    return signed.clamp_min(0).flatten(1).amax(dim=1) <= EMPTY_RATIO * signed.abs().flatten(1).amax(dim=1)


def smooth(signed: torch.Tensor, share: float = SMOOTHING) -> torch.Tensor:
    """(B, H, W) signed maps blurred by a Gaussian of `share` times the side (edges replicated)."""
    from kornia.filters import gaussian_blur2d  # here, as captum above

    sigma = share * signed.shape[-1]
    kernel = 2 * math.ceil(3 * sigma) + 1
    return gaussian_blur2d(signed[:, None], kernel, (sigma, sigma), border_type="replicate")[:, 0]


def gradcam(model: nn.Module, inputs: torch.Tensor, targets: torch.Tensor) -> Explanation:
    """Grad-CAM of the given target grades (positive evidence, scaled to [0, 1]); the model is left in eval mode.

    The model's layer sets are tried in order; an image whose map is empty gets the next set's map.
    """
    model.eval()
    inputs, targets = inputs.float(), torch.as_tensor(targets)
    smoothed = torch.zeros(inputs.shape[0], *inputs.shape[-2:])
    pending = torch.ones(inputs.shape[0], dtype=torch.bool)
    for layers in gradcam_layers(model):
        index = pending.nonzero()[:, 0]
        smoothed[index] = smooth(signed_gradcam(model, inputs[index.to(inputs.device)], targets[index], layers))
        pending[index] = is_empty(smoothed[index])  # judged as shown: a speck the smoothing dissolves shows nothing
        if not pending.any():
            break
    positive = smoothed.clamp_min(0)
    low = positive.flatten(1).amin(dim=1).view(-1, 1, 1)  # evidence everywhere: show where it is strongest
    maps = (positive - low) / (positive.flatten(1).amax(dim=1).view(-1, 1, 1) - low).clamp_min(1e-12)
    return Explanation(maps.numpy(), pending.numpy())


def joint_fraction(heatmap: np.ndarray, band: tuple[float, float] = JOINT_BAND) -> float:
    """Share of the heatmap's mass that falls in the central horizontal band holding the joint space."""
    height = heatmap.shape[0]
    top, bottom = int(round(band[0] * height)), int(round(band[1] * height))
    total = float(heatmap.sum())
    return float(heatmap[top:bottom].sum()) / total if total > 0 else 0.0


def save_overlay_png(picture: Image.Image, target) -> None:
    """Save an `overlay` as PNG to a path or a binary file, marked with `HEATMAP_MARK`."""
    marked = PngInfo()
    marked.add_text(*HEATMAP_MARK)
    picture.save(target, format="PNG", pnginfo=marked)


def overlay(image_uint8: np.ndarray, heatmap: np.ndarray | None, caption: str) -> Image.Image:
    """Radiograph with the heatmap blended on top and a caption bar, one line per caption line (`!` lines,
    the warnings, in yellow). The colour map's opacity follows the heat (`FADE_BELOW`), so the anatomy stays
    readable where the evidence is weak.

    An empty (all-zero) or missing heatmap leaves the radiograph as it is: the caption says why.
    """
    from matplotlib import colormaps  # here, as captum above

    side = (OVERLAY_SIDE, OVERLAY_SIDE)
    grey = Image.fromarray(image_uint8).convert("RGB").resize(side, Image.BILINEAR)
    picture = grey
    if heatmap is not None and heatmap.max() > 0:
        heat = np.asarray(Image.fromarray(heatmap.astype(np.float32)).resize(side, Image.BILINEAR)).clip(0, 1)
        colours = colormaps["jet"](heat)[..., :3] * 255
        opacity = HEATMAP_ALPHA * np.clip(heat / FADE_BELOW, 0, 1)[..., None]
        picture = Image.fromarray((np.asarray(grey) * (1 - opacity) + colours * opacity).round().astype(np.uint8))
    line_height = OVERLAY_SIDE // 14
    font = ImageFont.load_default(size=line_height * 3 // 4)
    lines = [(row, "yellow" if line.startswith("!") else "white") for line in caption.splitlines() or [""]
             for row in _wrapped(line, font, OVERLAY_SIDE - 2 * CAPTION_MARGIN)]
    canvas = Image.new("RGB", (OVERLAY_SIDE, OVERLAY_SIDE + line_height * len(lines) + line_height // 3), "black")
    canvas.paste(picture, (0, 0))
    draw = ImageDraw.Draw(canvas)
    for i, (row, colour) in enumerate(lines):
        draw.text((CAPTION_MARGIN, OVERLAY_SIDE + line_height // 6 + i * line_height), row, fill=colour, font=font)
    return canvas


def _wrapped(line: str, font: ImageFont.FreeTypeFont, width: int) -> list[str]:
    """`line` broken between words into rows no wider than `width` pixels in `font` (a warning is a sentence or
    two: one row cut it off at the image's edge); a word wider than that alone on its row, cut by the edge."""
    rows: list[str] = []
    for word in line.split(" "):
        if rows and font.getlength(f"{rows[-1]} {word}") <= width:
            rows[-1] = f"{rows[-1]} {word}"
        else:
            rows.append(word)
    return rows or [""]
