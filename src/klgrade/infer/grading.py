"""The one path from an input to a graded result, for the Python API, `klgrade predict` and the HTTP service.

An input is a file path, the bytes of a file with its name (an upload), a Pillow image or a grey-level array. The name
matters: it tells the knee side (`9003175L.png`; else a DICOM header's laterality) and marks a DICOM file without
the DICM preamble (`.dcm`).
Many inputs are decoded ahead in threads and graded in batches; one unreadable input yields its error and
does not stop the others.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from itertools import islice
from pathlib import Path
from typing import Iterable, Iterator, Sequence, Union

import numpy as np
from PIL import Image

from klgrade.data.io import MAX_PIXELS, Radiograph, read_array, read_pil_image, read_radiograph
from klgrade.data.preprocess import prepare_image
from klgrade.data.sources import parse_knee_name
from klgrade.errors import ImageReadError
from klgrade.infer.predictor import Grading, Predictor

ARRAY_NAME = "<array>"
IMAGE_NAME = "<image>"


@dataclass(frozen=True)
class NamedBytes:
    """The content of an image file and its file name (e.g. an HTTP upload)."""

    data: bytes
    name: str


Source = Union[str, Path, NamedBytes, Image.Image, np.ndarray]
"""What can be graded: a path, a file's bytes with its name, a Pillow image (named by the file it was opened from,
if any), or an array (`data.io.read_array`)."""


@dataclass(frozen=True)
class PreparedInput:
    """One input as the network sees it: the (size, size) uint8 image, the input's name, why the input itself
    is not gradable whatever the network makes of it (`uncertainty.input_reasons`), if it is not, and what its
    answer must say about its preparation (`data.preprocess.PreparedImage.notes`)."""

    image: np.ndarray
    name: str
    reasons: tuple[str, ...] = ()
    notes: tuple[str, ...] = ()


def source_name(source: Source) -> str:
    if isinstance(source, NamedBytes):
        return source.name
    if isinstance(source, np.ndarray):
        return ARRAY_NAME
    if isinstance(source, Image.Image):
        return str(getattr(source, "filename", "") or IMAGE_NAME)
    if not isinstance(source, (str, Path)):
        raise TypeError(f"cannot grade a {type(source).__name__}: give a file path, a file's bytes, NamedBytes, a "
                        "Pillow image or a numpy array")
    return str(source)


def decode(source: Source, max_pixels: int = MAX_PIXELS) -> tuple[Radiograph, str | None]:
    """The radiograph (grey levels, DICOM view) and knee side (the name's, else the DICOM header's) of one input.

    Raises:
        ImageReadError: unreadable file or bytes, an image over `max_pixels`, or an unusable array.
    """
    name = source_name(source)
    if isinstance(source, np.ndarray):
        return Radiograph(read_array(source, name, max_pixels)), None
    if isinstance(source, Image.Image):
        return Radiograph(read_pil_image(source, name, max_pixels)), parse_knee_name(name)[1]
    data = source.data if isinstance(source, NamedBytes) else source
    radiograph = read_radiograph(data, name=name, max_pixels=max_pixels)
    return radiograph, parse_knee_name(name)[1] or radiograph.side


def prepare_input(model: Predictor, source: Source, max_pixels: int = MAX_PIXELS) -> PreparedInput:
    """Decode one input and preprocess it for `model` (the full-size decoded image is dropped here).

    Raises:
        ImageReadError: as `decode`.
    """
    radiograph, side = decode(source, max_pixels)
    prepared = prepare_image(radiograph.grey, model.preprocess, side)
    reasons = prepared.reasons(radiograph)
    return PreparedInput(prepared.pixels, source_name(source), tuple(reasons), tuple(prepared.notes()))


def grade_prepared(model: Predictor, inputs: Sequence[PreparedInput], explain: bool = False,
                   alpha: float | None = None) -> list[Grading]:
    """Grade prepared inputs as one batch (`alpha`: miss rate of the grade sets; None = the model's); an input its
    reasons make not gradable is not, whatever the network makes of it, and says why first."""
    return model.grade_prepared(np.stack([i.image for i in inputs]), [i.name for i in inputs], explain, alpha,
                                [i.reasons for i in inputs], [i.notes for i in inputs])


def grade_many(model: Predictor, sources: Iterable[Source], explain: bool = False, batch_size: int = 16,
               workers: int = 2, alpha: float | None = None) -> Iterator[Grading | ImageReadError]:
    """One result per input, in input order: a `Grading`, or the `ImageReadError` of an unreadable input.

    `sources` may be any iterable (a list, `Path.glob(...)`, a generator): it is read `batch_size` inputs at a time.

    `alpha`: grade sets of a calibrated model miss the true grade for at most this share (default 0.1).

    Decoding and preprocessing run in `workers` threads ahead of the network, which sees `batch_size`
    images per forward pass.
    """
    if isinstance(sources, (str, bytes, Path, NamedBytes, Image.Image, np.ndarray)):  # one input, not several
        raise TypeError("grade_many takes an iterable of inputs (a list, a generator); grade one with grade()")

    def prepare_or_error(source: Source) -> PreparedInput | ImageReadError:
        try:
            return prepare_input(model, source)
        except ImageReadError as exc:
            return exc

    remaining = iter(sources)
    with ThreadPoolExecutor(max_workers=workers) as pool:
        while batch := list(islice(remaining, batch_size)):
            prepared = list(pool.map(prepare_or_error, batch))
            good = [p for p in prepared if isinstance(p, PreparedInput)]
            gradings = iter(grade_prepared(model, good, explain, alpha) if good else [])
            for item in prepared:
                yield next(gradings) if isinstance(item, PreparedInput) else item


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
          model: Predictor | None = None, alpha: float | None = None) -> Grading:
    """Grade one radiograph.

    Args:
        image: a file path, a file's raw bytes, `NamedBytes`, a Pillow image (`data.io.read_pil_image`), or an array
            (`data.io.read_array`: grey or colour).
        name: the file name of raw bytes (gives the knee side and marks `.dcm` files); ignored otherwise.
        explain: add a Grad-CAM heatmap of the predicted grade (`Grading.heatmap`, (H, W) in [0, 1]).
        model: a `Predictor` from `load_model`; None = the shipped model (loaded once, then reused).
        alpha: the grade set misses the true grade with probability at most alpha (calibrated models;
            None = 0.1, i.e. 90% sets).

    Returns:
        `Grading` with `grade`, `probabilities`, `confidence`, `grade_set`, `coverage`, `gradable`,
        `warnings` and, when `explain`, `heatmap`.

    Raises:
        ImageReadError: the image cannot be read.
    """
    if isinstance(image, bytes):
        image = NamedBytes(image, name or "<bytes>")
    if model is None:
        if not _SHIPPED:
            _SHIPPED.append(load_model())
        model = _SHIPPED[0]
    result = next(grade_many(model, [image], explain=explain, workers=1, alpha=alpha))
    if isinstance(result, ImageReadError):
        raise result
    return result
