"""What the CLI shows and writes for people: rich tables on the console, prediction files written atomically."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from rich.console import Console
from rich.table import Table
from rich.text import Text

from klgrade.constants import NUM_GRADES, REPORT_METRICS
from klgrade.files import WARNING_SEPARATOR, rows_to_csv, write_json_atomic, write_text_atomic
from klgrade.infer.batch import COLUMNS


def predictions_csv(rows: list[dict]) -> str:
    """CSV of prediction rows: `heatmap`/`error` columns only when some row has them; warnings joined by '; '."""
    columns = [c for c in COLUMNS if any(c in row for row in rows) or c not in ("heatmap", "error")]
    flat = [{**row, "warnings": WARNING_SEPARATOR.join(row.get("warnings", []))} for row in rows]
    return rows_to_csv(flat, columns)


def write_predictions(rows: list[dict], out: Path) -> None:
    write_text_atomic(out / "predictions.csv", predictions_csv(rows))
    write_json_atomic(out / "predictions.json", rows)


def print_predictions(rows: list[dict], output_format: str) -> None:
    if output_format == "json":
        print(json.dumps(rows, indent=2))
    elif output_format == "csv":
        sys.stdout.write(predictions_csv(rows))
    else:
        table = Table("image", "KL grade", "grade set", "confidence", *(f"p{k}" for k in range(NUM_GRADES)),
                      "warnings", "heatmap / error")
        for row in rows:  # file names and messages as Text: rich would read `knee[left].png` as markup
            name = Text(Path(row["path"]).name)
            if row.get("error"):
                table.add_row(name, "-", "-", "-", *["-"] * NUM_GRADES, "", Text(row["error"], style="red"))
            else:
                grade = Text(str(row["grade"])) if row["gradable"] else Text(f"{row['grade']}?", style="yellow")
                table.add_row(name, grade, row["grade_set"], f"{row['confidence']:.2f}",
                              *(f"{row[f'prob_{k}']:.2f}" for k in range(NUM_GRADES)),
                              Text(WARNING_SEPARATOR.join(row["warnings"]), style="yellow"),
                              Text(row.get("heatmap", "")))
        Console(width=160).print(table)


def comparison_table(comparison: dict) -> Table:
    """Two models' main metrics on the same knees and the difference, with its paired 95% interval where computed
    (`evaluate.evaluation.compare`)."""
    this, other = comparison["this_model"], comparison["model"]
    table = Table("metric", this, other, "difference (paired 95% CI)",
                  title=Text(f"{this} against {other} on the same {comparison['n']} knees"))
    for name in REPORT_METRICS:
        paired = comparison["difference"].get(name)
        difference = comparison["this"][name] - comparison["other"][name]
        interval = f" ({paired['ci95'][0]:+.3f} to {paired['ci95'][1]:+.3f})" if paired else ""
        table.add_row(name, f"{comparison['this'][name]:.4f}", f"{comparison['other'][name]:.4f}",
                      f"{difference:+.4f}{interval}")
    return table


def print_metrics(metrics: dict) -> None:
    table = Table("metric", "value", "95% CI", title=Text(f"{metrics.get('model', '')} on {metrics['n']} images"))
    intervals = metrics.get("ci95", {})
    for name in REPORT_METRICS:
        interval = intervals.get(name)
        table.add_row(name, f"{metrics[name]:.4f}", f"{interval[0]:.3f}-{interval[1]:.3f}" if interval else "")
    table.add_row("extreme errors (|d|>=3)", str(metrics["extreme_errors"]), "")
    table.add_row("adjacent share of errors", f"{metrics['adjacent_error_rate']:.3f}", "")
    if "coverage" in metrics:
        table.add_row(f"grade-set coverage (nominal {metrics['nominal_coverage']:.0%})", f"{metrics['coverage']:.3f}", "")
        table.add_row("grade-set coverage per grade (KL 0-4)", " / ".join(
            "-" if c is None else f"{c:.2f}" for c in metrics["coverage_per_grade"]), "")
        table.add_row("mean grade-set size", f"{metrics['mean_set_size']:.2f}", "")
    table.add_row("not gradable", f"{metrics['ungradable_fraction']:.3f}", "")
    for key, which in (("gradable_only", "gradable"), ("unwarned_only", "unwarned")):
        if metrics.get(key):
            only = metrics[key]
            table.add_row(f"the {only['n']} {which} knees only: accuracy / QWK",
                          f"{only['accuracy']:.4f} / {only['qwk']:.4f}", "")
    for key, label in (("processing_shift_fraction", "warned: contrast processing differs"),
                       ("sharpness_shift_fraction", "warned: noise or sharpness differs"),
                       ("framing_shift_fraction", "warned: framed tighter than training"),
                       ("framing_wide_shift_fraction", "warned: framed wider than training"),
                       ("polarity_shift_fraction", "graded inverted back (looked inverted)"),
                       ("orientation_shift_fraction", "graded turned upright (looked turned)"),
                       ("noted_fraction", "noted: not square, mark painted out, enhanced, side unknown")):
        if key in metrics:
            table.add_row(label, f"{metrics[key]:.3f}", "")
    console = Console(width=120)
    console.print(table)
    if "compared_with" in metrics:
        console.print(comparison_table(metrics["compared_with"]))
    confusion = Table("true \\ predicted", *(str(k) for k in range(NUM_GRADES)), title="confusion matrix")
    for k, row in enumerate(metrics["confusion_matrix"]):
        confusion.add_row(str(k), *(str(v) for v in row))
    console.print(confusion)


def print_summary(summary: dict) -> None:
    table = Table("split", *(f"KL{k}" for k in range(NUM_GRADES)), "images", "patients", title=Text(summary["data"]))
    for name, split in summary["splits"].items():
        table.add_row(name, *(str(c) for c in split["counts"]), str(split["images"]), str(split["patients"]))
    console = Console()
    console.print(table)
    for pair, shared in summary["patient_overlap"].items():
        console.print(f"patients shared {pair}: {shared}", style="red" if shared else None)
    for pair, shared in summary["file_overlap"].items():
        console.print(f"identical files shared {pair}: {shared}", style="red" if shared else None)
    for name, split in summary["splits"].items():
        if split["unnamed_knees"]:
            console.print(f"knees in {name} that name no patient (each counted as a patient of its own): "
                          f"{split['unnamed_knees']}", style="yellow")
        if split["copies"]:
            console.print(f"files in {name} that copy another of its files: {split['copies']}", style="red")
        if split["copies_of_two_grades"]:
            console.print(f"files in {name} whose bytes a file of another grade holds: {split['copies_of_two_grades']} "
                          "(no reference grade: left out of every score)", style="red")
    console.print(f"unreadable files: {len(summary['unreadable'])}")
    console.print(f"files that are no image klgrade reads (left out): {len(summary['not_read'])}")
    console.print(f"files not gradable as they are (view, pixels, grey levels): {len(summary['not_gradable'])}",
                  style="red" if summary["not_gradable"] else None)
    console.print(f"files graded with a note (not square, a mark painted out, enhanced): {len(summary['noted'])}",
                  style="yellow" if summary["noted"] else None)
