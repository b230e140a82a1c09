"""Fold trainings of many variants, several at once on one device, in dependency order, within a time budget.

One fold training rarely keeps a GPU busy: small models at small resolutions leave it waiting on Python between
kernels. Running `workers` trainings side by side in separate processes fills those gaps (the process is the
unit, so CUDA, Lightning and the RNGs of one training never meet another's). A job waits for the jobs it
needs (a distilled student for its teachers of the same fold). No job starts after the deadline; finished
folds stay on disk, so a rerun continues with the rest.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import time
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from dataclasses import dataclass, replace
from pathlib import Path

from klgrade.errors import stop_on_sigterm
from klgrade.experiments.cv import fold_dir, fold_done, fold_model, run_fold
from klgrade.files import write_json_atomic
from klgrade.train.config import TrainConfig

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class FoldJob:
    """Train fold `fold` of the CV in `config.out`, distilled from `teachers` (run folder, fold) when given.

    The job starts once its teachers' folds have finished.
    """

    config: TrainConfig
    fold: int
    teachers: tuple[tuple[str, int], ...] = ()

    @property
    def name(self) -> str:
        return f"{Path(self.config.out).name} fold {self.fold}"

    def done(self) -> bool:
        return fold_done(self.config.out, self.fold)

    def ready(self) -> bool:
        return all(fold_done(out, fold) for out, fold in self.teachers)


def train_fold_job(job: FoldJob) -> str:
    """Worker entry point (module level, so a spawned process can import it); records `timing.json` beside
    the fold's run (wall-clock start and end, process), which the protocol's wall time is read from."""
    started = time.time()
    teachers = [str(fold_model(out, fold)) for out, fold in job.teachers] or job.config.teacher
    run_fold(replace(job.config, teacher=teachers), job.fold)
    finished = time.time()
    write_json_atomic(fold_dir(job.config.out, job.fold) / "timing.json",
                      {"started": started, "finished": finished, "seconds": finished - started, "pid": os.getpid()})
    log.info("%s finished in %.0f s", job.name, finished - started)
    return job.name


def _run_here(job: FoldJob) -> Future:
    """The one-worker case: train in this process and hand back an already finished future."""
    future: Future = Future()
    try:
        future.set_result(train_fold_job(job))
    except BaseException as exc:  # re-raised by `result()`, as a pool's future would
        future.set_exception(exc)
    return future


def threads_per_job(workers: int) -> int:
    """CPU threads for each of `workers` concurrent trainings: the cores shared out, at least one each."""
    return max(1, (os.cpu_count() or 1) // workers)


def run_fold_jobs(jobs: list[FoldJob], workers: int = 1, deadline: float | None = None) -> list[FoldJob]:
    """Run the unfinished jobs, up to `workers` at a time; returns the jobs still unfinished.

    Args:
        deadline: `time.monotonic()` value after which no job starts (running ones finish).

    Raises:
        Whatever a job raised (after the running ones have finished).
    """
    pending = [job for job in jobs if not job.done()]
    if workers > 1:
        pending = [replace(job, config=replace(job.config, threads=job.config.threads or threads_per_job(workers)))
                   for job in pending]
    pool = ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"),
                               initializer=stop_on_sigterm) if workers > 1 else None
    running: dict[Future, FoldJob] = {}
    try:
        while pending or running:
            in_time = deadline is None or time.monotonic() <= deadline
            for job in [job for job in pending if in_time and job.ready()][: workers - len(running)]:
                pending.remove(job)
                log.info("start %s", job.name)
                running[pool.submit(train_fold_job, job) if pool else _run_here(job)] = job
            if not running:  # out of time, or nothing left whose needs can be met
                break
            finished, _ = wait(running, return_when=FIRST_COMPLETED)
            for future in finished:
                running.pop(future)
                future.result()
    except (KeyboardInterrupt, SystemExit):  # Ctrl-C or SIGTERM (`Terminated`) here: the workers' trainings stop too,
        for worker in multiprocessing.active_children():  # as they would not until done when only this process was
            worker.terminate()                             # told (their finished folds stay; a rerun continues)
        raise
    finally:
        if pool is not None:
            pool.shutdown(wait=True, cancel_futures=True)
    return [job for job in jobs if not job.done()]
