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
from klgrade.data.sources import Sample, names_a_patient
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


def unnamed_knees(samples: list[Sample]) -> list[Sample]:
    """The samples that name no patient (`sources.names_a_patient`), but for copies of a named knee's file, which are
    that knee (`knee_groups`)."""
    if all(names_a_patient(sample) for sample in samples):
        return []
    groups = knee_groups(samples)
    named = {group for group, sample in zip(groups, samples) if names_a_patient(sample)}
    return [sample for group, sample in zip(groups, samples) if group not in named]


def unnamed_patients_warning(samples: list[Sample], what: str) -> list[str]:
    """A warning saying how many knees of `what` name no patient (`unnamed_knees`), if any: each is then a patient of
    its own, so folds and the checks between sets keep a person's knees together only where they are the same file,
    and patient-level intervals resample them as independent people (figures that can look better than they are)."""
    unnamed = unnamed_knees(samples)
    if not unnamed:
        return []
    return [f"{what}: {len(unnamed)} of {len(samples)} knees name no patient (no manifest patient_id, OAI id in the "
            f"file name or DICOM PatientID; e.g. {unnamed[0].path}): each counts as a patient of its own, so one "
            f"person's knees or visits may be split between folds or sets and intervals take them as independent; "
            f"give patient ids in a manifest's patient_id column (`klgrade data manifest` writes one to fill in)"]


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
