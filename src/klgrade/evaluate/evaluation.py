"""`klgrade evaluate`: checkpoints (or the shipped model) against a labelled folder, image by image."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from klgrade.constants import NUM_GRADES, REPORT_METRICS
from klgrade.data.cache import CHUNK, decode_all
from klgrade.data.preprocess import unknown_sides_warning
from klgrade.data.provenance import check_unshared, distinct_knees, knee_record, seen_knees, unseen_knees
from klgrade.data.sources import Sample, find_samples, not_read_warning
from klgrade.data.splits import unnamed_patients_warning
from klgrade.errors import DataLayoutError, ImageReadError
from klgrade.infer.predictor import Assessment, Outputs, Predictor, upright_images
from klgrade.metrics import compute_metrics, fit_temperature, paired_difference, set_metrics, share_per_grade
from klgrade.uncertainty import PROFILES, apply_temperature, conformal_scores, log_probabilities, profile_statistics

log = logging.getLogger(__name__)

EVAL_SPLIT_ORDER = ("test", "val", "auto_test")
"""With a split root, the split evaluated when none is named: the held-out test set first."""


@dataclass
class Evaluation:
    metrics: dict
    samples: list[Sample]
    probabilities: np.ndarray
    failures: list[ImageReadError]
    assessment: Assessment
    """Per scored image: grade set, gradable, shifts and warnings, as `klgrade predict` would answer."""
    left_out: list[tuple[Sample, str]]
    """The knees not scored, each with why: `copy` (another listed file has its bytes: scored once, or not at all
    under two grades) or `trained` (the model was trained on it)."""

    @property
    def warnings(self) -> list[str]:
        """What a reader of the metrics must know: knees left out because the model was trained on them, knees it
        was chosen or calibrated on among the scored ones."""
        return self.metrics["warnings"]


def pick_split(samples: list[Sample], split: str | None) -> list[Sample]:
    names = {s.split for s in samples}
    if names == {None}:
        if split:
            raise DataLayoutError(f"--split {split}: the data is a single folder without splits")
        return samples
    found = sorted(name for name in names if name)
    if split and split not in names:
        raise DataLayoutError(f"--split {split}: the data has no such split (found {found})")
    chosen = split or next((name for name in EVAL_SPLIT_ORDER if name in names), None)
    if chosen is None:
        raise DataLayoutError(f"no split to use by default (found {found}); name one with --split")
    return [s for s in samples if s.split == chosen]


@dataclass
class Predictions:
    """The model's outputs for the readable samples of a set, with the images it saw, why an input is not gradable
    whatever the model makes of it (`uncertainty.input_reasons`) and what its answer must say about preparing it
    (`data.preprocess.PreparedImage.notes`), as `klgrade predict` finds them."""

    samples: list[Sample]
    images: np.ndarray
    outputs: Outputs
    reasons: list[list[str]]
    notes: list[list[str]]

    @property
    def labels(self) -> list[int]:
        return [s.grade for s in self.samples]


def predict_samples(predictor: Predictor, samples: list[Sample], raw: bool = False
                    ) -> tuple[Predictions, list[ImageReadError]]:
    """Outputs for every readable sample (calibrated, or `raw`), and the read failures of the others."""
    decoded = decode_all(samples, predictor.preprocess)
    failed = {f.path for f in decoded.failures}
    kept = [index for index, sample in enumerate(samples) if sample.path not in failed]
    images = decoded.images[kept]
    return (Predictions([samples[i] for i in kept], images, batched_outputs(predictor, images, raw),
                        [decoded.reasons[i] for i in kept], [decoded.notes[i] for i in kept]), decoded.failures)


def batched_outputs(predictor: Predictor, images: np.ndarray, raw: bool = False) -> Outputs:
    """(N, H, W) uint8 images -> outputs (calibrated, or `raw`), N >= 0 (the predictor passes them through its network
    in bounded parts, `infer.predictor.FORWARD_IMAGES`)."""
    if not len(images):
        return Outputs(np.zeros((0, NUM_GRADES)), np.zeros((0, 0)), np.zeros(0, dtype=bool), np.zeros(0, np.int8))
    return predictor.raw_outputs(images) if raw else predictor.outputs(images)


def predict_chunks(predictor: Predictor, samples: list[Sample], raw: bool = False
                   ) -> Iterator[tuple[Predictions, list[ImageReadError]]]:
    """`predict_samples` on `CHUNK` samples at a time, so that a set of any size is read in bounded memory (one empty
    chunk for no samples)."""
    for start in range(0, max(len(samples), 1), CHUNK):
        yield predict_samples(predictor, samples[start:start + CHUNK], raw)


def assess_samples(predictor: Predictor, samples: list[Sample], alpha: float | None
                   ) -> tuple[list[Sample], np.ndarray, Assessment | None, list[ImageReadError]]:
    """The readable samples, their probabilities and their assessment (as `klgrade predict` answers), and the read
    failures of the others: `CHUNK` images decoded at a time, only the answers kept."""
    scored: list[Sample] = []
    probabilities, assessments, failures = [], [], []
    for predictions, chunk_failures in predict_chunks(predictor, samples):
        failures += chunk_failures
        if predictions.samples:
            scored += predictions.samples
            probabilities.append(predictions.outputs.probabilities)
            assessments.append(predictor.assess(upright_images(predictions.images, predictions.outputs),
                                                predictions.outputs, alpha, predictions.reasons, predictions.notes))
    if not scored:
        return [], np.zeros((0, NUM_GRADES)), None, failures
    return scored, np.concatenate(probabilities), Assessment.concatenate(assessments), failures


@dataclass
class LabelledOutputs:
    """Raw outputs of the gradable inputs of a labelled set, with each image's statistics of every
    `uncertainty.PROFILES` kind (and the images themselves only when asked for): what a calibration is fitted on."""

    samples: list[Sample]
    outputs: Outputs
    statistics: dict[str, np.ndarray]
    images: np.ndarray | None

    @property
    def labels(self) -> np.ndarray:
        return np.array([s.grade for s in self.samples], dtype=int)


def labelled_outputs(predictor: Predictor, samples: list[Sample], what: str, keep_images: bool = False
                     ) -> LabelledOutputs:
    """The raw outputs and image statistics of the samples whose inputs are gradable, `CHUNK` images decoded at a
    time and only those kept unless `keep_images`: a calibration set of any size in bounded memory. Inputs not
    gradable whatever the network makes of them (a lateral view, a thumbnail) are left out: a calibration fitted on
    them would speak for knees that get no grade to trust.

    Raises:
        DataLayoutError: naming `what`, where an image is unreadable (every label is needed).
    """
    kept: list[Sample] = []
    outputs, images, failures, left_out = [], [], [], []
    statistics: dict[str, list[np.ndarray]] = {kind: [] for kind in PROFILES}
    for predictions, chunk_failures in predict_chunks(predictor, samples, raw=True):
        failures += chunk_failures
        gradable = np.array([not reasons for reasons in predictions.reasons], dtype=bool)
        left_out += [(s.path, r[0]) for s, r in zip(predictions.samples, predictions.reasons) if r]
        kept += [s for s, ok in zip(predictions.samples, gradable) if ok]
        outputs.append(predictions.outputs.select(gradable))
        for kind in PROFILES:
            statistics[kind].append(profile_statistics(kind, predictions.images[gradable]))
        if keep_images:
            images.append(predictions.images[gradable])
    if failures:
        raise DataLayoutError(f"{len(failures)} unreadable {what} image(s): {'; '.join(map(str, failures[:5]))}")
    if left_out:
        log.warning("%s: left out %d of %d images that are not gradable as inputs, e.g. %s: %s", what, len(left_out),
                    len(samples), *left_out[0])
    return LabelledOutputs(kept, Outputs.concatenate(outputs),
                           {kind: np.concatenate(parts) for kind, parts in statistics.items()},
                           np.concatenate(images) if keep_images else None)


def subset_metrics(labels: list[int], probabilities: np.ndarray, kept: list[bool]) -> dict | None:
    """The main metrics (`n` and `REPORT_METRICS`, no intervals) of the `kept` knees (e.g. those answered gradable:
    what the grades a reader is told to trust score); None where no knee was kept."""
    kept = np.flatnonzero(kept)
    if not len(kept):
        return None
    scored = compute_metrics(np.asarray(labels)[kept], probabilities[kept], n_boot=0)
    return {name: scored[name] for name in ("n", *REPORT_METRICS)}


def untrained_knees(predictor: Predictor, samples: list[Sample], what: str, purpose: str
                    ) -> tuple[list[Sample], list[str]]:
    """The samples whose knees the model's weights were not trained on (`provenance.unseen_knees`)."""
    return unseen_knees(predictor.seen["trained"], samples, what, f"the training data of {predictor.name}",
                        f"{purpose} that it was not trained on")


def one_grade_warning(labels: list[int], what: str) -> list[str]:
    """Knees of one true grade leave MCC and QWK with nothing to measure: both are 0 by their formulas there (MCC is
    0/0, taken as 0), which reads as chance agreement whatever the model did."""
    if len(set(labels)) != 1:
        return []
    return [f"{what}: every knee scored ({len(labels)}) is KL {labels[0]}: mcc and qwk are 0 by their formulas on one "
            f"true grade and say nothing of the model; read accuracy, mae and the errors"]


def seen_warnings(predictor: Predictor, samples: list[Sample]) -> tuple[dict[str, int], list[str]]:
    """How many of `samples` the model was chosen on and its grade sets calibrated on, and what that means (with how
    much choosing cost on its validation knees, where its training measured it: `metrics.selection_estimate`)."""
    counts = {role: int(seen_knees(predictor.seen.get(role, {}), samples).sum()) for role in ("chosen", "calibrated")}
    meaning = {"chosen": "its scores on them are optimistic (selection bias)" + selection_cost(predictor),
               "calibrated": "the coverage of its grade sets on them is not a test"}
    warnings = [f"the model was {role} on {count} of these {len(samples)} knees: {meaning[role]}"
                for role, count in counts.items() if count]
    return counts, warnings


def selection_cost(predictor: Predictor) -> str:
    """What choosing its epoch cost a single checkpoint's validation figures, as its training measured it; "" where
    it did not (an ensemble, weights trained before it was measured)."""
    selection = predictor.infos[0].get("selection") if len(predictor.infos) == 1 else None
    if not selection:
        return ""
    chosen, crossed = selection["chosen"], selection["cross_fitted"]
    return (f"; at training, an epoch chosen on half of its validation patients scored "
            f"{chosen['qwk'] - crossed['qwk']:.3f} QWK and {chosen['accuracy'] - crossed['accuracy']:.3f} accuracy "
            f"less on the other half than the chosen epoch on all of them")


def fit_grade_sets(probabilities: np.ndarray, labels) -> tuple[float, np.ndarray]:
    """The temperature of uncalibrated combined probabilities of labelled images (Guo et al. 2017, by NLL) and the
    conformal scores of the scaled ones: what a grade set's thresholds are cut from (`uncertainty.grade_thresholds`)."""
    labels = np.asarray(labels)
    temperature = fit_temperature(log_probabilities(probabilities), labels)
    return temperature, conformal_scores(apply_temperature(probabilities, temperature), labels)


def calibrate(predictor: Predictor, data: str | Path, scored: list[Sample], split: str | None = None) -> list[str]:
    """Fit the predictor's temperature (Guo et al. 2017) and its grade sets (conformal scores with their grades,
    as `klgrade calibrate`) on a labelled set disjoint from `scored`, leaving out knees the model was trained on
    (returns the warning that says so, if any). A stored calibration's sets are replaced too: their scores belong to
    its own temperature.

    Raises:
        DataLayoutError: an image of the calibration set is unreadable (`labelled_outputs`).
    """
    found = find_samples(data)
    samples = pick_split(found, split or ("val" if any(s.split for s in found) else None))
    check_unshared(samples, scored, f"--calibrate-on {data} and --data", "calibrate on data that is not scored")
    what = f"--calibrate-on {data}"
    samples, warnings = distinct_knees(samples, what)
    samples, trained = untrained_knees(predictor, samples, what, "calibrate on")
    warnings += trained + unknown_sides_warning(predictor.preprocess, [s.side for s in samples], what)
    calibrating = labelled_outputs(predictor, samples, what)
    predictor.temperature, predictor.conformal_scores = fit_grade_sets(calibrating.outputs.probabilities,
                                                                       calibrating.labels)
    predictor.conformal_grades = calibrating.labels
    predictor.seen["calibrated"] = knee_record(samples)
    return warnings


def checkpoint_label(predictor: Predictor) -> str:
    """The model and its checkpoint files, e.g. `msa_net (run1.safetensors)`: two checkpoints of one architecture
    share a name."""
    return f"{predictor.name} ({', '.join(Path(path).name for path in predictor.paths)})"


def compare(predictor: Predictor, other: Predictor, scored: list[Sample], probabilities: np.ndarray, what: str,
            n_boot: int = 1000, seed: int = 0) -> tuple[dict, list[str]]:
    """`other` (another checkpoint or ensemble) graded on the knees `predictor` was scored on, less those `other` was
    trained on: both models' main metrics there and how much better `predictor` scored (`metrics.paired_difference`:
    the same patients resampled for both, so the knees' own difficulty cancels), with warnings saying which knees
    were left out and which of them `other` was chosen or calibrated on."""
    both, trained = untrained_knees(other, scored, what, f"compare {predictor.name} with {other.name} on")
    graded = {}
    for predictions, _ in predict_chunks(other, both):  # a file that reads for one model reads for the other
        graded.update(zip(predictions.samples, predictions.outputs.probabilities))
    index = [i for i, sample in enumerate(scored) if sample in graded]
    if not index:
        raise DataLayoutError(f"{what}: no knee left to compare {predictor.name} with {other.name} on")
    samples = [scored[i] for i in index]
    labels, groups = [s.grade for s in samples], [s.patient_id for s in samples]
    this, that = probabilities[index], np.stack([graded[s] for s in samples])
    _, seen_on = seen_warnings(other, samples)
    everyone = np.ones(len(samples), dtype=bool)
    comparison = {"this_model": checkpoint_label(predictor), "model": checkpoint_label(other), "n": len(samples),
                  "this": subset_metrics(labels, this, everyone),
                  "other": subset_metrics(labels, that, everyone),
                  "difference": paired_difference(labels, that.argmax(1), this.argmax(1), groups, n_boot=n_boot,
                                                  seed=seed)}
    return comparison, trained + [f"{other.name}: {warning}" for warning in seen_on]


def evaluate(predictor: Predictor, data: str | Path, split: str | None = None, n_boot: int = 1000,
             seed: int = 0, alpha: float | None = None, calibrate_on: str | Path | None = None,
             against: Predictor | None = None) -> Evaluation:
    """Metrics of `predictor` on the labelled images of `data` (unreadable images are reported, not scored).

    With a calibrated model (or `calibrate_on`, which fits a temperature and the grade sets first), the metrics
    include the grade sets' coverage at `alpha`; `ungradable_fraction` (and `ungradable_per_grade`, per true
    grade) is always there, and `gradable_only`, the main metrics of the knees answered gradable, and
    `unwarned_only`, of those answered with no warning at all (the answers a reader would take as they are); a
    checkpoint calibrated by `klgrade calibrate` adds `processing_shift_fraction`, the share of images whose
    contrast processing differs from the training images', `sharpness_shift_fraction`, whose noise or sharpness
    does, `framing_shift_fraction` and `framing_wide_shift_fraction`, the shares that look framed tighter or wider
    (an external set cropped otherwise shows here), `polarity_shift_fraction`, the share graded inverted back, and
    `orientation_shift_fraction`, the share graded turned upright;
    `noted_fraction` is the share whose answer notes how the image was prepared (not square, a burnt-in mark painted
    out, enhanced as looking unenhanced, an unknown side).

    Files in the scored split's grade folders that are no image klgrade reads are left out (`files_not_read` counts
    them, a warning names one). Each image is scored once (`provenance.distinct_knees`; `copies_left_out` counts the
    files left out), and knees the model was trained on are left out (`seen_trained` counts them); `seen_chosen` and
    `seen_calibrated` count the scored knees it was chosen and calibrated on; `warnings` says what each means, how
    many knees have no side where the model mirrors left knees, and how many name no patient (the intervals, which
    resample patients, then take each such knee for a person of its own).

    `against`, another checkpoint or ensemble, adds `compared_with` (`compare`): both models on the same knees and
    the difference with its paired 95% interval.
    """
    problems: list[ImageReadError] = []
    found_beside: list[tuple[str | None, str]] = []
    listed = pick_split(find_samples(data, problems, found_beside), split)
    not_read = [path for in_split, path in found_beside if in_split == listed[0].split]  # of the split scored
    distinct, warnings = distinct_knees(listed, str(data))
    warnings[:0] = [not_read_warning(data, not_read)] if not_read else []
    samples, trained = untrained_knees(predictor, distinct, str(data), "score")
    warnings += (trained + unknown_sides_warning(predictor.preprocess, [s.side for s in samples], str(data))
                 + unnamed_patients_warning(samples, str(data)))
    if calibrate_on is not None:
        warnings += calibrate(predictor, calibrate_on, samples)
    scored, probabilities, assessment, failures = assess_samples(predictor, samples, alpha)
    failures = problems + failures
    if assessment is None:
        raise DataLayoutError(f"{data}: no readable image to evaluate")
    labels = [s.grade for s in scored]
    metrics = compute_metrics(labels, probabilities, groups=[s.patient_id for s in scored], n_boot=n_boot, seed=seed)
    flagged = [not gradable for gradable in assessment.gradable]
    metrics["ungradable_fraction"] = float(np.mean(flagged))
    metrics["gradable_only"] = subset_metrics(labels, probabilities, assessment.gradable)
    metrics["unwarned_only"] = subset_metrics(labels, probabilities, [not notes for notes in assessment.warnings])
    metrics["ungradable_per_grade"] = share_per_grade(labels, flagged)
    for kind, shifted in assessment.shifts.items():
        metrics[f"{kind}_shift_fraction"] = float(shifted.mean())
    metrics["noted_fraction"] = float(np.mean(assessment.noted))
    if assessment.coverage is not None:
        metrics.update(set_metrics(labels, assessment.sets))
        metrics["nominal_coverage"] = assessment.coverage
    seen, seen_on = seen_warnings(predictor, scored)
    metrics["copies_left_out"] = len(listed) - len(distinct)
    metrics["files_not_read"] = len(not_read)
    metrics["seen_trained"] = len(distinct) - len(samples)
    metrics["seen_chosen"], metrics["seen_calibrated"] = seen["chosen"], seen["calibrated"]
    metrics["warnings"] = warnings + one_grade_warning(labels, str(data)) + seen_on
    if against is not None:
        metrics["compared_with"], compared_on = compare(predictor, against, scored, probabilities, str(data), n_boot,
                                                        seed)
        metrics["warnings"] += compared_on
    metrics["model"] = predictor.name
    metrics["tta"] = predictor.tta
    metrics["temperature"] = predictor.temperature
    kept, untrained = set(distinct), set(samples)
    left_out = [(s, "copy") for s in listed if s not in kept] + [(s, "trained") for s in distinct if s not in untrained]
    return Evaluation(metrics, scored, probabilities, failures, assessment, left_out)
