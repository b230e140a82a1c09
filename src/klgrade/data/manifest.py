"""`klgrade data manifest`: the knees klgrade finds in a dataset, written as the CSV manifest it reads, so that what
no file names (a patient id above all) can be filled in by hand and the manifest given as DATA."""

from __future__ import annotations

import os
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


def write_manifest(data: str | Path, out: str | Path) -> list[Sample]:
    """Write the manifest of `data` to `out` (atomically) and return the knees it lists.

    Raises:
        KLGradeError: `out` exists (a manifest edited by hand is not overwritten).
        DataLayoutError: `data` is no supported layout, or a manifest with a bad row.
    """
    out = Path(out)
    if out.exists():
        raise KLGradeError(f"{out}: exists, not overwritten (a manifest filled in by hand would be lost); remove it "
                           "or choose another --out")
    samples = find_samples(data)
    folder = out.resolve().parent
    write_text_atomic(out, rows_to_csv([manifest_row(sample, folder) for sample in samples], COLUMNS))
    return samples
