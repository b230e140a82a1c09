"""Errors a user can cause. The CLI turns each into one line on stderr and a non-zero exit code."""

from pathlib import Path


class KLGradeError(Exception):
    """Base class for every error caused by input or configuration, never by a bug."""


class ImageReadError(KLGradeError):
    """An image could not be read; carries the path and a one-line reason."""

    def __init__(self, path: str | Path, reason: str):
        self.path = str(path)
        self.reason = reason
        super().__init__(f"{self.path}: {reason}")


class DataLayoutError(KLGradeError):
    """A data folder or manifest does not follow a supported layout."""


class CheckpointError(KLGradeError):
    """A checkpoint is missing, corrupt, or of another architecture than expected."""
