"""The metric suite, used by training (model selection), `klgrade evaluate` and `klgrade reproduce`.

Point estimates come from scikit-learn. Confidence intervals come from a seeded patient-level bootstrap:
patients (not images) are resampled, because both knees of a person are correlated. The bootstrap works on
per-patient confusion matrices, so 1000 resamples take milliseconds; `confusion_metrics` computes the
metrics from a confusion matrix and is cross-checked against scikit-learn in the tests.
"""

from __future__ import annotations

import numpy as np
from sklearn.metrics import (
    accuracy_score,
    cohen_kappa_score,
    confusion_matrix,
    matthews_corrcoef,
    mean_absolute_error,
    precision_recall_fscore_support,
    roc_auc_score,
)

from klgrade.constants import NUM_GRADES

CI_METRICS = ("accuracy", "f1_macro", "mcc", "qwk", "mae")
"""Metrics that get a bootstrap 95% interval."""
ECE_BINS = 15


def compute_metrics(y_true, probabilities, groups=None, n_boot: int = 1000, seed: int = 0,
                    num_classes: int = NUM_GRADES) -> dict:
    """All metrics of a set of predictions.

    Args:
        y_true: (N,) true grades.
        probabilities: (N, K) predicted class probabilities (rows sum to 1).
        groups: (N,) patient ids for the bootstrap; each image is its own group when None.
        n_boot: bootstrap resamples (0 = no `ci95`).
        seed: seed of the bootstrap.

    Returns:
        dict with the keys of DESIGN.md (`n`, `accuracy`, ..., `confusion_matrix`, `adjacent_error_rate`,
        `extreme_errors`, `ci95`) plus `per_grade`, `auc_ovr`, `ece`, error counts. Macro averages run over the
        grades that occur among the true or predicted grades (scikit-learn's default), so a set without KL 4 is
        not marked down for it; `confusion_matrix` and `per_grade` always list all five.
    """
    y_true = np.asarray(y_true, dtype=int)
    probabilities = np.asarray(probabilities, dtype=np.float64)
    y_pred = probabilities.argmax(axis=1)
    labels = list(range(num_classes))
    occurring = sorted(set(y_true.tolist()) | set(y_pred.tolist()))
    result: dict = {"n": int(len(y_true)), "accuracy": float(accuracy_score(y_true, y_pred))}
    for average in ("macro", "weighted"):  # macro: over the grades that occur (an external set may lack KL 4)
        p, r, f, _ = precision_recall_fscore_support(y_true, y_pred, labels=occurring, average=average, zero_division=0)
        result[f"precision_{average}"], result[f"recall_{average}"], result[f"f1_{average}"] = float(p), float(r), float(f)
    # One grade only: no agreement beyond chance (scikit-learn warns, and gives nan for the kappa).
    several = len(occurring) > 1
    result["mcc"] = float(matthews_corrcoef(y_true, y_pred)) if several else 0.0
    result["qwk"] = float(cohen_kappa_score(y_true, y_pred, labels=labels, weights="quadratic")) if several else 0.0
    result["mae"] = float(mean_absolute_error(y_true, y_pred))
    cm = confusion_matrix(y_true, y_pred, labels=labels)
    result["confusion_matrix"] = cm.tolist()
    result.update(error_analysis(y_true, y_pred))
    p, r, f, support = precision_recall_fscore_support(y_true, y_pred, labels=labels, zero_division=0)
    result["per_grade"] = {"precision": p.tolist(), "recall": r.tolist(), "f1": f.tolist(), "support": support.tolist()}
    result["auc_ovr"] = _auc_ovr(y_true, probabilities, labels)
    result["ece"] = expected_calibration_error(y_true, probabilities)
    if n_boot > 0:
        result["ci95"] = bootstrap_ci(y_true, y_pred, groups, n_boot=n_boot, seed=seed, num_classes=num_classes)
    return result


def error_analysis(y_true, y_pred) -> dict:
    """How far wrong the errors are: adjacent (1 grade), two grades, extreme (3 or more)."""
    distance = np.abs(np.asarray(y_true) - np.asarray(y_pred))
    errors = int((distance > 0).sum())
    adjacent = int((distance == 1).sum())
    return {
        "errors": errors,
        "adjacent_errors": adjacent,
        "two_grade_errors": int((distance == 2).sum()),
        "extreme_errors": int((distance >= 3).sum()),
        "adjacent_error_rate": adjacent / errors if errors else 1.0,
    }


def _auc_ovr(y_true: np.ndarray, probabilities: np.ndarray, labels: list[int]) -> dict:
    per_grade = []
    for k in labels:
        positives = y_true == k
        per_grade.append(float(roc_auc_score(positives, probabilities[:, k])) if 0 < positives.sum() < len(y_true) else None)
    valid = [a for a in per_grade if a is not None]
    return {"per_grade": per_grade, "macro": float(np.mean(valid)) if valid else None}


def calibration_bins(y_true, probabilities, bins: int = ECE_BINS) -> dict[str, np.ndarray]:
    """Equal-width confidence bins: per bin its `centre`, `count`, mean `confidence` and `accuracy` (nan if empty)."""
    probabilities = np.asarray(probabilities)
    confidence = probabilities.max(axis=1)
    correct = probabilities.argmax(axis=1) == np.asarray(y_true)
    edges = np.linspace(0, 1, bins + 1)
    which = np.clip(np.digitize(confidence, edges[1:-1]), 0, bins - 1)
    count = np.bincount(which, minlength=bins)
    with np.errstate(invalid="ignore"):
        mean_confidence = np.bincount(which, weights=confidence, minlength=bins) / count
        accuracy = np.bincount(which, weights=correct.astype(float), minlength=bins) / count
    return {"centre": (edges[:-1] + edges[1:]) / 2, "count": count, "confidence": mean_confidence, "accuracy": accuracy}


def expected_calibration_error(y_true, probabilities, bins: int = ECE_BINS) -> float:
    """Mean |accuracy - confidence| over equal-width confidence bins, weighted by bin size."""
    table = calibration_bins(y_true, probabilities, bins)
    filled = table["count"] > 0
    weights = table["count"][filled] / table["count"].sum()
    return float((weights * np.abs(table["accuracy"][filled] - table["confidence"][filled])).sum())


def confusion_metrics(cm: np.ndarray) -> dict[str, np.ndarray]:
    """Accuracy, macro F1, MCC, QWK and MAE from confusion matrices of shape (..., K, K), rows = truth."""
    cm = np.asarray(cm, dtype=np.float64)
    k = cm.shape[-1]
    total = cm.sum(axis=(-2, -1))
    diagonal = np.diagonal(cm, axis1=-2, axis2=-1)
    true_counts, pred_counts = cm.sum(axis=-1), cm.sum(axis=-2)
    accuracy = diagonal.sum(-1) / total
    occurring = (true_counts + pred_counts) > 0
    with np.errstate(divide="ignore", invalid="ignore"):
        f1 = np.nan_to_num(2 * diagonal / (true_counts + pred_counts))
        covariance = diagonal.sum(-1) * total - (true_counts * pred_counts).sum(-1)
        spread = np.sqrt((total**2 - (pred_counts**2).sum(-1)) * (total**2 - (true_counts**2).sum(-1)))
        mcc = np.nan_to_num(covariance / spread)
        grades = np.arange(k)
        weights = (grades[:, None] - grades[None, :]) ** 2 / (k - 1) ** 2
        expected = true_counts[..., :, None] * pred_counts[..., None, :] / total[..., None, None]
        qwk = np.nan_to_num(1 - (weights * cm).sum((-2, -1)) / (weights * expected).sum((-2, -1)))
    mae = (np.abs(grades[:, None] - grades[None, :]) * cm).sum((-2, -1)) / total
    f1_macro = f1.sum(-1) / occurring.sum(-1)  # over the grades that occur, as compute_metrics
    return {"accuracy": accuracy, "f1_macro": f1_macro, "mcc": mcc, "qwk": qwk, "mae": mae}


def _group_confusions(y_true, y_pred, group_index: np.ndarray, n_groups: int, num_classes: int) -> np.ndarray:
    """(n_groups, K*K) confusion matrix of each patient's images, flattened."""
    per_group = np.zeros((n_groups, num_classes * num_classes))
    np.add.at(per_group, (group_index, np.asarray(y_true, dtype=int) * num_classes + np.asarray(y_pred, dtype=int)), 1)
    return per_group


def _draws(rng: np.random.Generator, n_groups: int, n_boot: int) -> np.ndarray:
    """(n_boot, n_groups) how often each patient is drawn in each resample."""
    return rng.multinomial(n_groups, np.full(n_groups, 1 / n_groups), size=n_boot)


def bootstrap_ci(y_true, y_pred, groups=None, n_boot: int = 1000, seed: int = 0,
                 num_classes: int = NUM_GRADES) -> dict[str, list[float]]:
    """Percentile 95% intervals of `CI_METRICS` over patient-level bootstrap resamples (seeded)."""
    groups = np.arange(len(y_true)) if groups is None else np.asarray(groups)
    _, group_index = np.unique(groups, return_inverse=True)
    n_groups = group_index.max() + 1
    per_group = _group_confusions(y_true, y_pred, group_index, n_groups, num_classes)
    draws = _draws(np.random.default_rng(seed), n_groups, n_boot)
    values = confusion_metrics((draws @ per_group).reshape(n_boot, num_classes, num_classes))
    return {name: [float(np.percentile(values[name], 2.5)), float(np.percentile(values[name], 97.5))]
            for name in CI_METRICS}


def paired_difference(y_true, pred_a, pred_b, groups=None, strata=None, n_boot: int = 1000, seed: int = 0,
                      num_classes: int = NUM_GRADES) -> dict[str, dict]:
    """How much better predictions `pred_b` score than `pred_a` on the same images, per metric of `CI_METRICS`, with
    a percentile 95% interval over paired patient-level resamples: the patients are drawn again, the same ones for
    both, so what the two share (which knees are hard) cancels and only how differently they grade them is left.
    An interval that holds 0 does not tell the two apart.

    Args:
        pred_a, pred_b: (N,) predicted grades, or (F, N): F models of each kind (the fold models) on the same images,
            the difference then being that of the F models' mean metric.
        strata: (N,) cross-validation folds: the difference is the mean over folds of each fold's difference (that
            of the fold means), and each fold's patients are resampled apart.
    """
    y_true = np.asarray(y_true, dtype=int)
    groups = np.arange(len(y_true)) if groups is None else np.asarray(groups)
    strata = np.zeros(len(y_true), dtype=int) if strata is None else np.asarray(strata)
    pred_a, pred_b = np.atleast_2d(pred_a), np.atleast_2d(pred_b)
    rng = np.random.default_rng(seed)
    estimate = {name: 0.0 for name in CI_METRICS}
    resampled = {name: np.zeros(n_boot) for name in CI_METRICS}
    stratum_values = np.unique(strata)
    for stratum in stratum_values:
        inside = strata == stratum
        _, group_index = np.unique(groups[inside], return_inverse=True)
        n_groups = group_index.max() + 1
        draws = _draws(rng, n_groups, n_boot)
        for sign, models in ((-1, pred_a), (1, pred_b)):
            weight = sign / (len(stratum_values) * len(models))
            for predicted in models:
                per_group = _group_confusions(y_true[inside], predicted[inside], group_index, n_groups, num_classes)
                whole = confusion_metrics(per_group.sum(axis=0).reshape(num_classes, num_classes))
                draws_values = confusion_metrics((draws @ per_group).reshape(n_boot, num_classes, num_classes))
                for name in CI_METRICS:
                    estimate[name] += weight * float(whole[name])
                    resampled[name] += weight * draws_values[name]
    return {name: {"difference": estimate[name], "ci95": [float(np.percentile(resampled[name], 2.5)),
                                                          float(np.percentile(resampled[name], 97.5))]}
            for name in CI_METRICS}


def selection_estimate(y_true, epoch_grades, groups=None, metric: str = "qwk", repeats: int = 100, seed: int = 0,
                       num_classes: int = NUM_GRADES) -> dict:
    """What choosing the best of several epochs (or models) on a validation set costs its figures: the chosen
    epoch's score there is the best of many noisy scores, so it is optimistic. Cross-fitted instead: the patients are
    split in two halves, the epoch is chosen by `metric` on one half and scored on the other, both ways, over
    `repeats` random splits (a slight underestimate: each choice sees half the knees).

    Args:
        epoch_grades: (E, N) the grades each epoch gave the N validation images.

    Returns:
        `metric`, `chosen_epoch` (the best on all knees, the first of ties), and `CI_METRICS` of that epoch on all
        knees (`chosen`) and of the epochs chosen on halves, on the other halves (`cross_fitted`, means).
    """
    y_true = np.asarray(y_true, dtype=int)
    epoch_grades = np.atleast_2d(epoch_grades)
    groups = np.arange(len(y_true)) if groups is None else np.asarray(groups)
    _, group_index = np.unique(groups, return_inverse=True)
    n_groups = group_index.max() + 1
    per_group = np.stack([_group_confusions(y_true, grades, group_index, n_groups, num_classes)
                          for grades in epoch_grades])  # (E, G, K*K)

    def scores(in_half: np.ndarray) -> dict[str, np.ndarray]:  # every epoch's metrics on the patients in_half
        return confusion_metrics(per_group[:, in_half].sum(axis=1).reshape(-1, num_classes, num_classes))

    everyone = scores(np.ones(n_groups, dtype=bool))
    chosen_epoch = int(np.argmax(everyone[metric]))
    rng = np.random.default_rng(seed)
    cross_fitted = {name: [] for name in CI_METRICS}
    for _ in range(repeats):
        half = rng.permutation(n_groups) < n_groups // 2
        for choose_on, score_on in ((half, ~half), (~half, half)):
            chosen = int(np.argmax(scores(choose_on)[metric]))
            scored = scores(score_on)
            for name in CI_METRICS:
                cross_fitted[name].append(float(scored[name][chosen]))
    return {"metric": metric, "chosen_epoch": chosen_epoch, "repeats": repeats,
            "chosen": {name: float(everyone[name][chosen_epoch]) for name in CI_METRICS},
            "cross_fitted": {name: float(np.mean(values)) for name, values in cross_fitted.items()}}


def set_metrics(y_true, sets: list[list[int]], num_classes: int = NUM_GRADES) -> dict:
    """How prediction sets did: share holding the true grade (overall and per true grade), mean size."""
    covered = [y in s for y, s in zip(y_true, sets)]
    return {"coverage": float(np.mean(covered)), "mean_set_size": float(np.mean([len(s) for s in sets])),
            "coverage_per_grade": share_per_grade(y_true, covered, num_classes)}


def share_per_grade(y_true, flags, num_classes: int = NUM_GRADES) -> list[float | None]:
    """Share of true `flags` among the images of each true grade (None for a grade with no image)."""
    y_true, flags = np.asarray(y_true, dtype=int), np.asarray(flags, dtype=bool)
    return [float(flags[y_true == k].mean()) if (y_true == k).any() else None for k in range(num_classes)]


def fit_temperature(logits, y_true) -> float:
    """Temperature T minimising the validation NLL of softmax(logits / T) (Guo et al., ICML 2017)."""
    logits, y_true = np.asarray(logits, dtype=np.float64), np.asarray(y_true, dtype=int)
    best_t, best_nll = 1.0, np.inf
    for t in np.exp(np.linspace(np.log(0.25), np.log(8.0), 200)):
        scaled = logits / t
        log_probs = scaled - np.logaddexp.reduce(scaled, axis=1, keepdims=True)
        nll = -log_probs[np.arange(len(y_true)), y_true].mean()
        if nll < best_nll:
            best_t, best_nll = float(t), nll
    return best_t
