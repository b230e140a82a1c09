"""No score is taken unknowingly on knees a checkpoint has seen: trained on (left out, and said), chosen or
calibrated on (counted and said)."""

import json
import os
import shutil

import pytest

from klgrade.data.provenance import knee_record, merge_records, seen_knees
from klgrade.data.sources import Sample, find_samples
from klgrade.models import load_checkpoint, save_checkpoint

from helpers import invoke_cli, one_grade_warning, run_cli


def _knee(root, grade, name):
    return root / "train" / str(grade) / name


def _folder(root, files: dict) -> str:
    """A grade/image folder holding `files` (name -> source)."""
    for name, source in files.items():
        (root / "0").mkdir(parents=True, exist_ok=True)
        shutil.copy(source, root / "0" / name)
    return str(root)


@pytest.fixture
def seen_checkpoint(tiny_checkpoint, kneekl224, tmp_path):
    """The tiny checkpoint, recorded as trained on two train knees (the left ones of two patients) and a third
    stored as img001.jpg, and chosen on one val knee; with that val knee."""
    names = {"9003126L.jpg": "9003126L.jpg", "9003658L.jpg": "9003658L.jpg", "img001.jpg": "9004315L.jpg"}
    trained = _folder(tmp_path / "trained", {name: _knee(kneekl224, 0, source) for name, source in names.items()})
    chosen = sorted((kneekl224 / "val" / "1").iterdir())[0]
    model, info = load_checkpoint(tiny_checkpoint)
    info["seen"] = {"trained": knee_record(find_samples(trained)),
                    "chosen": knee_record([Sample(str(chosen), 1, chosen.stem[:7])])}
    return save_checkpoint(tmp_path / "seen.safetensors", model, info), chosen


def test_evaluate_leaves_out_a_trained_knee_by_its_patient_or_its_bytes_and_not_by_a_shared_file_name(
        seen_checkpoint, tiny_checkpoint, kneekl224, tmp_path):
    checkpoint, _ = seen_checkpoint
    unseen = sorted((kneekl224 / "val" / "0").iterdir())
    mixed = _folder(tmp_path / "mixed", {"knee.jpg": _knee(kneekl224, 0, "9003126L.jpg"), "other.jpg": unseen[0]})
    trained_patient = _folder(tmp_path / "other_knee", {"9003658R.jpg": _knee(kneekl224, 0, "9003658R.jpg")})
    for checkpoints in ([str(checkpoint)], [str(tiny_checkpoint), str(checkpoint)]):  # alone, in an ensemble
        result = invoke_cli("evaluate", "--data", mixed, "--checkpoint", *checkpoints, "--json")
        assert result.returncode == 0, result.stderr
        metrics = json.loads(result.stdout)
        expected = (f"{mixed}: 1 of 2 knees are in the training data of {metrics['model']} (the same patient or the "
                    f"same file, e.g. {mixed}/0/knee.jpg): left out, the other 1 kept")
        unnamed = f"{mixed}: 1 of 1 knees name no patient (no manifest patient_id, OAI id in the file name or DICOM"
        assert metrics["n"] == 1 and metrics["seen_trained"] == 1 and metrics["warnings"][0] == expected
        assert len(metrics["warnings"]) == 3 and metrics["warnings"][1].startswith(unnamed)
        assert metrics["warnings"][2] == one_grade_warning(mixed, 1)
        assert result.stderr == "".join(f"warning: {warning}\n" for warning in metrics["warnings"])
        written = invoke_cli("evaluate", "--data", mixed, "--checkpoint", *checkpoints, "--out", str(tmp_path / "out"))
        assert written.returncode == 0, written.stderr
        assert (tmp_path / "out" / "left_out.csv").read_text().splitlines() == [
            "path,patient_id,true,reason", f"{mixed}/0/knee.jpg,file:0/knee.jpg,0,trained"]
        result = invoke_cli("evaluate", "--data", trained_patient, "--checkpoint", *checkpoints, "--json")
        assert result.returncode == 1 and result.stdout == "" and len(result.stderr.splitlines()) == 1
        assert result.stderr.startswith(f"error: {trained_patient}: 1 of 1 knees are in the training data of ")
        assert result.stderr.endswith("no knee left to score that it was not trained on\n")
    # img001.jpg of another collection is another knee: its name alone makes no patient.
    other = _folder(tmp_path / "other_site", {"img001.jpg": unseen[1], "img002.jpg": unseen[2]})
    result = invoke_cli("evaluate", "--data", other, "--checkpoint", str(checkpoint), "--json", "--out",
                        str(tmp_path / "out"))
    assert result.returncode == 0, result.stderr
    metrics = json.loads(result.stdout)
    assert metrics["n"] == 2 and metrics["seen_trained"] == metrics["seen_chosen"] == 0
    assert metrics["warnings"][0].startswith(f"{other}: 2 of 2 knees name no patient")
    assert metrics["warnings"][1:] == [one_grade_warning(other, 2)]
    assert result.stderr == "".join(f"warning: {warning}\n" for warning in metrics["warnings"])
    assert (tmp_path / "out" / "left_out.csv").read_text().splitlines() == ["path,patient_id,true,reason"]  # none


def test_evaluate_counts_and_says_the_knees_the_model_was_chosen_on(seen_checkpoint, kneekl224, tmp_path):
    checkpoint, chosen = seen_checkpoint
    unseen = sorted((kneekl224 / "val" / "0").iterdir())[:2]
    data = _folder(tmp_path / "scored", {chosen.name: chosen, unseen[0].name: unseen[0], unseen[1].name: unseen[1]})
    result = invoke_cli("evaluate", "--data", data, "--checkpoint", str(checkpoint), "--json")
    assert result.returncode == 0, result.stderr
    metrics = json.loads(result.stdout)
    assert metrics["seen_chosen"] == 1 and metrics["seen_calibrated"] == 0
    expected = "the model was chosen on 1 of these 3 knees: its scores on them are optimistic (selection bias)"
    assert metrics["warnings"] == [one_grade_warning(data, 3), expected]
    assert result.stderr == "".join(f"warning: {warning}\n" for warning in metrics["warnings"])


def test_calibration_leaves_out_knees_the_model_was_trained_on(seen_checkpoint, kneekl224, tmp_path):
    checkpoint, _ = seen_checkpoint
    unseen = sorted((kneekl224 / "val" / "0").iterdir())
    root = tmp_path / "root"
    _folder(root / "val", {"9003126L.jpg": _knee(kneekl224, 0, "9003126L.jpg")})
    _folder(root / "train", {"9001695L.jpg": _knee(kneekl224, 0, "9001695L.jpg")})
    result = invoke_cli("calibrate", "--checkpoint", str(checkpoint), "--data", str(root), "--out",
                        str(tmp_path / "out.safetensors"))
    assert result.returncode == 1 and not (tmp_path / "out.safetensors").exists()
    assert result.stderr.startswith("error: calibration data: 1 of 1 knees are in the training data of msa_net")
    assert result.stderr.endswith("no knee left to calibrate on that it was not trained on\n")
    _folder(root / "val", {"a.jpg": unseen[0], "b.jpg": unseen[1]})
    scored = _folder(tmp_path / "scored", {"c.jpg": unseen[2]})
    result = invoke_cli("evaluate", "--data", scored, "--checkpoint", str(checkpoint), "--calibrate-on",
                        str(root / "val"), "--json")
    assert result.returncode == 0, result.stderr
    metrics = json.loads(result.stdout)
    assert metrics["warnings"][1:] == [f"--calibrate-on {root / 'val'}: 1 of 3 knees are in the training data of "
                                       f"msa_net (the same patient or the same file, e.g. {root}/val/0/9003126L.jpg): "
                                       "left out, the other 2 kept", one_grade_warning(scored, 1)]
    assert metrics["warnings"][0].startswith(f"{scored}: 1 of 1 knees name no patient")  # c.jpg
    assert metrics["seen_trained"] == metrics["seen_calibrated"] == 0  # the fresh calibration is not on the scored


def test_a_named_pipe_among_the_knees_is_neither_read_nor_waited_on(seen_checkpoint, kneekl224, tmp_path):
    checkpoint, _ = seen_checkpoint
    data = _folder(tmp_path / "data", {"a.jpg": sorted((kneekl224 / "val" / "0").iterdir())[0]})
    os.mkfifo(tmp_path / "data" / "0" / "pipe.jpg")  # opening it to hash it would block for ever
    result = run_cli("evaluate", "--data", data, "--checkpoint", str(checkpoint), "--json", timeout=120)
    assert result.returncode == 1 and json.loads(result.stdout)["n"] == 1
    assert "pipe.jpg" in result.stderr and "not a regular file" in result.stderr


def test_each_image_is_scored_once_and_copies_labelled_with_two_grades_not_at_all(tiny_checkpoint, kneekl224,
                                                                                   tmp_path):
    """A manifest row listed twice, or a file copied under another name, would weigh twice in every figure; a copy
    filed under another grade has no reference grade."""
    knees = [sorted((kneekl224 / "val" / str(grade)).iterdir())[0] for grade in range(3)]
    shutil.copy(knees[0], tmp_path / "copy.jpg")
    shutil.copy(knees[1], tmp_path / "regraded.jpg")
    manifest = tmp_path / "list.csv"
    manifest.write_text("path,grade\n" + "".join(f"{path},{grade}\n" for path, grade in [
        (knees[0], 0), (knees[0], 0), (tmp_path / "copy.jpg", 0), (knees[1], 1), (tmp_path / "regraded.jpg", 2),
        (knees[2], 2), (tmp_path / "missing.jpg", 2)]))
    result = invoke_cli("evaluate", "--data", str(manifest), "--checkpoint", str(tiny_checkpoint), "--json", "--out",
                        str(tmp_path / "out"))
    assert result.returncode == 1  # missing.jpg: reported, the rest scored
    metrics = json.loads(result.stdout)
    assert metrics["n"] == 2 and metrics["copies_left_out"] == 4
    assert metrics["warnings"] == [
        f"{manifest}: 2 file(s) repeat the bytes of another (a row listed twice or a copy, e.g. {knees[0]}): each "
        "image counted once",
        f"{manifest}: 2 file(s) share their bytes with a file of another grade (e.g. {knees[1]}): left out, their "
        "grade is unknown"]
    assert (tmp_path / "out" / "left_out.csv").read_text().splitlines()[1:] == [
        f"{tmp_path / 'copy.jpg'},file:{tmp_path / 'copy.jpg'},0,copy", f"{knees[1]},{knees[1].stem[:7]},1,copy",
        f"{tmp_path / 'regraded.jpg'},file:{tmp_path / 'regraded.jpg'},2,copy"]


def test_records_merge_and_match_by_patient_or_content(kneekl224, tmp_path):
    left, right = _knee(kneekl224, 0, "9003126L.jpg"), _knee(kneekl224, 0, "9003126R.jpg")
    copy = tmp_path / "copy.jpg"
    shutil.copy(left, copy)
    record = knee_record([Sample(str(left), 0, "9003126", "L")])
    assert record == knee_record([Sample(str(copy), 0, "9003126", "L")])  # no path in a record: bytes and patient
    probes = [Sample(str(right), 0, "9003126", "R"), Sample(str(copy), 0, "file:copy.jpg"),
              Sample(str(right), 0, "file:right.jpg"), Sample(str(tmp_path / "missing.jpg"), 0, "file:missing.jpg")]
    assert seen_knees(record, probes).tolist() == [True, True, False, False]
    assert seen_knees({}, probes).tolist() == [False] * 4
    merged = merge_records([record, knee_record([Sample(str(right), 0, "file:right.jpg")]), {}])
    assert len(merged["files"]) == 2 and merged["patients"] == record["patients"]
