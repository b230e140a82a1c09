"""`klgrade cv`: patient-grouped stratified k-fold cross-validation on the train split.

Each fold trains on the other folds and is scored on its held-out patients. The fold's model is the last epoch
of its fixed schedule (`last.safetensors`), never a checkpoint chosen (or an early stop decided) by the held-out
patients' scores: choosing on the patients it is scored on would make the CV means optimistic. An inner
patient-grouped split would cost each fold a fifth of its training data for a choice that a fixed schedule
with EMA makes well enough. `fold<k>/selection.json` records this. Per fold: a run folder
(`fold<k>/`, resumable), its out-of-fold predictions and metrics. Over folds: all out-of-fold predictions
in one CSV, per-fold metrics, and mean +/- sd in JSON and Markdown. A finished fold (its `oof.csv` exists)
is skipped on a rerun, so an interrupted CV continues where it stopped. A finished fold keeps only its model:
the resume state (`last.ckpt`, ~3x the weights with optimizer and EMA) and `best.safetensors` (chosen on the
fold's own held-out patients, so no figure may use it) are deleted; 45 protocol folds would otherwise leave
gigabytes behind.
"""

from __future__ import annotations

import csv
import io
import logging
from dataclasses import replace
from pathlib import Path

import numpy as np

from klgrade.constants import NUM_GRADES, REPORT_METRICS
from klgrade.data.provenance import check_unshared
from klgrade.data.sources import Sample, find_samples
from klgrade.data.splits import patient_folds, unnamed_patients_warning
from klgrade.evaluate.evaluation import predict_samples
from klgrade.errors import KLGradeError
from klgrade.files import rows_to_csv, write_json_atomic, write_text_atomic
from klgrade.infer.predictor import Predictor
from klgrade.metrics import compute_metrics
from klgrade.train.config import TrainConfig
from klgrade.train.fit import fit, fold_pool, select_data
from klgrade.train.record import check_same_run, run_record

log = logging.getLogger(__name__)

OOF_COLUMNS = ["fold", "path", "patient_id", "true", "predicted", *(f"prob_{k}" for k in range(NUM_GRADES))]


FOLD_CHECKPOINT = "last.safetensors"
SPENT_FILES = ("last.ckpt", "best.safetensors")
"""Run files a finished fold no longer needs."""
SELECTION = {"checkpoint": FOLD_CHECKPOINT, "chosen_by": "last epoch of a fixed schedule (no early stopping)",
             "selection_patients": []}
"""What chose each fold's model: nothing that saw the fold's patients."""


CV_RECORD = "cv_run.json"


def check_same_cv_run(config: TrainConfig, pool: list[Sample]) -> None:
    """Refuse to continue the CV run in `config.out` when its folds were made of other knees or options than
    `config`'s (a finished fold is never trained again, so its figures would join the others unnoticed); record
    them in `cv_run.json` where nothing is recorded yet.

    Raises:
        KLGradeError: naming what changed.
    """
    check_same_run(Path(config.out) / CV_RECORD, run_record(config, {"knees": pool}), "its folds were made",
                   "their figures would be mixed with new ones; give another --out, or delete it to start again")


def fold_dir(out: str | Path, fold: int) -> Path:
    return Path(out) / f"fold{fold}"


def fold_model(out: str | Path, fold: int) -> Path:
    """The checkpoint that stands for fold `fold` in every CV, internal and external figure."""
    return fold_dir(out, fold) / FOLD_CHECKPOINT


def fold_done(out: str | Path, fold: int) -> bool:
    """A fold is finished once its out-of-fold predictions are written (the last thing `run_fold` does)."""
    return (fold_dir(out, fold) / "oof.csv").exists()


def run_name(variant: str) -> str:
    """Folder name of a model variant's runs: `msa_net -fpn` -> `msa_net_no_fpn`."""
    return variant.replace("+", "_").replace(" -", "_no_").replace(" ", "_")


def run_fold(config: TrainConfig, fold: int) -> list[dict]:
    """Train fold `fold` (unless already done) and return its out-of-fold prediction rows."""
    out = fold_dir(config.out, fold)
    oof_path = out / "oof.csv"
    fold_config = replace(config, fold=fold, out=str(out), resume=(out / "last.ckpt").exists())
    data = select_data(fold_config)  # once per fold (0.3 s for kneeKL224, more for larger data)
    trained = fold_done(config.out, fold)
    if trained:
        rows = read_oof(oof_path)
        if rows is not None and len(rows) == len(data.val):
            log.info("fold %d already done: %s", fold, oof_path)
            return rows
        log.warning("%s is damaged (a copy cut short, an edit?): fold %d's held-out knees are graded again by its "
                    "model", oof_path, fold)
    else:
        fit(fold_config, data=data)
    held_out = data.val  # each image once (`select_data`)
    write_json_atomic(out / "selection.json", {**SELECTION, "epochs": config.epochs})
    predictor = Predictor([fold_model(config.out, fold)], tta=False)
    predictions, _ = predict_samples(predictor, held_out)
    rows = [{"fold": fold, "path": s.path, "patient_id": s.patient_id, "true": s.grade, "predicted": int(p.argmax()),
             **{f"prob_{k}": round(float(v), 6) for k, v in enumerate(p)}}
            for s, p in zip(predictions.samples, predictions.outputs.probabilities)]
    write_text_atomic(oof_path, rows_to_csv(rows, OOF_COLUMNS))
    for name in SPENT_FILES:
        (out / name).unlink(missing_ok=True)
    return rows


def read_oof(path: Path) -> list[dict] | None:
    """Out-of-fold prediction rows (`OOF_COLUMNS`) as written, their numbers as numbers; None where the file is no
    longer whole as `rows_to_csv` wrote it (cut short: no final newline, a row short of fields, probabilities that
    no longer sum to 1; or edited into something else)."""
    text = path.read_text(encoding="utf-8", errors="surrogateescape")
    try:
        rows = list(csv.DictReader(io.StringIO(text)))
        for row in rows:
            row["fold"], row["true"], row["predicted"] = int(row["fold"]), int(row["true"]), int(row["predicted"])
            for k in range(NUM_GRADES):
                row[f"prob_{k}"] = float(row[f"prob_{k}"])
    except (csv.Error, KeyError, TypeError, ValueError):
        return None
    whole = text.endswith("\n") and all(abs(sum(row[f"prob_{k}"] for k in range(NUM_GRADES)) - 1) < 1e-4
                                         for row in rows)
    return rows if rows and whole else None


def rows_metrics(rows: list[dict], n_boot: int = 200) -> dict:
    probabilities = np.array([[r[f"prob_{k}"] for k in range(NUM_GRADES)] for r in rows])
    return compute_metrics([r["true"] for r in rows], probabilities, groups=[r["patient_id"] for r in rows],
                           n_boot=n_boot)


def mean_sd(per_fold: list[dict], names=REPORT_METRICS) -> dict:
    return {name: {"mean": float(np.mean([m[name] for m in per_fold])), "sd": float(np.std([m[name] for m in per_fold], ddof=1))
                   if len(per_fold) > 1 else 0.0} for name in names}


def cross_validate(config: TrainConfig) -> dict:
    """Run every fold (or read the finished ones); write oof_predictions.csv, cv_metrics.json and cv_summary.md
    under `config.out`, with `warnings` (knees that name no patient: folds may split a person's knees)."""
    out = Path(config.out)
    if config.patience > 0:
        raise KLGradeError("--patience would stop each fold on the patients it is scored on; cross-validation "
                           "trains a fixed schedule and scores its last epoch")
    if config.fold is not None:  # was ignored: every fold ran
        raise KLGradeError(f"--fold {config.fold} chooses the held-out fold of one `klgrade train` run; cross-validation "
                           "trains every fold")
    pool = fold_pool(find_samples(config.data))
    check_same_cv_run(config, pool)
    check_folds_disjoint(pool, config)
    all_rows, per_fold = [], []
    for fold in range(config.folds):
        rows = run_fold(config, fold)
        per_fold.append(rows_metrics(rows))
        all_rows.extend(rows)
    summary = {"model": config.model, "model_options": config.model_options, "folds": config.folds,
               "per_fold": per_fold, "mean_sd": mean_sd(per_fold), "pooled_oof": rows_metrics(all_rows),
               "warnings": unnamed_patients_warning(pool, "cross-validated knees")}
    write_text_atomic(out / "oof_predictions.csv", rows_to_csv(all_rows, OOF_COLUMNS))
    write_json_atomic(out / "cv_metrics.json", summary)
    write_text_atomic(out / "cv_summary.md", cv_markdown(summary))
    return summary


def cv_markdown(summary: dict) -> str:
    lines = [f"# {summary['model']}: {summary['folds']}-fold patient-grouped cross-validation", "",
             "| fold | " + " | ".join(REPORT_METRICS) + " |", "|---" * (len(REPORT_METRICS) + 1) + "|"]
    for k, metrics in enumerate(summary["per_fold"]):
        lines.append(f"| {k} | " + " | ".join(f"{metrics[n]:.3f}" for n in REPORT_METRICS) + " |")
    lines.append("| mean +/- sd | " + " | ".join(f"{v['mean']:.3f} +/- {v['sd']:.3f}"
                                                 for v in summary["mean_sd"].values()) + " |")
    lines += [f"\nWarning: {warning}." for warning in summary["warnings"]]
    return "\n".join(lines) + "\n"


def check_folds_disjoint(pool: list[Sample], config: TrainConfig) -> None:
    """Raise if any two held-out folds of `pool` share a patient or a file (they never should)."""
    held = [[pool[i] for i in fold] for fold in patient_folds(pool, config.folds, config.seed)]
    for i in range(len(held)):
        for j in range(i + 1, len(held)):
            check_unshared(held[i], held[j], f"folds {i} and {j}")
