"""Grade many files: expand inputs, decode ahead in threads, grade in batches, write overlays.

One unreadable file yields a row with an `error` and does not stop the others.
"""

from __future__ import annotations

import glob
import logging
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Iterator

from klgrade.constants import NUM_GRADES
from klgrade.data.io import read_image
from klgrade.data.sources import is_image_file, parse_knee_name
from klgrade.errors import ImageReadError
from klgrade.infer.predictor import Predictor

log = logging.getLogger(__name__)

COLUMNS = ["path", "grade", *(f"prob_{k}" for k in range(NUM_GRADES)), "confidence", "heatmap", "error"]


def expand_inputs(inputs: list[str]) -> list[str]:
    """Files, folders (searched recursively for images) and glob patterns -> file list, in a stable order.

    A name that matches nothing is kept, so that it is reported as an error row.
    """
    paths: list[str] = []
    for item in inputs:
        path = Path(item)
        if path.is_dir():
            paths.extend(sorted(str(p) for p in path.rglob("*") if is_image_file(p)))
        elif not path.exists() and glob.has_magic(item):
            matches = sorted(glob.glob(item, recursive=True))
            paths.extend(matches or [item])
        else:
            paths.append(item)
    return paths


def _decode(path: str):
    try:
        return read_image(path), None
    except ImageReadError as exc:
        return None, exc.reason


def _save_overlay(out_dir: Path, path: str, grading) -> str:
    from klgrade.explain.gradcam import overlay

    target = out_dir / "heatmaps" / f"{Path(path).stem}_gradcam.png"
    target.parent.mkdir(parents=True, exist_ok=True)
    caption = f"KL {grading.grade}   p={grading.confidence:.2f}   {Path(path).name}"
    temporary = target.with_name(f".{target.name}.tmp{os.getpid()}.png")
    overlay(grading.image, grading.heatmap, caption).save(temporary)
    os.replace(temporary, target)
    return str(target)


def predict_paths(predictor: Predictor, paths: list[str], explain: bool = False, out_dir: Path | None = None,
                  batch_size: int = 16, workers: int = 2) -> Iterator[dict]:
    """One result row per path (keys: `COLUMNS`), in input order."""
    with ThreadPoolExecutor(max_workers=workers) as pool:
        for start in range(0, len(paths), batch_size):
            chunk = paths[start:start + batch_size]
            decoded = list(pool.map(_decode, chunk))
            good = [i for i, (image, _) in enumerate(decoded) if image is not None]
            gradings = predictor.grade_arrays([decoded[i][0] for i in good], [parse_knee_name(chunk[i])[1] for i in good],
                                              explain=explain) if good else []
            by_index = dict(zip(good, gradings))
            for i, path in enumerate(chunk):
                row = {"path": path}
                if i not in by_index:
                    row["error"] = decoded[i][1]
                    yield row
                    continue
                grading = by_index[i]
                row.update({"grade": grading.grade, "confidence": round(grading.confidence, 6)})
                row.update({f"prob_{k}": round(p, 6) for k, p in enumerate(grading.probabilities)})
                if explain and out_dir is not None:
                    row["heatmap"] = _save_overlay(out_dir, path, grading)
                yield row
