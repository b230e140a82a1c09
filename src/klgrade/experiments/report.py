"""The report of `klgrade reproduce`: report.md, results.json/csv and figures, from the protocol's results."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np

from klgrade.constants import REPORT_METRICS
from klgrade.evaluate.report import plot_confusion, save_figure
from klgrade.experiments.cv import fold_dir, run_name
from klgrade.explain.gradcam import overlay
from klgrade.files import read_json_whole, rows_to_csv, write_json_atomic, write_text_atomic
from klgrade.infer.predictor import Grading
from klgrade.metrics import CI_METRICS

SETS = ("cv", "internal", "external")


@dataclass(frozen=True)
class PanelImage:
    """One image of the Grad-CAM panel: its true grade and the model's graded, explained answer."""

    true_grade: int
    grading: Grading


def _cell(stats: dict) -> str:
    return f"{stats['mean']:.3f} +/- {stats['sd']:.3f}"


def write_report(results: dict, out: Path, panel: list[PanelImage]) -> None:
    out = Path(out)
    figures = out / "figures"
    write_json_atomic(out / "results.json", results)
    rows = []
    for name, entry in results["variants"].items():
        for which in SETS:
            if which in entry:
                for metric, stats in entry[which]["mean_sd"].items():
                    rows.append({"variant": name, "set": which, "metric": metric, **stats})
    write_text_atomic(out / "results.csv", rows_to_csv(rows, ["variant", "set", "metric", "mean", "sd"]))
    differences = [{"variant": name, "set": where, "metric": metric, "difference": paired["difference"],
                    "ci95_low": paired["ci95"][0], "ci95_high": paired["ci95"][1]}
                   for name, entry in results["variants"].items() for where, scores in _compared_scores(entry)
                   for metric, paired in scores.get("difference_to_msa_net", {}).items()]
    if differences:  # every other variant against msa_net, on the same knees
        write_text_atomic(out / "differences.csv", rows_to_csv(differences, list(differences[0])))
    for name, entry in results["variants"].items():
        plot_confusion(entry["cv"]["pooled_oof"]["confusion_matrix"], f"{name}: out-of-fold",
                       figures / f"confusion_{run_name(name)}.png")
    _plot_fold_bars(results, figures / "folds.png")
    _plot_curves(results, out, figures / "curves.png")
    panel_path = _plot_gradcam_panel(panel, figures / "gradcam_panel.png") if panel else None
    write_text_atomic(out / "report.md", _markdown(results, panel_path))


def _compared_scores(entry: dict) -> list[tuple[str, dict]]:
    """A variant's scores that may hold a `difference_to_msa_net`, by name: each set's fold models (`cv`,
    `internal`, `external`) and each validation set's fold ensemble (`internal fold ensemble`, ...)."""
    fold_models = [(which, entry[which]) for which in SETS if which in entry]
    ensembles = [(f"{which} fold ensemble", entry[which]["fold_ensemble"]) for which in SETS[1:] if which in entry]
    return fold_models + ensembles


def _markdown(results: dict, panel: Path | None) -> str:
    variants = results["variants"]
    k = results["folds"]
    internal = any("internal" in entry for entry in variants.values())
    lines = [f"# klgrade reproduce: profile `{results['profile']}`", "",
             f"Data: `{results['data']}`; {k}-fold patient-grouped stratified CV on {results['cv_on']}"
             + ("; internal validation of every fold model on `val`" if internal else "; no `val` split to validate on")
             + (f"; external validation on `{results['external']}`" if results["external"] else "") + "."]
    if "msa_net+kd" in results["selected"]:
        lines += ["msa_net+kd is distilled from the ensemble of the four baselines trained on the same fold "
                  "(mean of their softened probabilities)."]
    lines += [""]
    lines += [f"Trained on {results['device']}, {results['jobs']} fold training(s) at once; this invocation "
              f"took {results['wall_s']:.0f} s (training, validation and this report).", ""]
    lines += [f"Variants run ({len(results['selected'])}; `--variant` chooses): {', '.join(results['selected'])}.", ""]
    if results.get("warnings"):  # knees that name no patient
        lines += ["## Warnings", "", *(f"- {warning}" for warning in results["warnings"]), ""]
    if results.get("unfinished"):
        lines += [f"**Stopped by the time budget**; not finished (rerun the same command to continue): "
                  f"{', '.join(results['unfinished'])}.", ""]
    for which, title in (("cv", f"Cross-validation (mean +/- sd over {k} folds)"),
                         ("internal", "Internal validation on `val` (fold models, mean +/- sd)"),
                         ("external", "External validation (fold models, mean +/- sd)")):
        if not any(which in e for e in variants.values()):
            continue
        lines += [f"## {title}", "", "| model | " + " | ".join(REPORT_METRICS) + " |",
                  "|---" * (len(REPORT_METRICS) + 1) + "|"]
        for name, entry in variants.items():
            if which in entry:
                lines.append(f"| {name} | " + " | ".join(_cell(entry[which]["mean_sd"][m]) for m in REPORT_METRICS) + " |")
        lines.append("")
        if which != "cv":
            lines += _fold_ensemble_table(variants, which)
        if which in results.get("left_out", {}):  # knees of the train split's patients or files
            lines += [f"Not scored: {results['left_out'][which]}.", ""]
        if which == "external" and results.get("external_in_val"):
            lines += [f"Not independent: {results['external_in_val']}.", ""]
    lines += ["## Misclassification analysis (pooled out-of-fold predictions)", "",
              "| model | errors | adjacent (1 grade) | two grades | extreme (>=3) | adjacent share |", "|---|---|---|---|---|---|"]
    for name, entry in variants.items():
        m = entry["cv"]["pooled_oof"]
        lines.append(f"| {name} | {m['errors']} | {m['adjacent_errors']} | {m['two_grade_errors']} | "
                     f"{m['extreme_errors']} | {m['adjacent_error_rate']:.3f} |")
    lines += ["", "## Training time (sum over folds of each fold's wall time; folds run at once overlap)", "",
              "| model | seconds |", "|---|---|"]
    lines += [f"| {name} | {entry['train_s']:.0f} |" for name, entry in variants.items()]
    compared = [name for name in variants if name != "msa_net"]
    if "msa_net" in variants and compared:  # the full model and at least one variant to hold against it
        lines += ["", "## Against msa_net: the baselines and the ablations (difference to the full model)", "",
                  "Each difference is on the same knees: the same held-out knees of the same folds (CV), the same "
                  "validation images (the fold models' mean; then the fold ensembles); in brackets its 95% interval, "
                  "the patients resampled for both models at once (an interval that holds 0 does not tell the model "
                  "from msa_net)."]
        for which, title in (("cv", "CV mean"), ("internal", "internal validation on `val`"),
                             ("external", "external validation")):
            if which not in variants["msa_net"]:
                continue
            names = [name for name in ["msa_net", *compared] if which in variants[name]]
            means = {name: {m: variants[name][which]["mean_sd"][m]["mean"] for m in AGAINST_METRICS} for name in names}
            lines += _against_msa_net_table(title, means, {name: variants[name][which] for name in names})
            if which != "cv":
                ensembles = {name: variants[name][which]["fold_ensemble"] for name in names}
                lines += _against_msa_net_table(f"{title}, fold ensembles", ensembles, ensembles)
    lines += ["", "## Figures", "", "Per-fold accuracy and QWK: ![folds](figures/folds.png)", "",
              "Validation QWK per epoch (fold 0): ![curves](figures/curves.png)", ""]
    for name in variants:
        lines.append(f"Confusion matrix, {name}: ![{name}](figures/confusion_{run_name(name)}.png)")
    if panel is not None:
        lines += ["", "Grad-CAM of msa_net (fold 0), one validation image per grade:",
                  f"![gradcam](figures/{panel.name})"]
    return "\n".join(lines) + "\n"


def _fold_ensemble_table(variants: dict, which: str) -> list[str]:
    """Each variant's fold ensemble on a validation set (its fold models' probabilities averaged: one model's
    figures, as a paper reports one model's), with 95% intervals."""
    lines = ["Fold ensemble (the mean of each variant's fold models' probabilities), [95% CI] by patient:", "",
             "| model | " + " | ".join(CI_METRICS) + " |", "|---" * (len(CI_METRICS) + 1) + "|"]
    for name, entry in variants.items():
        if which in entry:
            scores = entry[which]["fold_ensemble"]
            lines.append(f"| {name} | " + " | ".join(
                f"{scores[m]:.3f} [{scores['ci95'][m][0]:.3f}, {scores['ci95'][m][1]:.3f}]" for m in CI_METRICS) + " |")
    return lines + [""]


AGAINST_METRICS = ("accuracy", "qwk", "mcc")
"""The metrics of the report's tables against msa_net."""


def _against_msa_net_table(title: str, values: dict[str, dict], scores: dict[str, dict]) -> list[str]:
    """One table of the variants' accuracy, QWK and MCC on one set (`values` by variant, msa_net's first: the fold
    models' means, or the fold ensemble's), each with its difference to msa_net's and, where computed, that
    difference's paired interval (`difference_to_msa_net` of the variant's `scores`, `metrics.paired_difference`)."""
    lines = ["", f"### {title}", "", "| variant | accuracy | delta | qwk | delta | mcc | delta |",
             "|---|---|---|---|---|---|---|"]
    for name, value in values.items():
        paired, cells = scores[name].get("difference_to_msa_net", {}), []
        for metric in AGAINST_METRICS:
            if metric in paired:
                low, high = paired[metric]["ci95"]
                cells.append(f"{value[metric]:.3f} | {paired[metric]['difference']:+.3f} [{low:+.3f}, {high:+.3f}]")
            else:
                cells.append(f"{value[metric]:.3f} | {value[metric] - values['msa_net'][metric]:+.3f}")
        label = "msa_net (full, no distillation)" if name == "msa_net" else name
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return lines


def _plot_fold_bars(results: dict, path: Path) -> None:
    names = list(results["variants"])
    figure, axes = plt.subplots(1, 2, figsize=(12, 4))
    width = 0.8 / results["folds"]
    for axis, metric in zip(axes, ("accuracy", "qwk")):
        for fold in range(results["folds"]):
            values = [results["variants"][n]["cv"]["per_fold"][fold][metric] for n in names]
            axis.bar(np.arange(len(names)) + fold * width, values, width, label=f"fold {fold}")
        axis.set_xticks(np.arange(len(names)) + 0.4 - width / 2, names, rotation=35, ha="right", fontsize=8)
        axis.set_title(metric)
    axes[0].legend(fontsize=7)
    save_figure(figure, path)


def _plot_curves(results: dict, out: Path, path: Path) -> None:
    figure, axis = plt.subplots(figsize=(6, 4))
    for name in results["variants"]:
        metrics = read_json_whole(fold_dir(out / "runs" / run_name(name), 0) / "metrics.json", "no curve of it")
        if metrics and metrics.get("history"):
            history = metrics["history"]
            axis.plot([h["epoch"] for h in history], [h["qwk"] for h in history], marker="o", label=name)
    axis.set_xlabel("epoch")
    axis.set_ylabel("validation QWK")
    if axis.lines:  # none when no fold 0 has finished (a spent time budget)
        axis.legend(fontsize=7)
    save_figure(figure, path)


def _plot_gradcam_panel(panel: list[PanelImage], path: Path) -> Path:
    figure, axes = plt.subplots(1, len(panel), figsize=(3 * len(panel), 3.4))
    for axis, item in zip(np.atleast_1d(axes), panel):
        grading = item.grading
        axis.imshow(overlay(grading.image, grading.heatmap, f"pred KL {grading.grade} ({grading.confidence:.2f})"))
        axis.set_title(f"true KL {item.true_grade}", fontsize=9)
        axis.axis("off")
    save_figure(figure, path)
    return path
