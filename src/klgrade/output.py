"""What the CLI shows and writes for people: rich tables on the console, CSV/JSON files written atomically."""

from __future__ import annotations

import csv
import io
import json
import os
import sys
from pathlib import Path

from rich.console import Console
from rich.table import Table

from klgrade.constants import NUM_GRADES

MAIN_COLUMNS = ("accuracy", "precision_macro", "f1_macro", "mcc", "qwk", "mae")


def write_text_atomic(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.tmp{os.getpid()}")
    temporary.write_text(text)
    os.replace(temporary, path)


def rows_to_csv(rows: list[dict], columns: list[str]) -> str:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=columns, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return buffer.getvalue()


def _prediction_columns(rows: list[dict]) -> list[str]:
    from klgrade.infer.batch import COLUMNS

    return [c for c in COLUMNS if any(c in row for row in rows) or c not in ("heatmap", "error")]


def write_predictions(rows: list[dict], out: Path) -> None:
    write_text_atomic(out / "predictions.csv", rows_to_csv(rows, _prediction_columns(rows)))
    write_text_atomic(out / "predictions.json", json.dumps(rows, indent=2))


def print_predictions(rows: list[dict], output_format: str) -> None:
    if output_format == "json":
        print(json.dumps(rows, indent=2))
    elif output_format == "csv":
        sys.stdout.write(rows_to_csv(rows, _prediction_columns(rows)))
    else:
        table = Table("image", "KL grade", "confidence", *(f"p{k}" for k in range(NUM_GRADES)), "heatmap / error")
        for row in rows:
            if row.get("error"):
                table.add_row(Path(row["path"]).name, "-", "-", *["-"] * NUM_GRADES, f"[red]{row['error']}[/red]")
            else:
                table.add_row(Path(row["path"]).name, str(row["grade"]), f"{row['confidence']:.2f}",
                              *(f"{row[f'prob_{k}']:.2f}" for k in range(NUM_GRADES)), row.get("heatmap", ""))
        Console(width=160).print(table)


def print_metrics(metrics: dict) -> None:
    table = Table("metric", "value", "95% CI", title=f"{metrics.get('model', '')} on {metrics['n']} images")
    intervals = metrics.get("ci95", {})
    for name in MAIN_COLUMNS:
        interval = intervals.get(name)
        table.add_row(name, f"{metrics[name]:.4f}", f"{interval[0]:.3f}-{interval[1]:.3f}" if interval else "")
    table.add_row("extreme errors (|d|>=3)", str(metrics["extreme_errors"]), "")
    table.add_row("adjacent share of errors", f"{metrics['adjacent_error_rate']:.3f}", "")
    console = Console()
    console.print(table)
    confusion = Table("true \\ predicted", *(str(k) for k in range(NUM_GRADES)), title="confusion matrix")
    for k, row in enumerate(metrics["confusion_matrix"]):
        confusion.add_row(str(k), *(str(v) for v in row))
    console.print(confusion)


def print_summary(summary: dict) -> None:
    table = Table("split", *(f"KL{k}" for k in range(NUM_GRADES)), "images", "patients", title=summary["data"])
    for name, split in summary["splits"].items():
        table.add_row(name, *(str(c) for c in split["counts"]), str(split["images"]), str(split["patients"]))
    console = Console()
    console.print(table)
    for pair, shared in summary["patient_overlap"].items():
        console.print(f"patients shared {pair}: {shared}", style="red" if shared else None)
    console.print(f"unreadable files: {len(summary['unreadable'])}")
