"""Decode any radiograph a user has into one grey-level array, or fail with one clear reason.

PNG/JPEG/BMP/TIFF in 8 or 16 bits (grey, RGB, RGBA, palette) via Pillow; DICOM via pydicom with the
modality LUT (rescale slope/intercept), the VOI LUT or window, and MONOCHROME1 inverted so that bone is
always bright. Every failure raises `ImageReadError(path, reason)`.
"""

from __future__ import annotations

import io
import logging
import warnings
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from klgrade.errors import ImageReadError

log = logging.getLogger(__name__)

MAX_PIXELS = 64_000_000
"""Largest image accepted (pixels). Plain radiographs are at most ~20 MP; more is an error or a bomb."""
MAX_FILE_BYTES = 256 * 1024 * 1024
MIN_SIDE = 16
"""Smallest side (pixels) that still holds a knee joint worth grading."""
_DICOM_MAGIC_OFFSET = 128


def read_image(source: str | Path | bytes, name: str | None = None) -> np.ndarray:
    """Decode an image file (or its bytes) into a 2-D float32 array of grey levels (native scale).

    Args:
        source: a path, or the raw bytes of an upload.
        name: label for error messages when `source` is bytes (e.g. the upload's file name).

    Returns:
        (H, W) float32 array; bright = dense (bone), whatever the photometric interpretation.

    Raises:
        ImageReadError: empty, truncated, unsupported, absurdly large or undecodable input.
    """
    label = str(name if name is not None else ("<bytes>" if isinstance(source, bytes) else source))
    data = _read_bytes(source, label)
    if not data:
        raise ImageReadError(label, "empty file (0 bytes)")
    try:
        if _looks_like_dicom(data, label):
            array = _decode_dicom(data, label)
        else:
            array = _decode_pillow(data, label)
    except ImageReadError:
        raise
    except Exception as exc:  # decoders raise many types; the user needs one line, the log the detail
        log.debug("decode failure for %s", label, exc_info=True)
        raise ImageReadError(label, f"cannot decode image ({type(exc).__name__}: {exc})") from exc
    if array.ndim != 2 or min(array.shape) < MIN_SIDE:
        raise ImageReadError(label, f"image of shape {array.shape} is too small (min side {MIN_SIDE} px)")
    if not np.isfinite(array).all():
        raise ImageReadError(label, "image holds NaN or infinite values")
    return array.astype(np.float32, copy=False)


def _read_bytes(source: str | Path | bytes, label: str) -> bytes:
    if isinstance(source, bytes):
        data = source
    else:
        path = Path(source)
        try:
            if path.stat().st_size > MAX_FILE_BYTES:
                raise ImageReadError(label, f"file larger than {MAX_FILE_BYTES // 2**20} MiB")
            data = path.read_bytes()
        except FileNotFoundError:
            raise ImageReadError(label, "file not found") from None
        except IsADirectoryError:
            raise ImageReadError(label, "is a folder, not an image") from None
        except PermissionError:
            raise ImageReadError(label, "permission denied") from None
    if len(data) > MAX_FILE_BYTES:
        raise ImageReadError(label, f"file larger than {MAX_FILE_BYTES // 2**20} MiB")
    return data


def _looks_like_dicom(data: bytes, label: str) -> bool:
    has_magic = data[_DICOM_MAGIC_OFFSET : _DICOM_MAGIC_OFFSET + 4] == b"DICM"
    return has_magic or Path(label).suffix.lower() in {".dcm", ".dicom"}


def _check_size(width: int, height: int, label: str) -> None:
    if width * height > MAX_PIXELS:
        raise ImageReadError(label, f"image of {width}x{height} px exceeds the {MAX_PIXELS // 10**6} MP limit")


def _decode_pillow(data: bytes, label: str) -> np.ndarray:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))
            _check_size(*image.size, label)
            image.load()
    except (UnidentifiedImageError, Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        reason = "not a recognised image (PNG/JPEG/BMP/TIFF/DICOM)"
        if not isinstance(exc, UnidentifiedImageError):
            reason = "image too large (decompression bomb)"
        raise ImageReadError(label, reason) from None
    except OSError as exc:
        raise ImageReadError(label, f"truncated or corrupt image ({exc})") from None
    return _to_grey(image)


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


def _decode_dicom(data: bytes, label: str) -> np.ndarray:
    import pydicom
    from pydicom.errors import InvalidDicomError
    from pydicom.pixels import apply_modality_lut, apply_voi_lut

    try:
        ds = pydicom.dcmread(io.BytesIO(data))
    except InvalidDicomError:
        raise ImageReadError(label, "not a valid DICOM file") from None
    if "PixelData" not in ds:
        raise ImageReadError(label, "DICOM file holds no image (no PixelData)")
    _check_size(int(ds.get("Columns", 0)), int(ds.get("Rows", 0)), label)
    if int(ds.get("NumberOfFrames", 1) or 1) > 1:
        raise ImageReadError(label, "multi-frame DICOM is not supported (expected one radiograph)")
    pixels = ds.pixel_array
    photometric = str(ds.get("PhotometricInterpretation", "MONOCHROME2")).upper()
    if pixels.ndim == 3:  # colour DICOM (secondary capture): luma
        if photometric.startswith("YBR"):
            return pixels[..., 0].astype(np.float32)
        return (pixels[..., :3].astype(np.float32) @ np.array([0.299, 0.587, 0.114], np.float32))
    array = apply_modality_lut(pixels, ds)
    if "WindowCenter" in ds or "VOILUTSequence" in ds:
        array = apply_voi_lut(array, ds)
    array = np.asarray(array, dtype=np.float32)
    if photometric == "MONOCHROME1":
        array = array.max() + array.min() - array
    return array
