"""Helpers shared by the tests: paths, a synthetic image, copies of real data, and running the CLI as a user (or in
the test process, sparing an interpreter's start-up)."""

from __future__ import annotations

import importlib.util
import logging
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


def script_module(relative_path: str):
    """A script of the repository (benchmarks/, tools/) imported as a module, so tests use exactly its functions."""
    path = REPO / relative_path
    spec = importlib.util.spec_from_file_location(f"script_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def benchmark_framings() -> dict:
    """`benchmarks/robustness.py`'s framings (name -> function of a grey image): tests grade exactly what it grades."""
    return script_module("benchmarks/robustness.py").framings()


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


def save_msa_net(path: Path, model, options: dict, size: int) -> Path:
    """Save `model` (an msa_net built with `options`) as a checkpoint fed `size`-px images."""
    from klgrade.models import save_checkpoint

    info = {"model": {"name": "msa_net", "num_classes": 5, "in_chans": 1, "ordinal": False, "options": options},
            "preprocess": {"size": size, "clip_percentiles": [0.5, 99.5], "clahe": False, "canonical_side": False},
            "val_metrics": {"accuracy": 0.2}}
    return save_checkpoint(path, model, info)


def mirroring_left_knees(checkpoint: Path, path: Path) -> Path:
    """A copy of `checkpoint` at `path` whose preprocessing mirrors left knees (`canonical_side`): the knee side it
    is given changes what it sees."""
    from klgrade.models import load_checkpoint, save_checkpoint

    model, info = load_checkpoint(checkpoint)
    info["preprocess"]["canonical_side"] = True
    return save_checkpoint(path, model, info)


def run_cli(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    """Run the installed `klgrade` command as a user would."""
    return subprocess.run([sys.executable, "-m", "klgrade", *args], capture_output=True, text=True, timeout=timeout)


class _CurrentStderr(logging.StreamHandler):
    """Writes to whatever `sys.stderr` is when a record comes (CliRunner swaps it while a command runs)."""

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, _):
        pass


def invoke_cli(*args: str, stdin: bytes | None = None) -> subprocess.CompletedProcess:
    """The same `klgrade` command run inside the test process: a new process spends ~10 s of CPU importing torch,
    timm and Lightning before the command's first line. The argument expansion, the one-line errors, the exit codes
    and the warnings it logs (on stderr, as the command prints them) are `klgrade.cli`'s own; an exception that
    escapes the command fails the test with its traceback. `run_cli` is for what only a process shows: a hang (its
    timeout), what `klgrade.cli.main` adds (pydicom's own messages silenced), several processes, info lines."""
    from typer.testing import CliRunner

    from klgrade.cli import app, expand_multi_values

    handler = _CurrentStderr()
    handler.setLevel(logging.WARNING)
    handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    handler.addFilter(lambda record: record.levelno >= logging.ERROR or not record.name.startswith("pydicom"))  # as main
    logging.getLogger().addHandler(handler)
    try:
        result = CliRunner().invoke(app, expand_multi_values(list(args)), input=stdin, prog_name="klgrade",
                                    catch_exceptions=False)
    finally:
        logging.getLogger().removeHandler(handler)
    return subprocess.CompletedProcess(["klgrade", *args], result.exit_code, result.stdout, result.stderr)


def save(image: Image.Image, path: Path, **kwargs) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path, **kwargs)
    return path


def write_dicom(path, pixels, photometric, slope=1.0, intercept=0.0, window=None, view=None, patient="SECRET-42",
                **header):
    """A 16-bit DICOM radiograph with patient fields (which klgrade must never return or log); `view`: its
    ViewPosition; `patient`: its PatientID; `header`: more elements by keyword (e.g. ImageLaterality="L")."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = pydicom.Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
    ds.PatientName, ds.PatientID, ds.Modality = "Doe^Jane", patient, "CR"
    ds.Rows, ds.Columns = pixels.shape
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, photometric
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    ds.RescaleSlope, ds.RescaleIntercept = slope, intercept
    if window is not None:
        ds.WindowCenter, ds.WindowWidth = window
    if view is not None:
        ds.ViewPosition = view
    for keyword, value in header.items():
        setattr(ds, keyword, value)
    ds.PixelData = pixels.astype(np.uint16).tobytes()
    ds.save_as(path, enforce_file_format=True)
    return path


def compress_dicom(source: Path, target: Path, syntax: str) -> Path:
    """`source` re-encoded by GDCM in the transfer syntax `gdcm.TransferSyntax.<syntax>` (as a PACS exports it)."""
    import gdcm

    reader = gdcm.ImageReader()
    reader.SetFileName(str(source))
    assert reader.Read(), source
    change = gdcm.ImageChangeTransferSyntax()
    change.SetTransferSyntax(gdcm.TransferSyntax(getattr(gdcm.TransferSyntax, syntax)))
    change.SetInput(reader.GetImage())
    assert change.Change(), syntax
    writer = gdcm.ImageWriter()
    writer.SetFileName(str(target))
    writer.SetFile(reader.GetFile())
    writer.SetImage(change.GetOutput())
    assert writer.Write(), target
    return target


def not_knee_images() -> dict[str, np.ndarray]:
    """Images no one here labelled and that are not knee radiographs: synthetic ones, and real photographs and
    scans that ship inside installed packages (matplotlib's and scikit-learn's sample data; no downloads)."""
    import gzip

    import matplotlib
    from PIL import ImageDraw
    from sklearn.datasets import load_sample_image

    rng = np.random.default_rng(0)
    side = 224
    y, x = np.mgrid[0:side, 0:side] / side
    text = Image.new("L", (side, side), 255)
    draw = ImageDraw.Draw(text)
    for row in range(0, side, 18):
        draw.text((4, row), "Kellgren-Lawrence grade report", fill=0)
    images = {
        "black": np.zeros((side, side), np.uint8), "white": np.full((side, side), 255, np.uint8),
        "grey": np.full((side, side), 128, np.uint8), "blank_16bit": np.zeros((512, 512), np.uint16),
        "uniform_noise": rng.integers(0, 256, (side, side)).astype(np.uint8),
        "gaussian_noise": np.clip(rng.normal(128, 40, (side, side)), 0, 255).astype(np.uint8),
        "horizontal_gradient": (x * 255).astype(np.uint8), "vertical_gradient": (y * 255).astype(np.uint8),
        "radial_gradient": (np.hypot(x - 0.5, y - 0.5) * 360).clip(0, 255).astype(np.uint8),
        "checkerboard": ((np.floor(x * 8) + np.floor(y * 8)) % 2 * 255).astype(np.uint8),
        "text": np.asarray(text),
    }
    sample_data = Path(matplotlib.get_data_path()) / "sample_data"
    photos = {
        "grace_hopper": np.asarray(Image.open(sample_data / "grace_hopper.jpg").convert("L")),
        "minduka": np.asarray(Image.open(sample_data / "Minduka_Present_Blue_Pack.png").convert("L")),
        "mpl_logo": np.asarray(Image.open(sample_data / "logo2.png").convert("L")),
        "brain_mri": np.frombuffer(gzip.open(sample_data / "s1045.ima.gz").read(), ">u2").reshape(256, 256),
        "terrain": np.load(sample_data / "jacksboro_fault_dem.npz")["elevation"].astype(np.float32),
        "topobathy": np.load(sample_data / "topobathy.npz")["topo"].astype(np.float32),
        "china": np.asarray(Image.fromarray(load_sample_image("china.jpg")).convert("L")),
        "flower": np.asarray(Image.fromarray(load_sample_image("flower.jpg")).convert("L")),
    }
    for name, photo in photos.items():
        images[name] = photo
        height, width = photo.shape
        half = min(height, width) // 2
        for i, (top, left) in enumerate(((0, 0), (0, width - half), (height - half, 0), (height - half, width - half))):
            images[f"{name}_crop{i}"] = photo[top:top + half, left:left + half]
    return images


def one_grade_warning(what, knees: int) -> str:
    """What `evaluate` and `reproduce` say of a scored set whose knees are all KL 0."""
    return (f"{what}: every knee scored ({knees}) is KL 0: mcc and qwk are 0 by their formulas on one true grade and "
            "say nothing of the model; read accuracy, mae and the errors")
