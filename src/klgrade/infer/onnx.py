"""ONNX export and an ONNX Runtime model with the same interface as the torch one (logits out).

The klgrade checkpoint metadata travels inside the ONNX file (`metadata_props["klgrade"]`), so an exported
model keeps its preprocessing. `OnnxModel.from_path` accepts a `.onnx` file, or a safetensors checkpoint
that it exports once into the cache folder.
"""

from __future__ import annotations

import hashlib
import json
import logging
import tempfile
import warnings
from pathlib import Path

import numpy as np
import torch

from klgrade.data.cache import default_cache_dir
from klgrade.errors import CheckpointError
from klgrade.files import atomic_path
from klgrade.models import features_and_logits, load_checkpoint
from klgrade.models.weights import calibration_fits, parse_info, read_info, require_weights_file

log = logging.getLogger(__name__)

OPSET = 18
INPUT_NAME, OUTPUTS = "image", ("logits", "features")
"""ONNX graphs give the logits and the penultimate features (for the gradability check)."""
EXPORT_FORMAT = 2
"""Part of the cached export's name: exports of an older layout (logits only) are not reused."""


class LogitsAndFeatures(torch.nn.Module):
    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return features_and_logits(self.model, x)


def export_onnx(checkpoint: str | Path, out: str | Path) -> Path:
    """Export a checkpoint to ONNX (dynamic batch, fixed side), atomically, with klgrade metadata (its
    calibration included)."""
    import onnx

    model, info = load_checkpoint(checkpoint)
    if not calibration_fits(checkpoint, info):  # the export would carry it on to weights it was not fitted on
        log.warning("%s holds other weights than its calibration was fitted on: exported uncalibrated; run `klgrade "
                    "calibrate` on it, then export again", checkpoint)
        del info["calibration"]
    side = info["preprocess"]["size"]
    example = torch.zeros(1, 1, side, side)
    with atomic_path(out) as temporary, warnings.catch_warnings():
        # The TorchScript exporter (dynamo=False) warns that it is legacy, and tracing warns about a shape assert
        # in timm's positional encoding that holds for every input of the fixed side: noise on a clean export.
        warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)
        warnings.filterwarnings("ignore", category=DeprecationWarning)
        torch.onnx.export(LogitsAndFeatures(model), (example,), str(temporary), input_names=[INPUT_NAME],
                          output_names=list(OUTPUTS), dynamic_axes={name: {0: "batch"} for name in (INPUT_NAME, *OUTPUTS)},
                          opset_version=OPSET, dynamo=False)
        proto = onnx.load(str(temporary))
        entry = proto.metadata_props.add()
        entry.key, entry.value = "klgrade", json.dumps(info)
        onnx.save(proto, str(temporary))
    return Path(out)


class OnnxModel:
    """ONNX Runtime session on CPU; `run(x)` maps (B, 1, H, W) float32 to (B, 5) logits."""

    def __init__(self, path: Path, threads: int | None = None):
        import onnxruntime as ort

        require_weights_file(Path(path), "ONNX model")  # ONNX Runtime opening a pipe waited for a writer for good
        options = ort.SessionOptions()
        if threads:
            options.intra_op_num_threads = threads
        try:
            self.session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        except Exception as exc:  # onnxruntime raises its own exception types for bad files
            raise CheckpointError(f"{path}: cannot load ONNX model ({exc})") from None
        metadata = self.session.get_modelmeta().custom_metadata_map
        if "klgrade" not in metadata:
            raise CheckpointError(f"{path}: ONNX file without klgrade metadata (export it with klgrade export-onnx)")
        self.info = parse_info(metadata["klgrade"], path)

    @classmethod
    def from_path(cls, path: str | Path, threads: int | None = None) -> "OnnxModel":
        path = Path(path)
        if path.suffix == ".onnx":
            return cls(path, threads)
        read_info(path)  # a clear error for a missing or foreign checkpoint before exporting
        digest = hashlib.sha256(path.read_bytes()).hexdigest()[:20]
        exported = default_cache_dir() / "onnx" / f"{path.stem}-{digest}-v{EXPORT_FORMAT}.onnx"
        if exported.exists():
            return cls(exported, threads)
        log.info("exporting %s to %s", path, exported)
        try:
            export_onnx(path, exported)
        except OSError as exc:  # a read-only home or container: the session holds the model once it is loaded
            log.warning("%s: the ONNX export cannot be kept there (%s; set KLGRADE_CACHE_DIR to a folder that can be "
                        "written): exported for this run only", exported.parent, exc.strerror or exc)
            with tempfile.TemporaryDirectory() as folder:
                return cls(export_onnx(path, Path(folder) / exported.name), threads)
        return cls(exported, threads)

    def run(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(B, 1, H, W) float32 -> logits (B, 5) and penultimate features (B, D)."""
        logits, features = self.session.run(list(OUTPUTS), {INPUT_NAME: np.ascontiguousarray(x, dtype=np.float32)})
        return logits, features
