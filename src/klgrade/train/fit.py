"""`fit(config)`: one training run, from a data folder to checkpoints, logs and metrics in the run folder.

Run folder:
    best.safetensors   weights (EMA if enabled) of the epoch with the best validation QWK, with config,
                       preprocessing, data fingerprint and metrics in its metadata
    last.safetensors   the same for the latest epoch
    last.ckpt          full Lightning state (optimizer, scheduler, EMA, epoch) for `--resume`
    metrics.json       per-epoch validation metrics, the best epoch, and what choosing it cost (`selection`)
    run.json           the options and knees `last.ckpt` is trained with: `--resume` with others is refused
    logs/              CSV logs (training curves; `--resume` keeps the rows logged up to the checkpoint)
"""

from __future__ import annotations

import csv
import functools
import io
import logging
import pickle
import signal
import warnings
from dataclasses import dataclass, field, replace
from pathlib import Path

import lightning as L
import numpy as np
import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from lightning.pytorch.callbacks import Callback, EarlyStopping, ModelCheckpoint, RichProgressBar
from lightning.pytorch.loggers import CSVLogger

from klgrade.constants import MAIN_METRIC, NUM_GRADES
from klgrade.data.cache import cache_key, load_cached
from klgrade.data.preprocess import PreprocessConfig, unknown_sides_warning
from klgrade.data.provenance import check_unshared, distinct_knees, knee_record, merge_records
from klgrade.data.sources import Sample, find_samples, limit_samples, select_split
from klgrade.data.splits import fold_split, unnamed_patients_warning
from klgrade.errors import CheckpointError, KLGradeError
from klgrade.files import atomic_path, write_json_atomic
from klgrade.metrics import selection_estimate
from klgrade.models import create_model, load_checkpoint, save_checkpoint
from klgrade.models.weights import read_info
from klgrade.train.batches import class_balanced_weights, inverse_frequency, make_loader
from klgrade.train.config import DEFAULT_FOLDS, TrainConfig, resolve_precision
from klgrade.train.module import GradingModule
from klgrade.train.record import check_same_run, run_record

log = logging.getLogger(__name__)
logging.getLogger("lightning").handlers.clear()  # its own console handler would print each message a second time

RUN_RECORD = "run.json"
BENIGN_WARNINGS = (
    ".*does not have many workers.*", ".*smaller than the logging interval.*", ".*exists and is not empty.*",
    ".*LeafSpec.*", ".*is not supported by the model summary.*",
)
"""Lightning warnings that say nothing about a klgrade run (the loader is in-memory by design)."""


@dataclass
class RunData:
    """The run's knees and preprocessing; `notes` say which files were left out (`provenance.distinct_knees`)."""

    train: list[Sample]
    val: list[Sample]
    preprocess: PreprocessConfig
    notes: list[str] = field(default_factory=list)


def fold_pool(samples: list[Sample]) -> list[Sample]:
    """What folds are cut from: the train split, or every sample when the data has no splits."""
    return select_split(samples, "train") if any(s.split for s in samples) else samples


@functools.lru_cache(maxsize=256)
def _say_once(note: str) -> None:
    """A note on a run's data, said once per process: `cv` and `reproduce` train every fold of every variant on the
    same data, and the same note 45 times would bury the rest."""
    log.warning(note)


def fit_interruptibly(trainer: L.Trainer, *args, **kwargs) -> None:
    """`trainer.fit`, stopped by Ctrl-C as anything else is: Lightning ends an interrupted fit with `sys.exit(1)`
    (`train` then exited 1, not 130, and in a notebook the kernel's SIGINT stayed ignored for good); here the
    KeyboardInterrupt goes on up and the SIGINT handler is restored."""
    handler = signal.getsignal(signal.SIGINT)
    try:
        trainer.fit(*args, **kwargs)
    except SystemExit as exit_:
        if isinstance(exit_.__context__, KeyboardInterrupt):  # Lightning's exit while handling Ctrl-C (not SIGTERM's)
            raise KeyboardInterrupt from None
        raise
    finally:
        if handler is not None and signal.getsignal(signal.SIGINT) is not handler:
            signal.signal(signal.SIGINT, handler)


def select_data(config: TrainConfig) -> RunData:
    """Train and validation samples: a fold of the train split, or train vs val; each image once (a copy would
    weigh twice; copies filed under two grades have no reference grade and are left out)."""
    samples = find_samples(config.data)
    has_splits = any(s.split for s in samples)
    train = fold_pool(samples)
    ignored = []
    if config.fold is not None:
        train, val = fold_split(train, config.fold, config.folds, config.seed)
    elif has_splits:
        val = select_split(samples, "val")
        if config.folds != DEFAULT_FOLDS:  # was read past without a word
            ignored = [f"--folds {config.folds} is read only with --fold K (or by `klgrade cv`): this run validates "
                       f"on the val split"]
    else:
        raise KLGradeError(f"{config.data}: no 'val' split; give --fold K to validate on a fold of this data")
    check_unshared(train, val, "training and validation data")
    train, train_notes = distinct_knees(train, "training data")
    val, val_notes = distinct_knees(val, "validation data")
    train = limit_samples(train, config.limit, config.seed)
    val = limit_samples(val, config.limit, config.seed + 1)
    preprocess = config.preprocess()
    sideless = [note for samples, what in ((train, "training data"), (val, "validation data"))
                for note in unknown_sides_warning(preprocess, [s.side for s in samples], what)]
    unnamed = unnamed_patients_warning(train + val, "training and validation data")
    return RunData(train, val, preprocess, ignored + train_notes + val_notes + sideless + unnamed)


def seen_records(data: RunData, init: str | None, early_stopping: bool) -> dict[str, dict[str, dict[str, list[str]]]]:
    """The records of the knees `best.safetensors` and `last.safetensors` have seen (`data.provenance`): both were
    fitted on the training data; the validation data chose the best epoch, and the last one only where an early stop
    ends on it; a klgrade checkpoint they start from (`--init`) passes its records on."""
    inherited = {}
    if init is not None and init.endswith(".safetensors"):
        try:
            inherited = read_info(init).get("seen", {})
        except CheckpointError:  # weights of another library: nothing recorded
            pass
    trained = merge_records([knee_record(data.train), inherited.get("trained", {})])
    chosen_on_val = merge_records([knee_record(data.val), inherited.get("chosen", {})])
    chosen_before = merge_records([inherited.get("chosen", {})])
    return {"best": {"trained": trained, "chosen": chosen_on_val},
            "last": {"trained": trained, "chosen": chosen_on_val if early_stopping else chosen_before}}


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning checkpoints written to a temporary file and renamed: a kill never leaves half a file."""

    def save_checkpoint(self, checkpoint, path, storage_options=None) -> None:
        with atomic_path(path) as temporary:
            super().save_checkpoint(checkpoint, temporary, storage_options)


class ExportWeights(Callback):
    """After each validation: `last.safetensors`, and `best.safetensors` when the main metric improves; each with
    the records of the knees it has seen (`seen`: for "last" and "best")."""

    def __init__(self, out: Path, info: dict, seen: dict[str, dict]):
        self.out, self.info, self.seen = out, info, seen
        self.best_score = -np.inf
        self.best_epoch = -1

    def on_validation_end(self, trainer: L.Trainer, module: GradingModule) -> None:
        if trainer.sanity_checking or not trainer.is_global_zero:
            return
        metrics = {k.removeprefix("val/"): float(v) for k, v in trainer.callback_metrics.items() if k.startswith("val/")}
        info = {**self.info, "epoch": module.current_epoch, "val_metrics": metrics}
        save_checkpoint(self.out / "last.safetensors", module.eval_model(), {**info, "seen": self.seen["last"]})
        if metrics[MAIN_METRIC] > self.best_score:
            self.best_score, self.best_epoch = metrics[MAIN_METRIC], module.current_epoch
            save_checkpoint(self.out / "best.safetensors", module.eval_model(), {**info, "seen": self.seen["best"]})

    def state_dict(self) -> dict:
        return {"best_score": self.best_score, "best_epoch": self.best_epoch}

    def load_state_dict(self, state: dict) -> None:
        self.best_score, self.best_epoch = state["best_score"], state["best_epoch"]


class DatasetOnDevice(Callback):
    """On a GPU, keep the decoded dataset in device memory: a batch is an index op there, nothing crosses PCIe."""

    def __init__(self, loaders):
        self.loaders = loaders

    def on_fit_start(self, trainer: L.Trainer, module: GradingModule) -> None:
        if module.device.type == "cuda":
            for loader in self.loaders:
                loader.dataset.to(module.device)


def load_teachers(paths: list[str], preprocess: PreprocessConfig) -> list[torch.nn.Module]:
    """Teacher models; each must have been trained on images prepared as the student's are."""
    teachers = []
    for path in paths:
        model, info = load_checkpoint(path)
        theirs = PreprocessConfig.from_dict(info["preprocess"])
        if theirs != preprocess:
            raise KLGradeError(f"{path}: teacher preprocessing {theirs.to_dict()} differs from the student's "
                               f"{preprocess.to_dict()}; a teacher must see the images as it was trained")
        teachers.append(model)
    return teachers


def build_trainer(config: TrainConfig, out: Path, callbacks: list[Callback],
                  resumed_step: int | None = None) -> L.Trainer:
    accelerator = {"auto": "auto", "cpu": "cpu", "cuda": "gpu"}[config.device]
    if config.device == "cuda" and not torch.cuda.is_available():
        raise KLGradeError("--device cuda asked for, but no CUDA GPU is available")
    callbacks = [
        *callbacks,
        ModelCheckpoint(dirpath=out, filename="last", save_top_k=1, monitor=None, enable_version_counter=False),
    ]
    if config.patience > 0:
        callbacks.append(EarlyStopping(monitor=f"val/{MAIN_METRIC}", mode="max", patience=config.patience))
    if not config.quiet:
        callbacks.append(RichProgressBar())
    strategy = "ddp" if config.devices * config.num_nodes > 1 else "auto"
    return L.Trainer(
        accelerator=accelerator, devices=config.devices, num_nodes=config.num_nodes, strategy=strategy,
        precision=config.precision, max_epochs=config.epochs, callbacks=callbacks, num_sanity_val_steps=0,
        logger=CSVLogger(out, name="logs", version="") if resumed_step is None else
        ResumedCSVLogger(out, name="logs", version="", before_step=resumed_step),
        enable_progress_bar=not config.quiet,
        enable_model_summary=not config.quiet, use_distributed_sampler=False, log_every_n_steps=10,
        plugins=[AtomicCheckpointIO()],
    )


class ResumedCSVLogger(CSVLogger):
    """A CSV logger that keeps the rows a resumed run logged up to its checkpoint: Lightning's writer deletes an
    existing metrics.csv when it starts; this puts back the rows before `before_step` (later ones are redone; a
    row cut short, with no step, is dropped) and tells the writer their columns, so new rows append."""

    def __init__(self, *args, before_step: int, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.before_step = before_step

    @property
    def experiment(self):
        if self._experiment is not None:
            return self._experiment
        metrics_file = Path(self.log_dir) / "metrics.csv"
        history = metrics_file.read_text() if metrics_file.is_file() else ""
        writer = super().experiment
        if history and hasattr(writer, "metrics_keys"):  # rank zero's real writer, not a dummy
            reader = csv.DictReader(io.StringIO(history))
            rows = [row for row in reader if (row["step"] or "").isdigit() and int(row["step"]) < self.before_step]
            with atomic_path(metrics_file) as temporary, open(temporary, "w", newline="") as file:
                table = csv.DictWriter(file, fieldnames=reader.fieldnames)
                table.writeheader()
                table.writerows(rows)
            writer.metrics_keys = list(reader.fieldnames)
        return writer


def epoch_selection(module: GradingModule, val_labels: np.ndarray, val_patients: list[str]) -> dict | None:
    """`metrics.selection_estimate` of the epochs validated: how optimistic the best epoch's validation figures are
    (None with fewer than two epochs, or a run resumed from a checkpoint that kept no grades per epoch)."""
    if len(module.history) < 2 or len(module.val_grades) != len(module.history):
        return None
    selection = selection_estimate(val_labels, module.val_grades, val_patients, metric=MAIN_METRIC)
    selection["chosen_epoch"] = module.history[selection["chosen_epoch"]]["epoch"]
    return selection


def resume_step(checkpoint: Path) -> int | None:
    """The training step the resume state `checkpoint` was saved at; None, said in a warning, where there is none
    or it is damaged (a copy cut short): the run then starts from scratch, as a fold of `cv` that was never begun."""
    if not checkpoint.exists():
        log.warning("--resume: no %s yet, starting from scratch", checkpoint)
        return None
    try:
        return int(torch.load(checkpoint, map_location="cpu", mmap=True, weights_only=False)["global_step"])
    except (EOFError, KeyError, OSError, RuntimeError, ValueError, pickle.UnpicklingError) as exc:
        log.warning("--resume: %s is damaged (%s): starting from scratch", checkpoint, exc)
        return None


def record_run(config: TrainConfig, data: RunData, resumed: bool) -> None:
    """Record what the run in `config.out` trains (`run.json`); a resumed one must train what its record says."""
    record = run_record(config, {"training_knees": data.train, "validation_knees": data.val})
    path = Path(config.out) / RUN_RECORD
    if not resumed:
        write_json_atomic(path, record)
        return
    check_same_run(path, record, "its last.ckpt was trained",
                   "--resume would go on training it under other settings; resume with the options it was made with "
                   f"({RUN_RECORD}), leave --resume out to train afresh, or fine-tune its weights with --init "
                   f"{Path(config.out) / 'last.safetensors'} and another --out")


def fit(config: TrainConfig, callbacks: list[Callback] | None = None, data: RunData | None = None) -> dict:
    """Train one model as `config` says; returns the summary also written to `metrics.json`. `data`: what
    `select_data(config)` selects, where the caller has it already (a protocol fold scores its held-out knees too).

    Raises:
        KLGradeError: bad data, options or teacher checkpoints.
    """
    config = replace(config, precision=resolve_precision(config.precision, config.device))  # recorded as run
    out = Path(config.out)
    out.mkdir(parents=True, exist_ok=True)
    if config.quiet:
        for name in ("lightning.pytorch", "lightning.fabric", "lightning"):
            logging.getLogger(name).setLevel(logging.WARNING)
    if config.threads:
        torch.set_num_threads(config.threads)
    L.seed_everything(config.seed, verbose=False)
    # Built first: a bad model option, --init or --teacher file is told before minutes of decoding the data.
    model = create_model(config.model, ordinal=config.ordinal, pretrained=config.init, **config.model_options)
    for teacher in config.teacher:  # loaded once the data's preprocessing is known, read here
        read_info(teacher)
    data = select_data(config) if data is None else data
    for note in data.notes:
        _say_once(note)
    resumed_step = resume_step(out / "last.ckpt") if config.resume else None
    record_run(config, data, resumed=resumed_step is not None)
    train_images = load_cached(data.train, data.preprocess, config.cache_dir)
    val_images = load_cached(data.val, data.preprocess, config.cache_dir, "validation data")
    train_labels = np.array([s.grade for s in data.train])
    val_labels = np.array([s.grade for s in data.val])

    spec = {"name": config.model, "num_classes": NUM_GRADES, "in_chans": 1, "ordinal": config.ordinal,
            "options": config.model_options}
    class_weights = inverse_frequency(train_labels, NUM_GRADES) if config.balance == "loss" else None
    info = {"model": spec, "preprocess": data.preprocess.to_dict(), "train_config": config.to_dict(),
            "data_fingerprint": cache_key(data.train + data.val, data.preprocess),
            "n_train": len(data.train), "n_val": len(data.val)}
    seen = seen_records(data, config.init, early_stopping=config.patience > 0)
    sample_weights = class_balanced_weights(train_labels, NUM_GRADES) if config.balance == "sampler" else None
    # The loaders ask the trainer for the epoch and the DDP rank when they start iterating.
    train_loader = make_loader(train_images, train_labels, config.batch_size, shuffle=True, seed=config.seed,
                               sample_weights=sample_weights,
                               epoch_source=lambda: trainer.fit_loop.epoch_progress.current.processed,
                               shard_source=lambda: (trainer.global_rank, trainer.world_size))
    val_loader = make_loader(val_images, val_labels, max(config.batch_size, 64), shuffle=False)
    processes = config.devices * config.num_nodes
    steps_per_epoch = train_loader.batch_sampler.batches_per_process(processes)
    if steps_per_epoch == 0:  # Lightning would train nothing and say so only in a warning
        raise KLGradeError(f"{len(train_labels)} training images make fewer batches of --batch-size "
                           f"{config.batch_size} than the {processes} processes (--devices x --num-nodes) that each "
                           "need one: lower --batch-size or train on more images")
    module = GradingModule(model, config, steps_per_epoch, class_weights, load_teachers(config.teacher, data.preprocess))
    exporter = ExportWeights(out, info, seen)
    resume_from = None if resumed_step is None else out / "last.ckpt"
    trainer = build_trainer(config, out, [exporter, DatasetOnDevice([train_loader, val_loader]), *(callbacks or [])],
                            resumed_step)
    with warnings.catch_warnings():
        for message in BENIGN_WARNINGS:
            warnings.filterwarnings("ignore", message=message)
        fit_interruptibly(trainer, module, train_loader, val_loader, ckpt_path=resume_from)
    summary = {"rank": trainer.global_rank, "best_epoch": exporter.best_epoch, f"best_{MAIN_METRIC}": exporter.best_score,
               "history": module.history, "config": config.to_dict(), "n_train": len(data.train), "n_val": len(data.val),
               "selection": epoch_selection(module, val_labels, [s.patient_id for s in data.val])}
    if trainer.is_global_zero:
        if summary["selection"]:  # carried by the weights it speaks for: `evaluate` on these val knees says it
            best, best_info = load_checkpoint(out / "best.safetensors")
            save_checkpoint(out / "best.safetensors", best, {**best_info, "selection": summary["selection"]})
        write_json_atomic(out / "metrics.json", summary)
    return summary
