"""Fold trainings run side by side in processes, in teacher order, within a deadline."""

import json
import time

from klgrade.experiments.jobs import FoldJob, run_fold_jobs, threads_per_job
from klgrade.train.config import TrainConfig


def tiny(data, out, model="resnet18") -> TrainConfig:
    return TrainConfig(data=str(data), out=str(out), model=model, epochs=1, batch_size=16, limit=40, image_size=64,
                       folds=2, device="cpu", quiet=True, model_options={"width": 32, "heads": 2} if model == "msa_net"
                       else {}).validate()


def timing(out, fold) -> dict:
    return json.loads((out / f"fold{fold}" / "timing.json").read_text())


def test_two_workers_train_folds_at_once_and_a_student_waits_for_its_teachers(kneekl224, tmp_path):
    teacher, student = tmp_path / "teacher", tmp_path / "student"
    jobs = [FoldJob(tiny(kneekl224, student, "msa_net"), fold, ((str(teacher), fold),)) for fold in range(2)]
    jobs += [FoldJob(tiny(kneekl224, teacher), fold) for fold in range(2)]  # listed last: order comes from needs
    assert run_fold_jobs(jobs, workers=2) == []
    teachers = [timing(teacher, fold) for fold in range(2)]
    assert teachers[0]["pid"] != teachers[1]["pid"]
    assert teachers[0]["started"] < teachers[1]["finished"] and teachers[1]["started"] < teachers[0]["finished"]
    for fold in range(2):  # a teacher fold is done once its oof.csv, written after its model, exists
        teacher_done = (teacher / f"fold{fold}" / "oof.csv").stat().st_mtime
        assert timing(student, fold)["started"] >= teacher_done >= teachers[fold]["started"]
        config = json.loads((student / f"fold{fold}" / "metrics.json").read_text())["config"]
        assert config["teacher"] == [str(teacher / f"fold{fold}" / "last.safetensors")]
        assert config["threads"] == threads_per_job(2)
    finished = (teacher / "fold0" / "oof.csv").stat().st_mtime_ns
    assert run_fold_jobs(jobs, workers=2) == []  # all done: nothing retrained
    assert (teacher / "fold0" / "oof.csv").stat().st_mtime_ns == finished


def test_no_job_starts_after_the_deadline_and_a_student_never_starts_without_its_teachers(kneekl224, tmp_path):
    teacher, student = tmp_path / "teacher", tmp_path / "student"
    jobs = [FoldJob(tiny(kneekl224, teacher), 0), FoldJob(tiny(kneekl224, student), 0, ((str(teacher), 0),))]
    assert run_fold_jobs(jobs, workers=1, deadline=time.monotonic() - 1) == jobs
    assert not teacher.exists() and not student.exists()
    orphan = FoldJob(tiny(kneekl224, student), 0, ((str(tmp_path / "never"), 0),))
    assert run_fold_jobs([orphan], workers=1) == [orphan]
    assert not student.exists()
