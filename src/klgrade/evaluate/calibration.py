"""`klgrade calibrate`: fit how sure a checkpoint may be, on labelled data it was not trained on, and write it
into a copy of the checkpoint, where `predict`, `evaluate`, `serve` and the ONNX export find it.

Fitted on one combined output, the one the predictor then scales (ensemble mean and flip TTA included):
1. temperature (Guo et al., ICML 2017) of the combined log-probabilities, by NLL;
2. conformal scores of the temperature-scaled probabilities and the grade of each (`klgrade.uncertainty`), so
   that grade sets hold the true grade with probability >= 1 - alpha for the knees of every grade, for any
   alpha chosen later;
3. a feature density for gradability: grade means and covariance of the penultimate features of the
   `density` images (the training data), thresholded so that `FLAGGED_SHARE` of the calibration images are
   flagged;
4. a processing profile: the same for three contrast statistics of the `density` images, thresholded on the
   calibration images likewise; an image beyond it gets a warning that its processing differs;
5. two framing probes: ridge read-outs of the crop share from the penultimate features of `density` images
   re-framed at random (`FRAMING_IMAGES` of them, a quarter as they are, tilted up to +/-8 degrees, then
   preprocessed): one on tighter crops of the full-resolution image (a share drawn from `FRAMING_SHARES`),
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
from klgrade.data.sources import Sample
from klgrade.errors import DataLayoutError
from klgrade.evaluate.evaluation import batched_outputs, fit_grade_sets, predict_samples
from klgrade.infer.predictor import Predictor
from klgrade.models import load_checkpoint, save_checkpoint
from klgrade.models.weights import stored_dtype
from klgrade.uncertainty import FeatureDensity, FramingProbe, fit_processing_profile, processing_statistics

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


def raw_outputs(predictor: Predictor, samples: list[Sample], what: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Uncalibrated combined probabilities, penultimate features and the preprocessed uint8 images of every
    sample (all must be readable)."""
    predictions, failures = predict_samples(predictor, samples, raw=True)
    if failures:
        listed = "; ".join(str(f) for f in failures[:5])
        raise DataLayoutError(f"{len(failures)} unreadable {what} image(s): {listed}")
    return predictions.outputs.probabilities, predictions.outputs.features, predictions.images


def fit_calibration(predictor: Predictor, calibration: list[Sample], density: list[Sample]) -> dict:
    """The calibration of `predictor` (JSON-ready): temperature, conformal scores (ascending) with their grades,
    feature density, processing profile, framing probe."""
    labels = np.array([s.grade for s in calibration])
    probabilities, features, images = raw_outputs(predictor, calibration, "calibration")
    temperature, scores = fit_grade_sets(probabilities, labels)
    order = np.argsort(scores, kind="stable")
    _, density_features, density_images = raw_outputs(predictor, density, "density")
    fitted = FeatureDensity.fit(density_features, np.array([s.grade for s in density]))
    fitted = fitted.with_threshold(features, FLAGGED_SHARE)
    processing = fit_processing_profile(density_images).with_threshold(processing_statistics(images), FLAGGED_SHARE)
    framing = fit_framing(predictor, density).with_threshold(features, FRAMING_WARNED_SHARE)
    framing_wide = fit_framing(predictor, density, wider=True).with_threshold(features, FRAMING_WIDE_WARNED_SHARE)
    return {"temperature": temperature, "tta": predictor.tta, "conformal_scores": np.round(scores[order], 6).tolist(),
            "conformal_grades": labels[order].tolist(), "density": fitted.to_dict(), "flagged_share": FLAGGED_SHARE,
            "processing": processing.to_dict(), "framing": framing.to_dict(),
            "framing_warned_share": FRAMING_WARNED_SHARE, "framing_wide": framing_wide.to_dict(),
            "framing_wide_warned_share": FRAMING_WIDE_WARNED_SHARE,
            "n_calibration": len(calibration), "n_density": len(density), "date": date.today().isoformat()}


def fit_framing(predictor: Predictor, samples: list[Sample], seed: int = 0, wider: bool = False) -> FramingProbe:
    """A framing probe, fitted on up to `FRAMING_IMAGES` of `samples` re-framed at random, tighter or `wider`;
    re-framed at full resolution, so that a tighter crop is not also a blurrier one (the probe must read the
    anatomy's scale, not the resampling)."""
    rng = np.random.default_rng(seed)
    chosen = rng.choice(len(samples), size=min(FRAMING_IMAGES, len(samples)), replace=False)
    shares = rng.uniform(*(FRAMING_WIDE_SHARES if wider else FRAMING_SHARES), size=len(chosen))
    shares[: len(chosen) // 4] = 1.0
    tilts = np.radians(rng.uniform(-FRAMING_TILT_DEGREES, FRAMING_TILT_DEGREES, size=len(chosen)))
    paddings = FRAMING_WIDE_PADDINGS if wider else ("reflection",)
    prepared = []
    for number, (index, share, tilt) in enumerate(zip(chosen, shares, tilts)):
        image = torch.from_numpy(read_image(samples[index].path))[None, None]
        framed = reframe(image, torch.tensor([share], dtype=torch.float32), torch.tensor([tilt], dtype=torch.float32),
                         padding=paddings[number % len(paddings)])
        prepared.append(predictor.prepare(framed[0, 0].numpy(), samples[index].side))
    features = batched_outputs(predictor, np.stack(prepared), raw=True).features
    return FramingProbe.fit(features, shares, wider=wider)


def calibrate_checkpoint(checkpoints: str | Path | list[str | Path], calibration: list[Sample],
                         density: list[Sample], out: str | Path, tta: bool | None = None) -> dict:
    """Fit the calibration of a checkpoint, or of an ensemble on its combined output, and write it; returns it.

    One checkpoint: `out` is the calibrated checkpoint file. Several: `out` is a folder that receives a copy of
    each member carrying the ensemble's calibration, which applies only when exactly these members are loaded
    together (`members`, `ensemble_id`).
    """
    paths = [Path(p) for p in (checkpoints if isinstance(checkpoints, list) else [checkpoints])]
    predictor = Predictor(paths, tta=tta, calibrated=False)
    result = fit_calibration(predictor, calibration, density)
    if len(paths) > 1:
        result = {**result, "members": [p.name for p in paths], "ensemble_id": uuid.uuid4().hex}
    for path in paths:
        model, info = load_checkpoint(path)
        info["calibration"] = result
        info.setdefault("inference", {})["tta"] = predictor.tta
        target = Path(out) / path.name if len(paths) > 1 else Path(out)
        save_checkpoint(target, model, info, dtype=stored_dtype(path))
    log.info("calibrated %s -> %s (temperature %.3f)", ", ".join(map(str, paths)), out, result["temperature"])
    return result
