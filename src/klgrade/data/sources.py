"""Find labelled samples in the layouts knee-radiograph datasets come in.

Supported:
- `split/grade/image` (kneeKL224: `train/0/9003175L.png`, splits train/val/test/auto_test, also named
  `Training`, `valid`, `validation`, `testing`),
- a single split in `grade/image` layout (images also in folders inside the grade folders, at any depth),
- grade folders named like `0Normal`, `1Doubtful`, ... `4Severe`, or `KL0`, `KL_1`, `Grade 2`,
- a CSV manifest with columns `path,grade[,patient_id,side]` (paths relative to the CSV; UTF-8, with or
  without the byte-order mark Excel writes).

A sample's patient is the manifest's `patient_id`, else the OAI id of a kneeKL224 file name, else a DICOM file's
PatientID (pseudonymised: `dicom-` and a keyed digest, so no output names the person), else the file itself
(`file:<its path in the data>`). A PatientID that more than `PLACEHOLDER_FILES` files share is an anonymiser's
placeholder, not a person: those files stay their own patients (and a warning says so). A sample's knee side is the
manifest's `side`, else the file name's (`9003175L`), else the DICOM header's (`data.io.dicom_side`).

Problems with single entries (a bad manifest row, an unlistable grade folder) either stop the search
(`problems=None`, for training, which needs every label) or are collected and the rest is still found (for
`evaluate` and `data summary`, which report them and exit non-zero).
"""

from __future__ import annotations

import csv
import functools
import hashlib
import io
import logging
import os
import re
import warnings
from collections import Counter
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from klgrade.constants import GRADE_NAMES, NUM_GRADES
from klgrade.data.io import FORMATS_READ, dicom_side, file_version, regular_file_problem
from klgrade.errors import DataLayoutError, ImageReadError

log = logging.getLogger(__name__)

SPLITS = ("train", "val", "test", "auto_test")
NOT_IMAGES = {"DICOMDIR", "THUMBS.DB", "DESKTOP.INI"}
"""Files found beside images that hold none (a DICOM export's index, what Windows leaves), by upper-case name."""
SPLIT_ALIASES = {"training": "train", "valid": "val", "validation": "val", "testing": "test"}
"""Other names datasets give their splits."""
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".jp2", ".j2k", ".bmp", ".tif", ".tiff", ".dcm", ".dicom"}
_SCALE_NAME = r"(?:KL|grade)[ _-]?"
"""How datasets prefix a grade: `KL3`, `KL_3`, `Grade 3`."""
_GRADE_DIR = re.compile(rf"^(?:{_SCALE_NAME})?([0-9])(?:[ _-]?(" + "|".join(GRADE_NAMES) + r"))?$", re.IGNORECASE)
_GRADE_PREFIX = re.compile(rf"^{_SCALE_NAME}", re.IGNORECASE)
_KNEE_NAME = re.compile(r"^(\d{7})(?:([LR])|_\d+)?", re.IGNORECASE)


@dataclass(frozen=True)
class Sample:
    """One labelled radiograph. `patient_id` groups both knees (and repeats) of a person."""

    path: str
    grade: int
    patient_id: str
    side: str | None = None
    split: str | None = None


def parse_knee_name(path: str | Path) -> tuple[str | None, str | None]:
    """Patient id and knee side from a kneeKL224 file name.

    `9003175L.png` -> ("9003175", "L"); `9001104_1.png` -> ("9001104", None); a name that does not start with
    the 7-digit OAI id names no patient: (None, None).
    """
    match = _KNEE_NAME.match(os.path.splitext(os.path.basename(path))[0])
    if match is None:
        return None, None
    side = match.group(2)
    return match.group(1), side.upper() if side else None


FILE_PATIENT = "file:"
"""Prefix of the patient id of a file that names no patient: `file:<its path in the data>`, its own patient (not
the stem, which `0/1.png` and `1/1.png` share)."""


def own_patient(where: str) -> str:
    """The patient id of a file that names no patient, from its path in the data."""
    return FILE_PATIENT + where


def names_a_patient(sample: Sample) -> bool:
    """Whether the sample's patient id names a person (a manifest's, an OAI name's, a DICOM header's), not a file."""
    return not sample.patient_id.startswith(FILE_PATIENT)


PLACEHOLDER_FILES = 24
"""A DICOM PatientID shared by more files than this (both knees at 12 visits) stands for no one in particular."""


def _may_be_dicom(path: str) -> bool:
    suffix = os.path.splitext(path)[1].lower()
    return suffix in (".dcm", ".dicom") or not suffix


def with_dicom_headers(samples: list[Sample]) -> list[Sample]:
    """The samples, completed from their DICOM headers: a patient for those that name none (the PatientID,
    pseudonymised, unless it is a placeholder many files share), a side for those without one (files named by
    UIDs, as PACS exports them, name neither)."""
    candidates = [i for i, s in enumerate(samples) if (not names_a_patient(s) or s.side is None)
                  and _may_be_dicom(s.path)]
    if not candidates:
        return samples
    headers = {i: _dicom_header(samples[i].path) for i in candidates}
    patients = {i: patient for i, (patient, _) in headers.items() if patient and not names_a_patient(samples[i])}
    shared = Counter(patients.values())
    placeholders = sorted(patient for patient, files in shared.items() if files > PLACEHOLDER_FILES)
    if placeholders:
        _warn_once(f"DICOM PatientID(s) shared by {', '.join(str(shared[patient]) for patient in placeholders)} files "
                   "each taken for an anonymiser's placeholder, not a patient: those files count as one patient each "
                   "(give patient ids in a manifest's patient_id column)")
    named = {i: patient for i, patient in patients.items() if patient not in placeholders}
    samples = list(samples)
    for index, (_, side) in headers.items():
        sample = samples[index]
        samples[index] = replace(sample, patient_id=named.get(index, sample.patient_id), side=sample.side or side)
    return samples


@functools.lru_cache(maxsize=64)
def _warn_once(message: str) -> None:
    """Said once per process (a protocol lists its data many times)."""
    log.warning(message)


def _dicom_header(path: str) -> tuple[str | None, str | None]:
    """(`dicom-<digest of the PatientID>`, knee side), each None where the file is no readable DICOM or its header
    is silent."""
    try:
        return _dicom_header_of(*file_version(path))
    except OSError:
        return None, None


@functools.lru_cache(maxsize=1 << 17)
def _dicom_header_of(path: str, size: int, mtime_ns: int) -> tuple[str | None, str | None]:
    """The header read (`size` and `mtime_ns` only key the cache: a protocol lists its data many times)."""
    import pydicom

    try:
        with warnings.catch_warnings():  # a malformed header is reported when the image is read
            warnings.simplefilter("ignore")
            header = pydicom.dcmread(path, stop_before_pixels=True,
                                     specific_tags=["PatientID", "ImageLaterality", "Laterality"])
        patient, side = str(header.get("PatientID", "") or "").strip(), dicom_side(header)
    except Exception:  # not DICOM, or broken: decoding it reports why
        return None, None
    if not patient:
        return None, side
    digest = hashlib.blake2b(patient.encode("utf-8"), digest_size=8, key=b"klgrade-patient").hexdigest()
    return "dicom-" + digest, side


def grade_from_dir(folder: Path) -> int | None:
    """Grade encoded by a folder's name (`3`, `3Moderate`, `KL3`, `grade_3`), or None when the name is not a grade
    folder."""
    match = _GRADE_DIR.match(folder.name)
    if match is None:
        return None
    grade = int(match.group(1))
    if grade >= NUM_GRADES:
        raise DataLayoutError(f"{folder}: grade folder outside 0-{NUM_GRADES - 1}")
    return grade


def is_image_file(path: Path | os.DirEntry) -> bool:
    """An image by its suffix, or an extension-less DICOM file (as PACS exports name them, e.g. IMG0001; not their
    index, DICOMDIR).

    Entries with an image suffix count even when they are not regular files (a pipe, a broken link): reading
    them then reports the problem instead of skipping them in silence. An extension-less file that cannot
    be opened counts too, for the same reason. An entry of a folder listing (`os.DirEntry`) says whether it is a
    folder without a stat per file, which made listing kneeKL224 take twice as long.
    """
    if path.name.startswith(".") or path.name.upper() in NOT_IMAGES or _is_folder(path):
        return False
    if os.path.splitext(path.name)[1].lower() in IMAGE_SUFFIXES:
        return True
    path = Path(path)
    if path.suffix or regular_file_problem(path) is not None:
        return False
    try:
        with path.open("rb") as handle:
            return handle.read(132)[128:] == b"DICM"
    except OSError:
        return True


def _is_folder(path: Path | os.DirEntry) -> bool:
    try:
        return path.is_dir()
    except OSError:  # an entry that cannot be looked at is not a folder to skip: reading it reports why
        return False


def _problem(problems: list[ImageReadError] | None, where: str | Path, reason: str) -> None:
    """Stop (`problems` is None) or note the problem and go on."""
    if problems is None:
        raise DataLayoutError(f"{where}: {reason}")
    problems.append(ImageReadError(where, reason))


def _list_folder(folder: Path, problems: list[ImageReadError] | None) -> list[os.DirEntry]:
    try:
        with os.scandir(folder) as entries:
            return sorted(entries, key=lambda entry: entry.name)
    except OSError as exc:
        _problem(problems, folder, f"cannot list folder ({exc.strerror or exc})")
        return []


def _subfolders(folder: Path) -> list[Path]:
    """The folders in `folder` (hidden ones left out), by name."""
    return [Path(entry.path) for entry in _list_folder(folder, None)
            if not entry.name.startswith(".") and Path(entry.path).is_dir()]


def split_name(folder: str) -> str | None:
    """The split a folder name stands for (`SPLITS`, also `Training`, `valid`, `validation`, `testing`, any case),
    or None."""
    name = folder.lower()
    return SPLIT_ALIASES.get(name, name if name in SPLITS else None)


def find_samples(data: str | Path, problems: list[ImageReadError] | None = None,
                 not_read: list[tuple[str | None, str]] | None = None) -> list[Sample]:
    """All labelled samples under `data` (a split root, a single split folder, or a CSV manifest).

    Args:
        problems: None = any bad entry stops the search; a list = bad entries (manifest rows, unlistable
            folders) are appended to it as `ImageReadError(location, reason)` and the others still found.
        not_read: a list receives the files in grade folders that are no image klgrade reads, left out, each with
            its split (for the caller to report); None = a warning is logged saying how many.

    Raises:
        DataLayoutError: the path is missing, a folder name is not a grade, nothing is found, or (with
            `problems=None`) a bad entry.
    """
    root = Path(data)
    if not root.exists():
        raise DataLayoutError(f"{root}: no such file or folder")
    if not root.is_dir():
        problem = regular_file_problem(root)  # a pipe: nothing to list, and a manifest's paths are relative to it
        if problem is not None:
            raise DataLayoutError(f"{root}: {problem}")
        if root.suffix.lower() != ".csv":
            raise DataLayoutError(f"{root}: expected a folder or a CSV manifest")
        return with_dicom_headers(_from_manifest(root, problems))
    subdirs = _subfolders(root)
    if not subdirs:
        raise DataLayoutError(f"{root}: no grade or split folders inside")
    split_dirs = {p: split_name(p.name) for p in subdirs if split_name(p.name)}
    if split_dirs:
        others = [p.name for p in subdirs if p not in split_dirs]
        if others:
            raise DataLayoutError(f"{root}: unknown folder(s) {others} beside the splits {list(SPLITS)}")
        names = list(split_dirs.values())
        twice = sorted(p.name for p, name in split_dirs.items() if names.count(name) > 1)
        if twice:
            raise DataLayoutError(f"{root}: folders {twice} name one split")
        found = [s for d, name in split_dirs.items() for s in _from_grade_dirs(d, name, problems, not_read)]
        return with_dicom_headers(found)
    return with_dicom_headers(_from_grade_dirs(root, None, problems, not_read))


def _found_nothing(where: Path, what: str, refused: list[ImageReadError]) -> DataLayoutError:
    """The error for a search that found no sample, naming the first entry it refused (the likely reason)."""
    detail = f" ({len(refused)} refused, the first: {refused[0]})" if refused else ""
    return DataLayoutError(f"{where}: {what}{detail}")


def not_read_warning(where: str | Path, paths: list[str]) -> str:
    """What is said of the files beside the images that are left out (they may be knees in a format of their own)."""
    return (f"{where}: left out {len(paths)} file(s) that are no image klgrade reads ({FORMATS_READ}), "
            f"e.g. {min(paths)}")


def _from_grade_dirs(root: Path, split: str | None, problems: list[ImageReadError] | None,
                     not_read: list[tuple[str | None, str]] | None) -> list[Sample]:
    samples, skipped, known_problems = [], [], len(problems or [])
    for sub in _subfolders(root):
        grade = grade_from_dir(sub)
        if grade is None:
            raise DataLayoutError(
                f"{sub}: folder name is not a KL grade (expected 0-{NUM_GRADES - 1}, e.g. '2', '2Minimal' or 'KL2')"
            )
        images, others = files_below(sub, problems)
        skipped += others
        for path, inside in images:
            patient, side = parse_knee_name(os.path.basename(path))
            inside = f"{sub.name}/{inside}"
            samples.append(Sample(path, grade, patient or own_patient(f"{split}/{inside}" if split else inside),
                                  side, split))
    if not samples:
        other_files = f"; {not_read_warning(root, skipped)}" if skipped else ""
        raise _found_nothing(root, "no images found in grade folders" + other_files, (problems or [])[known_problems:])
    if not_read is not None:
        not_read += [(split, path) for path in skipped]
    elif skipped:  # a set scored without them says so
        log.warning(not_read_warning(root, skipped))
    return samples


def files_below(folder: Path, problems: list[ImageReadError] | None) -> tuple[list[tuple[str, str]], list[str]]:
    """The image files in `folder` and in its folders at any depth (a PACS export files each patient's images in
    folders of their own), each with its path inside `folder` ("/"-separated), by that path; and the other files
    (not hidden, not `NOT_IMAGES`). A folder reached again through a link is not listed twice."""
    found, others, seen, pending = [], [], set(), [(str(folder), "")]
    while pending:
        current, inside = pending.pop()
        real = os.path.realpath(current)
        if real in seen:
            continue
        seen.add(real)
        for entry in _list_folder(Path(current), problems):
            if is_image_file(entry):
                found.append((entry.path, inside + entry.name))
            elif entry.name.startswith("."):
                continue
            elif _is_folder(entry):
                pending.append((entry.path, f"{inside}{entry.name}/"))
            elif entry.name.upper() not in NOT_IMAGES:
                others.append(entry.path)
    return sorted(found, key=lambda item: item[1]), others


MANIFEST_COLUMNS = ("path", "grade", "patient_id", "side", "split")
"""The columns a manifest's rows are read from; any other is named in a warning (a `patient` column is no
`patient_id`: read silently past, its knees were grouped by their file names)."""

EXTRA_FIELDS = "<extra fields>"
"""Where a row's fields beyond the header's columns are kept, to be refused unless blank."""


def column_key(name: str) -> str:
    """A manifest column's name as read: any case, spaces or hyphens for underscores (`Patient ID` = `patient_id`)."""
    return re.sub(r"[\s-]+", "_", name.strip().lower())


MANIFEST_DELIMITERS = ",;\t"
"""What may separate a manifest's fields: Excel writes `;` where the decimal mark is a comma, and a tab as text."""


def _manifest_rows(csv_path: Path) -> list[dict]:
    """The rows of a UTF-8 manifest (an Excel byte-order mark is fine), checked for the needed header. Its fields are
    separated by whichever of `MANIFEST_DELIMITERS` its header holds most of, and its column names are read in any
    case (`Path,Grade`). Bytes that are no UTF-8 are taken only in a path that names a file by them (Linux allows
    any bytes in a name; `data manifest` writes such a name as its bytes); anywhere else the manifest was saved in
    another encoding."""
    problem = regular_file_problem(csv_path)
    if problem is not None:
        raise DataLayoutError(f"{csv_path}: {problem}")
    not_utf8 = DataLayoutError(f"{csv_path}: manifest is not UTF-8 text (save it as CSV UTF-8)")
    try:
        text = csv_path.read_bytes().decode("utf-8-sig", errors="surrogateescape")
        reader = csv.DictReader(io.StringIO(text, newline=""),
                                delimiter=max(MANIFEST_DELIMITERS, key=text.partition("\n")[0].count))
        rows = list(reader)
    except (OSError, csv.Error) as exc:
        raise DataLayoutError(f"{csv_path}: cannot read manifest ({exc})") from None
    header = [name.strip() for name in reader.fieldnames or []]
    if _UNDECODED.search(" ".join(header)):
        raise not_utf8
    keys = [column_key(name) for name in header]
    if not {"path", "grade"} <= set(keys):
        raise DataLayoutError(f"{csv_path}: manifest needs a header with at least 'path,grade' (found {header})")
    twice = sorted({key for key in keys if keys.count(key) > 1})
    if twice:  # the later column's values would stand, the earlier's be dropped
        raise DataLayoutError(f"{csv_path}: columns {[name for name, key in zip(header, keys) if key in twice]} name "
                              f"one column ({', '.join(twice)})")
    unread = [name for name, key in zip(header, keys) if key not in MANIFEST_COLUMNS]
    if unread:
        _warn_once(f"{csv_path}: column(s) {', '.join(map(repr, unread))} not read (klgrade reads "
                   f"{', '.join(MANIFEST_COLUMNS)})")
    rows = [{(column_key(key) if key is not None else EXTRA_FIELDS): value for key, value in row.items()}
            for row in rows]
    if _UNDECODED.search(text) and any(_UNDECODED.search(str(value)) and not (
            key == "path" and os.path.lexists(_manifest_path(csv_path, value.strip())))
            for row in rows for key, value in row.items()):
        raise not_utf8
    return rows


_UNDECODED = re.compile("[\udc80-\udcff]")
"""A byte that is no UTF-8, as `errors="surrogateescape"` decodes it."""


def parse_grade(text: str | None) -> int:
    """A grade from a manifest cell: `3`, ` 3 `, `3.0`, `KL3`, `KL 3`, `grade 3`; ValueError for anything else or
    outside 0-4."""
    value = float(_GRADE_PREFIX.sub("", (text or "").strip()))
    if not value.is_integer() or not 0 <= value < NUM_GRADES:
        raise ValueError(text)
    return int(value)


SIDE_WORDS = {"L": "L", "LEFT": "L", "R": "R", "RIGHT": "R"}
"""How a manifest may name a knee's side (any case)."""


def parse_side(text: str | None) -> str | None:
    """A knee side from a manifest cell: `L`, `left`, ` Right ` -> "L" / "R"; None for an empty cell; ValueError
    for anything else (a side kept as an unknown word would leave a left knee unmirrored)."""
    word = (text or "").strip().upper()
    if word and word not in SIDE_WORDS:
        raise ValueError(text)
    return SIDE_WORDS.get(word)


def _manifest_path(csv_path: Path, text: str) -> Path:
    """A manifest's path, relative to the manifest's folder unless absolute. One written on Windows (`img\\a.png`)
    is read with forward slashes where no file has the name as written."""
    path = csv_path.parent / text  # an absolute `text` stands alone
    if os.sep == "/" and "\\" in text and not path.exists():
        forward = csv_path.parent / text.replace("\\", "/")
        if forward.exists():
            return forward
    return path


def _from_manifest(csv_path: Path, problems: list[ImageReadError] | None) -> list[Sample]:
    samples, known_problems = [], len(problems or [])
    for line, row in enumerate(_manifest_rows(csv_path), start=2):
        where = f"{csv_path}:{line}"
        if not (row.get("path") or "").strip() or row.get("grade") is None:
            _problem(problems, where, "row has fewer fields than the header (needs path and grade)")
            continue
        extra = [value for value in row.get(EXTRA_FIELDS, []) if value.strip()]
        if extra:
            _problem(problems, where, f"row has more fields than the header names (no column for "
                                      f"{', '.join(map(repr, extra))}; quote a path that holds the separator)")
            continue
        try:
            grade = parse_grade(row["grade"])
        except ValueError:
            _problem(problems, where, f"grade {row['grade']!r} is not a KL grade 0-{NUM_GRADES - 1}")
            continue
        path = _manifest_path(csv_path, row["path"].strip())
        if not path.exists() and not path.is_symlink():
            _problem(problems, where, f"file {path} does not exist")
            continue
        try:
            side = parse_side(row.get("side"))
        except ValueError:
            _problem(problems, where, f"side {row['side'].strip()!r} is not L or R (left or right)")
            continue
        parsed_patient, parsed_side = parse_knee_name(path)
        patient = (row.get("patient_id") or "").strip() or parsed_patient or own_patient(row["path"].strip())
        side = side or parsed_side
        split = (row.get("split") or "").strip()  # named as a split folder may be (`Training`, `validation`)
        samples.append(Sample(str(path), grade, patient, side, split_name(split) or split or None))
    if not samples:
        raise _found_nothing(csv_path, "manifest lists no images", (problems or [])[known_problems:])
    return samples


def select_split(samples: list[Sample], split: str) -> list[Sample]:
    """Samples of one split; a clear error when the data has no such split."""
    chosen = [s for s in samples if s.split == split]
    if not chosen:
        found = sorted({s.split for s in samples if s.split})
        raise DataLayoutError(f"no '{split}' split in the data (found: {found or 'a single unsplit folder'})")
    return chosen


def limit_samples(samples: list[Sample], limit: int | None, seed: int) -> list[Sample]:
    """A seeded random subset of at most `limit` samples, in the original order."""
    if limit is None or limit >= len(samples):
        return samples
    keep = np.sort(np.random.default_rng(seed).permutation(len(samples))[:limit])
    return [samples[i] for i in keep]
