"""Helpers shared by the benchmark scripts: machine facts, a timer, and cross-fitted grade sets."""

from __future__ import annotations

import os
import platform
import time

import numpy as np
import torch

from klgrade.metrics import fit_temperature
from klgrade.uncertainty import apply_temperature, conformal_scores, grade_sets, grade_thresholds, log_probabilities


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


def fitted_sets(fit_probabilities: np.ndarray, fit_labels: np.ndarray, probabilities: np.ndarray,
                alpha: float) -> tuple[float, list[list[int]]]:
    """`klgrade calibrate`'s grade sets fitted on one labelled set of uncalibrated probabilities (temperature, then
    a conformal threshold per grade) and applied to others: (temperature, sets)."""
    temperature = fit_temperature(log_probabilities(fit_probabilities), fit_labels)
    scores = conformal_scores(apply_temperature(fit_probabilities, temperature), fit_labels)
    return temperature, grade_sets(apply_temperature(probabilities, temperature),
                                   grade_thresholds(scores, fit_labels, alpha))
