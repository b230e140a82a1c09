"""`klgrade predict`: inputs (files, folders, globs, or `-`: an image piped in) -> one result row each, with overlays
written beside.

One unreadable file yields a row with an `error` and does not stop the others.
"""

from __future__ import annotations

import glob
import logging
from collections import Counter
from pathlib import Path
from typing import BinaryIO, Iterator

from klgrade.constants import NUM_GRADES
from klgrade.data.io import MAX_FILE_BYTES, is_heatmap_file
from klgrade.data.sources import files_below, not_read_warning
from klgrade.errors import ImageReadError
from klgrade.explain.gradcam import overlay, save_overlay_png
from klgrade.files import atomic_path, name_within
from klgrade.infer.grading import NamedBytes, grade_many
from klgrade.infer.predictor import Grading, Predictor
from klgrade.uncertainty import set_label

log = logging.getLogger(__name__)

COLUMNS = ["path", "grade", *(f"prob_{k}" for k in range(NUM_GRADES)), "confidence", "grade_set", "gradable",
           "warnings", "heatmap", "error"]
OVERLAY_SUFFIX = "_gradcam.png"
"""How the names of the overlays `predict --explain` writes end."""
STDIN = "-"
"""The input that stands for standard input: an image piped in from another program (`dcmj2pnm ... | klgrade predict
-`); a file named `-` is `./-`."""
STDIN_STEM = "stdin"
"""The stem of its overlay's name (a file name that starts with `-` reads as an option to other programs)."""


def expand_inputs(inputs: list[str]) -> list[str]:
    """Files, folders (searched recursively for images; other files, and the overlays an earlier `predict --explain`
    wrote into them, are counted in a warning) and glob patterns -> file list, in a stable order.

    A name that matches nothing is kept, so that it is reported as an error row.
    """
    paths: list[str] = []
    for item in inputs:
        path = Path(item)
        if path.is_dir():
            problems: list[ImageReadError] = []
            images, others = files_below(path, problems)
            overlays = {image for image, _ in images if image.endswith(OVERLAY_SUFFIX) and is_heatmap_file(Path(image))}
            paths.extend(image for image, _ in images if image not in overlays)
            for problem in problems:
                log.warning("left out %s", problem)
            if others:  # said, as `find_samples` says it
                log.warning(not_read_warning(path, others))
            if overlays:
                log.warning("%s: left out %d Grad-CAM overlay(s) an earlier `klgrade predict --explain` wrote, e.g. %s",
                            path, len(overlays), min(overlays))
        elif not path.exists() and glob.has_magic(item):
            matches = sorted(glob.glob(item, recursive=True))
            paths.extend(matches or [item])
        else:
            paths.append(item)
    return paths


HEATMAP_STEM_BYTES = 150
"""Most bytes of an input's name kept in its overlay's name: a file system takes 255 per name, and a 248-byte input
name plus `_gradcam.png` (and the temporary name it is written under) stopped `predict --explain`."""


def heatmap_names(paths: list[str]) -> list[str]:
    """A distinct overlay file name per input: `<stem>_gradcam.png`, the stem cut to `HEATMAP_STEM_BYTES`, with the
    input's index where (cut) stems repeat."""
    stems = [STDIN_STEM if p == STDIN else name_within(Path(p).stem, HEATMAP_STEM_BYTES) for p in paths]
    repeated = {stem for stem, count in Counter(stems).items() if count > 1}
    return [f"{stem}_{i}{OVERLAY_SUFFIX}" if stem in repeated else f"{stem}{OVERLAY_SUFFIX}"
            for i, stem in enumerate(stems)]


def caption(grading: Grading) -> str:
    """The overlay's caption: grade, confidence and grade set; the file name; then one line per warning."""
    first = [f"KL {grading.grade}", f"p={grading.confidence:.2f}"]
    if grading.coverage is not None:
        first.append(f"set KL {set_label(grading.grade_set)} ({grading.coverage:.0%})")
    name = [Path(grading.name).name] if grading.name else []
    return "\n".join(["   ".join(first), *name, *(f"! {w}" for w in grading.warnings)])


def remove_earlier_heatmaps(out_dir: Path, rows: list[dict]) -> int:
    """Delete the heatmaps in `out_dir/heatmaps` that this run's `rows` do not name and klgrade wrote (marked PNGs):
    beside a new `predictions.csv` they would pass for its heatmaps, of images graded anew by another model, left
    out now, or unreadable now. Returns how many were deleted; other files are left alone."""
    kept = {Path(row["heatmap"]) for row in rows if row.get("heatmap")}
    folder = Path(out_dir) / "heatmaps"
    earlier = [path for path in sorted(folder.glob("*.png")) if path not in kept and is_heatmap_file(path)]
    for path in earlier:
        path.unlink(missing_ok=True)
    return len(earlier)


def save_overlay(target: Path, grading: Grading) -> str:
    with atomic_path(target) as temporary:
        save_overlay_png(overlay(grading.image, grading.heatmap, caption(grading)), temporary)
    return str(target)


def result_row(grading: Grading) -> dict:
    return {"path": grading.name, "grade": grading.grade,
            **{f"prob_{k}": round(p, 6) for k, p in enumerate(grading.probabilities)},
            "confidence": round(grading.confidence, 6), "grade_set": set_label(grading.grade_set),
            "gradable": grading.gradable, "warnings": list(grading.warnings)}


def predict_paths(predictor: Predictor, paths: list[str], explain: bool = False, out_dir: Path | None = None,
                  batch_size: int = 16, workers: int = 2, alpha: float | None = None,
                  stdin: BinaryIO | None = None) -> Iterator[dict]:
    """One result row per path (keys: `COLUMNS`), in input order; `STDIN` among them is read from `stdin`, at most
    one byte past `MAX_FILE_BYTES` (more is refused by its size, as a larger file is)."""
    names = heatmap_names(paths)
    sources = [NamedBytes(stdin.read(MAX_FILE_BYTES + 1), STDIN) if path == STDIN and stdin is not None else path
               for path in paths]
    results = grade_many(predictor, sources, explain, batch_size, workers, alpha)
    for path, name, result in zip(paths, names, results):
        if not isinstance(result, Grading):
            yield {"path": path, "error": result.reason}
            continue
        row = result_row(result)
        if explain and out_dir is not None:
            row["heatmap"] = save_overlay(Path(out_dir) / "heatmaps" / name, result)
        yield row
