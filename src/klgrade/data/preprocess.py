"""One preprocessing path for training and inference: grey levels -> uint8 square -> normalised tensor.

Uniform margins (a knee padded or letterboxed into a larger canvas by a viewer or an export) are cut off first:
padded, the knee is smaller in the frame and the margin skews the intensity stretch, which moved 15-24% of the
shipped model's grades and often flagged the knee not gradable (docs/results.md, framing).

A lead side marker burnt in beside the joint reads to the network as an osteophyte (it moved 17% of val grades,
docs/results.md): bright, sharp-edged marks are found and painted out (`burnt_in_marks`), and the answer says so.

kneeKL224's images were CLAHE-enhanced before we had them; an image that looks unenhanced (an export of the radiograph
as acquired) is enhanced the same way before grading (`looks_unenhanced`), and the answer says so.

Training caches the uint8 stage (`to_uint8`) and normalises on the device; inference runs both stages per
image. The settings travel inside every checkpoint, so a model is always fed as it was trained.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Callable

import cv2
import numpy as np
import torch

from klgrade.constants import IMAGE_SIZE
from klgrade.data.io import Radiograph
from klgrade.uncertainty import ENHANCED, MARK_PAINTED, fine_detail, input_notes, input_reasons

PIXEL_MEAN = 0.5
PIXEL_STD = 0.25
"""Fixed normalisation of [0, 1] intensities; after the percentile stretch images span that range."""
MARGIN_TOLERANCE = 0.01
"""An outer row or column is margin, not image, when `MARGIN_SHARE` of its pixels lie within this share of the
image's range of its median grey level. 8 of kneeKL224's 6604 crops have such a strip on one side (up to 8 px); the
trim keeps those strips (it never makes an image less square), so it changes no kneeKL224 image."""
MARGIN_SHARE = 0.9
"""A label or marker burnt into the margin (up to a tenth of a row) leaves the row margin."""
MARGIN_NOISE_SPAN = 31
"""A margin with noise in it (a collimated or air region exported unclipped, or enhanced by CLAHE with the knee: noise
of std 3 grey levels left it untrimmed, moving 18% of val grades) is margin once averaged over this many pixels along
the line; no kneeKL224 crop trims differently (docs/results.md, session 21)."""
SAMPLED_SIDE = 512
"""The statistics of a larger image (the margin test of each row and column, the intensity percentiles, the grey
levels) are read on every k-th pixel, at least this many a side: a 7.5 MP radiograph then takes a third of the
time, and kneeKL224's crops are read whole (benchmarks/inference.py)."""
EDGE_BLOCK = 16
"""Lines tested at a time by the margin trim, from each edge inwards (a radiograph's outer lines are mostly busy)."""
MARK_SIDE = 160
"""Burnt-in marks are looked for in the stretched image resized to this side, whatever the model's: the settings
below are in its pixels."""
MARK_LEVEL = 250
"""A mark lies at the top of the stretched grey range: lead stops the beam (the marker is the brightest thing in the
image)."""
MARK_AREA = (50, 1000)
"""A mark covers 0.2-4% of the image: a letter 6-18% of the side high (smaller ones moved few grades); a larger bright
region is not a marker."""
MARK_ASPECT = 2.5
"""A mark is a letter, about as high as wide: a longer bright band next to a dark one is the joint's subchondral
bone plate beside the joint space (equalised knees have it saturated and sharp-edged) or a metal rod."""
MARK_DROP = 70
MARK_DROP_ALL_ROUND = 40
"""The mark's mean grey level exceeds that of its 2-pixel surround by `MARK_DROP` on average and by this much for three
quarters of it: a marker in front of soft tissue or on a dark box is darker all round, where saturated bone fades into
bone, the subchondral plate is bright on its far side from the joint space, and metal implants shade into their own
dimmer rim. No kneeKL224 image (6604) has such a mark; equalised, gamma 1.4 or sharpened val knees none either
(docs/results.md, session 21)."""
MARK_BOX_LEVEL = 20
MARK_BOX_FILL = 0.8
"""A box drawn behind a mark (digital annotations have one): dark pixels touching the mark that, with it, fill
`MARK_BOX_FILL` of a rectangle (of at most `MARK_MAX_AREA`); painted out with the mark."""
MARK_MAX_AREA = 3000
"""A mark with its box, and all marks together, cover at most 12% of the image: more such shapes make no knee with a
marker but something else (a checkerboard, a page of text), left as it is for the gradability check to refuse."""
MARK_GROWTH = 5
"""Marks are grown by this diameter before painting, to take the letter's anti-aliased edge with them."""
UNENHANCED_SIDE = 224
UNENHANCED_GAIN = 2.15
"""An image is taken for an unenhanced radiograph, and CLAHE-enhanced as the training images were, when CLAHE raises
its fine detail (`uncertainty.fine_detail`, read with the longer side at kneeKL224's whatever the image's: a stored
knee enlarged to 1024 px and read there was taken for unenhanced 9 of 41 times) more than this many times: enhancing
an enhanced image again raises it less (kneeKL224's 6604 images: at most 2.10 times; the two highest look pale)."""
DEQUANTISE_SIGMA = 0.5
"""CLAHE, and the test for an unenhanced image, read the image this many pixels' blur smoother before the stretch: an
8-bit image whose grey levels the stretch spreads apart leaves gaps in CLAHE's histogram, which clip it more and
enhance it less (val knees with their local contrast cut to a fifth and saved as 8-bit were read as unenhanced as
often as the same knees unrounded with it, 7 times less often without it)."""
UNENHANCED_MIN_DETAIL = 0.1
"""An image with less fine detail of its own (grey levels of mean |Laplacian|) is never taken for unenhanced: CLAHE on
a smooth ramp raises only its quantisation steps."""
SIDE_UNKNOWN = ("the knee's side is unknown (not in a manifest, the file name or the DICOM header): this model mirrors "
                "left knees to see every knee as a right one, so a left knee was graded unmirrored and its grade may "
                "not hold; name the side (e.g. 9003175L.png, or a manifest's side column)")


@dataclass(frozen=True)
class PreprocessConfig:
    """Args:
    size: output side in pixels (square).
    clip_percentiles: intensity percentiles mapped to 0 and 1 (robust to burnt-in labels and collimation).
    clahe: apply CLAHE (OpenCV) after the stretch to every image; kneeKL224 is already CLAHE-enhanced, so off by
        default, and then applied only to an image that looks unenhanced (`looks_unenhanced`).
    canonical_side: mirror left knees so every knee looks like a right knee (the side of a manifest, the file name
        or the DICOM header; a knee without one is seen as stored, with a warning).
    """

    size: int = IMAGE_SIZE
    clip_percentiles: tuple[float, float] = (0.5, 99.5)
    clahe: bool = False
    canonical_side: bool = False

    def __post_init__(self):
        if isinstance(self.size, bool) or not isinstance(self.size, int) or self.size < 16:
            raise ValueError(f"size must be a whole number of pixels >= 16, not {self.size!r}")
        low, high = self.clip_percentiles
        if not (isinstance(low, (int, float)) and isinstance(high, (int, float)) and 0 <= low < high <= 100):
            raise ValueError("clip_percentiles must be two numbers 0 <= low < high <= 100, "
                             f"not {self.clip_percentiles!r}")
        if not isinstance(self.clahe, bool) or not isinstance(self.canonical_side, bool):
            raise ValueError("clahe and canonical_side must be true or false")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict) -> "PreprocessConfig":
        """From checkpoint metadata; raises ValueError for unknown fields or values that cannot be used."""
        if not isinstance(values, dict):
            raise ValueError("must be a mapping of fields")
        unknown = values.keys() - cls.__dataclass_fields__.keys()
        if unknown:
            raise ValueError(f"unknown fields {sorted(unknown)}")
        values = dict(values)
        percentiles = values.get("clip_percentiles", cls.clip_percentiles)
        if not isinstance(percentiles, (list, tuple)) or len(percentiles) != 2:
            raise ValueError(f"clip_percentiles must be two numbers, not {percentiles!r}")
        values["clip_percentiles"] = tuple(percentiles)
        return cls(**values)


def trim_uniform_margins(image: np.ndarray) -> np.ndarray:
    """`image` without its uniform outer rows and columns (`MARGIN_TOLERANCE`), but never less square than it was:
    the shorter side of what is kept grows back, centred, towards the longer (so a square radiograph with a uniform
    strip of air on one side is not stretched when resized). The search repeats inside what it kept until nothing
    more comes off, so a margin of two colours (black above, white beside) goes too. Unchanged when under a quarter
    of a side would remain (a blank or nearly blank image stays what it is)."""
    tolerance = MARGIN_TOLERANCE * (float(image.max()) - float(image.min()))
    box = [(0, image.shape[0]), (0, image.shape[1])]
    while True:
        inside = image[slice(*box[0]), slice(*box[1])]
        kept = []
        for axis, (offset, _) in zip((1, 0), box):
            busy = _busy_span(inside, axis, tolerance)
            if busy is None:
                return image
            kept.append((offset + busy[0], offset + busy[1]))
        if kept == box:
            break
        box = kept
    if any((stop - start) * 4 < limit for (start, stop), limit in zip(box, image.shape)):
        return image
    side = max(stop - start for start, stop in box)
    rows, columns = (_grown(span, side, limit) for span, limit in zip(box, image.shape))
    return image[rows, columns]


def _busy_span(image: np.ndarray, axis: int, tolerance: float) -> tuple[int, int] | None:
    """The first and one past the last row (`axis` 1) or column (`axis` 0) that is not margin (`_margin_lines`),
    or None when all are. Looked for from both ends inwards, `EDGE_BLOCK` lines at a time: the medians of a
    radiograph's outer lines, not of all of them, are what it costs."""
    count = image.shape[1 - axis]

    def margin(start: int, stop: int) -> np.ndarray:
        return _margin_lines(image[start:stop] if axis == 1 else image[:, start:stop], axis, tolerance)

    for start in range(0, count, EDGE_BLOCK):
        busy = np.flatnonzero(~margin(start, min(start + EDGE_BLOCK, count)))
        if len(busy):
            first = start + int(busy[0])
            break
    else:
        return None
    stop = count
    while True:  # ends at the latest in the block holding `first`, which is busy
        start = max(stop - EDGE_BLOCK, first)
        busy = np.flatnonzero(~margin(start, stop))
        if len(busy):
            return first, start + int(busy[-1]) + 1
        stop = start


def _margin_lines(image: np.ndarray, axis: int, tolerance: float) -> np.ndarray:
    """Per row (`axis` 1) or column (`axis` 0): True when `MARGIN_SHARE` of its pixels (of every k-th one in a line
    longer than `SAMPLED_SIDE`) lie within `tolerance` of their median, as they are (a label burnt into the margin
    stays a few pixels wide) or averaged over `MARGIN_NOISE_SPAN` along the line (a noisy margin)."""
    step = _sampling_step(image.shape[axis])
    sampled = np.ascontiguousarray(image[:, ::step] if axis == 1 else image[::step], dtype=np.float32)
    averaged = cv2.blur(sampled, (MARGIN_NOISE_SPAN, 1) if axis == 1 else (1, MARGIN_NOISE_SPAN))
    return _mostly_at_median(sampled, axis, tolerance) | _mostly_at_median(averaged, axis, tolerance)


def _mostly_at_median(lines: np.ndarray, axis: int, tolerance: float) -> np.ndarray:
    """Per line: whether `MARGIN_SHARE` of its values lie within `tolerance` of their median."""
    median = np.median(lines, axis=axis, keepdims=True)
    return (np.abs(lines - median) <= tolerance).mean(axis=axis) >= MARGIN_SHARE


def _sampling_step(length: int) -> int:
    """Every k-th pixel of `length` leaves at least `SAMPLED_SIDE` of them."""
    return max(1, length // SAMPLED_SIDE)


def _grown(span: tuple[int, int], length: int, limit: int) -> slice:
    """`span` grown symmetrically to `length` (at most `limit`, shifted to stay within 0..limit)."""
    start, stop = span
    length = min(max(length, stop - start), limit)
    start = min(max((start + stop - length) // 2, 0), limit - length)
    return slice(start, start + length)


@dataclass(frozen=True)
class PreparedImage:
    """A grey-level image as the network sees it, with what only the image before resizing shows: how many pixels
    the knee had and how many grey levels (too few of either and the grade does not hold:
    `uncertainty.input_reasons`)."""

    pixels: np.ndarray
    """(size, size) uint8."""
    trimmed_shape: tuple[int, int]
    """Rows and columns once the uniform margins are trimmed."""
    grey_levels: int
    """Distinct grey levels after the stretch to 0-255, before resizing blends them."""
    side_unknown: bool = False
    """The preprocessing mirrors left knees, but this knee's side was not given."""
    marks_painted: bool = False
    """Burnt-in marks were painted out (`burnt_in_marks`)."""
    enhanced: bool = False
    """The image looked unenhanced and was CLAHE-enhanced as the training images were (`looks_unenhanced`)."""

    def reasons(self, radiograph: Radiograph | None = None) -> list[str]:
        """Why the input is not gradable whatever the network makes of it (`uncertainty.input_reasons`), its DICOM
        header's words included (`radiograph`: the decoded file; None for an array)."""
        named = (radiograph.view, radiograph.laterality, radiograph.body_part) if radiograph else (None, None, None)
        return input_reasons(*named, self.trimmed_shape, self.grey_levels)

    def notes(self) -> list[str]:
        """What the answer must say about how the input was prepared, without making it ungradable
        (`uncertainty.input_notes`, marks painted out, enhanced, an unknown side)."""
        return (input_notes(self.trimmed_shape) + ([MARK_PAINTED] if self.marks_painted else [])
                + ([ENHANCED] if self.enhanced else []) + ([SIDE_UNKNOWN] if self.side_unknown else []))


def prepare_image(image: np.ndarray, config: PreprocessConfig, side: str | None = None) -> PreparedImage:
    """Trim uniform margins, stretch, paint out burnt-in marks, optionally enhance, resize and mirror a grey-level
    image into a (size, size) uint8 array."""
    image = trim_uniform_margins(image)
    step = _sampling_step(min(image.shape))
    grey_range = _grey_range(image[::step, ::step], config.clip_percentiles)
    grey = _stretched(image, grey_range)
    marks = burnt_in_marks(grey[::step, ::step])
    if marks is not None:  # stretched again without them: a marker at the top of the range darkens the rest
        outside = cv2.resize(marks, grey.shape[::-1], interpolation=cv2.INTER_NEAREST)[::step, ::step] == 0
        grey_range = _grey_range(image[::step, ::step][outside], config.clip_percentiles)
        grey = _stretched(image, grey_range)
    grey_levels = int(np.count_nonzero(np.bincount(grey[::step, ::step].ravel(), minlength=256)))
    enhanced = not config.clahe and looks_unenhanced(_stretched(_dequantised(image[::step, ::step]), grey_range))
    if config.clahe or enhanced:
        grey = _clahe(_stretched(_dequantised(image), grey_range))
    height, width = grey.shape
    shrinking = height > config.size or width > config.size
    interpolation = cv2.INTER_AREA if shrinking else cv2.INTER_LINEAR
    pixels = cv2.resize(grey, (config.size, config.size), interpolation=interpolation)
    if marks is not None:
        painted = cv2.resize(marks, (config.size, config.size), interpolation=cv2.INTER_NEAREST)
        pixels = cv2.inpaint(pixels, painted, 3 * config.size / MARK_SIDE, cv2.INPAINT_TELEA)
    if config.canonical_side and side == "L":
        pixels = np.ascontiguousarray(pixels[:, ::-1])
    return PreparedImage(pixels, (height, width), grey_levels, config.canonical_side and side is None,
                         marks is not None, enhanced)


def _clahe(grey: np.ndarray) -> np.ndarray:
    return cv2.createCLAHE(clipLimit=2.0, tileGridSize=(8, 8)).apply(grey)


def _dequantised(image: np.ndarray) -> np.ndarray:
    return cv2.GaussianBlur(image.astype(np.float32), (0, 0), DEQUANTISE_SIGMA)


def looks_unenhanced(grey: np.ndarray) -> bool:
    """Whether a stretched uint8 image (`_dequantised` before the stretch) with fine detail of its own gains more from
    CLAHE than an enhanced one can (`UNENHANCED_SIDE`, `UNENHANCED_GAIN`, `UNENHANCED_MIN_DETAIL`)."""
    scale = UNENHANCED_SIDE / max(grey.shape)
    size = (max(1, round(grey.shape[1] * scale)), max(1, round(grey.shape[0] * scale)))
    grey = cv2.resize(grey, size, interpolation=cv2.INTER_AREA if scale < 1 else cv2.INTER_LINEAR)
    detail = fine_detail(grey)
    return detail >= UNENHANCED_MIN_DETAIL and fine_detail(_clahe(grey)) > UNENHANCED_GAIN * detail


def _grey_range(reference: np.ndarray, clip_percentiles: tuple[float, float]) -> np.ndarray:
    """The grey levels to map to 0 and 255: the `clip_percentiles` of the `reference` pixels (float64, so that the
    stretch computes in it)."""
    return np.percentile(reference, clip_percentiles)


def _stretched(image: np.ndarray, grey_range: np.ndarray) -> np.ndarray:
    """`image` as uint8, `grey_range` mapped to 0 and 255."""
    low, high = grey_range
    scale = 255.0 / (high - low) if high > low else 0.0
    return np.clip((image - low) * scale, 0, 255).astype(np.uint8)


def _box_behind(dark_labels: np.ndarray, region: np.ndarray, ring: np.ndarray) -> np.ndarray | None:
    """The dark box drawn behind a mark (digital annotations have one): the dark regions (`dark_labels`, the connected
    pixels at or below `MARK_BOX_LEVEL`) touching the mark's `ring`, when with the mark they fill a rectangle
    (`MARK_BOX_FILL`) of at most `MARK_MAX_AREA` pixels; otherwise None (a dark joint space or the air beside the leg
    is no box)."""
    touching = np.unique(dark_labels[ring & (dark_labels > 0)])
    if not len(touching):
        return None
    halo = cv2.dilate(region.astype(np.uint8), np.ones((3, 3), np.uint8)).astype(bool)
    box = np.isin(dark_labels, touching) | halo
    rows, columns = np.flatnonzero(box.any(axis=1)), np.flatnonzero(box.any(axis=0))
    rectangle = (rows[-1] - rows[0] + 1) * (columns[-1] - columns[0] + 1)
    return box if rectangle <= MARK_MAX_AREA and box.sum() >= MARK_BOX_FILL * rectangle else None


def burnt_in_marks(grey: np.ndarray) -> np.ndarray | None:
    """A (MARK_SIDE, MARK_SIDE) uint8 mask (1 inside) of the sharp-edged marks of a stretched uint8 image at the top
    of its grey range, such as a lead side marker, or at the bottom (the same marker in an image stored inverted,
    which the predictor grades inverted back: `_bright_marks` of the image and of its negative), grown by
    `MARK_GROWTH`; None when there is none, or more than `MARK_MAX_AREA`."""
    small = cv2.resize(grey, (MARK_SIDE, MARK_SIDE), interpolation=cv2.INTER_AREA)
    marks = _bright_marks(small) | _bright_marks(255 - small)
    if not marks.any() or marks.sum() > MARK_MAX_AREA:
        return None
    return cv2.dilate(marks, cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (MARK_GROWTH, MARK_GROWTH)))


def _bright_marks(small: np.ndarray) -> np.ndarray:
    """The mask of the connected regions at the top of the grey range (`MARK_LEVEL`) of `MARK_AREA` pixels, about as
    high as wide (`MARK_ASPECT`), whose surround is darker (`MARK_DROP`, `MARK_DROP_ALL_ROUND`), with any box drawn
    behind them (`_box_behind`)."""
    _, labels, stats, _ = cv2.connectedComponentsWithStats((small >= MARK_LEVEL).astype(np.uint8), connectivity=8)
    surround = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (5, 5))
    found = []
    areas = stats[1:, cv2.CC_STAT_AREA]  # label 0 is the rest of the image
    for index in 1 + np.flatnonzero((areas >= MARK_AREA[0]) & (areas <= MARK_AREA[1])):
        width, height = stats[index, cv2.CC_STAT_WIDTH], stats[index, cv2.CC_STAT_HEIGHT]
        if max(width, height) > MARK_ASPECT * min(width, height):
            continue
        region = labels == index
        ring = cv2.dilate(region.astype(np.uint8), surround).astype(bool) & ~region
        level, surround_levels = small[region].mean(), small[ring]
        if (level - surround_levels.mean() >= MARK_DROP
                and level - np.percentile(surround_levels, 75) >= MARK_DROP_ALL_ROUND):
            found.append((region, ring))
    marks = np.zeros(small.shape, np.uint8)
    if found:  # the dark regions once per image, where a mark is found (no kneeKL224 knee has one)
        _, dark_labels = cv2.connectedComponents((small <= MARK_BOX_LEVEL).astype(np.uint8), connectivity=8)
        for region, ring in found:
            box = _box_behind(dark_labels, region, ring)
            marks[region if box is None else box] = 1
    return marks


def unknown_sides_warning(config: PreprocessConfig, sides: list[str | None], what: str) -> list[str]:
    """For preprocessing that mirrors left knees: a warning saying how many of the knees in `what` have no side
    (each is seen as stored, a left one unmirrored), if any."""
    unknown = sum(side is None for side in sides) if config.canonical_side else 0
    if not unknown:
        return []
    return [f"{what}: {unknown} of {len(sides)} knees have no side (not in a manifest, the file name or the DICOM "
            f"header): the model mirrors left knees, so a left knee among them is seen unmirrored"]


def to_uint8(image: np.ndarray, config: PreprocessConfig, side: str | None = None) -> np.ndarray:
    """`prepare_image`'s pixels: what training caches."""
    return prepare_image(image, config, side).pixels


def normalize(batch_uint8: torch.Tensor, transform: Callable[[torch.Tensor], torch.Tensor] | None = None) -> torch.Tensor:
    """uint8 images (any leading shape) -> float32 network input, the same for training and inference.

    Args:
        transform: applied to the [0, 1] intensities before standardisation (training's augmentation).
    """
    unit = batch_uint8.float() / 255.0
    if transform is not None:
        unit = transform(unit)
    return (unit - PIXEL_MEAN) / PIXEL_STD


def preprocess(image: np.ndarray, config: PreprocessConfig, side: str | None = None) -> torch.Tensor:
    """A grey-level image -> (1, size, size) float32 tensor, exactly as the network was trained on."""
    return normalize(torch.from_numpy(to_uint8(image, config, side))).unsqueeze(0)
