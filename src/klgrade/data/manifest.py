"""`klgrade data manifest`: the knees klgrade finds in a dataset, written as the CSV manifest it reads, so that what
no file names (a patient id above all) can be filled in by hand and the manifest given as DATA."""

from __future__ import annotations

import os
from dataclasses import replace
from pathlib import Path

from klgrade.data.sources import Sample, find_samples, names_a_patient
from klgrade.errors import KLGradeError
from klgrade.files import rows_to_csv, write_text_atomic

COLUMNS = ["path", "grade", "patient_id", "side", "split"]
"""The manifest's columns (`data.sources`), in this order."""


def manifest_row(sample: Sample, folder: Path) -> dict:
    """One knee as a manifest row: its path relative to the manifest's `folder` (absolute where there is no relative
    one, another drive), its patient where one is named (blank where the file is its own: to be filled in), its side
    and split as found."""
    try:
        path = os.path.relpath(sample.path, folder)
    except ValueError:
        path = os.path.abspath(sample.path)
    return {"path": path.replace(os.sep, "/"), "grade": sample.grade,
            "patient_id": sample.patient_id if names_a_patient(sample) else "", "side": sample.side or "",
            "split": sample.split or ""}


def with_folder_patient(sample: Sample, data: Path) -> Sample:
    """A knee that names no patient, with the name of its first folder below the grade folder in the folder layout
    `data` as its patient (a PACS export files each patient's images in a folder of their own:
    `2/PAT0042/STUDY1/IMG0001`); as it is when it names one, or lies in the grade folder itself."""
    parts = Path(os.path.relpath(sample.path, data)).parts
    below_grade = parts[2:] if sample.split else parts[1:]  # split/grade/... or grade/...
    if names_a_patient(sample) or len(below_grade) < 2:
        return sample
    return replace(sample, patient_id=below_grade[0])


def write_manifest(data: str | Path, out: str | Path, patient_from_folder: bool = False) -> list[Sample]:
    """Write the manifest of `data` to `out` (atomically) and return the knees it lists.

    Args:
        patient_from_folder: a knee that names no patient gets its folder's name as its patient
            (`with_folder_patient`), for the user to check before the manifest is used.

    Raises:
        KLGradeError: `out` exists (a manifest edited by hand is not overwritten), or `patient_from_folder` with a
            manifest as `data` (its patients are its patient_id column).
        DataLayoutError: `data` is no supported layout, or a manifest with a bad row.
    """
    out, data = Path(out), Path(data)
    if out.is_dir():
        raise KLGradeError(f"{out}: --out names a folder; give a file name such as {out / 'knees.csv'}")
    if out.exists():
        raise KLGradeError(f"{out}: exists, not overwritten (a manifest filled in by hand would be lost); remove it "
                           "or choose another --out")
    if patient_from_folder and data.is_file():
        raise KLGradeError(f"{data}: --patient-from-folder reads the folders of a folder layout; a manifest names its "
                           "patients in its patient_id column")
    samples = find_samples(data)
    if patient_from_folder:
        samples = [with_folder_patient(sample, data) for sample in samples]
    folder = out.resolve().parent
    write_text_atomic(out, rows_to_csv([manifest_row(sample, folder) for sample in samples], COLUMNS))
    return samples
