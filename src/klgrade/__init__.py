"""klgrade: Kellgren-Lawrence grading of knee radiographs, with Grad-CAM evidence.

The public Python API: `grade` (one radiograph -> `Grading`), `grade_many` (many, batched), `load_model`
(a `Predictor` for given checkpoints or the shipped model), and the errors a caller catches (`KLGradeError`
and its kinds). The `klgrade` command and the HTTP service are thin shells over the same functions.

Attributes resolve lazily (PEP 562), so `import klgrade` stays cheap until a model is needed.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

__version__ = "0.1.0"

_EXPORTS = {
    "grade": "klgrade.infer.grading",
    "grade_many": "klgrade.infer.grading",
    "load_model": "klgrade.infer.grading",
    "NamedBytes": "klgrade.infer.grading",
    "Grading": "klgrade.infer.predictor",
    "Predictor": "klgrade.infer.predictor",
    "KLGradeError": "klgrade.errors",
    "ImageReadError": "klgrade.errors",
    "CheckpointError": "klgrade.errors",
    "DataLayoutError": "klgrade.errors",
}

__all__ = ["__version__", *_EXPORTS]

if TYPE_CHECKING:  # for editors and type checkers; at run time the names load on first use
    from klgrade.errors import CheckpointError, DataLayoutError, ImageReadError, KLGradeError
    from klgrade.infer.grading import NamedBytes, grade, grade_many, load_model
    from klgrade.infer.predictor import Grading, Predictor


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'klgrade' has no attribute '{name}'")
    value = getattr(importlib.import_module(_EXPORTS[name]), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(__all__)
