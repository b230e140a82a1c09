"""`klgrade reproduce`: the paper's protocol, leak-free, in one command.

For each variant (ResNet18, ResNet50, MobileNetV2, DenseNet121, msa_net, msa_net distilled from the
ensemble of the four baselines of the same fold, and msa_net without FPN / SE / attention):
patient-grouped k-fold CV on the train split, internal validation of every fold model on `val`, external
validation on `--external`; then `report.md` with the comparison, misclassification analysis, ablations,
confusion matrices, per-fold bars, training curves and Grad-CAM panels per grade, plus CSV/JSON of every
number. Each variant and fold is resumable: rerunning the command skips finished folds.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import torch

from klgrade.constants import NUM_GRADES
from klgrade.data.cache import cache_key, load_cached
from klgrade.data.io import file_version, read_image
from klgrade.data.preprocess import PreprocessConfig, unknown_sides_warning
from klgrade.data.provenance import distinct_knees, knee_record, shared_knees, unseen_knees
from klgrade.data.sources import Sample, find_samples
from klgrade.data.splits import unnamed_patients_warning
from klgrade.errors import KLGradeError
from klgrade.evaluate.evaluation import batched_outputs, one_grade_warning
from klgrade.experiments.cv import check_same_cv_run, cross_validate, fold_dir, fold_model, mean_sd, read_oof, run_name
from klgrade.experiments.jobs import FoldJob, run_fold_jobs
from klgrade.experiments.report import PanelImage, write_report
from klgrade.files import read_json_whole, write_json_atomic
from klgrade.fingerprint import source_digest
from klgrade.infer.predictor import Predictor
from klgrade.metrics import compute_metrics, paired_difference
from klgrade.train.config import TrainConfig
from klgrade.train.fit import fold_pool

log = logging.getLogger(__name__)

BASELINES = ("resnet18", "resnet50", "mobilenet_v2", "densenet121")


@dataclass(frozen=True)
class Variant:
    name: str
    model: str
    options: dict = field(default_factory=dict)
    distilled: bool = False
    ablation: bool = False


VARIANTS = (
    *(Variant(name, name) for name in BASELINES),
    Variant("msa_net", "msa_net"),
    Variant("msa_net+kd", "msa_net", distilled=True),
    Variant("msa_net -fpn", "msa_net", {"fpn": False}, ablation=True),
    Variant("msa_net -se", "msa_net", {"se": False}, ablation=True),
    Variant("msa_net -attention", "msa_net", {"attention": False}, ablation=True),
)

PROFILES = {
    # Proves the pipeline on 2 CPU cores in minutes; its numbers mean nothing.
    "quick": {"epochs": 1, "image_size": 64, "batch_size": 16, "limit": 60, "folds": 2, "val_limit": 40,
              "model_options": {"msa_net": {"width": 32, "heads": 2}}},
    # The full protocol, sized for one H100 in about ten minutes with `--jobs 4` (estimated from bare-loop speeds;
    # the first GPU run of tools/gpu_protocol.sh measures it): 45 fold trainings of 10 epochs at 160 px (the
    # shipped model's resolution), batch 128 with the learning rate scaled from 1e-3 at 64, and an EMA horizon
    # (1 / (1 - 0.99) = 100 steps) well inside the 360 steps of a training.
    "paper": {"epochs": 10, "image_size": 160, "batch_size": 128, "limit": None, "folds": 5, "val_limit": None,
              "lr": 2e-3, "ema": 0.99, "label_smoothing": 0.1, "model_options": {}},
}


def select_variants(names: list[str] | None = None) -> tuple[Variant, ...]:
    """The variants named (as in the report, `msa_net -fpn`, or as their run folder, `msa_net_no_fpn`), in the
    protocol's order, with the four baselines when msa_net+kd is among them (its teachers); all when none is named.

    Raises:
        KLGradeError: a name that is no variant of the protocol.
    """
    if not names:
        return VARIANTS
    by_name = {key: variant for variant in VARIANTS for key in (variant.name, run_name(variant.name))}
    unknown = [name for name in names if name not in by_name]
    if unknown:
        raise KLGradeError(f"unknown variant(s) {', '.join(map(repr, unknown))}: choose from "
                           f"{', '.join(run_name(v.name) for v in VARIANTS)}")
    chosen = {by_name[name].name for name in names}
    if any(by_name[name].distilled for name in names):
        chosen |= set(BASELINES)
    return tuple(variant for variant in VARIANTS if variant.name in chosen)


def profile_config(profile: str, data: str, out: Path, device: str, seed: int) -> tuple[TrainConfig, dict]:
    settings = dict(PROFILES[profile])
    extra = {"val_limit": settings.pop("val_limit"), "model_options": settings.pop("model_options")}
    config = TrainConfig(data=data, out=str(out), device=device, seed=seed, quiet=True, **settings).validate()
    return config, extra


@dataclass(frozen=True)
class ValidationSet:
    """A labelled set every fold model is scored on, decoded with the profile's preprocessing before any training
    (an unreadable file stops the run before the hours of training, not after) into the image cache (`images` is a
    memmap); `left_out` says which of its files were left out (in the train split, or repeating another image)."""

    samples: list[Sample]
    images: np.ndarray
    preprocess: PreprocessConfig
    left_out: str | None


def validation_set(samples: list[Sample], what: str, train: dict[str, list[str]], preprocess: PreprocessConfig,
                   limit: int | None, cache_dir: str | None = None) -> ValidationSet:
    """`samples`, each image once (`provenance.distinct_knees`) and without the knees of `train` (the train split's
    record: the same patient or the same file), warnings saying what was left out; at most `limit` of them, decoded
    into the image cache (`data.cache.load_cached`: in chunks, held on disk, not in memory).

    Raises:
        DataLayoutError: naming `what`: no knee left, or an image cannot be read.
    """
    samples, repeated = distinct_knees(samples, what)
    samples, trained = unseen_knees(train, samples, what, "the train split", "validate the fold models on")
    for warning in repeated + trained + unknown_sides_warning(preprocess, [s.side for s in samples], what):
        log.warning(warning)
    if limit is not None:
        samples = samples[:: max(1, len(samples) // limit)][:limit]
    images = load_cached(samples, preprocess, cache_dir, what)
    return ValidationSet(samples, images, preprocess, "; ".join(repeated + trained) or None)


def knees_in_val(val: list[Sample], external: list[Sample], what: str) -> str | None:
    """A warning, if `external` shares knees with `val` (the same patient or the same file): its figures then repeat
    part of the internal validation instead of standing apart from it. Each set is still scored whole."""
    shared = shared_knees(val, external)
    if not shared:
        return None
    warning = (f"{what}: {len(shared)} of {len(external)} knees are in val too (the same patient or the same file, "
               f"e.g. {shared[0].path}): the external figures are not independent of the internal ones")
    log.warning(warning)
    return warning


def validation_key(run: Path, folds: int, validation: ValidationSet) -> str:
    """What a variant's figures on a validation set are computed from: its fold models' files, the set's files,
    preprocessing, grades and patients, and klgrade's code (which grades and scores)."""
    material = {"code": source_digest(), "models": [file_version(fold_model(run, fold)) for fold in range(folds)],
                "images": cache_key(validation.samples, validation.preprocess),
                "labels": [[s.grade, s.patient_id] for s in validation.samples]}
    return hashlib.sha256(json.dumps(material).encode()).hexdigest()[:20]


def validate_fold_models(run: Path, folds: int, validation: ValidationSet, name: str) -> dict:
    """Every fold model on an independent labelled set: per-fold metrics, mean +/- sd, and the fold ensemble.

    Written to `run/validation_<name>.json` with its `validation_key`, each fold model's grades and the fold
    ensemble's (`stored_grades`, for the paired differences between variants): a rerun (a time budget's
    continuation) reads the figures of a variant whose fold models and set are unchanged instead of grading the set
    again with each of them."""
    saved = run / f"validation_{name}.json"
    key = validation_key(run, folds, validation)
    stored = read_json_whole(saved, "the set is graded again") or {}
    if stored.get("key") == key and {"grades", "ensemble_grades", "result"} <= set(stored):
        return stored["result"]
    labels = [s.grade for s in validation.samples]
    groups = [s.patient_id for s in validation.samples]
    predictors = [Predictor([fold_model(run, fold)], tta=False) for fold in range(folds)]
    if predictors[0].preprocess != validation.preprocess:  # a run folder left by another profile
        raise KLGradeError(f"{run}: its fold models were trained with other preprocessing than this profile's")
    per_fold, all_probabilities = [], []
    for predictor in predictors:
        probabilities = batched_outputs(predictor, validation.images).probabilities
        per_fold.append(compute_metrics(labels, probabilities, groups=groups, n_boot=0))
        all_probabilities.append(probabilities)
    ensemble_probabilities = np.mean(all_probabilities, axis=0)
    ensemble = compute_metrics(labels, ensemble_probabilities, groups=groups, n_boot=500)
    result = {"n": len(validation.samples), "per_fold": per_fold, "mean_sd": mean_sd(per_fold),
              "fold_ensemble": ensemble}
    grades = [probabilities.argmax(axis=1).tolist() for probabilities in all_probabilities]
    write_json_atomic(saved, {"key": key, "result": result, "grades": grades,
                              "ensemble_grades": ensemble_probabilities.argmax(axis=1).tolist()})
    return result


def stored_grades(run: Path, name: str) -> tuple[np.ndarray, np.ndarray]:
    """The grades each fold model (folds, N) and the fold ensemble (N,) gave the images of the validation set `name`
    (`validate_fold_models`)."""
    stored = json.loads((run / f"validation_{name}.json").read_text())
    return np.array(stored["grades"]), np.array(stored["ensemble_grades"])


def reproduce(data: str, out: str | Path, profile: str = "quick", external: str | None = None,
              device: str = "auto", seed: int = 0, time_budget_s: float | None = None, jobs: int = 1,
              variants: list[str] | None = None) -> dict:
    """Run the whole protocol; returns the results also written to `out/results.json`.

    Args:
        time_budget_s: no fold starts after the budget is spent: the report then covers the variants whose
            folds all finished and lists the others as unfinished; a rerun continues where this one stopped.
        jobs: fold trainings run at once (separate processes on the same device); a distilled fold starts when
            its teachers' folds have finished.
        variants: run only these (see `select_variants`), e.g. to spend a GPU budget on two models.

    Knees of val or --external that the train split holds (the same patient or the same file) are left out of
    their validation, with a warning and a line in the report. Knees that name no patient (`warnings`) are said
    in the report too: for them, folds and these checks can keep together only copies of one file.

    Raises:
        KLGradeError: an unknown variant, or (DataLayoutError) a val or external set with an unreadable image or
            with no knee outside the train split: all before any training.
    """
    out = Path(out)
    selected = select_variants(variants)
    started = time.monotonic()
    deadline = started + time_budget_s if time_budget_s is not None else None
    base, extra = profile_config(profile, data, out, device, seed)
    samples = find_samples(data)  # listed once: the folds, the validation sets and the Grad-CAM panel come from it
    val = [s for s in samples if s.split == "val"]
    pool = fold_pool(samples)
    train = knee_record(pool)
    listed = {"internal": ("val", val),
              "external": (f"--external {external}", find_samples(external) if external else [])}
    validation = {which: validation_set(found, what, train, base.preprocess(), extra["val_limit"], base.cache_dir)
                  for which, (what, found) in listed.items() if found}
    results = {"profile": profile, "data": data, "external": external, "folds": base.folds, "variants": {},
               "cv_on": "the train split" if any(s.split for s in samples) else "all its images (no splits)",
               "selected": [variant.name for variant in selected], "unfinished": [], "device": device_name(device),
               "jobs": jobs, "left_out": {which: v.left_out for which, v in validation.items() if v.left_out},
               "warnings": unnamed_patients_warning(pool, "cross-validated knees")
               + [warning for which, v in validation.items()
                  for warning in (unnamed_patients_warning(v.samples, listed[which][0])
                                  + one_grade_warning([s.grade for s in v.samples], listed[which][0]))]}
    for warning in results["warnings"]:
        log.warning(warning)
    if "external" in validation:
        results["external_in_val"] = knees_in_val(val, validation["external"].samples, listed["external"][0])
    configs = {variant.name: variant_config(variant, base, extra, out) for variant in selected}
    for config in configs.values():  # before any training: a run folder left by other data or options is refused
        check_same_cv_run(config, pool)
    fold_jobs = [FoldJob(configs[variant.name], fold, teacher_folds(variant, out, fold))
                 for variant in selected for fold in range(base.folds)]
    unfinished = {Path(job.config.out) for job in run_fold_jobs(fold_jobs, jobs, deadline)}
    for variant in selected:
        config = configs[variant.name]
        run = Path(config.out)
        if run in unfinished:
            results["unfinished"].append(variant.name)
            continue
        cv = cross_validate(config)  # every fold is trained: this gathers their out-of-fold predictions
        entry = {"model": variant.model, "options": config.model_options, "distilled": variant.distilled,
                 "ablation": variant.ablation, "train_s": training_seconds(run, base.folds),
                 "cv": {"mean_sd": cv["mean_sd"], "per_fold": cv["per_fold"], "pooled_oof": cv["pooled_oof"]}}
        for which, validation_data in validation.items():
            entry[which] = validate_fold_models(run, base.folds, validation_data, which)
        results["variants"][variant.name] = entry
    differences_to_full_model(out, results["variants"], validation)
    results["wall_s"] = time.monotonic() - started
    panel_model = fold_model(out / "runs" / run_name("msa_net"), 0)
    panel_pool = validation["internal"].samples if "internal" in validation else samples
    write_report(results, out, gradcam_panel(panel_pool, panel_model) if "msa_net" in results["selected"] else [])
    return results


def differences_to_full_model(out: Path, variants: dict, validation: dict[str, ValidationSet]) -> None:
    """For every other variant (baseline, ablation, distilled), once msa_net itself has run: `difference_to_msa_net`
    under `cv`, how much better it scored than msa_net on the same held-out knees of the same folds, and under each
    validation set, how much better its fold models scored there than msa_net's (`metrics.paired_difference`:
    the difference of the fold means, with a paired patient-level 95% interval), and its fold ensemble than
    msa_net's (under `fold_ensemble`), so that a reader can tell a model's or an ablation's effect from noise."""
    if "msa_net" not in variants:
        return
    runs = out / "runs"
    full = {row["path"]: row for row in read_oof(runs / run_name("msa_net") / "oof_predictions.csv")}
    full_grades = {which: stored_grades(runs / run_name("msa_net"), which) for which in validation}
    for name, entry in variants.items():
        if name == "msa_net":
            continue
        for which, validation_data in validation.items():
            labels, groups = [s.grade for s in validation_data.samples], [s.patient_id for s in validation_data.samples]
            full_folds, full_ensemble = full_grades[which]
            folds, ensemble = stored_grades(runs / run_name(name), which)
            entry[which]["difference_to_msa_net"] = paired_difference(labels, full_folds, folds, groups=groups)
            entry[which]["fold_ensemble"]["difference_to_msa_net"] = paired_difference(labels, full_ensemble, ensemble,
                                                                                       groups=groups)
        rows = read_oof(runs / run_name(name) / "oof_predictions.csv")
        if {row["path"] for row in rows} != set(full) or any(full[row["path"]]["fold"] != row["fold"] for row in rows):
            log.warning("%s: its folds hold other knees than msa_net's (a run folder left by other data or "
                        "settings?): no paired difference", name)
            continue
        entry["cv"]["difference_to_msa_net"] = paired_difference(
            [row["true"] for row in rows], [full[row["path"]]["predicted"] for row in rows],
            [row["predicted"] for row in rows], groups=[row["patient_id"] for row in rows],
            strata=[row["fold"] for row in rows])


def device_name(device: str) -> str:
    """The accelerator's name for the report (what the timings were measured on)."""
    if device != "cpu" and torch.cuda.is_available():
        return torch.cuda.get_device_name(0)
    return f"CPU ({os.cpu_count()} cores)"


def training_seconds(run: Path, folds: int) -> float:
    """Wall time of a variant's fold trainings, summed (each fold's `timing.json`; concurrent folds overlap)."""
    timings = [read_json_whole(fold_dir(run, fold) / "timing.json", "that fold's time is left out of the sum")
               for fold in range(folds)]
    return float(sum(timing.get("seconds", 0) for timing in timings if timing))


def variant_config(variant: Variant, base: TrainConfig, extra: dict, out: Path) -> TrainConfig:
    options = {**extra["model_options"].get(variant.model, {}), **variant.options}
    return replace(base, model=variant.model, model_options=options, out=str(out / "runs" / run_name(variant.name)))


def teacher_folds(variant: Variant, out: Path, fold: int) -> tuple[tuple[str, int], ...]:
    """A distilled fold learns from the baselines' models of the same fold (trained on the same patients)."""
    if not variant.distilled:
        return ()
    return tuple((str(out / "runs" / run_name(name)), fold) for name in BASELINES)


def gradcam_panel(pool: list[Sample], checkpoint: Path) -> list[PanelImage]:
    """One image of `pool` per grade (the validation images, or all when there is no val), explained by
    `checkpoint`."""
    if not checkpoint.exists():
        return []
    chosen = [s for s in (next((s for s in pool if s.grade == g), None) for g in range(NUM_GRADES)) if s is not None]
    predictor = Predictor([checkpoint], tta=False)
    gradings = predictor.grade_arrays([read_image(s.path) for s in chosen], [s.side for s in chosen], explain=True)
    return [PanelImage(sample.grade, grading) for sample, grading in zip(chosen, gradings)]
