"""Which knees a checkpoint has seen, so that no score is taken on them unknowingly.

A checkpoint records, per role, keyed 64-bit digests of the patients and of the file contents of the knees it saw:
`trained` (its weights were fitted on them), `chosen` (its epoch was picked on them), `calibrated` (its grade sets
were fitted on them). `klgrade evaluate` and `klgrade calibrate` compare the knees they are given with these
records: a knee counts as seen when its patient or its file's bytes are recorded (another copy or another name of
the same file included). A patient id counts only where it names a person (a kneeKL224/OAI file name, a manifest's
`patient_id`, a DICOM PatientID), not where the file stands for its own patient: `img001.png` of two hospitals are
not one patient.

The digests let anyone who knows a patient id test whether that patient is in a checkpoint's records (short ids can
be tried one by one); they do not list the ids.
"""

from __future__ import annotations

import functools
import hashlib
import os

import numpy as np

from klgrade.data.io import file_version
from klgrade.data.sources import Sample, names_a_patient
from klgrade.errors import DataLayoutError

_KEY = b"klgrade-seen-1"
_CHUNK = 1 << 20


def _digest(data: bytes) -> str:
    return hashlib.blake2b(data, digest_size=8, key=_KEY).hexdigest()


def file_digest(path: str | os.PathLike) -> str:
    """Digest of a file's bytes, kept while the file keeps its size and modification time (a leak check and the
    records of a training run read the same files).

    Raises:
        OSError: the file cannot be read, is not a regular file or is too large to be an image.
    """
    return _file_digest(*file_version(path))


@functools.lru_cache(maxsize=1 << 17)
def _file_digest(path: str, size: int, mtime_ns: int) -> str:
    """The digest itself (read in chunks: a DICOM may be large); `size` and `mtime_ns` only key the cache."""
    hasher = hashlib.blake2b(digest_size=8, key=_KEY)
    with open(path, "rb") as handle:
        while chunk := handle.read(_CHUNK):
            hasher.update(chunk)
    return hasher.hexdigest()


def patient_digest(sample: Sample) -> str | None:
    """Digest of the sample's patient, or None where it names no patient (the file is its own)."""
    if not names_a_patient(sample):
        return None
    return _digest(b"patient:" + sample.patient_id.encode("utf-8"))


def knee_record(samples: list[Sample]) -> dict[str, list[str]]:
    """The record of a set of knees (JSON-ready, sorted, so equal sets give equal records)."""
    patients = {patient_digest(s) for s in samples} - {None}
    return {"patients": sorted(patients), "files": sorted({readable_digest(s.path) for s in samples} - {None})}


def readable_digest(path: str) -> str | None:
    """The file's digest, or None where it cannot be read (such a file shows nothing to anyone)."""
    try:
        return file_digest(path)
    except OSError:
        return None


def merge_records(records: list[dict[str, list[str]]]) -> dict[str, list[str]]:
    """One record of the knees any of `records` holds (an ensemble has seen what any member has)."""
    return {kind: sorted(set().union(*(r.get(kind, ()) for r in records))) for kind in ("patients", "files")}


def seen_knees(record: dict[str, list[str]], samples: list[Sample]) -> np.ndarray:
    """(N,) True for each sample whose patient or file `record` holds. An unreadable file counts as unseen."""
    patients, files = set(record.get("patients", ())), set(record.get("files", ()))
    seen = np.zeros(len(samples), dtype=bool)
    for index, sample in enumerate(samples):
        seen[index] = patient_digest(sample) in patients or (bool(files) and readable_digest(sample.path) in files)
    return seen


def unseen_knees(record: dict[str, list[str]], samples: list[Sample], what: str, holder: str, purpose: str
                 ) -> tuple[list[Sample], list[str]]:
    """The samples whose knees `record` does not hold, and a warning saying how many were left out, if any (a figure
    on them would score knees, or the other knee, of people the model has been shown).

    Args:
        what: names the samples in messages (a path); holder: what `record` is the record of ("the train split");
        purpose: what no knee would be left for ("score that it was not trained on").

    Raises:
        DataLayoutError: no knee left.
    """
    seen = seen_knees(record, samples)
    if not seen.any():
        return samples, []
    found = (f"{seen.sum()} of {len(samples)} knees are in {holder} (the same patient or the same file, e.g. "
             f"{samples[int(np.flatnonzero(seen)[0])].path})")
    if seen.all():
        raise DataLayoutError(f"{what}: {found}: no knee left to {purpose}")
    kept = [sample for sample, was_seen in zip(samples, seen) if not was_seen]
    return kept, [f"{what}: {found}: left out, the other {len(kept)} kept"]


def copy_groups(samples: list[Sample]) -> list[list[int]]:
    """The indices of the samples whose files have the same bytes (a manifest row listed twice, a copy under another
    name or grade folder), one list per image held more than once, in listing order. Unreadable files are in none."""
    holders: dict[str, list[int]] = {}
    for index, sample in enumerate(samples):
        digest = readable_digest(sample.path)
        if digest is not None:
            holders.setdefault(digest, []).append(index)
    return [indices for indices in holders.values() if len(indices) > 1]


def distinct_knees(samples: list[Sample], what: str) -> tuple[list[Sample], list[str]]:
    """Each image once, for a figure or a calibration that counts each knee once: of files with the same bytes
    (`copy_groups`) the first is kept where all carry one grade, none where their grades differ (which is right is
    unknown); a warning says how many were left out. Unreadable files are kept (reading them reports them).

    Raises:
        DataLayoutError: naming `what`: no file left (every one a copy of another grade's).
    """
    repeated, conflicting = [], []
    for indices in copy_groups(samples):
        if len({samples[i].grade for i in indices}) > 1:
            conflicting += indices
        else:
            repeated += indices[1:]
    if not repeated and not conflicting:
        return samples, []
    left_out = set(repeated) | set(conflicting)
    kept = [sample for index, sample in enumerate(samples) if index not in left_out]
    if not kept:
        raise DataLayoutError(f"{what}: every file shares its bytes with a file of another grade: no knee left")
    warnings = []
    if repeated:
        warnings.append(f"{what}: {len(repeated)} file(s) repeat the bytes of another (a row listed twice or a copy, "
                        f"e.g. {samples[min(repeated)].path}): each image counted once")
    if conflicting:
        warnings.append(f"{what}: {len(conflicting)} file(s) share their bytes with a file of another grade (e.g. "
                        f"{samples[min(conflicting)].path}): left out, their grade is unknown")
    return kept, warnings


def shared_knees(first: list[Sample], second: list[Sample]) -> list[Sample]:
    """The samples of `second` that are knees of `first` too: the same patient, or the same file's bytes."""
    return [sample for sample, seen in zip(second, seen_knees(knee_record(first), second)) if seen]


def check_unshared(first: list[Sample], second: list[Sample], what: str, advice: str = "") -> None:
    """Refuse two sets of knees that share a patient or a file (a leak: a figure on the second would score knees,
    or the other knee, of people the first has shown).

    Raises:
        DataLayoutError: naming `what`, the count and up to three of the shared files of `second`, then `advice`.
    """
    shared = shared_knees(first, second)
    if shared:
        examples = ", ".join(s.path for s in shared[:3])
        raise DataLayoutError(f"{what} share {len(shared)} knee(s) (the same patient or the same file), e.g. "
                              f"{examples}{'; ' + advice if advice else ''}")
