"""Errors a user can cause, and the stop the system can ask for. The CLI turns each into one line on stderr and a
non-zero exit code."""

import signal
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


class Terminated(SystemExit):
    """SIGTERM (`kill`, a batch scheduler's time limit) raised where the process is, so that it stops as Ctrl-C stops
    it: `finally` blocks run (no temporary file is left), a training stops at once, and the exit status is 143.
    Lightning's own handler only stopped a training at the end of its step and exited 0, as if it had finished."""

    def __init__(self):
        super().__init__(128 + signal.SIGTERM)


def stop_on_sigterm() -> None:
    """Make SIGTERM raise `Terminated` in this process (the CLI's, and each fold worker's of `reproduce --jobs`)."""

    def terminated(signum, frame):
        raise Terminated()

    signal.signal(signal.SIGTERM, terminated)
