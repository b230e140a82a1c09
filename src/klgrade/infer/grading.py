"""The one path from an input to a graded result, for the Python API, `klgrade predict` and the HTTP service.

An input is a file path, the bytes of a file with its name (an upload), or a 2-D grey-level array. The name
matters: it tells the knee side (`9003175L.png`) and marks a DICOM file without the DICM preamble (`.dcm`).
Many inputs are decoded ahead in threads and graded in batches; one unreadable input yields its error and
does not stop the others.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence, Union

import numpy as np

from klgrade.data.io import read_image
from klgrade.data.sources import parse_knee_name
from klgrade.errors import ImageReadError
from klgrade.infer.predictor import Grading, Predictor

ARRAY_NAME = "<array>"


@dataclass(frozen=True)
class NamedBytes:
    """The content of an image file and its file name (e.g. an HTTP upload)."""

    data: bytes
    name: str


Source = Union[str, Path, NamedBytes, np.ndarray]
"""What can be graded: a path, a file's bytes with its name, or a (H, W) grey-level array."""


@dataclass(frozen=True)
class Decoded:
    image: np.ndarray
    side: str | None
    name: str


def source_name(source: Source) -> str:
    if isinstance(source, NamedBytes):
        return source.name
    if isinstance(source, np.ndarray):
        return ARRAY_NAME
    return str(source)


def decode(source: Source) -> Decoded:
    """Grey levels, knee side (from the name) and name of one input.

    Raises:
        ImageReadError: unreadable file or bytes, or an array that is not 2-D.
    """
    name = source_name(source)
    if isinstance(source, np.ndarray):
        if source.ndim != 2:
            raise ImageReadError(name, f"expected a 2-D grey-level array, got shape {source.shape}")
        if not np.isfinite(source).all():
            raise ImageReadError(name, "array holds NaN or infinite values")
        return Decoded(source.astype(np.float32), None, name)
    image = read_image(source.data, name=name) if isinstance(source, NamedBytes) else read_image(source)
    return Decoded(image, parse_knee_name(name)[1], name)


def _decode_or_error(source: Source) -> Decoded | ImageReadError:
    try:
        return decode(source)
    except ImageReadError as exc:
        return exc


def grade_many(model: Predictor, sources: Sequence[Source], explain: bool = False, batch_size: int = 16,
               workers: int = 2) -> Iterator[Grading | ImageReadError]:
    """One result per input, in input order: a `Grading`, or the `ImageReadError` of an unreadable input.

    Decoding runs `workers` threads ahead of the network, which sees `batch_size` images per forward pass.
    """
    with ThreadPoolExecutor(max_workers=workers) as pool:
        for start in range(0, len(sources), batch_size):
            decoded = list(pool.map(_decode_or_error, sources[start:start + batch_size]))
            good = [d for d in decoded if isinstance(d, Decoded)]
            gradings = iter(model.grade_arrays([d.image for d in good], [d.side for d in good], explain=explain,
                                               names=[d.name for d in good]) if good else [])
            for item in decoded:
                yield next(gradings) if isinstance(item, Decoded) else item


_SHIPPED: list[Predictor] = []
"""The shipped model, loaded on the first `grade()` call without a model and reused after."""


def load_model(checkpoints: str | Path | list[str | Path] | None = None, device: str = "cpu",
               tta: bool | None = None, backend: str = "torch") -> Predictor:
    """A `Predictor` for the given checkpoint(s) (several = an ensemble), or for the model shipped with klgrade.

    Args:
        checkpoints: safetensors checkpoint(s), or `.onnx` files with `backend="onnx"`; None = the shipped model.
        device: torch device of the torch backend ("cpu", "cuda").
        tta: average with the horizontally flipped image; None = what the checkpoint recommends.
        backend: "torch" or "onnx" (ONNX Runtime on the CPU).

    Raises:
        CheckpointError: missing, corrupt or incompatible checkpoint(s), or an unknown backend.
    """
    if isinstance(checkpoints, (str, Path)):
        checkpoints = [checkpoints]
    return Predictor(checkpoints, device=device, tta=tta, backend=backend)


def grade(image: Source | bytes, *, name: str | None = None, explain: bool = False,
          model: Predictor | None = None) -> Grading:
    """Grade one radiograph.

    Args:
        image: a file path, a file's raw bytes, `NamedBytes`, or a (H, W) grey-level array.
        name: the file name of raw bytes (gives the knee side and marks `.dcm` files); ignored otherwise.
        explain: add a Grad-CAM heatmap of the predicted grade (`Grading.heatmap`, (H, W) in [0, 1]).
        model: a `Predictor` from `load_model`; None = the shipped model (loaded once, then reused).

    Returns:
        `Grading` with `grade`, `probabilities`, `confidence`, `warnings` and, when `explain`, `heatmap`.

    Raises:
        ImageReadError: the image cannot be read.
    """
    if isinstance(image, bytes):
        image = NamedBytes(image, name or "<bytes>")
    if model is None:
        if not _SHIPPED:
            _SHIPPED.append(load_model())
        model = _SHIPPED[0]
    result = next(grade_many(model, [image], explain=explain, workers=1))
    if isinstance(result, ImageReadError):
        raise result
    return result
