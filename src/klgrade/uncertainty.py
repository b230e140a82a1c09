"""How sure an answer is: temperature, contiguous conformal grade sets, and distance from the training data.

Grade sets: split conformal prediction with the least-ambiguous score 1 - p(true grade) (Sadinle, Lei and
Wasserman, "Least Ambiguous Set-Valued Classifiers with Bounded Error Levels", JASA 2019), with a threshold per
grade (their class-specific coverage; Vovk's Mondrian conformal prediction): grade k joins the set when
1 - p(k) is within the conformal quantile of the calibration images of grade k. So the set holds the true grade
with probability >= 1 - alpha for the knees of every grade, not only on average: with one threshold for all,
the doubtful KL1 knees were covered 77% of the time for a stated 90% (docs/results.md). The set is then made
contiguous, from the lowest to the highest grade kept, and always holds the most probable grade; a contiguous
set contains the least-ambiguous one, so the guarantee carries over (the ordinal sets of Lu et al., MICCAI 2022,
https://arxiv.org/abs/2207.02238, take the same care to be intervals). The scores and their grades are stored,
so alpha can be chosen per call. (MAPIE and crepes build the least-ambiguous sets but do not make them
contiguous.)

Gradability: the Mahalanobis distance of the penultimate features to the nearest grade's mean under a shared
covariance (Lee, Lee, Lee and Shin, "A Simple Unified Framework for Detecting Out-of-Distribution Samples and
Adversarial Attacks", NeurIPS 2018), fitted on training images and thresholded at a quantile of the
calibration images' distances; plus a check for blank, near-constant images, and checks of the input itself that
no network output can overrule (`input_reasons`: a DICOM view other than the frontal one, too few pixels, too few
grey levels).

Processing shift: a knee radiograph whose contrast was processed unlike the training images (enhanced again,
equalised) is still gradable, but its grade may move with the processing (docs/results.md, robustness). Three
statistics of the preprocessed image that such processing changes (grey-level spread, local-to-global contrast,
fine detail), their Mahalanobis distance to the training images' mean under their covariance, and the same
kind of threshold as above, give a warning, not a refusal.

Sharpness shift: strong noise, a blur, sharpening or an image enlarged from fewer pixels move grades too, and the
contrast statistics weigh them little on purpose. Two more statistics (the noise level after Immerkaer 1996, and
the ratio of fine to mid-scale detail), a second profile of the same kind, and a warning of their own.

Framing shift: a knee cropped tighter than the training images (the joint larger in the frame, as another site
may crop it), or framed wider (smaller in the frame), is still gradable, but its grade may move with the framing
(docs/results.md, framing). A linear read-out of the log crop share from the penultimate features (ridge
regression; the network's features carry the anatomy's scale in the frame), fitted on training images re-framed
at random shares, estimates how much of the training images' field of view an image shows; beyond a threshold
set on the calibration images, a warning. Two read-outs, one fitted on tighter framings and one on wider ones
(the images shrunk inside a margin: kneeKL224's crops hold nothing beyond their frame), since one line over
both ranges read tighter crops less well.

Polarity: a radiograph saved with its grey levels inverted (bone dark, soft tissue bright, as a MONOCHROME1 image
exported without its inversion; kneeKL224 itself holds 84 such knees, docs/results.md) moves grades and is mostly
still called gradable. A linear read-out of the penultimate features, fitted on training images and their
inversions, tells such an image; the predictor grades it inverted back (`Predictor.raw_outputs`) and says so.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field

import cv2
import numpy as np

from klgrade.constants import NUM_GRADES

DEFAULT_ALPHA = 0.1
"""Sets hold the true grade for at least 90% of images by default."""
BLANK_STD = 2.0
"""A preprocessed uint8 image with less spread than this (grey levels) holds nothing to grade."""
NOT_A_KNEE = "not gradable: the image does not look like the knee radiographs the model was trained on"
FAR_FROM_TRAINING_KNEES = ("not gradable: the model's features place the image far from every knee it was trained on, "
                           "though its contrast and detail are like its radiographs' (a severe or operated knee, "
                           "another joint or view?): the grade given is not backed by the training data")
"""The reason for an image far from the training knees in the features whose image statistics are within both
profiles (`PROFILES`): the feature density flags severe knees too (6 of 27 KL4 val knees, session 19: they lie
among the non-knee images in feature space), whose statistics are a radiograph's, where 48 of the 51 non-knee
test images lie outside a profile (docs/results.md, session 21). Telling a clinician that a severe knee "does not
look like" a knee radiograph would be wrong."""
BLANK = "not gradable: the image is blank or nearly constant"
NOT_FRONTAL = ("not gradable: the DICOM header names a {kind} view (ViewPosition {view}); Kellgren-Lawrence grades "
               "are read on frontal (AP/PA) knee radiographs")
MIN_KNEE_PIXELS = 64
"""Fewer pixels a side (once uniform margins are trimmed) and the grade does not hold: val knees shrunk to 64 px
keep 88% of their grades and 89% set coverage, at 48 px 81% / 86%, at 32 px 60% / 79%, mostly unflagged
(docs/results.md, inputs)."""
MIN_GREY_LEVELS = 10
"""Fewer distinct grey levels (binarised or posterised) and the grade does not hold: at 10 levels val knees keep
90% of their grades, at 8 85%, at 7 73% with the mean grade 0.4 higher, mostly unflagged (docs/results.md, inputs)."""
TOO_SMALL = ("not gradable: the image is only {columns} pixels wide and {rows} high (uniform margins trimmed); grades "
             f"hold from {MIN_KNEE_PIXELS} pixels a side")
MAX_ASPECT = 1.8
"""Longer side over shorter side (uniform margins trimmed) beyond which an image is not one knee framed for grading:
the training knees are square, a single knee on a portrait detector is 1.25, two knees cropped side by side are 2
and a full-leg view 3 or more; stretched to a square for the network, such an image is graded as a squashed knee
(pairs of val knees side by side were graded KL 4 for 24 of 60 pairs, docs/results.md, two knees in one image)."""
SQUEEZED_ASPECT = 1.1
"""Longer side over shorter side (uniform margins trimmed) beyond which an answer warns that the image was not square:
squeezed to the network's square, the knee's proportions change, and no way of making it square holds the grade for
every meaning of a non-square crop (docs/results.md, non-square inputs: at 1.1:1, 9-11% of val grades moved, at
1.25:1 up to 24%, mostly unwarned before)."""
SQUEEZED = ("the image is {columns} pixels wide and {rows} high (uniform margins trimmed), not square: squeezed to a "
            "square for the model, the knee's proportions change and the grade may change with them; crop it square, "
            "the joint centred")
MARK_PAINTED = ("a sharp-edged mark burnt into the image at its brightest level (a lead side marker?; at its darkest "
                "in an image stored inverted) was painted out before grading: beside the joint such a mark reads as "
                "an osteophyte; check it was not metal in the knee")
ENHANCED = ("the image looked unenhanced (CLAHE raised its fine detail more than it raises any training image's): "
            "CLAHE-enhanced before grading, as the training images were; a grade near a boundary can still move")
ELONGATED = ("not gradable: the image is {columns} pixels wide and {rows} high (uniform margins trimmed), {ratio:.1f} "
             "times as {longer} as {shorter}: two knees side by side or a full-leg view? Grades are read on one knee "
             "framed about square around the joint")
BOTH_KNEES = ("not gradable: the DICOM header says the image holds both knees ({named}); grades are read on one "
              "knee: crop each and grade it alone")
TOO_FEW_GREY_LEVELS = ("not gradable: the image holds only {levels} grey levels (binarised or posterised?); grades "
                       f"hold from {MIN_GREY_LEVELS}")
NON_FRONTAL_VIEWS = {
    "lateral": {"LL", "RL", "LLD", "RLD", "LAT", "LATERAL"},
    "oblique": {"LLO", "RLO", "OBL", "OBLIQUE"},
    "axial (patellar)": {"AXIAL", "SKYLINE", "SUNRISE", "MERCHANT", "TANGENTIAL"},
}
"""Words of a DICOM `ViewPosition` (its defined terms LL, RL, LLD, RLD, LLO, RLO, and what vendors write) that name
a view other than the frontal one the model was trained on (a knee series holds laterals and skylines beside it)."""
OTHER_BODY_PARTS = frozenset({
    "CHEST", "THORAX", "ABDOMEN", "PELVIS", "HIP", "SPINE", "CSPINE", "TSPINE", "LSPINE", "SSPINE", "SKULL", "HEAD",
    "BRAIN", "NECK", "JAW", "SHOULDER", "CLAVICLE", "SCAPULA", "HUMERUS", "ARM", "ELBOW", "FOREARM", "WRIST", "HAND",
    "FINGER", "THUMB", "FOOT", "ANKLE", "TOE", "HEEL", "CALCANEUS", "BREAST", "HEART", "RIB", "STERNUM", "SACRUM",
    "COCCYX"})
"""Words of a DICOM `BodyPartExamined` (its defined terms, and what vendors write) that name a part other than the
knee. Parts that may hold a knee (KNEE, LEG, FEMUR, TIBIA, LOWER LIMB, EXTREMITY) are not among them."""
NOT_A_KNEE_PART = ("not gradable: the DICOM header names the body part {part} (BodyPartExamined); Kellgren-Lawrence "
                   "grades are read on knee radiographs")
FRAMING_ADVICE = "crop as the training images are, the joint centred and the knee filling the square"
FRAMING_SHIFT = ("the knee fills more of the image than in the training images (cropped tighter around the "
                 f"joint?): the grade may change with the framing; {FRAMING_ADVICE}")
FRAMING_WIDE_SHIFT = ("the knee fills less of the image than in the training images (framed wider, or padded?): "
                      f"the grade may change with the framing; {FRAMING_ADVICE}")
FRAMING_UNREAD = ("the knee's framing is unlike the training images' (read as both tighter and wider): the grade may "
                  f"change with the framing; {FRAMING_ADVICE}")
PROCESSING_STATISTICS = ("grey-level spread", "local-to-global contrast", "fine detail")
"""What `processing_statistics` measures per image, in its column order."""
PROCESSING_SHIFT = ("the image's contrast processing differs from the training images' (e.g. enhanced or "
                    "equalised again): the grade may change with such processing")
SHARPNESS_STATISTICS = ("noise level", "fine-to-mid detail")
"""What `sharpness_statistics` measures per image, in its column order."""
SHARPNESS_SHIFT = ("the image's noise or sharpness differs from the training images' (noisier, blurred, sharpened, "
                   "or enlarged from fewer pixels?): the grade may change with it")
POLARITY_CORRECTED = ("the image looked inverted (bone dark, soft tissue bright, as a MONOCHROME1 radiograph saved "
                      "without its inversion): it was graded with its grey levels inverted back")
ORIENTATION_CORRECTED = ("the image looked turned (stored sideways or upside down, as an export that drops its "
                         "orientation leaves it): it was graded turned upright, as the training knees stand")
SHIFT_WARNINGS = {"processing": PROCESSING_SHIFT, "sharpness": SHARPNESS_SHIFT, "framing": FRAMING_SHIFT,
                  "framing_wide": FRAMING_WIDE_SHIFT, "polarity": POLARITY_CORRECTED,
                  "orientation": ORIENTATION_CORRECTED}
"""The warning each kind of shift adds to an answer (`Predictor.shifts`)."""


def shift_warnings(kinds: list[str]) -> list[str]:
    """The warnings of the kinds of shift seen in one image (`SHIFT_WARNINGS`), in that order; an image read as framed
    both tighter and wider (no val knee is; pairs of knees side by side often are) gets one warning that says so
    instead of two that contradict each other."""
    if {"framing", "framing_wide"} <= set(kinds):
        kinds = [kind for kind in kinds if kind != "framing_wide"]
        return [FRAMING_UNREAD if kind == "framing" else SHIFT_WARNINGS[kind] for kind in kinds]
    return [SHIFT_WARNINGS[kind] for kind in kinds]


def log_probabilities(probabilities: np.ndarray) -> np.ndarray:
    """log p, with zeros clipped: the combined output's log-probabilities that a temperature divides."""
    return np.log(np.clip(np.asarray(probabilities, dtype=np.float64), 1e-12, None))


def apply_temperature(probabilities: np.ndarray, temperature: float) -> np.ndarray:
    """softmax(log p / T) per row: combined probabilities (ensemble and TTA mean) scaled by a temperature."""
    scaled = log_probabilities(probabilities) / temperature
    scaled -= scaled.max(axis=1, keepdims=True)
    exponentials = np.exp(scaled)
    return exponentials / exponentials.sum(axis=1, keepdims=True)


def conformal_scores(probabilities: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """(N,) nonconformity of each calibration image: 1 - the probability of its true grade."""
    probabilities = np.asarray(probabilities, dtype=np.float64)
    return 1 - probabilities[np.arange(len(probabilities)), np.asarray(labels)]


def conformal_threshold(scores: np.ndarray, alpha: float = DEFAULT_ALPHA) -> float:
    """The ceil((n + 1)(1 - alpha)) / n empirical quantile of the calibration scores (1.0: every grade)."""
    scores = np.sort(np.asarray(scores, dtype=np.float64))
    rank = math.ceil((len(scores) + 1) * (1 - alpha))
    return float(scores[rank - 1]) if rank <= len(scores) else 1.0


def grade_thresholds(scores: np.ndarray, grades: np.ndarray, alpha: float = DEFAULT_ALPHA) -> np.ndarray:
    """(5,) the conformal threshold of each grade, from the calibration images of that grade alone (1.0, every
    image's set holds the grade, where there are too few of them for 1 - alpha)."""
    scores, grades = np.asarray(scores, dtype=np.float64), np.asarray(grades)
    return np.array([conformal_threshold(scores[grades == grade], alpha) for grade in range(NUM_GRADES)])


def uncertified_grades(grades: np.ndarray, alpha: float) -> list[int]:
    """The grades with too few calibration images to promise 1 - alpha for them (n < ceil((n + 1)(1 - alpha)),
    e.g. fewer than 99 for alpha 0.01): their threshold is 1.0, so every grade set reaches them."""
    counts = np.bincount(np.asarray(grades, dtype=np.int64), minlength=NUM_GRADES)
    return [grade for grade, n in enumerate(counts) if math.ceil((n + 1) * (1 - alpha)) > n]


def smallest_alpha(grades: np.ndarray) -> float:
    """The smallest alpha for which every grade's calibration images suffice: max over grades of 1 / (n + 1),
    rounded up to 3 decimals."""
    counts = np.bincount(np.asarray(grades, dtype=np.int64), minlength=NUM_GRADES)
    return math.ceil(1000 / (counts.min() + 1)) / 1000


def uncertified_warning(grades: list[int], alpha: float) -> str:
    """The answer's warning when `uncertified_grades` is not empty."""
    return (f"grade set: the calibration holds too few knees of KL {', '.join(map(str, grades))} to promise "
            f"{100 * (1 - alpha):g}% coverage for {'that grade' if len(grades) == 1 else 'those grades'}: every set "
            f"includes {'it' if len(grades) == 1 else 'them'} (choose a larger alpha)")


def grade_sets(probabilities: np.ndarray, thresholds: float | np.ndarray) -> list[list[int]]:
    """Per image, the grades from the lowest to the highest with probability >= 1 - threshold (one for all
    grades, or one per grade: `grade_thresholds`), and the mode."""
    probabilities = np.asarray(probabilities, dtype=np.float64)
    kept = probabilities >= 1 - np.asarray(thresholds, dtype=np.float64) - 1e-12
    kept[np.arange(len(kept)), probabilities.argmax(axis=1)] = True
    grades = np.arange(probabilities.shape[1])
    low = np.where(kept, grades, grades.max()).min(axis=1)
    high = np.where(kept, grades, 0).max(axis=1)
    return [list(range(lo, hi + 1)) for lo, hi in zip(low, high)]


def answered_sets(sets: list[list[int]], gradable: list[bool]) -> list[list[int]]:
    """The grade sets as answered: all five grades where the answer is not gradable (a set certifies nothing for an
    input unlike those it was calibrated on)."""
    return [grades if ok else list(range(NUM_GRADES)) for grades, ok in zip(sets, gradable)]


def set_label(grades: list[int]) -> str:
    """A contiguous grade set as people write it: `2`, `1-2`."""
    return str(grades[0]) if len(grades) == 1 else f"{grades[0]}-{grades[-1]}"


@dataclass
class FeatureDensity:
    """Grade means and a shared precision matrix of penultimate features, and the distance threshold."""

    means: np.ndarray
    """(K, D) mean penultimate features of each grade."""
    precision: np.ndarray
    """(D, D) inverse of the shared covariance."""
    threshold: float

    @classmethod
    def fit(cls, features: np.ndarray, labels: np.ndarray, shrinkage: float = 1e-3) -> "FeatureDensity":
        """Fit on training features; the threshold is set later from calibration features (`with_threshold`)."""
        features, labels = np.asarray(features, dtype=np.float64), np.asarray(labels)
        grades = sorted(set(labels.tolist()))
        means = np.stack([features[labels == g].mean(axis=0) for g in grades])
        centred = features - means[np.searchsorted(grades, labels)]
        covariance = centred.T @ centred / len(features)
        covariance += shrinkage * np.trace(covariance) / len(covariance) * np.eye(len(covariance))
        return cls(means, np.linalg.inv(covariance), math.inf)

    @classmethod
    def from_dict(cls, values: dict) -> "FeatureDensity":
        """From checkpoint metadata (`to_dict`): the matrices become arrays once, not at every batch.

        Raises ValueError naming the field that is missing or of the wrong shape.
        """
        _require(values, ("means", "precision", "threshold"))
        means = _finite_array(values["means"], "means", ndim=2)
        precision = _finite_array(values["precision"], "precision", ndim=2)
        if precision.shape != (means.shape[1], means.shape[1]):
            raise ValueError(f"precision is {precision.shape}, not ({means.shape[1]}, {means.shape[1]}) as the means")
        threshold = _finite_array(values["threshold"], "threshold", ndim=0)
        return cls(means, precision, float(threshold))

    def distances(self, features: np.ndarray) -> np.ndarray:
        """(N,) squared Mahalanobis distance to the nearest grade mean (a matrix product, not a three-operand einsum:
        that ran unblocked, 12% of grading a batch on the CPU)."""
        difference = np.asarray(features, dtype=np.float64)[:, None, :] - self.means[None]
        return ((difference @ self.precision) * difference).sum(axis=2).min(axis=1)

    def with_threshold(self, features: np.ndarray, flagged_share: float) -> "FeatureDensity":
        """Threshold at the (1 - flagged_share) quantile of these (in-distribution) features' distances."""
        return FeatureDensity(self.means, self.precision, float(np.quantile(self.distances(features), 1 - flagged_share)))

    def to_dict(self) -> dict:
        """JSON-ready, matrices rounded to 7 decimals (the checkpoint metadata is text)."""
        return {"means": np.round(self.means, 7).tolist(), "precision": np.round(self.precision, 7).tolist(),
                "threshold": self.threshold}


def ridge_readout(features: np.ndarray, target: np.ndarray, shrinkage: float) -> tuple[np.ndarray, float]:
    """Weights (D,) and bias of the ridge regression of `target` on `features`; the ridge is `shrinkage` times the
    mean feature variance, so one setting suits any network's feature scale."""
    features, target = np.asarray(features, dtype=np.float64), np.asarray(target, dtype=np.float64)
    mean = features.mean(axis=0)
    centred = features - mean
    gram = centred.T @ centred
    gram += shrinkage * np.trace(gram) / len(gram) * np.eye(len(gram))
    weights = np.linalg.solve(gram, centred.T @ (target - target.mean()))
    return weights, float(target.mean() - mean @ weights)


@dataclass
class PolarityProbe:
    """Tells an inverted image (bone dark) from its penultimate features: a linear read-out of 0 (upright) or 1
    (inverted), fitted on as many images of each; above 1/2, inverted."""

    weights: np.ndarray
    """(D,) weights of the read-out."""
    bias: float

    @classmethod
    def fit(cls, features: np.ndarray, inverted: np.ndarray, shrinkage: float = 1e-3) -> "PolarityProbe":
        """Ridge regression of `inverted` (bool, (N,)) on features (the ridge as in `ridge_readout`)."""
        return cls(*ridge_readout(features, np.asarray(inverted, dtype=np.float64), shrinkage))

    def inverted(self, features: np.ndarray) -> np.ndarray:
        """(N,) True where an image looks inverted."""
        return np.asarray(features, dtype=np.float64) @ self.weights + self.bias > 0.5

    def to_dict(self) -> dict:
        return {"weights": np.round(self.weights, 9).tolist(), "bias": self.bias}

    @classmethod
    def from_dict(cls, values: dict) -> "PolarityProbe":
        """From checkpoint metadata; raises ValueError naming the field that is missing or unusable."""
        _require(values, ("weights", "bias"))
        return cls(_finite_array(values["weights"], "weights", ndim=1),
                   float(_finite_array(values["bias"], "bias", ndim=0)))


@dataclass
class FramingProbe:
    """Estimates the crop share of an image from its penultimate features: 1 = the training images' framing, 0.75 =
    cropped to the central 75% (the knee 1.33x larger in the frame), 1.2 = framed 20% wider; warns below
    `threshold`, or above it for a probe of wider framings."""

    weights: np.ndarray
    """(D,) weights of the linear read-out of log(share)."""
    bias: float
    threshold: float
    wider: bool = False
    """Fitted on wider framings (shares >= 1): warns above the threshold."""

    @classmethod
    def fit(cls, features: np.ndarray, shares: np.ndarray, shrinkage: float = 1e-5,
            wider: bool = False) -> "FramingProbe":
        """Ridge regression of log(share) on features; the ridge is `shrinkage` times the mean feature variance
        (the default chosen by two-fold cross-validation on re-framed train images, docs/results.md). The threshold
        is set later (`with_threshold`)."""
        weights, bias = ridge_readout(features, np.log(np.asarray(shares, dtype=np.float64)), shrinkage)
        return cls(weights, bias, 0.0, wider)

    def shares(self, features: np.ndarray) -> np.ndarray:
        """(N,) estimated crop share of each image."""
        return np.exp(np.asarray(features, dtype=np.float64) @ self.weights + self.bias)

    def with_threshold(self, features: np.ndarray, warned_share: float) -> "FramingProbe":
        """Threshold so that `warned_share` of these (as framed in training) images are warned."""
        quantile = 1 - warned_share if self.wider else warned_share
        threshold = float(np.quantile(self.shares(features), quantile))
        return FramingProbe(self.weights, self.bias, threshold, self.wider)

    def shifted(self, features: np.ndarray) -> np.ndarray:
        """(N,) True where an image looks framed tighter (or, `wider`, wider) than the training images."""
        shares = self.shares(features)
        return shares > self.threshold if self.wider else shares < self.threshold

    def to_dict(self) -> dict:
        return {"weights": np.round(self.weights, 9).tolist(), "bias": self.bias, "threshold": self.threshold,
                "wider": self.wider}

    @classmethod
    def from_dict(cls, values: dict) -> "FramingProbe":
        """From checkpoint metadata; raises ValueError naming the field that is missing or unusable."""
        _require(values, ("weights", "bias", "threshold"))
        threshold = float(_finite_array(values["threshold"], "threshold", ndim=0))
        if not 0 < threshold <= 2:
            raise ValueError(f"threshold must be a crop share in (0, 2], not {threshold}")
        wider = values.get("wider", False)
        if not isinstance(wider, bool):
            raise ValueError(f"wider must be true or false, not {wider!r}")
        return cls(_finite_array(values["weights"], "weights", ndim=1),
                   float(_finite_array(values["bias"], "bias", ndim=0)), threshold, wider)


def _require(values, names: tuple[str, ...]) -> None:
    """ValueError unless `values` is a mapping holding every one of `names`."""
    if not isinstance(values, dict) or not set(names) <= values.keys():
        raise ValueError(f"needs {', '.join(names[:-1])} and {names[-1]}")


def _finite_array(values, name: str, ndim: int) -> np.ndarray:
    """`values` as a float64 array of `ndim` dimensions (none of them empty) and finite entries, or ValueError."""
    if isinstance(values, bool) or (ndim == 0 and not isinstance(values, (int, float))):
        raise ValueError(f"{name} must be a number")
    try:
        array = np.asarray(values, dtype=np.float64)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must hold numbers only") from None
    if array.ndim != ndim or 0 in array.shape:
        raise ValueError(f"{name} must be a non-empty {ndim}-d array of numbers")
    if not np.isfinite(array).all():
        raise ValueError(f"{name} holds values that are not finite")
    return array


@dataclass
class Calibration:
    """What `klgrade calibrate` stores in a checkpoint, as arrays: the temperature, the conformal scores with
    their grades, the gradability and processing densities, the framing probes and the polarity probe (None where
    absent)."""

    temperature: float = 1.0
    scores: np.ndarray = field(default_factory=lambda: np.zeros(0))
    grades: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))
    """Empty for calibrations stored before grade sets had a threshold per grade."""
    density: FeatureDensity | None = None
    processing: FeatureDensity | None = None
    sharpness: FeatureDensity | None = None
    """Absent from calibrations stored before session 19."""
    framing: FramingProbe | None = None
    framing_wide: FramingProbe | None = None
    polarity: PolarityProbe | None = None

    @classmethod
    def from_dict(cls, values: dict) -> "Calibration":
        """Each field checked: a hand-edited or damaged checkpoint fails here, naming the field, instead of
        crashing later or answering with a wrong grade set. Raises ValueError."""
        if not isinstance(values, dict):
            raise ValueError("must be a mapping of fields")
        temperature = float(_finite_array(values.get("temperature"), "temperature", ndim=0))
        if temperature <= 0:
            raise ValueError(f"temperature must be positive, not {temperature}")
        scores = _finite_array(values.get("conformal_scores"), "conformal_scores", ndim=1)
        if scores.min() < 0 or scores.max() > 1:
            raise ValueError("conformal_scores must lie in [0, 1] (1 - probability of the true grade)")
        grades = np.zeros(0, dtype=np.int64)
        if "conformal_grades" in values:
            stored = _finite_array(values["conformal_grades"], "conformal_grades", ndim=1)
            if len(stored) != len(scores):
                raise ValueError(f"{len(stored)} conformal_grades for {len(scores)} conformal_scores")
            if not np.isin(stored, np.arange(NUM_GRADES)).all():
                raise ValueError(f"conformal_grades must be whole grades 0 to {NUM_GRADES - 1}")
            grades = stored.astype(np.int64)
        parts = {}
        for name, kind in (("density", FeatureDensity), ("processing", FeatureDensity), ("sharpness", FeatureDensity),
                           ("framing", FramingProbe), ("framing_wide", FramingProbe), ("polarity", PolarityProbe)):
            try:
                parts[name] = kind.from_dict(values[name]) if name in values else None
            except ValueError as exc:
                raise ValueError(f"{name}: {exc}") from None
        for name, wider in (("framing", False), ("framing_wide", True)):
            if parts[name] is not None and parts[name].wider != wider:
                raise ValueError(f"{name}: a probe of {'tighter' if wider else 'wider'} framings")
        for name, (_, columns) in PROFILES.items():
            profile = parts[name]
            if profile is not None and profile.means.shape[1] != len(columns):
                raise ValueError(f"{name}: {profile.means.shape[1]} statistics, not {len(columns)}")
        return cls(temperature, scores, grades, **parts)

    @property
    def profiles(self) -> dict[str, FeatureDensity]:
        """The image-statistics profiles stored, by the kind of shift they warn of (a field per kind of `PROFILES`)."""
        return {kind: profile for kind in PROFILES if (profile := getattr(self, kind)) is not None}

    @property
    def framings(self) -> dict[str, FramingProbe]:
        """The framing read-outs stored, by the kind of shift they warn of (`SHIFT_WARNINGS`)."""
        probes = {"framing": self.framing, "framing_wide": self.framing_wide}
        return {kind: probe for kind, probe in probes.items() if probe is not None}


def header_words(text: str | None) -> set[str]:
    """The whole words of a DICOM header's text (a view, a body part), upper case ("BILATERAL PA" -> BILATERAL, PA)."""
    return set(re.split(r"[^A-Z]+", (text or "").upper()))


def view_reason(view: str | None) -> str | None:
    """Why a radiograph whose DICOM header names `view` is not gradable as a view; None for a frontal or unnamed
    view (a whole word must match: "BILATERAL PA" is frontal, `both_knees_reason` speaks of its two knees)."""
    words = header_words(view)
    for kind, names in NON_FRONTAL_VIEWS.items():
        if words & names:
            return NOT_FRONTAL.format(kind=kind, view=view)
    return None


def both_knees_reason(view: str | None, laterality: str | None) -> str | None:
    """Why a radiograph is not gradable when its DICOM header says it holds both knees: laterality B (both), or a
    view named bilateral; None otherwise."""
    if laterality == "B":
        return BOTH_KNEES.format(named="laterality B")
    if "BILATERAL" in header_words(view):
        return BOTH_KNEES.format(named=f"ViewPosition {view}")
    return None


def body_part_reason(body_part: str | None) -> str | None:
    """Why a radiograph whose DICOM header names `body_part` is not gradable; None for a knee, a part that may hold
    one, or silence (a whole word of `OTHER_BODY_PARTS` must be named, and no KNEE)."""
    words = header_words(body_part)
    return NOT_A_KNEE_PART.format(part=body_part) if words & OTHER_BODY_PARTS and "KNEE" not in words else None


def input_reasons(view: str | None, laterality: str | None, body_part: str | None, trimmed_shape: tuple[int, int],
                  grey_levels: int) -> list[str]:
    """Why an input is not gradable whatever the network makes of it: its DICOM header names another body part than
    the knee (`body_part_reason`), a view other than the frontal one (`view_reason`) or both knees
    (`both_knees_reason`), it is far from square (`MAX_ASPECT`), it has too few pixels or too few grey levels to
    grade (`data.preprocess.PreparedImage` measures these before resizing hides them)."""
    reasons = [reason for reason in (body_part_reason(body_part), view_reason(view),
                                     both_knees_reason(view, laterality)) if reason]
    rows, columns = trimmed_shape
    if min(rows, columns) < MIN_KNEE_PIXELS:
        reasons.append(TOO_SMALL.format(rows=rows, columns=columns))
    elif max(rows, columns) > MAX_ASPECT * min(rows, columns):  # a sliver is too small before it is elongated
        longer, shorter = ("wide", "tall") if columns > rows else ("tall", "wide")
        reasons.append(ELONGATED.format(rows=rows, columns=columns, ratio=max(rows, columns) / min(rows, columns),
                                        longer=longer, shorter=shorter))
    if 1 < grey_levels < MIN_GREY_LEVELS:  # one level is a blank image, which `gradability` names
        reasons.append(TOO_FEW_GREY_LEVELS.format(levels=grey_levels))
    return reasons


def input_notes(trimmed_shape: tuple[int, int]) -> list[str]:
    """What an answer must say about an input that stays gradable: an image neither square nor far from it
    (`SQUEEZED_ASPECT`, `MAX_ASPECT`)."""
    rows, columns = trimmed_shape
    ratio = max(rows, columns) / max(min(rows, columns), 1)
    return [SQUEEZED.format(rows=rows, columns=columns)] if SQUEEZED_ASPECT < ratio <= MAX_ASPECT else []


def gradability(images_uint8: np.ndarray, features: np.ndarray | None, density: FeatureDensity | None,
                radiograph_like: np.ndarray | None = None) -> list[list[str]]:
    """Per image, the reasons it is not gradable (empty when it is). `radiograph_like`: (N,) True where the image's
    statistics lie within the training images' profiles; one far from the training knees in the features then
    gets `FAR_FROM_TRAINING_KNEES` instead of `NOT_A_KNEE`."""
    reasons: list[list[str]] = [[] for _ in images_uint8]
    spread = np.asarray(images_uint8, dtype=np.float32).reshape(len(images_uint8), -1).std(axis=1)
    far = density.distances(features) > density.threshold if density is not None else np.zeros(len(reasons), bool)
    like = np.zeros(len(reasons), bool) if radiograph_like is None else radiograph_like
    for notes, blank, outlier, radiograph in zip(reasons, spread < BLANK_STD, far, like):
        if blank:
            notes.append(BLANK)
        elif outlier:
            notes.append(FAR_FROM_TRAINING_KNEES if radiograph else NOT_A_KNEE)
    return reasons


def fine_detail(grey: np.ndarray) -> float:
    """Mean |Laplacian| of a grey-level image after a 1.5-px blur (so that noise and JPEG blocks weigh little)."""
    return float(np.abs(cv2.Laplacian(cv2.GaussianBlur(np.asarray(grey, np.float32), (0, 0), 1.5), cv2.CV_32F)).mean())


def processing_statistics(images_uint8: np.ndarray) -> np.ndarray:
    """(N, 3) per preprocessed image: grey-level spread, mean local spread over it, mean fine detail (|Laplacian|
    after a slight blur, so that noise and JPEG blocks weigh little). CLAHE raises the last two, equalisation
    the first."""
    rows = []
    for image in np.asarray(images_uint8):
        grey = image.astype(np.float32)
        spread = float(grey.std())
        window = (max(3, grey.shape[0] // 10),) * 2
        mean = cv2.blur(grey, window)
        local = float(np.sqrt(np.maximum(cv2.blur(grey * grey, window) - mean * mean, 0)).mean())
        rows.append([spread, local / max(spread, 1e-3), fine_detail(grey)])
    return np.array(rows, dtype=np.float64).reshape(-1, len(PROCESSING_STATISTICS))


NOISE_KERNEL = np.array([[1, -2, 1], [-2, 4, -2], [1, -2, 1]], dtype=np.float32)


def sharpness_statistics(images_uint8: np.ndarray) -> np.ndarray:
    """(N, 2) per preprocessed image: the log noise level (Immerkaer 1996: the mean response to a kernel blind to
    smooth ramps, as a Gaussian sigma) and the log ratio of fine to mid-scale detail (mean |Laplacian| as it is, over
    that after a 1.5-px blur). Noise raises both; a blur, or an enlargement from fewer pixels, lowers both;
    sharpening raises the second. `processing_statistics` weigh such changes little on purpose."""
    rows = []
    for image in np.asarray(images_uint8):
        grey = image.astype(np.float32)
        noise = np.sqrt(np.pi / 2) / 6 * float(np.abs(cv2.filter2D(grey, -1, NOISE_KERNEL))[1:-1, 1:-1].mean())
        fine = float(np.abs(cv2.Laplacian(grey, cv2.CV_32F)).mean())
        mid = fine_detail(grey)
        rows.append([np.log(noise + 1e-3), np.log((fine + 1e-3) / (mid + 1e-3))])
    return np.array(rows, dtype=np.float64).reshape(-1, len(SHARPNESS_STATISTICS))


PROFILES = {"processing": (processing_statistics, PROCESSING_STATISTICS),
            "sharpness": (sharpness_statistics, SHARPNESS_STATISTICS)}
"""The kinds of shift read from image statistics (a profile of the training images' each), with the function that
measures them and the names of its columns."""


def profile_statistics(kind: str, images_uint8: np.ndarray) -> np.ndarray:
    """(N, columns) statistics of preprocessed images for the profile `kind` (`PROFILES`)."""
    return PROFILES[kind][0](images_uint8)


def fit_profile(training_statistics: np.ndarray) -> FeatureDensity:
    """A profile of the training images' statistics of one kind (`profile_statistics`: one mean, their covariance);
    the threshold is set later, as for the feature density: `.with_threshold(calibration_statistics, share)`."""
    return FeatureDensity.fit(training_statistics, np.zeros(len(training_statistics), dtype=int), shrinkage=0.0)


def profile_shift(kind: str, images_uint8: np.ndarray, profile: FeatureDensity) -> np.ndarray:
    """(N,) True where an image's statistics of `kind` lie outside the training images' profile."""
    return profile.distances(profile_statistics(kind, images_uint8)) > profile.threshold
