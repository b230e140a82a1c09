"""Patient-grouped, grade-stratified k-fold splits: both knees of a person, and every copy of a file, land in one
fold."""

from __future__ import annotations

import functools
import logging
import warnings

import numpy as np
from sklearn.model_selection import StratifiedGroupKFold

from klgrade.constants import NUM_GRADES
from klgrade.data.provenance import copy_groups
from klgrade.data.sources import Sample
from klgrade.errors import DataLayoutError

log = logging.getLogger(__name__)


def knee_groups(samples: list[Sample]) -> tuple[str, ...]:
    """The group of each sample that folds keep together: its patient, joined with every patient holding a file of
    the same bytes (a copy under another name, or under another grade, must not sit on both sides of a fold)."""
    parent: dict[str, str] = {}

    def root(patient: str) -> str:
        while parent.get(patient, patient) != patient:
            patient = parent[patient]
        return patient

    for group in copy_groups(samples):
        first = samples[group[0]].patient_id
        for index in group[1:]:
            parent[root(samples[index].patient_id)] = root(first)
    return tuple(root(s.patient_id) for s in samples)


def patient_folds(samples: list[Sample], folds: int = 5, seed: int = 0) -> list[np.ndarray]:
    """Index arrays of the held-out samples of each fold (deterministic for a given seed), cut by `knee_groups`.

    Raises:
        DataLayoutError: fewer patients than folds.
    """
    groups = knee_groups(samples)
    if len(set(groups)) < folds:
        raise DataLayoutError(f"{len(set(groups))} patients cannot fill {folds} folds")
    return [np.array(held_out) for held_out in _held_out_indices(groups, tuple(s.grade for s in samples), folds, seed)]


@functools.lru_cache(maxsize=8)
def _held_out_indices(groups: tuple[str, ...], grades: tuple[int, ...], folds: int,
                      seed: int) -> tuple[tuple[int, ...], ...]:
    """StratifiedGroupKFold's held-out indices, kept: it takes about a second on kneeKL224's train split, and a
    protocol asks for the same folds for every training, its held-out predictions and its leak check."""
    counts = np.bincount(grades, minlength=NUM_GRADES)
    scarce = [grade for grade in range(NUM_GRADES) if 0 < counts[grade] < folds]
    if scarce:
        log.warning("KL %s: fewer knees than the %d folds (%s): some folds hold none of them",
                    ", ".join(map(str, scarce)), folds, ", ".join(str(counts[grade]) for grade in scarce))
    splitter = StratifiedGroupKFold(n_splits=folds, shuffle=True, random_state=seed)
    with warnings.catch_warnings():  # said above, in klgrade's words
        warnings.filterwarnings("ignore", message="The least populated class", category=UserWarning)
        return tuple(tuple(held_out.tolist())
                     for _, held_out in splitter.split(np.zeros(len(groups)), np.array(grades), np.array(groups)))


def fold_split(samples: list[Sample], fold: int, folds: int = 5, seed: int = 0) -> tuple[list[Sample], list[Sample]]:
    """(train, held-out) samples of fold `fold` (0-based)."""
    if not 0 <= fold < folds:
        raise DataLayoutError(f"fold {fold} outside 0-{folds - 1}")
    held_out = set(patient_folds(samples, folds, seed)[fold].tolist())
    train = [s for i, s in enumerate(samples) if i not in held_out]
    return train, [samples[i] for i in sorted(held_out)]
