"""Grad-CAM (Selvaraju et al., ICCV 2017, https://arxiv.org/abs/1610.02391) via captum's `LayerGradCam`.

The explained layer is the model's own choice (`klgrade.models.gradcam_layer`): for msa_net the finest
pyramid level after SE, for the baselines their last feature stage. Heatmaps are upsampled to the input
size and scaled to [0, 1] per image.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from captum.attr import LayerGradCam
from matplotlib import colormaps
from PIL import Image, ImageDraw, ImageFont

from klgrade.models import gradcam_layer

OVERLAY_SIDE = 448
"""Side (pixels) of the saved overlay: twice the network input, readable on screen."""
HEATMAP_ALPHA = 0.45
JOINT_BAND = (0.3, 0.7)
"""Rows (fraction of crop height) that hold the tibiofemoral joint space in centred knee crops."""


def gradcam(model: nn.Module, inputs: torch.Tensor, targets: torch.Tensor) -> np.ndarray:
    """Heatmaps (B, H, W) in [0, 1] for the given target grades; the model is left in eval mode."""
    model.eval()
    explainer = LayerGradCam(model, gradcam_layer(model))
    with torch.enable_grad():
        attribution = explainer.attribute(inputs.float(), target=targets.tolist(), relu_attributions=True)
    maps = F.interpolate(attribution.detach().float(), size=inputs.shape[-2:], mode="bilinear", align_corners=False)
    maps = maps[:, 0].clamp_min(0)
    peak = maps.flatten(1).amax(dim=1).clamp_min(1e-12).view(-1, 1, 1)
    return (maps / peak).cpu().numpy()


def joint_fraction(heatmap: np.ndarray, band: tuple[float, float] = JOINT_BAND) -> float:
    """Share of the heatmap's mass that falls in the central horizontal band holding the joint space."""
    height = heatmap.shape[0]
    top, bottom = int(round(band[0] * height)), int(round(band[1] * height))
    total = float(heatmap.sum())
    return float(heatmap[top:bottom].sum()) / total if total > 0 else 0.0


def overlay(image_uint8: np.ndarray, heatmap: np.ndarray, caption: str) -> Image.Image:
    """Radiograph with the heatmap blended on top and a caption bar (e.g. 'KL 3  p=0.81')."""
    grey = Image.fromarray(image_uint8).convert("RGB").resize((OVERLAY_SIDE, OVERLAY_SIDE), Image.BILINEAR)
    heat = (colormaps["jet"](heatmap)[..., :3] * 255).astype(np.uint8)
    heat = Image.fromarray(heat).resize((OVERLAY_SIDE, OVERLAY_SIDE), Image.BILINEAR)
    blended = Image.blend(grey, heat, HEATMAP_ALPHA)
    bar_height = OVERLAY_SIDE // 10
    canvas = Image.new("RGB", (OVERLAY_SIDE, OVERLAY_SIDE + bar_height), "black")
    canvas.paste(blended, (0, 0))
    draw = ImageDraw.Draw(canvas)
    font = ImageFont.load_default(size=bar_height * 3 // 5)
    draw.text((10, OVERLAY_SIDE + bar_height // 6), caption, fill="white", font=font)
    return canvas
