"""`klgrade data summary`: what a dataset holds, whether patients leak across splits, which files are unreadable,
and which DICOM headers name a view other than the frontal one KL grades are read on."""

from __future__ import annotations

from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor
from itertools import combinations
from pathlib import Path

from klgrade.constants import NUM_GRADES
from klgrade.data.io import read_radiograph
from klgrade.data.sources import find_samples
from klgrade.errors import ImageReadError
from klgrade.uncertainty import view_reason

UNSPLIT = "all"


def _problems(path: str) -> tuple[str | None, str | None]:
    """Why the file is unreadable, and why its view is not gradable (None where it is fine)."""
    try:
        return None, view_reason(read_radiograph(path).view)
    except ImageReadError as exc:
        return exc.reason, None


def summarize(data: str | Path, check_images: bool = True) -> dict:
    """Counts per split x grade, patients per split, patients shared between splits, unreadable files, files whose
    DICOM header names a lateral, oblique or axial view (training and `evaluate` would take them as frontal)."""
    problems: list[ImageReadError] = []
    samples = find_samples(data, problems)
    by_split = defaultdict(list)
    for sample in samples:
        by_split[sample.split or UNSPLIT].append(sample)
    splits = {}
    for name, members in by_split.items():
        counts = [0] * NUM_GRADES
        for sample in members:
            counts[sample.grade] += 1
        splits[name] = {"counts": counts, "images": len(members), "patients": len({s.patient_id for s in members})}
    overlap = {}
    for first, second in combinations(sorted(by_split), 2):
        shared = {s.patient_id for s in by_split[first]} & {s.patient_id for s in by_split[second]}
        overlap[f"{first}/{second}"] = len(shared)
    unreadable = [{"path": p.path, "reason": p.reason} for p in problems]
    not_frontal = []
    if check_images:
        with ThreadPoolExecutor() as pool:
            found = list(pool.map(_problems, [s.path for s in samples]))
        unreadable += [{"path": s.path, "reason": bad} for s, (bad, _) in zip(samples, found) if bad is not None]
        not_frontal = [{"path": s.path, "reason": view} for s, (_, view) in zip(samples, found) if view is not None]
    return {"data": str(data), "images": len(samples), "splits": splits, "patient_overlap": overlap,
            "unreadable": unreadable, "not_frontal": not_frontal}
