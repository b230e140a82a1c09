"""Decode any radiograph a user has into one grey-level array, or fail with one clear reason.

PNG/JPEG/JPEG 2000/BMP/TIFF in 8 or 16 bits (grey, RGB, RGBA, palette) via Pillow, opened with an explicit format
allow-list (no other Pillow plugin ever runs, e.g. EPS through Ghostscript) and turned as their EXIF orientation
says, so the model sees the knee the way every viewer shows it (of 21 val knees stored sideways with orientation
6, read as stored, 20 were graded KL 4 and all 21 flagged not gradable); DICOM via pydicom (compressed pixel data
through GDCM: JPEG lossless and JPEG-LS, which PACS exports of CR/DX often use, need it) with the modality LUT
(rescale slope/intercept), the VOI LUT or window (a broken window is ignored), and MONOCHROME1 or an INVERSE
presentation LUT shape inverted so that bone is always bright; its header's `ViewPosition` and laterality come
along (`Radiograph.view`, `.laterality`). Files are read only when they are regular files, and never past
`MAX_FILE_BYTES` (a FIFO, a device or a symlink loop is an error, not a hang). Every failure raises
`ImageReadError(path, reason)`.
"""

from __future__ import annotations

import errno
import io
import itertools
import logging
import os
import stat
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from klgrade.constants import HEATMAP_MARK
from klgrade.errors import ImageReadError

log = logging.getLogger(__name__)

MAX_PIXELS = 64_000_000
"""Largest image accepted (pixels). Plain radiographs are at most ~20 MP; more is an error or a bomb."""
MAX_FILE_BYTES = 256 * 1024 * 1024
PILLOW_FORMATS = ("PNG", "JPEG", "JPEG2000", "BMP", "TIFF")
"""The only Pillow decoders klgrade runs (JPEG 2000: an archive's or a PACS viewer's export, 8 or 16 bits)."""
FORMATS_READ = "PNG, JPEG, JPEG 2000, BMP, TIFF, DICOM"
"""The image formats klgrade reads, as its messages name them."""
TIFF_NEW_SUBFILE_TYPE = 254
"""The TIFF tag whose bit 0 marks a reduced-resolution page (a thumbnail of another)."""
MIN_SIDE = 16
"""Smallest side (pixels) that still holds a knee joint worth grading."""
TIFF_SIGNATURES = (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+")
"""The first four bytes of a TIFF (little- or big-endian) or a BigTIFF."""
KNEE_SIDES = ("L", "R")
"""The lateralities that name one knee's side (a DICOM header may also say B, both, or U, unpaired)."""
_DICOM_MAGIC_OFFSET = 128


@dataclass(frozen=True)
class Radiograph:
    """A decoded radiograph: its grey levels, and the view, laterality and body part its DICOM header names
    (`ViewPosition`, `dicom_laterality`, `BodyPartExamined`; upper case); None for other files or where the header is
    silent."""

    grey: np.ndarray
    view: str | None = None
    laterality: str | None = None
    body_part: str | None = None

    @property
    def side(self) -> str | None:
        """The knee side the header names ("L" or "R"; None for both sides, an unpaired part, or silence)."""
        return self.laterality if self.laterality in KNEE_SIDES else None


def read_image(source: str | Path | bytes, name: str | None = None, max_pixels: int = MAX_PIXELS) -> np.ndarray:
    """The grey levels of `read_radiograph` (all that training, evaluation and the benchmarks need)."""
    return read_radiograph(source, name, max_pixels).grey


def read_radiograph(source: str | Path | bytes, name: str | None = None, max_pixels: int = MAX_PIXELS) -> Radiograph:
    """Decode an image file (or its bytes) into a 2-D float32 array of grey levels (native scale), and the view and
    laterality a DICOM header names.

    Args:
        source: a path, or the raw bytes of an upload.
        name: label for error messages when `source` is bytes (e.g. the upload's file name); its suffix
            `.dcm` lets a DICOM file without the DICM preamble be recognised.
        max_pixels: refuse larger images before decoding them (the service sets a smaller limit).

    Returns:
        (H, W) float32 grey levels, bright = dense (bone) whatever the photometric interpretation, the view and the
        laterality.

    Raises:
        ImageReadError: empty, truncated, unsupported, absurdly large or undecodable input.
    """
    label = str(name if name is not None else ("<bytes>" if isinstance(source, bytes) else source))
    data = _read_bytes(source, label)
    if not data:
        raise ImageReadError(label, "empty file (0 bytes)")
    try:
        if _is_dicom(data, label):
            array, header = _decode_dicom(data, label, max_pixels)
        else:
            array, header = _decode_pillow(data, label, max_pixels), {}
    except ImageReadError:
        raise
    except Exception as exc:  # decoders raise many types; the user needs one line, the log the detail
        log.debug("decode failure for %s", label, exc_info=True)
        raise ImageReadError(label, f"cannot decode image ({type(exc).__name__}: {exc})") from exc
    return Radiograph(_checked(array, label, "image"), **header)


def read_array(array: np.ndarray, name: str = "<array>", max_pixels: int = MAX_PIXELS) -> np.ndarray:
    """A radiograph already in memory, checked as a decoded file is: (H, W) grey levels, or (H, W, 3 or 4)
    colour with the channels averaged (Pillow and matplotlib give RGB, OpenCV BGR: the average is the same for
    both; an alpha channel is dropped); axes of length 1 (a batch or channel axis) are dropped first.

    Raises:
        ImageReadError: values that are not real numbers, another shape, an image under `MIN_SIDE` or over
            `max_pixels`, NaN or infinite values.
    """
    array = np.asarray(array)
    if array.dtype.kind not in "biuf":
        raise ImageReadError(name, f"array of {array.dtype} values, expected real numbers")
    grey = array.squeeze() if array.size else array
    if grey.ndim == 3 and grey.shape[-1] in (3, 4):
        grey = grey[..., :3].mean(axis=-1, dtype=np.float32)
    if grey.ndim != 2:
        raise ImageReadError(name, f"expected a 2-D grey-level array (or H x W x 3 colour), got shape {array.shape}")
    _check_size(grey.shape[1], grey.shape[0], name, max_pixels)
    return _checked(grey, name, "array")


def read_pil_image(image: Image.Image, name: str, max_pixels: int = MAX_PIXELS) -> np.ndarray:
    """A Pillow image already opened, read as its file would be: turned as its EXIF orientation says (on a copy: the
    caller's image is left as it is), 16-bit and float modes kept, colour through luma, a klgrade heatmap refused.

    Raises:
        ImageReadError: a heatmap, several frames, pixels that cannot be loaded, an image under `MIN_SIDE` or over
            `max_pixels`.
    """
    try:
        _check_opened(image, name, max_pixels)
        grey = _to_grey(_as_displayed(image.copy(), name))
    except ImageReadError:
        raise
    except Exception as exc:  # e.g. opened lazily from a file closed since (Pillow: AssertionError, no message)
        detail = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
        raise ImageReadError(name, f"cannot read its pixels ({detail}; was its file closed before they were "
                                   "loaded?)") from None
    return _checked(grey, name, "image")


def _checked(array: np.ndarray, label: str, what: str) -> np.ndarray:
    """`array` as float32 once it is large enough and every value is finite in float32 (a float64 beyond its
    range would become infinite)."""
    if array.ndim != 2 or min(array.shape) < MIN_SIDE:
        raise ImageReadError(label, f"{what} of shape {array.shape} is too small (min side {MIN_SIDE} px)")
    with np.errstate(over="ignore"):  # a value beyond float32's range becomes infinite: refused just below
        array = array.astype(np.float32, copy=False)
    if not np.isfinite(array).all():
        raise ImageReadError(label, f"{what} holds NaN or infinite values (or values beyond float32's range)")
    return array


def _read_bytes(source: str | Path | bytes, label: str) -> bytes:
    if isinstance(source, bytes):
        data = source
    else:
        data = read_file_bounded(Path(source), label)
    if len(data) > MAX_FILE_BYTES:
        raise ImageReadError(label, f"file larger than {MAX_FILE_BYTES // 2**20} MiB")
    return data


def regular_file_problem(path: Path) -> str | None:
    """Why `path` is not a readable regular file (following links), or None when it is one."""
    try:
        info = os.stat(path)
    except FileNotFoundError:
        return "broken symbolic link (its target is missing)" if path.is_symlink() else "file not found"
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            return "symbolic link loop"
        return f"cannot open ({exc.strerror or exc})"
    if stat.S_ISDIR(info.st_mode):
        return "is a folder, not an image"
    if not stat.S_ISREG(info.st_mode):
        return "not a regular file (a pipe, device or socket)"
    return None


def file_version(path: str | os.PathLike) -> tuple[str, int, int]:
    """(path, size, modification time) of a regular file no larger than an image may be: what keys a cache of what
    its bytes say (their digest, a DICOM header).

    Raises:
        OSError: the file is missing, not a regular file (a pipe would block a read for ever) or too large.
    """
    info = os.stat(path)
    if not stat.S_ISREG(info.st_mode) or info.st_size > MAX_FILE_BYTES:
        raise OSError(f"{path}: not a regular file of at most {MAX_FILE_BYTES // 2**20} MiB")
    return os.fspath(path), info.st_size, info.st_mtime_ns


def read_file_bounded(path: Path, label: str) -> bytes:
    """The bytes of a regular file, at most `MAX_FILE_BYTES` of them (never blocks on a pipe or reads a device)."""
    problem = regular_file_problem(path)
    if problem is not None:
        raise ImageReadError(label, problem)
    try:
        with open(path, "rb") as handle:
            data = handle.read(MAX_FILE_BYTES + 1)
    except PermissionError:
        raise ImageReadError(label, "permission denied") from None
    except OSError as exc:
        raise ImageReadError(label, f"cannot read ({exc.strerror or exc})") from None
    if len(data) > MAX_FILE_BYTES:
        raise ImageReadError(label, f"file larger than {MAX_FILE_BYTES // 2**20} MiB")
    return data


def _is_dicom(data: bytes, label: str) -> bool:
    """DICOM by its preamble; a `.dcm` name counts only when the content is not an image Pillow knows."""
    if data[_DICOM_MAGIC_OFFSET : _DICOM_MAGIC_OFFSET + 4] == b"DICM":
        return True
    return Path(label).suffix.lower() in {".dcm", ".dicom"} and _pillow_format(data) is None


def _pillow_format(data: bytes) -> str | None:
    try:
        with Image.open(io.BytesIO(data), formats=PILLOW_FORMATS) as image:
            return image.format
    except Exception:  # any decoder error means "not an image Pillow may open"
        return None


def _check_size(width: int, height: int, label: str, max_pixels: int) -> None:
    if width * height > max_pixels:
        raise ImageReadError(label, f"image of {width}x{height} px exceeds the {max_pixels / 10**6:g} MP limit")


def _decode_pillow(data: bytes, label: str, max_pixels: int) -> np.ndarray:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data), formats=PILLOW_FORMATS)
            _check_opened(image, label, max_pixels)
            image.load()
    except (UnidentifiedImageError, Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        reason = f"not a recognised image ({FORMATS_READ})"
        if data[:4] in TIFF_SIGNATURES:  # a TIFF nonetheless: say what to do with it
            reason = ("a TIFF that cannot be decoded (64-bit float samples, an unusual compression, or damaged?); "
                      "save it as a 16-bit integer TIFF or PNG")
        if not isinstance(exc, UnidentifiedImageError):
            reason = "image too large (decompression bomb)"
        raise ImageReadError(label, reason) from None
    except OSError as exc:
        raise ImageReadError(label, f"truncated or corrupt image ({exc})") from None
    return _to_grey(_as_displayed(image, label))


def _check_opened(image: Image.Image, label: str, max_pixels: int) -> None:
    """What an opened Pillow image (a file's, or one a caller opened) must pass before its pixels are read: no klgrade
    heatmap, within `max_pixels`, one radiograph."""
    if _carries_heatmap_mark(image):
        raise ImageReadError(label, "a klgrade heatmap (Grad-CAM overlay), not a radiograph: grade the radiograph it "
                                    "was made from")
    _check_size(*image.size, label, max_pixels)
    _check_one_image(image, label)


def _carries_heatmap_mark(image: Image.Image) -> bool:
    """Whether an opened image carries the text chunk klgrade's Grad-CAM overlays are saved with (`HEATMAP_MARK`)."""
    return image.info.get(HEATMAP_MARK[0]) == HEATMAP_MARK[1]


def is_heatmap_file(path: Path) -> bool:
    """Whether `path` is a PNG klgrade saved as a heatmap overlay (the mark is read from the chunks before the
    pixels); False for any other file, readable or not, and for what is no regular file (opening a pipe waits for a
    writer)."""
    if regular_file_problem(path) is not None:
        return False
    try:
        with Image.open(path, formats=["PNG"]) as image:
            return _carries_heatmap_mark(image)
    except (OSError, SyntaxError, ValueError):  # not a PNG, or not readable: not klgrade's
        return False


def _check_one_image(image: Image.Image, label: str) -> None:
    """A multi-page TIFF or an animated PNG would have its first image graded and the others dropped unseen: refused,
    as multi-frame DICOM is. Reduced-resolution TIFF pages (thumbnails, NewSubfileType bit 0) do not count; nor
    does a JPEG's second picture (a phone's depth or gain map). Pages are read only until a second full one."""
    if image.format not in ("TIFF", "PNG") or not getattr(image, "is_animated", False):
        return
    full_pages = 0
    for page in itertools.count():
        try:
            image.seek(page)
        except EOFError:
            break
        full_pages += image.format != "TIFF" or not image.tag_v2.get(TIFF_NEW_SUBFILE_TYPE, 0) & 1
        if full_pages > 1:
            raise ImageReadError(label, f"more than one image in this {image.format} file (expected one radiograph "
                                        "per file)")
    image.seek(0)


def _as_displayed(image: Image.Image, label: str) -> Image.Image:
    """`image` turned or mirrored as its EXIF orientation tells a viewer to (Pillow's TIFF decoder already does).
    An EXIF block too broken to apply leaves the pixels as stored, as viewers do; the gradability check still
    flags a knee left sideways."""
    try:
        ImageOps.exif_transpose(image, in_place=True)
    except Exception:  # EXIF parsing raises many types; the pixels themselves are fine
        log.debug("EXIF orientation of %s ignored", label, exc_info=True)
    return image


def _to_grey(image: Image.Image) -> np.ndarray:
    """Single-channel array; 16-bit and float modes keep their range, colour goes through luma."""
    if image.mode in {"I;16", "I;16B", "I;16L", "I", "F"}:
        return np.asarray(image, dtype=np.float32)
    if image.mode == "P":
        image = image.convert("RGBA")
    if image.mode in {"RGBA", "LA", "PA"}:
        image = image.convert("RGB") if image.mode == "RGBA" else image.convert("L")
    if image.mode != "L":
        image = image.convert("L")
    return np.asarray(image, dtype=np.float32)


def _decode_dicom(data: bytes, label: str, max_pixels: int) -> tuple[np.ndarray, dict]:
    """Grey levels, and what the header names of the view, laterality and body part (`Radiograph`'s fields)."""
    import pydicom
    from pydicom.pixels import apply_color_lut, apply_modality_lut, apply_voi_lut

    try:
        ds = pydicom.dcmread(io.BytesIO(data))
        rows, columns, frames = int(ds.get("Rows", 0)), int(ds.get("Columns", 0)), int(ds.get("NumberOfFrames", 1) or 1)
        header = {"view": _upper_text(ds, "ViewPosition"), "laterality": dicom_laterality(ds),
                  "body_part": _upper_text(ds, "BodyPartExamined")}
    except Exception:  # pydicom raises many types for broken headers; the log keeps the detail
        log.debug("DICOM header failure for %s", label, exc_info=True)
        raise ImageReadError(label, "not a valid DICOM file (unreadable header)") from None
    if "PixelData" not in ds:
        raise ImageReadError(label, "DICOM file holds no image (no PixelData)")
    _check_size(columns, rows, label, max_pixels)
    if frames > 1:
        raise ImageReadError(label, "multi-frame DICOM is not supported (expected one radiograph)")
    try:
        pixels = ds.pixel_array
    except Exception:
        log.debug("DICOM pixel failure for %s", label, exc_info=True)
        syntax = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)
        detail = f"transfer syntax {syntax.name}" if syntax is not None else "unknown transfer syntax"
        raise ImageReadError(label, f"DICOM pixel data cannot be decoded ({detail}; truncated or unsupported)") from None
    photometric = str(ds.get("PhotometricInterpretation", "MONOCHROME2")).upper()
    if photometric == "PALETTE COLOR":  # the stored values are indices into the palette, not grey levels
        pixels = apply_color_lut(pixels, ds)
    if pixels.ndim == 3:  # colour DICOM (secondary capture): pydicom gives RGB, YBR converted; luma
        return (pixels[..., :3].astype(np.float32) @ np.array([0.299, 0.587, 0.114], np.float32)), header
    array = apply_modality_lut(pixels, ds)
    if "VOILUTSequence" in ds or ("WindowCenter" in ds and _window_is_valid(ds)):
        array = apply_voi_lut(array, ds)
    array = np.asarray(array, dtype=np.float32)
    if photometric == "MONOCHROME1" or str(ds.get("PresentationLUTShape", "")).strip().upper() == "INVERSE":
        array = array.max() + array.min() - array  # INVERSE beside MONOCHROME1 is the same inversion, not a second
    return array, header


def _upper_text(ds, keyword: str) -> str | None:
    """A header element's text, upper case; None where it is absent or empty."""
    return str(ds.get(keyword, "") or "").strip().upper() or None


def dicom_laterality(ds) -> str | None:
    """The laterality a DICOM header names, upper case: the image's `ImageLaterality`, else the series'
    `Laterality` (the standard's values: L, R, B for both sides, U for an unpaired part); None where both are
    silent."""
    return _upper_text(ds, "ImageLaterality") or _upper_text(ds, "Laterality")


def dicom_side(ds) -> str | None:
    """The knee side a DICOM header names ("L" or "R"; `dicom_laterality`), None for anything else."""
    laterality = dicom_laterality(ds)
    return laterality if laterality in KNEE_SIDES else None


def _window_is_valid(ds) -> bool:
    """A window of width < 1 (the standard's minimum) is an encoder's mistake: grade the raw values instead."""
    from pydicom.multival import MultiValue

    width = ds.get("WindowWidth")
    widths = list(width) if isinstance(width, MultiValue) else [width]
    try:
        return bool(widths) and all(float(w) >= 1 for w in widths)
    except (TypeError, ValueError):
        return False
