"""`klgrade calibrate`: fit how sure a checkpoint may be, on labelled data it was not trained on, and write it
into a copy of the checkpoint, where `predict`, `evaluate`, `serve` and the ONNX export find it.

Fitted on one combined output, the one the predictor then scales (ensemble mean and flip TTA included):
0. a polarity probe: a linear read-out of the penultimate features of `POLARITY_IMAGES` `density` images (the
   training data) as stored (upright) and inverted, refitted once with the stored images the first fit reads as
   inverted counted as such (kneeKL224 holds such images); from then on the predictor grades an image that looks
   inverted inverted back, so every step below sees the calibration images so, and the training images it would
   grade inverted back are left out of the density and framing fits;
1. temperature (Guo et al., ICML 2017) of the combined log-probabilities, by NLL;
2. conformal scores of the temperature-scaled probabilities and the grade of each (`klgrade.uncertainty`), so
   that grade sets hold the true grade with probability >= 1 - alpha for the knees of every grade, for any
   alpha chosen later;
3. a feature density for gradability: grade means and covariance of the penultimate features of the
   `density` images (the training data), thresholded so that `FLAGGED_SHARE` of the calibration images are
   flagged;
4. two image-statistics profiles, the same for three contrast statistics and for two of noise and sharpness of the
   `density` images (`uncertainty.PROFILES`), thresholded on the calibration images likewise; an image beyond one
   gets a warning that its contrast processing, or its noise or sharpness, differs;
5. two framing probes: ridge read-outs of the crop share from the penultimate features of `density` images
   re-framed at random (`FRAMING_IMAGES` of them, each read once, a quarter as they are, tilted up to +/-8 degrees,
   then preprocessed): one on tighter crops of the full-resolution image (a share drawn from `FRAMING_SHARES`),
   thresholded so that `FRAMING_WARNED_SHARE` of the calibration images as they are get the warning that the knee
   is framed tighter; one on wider framings (`FRAMING_WIDE_SHARES`: the image shrunk inside a margin of repeated
   edge pixels or of its reflection, in turn), thresholded at `FRAMING_WIDE_WARNED_SHARE` likewise.
"""

from __future__ import annotations

import logging
import uuid
from datetime import date
from pathlib import Path

import numpy as np
import torch

from klgrade.data.augment import reframe
from klgrade.data.io import read_image
from klgrade.data.preprocess import unknown_sides_warning
from klgrade.data.provenance import distinct_knees, knee_record
from klgrade.data.sources import Sample, limit_samples
from klgrade.evaluate.evaluation import batched_outputs, fit_grade_sets, labelled_outputs, untrained_knees
from klgrade.infer.predictor import Predictor
from klgrade.models import load_checkpoint, save_checkpoint
from klgrade.models.weights import checkpoint_tensors, stored_dtype, tensors_digest
from klgrade.uncertainty import PROFILES, FeatureDensity, FramingProbe, PolarityProbe, fit_profile

log = logging.getLogger(__name__)

FLAGGED_SHARE = 0.01
"""Share of in-distribution calibration images the gradability check may flag."""
FRAMING_IMAGES = 2400
FRAMING_SHARES = (0.65, 1.0)
FRAMING_TILT_DEGREES = 8.0
FRAMING_WARNED_SHARE = 0.02
"""Share of calibration images as they are that get the framing warning: at 2%, 93% of val knees cropped 15%
tighter are warned (docs/results.md, framing)."""
FRAMING_WIDE_SHARES = (1.0, 1.4)
FRAMING_WIDE_PADDINGS = ("border", "reflection")
"""The margins a wider framing is made with, in turn: no single kind of margin, so the probe reads the knee's
size more than the margin (docs/results.md, framing). Not a uniform one: preprocessing trims it off."""
FRAMING_WIDE_WARNED_SHARE = 0.01
"""Share of calibration images as they are that get the wider-framing warning (docs/results.md, framing)."""
POLARITY_IMAGES = 2400
"""Training images the polarity probe is fitted on, each as stored and inverted."""
DENSITY_IMAGES = 6000
"""Density images at most (a seeded random choice of more): each is decoded and held while the calibration is fitted
(26 KB at 160 px), and grade means and a covariance of a few hundred features need no more. kneeKL224's train split
(5778) is used whole."""


def fit_calibration(predictor: Predictor, calibration: list[Sample], density: list[Sample]) -> dict:
    """The calibration of `predictor` (JSON-ready): polarity probe, temperature, conformal scores (ascending) with
    their grades, feature density, image-statistics profiles, framing probes. Leaves the polarity probe on `predictor`.
    Inputs that are not gradable whatever the network makes of them (a lateral view, a thumbnail) are left out. The
    calibration images are read `data.cache.CHUNK` at a time, only their outputs and statistics kept (any size);
    the density images, at most `DENSITY_IMAGES`, are held for the probes."""
    trained = labelled_outputs(predictor, density, "density", keep_images=True)
    density_features, density_images = trained.outputs.features, trained.images
    predictor.polarity = fit_polarity(predictor, density_images, density_features)
    upright = ~graded_inverted(predictor, density_images, density_features)
    density = [sample for sample, kept in zip(trained.samples, upright) if kept]
    density_features = density_features[upright]
    calibrating = labelled_outputs(predictor, calibration, "calibration")
    labels, features = calibrating.labels, calibrating.outputs.features
    temperature, scores = fit_grade_sets(calibrating.outputs.probabilities, labels)
    order = np.argsort(scores, kind="stable")
    fitted = FeatureDensity.fit(density_features, np.array([s.grade for s in density]))
    fitted = fitted.with_threshold(features, FLAGGED_SHARE)
    profiles = {kind: fit_profile(trained.statistics[kind][upright]).with_threshold(calibrating.statistics[kind],
                                                                                     FLAGGED_SHARE)
                for kind in PROFILES}
    framing, framing_wide = fit_framings(predictor, density)
    framing = framing.with_threshold(features, FRAMING_WARNED_SHARE)
    framing_wide = framing_wide.with_threshold(features, FRAMING_WIDE_WARNED_SHARE)
    return {"temperature": temperature, "tta": predictor.tta, "conformal_scores": np.round(scores[order], 6).tolist(),
            "conformal_grades": labels[order].tolist(), "density": fitted.to_dict(), "flagged_share": FLAGGED_SHARE,
            **{kind: profile.to_dict() for kind, profile in profiles.items()}, "framing": framing.to_dict(),
            "framing_warned_share": FRAMING_WARNED_SHARE, "framing_wide": framing_wide.to_dict(),
            "framing_wide_warned_share": FRAMING_WIDE_WARNED_SHARE, "polarity": predictor.polarity.to_dict(),
            "n_density_inverted": int((~upright).sum()), "n_calibration": len(labels),
            "n_density": len(density), "date": date.today().isoformat(), "seen": knee_record(calibration)}


def fit_polarity(predictor: Predictor, images: np.ndarray, features: np.ndarray, seed: int = 0) -> PolarityProbe:
    """A polarity probe from up to `POLARITY_IMAGES` preprocessed training images (and their features, from a
    predictor without one) as stored and inverted. Some stored images may be inverted already: the first fit finds
    them (read as inverted, their inversion as upright), and the second counts them as such."""
    rng = np.random.default_rng(seed)
    chosen = rng.choice(len(images), size=min(POLARITY_IMAGES, len(images)), replace=False)
    stored = features[chosen]
    inverted = batched_outputs(predictor, 255 - images[chosen], raw=True).features
    both = np.concatenate([stored, inverted])
    first = PolarityProbe.fit(both, np.repeat([False, True], len(chosen)))
    found = first.inverted(stored) & ~first.inverted(inverted)
    return PolarityProbe.fit(both, np.concatenate([found, ~found]))


def graded_inverted(predictor: Predictor, images: np.ndarray, features: np.ndarray) -> np.ndarray:
    """(N,) True where `predictor` grades an image inverted back, as at inference (its polarity probe's suspects,
    whose inversion it reads as upright); `features` are the images' as they are."""
    inverted = np.zeros(len(images), dtype=bool)
    suspects = np.flatnonzero(predictor.polarity.inverted(features))
    inverted[suspects] = batched_outputs(predictor, images[suspects], raw=True).inverted
    return inverted


def fit_framings(predictor: Predictor, samples: list[Sample], seed: int = 0) -> tuple[FramingProbe, FramingProbe]:
    """The framing probes, tighter and wider, fitted on up to `FRAMING_IMAGES` of `samples` re-framed at random
    (each image read once, re-framed both ways); re-framed at full resolution, so that a tighter crop is not also a
    blurrier one (a probe must read the anatomy's scale, not the resampling)."""
    rng = np.random.default_rng(seed)
    chosen = rng.choice(len(samples), size=min(FRAMING_IMAGES, len(samples)), replace=False)
    kinds = {"tighter": (FRAMING_SHARES, ("reflection",)), "wider": (FRAMING_WIDE_SHARES, FRAMING_WIDE_PADDINGS)}
    shares = {kind: rng.uniform(*bounds, size=len(chosen)) for kind, (bounds, _) in kinds.items()}
    for drawn in shares.values():
        drawn[: len(chosen) // 4] = 1.0
    tilts = {kind: np.radians(rng.uniform(-FRAMING_TILT_DEGREES, FRAMING_TILT_DEGREES, size=len(chosen)))
             for kind in kinds}
    prepared = {kind: [] for kind in kinds}
    for number, index in enumerate(chosen):
        image = torch.from_numpy(read_image(samples[index].path))[None, None]
        for kind, (_, paddings) in kinds.items():
            framed = reframe(image, torch.tensor([shares[kind][number]], dtype=torch.float32),
                             torch.tensor([tilts[kind][number]], dtype=torch.float32),
                             padding=paddings[number % len(paddings)])
            prepared[kind].append(predictor.prepare(framed[0, 0].numpy(), samples[index].side))
    features = {kind: batched_outputs(predictor, np.stack(images), raw=True).features
                for kind, images in prepared.items()}
    return (FramingProbe.fit(features["tighter"], shares["tighter"]),
            FramingProbe.fit(features["wider"], shares["wider"], wider=True))


def calibrate_checkpoint(checkpoints: str | Path | list[str | Path], calibration: list[Sample],
                         density: list[Sample], out: str | Path, tta: bool | None = None) -> dict:
    """Fit the calibration of a checkpoint, or of an ensemble on its combined output, and write it; returns it.

    One checkpoint: `out` is the calibrated checkpoint file. Several: `out` is a folder that receives a copy of
    each member carrying the ensemble's calibration, which applies only when exactly these members are loaded
    together (`members`, `ensemble_id`).
    """
    paths = [Path(p) for p in (checkpoints if isinstance(checkpoints, list) else [checkpoints])]
    predictor = Predictor(paths, tta=tta, calibrated=False)
    calibration, repeated = distinct_knees(calibration, "calibration data")
    calibration, trained = untrained_knees(predictor, calibration, "calibration data", "calibrate on")
    if len(density) > DENSITY_IMAGES:
        log.info("density: a random %d of the %d density images", DENSITY_IMAGES, len(density))
        density = limit_samples(density, DENSITY_IMAGES, seed=0)
    sideless = [warning for samples, what in ((calibration, "calibration data"), (density, "density data"))
                for warning in unknown_sides_warning(predictor.preprocess, [s.side for s in samples], what)]
    for warning in repeated + trained + sideless:  # grade sets fitted on trained knees would be too narrow
        log.warning(warning)
    result = fit_calibration(predictor, calibration, density)
    if len(paths) > 1:
        result = {**result, "members": [p.name for p in paths], "ensemble_id": uuid.uuid4().hex}
    for path in paths:
        model, info = load_checkpoint(path)
        dtype = stored_dtype(path)
        info["calibration"] = {**result, "weights": tensors_digest(checkpoint_tensors(model, dtype))}  # as written
        info.setdefault("inference", {})["tta"] = predictor.tta
        save_checkpoint(Path(out) / path.name if len(paths) > 1 else Path(out), model, info, dtype=dtype)
    log.info("calibrated %s -> %s (temperature %.3f)", ", ".join(map(str, paths)), out, result["temperature"])
    return result
