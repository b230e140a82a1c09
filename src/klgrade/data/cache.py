"""Decode and preprocess a file list once into a uint8 array on disk, reused across epochs, folds and runs.

The cache file is keyed by the file list (path, size, mtime), the preprocessing settings and the code that decodes,
so a changed file, setting or decoder builds a new one. It is written to a temporary name and renamed: never
half-written.
"""

from __future__ import annotations

import hashlib
import importlib
import json
import logging
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from klgrade.data.io import read_radiograph
from klgrade.data.preprocess import PreprocessConfig, prepare_image
from klgrade.data.sources import Sample
from klgrade.errors import DataLayoutError, ImageReadError, KLGradeError
from klgrade.files import atomic_path
from klgrade.fingerprint import PACKAGE, source_digest

log = logging.getLogger(__name__)

CHUNK = 1024
"""Images decoded at a time where a whole set is read (the image cache, `klgrade evaluate`): 26 MB of images at
160 px, whatever the set's size."""
DECODERS = ("numpy", "PIL", "cv2", "pydicom")
"""The libraries whose versions key the cache beside klgrade's data layer: a new JPEG decoder or resampler may make
other pixels of the same file."""


def default_cache_dir() -> Path:
    return Path(os.environ.get("KLGRADE_CACHE_DIR", Path.home() / ".cache" / "klgrade"))


def cache_key(samples: list[Sample], config: PreprocessConfig) -> str:
    """Fingerprint of the exact files (path, size, mtime), the preprocessing settings and what decodes them (the data
    layer's source, `DECODERS`' versions)."""
    decoders = {name: importlib.import_module(name).__version__ for name in DECODERS}
    digest = hashlib.sha256(json.dumps([source_digest(PACKAGE / "data"), decoders, config.to_dict()]).encode())
    for sample in samples:
        try:
            stat = os.stat(sample.path)
            size, mtime = stat.st_size, stat.st_mtime_ns
        except OSError:  # unreadable entries are reported when decoded; here they only need a stable key
            size, mtime = -1, -1
        digest.update(f"{sample.path}\0{size}\0{mtime}\0{sample.side}\n".encode(errors="surrogateescape"))  # any bytes
    return digest.hexdigest()[:20]


@dataclass
class Decoded:
    """A file list decoded and preprocessed: the images (zeros where unreadable), the read failures, and per file why
    it is not gradable whatever a network makes of it (`uncertainty.input_reasons`; empty where it is gradable) and
    what its answer must say about preparing it (`preprocess.PreparedImage.notes`)."""

    images: np.ndarray
    failures: list[ImageReadError]
    reasons: list[list[str]]
    notes: list[list[str]]


def decode_all(samples: list[Sample], config: PreprocessConfig, workers: int | None = None) -> Decoded:
    """Decode + preprocess every sample (threads); unreadable files become zero images and are reported."""
    images = np.zeros((len(samples), config.size, config.size), dtype=np.uint8)
    failures: list[ImageReadError] = []
    reasons: list[list[str]] = [[] for _ in samples]
    notes: list[list[str]] = [[] for _ in samples]

    def load(index: int) -> None:
        sample = samples[index]
        try:
            radiograph = read_radiograph(sample.path)
        except ImageReadError as exc:
            failures.append(exc)
            return
        prepared = prepare_image(radiograph.grey, config, sample.side)
        images[index] = prepared.pixels
        reasons[index] = prepared.reasons(radiograph)
        notes[index] = prepared.notes()

    with ThreadPoolExecutor(max_workers=workers or os.cpu_count() or 1) as pool:
        list(pool.map(load, range(len(samples))))
    return Decoded(images, failures, reasons, notes)


def load_cached(samples: list[Sample], config: PreprocessConfig, cache_dir: str | Path | None = None,
                what: str = "training data") -> np.ndarray:
    """(N, size, size) uint8 memmap of `samples`, built on first use `CHUNK` images at a time (memory stays bounded
    whatever the set's size).

    Raises:
        DataLayoutError: naming `what`: some files are unreadable (a few are named; every label is needed).
    """
    directory = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    shape = (len(samples), config.size, config.size)
    path = directory / f"images-{cache_key(samples, config)}-{len(samples)}x{config.size}.npy"
    if path.exists():
        log.info("reading image cache %s", path)
        try:
            cached = np.load(path, mmap_mode="r")
            if cached.shape == shape and cached.dtype == np.uint8:
                return cached
        except (ValueError, OSError):  # written whole (atomic_path): damaged afterwards, by a disk or a copy
            pass
        log.warning("image cache %s is damaged: building it again", path)
    log.info("building image cache of %d images at %s", len(samples), path)
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise KLGradeError(f"{directory}: the image cache cannot be made there ({exc.strerror or exc}); set "
                           "KLGRADE_CACHE_DIR to a folder that can be written") from None
    failures: list[ImageReadError] = []
    header = {"descr": np.lib.format.dtype_to_descr(np.dtype(np.uint8)), "fortran_order": False, "shape": shape}
    with atomic_path(path) as temporary, temporary.open("wb") as handle:  # written, not mapped: no page held
        np.lib.format.write_array_header_1_0(handle, header)
        for start in range(0, len(samples), CHUNK):
            decoded = decode_all(samples[start:start + CHUNK], config)
            handle.write(decoded.images.tobytes())
            failures += decoded.failures
        if failures:  # the temporary file is removed
            listed = "; ".join(str(f) for f in failures[:5])
            raise DataLayoutError(f"{what}: {len(failures)} unreadable image(s), e.g. {listed}; check it with "
                                  f"klgrade data summary")
    return np.load(path, mmap_mode="r")
