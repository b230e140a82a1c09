"""Helpers shared by the tests: paths, a synthetic image, copies of real data, and running the CLI as a user."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pydicom
from PIL import Image
from pydicom.dataset import FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage, generate_uid

REPO = Path(__file__).resolve().parents[1]
DATA = (REPO / ".." / "shared" / "data" / "kneeKL224").resolve()
EXAMPLES = REPO / "examples"


def knee_image(seed: int = 0, size: int = 64) -> np.ndarray:
    """A synthetic grey image with structure (not a radiograph; for I/O tests only)."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:size, 0:size]
    return (128 + 60 * np.sin(x / 5.0 + seed) + rng.normal(0, 10, (size, size))).clip(0, 255).astype(np.uint8)


def copy_real_images(source: Path, target: Path, per_grade: int, split: str = "val") -> list[Path]:
    """Copy `per_grade` real kneeKL224 images of each grade into `target/<grade>/`."""
    copied = []
    for grade in range(5):
        folder = target / str(grade)
        folder.mkdir(parents=True, exist_ok=True)
        for path in sorted((source / split / str(grade)).iterdir())[:per_grade]:
            destination = folder / path.name
            destination.write_bytes(path.read_bytes())
            copied.append(destination)
    return copied


def run_cli(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    """Run the installed `klgrade` command as a user would."""
    return subprocess.run([sys.executable, "-m", "klgrade", *args], capture_output=True, text=True, timeout=timeout)


def save(image: Image.Image, path: Path, **kwargs) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path, **kwargs)
    return path


def write_dicom(path, pixels, photometric, slope=1.0, intercept=0.0, window=None):
    """A 16-bit DICOM radiograph with patient fields (which klgrade must never return or log)."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = pydicom.Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
    ds.PatientName, ds.PatientID, ds.Modality = "Doe^Jane", "SECRET-42", "CR"
    ds.Rows, ds.Columns = pixels.shape
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, photometric
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    ds.RescaleSlope, ds.RescaleIntercept = slope, intercept
    if window is not None:
        ds.WindowCenter, ds.WindowWidth = window
    ds.PixelData = pixels.astype(np.uint16).tobytes()
    ds.save_as(path, enforce_file_format=True)
    return path
