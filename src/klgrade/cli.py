"""The `klgrade` command: a thin Typer shell over the Python API. User errors become one line and exit 1; usage
errors (an unknown option, a missing argument, a value out of range) one line and exit 2."""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import os
import signal
import socket
import sys
import warnings
from pathlib import Path
from tempfile import TemporaryFile
from typing import Annotated, Optional

import typer
import yaml

from klgrade.errors import KLGradeError, Terminated, stop_on_sigterm

USAGE_ERROR = next(kind for kind in typer.BadParameter.__mro__ if kind.__name__ == "UsageError")
"""Click's usage error, whichever copy of Click this Typer uses (0.29 carries its own, unexported)."""


@contextlib.contextmanager
def _usage_errors_in_one_line():
    try:
        yield
    except USAGE_ERROR as exc:
        if type(exc).__name__ == "NoArgsIsHelpError":  # `klgrade` alone: its help is the answer
            raise
        ctx = getattr(exc, "ctx", None)
        hint = f" (see '{ctx.command_path} --help')" if ctx is not None else ""
        typer.echo(f"error: {one_line(exc.format_message()).rstrip('.')}{hint}", err=True)
        raise typer.Exit(exc.exit_code) from None


class OneLineUsageErrors(typer.core.TyperGroup):
    """The command group whose usage errors, its own and its commands', are one `error:` line as every other error,
    instead of Typer's usage line, hint and boxed panel."""

    def make_context(self, *args, **kwargs):
        with _usage_errors_in_one_line():
            return super().make_context(*args, **kwargs)

    def invoke(self, ctx):
        with _usage_errors_in_one_line():
            return super().invoke(ctx)


app = typer.Typer(help="Kellgren-Lawrence grading of knee radiographs.", no_args_is_help=True, cls=OneLineUsageErrors,
                  pretty_exceptions_enable=False, add_completion=False, rich_markup_mode="markdown")
data_app = typer.Typer(help="Inspect datasets.", no_args_is_help=True, rich_markup_mode="markdown")
app.add_typer(data_app, name="data")


def _print_version(asked: bool) -> None:
    """`klgrade --version`: what a methods section or a bug report names (torch's version read without importing it)."""
    if asked:
        from importlib.metadata import version

        from klgrade import __version__

        typer.echo(f"klgrade {__version__} (torch {version('torch')}, Python {sys.version.split()[0]})")
        raise typer.Exit()


@app.callback()
def _options(version: Annotated[bool, typer.Option("--version", callback=_print_version, is_eager=True,
                                                   help="Print klgrade's version and exit.")] = False) -> None:
    """Kellgren-Lawrence grading of knee radiographs."""


_made_folders: list[Path] = []  # the folders this command made for its output, the deepest first


def user_errors(command):
    """Turn KLGradeError, and an OSError the system raised mid-run (a full disk), into `error: <one line>` on stderr
    and exit code 1 (no traceback). A command that fails leaves no empty output folder of its own making behind
    (`output_folder` makes it before the work)."""

    @functools.wraps(command)
    def wrapper(*args, **kwargs):
        _made_folders.clear()
        try:
            return command(*args, **kwargs)
        except KLGradeError as exc:
            _remove_empty(_made_folders)
            typer.echo(f"error: {one_line(str(exc))}", err=True)
            raise typer.Exit(1) from None
        except OSError as exc:  # the system refused a read or write mid-run: a full disk, a lost share
            _remove_empty(_made_folders)
            where = f"{exc.filename}: " if exc.filename else ""
            typer.echo(f"error: {one_line(f'{where}{exc.strerror or exc}')}", err=True)
            raise typer.Exit(1) from None
        except Terminated:
            _remove_empty(_made_folders)
            typer.echo("error: stopped by SIGTERM", err=True)
            raise
        except BaseException:  # an interrupt, or an exit after the work
            _remove_empty(_made_folders)
            raise

    return wrapper


def one_line(message: str) -> str:
    """`message` on one line: a line break in it (a library's message, a file name that holds one) written as `\\n`,
    as `ls` writes such a name, so that every error stays the one line a script reads."""
    return message.replace("\r", "\\r").replace("\n", "\\n")


def _remove_empty(folders: list[Path]) -> None:
    """Remove those of `folders` that are still empty (what a failed command wrote stays, and its folder)."""
    for folder in folders:
        try:
            folder.rmdir()
        except OSError:
            return


class _DropAdverts(logging.Filter):
    """Lightning advertises its cloud logger on every run; noise for a tool that never goes online."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "litlogger" not in record.getMessage()


def _setup_logging(quiet: bool) -> None:
    logging.basicConfig(level=logging.WARNING if quiet else logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    for handler in logging.getLogger().handlers:
        handler.addFilter(_DropAdverts())


Data = Annotated[str, typer.Option("--data", help="Dataset folder (split/grade/image or grade/image) or CSV manifest.")]


def output_folder(path: str | Path | None) -> None:
    """A one-line error, before any work, when --out names something that is not a folder, or a folder that cannot
    be made (a path through a file) or written (a read-only mount): the folder is made here, not after the work."""
    if path is None:
        return
    if Path(path).exists() and not Path(path).is_dir():
        raise KLGradeError(f"{path}: --out names an existing file; give a folder")
    _make_folder(Path(path), f"{path}: --out")


def output_file(path: Path) -> None:
    """A one-line error, before any work, when the folder of the file --out names cannot be made or written."""
    _make_folder(path.parent, f"{path}: its folder")


def _make_folder(folder: Path, what: str) -> None:
    """Make `folder` (and its parents) and try a file in it; `what` "cannot be made" / "cannot be written there" and
    the system's reason as a KLGradeError where that fails. The folders made are noted, so that a command failing
    later removes them again while they are empty."""
    missing = [f for f in (folder, *folder.parents) if not f.exists()]
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise KLGradeError(f"{what} cannot be made ({exc.strerror or exc})") from None
    _made_folders[:0] = missing
    try:
        with TemporaryFile(dir=folder):
            pass
    except OSError as exc:
        raise KLGradeError(f"{what} cannot be written there ({exc.strerror or exc})") from None


def _train_overrides(values: dict) -> dict:
    """CLI values -> TrainConfig overrides (None = not given); `--option key=value` pairs become model_options."""
    from klgrade.train.config import load_yaml

    overrides = dict(values)
    options = {}
    for item in overrides.pop("option") or []:
        key, sep, value = item.partition("=")
        if not sep:
            raise KLGradeError(f"--option '{item}' must look like key=value")
        try:
            options[key] = load_yaml(value)  # numbers, true/false/False, lists; anything else stays a string
        except yaml.YAMLError:  # `[1,`: no YAML value
            options[key] = value
    overrides["model_options"] = options or None
    for flag in ("teacher", "train_only", "quiet", "resume"):  # empty list / False mean "not given", so YAML values stand
        overrides[flag] = overrides.get(flag) or None
    return overrides


def train_options(command):
    """The training options shared by `train` and `cv` (help text states each default)."""

    def wrapper(
        data: Data,
        out: Annotated[str, typer.Option("--out", help="Run folder.")],
        model: Annotated[Optional[str], typer.Option(help="Model name [msa_net]; see `klgrade models`.")] = None,
        epochs: Annotated[Optional[int], typer.Option(help="Epochs [30].")] = None,
        batch_size: Annotated[Optional[int], typer.Option(help="Batch size [32].")] = None,
        lr: Annotated[Optional[float], typer.Option(help="Peak learning rate of AdamW [1e-3].")] = None,
        device: Annotated[Optional[str], typer.Option(help="auto, cpu or cuda [auto].")] = None,
        limit: Annotated[Optional[int], typer.Option(help="Use at most N train and N val images [all].")] = None,
        teacher: Annotated[Optional[list[str]], typer.Option(help="Teacher checkpoint(s) for distillation.")] = None,
        kd_alpha: Annotated[Optional[float], typer.Option(help="Weight of the distillation loss [0.5].")] = None,
        kd_temperature: Annotated[Optional[float], typer.Option(help="Distillation temperature [4].")] = None,
        fold: Annotated[Optional[int], typer.Option(help="Validate on this fold of the train split [val split].")] = None,
        folds: Annotated[Optional[int], typer.Option(help="Number of patient-grouped folds [5].")] = None,
        seed: Annotated[Optional[int], typer.Option(help="Random seed [0].")] = None,
        init: Annotated[Optional[str], typer.Option(help="Start from these weights, e.g. to fine-tune at a higher resolution [random].")] = None,
        train_only: Annotated[Optional[list[str]], typer.Option(help=(
            "Train only this submodule (repeatable), e.g. normaliser; the rest stays frozen [all]."))] = None,
        image_size: Annotated[Optional[int], typer.Option(help="Input side in pixels [224].")] = None,
        option: Annotated[Optional[list[str]], typer.Option(help="Model option key=value, e.g. fpn=false.")] = None,
        ordinal: Annotated[Optional[bool], typer.Option("--ordinal/--no-ordinal", help="Cumulative-logit head [no].")] = None,
        ema: Annotated[Optional[float], typer.Option(help="EMA decay of weights, 0 = off [0].")] = None,
        domain_augment: Annotated[Optional[bool], typer.Option("--domain-augment/--no-domain-augment", help=(
            "Imitate upstream processing in training: CLAHE, softening, gamma, JPEG, resampling, blur, noise [no]."))] = None,
        consistency: Annotated[Optional[float], typer.Option(help=(
            "Weight of the agreement loss between each image and its processed copy; needs --domain-augment [0]."))] = None,
        label_smoothing: Annotated[Optional[float], typer.Option(help="Label smoothing [0].")] = None,
        balance: Annotated[Optional[str], typer.Option(help="Class imbalance: none, sampler or loss [none].")] = None,
        patience: Annotated[Optional[int], typer.Option(help="Early-stopping patience on val QWK, 0 = off [0].")] = None,
        precision: Annotated[Optional[str], typer.Option(help=(
            "Lightning precision: auto (bf16-mixed where the device computes in bf16, else 32-true), bf16-mixed, "
            "16-mixed or 32-true [auto]."))] = None,
        devices: Annotated[Optional[int], typer.Option(help="Devices (GPUs, or CPU processes) per node; >1 = DDP [1].")] = None,
        num_nodes: Annotated[Optional[int], typer.Option(help="Nodes for multi-node DDP [1].")] = None,
        threads: Annotated[Optional[int], typer.Option(help="CPU threads for torch [torch's default].")] = None,
        config: Annotated[Optional[Path], typer.Option("--config", help="YAML file of options (CLI wins).")] = None,
        quiet: Annotated[bool, typer.Option("--quiet", help="No progress bars or info logs.")] = False,
        resume: Annotated[bool, typer.Option("--resume", help="Continue from OUT/last.ckpt.")] = False,
    ):
        given = dict(locals())  # the parameters above, before any other local is bound
        values = {name: value for name, value in given.items() if name not in ("config", "command")}
        from klgrade.train.config import load_config

        _setup_logging(quiet)
        output_folder(out)
        overrides = _train_overrides(values)
        return command(load_config(config, overrides))

    wrapper.__name__, wrapper.__doc__ = command.__name__, command.__doc__
    return wrapper


@app.command()
@user_errors
@train_options
def train(config) -> None:
    """Train one model (validated on `val`, or on --fold K of the train split)."""
    from klgrade.train.fit import fit

    summary = fit(config)
    if summary["rank"] == 0:  # under DDP every process returns here; one reports
        typer.echo(f"best epoch {summary['best_epoch']}: val qwk {summary['best_qwk']:.4f} -> {Path(config.out) / 'best.safetensors'}")
        if summary["selection"]:
            typer.echo(selection_line(summary["selection"]))


def selection_line(selection: dict) -> str:
    """What choosing the epoch on val costs its val figures, in a line (`metrics.selection_estimate`)."""
    chosen, crossed = selection["chosen"], selection["cross_fitted"]
    return (f"chosen on val, so optimistic there: an epoch chosen on half the val patients scores on the other half "
            f"qwk {crossed['qwk']:.4f} (chosen epoch on all: {chosen['qwk']:.4f}), accuracy {crossed['accuracy']:.4f} "
            f"({chosen['accuracy']:.4f})")


@app.command()
@user_errors
@train_options
def cv(config) -> None:
    """Patient-grouped stratified k-fold cross-validation on the train split (resumable per fold)."""
    from klgrade.experiments.cv import cross_validate

    summary = cross_validate(config)
    for name, stats in summary["mean_sd"].items():
        typer.echo(f"{name:16s} {stats['mean']:.4f} +/- {stats['sd']:.4f}")
    typer.echo(f"report: {Path(config.out) / 'cv_summary.md'}")


@app.command()
@user_errors
def reproduce(
    data: Data,
    out: Annotated[Path, typer.Option("--out", help="Folder for runs, report.md, results and figures.")],
    external: Annotated[Optional[str], typer.Option(help="Labelled folder for external validation.")] = None,
    profile: Annotated[str, typer.Option(help="quick (CPU, minutes, proves the pipeline) or paper (full, GPU).")] = "quick",
    device: Annotated[str, typer.Option(help="auto, cpu or cuda.")] = "auto",
    seed: Annotated[int, typer.Option(help="Seed of folds and training.")] = 0,
    time_budget: Annotated[Optional[float], typer.Option(min=0, help="Minutes after which no fold starts; the "
                                                         "report covers what finished [no limit].")] = None,
    jobs: Annotated[int, typer.Option(min=1, help="Fold trainings at once on the device (processes) [1].")] = 1,
    variant: Annotated[Optional[list[str]], typer.Option(help="Run only this variant (repeatable), e.g. resnet18, "
                                                         "msa_net, msa_net_kd (adds its four teachers), "
                                                         "msa_net_no_fpn [all nine].")] = None,
) -> None:
    """The paper's protocol: 5 models + distilled msa_net + ablations, CV, internal/external validation, report."""
    from klgrade.experiments.protocol import PROFILES
    from klgrade.experiments.protocol import reproduce as run_protocol

    _setup_logging(quiet=True)
    output_folder(out)
    if profile not in PROFILES:
        raise KLGradeError(f"--profile must be one of {sorted(PROFILES)}, not '{profile}'")
    results = run_protocol(data, out, profile=profile, external=external, device=device, seed=seed,
                           time_budget_s=time_budget * 60 if time_budget is not None else None, jobs=jobs,
                           variants=variant)
    if results["unfinished"]:
        typer.echo(f"time budget spent; unfinished: {', '.join(results['unfinished'])} (rerun to continue)")
    typer.echo(f"report: {out / 'report.md'}")


SHIPPED = "shipped"
"""What `evaluate --against` takes for the model shipped with klgrade (a fine-tuned model against it)."""
Checkpoints = Annotated[Optional[list[Path]], typer.Option("--checkpoint", help="Checkpoint(s); several = ensemble [shipped model].")]
Backend = Annotated[str, typer.Option(help="Inference backend: torch or onnx.")]
Device = Annotated[str, typer.Option(help="Torch device of the torch backend: cpu or cuda.")]
Tta = Annotated[Optional[bool], typer.Option("--tta/--no-tta", help="Average with the flipped image [as the model recommends].")]
Alpha = Annotated[Optional[float], typer.Option(min=0.001, max=0.999, help="Grade sets of a calibrated model miss the "
                                                "true grade for at most this share of images [0.1].")]


@data_app.command("summary")
@user_errors
def data_summary(
    data: Annotated[str, typer.Argument(metavar="DATA", help="Dataset folder or CSV manifest.")],
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object.")] = False,
) -> None:
    """Counts per split x grade, patients per split (and knees that name none), cross-split patient overlap,
    unreadable files, files not gradable as they are (a lateral, oblique or axial view, too few pixels or grey
    levels), files graded with a note (not square, a burnt-in mark painted out, enhanced as looking unenhanced)."""
    from klgrade.data.summary import summarize
    from klgrade.console import print_summary

    summary = summarize(data)
    if as_json:
        typer.echo(json.dumps(summary, indent=2))
    else:
        print_summary(summary)
    for item in summary["unreadable"]:
        typer.echo(f"error: {item['path']}: {item['reason']}", err=True)
    for warning in summary["warnings"]:
        typer.echo(f"warning: {warning}", err=True)
    for item in summary["not_gradable"]:
        for reason in item["reasons"]:
            typer.echo(f"warning: {item['path']}: {reason}", err=True)
    if summary["noted"]:  # often most of a set from elsewhere: one line, not one per file
        first = summary["noted"][0]
        typer.echo(f"warning: {len(summary['noted'])} files will be graded with a note, e.g. {first['path']}: "
                   f"{first['notes'][0]}", err=True)
    if summary["unreadable"]:
        raise typer.Exit(1)


@data_app.command("manifest")
@user_errors
def data_manifest(
    data: Annotated[str, typer.Argument(metavar="DATA", help="Dataset folder or CSV manifest.")],
    out: Annotated[Path, typer.Option(help="The manifest to write (CSV; not overwritten).")],
    patient_from_folder: Annotated[bool, typer.Option(
        "--patient-from-folder", help="A knee that names no patient gets the name of its folder below the grade "
        "folder as its patient_id (`2/PAT0042/IMG1.png` -> PAT0042): check them before use.")] = False,
) -> None:
    """Write the knees found in DATA as a CSV manifest (path, grade, patient_id, side, split): fill in the patient
    ids no file names, then give the manifest as DATA."""
    from klgrade.data.manifest import write_manifest
    from klgrade.data.splits import unnamed_knees

    output_file(out)
    samples = write_manifest(data, out, patient_from_folder)
    unnamed = len(unnamed_knees(samples))
    typer.echo(f"{out}: {len(samples)} knees" + (f", {unnamed} with no patient_id to fill in" if unnamed else ""))


@app.command()
@user_errors
def models() -> None:
    """List the model names `--model` accepts."""
    from klgrade.models import list_models

    typer.echo("\n".join(list_models()))


@app.command()
@user_errors
def evaluate(
    data: Data,
    checkpoint: Checkpoints = None,
    split: Annotated[Optional[str], typer.Option(help="Split of a split root [test, else val].")] = None,
    out: Annotated[Optional[Path], typer.Option(help="Write metrics.json, predictions.csv and plots here.")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the metrics as one JSON object.")] = False,
    tta: Tta = None,
    backend: Backend = "torch",
    device: Device = "cpu",
    seed: Annotated[int, typer.Option(help="Seed of the bootstrap intervals.")] = 0,
    calibrate_on: Annotated[Optional[str], typer.Option(help="Fit a temperature and the grade sets on this labelled "
                                                      "folder first (its val split for a split root; must not share "
                                                      "files or patients with --data).")] = None,
    alpha: Alpha = None,
    against: Annotated[Optional[list[Path]], typer.Option(
        "--against", help="Also grade the same knees with this checkpoint (several = ensemble; `shipped`: the model "
                          "shipped with klgrade) and give how much better --checkpoint scores, with a paired 95% "
                          "interval.")] = None,
) -> None:
    """Score checkpoint(s) on a labelled folder: accuracy, F1, MCC, QWK, MAE, confusion, 95% intervals."""
    from klgrade.evaluate.evaluation import evaluate as run_evaluation
    from klgrade.infer.grading import load_model
    from klgrade.evaluate.report import write_evaluation
    from klgrade.console import print_metrics

    _setup_logging(quiet=True)
    output_folder(out)
    predictor = load_model(checkpoint, device=device, tta=tta, backend=backend)
    other = None
    if against:
        shipped = [str(path) for path in against] == [SHIPPED]
        other = load_model(None if shipped else against, device=device, tta=tta, backend=backend)
    result = run_evaluation(predictor, data, split=split, seed=seed, alpha=alpha, calibrate_on=calibrate_on,
                            against=other)
    if out is not None:
        write_evaluation(result, out)
    if as_json:
        typer.echo(json.dumps(result.metrics))
    else:
        print_metrics(result.metrics)
    for warning in result.warnings:
        typer.echo(f"warning: {warning}", err=True)
    for failure in result.failures:
        typer.echo(f"error: {failure}", err=True)
    if result.failures:
        raise typer.Exit(1)


@app.command()
@user_errors
def predict(
    inputs: Annotated[list[str], typer.Argument(metavar="INPUT", help=(
        "Image files, folders or glob patterns (PNG, JPEG, JPEG 2000, BMP, TIFF, DICOM); - reads one image "
        "from standard input."))],
    checkpoint: Checkpoints = None,
    explain: Annotated[bool, typer.Option("--explain", help="Save a Grad-CAM overlay per image (needs --out).")] = False,
    out: Annotated[Optional[Path], typer.Option(help="Folder for predictions.csv/json and heatmaps/.")] = None,
    output_format: Annotated[str, typer.Option("--format", help="csv, json or table (on stdout).")] = "csv",
    tta: Tta = None,
    backend: Backend = "torch",
    device: Device = "cpu",
    batch_size: Annotated[int, typer.Option(min=1, help="Images decoded and graded together (the network takes at "
                                                        "most 64 of them at a time).")] = 16,
    workers: Annotated[int, typer.Option(min=1, help="Threads decoding images ahead.")] = 2,
    alpha: Alpha = None,
) -> None:
    """Grade radiographs; unreadable inputs are reported and do not stop the others (exit 1 if any failed)."""
    from klgrade.console import print_predictions, write_predictions
    from klgrade.data.io import FORMATS_READ
    from klgrade.infer.batch import STDIN, expand_inputs, predict_paths, remove_earlier_heatmaps
    from klgrade.infer.grading import load_model

    _setup_logging(quiet=True)
    if output_format not in ("csv", "json", "table"):
        raise KLGradeError(f"--format must be csv, json or table, not '{output_format}'")
    if explain and out is None:
        raise KLGradeError("--explain writes heatmap images: give --out DIR")
    output_folder(out)
    paths = expand_inputs(inputs)
    if not paths:
        raise KLGradeError(f"no images found in {' '.join(inputs)} ({FORMATS_READ})")
    if paths.count(STDIN) > 1:
        raise KLGradeError(f"'{STDIN}' (standard input) can be given once: it holds one image")
    stdin = None
    if STDIN in paths:
        if sys.stdin is None or sys.stdin.isatty():
            raise KLGradeError(f"'{STDIN}' reads an image from standard input, which is "
                               f"{'closed' if sys.stdin is None else 'a terminal'} here: pipe one in "
                               f"(klgrade predict - < knee.png)")
        stdin = sys.stdin.buffer
    predictor = load_model(checkpoint, device=device, tta=tta, backend=backend)
    rows = list(predict_paths(predictor, paths, explain, out, batch_size, workers, alpha, stdin))
    if out is not None:
        write_predictions(rows, out)
        if removed := remove_earlier_heatmaps(out, rows):
            typer.echo(f"warning: removed {removed} heatmaps an earlier run left in {out / 'heatmaps'} (they would pass "
                       "for this run's)", err=True)
    print_predictions(rows, output_format)
    failed = [row for row in rows if row.get("error")]
    for row in failed:
        typer.echo(f"error: {row['path']}: {row['error']}", err=True)
    if failed:
        raise typer.Exit(1)


@app.command()
@user_errors
def calibrate(
    checkpoint: Annotated[list[Path], typer.Option("--checkpoint", help="Checkpoint to calibrate; several = an "
                                                   "ensemble, calibrated on its combined output.")],
    data: Annotated[str, typer.Option("--data", help="Labelled calibration images: a grade/image folder, a manifest, "
                                      "or a split root (its --split).")],
    out: Annotated[Path, typer.Option("--out", help="Calibrated checkpoint to write (.safetensors); for an "
                                      "ensemble, a folder for the calibrated members.")],
    split: Annotated[str, typer.Option(help="Calibration split of a split root.")] = "val",
    density_data: Annotated[Optional[str], typer.Option(help="Images that define 'like the training data' for the "
                                                        "gradability check [the train split of a split root].")] = None,
    tta: Tta = None,
) -> None:
    """Fit temperature, conformal grade sets and the gradability check; write them into a copy of the checkpoint."""
    import numpy as np

    from klgrade.constants import NUM_GRADES
    from klgrade.data.provenance import check_unshared
    from klgrade.data.sources import find_samples, select_split
    from klgrade.evaluate.calibration import calibrate_checkpoint
    from klgrade.evaluate.evaluation import pick_split
    from klgrade.uncertainty import DEFAULT_ALPHA, smallest_alpha, uncertified_grades, uncertified_warning

    _setup_logging(quiet=True)
    if len(checkpoint) == 1 and (out.is_dir() or out.suffix != ".safetensors"):
        raise KLGradeError(f"{out}: --out must name a .safetensors file")
    if len(checkpoint) > 1:
        output_folder(out)
    else:
        output_file(out)
    samples = find_samples(data)
    has_splits = any(s.split for s in samples)
    calibration = pick_split(samples, split if has_splits else None)
    if density_data is None and not has_splits:
        raise KLGradeError(f"{data} has no train split: give --density-data (e.g. the training images)")
    density = select_split(samples, "train") if density_data is None else find_samples(density_data)
    if any(s.split for s in density):
        density = select_split(density, "train")
    check_unshared(density, calibration, "the calibration and density data")
    result = calibrate_checkpoint(checkpoint, calibration, density, out, tta=tta)
    counts = np.bincount(result["conformal_grades"], minlength=NUM_GRADES)
    lowest = smallest_alpha(result["conformal_grades"])
    typer.echo(f"temperature {result['temperature']:.3f}, {result['n_calibration']} calibration images "
               f"(KL 0-4: {' / '.join(map(str, counts))}; grade sets certified for every grade at alpha >= "
               f"{lowest:.3f}), feature density from {result['n_density']} images ({result['n_density_inverted']} more "
               f"looked inverted: left out), framing warnings below crop share {result['framing']['threshold']:.3f} "
               f"and above {result['framing_wide']['threshold']:.3f} -> {out}")
    short = uncertified_grades(result["conformal_grades"], DEFAULT_ALPHA)
    if short:
        typer.echo(f"warning: {uncertified_warning(short, DEFAULT_ALPHA)}", err=True)


@app.command("export-onnx")
@user_errors
def export_onnx_command(
    out: Annotated[Path, typer.Option("--out", help="Target .onnx file.")],
    checkpoint: Annotated[Optional[list[Path]], typer.Option(help="Checkpoint to export [shipped model].")] = None,
) -> None:
    """Export a checkpoint to ONNX (dynamic batch) for ONNX Runtime and other engines."""
    from klgrade.infer.onnx import export_onnx
    from klgrade.infer.predictor import shipped_checkpoint

    if checkpoint and len(checkpoint) > 1:  # typer kept the last of several and exported it without a word
        raise KLGradeError(f"export-onnx exports one checkpoint, not {len(checkpoint)}: export each, then grade them "
                           "as an ensemble with --backend onnx --checkpoint a.onnx b.onnx")
    if out.is_dir():
        raise KLGradeError(f"{out}: --out names a folder; give a file name such as model.onnx")
    output_file(out)
    if out.suffix.lower() != ".onnx":  # was written, then read by `--backend onnx` as a safetensors checkpoint
        raise KLGradeError(f"{out}: --out must name an .onnx file (predict, evaluate and serve know an ONNX model by "
                           "that suffix)")
    path = export_onnx(checkpoint[0] if checkpoint else shipped_checkpoint(), out)
    typer.echo(str(path))


@app.command()
@user_errors
def serve(
    host: Annotated[str, typer.Option(help="Address to listen on.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(min=0, max=65535, help="Port (0 = any free port).")] = 8000,
    checkpoint: Checkpoints = None,
    backend: Backend = "torch",
    device: Device = "cpu",
    tta: Tta = None,
    max_upload_mb: Annotated[int, typer.Option(min=1, help="Largest accepted upload, MiB.")] = 32,
    max_upload_mp: Annotated[float, typer.Option(min=0.001, help="Largest accepted image, megapixels.")] = 30.0,
    body_timeout: Annotated[float, typer.Option(min=0.1, help="Seconds an upload may take to arrive, and may wait "
                                                              "for room among the uploads held.")] = 15.0,
    max_held_mb: Annotated[Optional[int], typer.Option(min=1, help="MiB of uploads held at once, all requests "
                                                                   "together [4 x --max-upload-mb]; more wait their "
                                                                   "turn (503 after --body-timeout).")] = None,
) -> None:
    """Serve the grading API (/v1/grade, /v1/model, /v1/health, /docs) and the web page (/)."""
    import uvicorn

    from klgrade.infer.grading import load_model
    from klgrade.serve.app import Settings, create_app

    _setup_logging(quiet=False)
    if max_held_mb is not None and max_held_mb < max_upload_mb:
        raise KLGradeError(f"--max-held-mb {max_held_mb} leaves no room for an upload of --max-upload-mb "
                           f"{max_upload_mb}")
    settings = Settings(checkpoints=[str(p) for p in checkpoint] if checkpoint else None, backend=backend,
                        device=device, tta=tta,
                        max_upload_bytes=max_upload_mb * 2**20, max_upload_pixels=int(max_upload_mp * 1e6),
                        body_timeout_s=body_timeout, max_held_bytes=max_held_mb * 2**20 if max_held_mb else None)
    listener = _listening_socket(host, port)  # a taken port fails here, before the model loads
    predictor = load_model(settings.checkpoints, device=device, tta=tta, backend=backend)  # a bad one fails here
    server = uvicorn.Server(uvicorn.Config(create_app(settings, predictor), host=host, port=port, log_level="info"))
    address = f"[{host}]" if ":" in host else host  # uvicorn says where only for the sockets it binds itself
    logging.getLogger("uvicorn.error").info("Uvicorn running on http://%s:%d (Press CTRL+C to quit)", address,
                                            listener.getsockname()[1])
    signal.signal(signal.SIGTERM, signal.SIG_DFL)  # uvicorn shuts down gracefully, then ends by the signal as a
    server.run(sockets=[listener])                   # service manager expects, not with `Terminated`'s exit status


def _listening_socket(host: str, port: int) -> socket.socket:
    """The server's socket, bound as uvicorn binds it: a taken port or a foreign address is a one-line error (uvicorn
    would report it among its start-up logs, after the model had loaded)."""
    listener = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        listener.bind((host, port))
    except OSError as exc:
        listener.close()
        raise KLGradeError(f"{host}:{port}: cannot listen there ({exc.strerror or exc})") from None
    return listener


MULTI_VALUE_OPTIONS = ("--teacher", "--checkpoint")
CHECKPOINT_SUFFIXES = (".safetensors", ".onnx")


def expand_multi_values(argv: list[str]) -> list[str]:
    """`--teacher A B` -> `--teacher A --teacher B` (DESIGN.md's form; Click options take one value each).

    Only further values that name checkpoint files are taken, so `predict --checkpoint m.safetensors x.png`
    still grades x.png.
    """
    expanded, option = [], None
    for arg in argv:
        if option and expanded[-1] != option and not arg.startswith("-") and arg.endswith(CHECKPOINT_SUFFIXES):
            expanded.append(option)  # one more value of the option before it
        elif arg.startswith("-") or (option and expanded[-1] != option):
            option = None
        if arg in MULTI_VALUE_OPTIONS:
            option = arg
        expanded.append(arg)
    return expanded


def empty_argument(argv: list[str]) -> str | None:
    """What is said of an empty argument (`--out ""`, `--out=`, `predict ""`: an unset shell variable, as a rule), or
    None. Refused before anything runs: as a path, "" is the current folder, which `predict` would grade and `train`
    would fill."""
    for before, arg in zip(["klgrade", *argv], argv):
        if arg == "":
            return f"the argument after {before} is empty (an unset shell variable?)"
        option, equals, value = arg.partition("=")
        if option.startswith("--") and equals and not value:
            return f"{option} is given an empty value (an unset shell variable?)"
    return None


def main() -> None:
    """Console entry point (`klgrade`, `python -m klgrade`)."""
    for stream in ("stdout", "stderr"):  # closed by the caller (`>&-`, a daemon's): Python made it None, and every
        if getattr(sys, stream) is None:  # command stopped at the next line with a traceback; what it says goes nowhere
            setattr(sys, stream, open(os.devnull, "w"))
    # A file name that is no UTF-8 (Linux allows any bytes) is printed as the bytes it is, as `ls` does, whatever the
    # locale: under en_US.UTF-8 Python's stdout refused it, and `predict --format csv` stopped with a traceback.
    sys.stdout.reconfigure(errors="surrogateescape")
    stop_on_sigterm()
    # pydicom warns and logs, per file, what it met reading a damaged file (a truncated pixel sequence, a wrong VR):
    # the file's answer or its one-line error is what a user needs, not two more lines of pydicom's.
    warnings.filterwarnings("ignore", module="pydicom")
    logging.getLogger("pydicom").addFilter(lambda record: record.levelno >= logging.ERROR)  # its import resets levels
    # Matplotlib (evaluate's plots) says in two lines where the home cannot be written (a container) that it keeps its
    # config in a temporary folder: nothing a user of klgrade acts on.
    logging.getLogger("matplotlib").addFilter(lambda record: record.levelno >= logging.ERROR)
    problem = empty_argument(sys.argv[1:])
    if problem is not None:
        typer.echo(f"error: {problem}", err=True)
        sys.exit(2)
    sys.exit(app(args=expand_multi_values(sys.argv[1:]), prog_name="klgrade"))
