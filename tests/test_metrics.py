import numpy as np
import pytest
from sklearn.metrics import (accuracy_score, cohen_kappa_score, confusion_matrix, f1_score, matthews_corrcoef,
                             mean_absolute_error, precision_score, recall_score, roc_auc_score)

from klgrade.metrics import (CI_METRICS, bootstrap_ci, compute_metrics, confusion_metrics, expected_calibration_error,
                             fit_temperature, paired_difference, selection_estimate, set_metrics, share_per_grade)

DESIGN_KEYS = {"n", "accuracy", "precision_macro", "precision_weighted", "recall_macro", "f1_macro", "f1_weighted",
               "mcc", "qwk", "mae", "confusion_matrix", "adjacent_error_rate", "extreme_errors", "ci95"}


def _random_predictions(seed, n=400):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 5, n)
    logits = rng.normal(size=(n, 5)) + 2.0 * np.eye(5)[y] * rng.random((n, 1))
    probabilities = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    return y, probabilities


@pytest.mark.parametrize("seed", range(5))
def test_metrics_equal_scikit_learn(seed):
    y, probabilities = _random_predictions(seed)
    pred = probabilities.argmax(1)
    m = compute_metrics(y, probabilities, n_boot=0)
    assert DESIGN_KEYS - {"ci95"} <= set(m)
    assert m["accuracy"] == pytest.approx(accuracy_score(y, pred))
    for average in ("macro", "weighted"):
        assert m[f"precision_{average}"] == pytest.approx(precision_score(y, pred, average=average, zero_division=0))
        assert m[f"recall_{average}"] == pytest.approx(recall_score(y, pred, average=average, zero_division=0))
        assert m[f"f1_{average}"] == pytest.approx(f1_score(y, pred, average=average, zero_division=0))
    assert m["mcc"] == pytest.approx(matthews_corrcoef(y, pred))
    assert m["qwk"] == pytest.approx(cohen_kappa_score(y, pred, weights="quadratic"))
    assert m["mae"] == pytest.approx(mean_absolute_error(y, pred))
    assert m["confusion_matrix"] == confusion_matrix(y, pred, labels=range(5)).tolist()
    distance = np.abs(y - pred)
    assert m["extreme_errors"] == int((distance >= 3).sum())
    assert m["adjacent_error_rate"] == pytest.approx((distance == 1).sum() / (distance > 0).sum())
    assert m["per_grade"]["f1"] == pytest.approx(f1_score(y, pred, average=None).tolist())
    assert m["auc_ovr"]["per_grade"][2] == pytest.approx(roc_auc_score(y == 2, probabilities[:, 2]))


def test_macro_averages_leave_out_grades_that_do_not_occur():
    """An external set without KL 3 and KL 4 (none true, none predicted): the macro averages are those of the three
    grades that occur, as scikit-learn's own default gives them, not pulled down by two grades of 0; the bootstrap's
    formula agrees; a set of one grade gets MCC and QWK 0 without scikit-learn's warnings."""
    import warnings

    y, probabilities = _random_predictions(11, n=300)
    probabilities[:, 3:] = 0
    keep = y < 3
    y, probabilities = y[keep], probabilities[keep] / probabilities[keep].sum(1, keepdims=True)
    pred = probabilities.argmax(1)
    assert set(y) | set(pred) == {0, 1, 2}
    m = compute_metrics(y, probabilities, n_boot=0)
    assert m["f1_macro"] == pytest.approx(f1_score(y, pred, average="macro"))
    assert m["precision_macro"] == pytest.approx(precision_score(y, pred, average="macro", zero_division=0))
    assert m["recall_macro"] == pytest.approx(recall_score(y, pred, average="macro"))
    assert confusion_metrics(confusion_matrix(y, pred, labels=range(5)))["f1_macro"] == pytest.approx(m["f1_macro"])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        single = compute_metrics([2, 2, 2], np.tile([0.1, 0.1, 0.6, 0.1, 0.1], (3, 1)), n_boot=20)
    assert single["f1_macro"] == single["accuracy"] == 1.0 and single["mcc"] == single["qwk"] == 0.0


@pytest.mark.parametrize("seed", range(5))
def test_confusion_matrix_formulas_equal_scikit_learn(seed):
    y, probabilities = _random_predictions(seed, n=300)
    pred = probabilities.argmax(1)
    values = confusion_metrics(confusion_matrix(y, pred, labels=range(5)))
    assert values["accuracy"] == pytest.approx(accuracy_score(y, pred))
    assert values["f1_macro"] == pytest.approx(f1_score(y, pred, average="macro"))
    assert values["mcc"] == pytest.approx(matthews_corrcoef(y, pred))
    assert values["qwk"] == pytest.approx(cohen_kappa_score(y, pred, weights="quadratic"))
    assert values["mae"] == pytest.approx(mean_absolute_error(y, pred))


def test_bootstrap_is_seeded_patient_level_and_covers_the_estimate():
    y, probabilities = _random_predictions(7, n=500)
    patients = np.repeat(np.arange(250), 2)
    m = compute_metrics(y, probabilities, groups=patients, n_boot=500, seed=3)
    again = compute_metrics(y, probabilities, groups=patients, n_boot=500, seed=3)
    other = compute_metrics(y, probabilities, groups=patients, n_boot=500, seed=4)
    assert m["ci95"] == again["ci95"]
    assert m["ci95"] != other["ci95"]
    for name, (low, high) in m["ci95"].items():
        assert low <= m[name] <= high, name
        assert high > low
    perfect = bootstrap_ci(y, y, patients, n_boot=100)
    assert perfect["accuracy"] == [1.0, 1.0]


def test_a_paired_difference_is_the_difference_of_fold_means_and_its_interval_tells_models_apart_only_when_they_are():
    """Two models graded on the same knees of five folds: the difference is that of their fold means (what an
    ablation table shows), its interval resamples each fold's patients for both at once; a model that grades a
    tenth of the knees one grade better is told apart, one that differs by chance is not, and pairing makes the
    interval narrower than the two models' own intervals side by side."""
    rng = np.random.default_rng(0)
    y = rng.integers(0, 5, 1000)
    patients, folds = np.repeat(np.arange(500), 2), np.repeat(np.arange(500) % 5, 2)
    base = np.where(rng.random(1000) < 0.35, np.clip(y + rng.choice([-1, 1], 1000), 0, 4), y)
    better = np.where(rng.random(1000) < 0.1, y, base)  # a tenth of the knees mended
    noisy = np.where(rng.random(1000) < 0.05, np.clip(base + rng.choice([-1, 1], 1000), 0, 4), base)
    noisy = np.where(rng.random(1000) < 0.05, y, noisy)  # as many mended as spoilt, about
    difference = paired_difference(y, base, better, patients, folds, n_boot=500, seed=1)
    for name in CI_METRICS:
        per_fold = [confusion_metrics(confusion_matrix(y[folds == k], model[folds == k], labels=range(5)))[name]
                    for model in (base, better) for k in range(5)]
        assert difference[name]["difference"] == pytest.approx(np.mean(per_fold[5:]) - np.mean(per_fold[:5]))
        low, high = difference[name]["ci95"]
        assert low <= difference[name]["difference"] <= high
    assert difference["accuracy"]["ci95"][0] > 0 and difference["qwk"]["ci95"][0] > 0
    assert difference["mae"]["ci95"][1] < 0  # fewer grades off: a lower error
    chance = paired_difference(y, base, noisy, patients, folds, n_boot=500, seed=1)
    assert chance["accuracy"]["ci95"][0] < 0 < chance["accuracy"]["ci95"][1]
    assert paired_difference(y, base, base, patients, folds, n_boot=50)["qwk"] == {"difference": 0.0, "ci95": [0.0, 0.0]}
    alone = [bootstrap_ci(y, model, patients, n_boot=500, seed=1)["accuracy"] for model in (base, noisy)]
    assert np.diff(chance["accuracy"]["ci95"])[0] < 0.5 * min(high - low for low, high in alone)
    # Fold models of each kind all graded on one validation set: the difference of their mean metrics.
    on_val = paired_difference(y, np.stack([base, noisy]), np.stack([better, better]), patients, n_boot=200)
    mean_accuracy = [np.mean([accuracy_score(y, model) for model in models]) for models in ((base, noisy), (better,))]
    assert on_val["accuracy"]["difference"] == pytest.approx(mean_accuracy[1] - mean_accuracy[0])
    assert on_val["accuracy"]["ci95"][0] > 0


def test_calibration_and_temperature():
    y, probabilities = _random_predictions(1, n=2000)
    assert 0 <= expected_calibration_error(y, probabilities) <= 1
    confident = np.log(probabilities) * 4  # overconfident logits
    temperature = fit_temperature(confident, y)
    assert temperature > 2
    scaled = np.exp(confident / temperature)
    scaled /= scaled.sum(1, keepdims=True)
    sharp = np.exp(confident) / np.exp(confident).sum(1, keepdims=True)
    assert expected_calibration_error(y, scaled) < expected_calibration_error(y, sharp)


def test_single_grade_and_error_free_cases_do_not_crash():
    y = np.zeros(10, dtype=int)
    probabilities = np.tile([0.9, 0.1, 0, 0, 0], (10, 1))
    m = compute_metrics(y, probabilities, n_boot=10)
    assert m["accuracy"] == 1.0 and m["errors"] == 0 and m["adjacent_error_rate"] == 1.0
    assert m["qwk"] == 0.0 or m["qwk"] == 1.0


def test_shares_per_grade_count_each_true_grade_apart_and_mark_absent_grades():
    y_true = [0, 0, 0, 1, 3, 3, 4]
    flags = [True, False, False, True, False, False, True]
    assert share_per_grade(y_true, flags) == [pytest.approx(1 / 3), 1.0, None, 0.0, 1.0]
    sets = [[0], [1, 2], [0, 1], [1], [2], [3, 4], [4]]
    assert set_metrics(y_true, sets)["coverage_per_grade"] == [pytest.approx(2 / 3), 1.0, None, 0.5, 1.0]


def test_choosing_the_best_of_equal_epochs_on_val_is_optimistic_and_cross_fitting_says_by_how_much():
    """40 epochs of one skill (each grade right with p = 0.6, else uniform: accuracy 0.68 expected), on 20 validation
    sets of 826 knees: the epoch chosen on all the knees scores above that, by chance; chosen on half the patients and
    scored on the other half, it does not (on average over the sets: one set's figure is noisy either way)."""
    rng = np.random.default_rng(1)
    patients = np.repeat(np.arange(413), 2)
    chosen, cross_fitted = [], []
    for _ in range(20):
        y = rng.integers(0, 5, 826)
        epochs = np.where(rng.random((40, 826)) < 0.6, y, rng.integers(0, 5, (40, 826)))
        result = selection_estimate(y, epochs, patients, metric="accuracy", repeats=20)
        assert result["chosen_epoch"] == int(np.argmax([accuracy_score(y, e) for e in epochs]))
        assert result["chosen"]["accuracy"] == pytest.approx(accuracy_score(y, epochs[result["chosen_epoch"]]))
        chosen.append(result["chosen"]["accuracy"])
        cross_fitted.append(result["cross_fitted"]["accuracy"])
    assert np.mean(chosen) > 0.70
    assert np.mean(cross_fitted) == pytest.approx(0.68, abs=0.006)


def test_an_epoch_that_is_really_better_is_chosen_on_halves_too():
    """Cross-fitting is no fixed discount: where one epoch is far better, the halves choose it and score it alike."""
    rng = np.random.default_rng(2)
    y = rng.integers(0, 5, 600)
    skill = np.array([0.4] * 9 + [0.8])[:, None]
    epochs = np.where(rng.random((10, 600)) < skill, y, rng.integers(0, 5, (10, 600)))
    result = selection_estimate(y, epochs, metric="qwk")
    assert result["chosen_epoch"] == 9
    for name in ("accuracy", "qwk"):
        assert result["cross_fitted"][name] == pytest.approx(result["chosen"][name], abs=0.01)
