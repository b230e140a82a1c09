"""Shared fixtures: the real kneeKL224 data (skipped when absent), an isolated cache, a tiny checkpoint."""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest

from helpers import DATA, copy_real_images, invoke_cli, save_msa_net


def pytest_configure(config):
    """Under pytest-xdist each worker (and every CLI it starts) computes on one thread: two workers on two cores
    keep both busy through the start-ups and file work between the computing, without fighting over the cores."""
    if os.environ.get("PYTEST_XDIST_WORKER"):
        os.environ["OMP_NUM_THREADS"] = "1"
        import torch

        torch.set_num_threads(1)


@pytest.fixture(scope="session")
def kneekl224() -> Path:
    if not (DATA / "train").is_dir():
        pytest.skip(f"kneeKL224 not found at {DATA}")
    return DATA


@pytest.fixture(autouse=True)
def _torch_threads_kept():
    """Training with `threads` set changes torch's threads for the whole process: a worker left on two threads beside
    the other worker's one oversubscribed the cores for every later test (the suite's trainings ran 5-9x slower)."""
    import torch

    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("KLGRADE_CACHE_DIR", str(tmp_path_factory.getbasetemp() / "cache"))


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory) -> Path:
    """An untrained small msa_net checkpoint (64 px): exercises every code path in a fraction of a second."""
    import torch

    from klgrade.models import create_model

    torch.manual_seed(0)
    options = {"width": 32, "heads": 2}
    return save_msa_net(tmp_path_factory.mktemp("tiny") / "tiny.safetensors", create_model("msa_net", **options),
                        options, size=64)


@pytest.fixture(scope="session")
def calibrated(tiny_checkpoint, kneekl224, tmp_path_factory):
    """The tiny checkpoint calibrated on 10 val images per grade (enough for 90% grade sets of every grade), its
    density fitted on 12 train images per grade."""
    root = tmp_path_factory.mktemp("calibration")
    copy_real_images(kneekl224, root / "val", 10, split="val")
    copy_real_images(kneekl224, root / "train", 12, split="train")
    out = root / "calibrated.safetensors"
    result = invoke_cli("calibrate", "--checkpoint", str(tiny_checkpoint), "--data", str(root), "--out", str(out))
    assert result.returncode == 0, result.stderr[-2000:]
    assert "temperature" in result.stdout
    # n knees per grade certify sets down to alpha = 1 / (n + 1).
    assert "KL 0-4: 10 / 10 / 10 / 10 / 10; grade sets certified for every grade at alpha >= 0.091" in result.stdout
    assert "too few" not in result.stderr and "framing warnings below crop share" in result.stdout
    assert re.search(r"feature density from \d+ images \(\d+ more looked inverted: left out\)", result.stdout)
    return out
