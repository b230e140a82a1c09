"""Are the grade sets and the gradability flag honest? Cross-fitted coverage on a labelled split, and flag rates.

    python benchmarks/uncertainty.py --data ../shared/data/kneeKL224 [--checkpoint CKPT] [--alpha 0.1]
        [--density-limit N] [--seed 0] [--json]

The calibration split (`val`) is cut into two halves by patient; the temperature, the conformal threshold and
the gradability threshold are fitted on one half (the feature density on the `train` split) and scored on the
other, both ways. Reported per direction and averaged: coverage of the grade sets (target 1 - alpha), mean set
size, coverage per true grade, share of the held-out half flagged not gradable, share warned that its
contrast processing differs (processing profile on the `train` images, threshold on the fitting half); and the
share of images
that are not knee radiographs (blank, noise, gradients, text, photographs and scans shipped in installed
packages: tests/helpers.py) flagged not gradable.
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
from common import machine  # noqa: E402
from helpers import not_knee_images  # noqa: E402

from klgrade.data.sources import find_samples, select_split  # noqa: E402
from klgrade.evaluate.evaluation import predict_samples  # noqa: E402
from klgrade.infer.predictor import Predictor, shipped_checkpoint  # noqa: E402
from klgrade.metrics import fit_temperature, set_metrics  # noqa: E402
from klgrade.uncertainty import (FeatureDensity, apply_temperature, conformal_scores, conformal_threshold,  # noqa: E402
                                 fit_processing_profile, grade_sets, gradability, log_probabilities,
                                 processing_shift, processing_statistics)

FLAGGED_SHARE = 0.01


def cross_fit(probabilities, features, labels, images, halves, density: FeatureDensity, processing: FeatureDensity,
              alpha: float) -> list[dict]:
    results = []
    for fit_half, score_half in ((halves[0], halves[1]), (halves[1], halves[0])):
        temperature = fit_temperature(log_probabilities(probabilities[fit_half]), labels[fit_half])
        scores = conformal_scores(apply_temperature(probabilities[fit_half], temperature), labels[fit_half])
        sets = grade_sets(apply_temperature(probabilities[score_half], temperature), conformal_threshold(scores, alpha))
        fitted = density.with_threshold(features[fit_half], FLAGGED_SHARE)
        flagged = [bool(r) for r in gradability(images[score_half], features[score_half], fitted)]
        profile = processing.with_threshold(processing_statistics(images[fit_half]), FLAGGED_SHARE)
        results.append({"n_fit": int(len(fit_half)), "n_scored": int(len(score_half)), "temperature": temperature,
                         **set_metrics(labels[score_half], sets), "flagged_fraction": float(np.mean(flagged)),
                         "warned_fraction": float(processing_shift(images[score_half], profile).mean())})
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", required=True, help="Split root with train and val.")
    parser.add_argument("--checkpoint", default=None, help="Default: the shipped model.")
    parser.add_argument("--alpha", type=float, default=0.1)
    parser.add_argument("--density-limit", type=int, default=None, help="Use at most N train images for the density.")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(2)
    predictor = Predictor([args.checkpoint or shipped_checkpoint()], calibrated=False)
    samples = find_samples(args.data)
    val, train = select_split(samples, "val"), select_split(samples, "train")
    if args.density_limit:
        keep = np.random.default_rng(args.seed).permutation(len(train))[: args.density_limit]
        train = [train[i] for i in sorted(keep)]
    val_predictions, _ = predict_samples(predictor, val, raw=True)
    train_predictions, _ = predict_samples(predictor, train, raw=True)
    density = FeatureDensity.fit(train_predictions.outputs.features, np.array(train_predictions.labels))
    patients = sorted({s.patient_id for s in val_predictions.samples})
    first = set(np.random.default_rng(args.seed).permutation(patients)[: len(patients) // 2])
    in_first = np.array([s.patient_id in first for s in val_predictions.samples])
    halves = (np.flatnonzero(in_first), np.flatnonzero(~in_first))
    outputs = val_predictions.outputs
    folds = cross_fit(outputs.probabilities, outputs.features, np.array(val_predictions.labels), val_predictions.images,
                      halves, density, fit_processing_profile(train_predictions.images), args.alpha)
    full = density.with_threshold(outputs.features, FLAGGED_SHARE)
    odd = not_knee_images()
    odd_prepared = np.stack([predictor.prepare(image.astype(np.float32)) for image in odd.values()])
    odd_outputs = predictor.raw_outputs(odd_prepared)
    odd_flagged = [bool(r) for r in gradability(odd_prepared, odd_outputs.features, full)]
    result = {"alpha": args.alpha, "cross_fit": folds,
              "mean": {key: float(np.mean([f[key] for f in folds]))
                       for key in ("coverage", "mean_set_size", "flagged_fraction", "warned_fraction")},
              "not_knee": {"n": len(odd), "flagged_fraction": float(np.mean(odd_flagged)),
                           "missed": [name for name, flagged in zip(odd, odd_flagged) if not flagged]},
              "n_density": len(train)}
    if args.json:
        print(json.dumps(result, indent=2))
        return
    print(f"machine: {machine()}")
    print(f"model {predictor.name} (TTA {'on' if predictor.tta else 'off'}), alpha {args.alpha}, density from "
          f"{len(train)} train images; val halves by patient (seed {args.seed})")
    print(f"{'direction':>10s} {'n fit':>6s} {'n scored':>8s} {'T':>6s} {'coverage':>9s} {'set size':>9s} "
          f"{'flagged':>8s} {'warned':>7s}  per grade")
    for i, fold in enumerate(folds):
        per_grade = " ".join(f"{c:.2f}" for c in fold["coverage_per_grade"])
        print(f"{'A->B' if i == 0 else 'B->A':>10s} {fold['n_fit']:6d} {fold['n_scored']:8d} {fold['temperature']:6.3f} "
              f"{fold['coverage']:9.3f} {fold['mean_set_size']:9.2f} {fold['flagged_fraction']:8.3f} "
              f"{fold['warned_fraction']:7.3f}  {per_grade}")
    mean = result["mean"]
    print(f"{'mean':>10s} {'':6s} {'':8s} {'':6s} {mean['coverage']:9.3f} {mean['mean_set_size']:9.2f} "
          f"{mean['flagged_fraction']:8.3f} {mean['warned_fraction']:7.3f}")
    print(f"not knee radiographs: {result['not_knee']['flagged_fraction']:.3f} of {len(odd)} flagged; "
          f"missed: {result['not_knee']['missed'] or 'none'}")


if __name__ == "__main__":
    main()
