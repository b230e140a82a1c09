"""Find labelled samples in the layouts knee-radiograph datasets come in.

Supported:
- `split/grade/image` (kneeKL224: `train/0/9003175L.png`, splits train/val/test/auto_test),
- a single split in `grade/image` layout,
- grade folders named like `0Normal`, `1Doubtful`, ... `4Severe`,
- a CSV manifest with columns `path,grade[,patient_id,side]` (paths relative to the CSV).
"""

from __future__ import annotations

import csv
import re
from dataclasses import dataclass
from pathlib import Path

from klgrade.constants import GRADE_NAMES, NUM_GRADES
from klgrade.errors import DataLayoutError

SPLITS = ("train", "val", "test", "auto_test")
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".dcm", ".dicom"}
_GRADE_DIR = re.compile(r"^([0-9])(?:[ _-]?(" + "|".join(GRADE_NAMES) + r"))?$", re.IGNORECASE)
_KNEE_NAME = re.compile(r"^(\d{7})(?:([LR])|_\d+)?", re.IGNORECASE)


@dataclass(frozen=True)
class Sample:
    """One labelled radiograph. `patient_id` groups both knees (and repeats) of a person."""

    path: str
    grade: int
    patient_id: str
    side: str | None = None
    split: str | None = None


def parse_knee_name(path: str | Path) -> tuple[str, str | None]:
    """Patient id and knee side from a kneeKL224 file name.

    `9003175L.png` -> ("9003175", "L"); `9001104_1.png` -> ("9001104", None). Names that do not start
    with the 7-digit OAI id fall back to the file stem as patient id, so each such file is its own group.
    """
    stem = Path(path).stem
    match = _KNEE_NAME.match(stem)
    if match is None:
        return stem, None
    side = match.group(2)
    return match.group(1), side.upper() if side else None


def grade_from_dir(name: str) -> int | None:
    """Grade encoded by a folder name (`3`, `3Moderate`), or None when the name is not a grade folder."""
    match = _GRADE_DIR.match(name)
    if match is None:
        return None
    grade = int(match.group(1))
    if grade >= NUM_GRADES:
        raise DataLayoutError(f"{name}: grade folder outside 0-{NUM_GRADES - 1}")
    return grade


def is_image_file(path: Path) -> bool:
    """An image by its suffix, or an extension-less DICOM file (as PACS exports name them, e.g. IMG0001)."""
    if path.name.startswith(".") or not path.is_file():
        return False
    if path.suffix.lower() in IMAGE_SUFFIXES:
        return True
    if path.suffix:
        return False
    with path.open("rb") as handle:
        return handle.read(132)[128:] == b"DICM"


def find_samples(data: str | Path) -> list[Sample]:
    """All labelled samples under `data` (a split root, a single split folder, or a CSV manifest).

    Raises:
        DataLayoutError: the path is missing, a folder name is not a grade, a label is outside 0-4,
            or a manifest row names a missing file.
    """
    root = Path(data)
    if not root.exists():
        raise DataLayoutError(f"{root}: no such file or folder")
    if root.is_file():
        if root.suffix.lower() != ".csv":
            raise DataLayoutError(f"{root}: expected a folder or a CSV manifest")
        return _from_manifest(root)
    subdirs = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not subdirs:
        raise DataLayoutError(f"{root}: no grade or split folders inside")
    split_dirs = [p for p in subdirs if p.name in SPLITS]
    if split_dirs:
        others = [p.name for p in subdirs if p.name not in SPLITS]
        if others:
            raise DataLayoutError(f"{root}: unknown folder(s) {others} beside the splits {list(SPLITS)}")
        return [s for d in split_dirs for s in _from_grade_dirs(d, split=d.name)]
    return _from_grade_dirs(root, split=None)


def _from_grade_dirs(root: Path, split: str | None) -> list[Sample]:
    samples = []
    for sub in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")):
        grade = grade_from_dir(sub.name)
        if grade is None:
            raise DataLayoutError(
                f"{sub}: folder name is not a KL grade (expected 0-{NUM_GRADES - 1}, e.g. '2' or '2Minimal')"
            )
        for path in sorted(sub.iterdir()):
            if is_image_file(path):
                patient, side = parse_knee_name(path)
                samples.append(Sample(str(path), grade, patient, side, split))
    if not samples:
        raise DataLayoutError(f"{root}: no images found in grade folders")
    return samples


def _from_manifest(csv_path: Path) -> list[Sample]:
    samples = []
    with csv_path.open(newline="") as handle:
        reader = csv.DictReader(handle)
        if reader.fieldnames is None or not {"path", "grade"} <= set(reader.fieldnames):
            raise DataLayoutError(f"{csv_path}: manifest needs a header with at least 'path,grade'")
        for line, row in enumerate(reader, start=2):
            path = Path(row["path"])
            if not path.is_absolute():
                path = csv_path.parent / path
            try:
                grade = int(row["grade"])
            except (TypeError, ValueError):
                raise DataLayoutError(f"{csv_path}:{line}: grade {row['grade']!r} is not an integer") from None
            if not 0 <= grade < NUM_GRADES:
                raise DataLayoutError(f"{csv_path}:{line}: grade {grade} outside 0-{NUM_GRADES - 1}")
            if not path.is_file():
                raise DataLayoutError(f"{csv_path}:{line}: file {path} does not exist")
            parsed_patient, parsed_side = parse_knee_name(path)
            patient = (row.get("patient_id") or "").strip() or parsed_patient
            side = (row.get("side") or "").strip().upper() or parsed_side
            samples.append(Sample(str(path), grade, patient, side, row.get("split") or None))
    if not samples:
        raise DataLayoutError(f"{csv_path}: manifest lists no images")
    return samples


def select_split(samples: list[Sample], split: str) -> list[Sample]:
    """Samples of one split; a clear error when the data has no such split."""
    chosen = [s for s in samples if s.split == split]
    if not chosen:
        found = sorted({s.split for s in samples if s.split})
        raise DataLayoutError(f"no '{split}' split in the data (found: {found or 'a single unsplit folder'})")
    return chosen
