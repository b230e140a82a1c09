"""Cumulative-logit (proportional odds) ordinal head that still yields one score per grade.

McCullagh, "Regression Models for Ordinal Data", JRSS-B 1980. The head predicts one severity score s and
K-1 ordered thresholds t_k; P(grade <= k) = sigmoid(t_k - s). It returns the log of the K class
probabilities, so `softmax(output)` gives the probabilities and cross-entropy on the output is the exact
ordinal likelihood: training, metrics, Grad-CAM and export need no special case.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


class CumulativeLogitHead(nn.Module):
    def __init__(self, in_features: int, num_classes: int):
        super().__init__()
        self.score = nn.Linear(in_features, 1)
        self.first_threshold = nn.Parameter(torch.tensor(-1.0))
        self.threshold_gaps = nn.Parameter(torch.zeros(num_classes - 2))

    def thresholds(self) -> torch.Tensor:
        """Strictly increasing thresholds (softplus gaps keep the order)."""
        steps = torch.cat([self.first_threshold.view(1), F.softplus(self.threshold_gaps) + 1e-3])
        return torch.cumsum(steps, dim=0)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        cumulative = torch.sigmoid(self.thresholds() - self.score(features))  # (B, K-1): P(y <= k)
        ones = torch.ones_like(cumulative[:, :1])
        zeros = torch.zeros_like(cumulative[:, :1])
        probabilities = torch.cat([cumulative, ones], 1) - torch.cat([zeros, cumulative], 1)
        return torch.log(probabilities.clamp_min(1e-7))
