"""Cumulative-logit (proportional odds) ordinal head that still yields one score per grade.

McCullagh, "Regression Models for Ordinal Data", JRSS-B 1980. The head predicts one severity score s and
K-1 ordered thresholds t_k; P(grade <= k) = sigmoid(t_k - s). It returns the log of the K class
probabilities, so `softmax(output)` gives the probabilities and cross-entropy on the output is the exact
ordinal likelihood: training, metrics and export need no special case. Grad-CAM explains the score s itself.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


class CumulativeLogitHead(nn.Module):
    def __init__(self, in_features: int, num_classes: int):
        super().__init__()
        self.num_classes = num_classes
        self.score = nn.Linear(in_features, 1)
        self.first_threshold = nn.Parameter(torch.tensor(-1.0))
        self.threshold_gaps = nn.Parameter(torch.zeros(num_classes - 2))

    def thresholds(self) -> torch.Tensor:
        """Strictly increasing thresholds (softplus gaps keep the order)."""
        steps = torch.cat([self.first_threshold.view(1), F.softplus(self.threshold_gaps) + 1e-3])
        return torch.cumsum(steps, dim=0)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """Log-probabilities (B, K), computed in log space so that no grade's gradient vanishes.

        With c_k = t_k - s: log P(0) = logsigmoid(c_0); log P(K-1) = logsigmoid(-c_{K-2}); and in between
        log P(k) = log(sigmoid(c_k) - sigmoid(c_{k-1})) = logsigmoid(c_k) + log1mexp(c_{k-1} - c_k) + logsigmoid(-c_{k-1})
        (from sigmoid(a) - sigmoid(b) = sigmoid(a) sigmoid(-b) (1 - e^(b-a))), exact and finite for any score.
        """
        cuts = self.thresholds() - self.score(features)  # (B, K-1)
        upper, lower = cuts[:, 1:], cuts[:, :-1]
        middle = F.logsigmoid(upper) + _log1mexp(lower - upper) + F.logsigmoid(-lower)
        return torch.cat([F.logsigmoid(cuts[:, :1]), middle, F.logsigmoid(-cuts[:, -1:])], dim=1)


def _log1mexp(x: torch.Tensor) -> torch.Tensor:
    """log(1 - exp(x)) for x < 0, stable at both ends (Maechler 2012, "Accurately computing log(1 - exp(-|a|))")."""
    return torch.where(x > -0.6931, torch.log(-torch.expm1(x)), torch.log1p(-torch.exp(x)))
