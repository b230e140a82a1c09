"""Helpers shared by the benchmark scripts: machine facts, a timer, and halving a labelled set by patient."""

from __future__ import annotations

import os
import platform
import time

import numpy as np
import torch


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as handle:
            cpu = next(line.split(":", 1)[1].strip() for line in handle if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    return f"{cpu}, {os.cpu_count()} cores, torch {torch.__version__}, {torch.get_num_threads()} torch threads, {gpu}"


def per_second(function, count: int, repeats: int = 3, warmup: int = 1) -> float:
    """Best-of-`repeats` rate of `function()` processing `count` items."""
    for _ in range(warmup):
        function()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        function()
        best = min(best, time.perf_counter() - start)
    return count / best


def latency_ms(function, repeats: int = 20, warmup: int = 3) -> float:
    """Median latency of `function()` in milliseconds."""
    for _ in range(warmup):
        function()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        function()
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2] * 1000


def patient_halves(patients: list[str], seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Indices of the images of a random half of the patients, and of the rest (no patient in both)."""
    unique = sorted(set(patients))
    first = set(np.random.default_rng(seed).permutation(unique)[: len(unique) // 2])
    in_first = np.array([patient in first for patient in patients])
    return np.flatnonzero(in_first), np.flatnonzero(~in_first)

