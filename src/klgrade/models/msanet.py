"""Multi-scale attention network (`msa_net`) for Kellgren-Lawrence grading.

A timm CNN backbone feeds a Feature Pyramid Network (Lin et al., "Feature Pyramid Networks for Object
Detection", CVPR 2017, https://arxiv.org/abs/1612.03144); every pyramid level is recalibrated by
squeeze-and-excitation (Hu et al., "Squeeze-and-Excitation Networks", CVPR 2018,
https://arxiv.org/abs/1709.01507, timm's `SEModule`); a pre-norm transformer block (multi-head self-attention
with 2-D sin-cos positional encoding, then an MLP) relates distant regions of the coarsest level, e.g. the
medial and lateral compartments; each level is pooled and the concatenation is classified.
Each component can be switched off (`fpn`, `se`, `attention`) so ablations are one flag away. With
`normaliser=True` a learned processing normaliser (`klgrade.models.normaliser`) sits in front of the backbone.
"""

from __future__ import annotations

import timm
import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import Mlp, SEModule, build_sincos2d_pos_embed

from klgrade.constants import NUM_GRADES
from klgrade.models.normaliser import ProcessingNormaliser


class FeaturePyramid(nn.Module):
    """Lateral 1x1 convs to a common width, top-down nearest upsampling + add, 3x3 smoothing."""

    def __init__(self, in_channels: list[int], width: int):
        super().__init__()
        self.lateral = nn.ModuleList(nn.Conv2d(c, width, 1) for c in in_channels)
        self.smooth = nn.ModuleList(
            nn.Sequential(nn.Conv2d(width, width, 3, padding=1, bias=False), nn.BatchNorm2d(width), nn.ReLU(inplace=True))
            for _ in in_channels
        )

    def forward(self, features: list[torch.Tensor]) -> list[torch.Tensor]:
        laterals = [conv(f) for conv, f in zip(self.lateral, features)]
        for i in range(len(laterals) - 1, 0, -1):
            laterals[i - 1] = laterals[i - 1] + F.interpolate(laterals[i], size=laterals[i - 1].shape[-2:], mode="nearest")
        return [smooth(x) for smooth, x in zip(self.smooth, laterals)]


class TopLevelProjection(nn.Module):
    """Without FPN: only the last backbone stage, projected to the common width (the ablation baseline)."""

    def __init__(self, in_channels: list[int], width: int):
        super().__init__()
        self.project = nn.Sequential(nn.Conv2d(in_channels[-1], width, 1, bias=False), nn.BatchNorm2d(width), nn.ReLU(inplace=True))

    def forward(self, features: list[torch.Tensor]) -> list[torch.Tensor]:
        return [self.project(features[-1])]


class SpatialSelfAttention(nn.Module):
    """Pre-norm transformer block over the H*W tokens of a feature map, residual in both halves."""

    def __init__(self, dim: int, heads: int, mlp_ratio: float = 2.0, dropout: float = 0.0):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = nn.MultiheadAttention(dim, heads, dropout=dropout, batch_first=True)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), drop=dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        tokens = x.flatten(2).transpose(1, 2)
        position = build_sincos2d_pos_embed([h, w], dim=c, device=x.device, dtype=x.dtype)
        query = self.norm1(tokens + position)
        tokens = tokens + self.attn(query, query, query, need_weights=False)[0]
        tokens = tokens + self.mlp(self.norm2(tokens))
        return tokens.transpose(1, 2).reshape(b, c, h, w)


class MultiScaleAttentionNet(nn.Module):
    """Backbone -> FPN -> SE per level -> self-attention on the coarsest level -> pooled fusion head.

    Args:
        num_classes: number of grades.
        in_chans: image channels (1 for radiographs).
        backbone: any timm CNN name that supports `features_only`.
        levels: how many of the last backbone stages feed the pyramid (3 = C3..C5, 4 = C2..C5).
        width: channels of every pyramid level.
        heads: attention heads.
        fpn, se, attention: switch each component off for ablations.
        drop_rate: dropout before the classifier.
        normaliser: map other upstream processing back to the training images' look first (identity until trained).
        normaliser_detail: the normaliser also undoes sharpening, blur and noise (a detail gain; needs `normaliser`).
    """

    def __init__(self, num_classes: int = NUM_GRADES, in_chans: int = 1, backbone: str = "resnet18", levels: int = 3,
                 width: int = 128, heads: int = 4, fpn: bool = True, se: bool = True, attention: bool = True,
                 drop_rate: float = 0.2, normaliser: bool = False, normaliser_detail: bool = False,
                 pretrained: bool = False):
        super().__init__()
        if normaliser_detail and not normaliser:
            raise ValueError("normaliser_detail needs normaliser")
        if levels < 1 or width < 1 or heads < 1:
            raise ValueError("levels, width and heads must each be at least 1")
        if attention and width % heads:
            raise ValueError(f"width {width} must be a multiple of heads {heads} (each head attends over "
                             "width / heads channels)")
        self.normaliser = ProcessingNormaliser(detail=normaliser_detail) if normaliser else nn.Identity()
        try:
            self.backbone = timm.create_model(backbone, features_only=True, in_chans=in_chans, pretrained=pretrained,
                                              out_indices=tuple(range(-levels, 0)))
        except IndexError:
            raise ValueError(f"levels {levels}: backbone {backbone} has fewer feature levels") from None
        in_channels = self.backbone.feature_info.channels()
        self.neck = FeaturePyramid(in_channels, width) if fpn else TopLevelProjection(in_channels, width)
        n_levels = levels if fpn else 1
        self.recalibrate = nn.ModuleList((SEModule(width, rd_ratio=1 / 8) if se else nn.Identity()) for _ in range(n_levels))
        self.attention = SpatialSelfAttention(width, heads) if attention else nn.Identity()
        self.level_outputs = nn.ModuleList(nn.Identity() for _ in range(n_levels))  # hook points for Grad-CAM
        self.num_features = width * n_levels
        self.head_drop = nn.Dropout(drop_rate)
        self.fc = nn.Linear(self.num_features, num_classes)

    def forward_features(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Pyramid levels after SE and attention, finest first: [(B, width, H/8, W/8), ...]."""
        levels = [se(level) for se, level in zip(self.recalibrate, self.neck(self.backbone(self.normaliser(x))))]
        levels[-1] = self.attention(levels[-1])
        return [output(level) for output, level in zip(self.level_outputs, levels)]

    def forward_head(self, levels: list[torch.Tensor], pre_logits: bool = False) -> torch.Tensor:
        pooled = torch.cat([level.mean(dim=(2, 3)) for level in levels], dim=1)
        pooled = self.head_drop(pooled)
        return pooled if pre_logits else self.fc(pooled)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))

    def get_classifier(self) -> nn.Module:
        return self.fc

    def gradcam_layers(self) -> list[list[nn.Module]]:
        """Layer sets for Grad-CAM, tried in order until one shows positive evidence: the pyramid levels below
        the top, then every level (as the head pools them, after SE and attention).

        The logits are linear in the levels' mean-pooled features, so the signed per-level maps summed over
        all levels decompose the explained score over the image exactly. Measured on kneeKL224 val
        (benchmarks/gradcam_faithfulness.py, docs/results.md), the fine levels alone point better where the
        evidence for KL0-KL3 is (deletion test), but the shipped model scores KL4 through the coarsest level
        only, so their map is empty there; then every level is explained, and no grade gets an empty map.
        """
        levels = list(self.level_outputs)
        return [levels[:-1], levels] if len(levels) > 1 else [levels]
