"""Do grades hold whatever the upstream image processing? A fixed, seeded suite of perturbations on a labelled set.

    python benchmarks/robustness.py --data ../shared/data/kneeKL224/val [--checkpoint CKPT ...] [--limit N] [--tta]
        [--cross-fit 20] [--only ROW ...] [--json]

Each perturbation is applied to the decoded image as a radiograph viewer or PACS would, with OpenCV (not the
training augmentation's code): CLAHE again at two strengths, local contrast reduced (blend with a smoothed
copy, towards an unenhanced radiograph: by half, and to a fifth), gamma 0.7 and 1.4, histogram equalisation, JPEG
at quality 30, downsampling to 112 px and back, a 16-bit PNG re-encode, Gaussian noise (sigma 8 and 20 grey levels
of 255), Gaussian blur (sigma 2 px at 224 px), edge enhancement (unsharp masking, sigma 2 px, amount 1, as CR/DX
processing sharpens), and the grey levels inverted (a MONOCHROME1 radiograph saved without its
inversion). Per perturbation: accuracy, QWK, and agreement of the grade
with the clean image's grade; `warned`, the share of images that get the processing-shift warning,
`sharpness_warned`, the share warned that the noise or sharpness differs, `framing_warned` and
`framing_wide_warned`, the shares that get a framing warning (the knee framed tighter, or wider, than in
training), `inverted_back`, the share graded inverted back because it looked inverted, `turned_upright`, the
share graded turned upright because it looked turned, `noted`, the share whose answer notes how the image was
prepared (not square: squeezed to the square; a mark painted out; enhanced), `painted`, the share with a bright
burnt-in mark painted out before grading (`data.preprocess.burnt_in_marks`),
`enhanced`, the share CLAHE-enhanced before grading as looking unenhanced (`data.preprocess.looks_unenhanced`), and
`not_gradable`, the share flagged not gradable; for a calibrated model also
`coverage` (share whose grade set holds the true grade: does the stated uncertainty hold under the processing?),
`coverage_per_grade` (its share among the knees of each true grade) and `mean_set_size`, and, since the model's
calibration may have seen these very knees (the shipped one: kneeKL224 val), `cross_fitted_coverage` and
`cross_fitted_coverage_per_grade`: grade sets calibrated afresh on the clean images of half the patients and
scored on the other half's processed images, both ways, over `--cross-fit` random halvings. The same scores for
`framings`, another site's framing of the same knee (rotated 7 degrees, cropped 15% and 25% tighter, shrunk 20%
inside a margin of repeated edge pixels or a black one, cropped to a non-square 4:5 or 5:4 at the same scale, which
preprocessing stretches to square, or as stored inside a bright border a tenth of the side wide on two sides with
noise of std 3 grey levels), and for `markers`, a lead side marker burnt in, in the upper corner or at the edge
beside the joint line, and two lines of small text at the top and bottom edges; and for `orientations`, the knee
stored turned a quarter either way or a half, upside down, or turned and inverted; all kept apart: they are not
contrast processing. `--json` prints `{"clean": {...},
"perturbations": {name: {"accuracy", "qwk", "agreement", "warned", "sharpness_warned", "framing_warned",
"framing_wide_warned", "inverted_back", "turned_upright", "noted", "painted", "enhanced", "not_gradable", ...}},
"framings": {...}, "markers": {...}, "orientations": {...}}`.
"""

from __future__ import annotations

import argparse
import io
import itertools
import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import cv2
import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).parent))
from common import machine, patient_halves  # noqa: E402

from klgrade.data.io import read_image  # noqa: E402
from klgrade.data.sources import find_samples  # noqa: E402
from klgrade.constants import NUM_GRADES  # noqa: E402
from klgrade.evaluate.evaluation import batched_outputs, fit_grade_sets  # noqa: E402
from klgrade.infer.grading import load_model  # noqa: E402
from klgrade.infer.predictor import upright_images  # noqa: E402
from klgrade.metrics import compute_metrics, set_metrics  # noqa: E402
from klgrade.uncertainty import answered_sets, apply_temperature, grade_sets, grade_thresholds  # noqa: E402

SEED = 0


def _uint8(image: np.ndarray) -> np.ndarray:
    low, high = float(image.min()), float(image.max())
    return np.clip((image - low) * (255.0 / max(high - low, 1e-6)), 0, 255).astype(np.uint8)


def _clahe(clip: float) -> Callable[[np.ndarray], np.ndarray]:
    return lambda image: cv2.createCLAHE(clipLimit=clip, tileGridSize=(8, 8)).apply(_uint8(image)).astype(np.float32)


def _soften(blend: float) -> Callable[[np.ndarray], np.ndarray]:
    return lambda image: (1 - blend) * image + blend * cv2.GaussianBlur(image, (0, 0), 0.1 * image.shape[0])


def _gamma(gamma: float) -> Callable[[np.ndarray], np.ndarray]:
    return lambda image: 255.0 * (_uint8(image) / 255.0) ** gamma


def _jpeg(image: np.ndarray) -> np.ndarray:
    encoded = cv2.imencode(".jpg", _uint8(image), [cv2.IMWRITE_JPEG_QUALITY, 30])[1]
    return cv2.imdecode(encoded, cv2.IMREAD_GRAYSCALE).astype(np.float32)


def _resample(image: np.ndarray) -> np.ndarray:
    height, width = image.shape
    small = cv2.resize(image, (112, 112), interpolation=cv2.INTER_AREA)
    return cv2.resize(small, (width, height), interpolation=cv2.INTER_LINEAR)


def _sixteen_bit(image: np.ndarray) -> np.ndarray:
    buffer = io.BytesIO()
    Image.fromarray((_uint8(image).astype(np.uint16) * 257)).save(buffer, format="PNG")
    return read_image(buffer.getvalue(), name="reencoded.png")


def _noise(sigma: float, rng: np.random.Generator) -> Callable[[np.ndarray], np.ndarray]:
    return lambda image: np.clip(image + rng.normal(0, sigma, image.shape), 0, 255).astype(np.float32)


def _blur(sigma: float) -> Callable[[np.ndarray], np.ndarray]:
    return lambda image: cv2.GaussianBlur(image, (0, 0), sigma)


def _unsharp(sigma: float, amount: float) -> Callable[[np.ndarray], np.ndarray]:
    return lambda image: np.clip(image + amount * (image - cv2.GaussianBlur(image, (0, 0), sigma)), 0, 255)


def _marker(x: float, y: float) -> Callable[[np.ndarray], np.ndarray]:
    """A side marker burnt in as a radiographer's lead letter shows: a white "R" an eighth of the image high, its
    baseline starting at (`x`, `y`) shares of the width and height."""
    def mark(image: np.ndarray) -> np.ndarray:
        height, width = image.shape
        scale = height / 8 / 22  # FONT_HERSHEY_SIMPLEX capitals are about 22 px high at scale 1
        letter = np.zeros(image.shape, np.uint8)
        cv2.putText(letter, "R", (int(x * width), int(y * height)), cv2.FONT_HERSHEY_SIMPLEX, scale, 255,
                    max(1, round(3 * scale)), cv2.LINE_AA)
        return np.where(letter > 0, np.maximum(image, image.max() * letter / 255.0), image).astype(np.float32)
    return mark


def _inverted(image: np.ndarray) -> np.ndarray:
    """The grey levels inverted (a MONOCHROME1 radiograph saved without its inversion)."""
    return image.max() + image.min() - image


def perturbations(rng: np.random.Generator) -> dict[str, Callable[[np.ndarray], np.ndarray]]:
    return {
        "clahe_2": _clahe(2.0), "clahe_4": _clahe(4.0), "contrast_reduced": _soften(0.5),
        "contrast_reduced_0.8": _soften(0.8),
        "gamma_0.7": _gamma(0.7), "gamma_1.4": _gamma(1.4),
        "equalize": lambda image: cv2.equalizeHist(_uint8(image)).astype(np.float32),
        "jpeg_q30": _jpeg, "downsample_112": _resample, "png_16bit": _sixteen_bit,
        "gaussian_noise": _noise(8.0, rng), "gaussian_noise_20": _noise(20.0, rng), "blur_2": _blur(2.0),
        "unsharp_2": _unsharp(2.0, 1.0),
        "inverted": _inverted,
    }


def _text_lines(image: np.ndarray) -> np.ndarray:
    """Two lines of small text burnt in at the top and bottom edges at the image's brightest level, as exports label
    a radiograph (side, view, date, patient id): letters about 4% of the side high."""
    height, width = image.shape
    scale = height / 640  # FONT_HERSHEY_SIMPLEX capitals are about 22 px high at scale 1
    letters = np.zeros(image.shape, np.uint8)
    for text, row in (("L  WB PA 2019-03-02", 0.055), ("ID 9012345 KNEE", 0.965)):
        cv2.putText(letters, text, (int(0.02 * width), int(row * height)), cv2.FONT_HERSHEY_SIMPLEX, scale, 255, 1,
                    cv2.LINE_AA)
    return np.where(letters > 0, np.maximum(image, image.max() * letters / 255.0), image).astype(np.float32)


def markers() -> dict[str, Callable[[np.ndarray], np.ndarray]]:
    """A lead side marker burnt in: in the upper corner, where radiographers put it, and beside the joint line; and
    small text burnt in at the edges."""
    return {"marker_corner": _marker(0.06, 0.14), "marker_joint": _marker(0.02, 0.55), "text_edges": _text_lines}


def _rotate(degrees: float) -> Callable[[np.ndarray], np.ndarray]:
    def rotate(image: np.ndarray) -> np.ndarray:
        height, width = image.shape
        matrix = cv2.getRotationMatrix2D((width / 2, height / 2), degrees, 1.0)
        return cv2.warpAffine(image, matrix, (width, height), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REFLECT_101)
    return rotate


def _crop(share: float) -> Callable[[np.ndarray], np.ndarray]:
    """The central `share` of each side, resized back: the knee cropped tighter around the joint."""
    central = _non_square(share, share)

    def crop(image: np.ndarray) -> np.ndarray:
        return cv2.resize(central(image), image.shape[::-1], interpolation=cv2.INTER_LINEAR)
    return crop


def _shrink(share: float, border: int) -> Callable[[np.ndarray], np.ndarray]:
    """The knee framed wider: the image shrunk to 1 / `share` of its side inside an OpenCV `border` margin
    (kneeKL224's crops hold nothing beyond their frame, so the margin is made up)."""
    def shrink(image: np.ndarray) -> np.ndarray:
        height, width = image.shape
        kept_height, kept_width = round(height / share), round(width / share)
        small = cv2.resize(image, (kept_width, kept_height), interpolation=cv2.INTER_AREA)
        top, left = (height - kept_height) // 2, (width - kept_width) // 2
        return cv2.copyMakeBorder(small, top, height - kept_height - top, left, width - kept_width - left, border,
                                  value=0)
    return shrink


def _non_square(rows: float, columns: float) -> Callable[[np.ndarray], np.ndarray]:
    """The central `rows` x `columns` shares of the image, at its scale: another site's non-square crop."""
    def crop(image: np.ndarray) -> np.ndarray:
        height, width = image.shape
        kept_height, kept_width = int(height * rows), int(width * columns)
        top, left = (height - kept_height) // 2, (width - kept_width) // 2
        return image[top:top + kept_height, left:left + kept_width]
    return crop


def _noisy_border(share: float, level: float, noise: float) -> Callable[[np.ndarray], np.ndarray]:
    """The knee as stored inside a border `share` of its side wide above and on the left, at `level` with Gaussian
    noise of std `noise` grey levels, clipped: a collimated region exported unclipped, which preprocessing trims off
    (a check that it does)."""
    def border(image: np.ndarray) -> np.ndarray:
        size = round(share * image.shape[0])
        framed = cv2.copyMakeBorder(image, size, 0, size, 0, cv2.BORDER_CONSTANT, value=level)
        framed = framed + np.random.default_rng(SEED).normal(0, noise, framed.shape)
        framed[size:, size:] = image
        return np.clip(framed, 0, 255).astype(np.float32)
    return border


def orientations() -> dict[str, Callable[[np.ndarray], np.ndarray]]:
    """The knee stored turned with nothing to say so (an export that drops the orientation): a quarter turn each
    way, a half turn, upside down (mirrored top to bottom), and a quarter turn of the inverted image."""
    return {"turned_90": lambda image: np.rot90(image, 1), "turned_180": lambda image: np.rot90(image, 2),
            "turned_270": lambda image: np.rot90(image, 3), "upside_down": np.flipud,
            "inverted_turned_90": lambda image: np.rot90(_inverted(image), 1)}


def framings() -> dict[str, Callable[[np.ndarray], np.ndarray]]:
    """Another site's framing of the same knee: tilted, cropped tighter around the joint, framed wider (shrunk
    inside a margin of repeated edge pixels, or of black, which preprocessing trims off: a check that it does),
    cropped non-square (portrait: columns cut; landscape: rows cut), or as stored inside a noisy bright border."""
    return {"rotate_7": _rotate(7.0), "crop_0.85": _crop(0.85), "crop_0.75": _crop(0.75),
            "wide_1.2": _shrink(1.2, cv2.BORDER_REPLICATE), "black_margin_1.2": _shrink(1.2, cv2.BORDER_CONSTANT),
            "portrait_4:5": _non_square(1.0, 0.8), "landscape_5:4": _non_square(0.8, 1.0),
            "noisy_border": _noisy_border(0.1, 255.0, 3.0)}


SHIFT_KEYS = {"processing": "warned", "sharpness": "sharpness_warned", "framing": "framing_warned",
              "framing_wide": "framing_wide_warned", "polarity": "inverted_back", "orientation": "turned_upright"}
"""The report's key for the share of each kind of shift the predictor reports (`Predictor.shifts`)."""


@dataclass
class Graded:
    """What the model says about each image of a set: probabilities, grade sets, the not-gradable flag, per
    kind of shift where it was seen, which answers note how the image was prepared, which had marks painted
    out, and which were enhanced as looking unenhanced."""
    probabilities: np.ndarray
    sets: list[list[int]]
    not_gradable: np.ndarray
    shifts: dict[str, np.ndarray]
    noted: np.ndarray
    painted: np.ndarray
    enhanced: np.ndarray


def grades_of(predictor, images: list[np.ndarray], sides: list[str | None]) -> Graded:
    prepared = predictor.prepare_arrays(images, sides)
    pixels = np.stack([p.pixels for p in prepared])
    outputs = batched_outputs(predictor, pixels)
    graded = upright_images(pixels, outputs)
    assessment = predictor.assess(graded, outputs, reasons=[p.reasons() for p in prepared],
                                  notes=[p.notes() for p in prepared])
    return Graded(outputs.probabilities, assessment.sets, ~np.array(assessment.gradable), assessment.shifts,
                  np.array(assessment.noted), np.array([p.marks_painted for p in prepared]),
                  np.array([p.enhanced for p in prepared]))


def scores(labels: list[int], graded: Graded, clean: Graded | None, calibrated: bool) -> dict:
    metrics = compute_metrics(labels, graded.probabilities, n_boot=0)
    result = {"accuracy": metrics["accuracy"], "qwk": metrics["qwk"],
              **{key: float(graded.shifts[kind].mean()) if kind in graded.shifts else 0.0
                 for kind, key in SHIFT_KEYS.items()},
              "noted": float(graded.noted.mean()), "painted": float(graded.painted.mean()),
              "enhanced": float(graded.enhanced.mean()),
              "not_gradable": float(graded.not_gradable.mean())}
    if calibrated:
        sets = set_metrics(labels, graded.sets)
        result.update(coverage=sets["coverage"], coverage_per_grade=sets["coverage_per_grade"],
                      mean_set_size=sets["mean_set_size"])
    if clean is not None:
        result["agreement"] = float((graded.probabilities.argmax(1) == clean.probabilities.argmax(1)).mean())
    return result


@dataclass
class CrossFit:
    """Grade sets fitted as `klgrade calibrate` fits them on the clean images of one half of the patients, to be
    scored on the other half (`scored`, indices)."""
    scored: np.ndarray
    temperature: float
    thresholds: np.ndarray


def cross_fits(labels: np.ndarray, patients: list[str], clean: Graded, temperature: float, alpha: float,
               splits: int) -> list[CrossFit]:
    """One fit per half of each of `splits` random halvings, both ways, from the clean images' uncalibrated
    probabilities (the model's calibration undone: p ~ p_calibrated ** T)."""
    uncalibrated = apply_temperature(clean.probabilities, 1 / temperature)
    fits = []
    for split in range(splits):
        for fit, scored in itertools.permutations(patient_halves(patients, SEED + split)):
            fitted_temperature, scores = fit_grade_sets(uncalibrated[fit], labels[fit])
            fits.append(CrossFit(scored, fitted_temperature, grade_thresholds(scores, labels[fit], alpha)))
    return fits


def cross_fitted(labels: np.ndarray, fits: list[CrossFit], graded: Graded, temperature: float) -> dict:
    """Coverage of the cross-fitted grade sets on the scored halves' `graded` images, averaged over the fits; a knee
    answered not gradable has all five grades, as klgrade answers it."""
    uncalibrated = apply_temperature(graded.probabilities, 1 / temperature)
    results = []
    for fit in fits:
        sets = grade_sets(apply_temperature(uncalibrated[fit.scored], fit.temperature), fit.thresholds)
        results.append(set_metrics(labels[fit.scored], answered_sets(sets, ~graded.not_gradable[fit.scored])))
    per_grade = [[result["coverage_per_grade"][grade] for result in results
                  if result["coverage_per_grade"][grade] is not None] for grade in range(NUM_GRADES)]
    return {"cross_fitted_coverage": float(np.mean([result["coverage"] for result in results])),
            "cross_fitted_coverage_per_grade": [float(np.mean(values)) if values else None for values in per_grade]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", required=True)
    parser.add_argument("--checkpoint", nargs="+", default=None, help="Default: the shipped model.")
    parser.add_argument("--limit", type=int, default=None, help="At most N images (a seeded subset).")
    parser.add_argument("--tta", action=argparse.BooleanOptionalAction, default=None,
                        help="Flip TTA on/off [as the checkpoint recommends].")
    parser.add_argument("--cross-fit", type=int, default=20,
                        help="Random patient halvings for the cross-fitted coverage of a calibrated model (0: none).")
    parser.add_argument("--only", nargs="+", default=None, metavar="ROW",
                        help="Only these rows besides clean (e.g. marker_corner marker_joint), for a quick check.")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    groups = {"perturbations": perturbations(np.random.default_rng(SEED)), "framings": framings(), "markers": markers(),
              "orientations": orientations()}
    unknown = set(args.only or []) - {name for changes in groups.values() for name in changes}
    if unknown:
        parser.error(f"--only: no row named {', '.join(sorted(unknown))}")
    groups = {group: {name: change for name, change in changes.items() if not args.only or name in args.only}
              for group, changes in groups.items()}
    torch.set_num_threads(2)
    predictor = load_model(args.checkpoint, tta=args.tta)
    samples = find_samples(args.data)
    if args.limit is not None and args.limit < len(samples):
        keep = np.sort(np.random.default_rng(SEED).permutation(len(samples))[: args.limit])
        samples = [samples[i] for i in keep]
    images = [read_image(s.path) for s in samples]
    sides = [s.side for s in samples]
    labels = [s.grade for s in samples]
    clean = grades_of(predictor, images, sides)
    calibrated = predictor.is_calibrated
    fits = (cross_fits(np.array(labels), [s.patient_id for s in samples], clean, predictor.temperature,
                       predictor.alpha, args.cross_fit) if calibrated else [])

    def scored(graded: Graded, reference: Graded | None) -> dict:
        entry = scores(labels, graded, reference, calibrated)
        if fits:
            entry.update(cross_fitted(np.array(labels), fits, graded, predictor.temperature))
        return entry

    result = {"n": len(samples), "clean": scored(clean, None), **{group: {} for group in groups}}
    for group, changes in groups.items():
        for name, change in changes.items():
            result[group][name] = scored(grades_of(predictor, [change(image) for image in images], sides), clean)
    if args.json:
        print(json.dumps(result, indent=2))
        return
    print(f"machine: {machine()}")
    print(f"model {predictor.name} ({', '.join(str(p) for p in predictor.paths)}), TTA {'on' if predictor.tta else 'off'}, "
          f"{result['n']} images of {args.data}")
    clean_accuracy = result["clean"]["accuracy"]
    print(f"{'perturbation':18s} {'accuracy':>9s} {'d acc':>7s} {'qwk':>6s} {'agreement':>10s} {'warned':>7s} "
          f"{'sharp':>6s} {'framing':>7s} {'wider':>6s} {'inv.':>5s} {'turn.':>5s} {'noted':>6s} {'paint.':>6s} {'enh.':>5s} {'not grad.':>9s} {'coverage':>9s} {'set size':>9s}  coverage KL0-KL4 | cross-fitted: all, KL0-KL4")
    rows = {"clean": result["clean"], **{name: entry for group in groups for name, entry in result[group].items()}}
    for name, entry in rows.items():
        print(f"{name:18s} {entry['accuracy']:9.3f} {entry['accuracy'] - clean_accuracy:+7.3f} {entry['qwk']:6.3f} "
              f"{entry.get('agreement', 1.0):10.3f} {entry['warned']:7.3f} {entry['sharpness_warned']:6.3f} "
              f"{entry['framing_warned']:7.3f} {entry['framing_wide_warned']:6.3f} {entry['inverted_back']:5.3f} "
              f"{entry['turned_upright']:5.3f} {entry['noted']:6.3f} {entry['painted']:6.3f} {entry['enhanced']:5.3f} {entry['not_gradable']:9.3f} "
              f"{entry.get('coverage', float('nan')):9.3f} {entry.get('mean_set_size', float('nan')):9.3f}  "
              f"{' '.join(f'{c:.2f}' for c in entry.get('coverage_per_grade', []) if c is not None)} | "
              f"{entry.get('cross_fitted_coverage', float('nan')):.3f} "
              f"{' '.join(f'{c:.2f}' for c in entry.get('cross_fitted_coverage_per_grade', []) if c is not None)}")


if __name__ == "__main__":
    main()
