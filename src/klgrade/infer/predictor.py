"""A `Predictor`: checkpoints in, probabilities (and heatmaps) of preprocessed images out.

Used by `klgrade evaluate` directly and, through `klgrade.infer.grading` (the one path from an input to a
graded result), by `klgrade predict`, the HTTP service and the Python API.

A predictor holds one or more checkpoints (an ensemble averages probabilities), the preprocessing stored in
them, optional horizontal-flip test-time augmentation, a backend (torch, or ONNX Runtime) and, for a single
checkpoint calibrated by `klgrade calibrate`, its calibration: a temperature applied to the combined output,
conformal grade sets, the gradability check, the processing and framing warnings, the polarity read-out that
grades an inverted image inverted back, and the turn that grades an image stored sideways or upside down upright
(`klgrade.uncertainty`).
"""

from __future__ import annotations

import copy
import logging
import threading
from dataclasses import dataclass, field, fields
from importlib import resources
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from klgrade.constants import NUM_GRADES
from klgrade.data.preprocess import PreparedImage, PreprocessConfig, normalize, prepare_image, to_uint8
from klgrade.data.provenance import merge_records
from klgrade.errors import CheckpointError
from klgrade.explain.gradcam import EXPLANATION_EMPTY, Explanation, gradcam
from klgrade.models import features_and_logits, load_checkpoint
from klgrade.models.weights import calibration_fits
from klgrade.uncertainty import (DEFAULT_ALPHA, Calibration, answered_sets, apply_temperature, conformal_threshold,
                                 grade_sets, grade_thresholds, gradability, profile_shift, shift_warnings,
                                 uncertified_grades, uncertified_warning)

log = logging.getLogger(__name__)

SHIPPED_WEIGHTS = "msa_net_kneekl224.safetensors"
BACKENDS = ("torch", "onnx")
REORIENTATIONS = (((True, 0),), ((False, 1), (False, 2), (False, 3)), ((True, 1), (True, 2), (True, 3)))
"""The orientations (inverted?, quarter turns counter-clockwise as `np.rot90`) tried on an image far from the
training knees, a group at a time, the likeliest first: stored inverted (bone dark), turned, both."""
FORWARD_IMAGES = 64
"""Most images in one pass of a network (twice as many views with flip TTA): a larger batch goes through in parts,
so memory does not grow with `--batch-size` (512 at once took `predict` to 4.5 GB)."""
EXPLANATION_UNAVAILABLE = ("explanation unavailable: an ONNX-only model has no gradients for Grad-CAM "
                           "(give the .safetensors checkpoint to explain)")


def shipped_checkpoint() -> Path:
    """Path of the model trained by the project and shipped inside the package."""
    path = Path(str(resources.files("klgrade") / "weights" / SHIPPED_WEIGHTS))
    if not path.is_file():
        raise CheckpointError(f"{path}: the shipped model is missing from this installation")
    return path


def inference_device(name: str) -> torch.device:
    """The torch device called `name` ("cpu", "cuda", "cuda:1"), or a one-line error when it is not usable here."""
    try:
        device = torch.device(name)
    except (RuntimeError, TypeError):
        raise CheckpointError(f"--device '{name}' is not a device (use cpu or cuda)") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise CheckpointError(f"--device {name} asked for, but no CUDA GPU is available")
    if device.type not in ("cpu", "cuda"):
        raise CheckpointError(f"--device '{name}' is not supported (use cpu or cuda)")
    return device


@dataclass
class Outputs:
    """What the network says about a batch: combined class probabilities (B, 5), penultimate features (B, D),
    which images it was given inverted back (B,) because they looked inverted, and by how many quarter turns
    (B,) each was given turned (`np.rot90`, counter-clockwise; 0 for most) because it looked turned."""

    probabilities: np.ndarray
    features: np.ndarray
    inverted: np.ndarray
    turns: np.ndarray

    def select(self, rows) -> "Outputs":
        """The outputs of these images only (an index or a boolean mask)."""
        return Outputs(*(getattr(self, part.name)[rows] for part in fields(self)))

    @classmethod
    def concatenate(cls, parts: list["Outputs"]) -> "Outputs":
        """The outputs of consecutive batches as one."""
        return cls(*(np.concatenate([getattr(p, part.name) for p in parts]) for part in fields(cls)))


def network_input(images_uint8: np.ndarray) -> torch.Tensor:
    """(B, H, W) uint8 images as the networks take them: (B, 1, H, W), normalised, on the CPU."""
    return normalize(torch.from_numpy(np.require(images_uint8, requirements=("C", "W")))).unsqueeze(1)


def forward_parts(n: int) -> list[slice]:
    """The parts of a batch of `n` images that go through a network at once."""
    return [slice(start, start + FORWARD_IMAGES) for start in range(0, n, FORWARD_IMAGES)]


@dataclass
class Assessment:
    """How sure the answers for a batch are (`Predictor.assess`)."""

    sets: list[list[int]]
    """Each image's grade set (just its grade when the model is not calibrated)."""
    coverage: float | None
    """1 - alpha of the sets; None uncalibrated."""
    gradable: list[bool]
    shifts: dict[str, np.ndarray]
    """(N,) per kind of shift seen (`Predictor.shifts`)."""
    warnings: list[list[str]]
    """Per image, what a reader must know (`Grading.warnings`, before any about its explanation)."""
    noted: list[bool]
    """Per image, whether its answer notes how the image was prepared (not square, a mark painted out, enhanced, an
    unknown side)."""

    @classmethod
    def concatenate(cls, parts: list["Assessment"]) -> "Assessment":
        """The assessments of consecutive batches, assessed alike (the same alpha), as one."""
        shifts = {kind: np.concatenate([p.shifts[kind] for p in parts]) for kind in parts[0].shifts}
        return cls([s for p in parts for s in p.sets], parts[0].coverage, [g for p in parts for g in p.gradable],
                   shifts, [w for p in parts for w in p.warnings], [n for p in parts for n in p.noted])


def reoriented(images_uint8: np.ndarray, inverted: bool, turns: int) -> np.ndarray:
    """(B, S, S) images inverted (bone bright again) if `inverted`, then turned `turns` quarter turns counter-clockwise
    (`np.rot90`): how the predictor tries an image far from the training knees, and how it was graded."""
    return np.ascontiguousarray(np.rot90(255 - images_uint8 if inverted else images_uint8, turns, axes=(1, 2)))


def upright_images(images_uint8: np.ndarray, outputs: Outputs) -> np.ndarray:
    """The (B, S, S) images as the network graded them: those `outputs` marks as inverted or turned, `reoriented`."""
    upright = images_uint8.copy()
    for row in np.flatnonzero(outputs.inverted | (outputs.turns != 0)):
        upright[row] = reoriented(images_uint8[row:row + 1], outputs.inverted[row], outputs.turns[row])[0]
    return upright


@dataclass
class Grading:
    """The answer for one image.

    Attributes:
        grade: predicted KL grade 0-4 (the most probable one).
        probabilities: probability of each grade 0-4.
        confidence: probability of `grade`.
        grade_set: contiguous grades that hold the true grade with probability `coverage`, whatever the true
            grade (calibrated models); all five grades when the answer is not gradable (no coverage holds for an
            input unlike the calibration images); just `[grade]` when the model is not calibrated (then `coverage`
            is None).
        gradable: False when the input is not a knee radiograph like the training data (blank, far from it in
            feature space, a DICOM header naming a lateral, oblique or axial view, too few pixels or grey levels);
            the probabilities are still given, the grade is not to be trusted.
        heatmap: (H, W) Grad-CAM map in [0, 1] of the network input when explained, else None.
        warnings: what a reader must know about this answer (e.g. "explanation empty"); empty when all is well.
        name: the input's name (path or upload file name), when it had one.
        image: the preprocessed uint8 image the network graded (for overlays; inverted back where it looked
            inverted, turned upright where it looked turned).
    """

    grade: int
    probabilities: list[float]
    confidence: float
    grade_set: list[int] = field(default_factory=list)
    coverage: float | None = None
    gradable: bool = True
    heatmap: np.ndarray | None = None
    warnings: list[str] = field(default_factory=list)
    name: str | None = None
    image: np.ndarray | None = field(default=None, repr=False)


def stored_preprocess(path: Path, info: dict) -> PreprocessConfig:
    """The preprocessing a checkpoint was trained with, checked field by field."""
    try:
        return PreprocessConfig.from_dict(info.get("preprocess"))
    except ValueError as exc:
        raise CheckpointError(f"{path}: preprocess: {exc}") from None


class Predictor:
    """Grades preprocessed images with one checkpoint or an ensemble.

    Args:
        checkpoints: safetensors checkpoints (or `.onnx` files for the onnx backend); None = the shipped model.
        device: torch device for the torch backend.
        tta: average with the horizontally flipped image; None = what the checkpoint recommends.
        backend: "torch" or "onnx" (ONNX Runtime on CPU; exports the checkpoint once if needed).
        calibrated: use the calibration stored in a single checkpoint (False: raw outputs, e.g. to calibrate).
    """

    def __init__(self, checkpoints: list[str | Path] | None = None, device: str = "cpu", tta: bool | None = None,
                 backend: str = "torch", calibrated: bool = True):
        if backend not in BACKENDS:
            raise CheckpointError(f"unknown backend '{backend}'; choose one of {BACKENDS}")
        paths = [Path(p) for p in checkpoints] if checkpoints else [shipped_checkpoint()]
        self.device = inference_device(device)
        self.backend = backend
        self.models, self.infos = [], []
        self._explain_models: list[torch.nn.Module] | None = None  # loaded on the first explanation
        self._explain_lock = threading.Lock()
        for path in paths:
            if backend == "onnx":
                from klgrade.infer.onnx import OnnxModel

                model = OnnxModel.from_path(path)
                info = model.info
            else:
                model, info = self._load_torch(path)
            self.models.append(model)
            self.infos.append(info)
        configs = [stored_preprocess(path, info) for path, info in zip(paths, self.infos)]
        other = next((i for i, config in enumerate(configs) if config != configs[0]), None)
        if other is not None:
            first, second = configs[0].to_dict(), configs[other].to_dict()
            differ = ", ".join(f"{key} {first[key]} vs {second[key]}" for key in first if first[key] != second[key])
            raise CheckpointError(f"{paths[0]} and {paths[other]}: ensemble members must be trained with the same "
                                  f"preprocessing, not {differ}; cannot combine them")
        self.preprocess = configs[0]
        recommended = self.infos[0].get("inference", {}).get("tta", False)
        self.tta = recommended if tta is None else tta
        self.paths = paths
        self.alpha = DEFAULT_ALPHA
        """Grade sets miss the true grade for at most this share of images (calibrated models)."""
        calibration = self._calibration() if calibrated else Calibration()
        self.temperature = calibration.temperature
        """The combined log-probabilities are divided by this before the softmax (1 = as trained)."""
        self.conformal_scores = calibration.scores
        self.conformal_grades = calibration.grades
        """The true grade behind each score: the sets get a threshold per grade (`uncertainty.grade_thresholds`)."""
        if self.is_calibrated and not self.has_grade_thresholds:
            log.warning("%s was calibrated before grade sets had a threshold per grade: its sets hold the true grade "
                        "for %.0f%% of knees on average, not per grade; run `klgrade calibrate` again", self.paths[0],
                        100 * (1 - self.alpha))
        self.density = calibration.density
        self.profiles = calibration.profiles
        """The training images' profiles of contrast processing and of noise and sharpness, by kind of shift
        (`uncertainty.profile_shift`)."""
        self.framings = calibration.framings
        """The crop-share read-outs behind the framing warnings, tighter and wider, by kind of shift."""
        self.polarity = calibration.polarity
        """The read-out that tells an inverted image (bone dark); such an image is graded inverted back."""
        self.seen = self._seen(calibrated and self.is_calibrated)
        """Records of the knees the weights were trained and chosen on, and the grade sets calibrated on, by role
        (`data.provenance`): what no score should be taken on unknowingly."""

    def _load_torch(self, path: Path) -> tuple[torch.nn.Module, dict]:
        """A checkpoint's model on the device, channels_last (1.2-1.5x faster convolutions on CPU), and its info."""
        model, info = load_checkpoint(path)
        return model.to(self.device, memory_format=torch.channels_last), info

    def _calibration(self) -> Calibration:
        """The stored calibration, checked field by field, when it belongs to this exact set-up: the same
        checkpoint alone, or the same ensemble members together (an ensemble is calibrated on its combined output),
        and the same TTA setting."""
        stored = [info.get("calibration") for info in self.infos]
        if stored[0] is None:
            return Calibration()
        if not all(isinstance(c, dict) or c is None for c in stored):
            raise CheckpointError(f"{self.paths[0]}: calibration: must be a mapping of fields")
        ensemble_ids = {(c or {}).get("ensemble_id") for c in stored}
        if len(ensemble_ids) != 1 or len(stored[0].get("members", [None])) != len(stored):
            log.warning("running uncalibrated: the stored calibration belongs to another set of checkpoints")
            return Calibration()
        stale = next((p for p, info in zip(self.paths, self.infos) if p.suffix == ".safetensors"
                      and not calibration_fits(p, info)), None)
        if stale is not None:
            log.warning("running uncalibrated: %s holds other weights than its calibration was fitted on (changed "
                        "after `klgrade calibrate`); run `klgrade calibrate` on it again", stale)
            return Calibration()
        if stored[0].get("tta") != self.tta:
            log.warning("%s was calibrated with flip TTA %s; running it %s leaves it uncalibrated", self.paths[0],
                        "on" if stored[0].get("tta") else "off", "with" if self.tta else "without")
            return Calibration()
        try:
            return Calibration.from_dict(stored[0])
        except ValueError as exc:
            raise CheckpointError(f"{self.paths[0]}: calibration: {exc}; run `klgrade calibrate` again") from None

    def _seen(self, calibrated: bool) -> dict[str, dict[str, list[str]]]:
        """Every member's training records merged (an ensemble has seen what any member saw), and the records of
        the calibration in use."""
        seen = {role: merge_records([info.get("seen", {}).get(role, {}) for info in self.infos])
                for role in ("trained", "chosen")}
        if calibrated:
            seen["calibrated"] = self.infos[0]["calibration"].get("seen", {})
        return seen

    @property
    def is_calibrated(self) -> bool:
        return len(self.conformal_scores) > 0

    @property
    def has_grade_thresholds(self) -> bool:
        """Calibrated with each score's grade (older calibrations hold the scores alone: one threshold for all)."""
        return self.is_calibrated and len(self.conformal_grades) == len(self.conformal_scores)

    @property
    def name(self) -> str:
        names = [i["model"]["name"] for i in self.infos]
        return names[0] if len(names) == 1 else f"ensemble({', '.join(names)})"

    def prepare(self, image: np.ndarray, side: str | None = None) -> np.ndarray:
        """Grey-level image -> the uint8 square the network sees."""
        return to_uint8(image, self.preprocess, side)

    @property
    def can_explain(self) -> bool:
        """Grad-CAM needs gradients: torch models, or the safetensors checkpoints behind ONNX ones."""
        return self.backend == "torch" or all(p.suffix == ".safetensors" for p in self.paths)

    def raw_outputs(self, images_uint8: np.ndarray) -> Outputs:
        """(B, H, W) uint8 images -> uncalibrated combined probabilities (ensemble mean, TTA mean) and features.

        An image far from the training knees in feature space that its inversion, a quarter, half or three-quarter
        turn, or both bring among them is graded so reoriented (`Outputs.inverted`, `Outputs.turns`;
        `REORIENTATIONS`, a group at a time, on the far images only: 1 to 7 more passes); an inversion only where the
        polarity read-out reads the inverted image as upright (none without one). Then an image the read-out takes
        for inverted, and whose inversion it takes for upright, is graded inverted back (a pass on those images
        only). The density goes first: on a turned knee the read-out errs (it took 5 of 52 turned val knees for
        inverted, and missed a third of the knees inverted and turned).
        """
        outputs = self._network_outputs(images_uint8)
        self._check_feature_width(outputs.features.shape[1])
        if self.density is not None:
            for orientations in REORIENTATIONS:
                self._reorient(images_uint8, outputs, orientations)
        if self.polarity is not None:
            suspects = np.flatnonzero(self.polarity.inverted(outputs.features) & ~outputs.inverted)
            if len(suspects):
                again = self._network_outputs(255 - upright_images(images_uint8[suspects], outputs.select(suspects)))
                confirmed = ~self.polarity.inverted(again.features)
                self._replace(outputs, suspects[confirmed], again.select(confirmed))
                outputs.inverted[suspects[confirmed]] = True
        return outputs

    def _reorient(self, images_uint8: np.ndarray, outputs: Outputs, orientations: tuple[tuple[bool, int], ...]) -> None:
        """Grade the images still far from the training knees (and not reoriented yet) in whichever of `orientations`
        (inverted?, quarter turns) brings each nearest, where that lies within the density's threshold. Of the
        kneeKL224 val knees turned by a quarter, a half or three quarters 99% are so brought back, as many of those
        also inverted; no upright val knee the density flags and none of 51 images that are no knee radiograph is
        (docs/results.md, turned images)."""
        orientations = [(inverted, turns) for inverted, turns in orientations
                        if not inverted or self.polarity is not None]
        rows = np.flatnonzero((outputs.turns == 0) & ~outputs.inverted)
        far = rows[self.density.distances(outputs.features[rows]) > self.density.threshold]
        if not len(far) or not orientations:
            return
        tried = [self._network_outputs(reoriented(images_uint8[far], inverted, turns)) for inverted, turns in orientations]
        distances = np.stack([self._distances_if_upright(t.features, inverted)
                              for (inverted, _), t in zip(orientations, tried)], axis=1)
        nearest = distances.argmin(axis=1)
        brought = distances[np.arange(len(far)), nearest] <= self.density.threshold
        for option, ((inverted, turns), outputs_tried) in enumerate(zip(orientations, tried)):
            chosen = np.flatnonzero(brought & (nearest == option))
            self._replace(outputs, far[chosen], outputs_tried.select(chosen))
            outputs.inverted[far[chosen]] = inverted
            outputs.turns[far[chosen]] = turns

    def _distances_if_upright(self, features: np.ndarray, inverted: bool) -> np.ndarray:
        """The density's distances of images reoriented so; infinite for one inverted that the polarity read-out does
        not read as upright: the density alone brought an upright severe knee's inversion within its threshold (1 of
        the 9 val knees it flags), graded KL 3 for KL 4 with a single-grade set."""
        distances = self.density.distances(features)
        if inverted:
            distances[self.polarity.inverted(features)] = np.inf
        return distances

    @staticmethod
    def _replace(outputs: Outputs, rows: np.ndarray, again: Outputs) -> None:
        """The probabilities and features of `rows` from a pass on those images made otherwise (`again`)."""
        outputs.probabilities[rows] = again.probabilities
        outputs.features[rows] = again.features

    def _check_feature_width(self, width: int) -> None:
        """CheckpointError unless every stored read-out of the features fits this model's `width` of them."""
        widths = {"density": self.density.means.shape[1]} if self.density is not None else {}
        widths.update({kind: len(probe.weights) for kind, probe in self.framings.items()})
        if self.polarity is not None:
            widths["polarity"] = len(self.polarity.weights)
        for name, stored in widths.items():
            if stored != width:
                raise CheckpointError(f"{self.paths[0]}: calibration: {name}: {stored} features, but the model has "
                                      f"{width}; run `klgrade calibrate` again")

    def _network_outputs(self, images_uint8: np.ndarray) -> Outputs:
        """The network(s) on the images, `FORWARD_IMAGES` at a time."""
        parts = forward_parts(len(images_uint8))
        return Outputs.concatenate([self._network_pass(images_uint8[part]) for part in parts])

    @torch.inference_mode()
    def _network_pass(self, images_uint8: np.ndarray) -> Outputs:
        """One pass of the network(s). With TTA the image and its mirror go through as one batch of 2B. Features
        are the first member's, averaged over the views (the gradability check fits one model's feature space)."""
        x = network_input(images_uint8)
        views = torch.cat([x, torch.flip(x, dims=[3])]) if self.tta else x
        total, features = np.zeros((len(views), NUM_GRADES)), None
        for model in self.models:
            logits, member_features = self._forward(model, views)
            total += torch.softmax(logits, dim=1).numpy().astype(np.float64)
            features = member_features if features is None else features
        probabilities = total.reshape(-1, len(x), NUM_GRADES).mean(axis=0) / len(self.models)
        return Outputs(probabilities, features.reshape(-1, len(x), features.shape[-1]).mean(axis=0),
                       np.zeros(len(x), dtype=bool), np.zeros(len(x), dtype=np.int8))

    def outputs(self, images_uint8: np.ndarray) -> Outputs:
        """Like `raw_outputs`, with the temperature applied to the combined log-probabilities."""
        outputs = self.raw_outputs(images_uint8)
        if self.temperature != 1.0:
            outputs.probabilities = apply_temperature(outputs.probabilities, self.temperature)
        return outputs

    def probabilities(self, images_uint8: np.ndarray) -> np.ndarray:
        """(B, H, W) uint8 images -> (B, 5) calibrated class probabilities."""
        return self.outputs(images_uint8).probabilities

    def _forward(self, model, x: torch.Tensor) -> tuple[torch.Tensor, np.ndarray]:
        if self.backend == "onnx":
            logits, features = model.run(x.numpy())
            return torch.from_numpy(logits).float(), features
        logits, features = features_and_logits(model, x.to(self.device, memory_format=torch.channels_last))
        return logits.float().cpu(), features.float().cpu().numpy()

    def set_thresholds(self, alpha: float) -> np.ndarray | float:
        """The conformal threshold of each grade (one for all from an older calibration without grades)."""
        if self.has_grade_thresholds:
            return grade_thresholds(self.conformal_scores, self.conformal_grades, alpha)
        return conformal_threshold(self.conformal_scores, alpha)

    def uncertified_grades(self, alpha: float) -> list[int]:
        """Grades every set includes because the calibration holds too few of them for 1 - alpha."""
        return uncertified_grades(self.conformal_grades, alpha) if self.has_grade_thresholds else []

    def assess(self, images_uint8: np.ndarray, outputs: Outputs, alpha: float | None = None,
               reasons: Sequence[Sequence[str]] | None = None,
               notes: Sequence[Sequence[str]] | None = None) -> Assessment:
        """How sure each answer is: its grade set (all grades where not gradable), whether it is gradable, the shifts
        seen, and every warning it carries (not gradable, uncertified grades, shifts, notes), in that order.
        `images_uint8`: as graded (`upright_images`); `reasons`: per image, why the input itself is not gradable (a
        DICOM header naming a lateral view, too few pixels or grey levels: `uncertainty.input_reasons`), first among
        its reasons; `notes`: per image, what preparing it found that the answer must say (an image not square, a
        mark painted out, enhanced, an unknown side: `data.preprocess.PreparedImage.notes`)."""
        alpha = self.alpha if alpha is None else alpha
        if not 0 < alpha < 1:  # the CLI and the service bound it; `klgrade.grade(alpha=5)` met an IndexError
            raise ValueError(f"alpha is the share of grade sets allowed to miss the true grade: between 0 and 1, "
                             f"not {alpha}")
        if self.is_calibrated:
            sets = grade_sets(outputs.probabilities, self.set_thresholds(alpha))
            coverage = 1 - alpha
        else:
            sets, coverage = [[int(g)] for g in outputs.probabilities.argmax(axis=1)], None
        shifts = self.shifts(images_uint8, outputs)
        profiled = [shifts[kind] for kind in self.profiles]
        radiograph_like = ~np.logical_or.reduce(profiled) if profiled else None
        warnings = gradability(images_uint8, outputs.features, self.density, radiograph_like)
        for said, given in zip(warnings, reasons or []):
            said[:0] = given
        gradable = [not said for said in warnings]
        if coverage is not None:
            sets = answered_sets(sets, gradable)
        uncertified = self.uncertified_grades(alpha)
        for said in warnings if uncertified else []:
            said.append(uncertified_warning(uncertified, alpha))
        for index, said in enumerate(warnings):
            said += shift_warnings([kind for kind, shifted in shifts.items() if shifted[index]])
        notes = notes or [[] for _ in warnings]
        for said, given in zip(warnings, notes):
            said.extend(given)
        return Assessment(sets, coverage, gradable, shifts, warnings, [bool(given) for given in notes])

    def shifts(self, images_uint8: np.ndarray, outputs: Outputs) -> dict[str, np.ndarray]:
        """Per kind of shift the calibration can see (`uncertainty.SHIFT_WARNINGS`; none uncalibrated), (N,) True
        where an image still gradable was processed ("processing"), noisier, blurrier or sharper ("sharpness"), or
        framed tighter ("framing") or wider ("framing_wide") than the training images: its grade may move with that;
        or where it looked inverted and was graded inverted back ("polarity"), or looked turned and was graded turned
        upright ("orientation")."""
        shifts = {"polarity": outputs.inverted} if self.polarity is not None else {}
        if self.density is not None:
            shifts["orientation"] = outputs.turns > 0
        for kind, profile in self.profiles.items():
            shifts[kind] = profile_shift(kind, images_uint8, profile)
        for kind, probe in self.framings.items():
            shifts[kind] = probe.shifted(outputs.features)
        return shifts

    def explain(self, images_uint8: np.ndarray, targets: np.ndarray) -> Explanation:
        """Grad-CAM of the target grades, averaged over the ensemble's models (empty only if every member's is).

        Runs on copies of the models of its own (Grad-CAM hooks a layer; plain forward passes in other threads
        must not trigger those hooks), one explanation at a time.
        """
        with self._explain_lock:
            if self._explain_models is None:
                if self.backend == "torch":
                    self._explain_models = [copy.deepcopy(m) for m in self.models]
                else:
                    self._explain_models = [self._load_torch(p)[0] for p in self.paths]
            parts = [self._explain_pass(images_uint8[part], targets[part]) for part in forward_parts(len(images_uint8))]
        return Explanation(np.concatenate([p.maps for p in parts]), np.concatenate([p.empty for p in parts]))

    def _explain_pass(self, images_uint8: np.ndarray, targets: np.ndarray) -> Explanation:
        x = network_input(images_uint8).to(self.device, memory_format=torch.channels_last)
        members = [gradcam(m, x, torch.as_tensor(targets)) for m in self._explain_models]
        return Explanation(np.mean([m.maps for m in members], axis=0), np.all([m.empty for m in members], axis=0))

    def grade_prepared(self, prepared: np.ndarray, names: list[str | None] | None = None,
                       explain: bool = False, alpha: float | None = None,
                       reasons: Sequence[Sequence[str]] | None = None,
                       notes: Sequence[Sequence[str]] | None = None) -> list[Grading]:
        """Grade (B, H, W) uint8 images from `prepare`; Grad-CAM of the predicted grade when `explain`;
        `reasons` and `notes` as for `assess`."""
        names = names or [None] * len(prepared)
        alpha = self.alpha if alpha is None else alpha
        outputs = self.outputs(prepared)
        graded = upright_images(prepared, outputs)
        probabilities = outputs.probabilities
        grades = probabilities.argmax(axis=1)
        assessment = self.assess(graded, outputs, alpha, reasons, notes)
        warnings = assessment.warnings
        maps = [None] * len(prepared)
        if explain and self.can_explain:
            explanation = self.explain(graded, grades)
            maps = list(explanation.maps)
            for notes, empty in zip(warnings, explanation.empty):
                if empty:
                    notes.append(EXPLANATION_EMPTY)
        elif explain:
            for notes in warnings:
                notes.append(EXPLANATION_UNAVAILABLE)
        return [Grading(int(g), [float(v) for v in p], float(p[g]), grade_set=s, coverage=assessment.coverage,
                        gradable=ok, heatmap=m, warnings=w, name=n, image=u8)
                for g, p, s, ok, m, w, n, u8 in zip(grades, probabilities, assessment.sets, assessment.gradable, maps,
                                                    warnings, names, graded)]

    def prepare_arrays(self, images: list[np.ndarray], sides: list[str | None] | None = None
                       ) -> list[PreparedImage]:
        """Decoded grey-level images (any size) -> the uint8 squares the network sees, each with what preparing found
        (too few pixels or grey levels: `PreparedImage.reasons`; an unknown side: `PreparedImage.notes`)."""
        sides = sides or [None] * len(images)
        return [prepare_image(image, self.preprocess, side) for image, side in zip(images, sides)]

    def grade_arrays(self, images: list[np.ndarray], sides: list[str | None] | None = None,
                     explain: bool = False, names: list[str | None] | None = None) -> list[Grading]:
        """Grade decoded grey-level images (any size): `prepare_arrays`, then `grade_prepared`."""
        prepared = self.prepare_arrays(images, sides)
        return self.grade_prepared(np.stack([p.pixels for p in prepared]), names, explain,
                                   reasons=[p.reasons() for p in prepared], notes=[p.notes() for p in prepared])
