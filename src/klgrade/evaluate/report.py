"""Files that report results: metrics JSON, per-image CSV, confusion matrices, reliability diagrams, Markdown tables."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from klgrade.constants import NUM_GRADES  # noqa: E402
from klgrade.files import (WARNING_SEPARATOR, atomic_path, rows_to_csv, write_json_atomic,  # noqa: E402
                           write_text_atomic)
from klgrade.metrics import ECE_BINS, calibration_bins  # noqa: E402
from klgrade.uncertainty import set_label  # noqa: E402


def save_figure(figure, path: Path) -> None:
    with atomic_path(path) as temporary:
        figure.savefig(temporary, dpi=120, bbox_inches="tight")
    plt.close(figure)


def plot_confusion(cm, title: str, path: Path) -> None:
    cm = np.asarray(cm)
    shares = cm / np.maximum(cm.sum(axis=1, keepdims=True), 1)
    figure, axis = plt.subplots(figsize=(4.2, 3.8))
    axis.imshow(shares, cmap="Blues", vmin=0, vmax=1)
    for i in range(NUM_GRADES):
        for j in range(NUM_GRADES):
            axis.text(j, i, f"{cm[i, j]}\n{shares[i, j]:.0%}", ha="center", va="center", fontsize=7,
                      color="white" if shares[i, j] > 0.5 else "black")
    axis.set_xlabel("predicted KL grade")
    axis.set_ylabel("true KL grade")
    axis.set_xticks(range(NUM_GRADES))
    axis.set_yticks(range(NUM_GRADES))
    axis.set_title(title, fontsize=9)
    save_figure(figure, path)


def plot_reliability(y_true, probabilities, path: Path, bins: int = ECE_BINS) -> None:
    table = calibration_bins(y_true, probabilities, bins)
    filled = table["count"] > 0
    figure, axis = plt.subplots(figsize=(4, 4))
    axis.plot([0, 1], [0, 1], "--", color="grey", label="perfect calibration")
    axis.bar(table["centre"][filled], table["accuracy"][filled], width=1 / bins, alpha=0.7, edgecolor="black",
             label="accuracy per bin")
    axis.set_xlabel("confidence")
    axis.set_ylabel("accuracy")
    axis.legend(loc="upper left", fontsize=8)
    save_figure(figure, path)


def write_evaluation(result, out: Path) -> None:
    """metrics.json, predictions.csv (path, patient, true, predicted, probabilities, grade set, gradable, warnings as
    `klgrade predict` gives them), left_out.csv (the knees left out, and why: `copy` or `trained`,
    `Evaluation.left_out`; only its header when none, so no earlier run's list stays behind), confusion.png,
    reliability.png."""
    out = Path(out)
    write_json_atomic(out / "metrics.json", result.metrics)
    assessment = result.assessment
    rows = [{"path": s.path, "patient_id": s.patient_id, "true": s.grade, "predicted": int(p.argmax()),
             **{f"prob_{k}": round(float(v), 6) for k, v in enumerate(p)},
             "grade_set": set_label(grades), "gradable": gradable, "warnings": WARNING_SEPARATOR.join(warnings)}
            for s, p, grades, gradable, warnings in zip(result.samples, result.probabilities, assessment.sets,
                                                        assessment.gradable, assessment.warnings)]
    columns = ["path", "patient_id", "true", "predicted", *(f"prob_{k}" for k in range(NUM_GRADES)), "grade_set",
               "gradable", "warnings"]
    write_text_atomic(out / "predictions.csv", rows_to_csv(rows, columns))
    left_out = [{"path": s.path, "patient_id": s.patient_id, "true": s.grade, "reason": reason}
                for s, reason in result.left_out]
    write_text_atomic(out / "left_out.csv", rows_to_csv(left_out, ["path", "patient_id", "true", "reason"]))
    plot_confusion(result.metrics["confusion_matrix"], f"{result.metrics.get('model', '')} (n={result.metrics['n']})",
                   out / "confusion.png")
    plot_reliability([s.grade for s in result.samples], result.probabilities, out / "reliability.png")
