"""What a run folder's training is made of, recorded beside it so that continuing it with other options or knees is
refused instead of mixed in: a resumed `train` (`run.json`) and a CV run whose finished folds are read back
(`cv_run.json`)."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from klgrade.data.sources import Sample
from klgrade.errors import CheckpointError, KLGradeError
from klgrade.files import read_json_whole, write_json_atomic
from klgrade.models.weights import weights_digest
from klgrade.train.config import TrainConfig

RUNTIME_OPTIONS = frozenset({"data", "out", "fold", "resume", "quiet", "threads", "device", "precision", "cache_dir"})
"""Training options that change where and how fast a run trains, not what it trains on which knees (`fold` picks
knees: the knees' record holds it)."""
CONFIG_FILE_OPTIONS = frozenset({"weight_decay", "warmup_epochs", "schedule", "clahe", "canonical_side", "augment",
                                 "domain"})
"""Training options that only a `--config` YAML file sets (no flag of their own)."""
WEIGHT_OPTIONS = ("init", "teacher")
"""Options naming weights files: recorded by the weights they hold, so that moving the folders keeps the record and
weights trained again under the same name change it."""


def run_record(config: TrainConfig, knees: dict[str, list[Sample]]) -> dict:
    """The options of `config` that shape the training, and each named set of `knees` (each knee's path below the
    data's folder, grade, patient and side: the same after the data is copied elsewhere), as stored in JSON."""
    root = Path(config.data) if Path(config.data).is_dir() else Path(config.data).parent
    options = {key: value for key, value in config.to_dict().items() if key not in RUNTIME_OPTIONS}
    for key in WEIGHT_OPTIONS:
        options[key] = _weights_identity(options[key])
    record = {"options": options}
    for name, samples in knees.items():
        listed = sorted([os.path.relpath(s.path, root), s.grade, s.patient_id, s.side or ""] for s in samples)
        record[name] = {"n": len(samples), "digest": hashlib.sha256(json.dumps(listed).encode()).hexdigest()[:20]}
    return json.loads(json.dumps(record))  # as stored


def _weights_identity(value: str | list[str] | None) -> str | list[str] | None:
    """The digest of the weights a file (or each of a list) holds; the path itself where it is no safetensors file."""
    if isinstance(value, list):
        return [_weights_identity(path) for path in value]
    try:
        return value if value is None else weights_digest(value)
    except CheckpointError:
        return value


def check_same_run(path: Path, record: dict, made: str, remedy: str) -> None:
    """Refuse to go on with the run whose record is `path` when it was made of other options or knees than
    `record`; write `record` there where nothing is recorded yet.

    Args:
        made: what was made with the recorded options, for the message (e.g. "its folds were made").
        remedy: what going on would do, and what to do instead.

    Raises:
        KLGradeError: naming what changed.
    """
    stored = read_json_whole(path, "recorded again")
    if stored == record:
        return
    if stored is not None:
        before = stored.get("options", {})
        changed = [option_name(key) for key, value in record["options"].items() if before.get(key) != value]
        changed += [name.replace("_", " ") for name in record if name != "options" and stored.get(name) != record[name]]
        raise KLGradeError(f"{path.parent}: {made} with other {', '.join(changed) or 'settings'} than now (the data or "
                           f"the options changed since?): {remedy}")
    write_json_atomic(path, record)


def option_name(key: str) -> str:
    """A training option as the user gave it: its flag, or its key in the `--config` file."""
    if key in CONFIG_FILE_OPTIONS:
        return f"{key} (--config)"
    return "--option" if key == "model_options" else f"--{key.replace('_', '-')}"
