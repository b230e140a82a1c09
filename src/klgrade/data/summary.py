"""`klgrade data summary`: what a dataset holds, whether patients leak across splits, which files are unreadable."""

from __future__ import annotations

from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor
from itertools import combinations
from pathlib import Path

from klgrade.constants import NUM_GRADES
from klgrade.data.io import read_image
from klgrade.data.sources import find_samples
from klgrade.errors import ImageReadError

UNSPLIT = "all"


def _check_readable(path: str) -> str | None:
    try:
        read_image(path)
    except ImageReadError as exc:
        return exc.reason
    return None


def summarize(data: str | Path, check_images: bool = True) -> dict:
    """Counts per split x grade, patients per split, patients shared between splits, unreadable files."""
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
    if check_images:
        with ThreadPoolExecutor() as pool:
            reasons = pool.map(_check_readable, [s.path for s in samples])
            unreadable += [{"path": s.path, "reason": r} for s, r in zip(samples, reasons) if r is not None]
    return {"data": str(data), "images": len(samples), "splits": splits, "patient_overlap": overlap,
            "unreadable": unreadable}
