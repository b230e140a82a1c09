"""Files that are either whole or absent: every write goes to a temporary name beside the target and is renamed.

A kill, a full disk or an exception mid-write never leaves half a checkpoint, cache or report behind, and a
reader never sees one. Also the one CSV writer of the project's tables.
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import logging
import os
from pathlib import Path
from typing import Iterator

log = logging.getLogger(__name__)


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside `path` (same suffix, so writers that infer the format still work).

    Whatever is written there replaces `path` when the block ends normally; on an exception it is removed.
    The parent folder is created when missing. An OSError that names no file (a full disk, met by a writer that
    only holds a handle) is raised again naming `path`.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{name_within(path.stem, 200)}.tmp{os.getpid()}{path.suffix}")  # a name <= 255 B
    try:
        yield temporary
        os.replace(temporary, path)
    except OSError as exc:
        if exc.filename is None and exc.errno is not None:
            raise OSError(exc.errno, exc.strerror, str(path)) from exc
        raise
    finally:
        temporary.unlink(missing_ok=True)


def name_within(name: str, limit: int) -> str:
    """`name`, whole characters dropped from its end until it takes at most `limit` bytes as a file name (a file
    system takes 255 bytes a name)."""
    while len(os.fsencode(name)) > limit:
        name = name[:-1]
    return name


def write_text_atomic(path: str | Path, text: str) -> Path:
    """UTF-8; a file name that is no UTF-8 (Linux allows any bytes) is written back as the bytes it was read as."""
    with atomic_path(path) as temporary:
        temporary.write_text(text, encoding="utf-8", errors="surrogateescape")
    return Path(path)


def write_json_atomic(path: str | Path, value) -> Path:
    return write_text_atomic(path, json.dumps(value, indent=2))


def read_json_whole(path: str | Path, then: str) -> dict | None:
    """The JSON object in `path`, a file this project wrote whole; None where there is none, or where it was
    damaged afterwards (a copy cut short, an edit): said in a warning that ends with `then`, what the caller does
    instead (makes it again, or does without)."""
    try:
        value = json.loads(Path(path).read_text())
    except FileNotFoundError:
        return None
    except (ValueError, RecursionError):  # no JSON, no UTF-8, or nested too deeply to read
        value = None
    if not isinstance(value, dict):
        log.warning("%s is damaged (a copy cut short, an edit?): %s", path, then)
        return None
    return value


WARNING_SEPARATOR = "; "
"""Joins an answer's warnings in one CSV cell."""


def rows_to_csv(rows: list[dict], columns: list[str]) -> str:
    """CSV text of `rows` with exactly `columns` (other keys ignored, missing ones empty)."""
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=columns, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return buffer.getvalue()
