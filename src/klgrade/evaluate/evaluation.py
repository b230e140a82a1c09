"""`klgrade evaluate`: checkpoints (or the shipped model) against a labelled folder, image by image."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from klgrade.constants import NUM_GRADES
from klgrade.data.cache import decode_all
from klgrade.data.sources import Sample, find_samples
from klgrade.errors import DataLayoutError, ImageReadError
from klgrade.metrics import compute_metrics, fit_temperature
from klgrade.infer.predictor import Predictor

log = logging.getLogger(__name__)

EVAL_SPLIT_ORDER = ("test", "val", "auto_test")
"""With a split root, the split evaluated when none is named: the held-out test set first."""
BATCH = 64


@dataclass
class Evaluation:
    metrics: dict
    samples: list[Sample]
    probabilities: np.ndarray
    failures: list[ImageReadError]


def pick_split(samples: list[Sample], split: str | None) -> list[Sample]:
    names = {s.split for s in samples}
    if names == {None}:
        if split:
            raise DataLayoutError(f"--split {split}: the data is a single folder without splits")
        return samples
    chosen = split or next((name for name in EVAL_SPLIT_ORDER if name in names), None)
    if chosen is None or chosen not in names:
        raise DataLayoutError(f"no split to evaluate (found {sorted(n for n in names if n)}); name one with --split")
    return [s for s in samples if s.split == chosen]


def predict_samples(predictor: Predictor, samples: list[Sample]) -> tuple[np.ndarray, list[bool], list[ImageReadError]]:
    """Probabilities for every readable sample; (probabilities of readable ones, readable mask, failures)."""
    images, failures = decode_all(samples, predictor.preprocess)
    failed = {f.path for f in failures}
    readable = [s.path not in failed for s in samples]
    return batched_probabilities(predictor, images[np.array(readable, dtype=bool)]), readable, failures


def batched_probabilities(predictor: Predictor, images: np.ndarray) -> np.ndarray:
    """(N, H, W) uint8 images -> (N, 5) probabilities, `BATCH` images per forward pass."""
    if not len(images):
        return np.zeros((0, NUM_GRADES))
    return np.concatenate([predictor.probabilities(images[i:i + BATCH]) for i in range(0, len(images), BATCH)])


def calibrate(predictor: Predictor, data: str | Path, split: str | None = None) -> float:
    """Fit the predictor's temperature on a labelled validation set (Guo et al. 2017); returns it."""
    samples = pick_split(find_samples(data), split)
    predictor.temperature = 1.0
    probabilities, readable, _ = predict_samples(predictor, samples)
    labels = [s.grade for s, ok in zip(samples, readable) if ok]
    predictor.temperature = fit_temperature(np.log(np.clip(probabilities, 1e-12, None)), labels)
    return predictor.temperature


def evaluate(predictor: Predictor, data: str | Path, split: str | None = None, n_boot: int = 1000,
             seed: int = 0) -> Evaluation:
    """Metrics of `predictor` on the labelled images of `data` (unreadable images are reported, not scored)."""
    problems: list[ImageReadError] = []
    samples = pick_split(find_samples(data, problems), split)
    probabilities, readable, failures = predict_samples(predictor, samples)
    failures = problems + failures
    scored = [s for s, ok in zip(samples, readable) if ok]
    if not scored:
        raise DataLayoutError(f"{data}: no readable image to evaluate")
    metrics = compute_metrics([s.grade for s in scored], probabilities, groups=[s.patient_id for s in scored],
                              n_boot=n_boot, seed=seed)
    metrics["model"] = predictor.name
    metrics["tta"] = predictor.tta
    metrics["temperature"] = predictor.temperature
    return Evaluation(metrics, scored, probabilities, failures)
