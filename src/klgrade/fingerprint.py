"""What computed a stored result: klgrade's own source, so that a result stored by other code (an upgrade, a fix) is
computed again instead of read back as this code's."""

from __future__ import annotations

import functools
import hashlib
from pathlib import Path

PACKAGE = Path(__file__).parent


@functools.cache
def source_digest(root: Path = PACKAGE) -> str:
    """A digest of the Python source under `root` (a folder of klgrade, all of it by default): each file's path
    relative to `root` and its bytes. Read once per process (~1 ms for the whole package)."""
    digest = hashlib.sha256()
    for path in sorted(root.rglob("*.py")):
        digest.update(f"{path.relative_to(root).as_posix()}\0{path.stat().st_size}\0".encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()[:20]
