"""`klgrade data summary`: what a dataset holds, whether patients leak across splits, which files are unreadable,
which are not gradable as they are (a DICOM header naming a view other than the frontal one KL grades are read
on, too few pixels or grey levels): training and `evaluate` would take them as any other; and which are graded with
a note about their preparation (an image not square, squeezed to the square; a burnt-in mark painted out; an image
that looks unenhanced, CLAHE-enhanced)."""

from __future__ import annotations

from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor
from itertools import combinations
from pathlib import Path

from klgrade.constants import NUM_GRADES
from klgrade.data.io import read_radiograph
from klgrade.data.preprocess import PreprocessConfig, prepare_image
from klgrade.data.provenance import copy_groups, knee_record
from klgrade.data.sources import find_samples
from klgrade.data.splits import unnamed_knees, unnamed_patients_warning
from klgrade.errors import ImageReadError

UNSPLIT = "all"


def _problems(path: str) -> tuple[str | None, list[str], list[str]]:
    """Why the file is unreadable (None where it is not), why it is not gradable as it is (`PreparedImage.
    reasons`: the same checks `klgrade predict` makes; empty where it is) and what its answer will note about
    preparing it (`PreparedImage.notes`)."""
    try:
        radiograph = read_radiograph(path)
    except ImageReadError as exc:
        return exc.reason, [], []
    prepared = prepare_image(radiograph.grey, PreprocessConfig())
    return None, prepared.reasons(radiograph), prepared.notes()


def summarize(data: str | Path, check_images: bool = True) -> dict:
    """Counts per split x grade, patients per split and the knees among them that name no patient
    (`unnamed_knees`: each its own, which `warnings` says), files per split that copy another of its files
    (`copies`) and that share their bytes with a file of another grade (`copies_of_two_grades`: no reference grade),
    patients and identical files shared between splits (a patient id counts where it names a person:
    `data.provenance`), unreadable files, files not gradable as they are, with their reasons (a lateral,
    oblique or axial view, too few pixels or grey levels), files gradable whose answers will carry a note
    (`noted`: an image not square, a burnt-in mark painted out, an image that looks unenhanced), and files in the
    grade folders that are no image klgrade reads (`not_read`)."""
    problems: list[ImageReadError] = []
    not_read: list[tuple[str | None, str]] = []
    samples = find_samples(data, problems, not_read)
    by_split = defaultdict(list)
    for sample in samples:
        by_split[sample.split or UNSPLIT].append(sample)
    splits = {}
    for name, members in by_split.items():
        counts = [0] * NUM_GRADES
        for sample in members:
            counts[sample.grade] += 1
        groups = copy_groups(members)
        splits[name] = {"counts": counts, "images": len(members), "patients": len({s.patient_id for s in members}),
                        "unnamed_knees": len(unnamed_knees(members)),
                        "copies": sum(len(group) - 1 for group in groups),
                        "copies_of_two_grades": sum(len(group) for group in groups
                                                    if len({members[i].grade for i in group}) > 1)}
    records = {name: knee_record(members) for name, members in by_split.items()}
    overlap, file_overlap = {}, {}
    for first, second in combinations(sorted(by_split), 2):
        for counts, kind in ((overlap, "patients"), (file_overlap, "files")):
            counts[f"{first}/{second}"] = len(set(records[first][kind]) & set(records[second][kind]))
    unreadable = [{"path": p.path, "reason": p.reason} for p in problems]
    not_gradable, noted = [], []
    if check_images:
        with ThreadPoolExecutor() as pool:
            found = list(pool.map(_problems, [s.path for s in samples]))
        unreadable += [{"path": s.path, "reason": bad} for s, (bad, _, _) in zip(samples, found) if bad is not None]
        not_gradable = [{"path": s.path, "reasons": reasons} for s, (_, reasons, _) in zip(samples, found) if reasons]
        noted = [{"path": s.path, "notes": notes} for s, (_, reasons, notes) in zip(samples, found)
                 if notes and not reasons]
    return {"data": str(data), "images": len(samples), "splits": splits, "patient_overlap": overlap,
            "file_overlap": file_overlap, "unreadable": unreadable, "not_gradable": not_gradable, "noted": noted,
            "not_read": [path for _, path in not_read], "warnings": unnamed_patients_warning(samples, str(data))}
