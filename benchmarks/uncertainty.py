"""Are the grade sets and the gradability flag honest? Cross-fitted coverage on a labelled split, and flag rates.

    python benchmarks/uncertainty.py --data ../shared/data/kneeKL224 [--checkpoint CKPT] [--alpha 0.1]
        [--density-limit N] [--seed 0] [--splits 20] [--json]

The calibration split (`val`) is cut into two halves by patient; the temperature, the conformal thresholds (one
per grade, as shipped) and the gradability threshold are fitted on one half (the feature density on the `train`
split) and scored on the other, both ways, for `--splits` random halvings (one network pass; the halvings only
re-fit). Reported per fit and averaged (with the 5th percentile of per-grade coverage over the fits: how low it
gets on a calibration set of this size): coverage of the grade sets (target 1 - alpha), mean set size, coverage
per true grade (and, for comparison, the same with one conformal threshold for all grades), share of the
held-out half flagged not gradable, shares warned that its contrast processing, or its noise or sharpness, differs
(the profiles on the `train` images, thresholds on the fitting half), and, for a checkpoint calibrated by
`klgrade calibrate`, shares warned that the knee is framed tighter or wider (its stored framing read-outs, fitted on
train; their thresholds re-fitted on the fitting half at the stored warned shares); knees its stored polarity
probe reads as inverted are graded inverted back, as shipped (and such train knees left out of the density); and
the share of images that are not knee radiographs (blank, noise, gradients, text, photographs and scans shipped
in installed packages: tests/helpers.py) flagged not gradable.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from common import machine, patient_halves  # noqa: E402
from helpers import not_knee_images  # noqa: E402

from klgrade.data.sources import find_samples, select_split  # noqa: E402
from klgrade.evaluate.evaluation import fit_grade_sets, predict_samples  # noqa: E402
from klgrade.infer.predictor import Predictor, shipped_checkpoint  # noqa: E402
from klgrade.metrics import set_metrics  # noqa: E402
from klgrade.models.weights import read_info  # noqa: E402
from klgrade.uncertainty import (PROFILES, Calibration, FeatureDensity, FramingProbe, apply_temperature,  # noqa: E402
                                 conformal_threshold, fit_profile, grade_sets, grade_thresholds, gradability,
                                 profile_shift, profile_statistics)

FLAGGED_SHARE = 0.01
PROFILE_KEYS = {"processing": "warned_fraction", "sharpness": "sharpness_warned_fraction"}
"""The report's key for the share each image-statistics profile warns (`uncertainty.PROFILES`)."""


def cross_fit(probabilities, features, labels, images, halves, density: FeatureDensity,
              profiles: dict[str, FeatureDensity], alpha: float, framings: dict[str, tuple[FramingProbe, float]]
              ) -> list[dict]:
    """`profiles`: kind -> the training images' profile (unthresholded); `framings`: name -> (stored read-out, share
    of calibration knees it warns)."""
    results = []
    for fit_half, score_half in ((halves[0], halves[1]), (halves[1], halves[0])):
        temperature, scores = fit_grade_sets(probabilities[fit_half], labels[fit_half])
        scaled = apply_temperature(probabilities[score_half], temperature)
        sets = grade_sets(scaled, grade_thresholds(scores, labels[fit_half], alpha))
        one_threshold = set_metrics(labels[score_half], grade_sets(scaled, conformal_threshold(scores, alpha)))
        fitted = density.with_threshold(features[fit_half], FLAGGED_SHARE)
        flagged = [bool(r) for r in gradability(images[score_half], features[score_half], fitted)]
        thresholded = {kind: profile.with_threshold(profile_statistics(kind, images[fit_half]), FLAGGED_SHARE)
                       for kind, profile in profiles.items()}
        results.append({"n_fit": int(len(fit_half)), "n_scored": int(len(score_half)), "temperature": temperature,
                         **set_metrics(labels[score_half], sets), "flagged_fraction": float(np.mean(flagged)),
                         **{PROFILE_KEYS[kind]: float(profile_shift(kind, images[score_half], profile).mean())
                            for kind, profile in thresholded.items()},
                         **{f"{name}_warned_fraction": float(probe.with_threshold(features[fit_half], share)
                                                             .shifted(features[score_half]).mean())
                            for name, (probe, share) in framings.items()},
                         "one_threshold": {key: one_threshold[key]
                                           for key in ("coverage", "mean_set_size", "coverage_per_grade")}})
    return results


def per_grade_summary(fits: list[dict]) -> dict:
    """Mean and 5th percentile over the fits of the coverage of each grade (NaN where a half lacks the grade)."""
    per_grade = np.array([f["coverage_per_grade"] for f in fits], dtype=np.float64)
    return {"coverage_per_grade": np.nanmean(per_grade, axis=0).tolist(),
            "coverage_per_grade_p5": np.nanpercentile(per_grade, 5, axis=0).tolist()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", required=True, help="Split root with train and val.")
    parser.add_argument("--checkpoint", default=None, help="Default: the shipped model.")
    parser.add_argument("--alpha", type=float, default=0.1)
    parser.add_argument("--density-limit", type=int, default=None, help="Use at most N train images for the density.")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--splits", type=int, default=20, help="Random halvings of val by patient, each both ways.")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(2)
    predictor = Predictor([args.checkpoint or shipped_checkpoint()], calibrated=False)
    stored = read_info(predictor.paths[0]).get("calibration")
    calibration = Calibration.from_dict(stored) if stored else Calibration()
    predictor.polarity = calibration.polarity
    samples = find_samples(args.data)
    val, train = select_split(samples, "val"), select_split(samples, "train")
    if args.density_limit:
        keep = np.random.default_rng(args.seed).permutation(len(train))[: args.density_limit]
        train = [train[i] for i in sorted(keep)]
    val_predictions, _ = predict_samples(predictor, val, raw=True)
    train_predictions, _ = predict_samples(predictor, train, raw=True)
    upright = ~train_predictions.outputs.inverted
    density = FeatureDensity.fit(train_predictions.outputs.features[upright],
                                 np.array(train_predictions.labels)[upright])
    patients = [s.patient_id for s in val_predictions.samples]
    outputs, labels = val_predictions.outputs, np.array(val_predictions.labels)
    profiles = {kind: fit_profile(profile_statistics(kind, train_predictions.images[upright])) for kind in PROFILES}
    framings = {name: (probe, stored[f"{name}_warned_share"]) for name, probe in calibration.framings.items()}
    folds = []
    for split in range(args.splits):
        halves = patient_halves(patients, args.seed + split)
        folds += cross_fit(outputs.probabilities, outputs.features, labels, val_predictions.images, halves, density,
                           profiles, args.alpha, framings)
    full = density.with_threshold(outputs.features, FLAGGED_SHARE)
    odd = not_knee_images()
    odd_prepared = np.stack([predictor.prepare(image.astype(np.float32)) for image in odd.values()])
    odd_outputs = predictor.raw_outputs(odd_prepared)
    odd_flagged = [bool(r) for r in gradability(odd_prepared, odd_outputs.features, full)]
    result = {"alpha": args.alpha, "splits": args.splits, "cross_fit": folds,
              "mean": {**{key: float(np.mean([f[key] for f in folds]))
                          for key in ("coverage", "mean_set_size", "flagged_fraction", *PROFILE_KEYS.values(),
                                      *(f"{name}_warned_fraction" for name in framings))},
                       **per_grade_summary(folds)},
              "one_threshold": {key: float(np.mean([f["one_threshold"][key] for f in folds]))
                                for key in ("coverage", "mean_set_size")}
              | per_grade_summary([f["one_threshold"] for f in folds]),
              "not_knee": {"n": len(odd), "flagged_fraction": float(np.mean(odd_flagged)),
                           "missed": [name for name, flagged in zip(odd, odd_flagged) if not flagged]},
              "n_density": int(upright.sum())}
    if args.json:
        print(json.dumps(result, indent=2))
        return
    print(f"machine: {machine()}")
    print(f"model {predictor.name} (TTA {'on' if predictor.tta else 'off'}), alpha {args.alpha}, density from "
          f"{result['n_density']} train images; {args.splits} halvings of val by patient (seeds {args.seed}+), each both ways")
    print(f"{'thresholds':>14s} {'coverage':>9s} {'set size':>9s}  per grade: mean coverage | 5th percentile")
    for name, summary in (("one per grade", result["mean"]), ("one for all", result["one_threshold"])):
        print(f"{name:>14s} {summary['coverage']:9.3f} {summary['mean_set_size']:9.2f}  "
              f"{' '.join(f'{c:.3f}' for c in summary['coverage_per_grade'])} | "
              f"{' '.join(f'{c:.3f}' for c in summary['coverage_per_grade_p5'])}")
    mean = result["mean"]
    print(f"not gradable (held-out halves): {mean['flagged_fraction']:.3f}; processing warned: "
          f"{mean['warned_fraction']:.3f}"
          + "".join(f"; {name} warned: {mean[f'{name}_warned_fraction']:.3f}" for name in framings))
    print(f"not knee radiographs: {result['not_knee']['flagged_fraction']:.3f} of {len(odd)} flagged; "
          f"missed: {result['not_knee']['missed'] or 'none'}")


if __name__ == "__main__":
    main()
