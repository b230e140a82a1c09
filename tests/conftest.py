"""Shared fixtures: the real kneeKL224 data (skipped when absent) and small images written on the fly."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
DATA = (REPO / ".." / "shared" / "data" / "kneeKL224").resolve()


@pytest.fixture(scope="session")
def kneekl224() -> Path:
    if not (DATA / "train").is_dir():
        pytest.skip(f"kneeKL224 not found at {DATA}")
    return DATA


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("KLGRADE_CACHE_DIR", str(tmp_path_factory.getbasetemp() / "cache"))


def knee_image(seed: int = 0, size: int = 64) -> np.ndarray:
    """A synthetic grey image with structure (not a radiograph; for I/O tests only)."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:size, 0:size]
    return (128 + 60 * np.sin(x / 5.0 + seed) + rng.normal(0, 10, (size, size))).clip(0, 255).astype(np.uint8)


def copy_real_images(source: Path, target: Path, per_grade: int, split: str = "val") -> list[Path]:
    """Copy `per_grade` real kneeKL224 images of each grade into `target/<grade>/`."""
    copied = []
    for grade in range(5):
        folder = target / str(grade)
        folder.mkdir(parents=True, exist_ok=True)
        for path in sorted((source / split / str(grade)).iterdir())[:per_grade]:
            destination = folder / path.name
            destination.write_bytes(path.read_bytes())
            copied.append(destination)
    return copied


def run_cli(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    """Run the installed `klgrade` command as a user would."""
    return subprocess.run([sys.executable, "-m", "klgrade", *args], capture_output=True, text=True, timeout=timeout)


def save(image: Image.Image, path: Path, **kwargs) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path, **kwargs)
    return path


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory) -> Path:
    """An untrained small msa_net checkpoint (64 px): exercises every code path in a fraction of a second."""
    import torch

    from klgrade.models import create_model, save_checkpoint

    torch.manual_seed(0)
    options = {"width": 32, "heads": 2}
    model = create_model("msa_net", **options)
    info = {"model": {"name": "msa_net", "num_classes": 5, "in_chans": 1, "ordinal": False, "options": options},
            "preprocess": {"size": 64, "clip_percentiles": [0.5, 99.5], "clahe": False, "canonical_side": False},
            "val_metrics": {"accuracy": 0.2}}
    return save_checkpoint(tmp_path_factory.mktemp("tiny") / "tiny.safetensors", model, info)


EXAMPLES = REPO / "examples"
