"""Weights in safetensors (no pickle) with the model's own description in the file's metadata.

A checkpoint file rebuilds its architecture: `{"model": {"name", "num_classes", "in_chans", "ordinal",
"options"}, "preprocess": {...}, ...}` is stored as JSON under the metadata key `klgrade`, beside any
training facts (metrics, data fingerprint, recipe).
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import struct
from pathlib import Path
from typing import BinaryIO

import torch
import torch.nn as nn
from safetensors import SafetensorError
from safetensors.torch import load_file, safe_open, save, save_file

from klgrade.data.io import regular_file_problem
from klgrade.errors import CheckpointError
from klgrade.files import atomic_path

METADATA_KEY = "klgrade"
_FLOAT_DTYPES = {"F16": torch.float16, "BF16": torch.bfloat16, "F32": torch.float32, "F64": torch.float64}
FORMAT = "klgrade-weights-1"
MAX_HEADER_BYTES = 100_000_000
"""The largest safetensors header the format allows (its own readers refuse more)."""


def checkpoint_tensors(model: nn.Module, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """The tensors a checkpoint of `model` holds: on the CPU, contiguous, the floating ones in `dtype` if given."""
    tensors = {}
    for key, tensor in model.state_dict().items():
        tensor = tensor.detach().to("cpu").contiguous()
        tensors[key] = tensor.to(dtype) if dtype is not None and tensor.is_floating_point() else tensor
    return tensors


def save_checkpoint(path: str | Path, model: nn.Module, info: dict, dtype: torch.dtype | None = None) -> Path:
    """Atomically write `model`'s weights and `info` (must hold `info["model"]`, the create_model spec).

    Args:
        dtype: store floating tensors in this dtype (e.g. torch.float16 to halve a shipped file).
    """
    if "model" not in info or "name" not in info["model"]:
        raise ValueError("info['model'] must describe the architecture (name, options, ...)")
    path = Path(path)
    with atomic_path(path) as temporary:
        save_file(checkpoint_tensors(model, dtype), str(temporary),
                  metadata={METADATA_KEY: json.dumps({"format": FORMAT, **info})})
        os.chmod(temporary, 0o644)  # safetensors creates owner-only files; checkpoints are meant to be shared
    return path


def require_weights_file(path: Path, what: str = "checkpoint") -> None:
    """Refuse a path that is no regular file before it is opened (opening a pipe waits for a writer), in words: a run
    folder is told which checkpoints it holds.

    Raises:
        CheckpointError: missing, a folder, a pipe or device, a broken link.
    """
    if path.is_dir():
        saved = " or ".join(name for name in ("best.safetensors", "last.safetensors") if (path / name).is_file())
        article = "an" if what[0].lower() in "aeiou" else "a"
        raise CheckpointError(f"{path}: a folder, not {article} {what}" + (f" (give its {saved})" if saved else ""))
    if not path.exists() and not path.is_symlink():
        raise CheckpointError(f"{path}: {what} not found")
    problem = regular_file_problem(path)
    if problem is not None:
        raise CheckpointError(f"{path}: {problem}")


def read_info(path: str | Path) -> dict:
    """The metadata of a checkpoint, without loading tensors."""
    path = Path(path)
    require_weights_file(path)
    if path.suffix.lower() == ".ckpt":
        raise CheckpointError(f"{path}: a training state (what `train --resume` continues from), not a checkpoint: "
                              "give the best.safetensors or last.safetensors beside it")
    if path.suffix.lower() == ".onnx":
        raise CheckpointError(f"{path}: an ONNX model, not a safetensors checkpoint (predict, evaluate and serve take it "
                              "with --backend onnx)")
    try:
        with safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata() or {}
    except (SafetensorError, OSError) as exc:
        raise CheckpointError(f"{path}: not a safetensors checkpoint ({exc})") from None
    if METADATA_KEY not in metadata:
        raise CheckpointError(f"{path}: safetensors file without klgrade metadata (not a klgrade checkpoint)")
    return parse_info(metadata[METADATA_KEY], path)


def parse_info(text: str, path: Path) -> dict:
    """The klgrade metadata a weights file (safetensors or ONNX) carries as JSON text, checked to name its model.

    Raises:
        CheckpointError: no JSON, nested too deeply to read, or no `model.name`.
    """
    try:
        info = json.loads(text)
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{path}: klgrade metadata is not valid JSON ({exc.msg}, character {exc.pos})") from None
    except RecursionError:
        raise CheckpointError(f"{path}: klgrade metadata is not valid JSON (nested too deeply)") from None
    if not isinstance(info, dict) or not isinstance(info.get("model"), dict) or not isinstance(
            info["model"].get("name"), str):
        raise CheckpointError(f"{path}: klgrade metadata does not name the model's architecture (model.name)")
    return info


def weights_digest(path: str | Path) -> str:
    """A digest of the tensors a safetensors file holds (their names, dtypes, shapes and bytes; not the metadata): a
    calibration records it, so that it is known for the calibration of these weights and of no others.

    Raises:
        CheckpointError: the file cannot be read as safetensors.
    """
    require_weights_file(Path(path), "weights file")
    try:
        with open(path, "rb") as handle:
            return _safetensors_digest(handle)
    except (OSError, struct.error, ValueError, AttributeError, RecursionError) as exc:
        raise CheckpointError(f"{path}: not a readable safetensors file ({exc})") from None


def tensors_digest(tensors: dict[str, torch.Tensor]) -> str:
    """`weights_digest` of a checkpoint that holds `tensors` (`checkpoint_tensors`), before it is written: a
    calibration goes into the file it is fitted for in one write."""
    return _safetensors_digest(io.BytesIO(save(tensors)))


def _safetensors_digest(handle: BinaryIO) -> str:
    (length,) = struct.unpack("<Q", handle.read(8))
    if length > MAX_HEADER_BYTES:  # another file's first bytes: read as a length they would ask for terabytes
        raise ValueError(f"a header of {length} bytes")
    header = json.loads(handle.read(length))
    header.pop("__metadata__", None)
    hasher = hashlib.blake2b(json.dumps(header, sort_keys=True).encode(), digest_size=16)
    while chunk := handle.read(1 << 20):
        hasher.update(chunk)
    return hasher.hexdigest()


def calibration_fits(path: str | Path, info: dict) -> bool:
    """False where the calibration in `info` records other weights than the file at `path` holds (they were changed
    after `klgrade calibrate`, e.g. fine-tuned and saved with the old metadata); True where it records these, or
    none (a calibration written before weights were recorded)."""
    recorded = (info.get("calibration") or {}).get("weights")
    return recorded is None or recorded == weights_digest(path)


def stored_dtype(path: str | Path) -> torch.dtype:
    """The dtype of a checkpoint's floating tensors (e.g. float16 for the shipped model), to write it back alike."""
    with safe_open(str(path), framework="pt") as handle:
        for key in handle.keys():
            dtype = _FLOAT_DTYPES.get(handle.get_slice(key).get_dtype())
            if dtype is not None:
                return dtype
    return torch.float32


def load_checkpoint(path: str | Path, expect_model: str | None = None) -> tuple[nn.Module, dict]:
    """Rebuild the model stored in `path` and load its weights (float32, eval mode).

    Raises:
        CheckpointError: missing/corrupt file, or its architecture is not `expect_model` / does not match.
    """
    from klgrade.models.registry import create_model

    info = read_info(path)
    spec = info["model"]
    if expect_model is not None and spec["name"] != expect_model:
        raise CheckpointError(f"{path}: checkpoint holds a '{spec['name']}' model, not '{expect_model}'")
    with torch.device("meta"):  # shapes only: no random initialisation of weights the file replaces
        model = create_model(spec["name"], num_classes=spec.get("num_classes", 5), in_chans=spec.get("in_chans", 1),
                             ordinal=spec.get("ordinal", False), **spec.get("options", {}))
    # Each tensor in memory of its own: views into the file's buffer compute some convolutions ~1e-7 differently.
    state = {k: v.to(torch.float32 if v.is_floating_point() else v.dtype, copy=True)
             for k, v in load_file(str(path)).items()}
    try:
        model.load_state_dict(state, strict=True, assign=True)
    except RuntimeError as exc:
        first = str(exc).strip().splitlines()[0]
        raise CheckpointError(f"{path}: weights do not fit the '{spec['name']}' architecture ({first})") from None
    return model.eval(), info
