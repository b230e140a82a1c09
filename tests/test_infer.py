"""Prediction from files: batch CLI with bad inputs, Grad-CAM overlays, Python API, ONNX parity."""

import csv
import io
import json
import logging
import os
import pty
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import klgrade
from klgrade.data.preprocess import SIDE_UNKNOWN
from klgrade.data.sources import Sample
from klgrade.errors import CheckpointError, DataLayoutError, ImageReadError
from klgrade.evaluate.evaluation import evaluate, pick_split
from klgrade.explain.gradcam import gradcam, joint_fraction, overlay
from klgrade.infer.onnx import OnnxModel, export_onnx
from klgrade.infer.grading import NamedBytes, load_model, prepare_input
from klgrade.models import create_model, load_checkpoint

from helpers import (EXAMPLES, copy_real_images, invoke_cli, knee_image, mirroring_left_knees, one_grade_warning,
                     run_cli, save, save_msa_net, write_dicom)


def test_predict_folder_with_a_corrupt_file_grades_the_rest(tiny_checkpoint, tmp_path):
    inputs = tmp_path / "in"
    inputs.mkdir()
    for path in sorted(EXAMPLES.glob("*.jpg"))[:3]:
        (inputs / path.name).write_bytes(path.read_bytes())
    (inputs / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 40)
    out = tmp_path / "out"
    result = invoke_cli("predict", str(inputs), "--checkpoint", str(tiny_checkpoint), "--explain", "--out", str(out))
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: {inputs / 'corrupt.png'}: ")
    rows = list(csv.DictReader(io.StringIO(result.stdout)))
    assert len(rows) == 4
    good = [r for r in rows if not r["error"]]
    assert len(good) == 3
    for row in good:
        probabilities = [float(row[f"prob_{k}"]) for k in range(5)]
        assert abs(sum(probabilities) - 1) < 1e-4 and int(row["grade"]) == int(np.argmax(probabilities))
        overlay = Image.open(row["heatmap"])
        assert overlay.size[0] == 448 and overlay.mode == "RGB"
    assert json.loads((out / "predictions.json").read_text())[3]["error"]
    assert len(list((out / "heatmaps").glob("*.png"))) == 3


def test_heatmaps_of_an_earlier_run_into_the_same_folder_are_removed_and_other_files_kept(tiny_checkpoint, tmp_path):
    """They stayed beside the new predictions.csv and passed for its heatmaps: of images left out now, or graded anew
    by another model without --explain."""
    examples = [str(path) for path in sorted(EXAMPLES.glob("*.jpg"))[:3]]
    out = tmp_path / "out"
    first = invoke_cli("predict", *examples, "--checkpoint", str(tiny_checkpoint), "--explain", "--out", str(out))
    assert first.returncode == 0 and len(list((out / "heatmaps").glob("*.png"))) == 3
    save(Image.fromarray(knee_image()), out / "heatmaps" / "notes.png")  # the user's own file: not klgrade's
    fewer = invoke_cli("predict", *examples[:2], "--checkpoint", str(tiny_checkpoint), "--explain", "--out", str(out))
    assert fewer.returncode == 0
    assert fewer.stderr == (f"warning: removed 1 heatmaps an earlier run left in {out / 'heatmaps'} (they would pass "
                            "for this run's)\n")
    written = {Path(row["heatmap"]).name for row in csv.DictReader(io.StringIO(fewer.stdout))}
    assert {path.name for path in (out / "heatmaps").iterdir()} == written | {"notes.png"} and len(written) == 2
    unexplained = invoke_cli("predict", *examples[:2], "--checkpoint", str(tiny_checkpoint), "--out", str(out))
    assert unexplained.returncode == 0 and "removed 2 heatmaps" in unexplained.stderr
    assert [path.name for path in (out / "heatmaps").iterdir()] == ["notes.png"]


def test_a_pipe_named_as_an_overlay_is_not_opened_to_look_for_the_mark(tmp_path):
    """`predict --explain --out DIR` looks in DIR/heatmaps for an earlier run's overlays; a pipe named `x.png` there
    was opened, and opening a pipe waits for a writer: the command hung after grading."""
    os.mkfifo(tmp_path / "old_gradcam.png")
    probe = ("import sys; from pathlib import Path; from klgrade.data.io import is_heatmap_file; "
             "sys.exit(is_heatmap_file(Path(sys.argv[1])))")
    assert subprocess.run([sys.executable, "-c", probe, str(tmp_path / "old_gradcam.png")], timeout=60).returncode == 0


def test_predict_accepts_globs_and_reports_missing_files(tiny_checkpoint, tmp_path):
    result = invoke_cli("predict", str(EXAMPLES / "KL0_*.jpg"), str(tmp_path / "absent.png"), "--checkpoint",
                        str(tiny_checkpoint), "--format", "json")
    rows = json.loads(result.stdout)
    assert [r.get("error") for r in rows] == [None, None, "file not found"]
    assert result.returncode == 1


def test_tables_show_names_with_square_brackets_as_they_are(tiny_checkpoint, tmp_path):
    """Rich reads `[left]` in `knee[left].jpg` as a style tag: the table named the file `knee.jpg`, and a folder
    `a[/b]` (a closing tag) stopped `data summary` with a traceback."""
    folder = tmp_path / "scans[/b]" / "2"
    folder.mkdir(parents=True)
    (folder / "knee[left].jpg").write_bytes(sorted(EXAMPLES.glob("KL2_*.jpg"))[0].read_bytes())
    (folder / "bad[bold].png").write_bytes(b"not an image")
    table = invoke_cli("predict", str(folder), "--checkpoint", str(tiny_checkpoint), "--format", "table")
    assert table.returncode == 1 and "knee[left].jpg" in table.stdout and "bad[bold].png" in table.stdout
    summary = invoke_cli("data", "summary", str(tmp_path / "scans[/b]"))
    assert summary.returncode == 1 and "scans[/b]" in summary.stdout  # 1: the unreadable file


def test_python_api_grades_paths_bytes_and_arrays(tiny_checkpoint):
    model = klgrade.load_model(tiny_checkpoint)
    path = sorted(EXAMPLES.glob("KL2_*.jpg"))[0]
    from_path = klgrade.grade(path, explain=True, model=model)
    from_bytes = klgrade.grade(path.read_bytes(), model=model)
    array = np.asarray(Image.open(path), dtype=np.float32)
    from_array = klgrade.grade(array, model=model)
    assert from_path.grade == from_bytes.grade == from_array.grade
    np.testing.assert_allclose(from_path.probabilities, from_array.probabilities, atol=1e-6)
    assert from_path.heatmap.shape == (64, 64) and 0 <= from_path.heatmap.min() and from_path.heatmap.max() <= 1
    with pytest.raises(ImageReadError):
        klgrade.grade(b"nope", model=model)


def test_python_api_grades_a_pillow_image_as_the_file_it_was_opened_from(tiny_checkpoint, tmp_path):
    """`klgrade.grade(Image.open(...))` was "TypeError: expected str, bytes or os.PathLike object, not
    JpegImageFile"; any other object a TypeError from deep inside the decoder's thread."""
    model = load_model(mirroring_left_knees(tiny_checkpoint, tmp_path / "sided.safetensors"))
    knee = Image.fromarray(knee_image(3, size=96).astype(np.uint16) * 200)  # 16 bit: its range must be kept
    turned = knee.rotate(90, expand=True)
    exif = Image.Exif()
    exif[0x0112] = 6  # stored turned; shown upright
    turned.save(tmp_path / "9000001L.png", exif=exif)
    knee.save(tmp_path / "9000001R.png")
    with Image.open(tmp_path / "9000001L.png") as left, Image.open(tmp_path / "9000001R.png") as right:
        opened_left, opened_right = prepare_input(model, left), prepare_input(model, right)
        assert left.size == (96, 96) and left.getexif().get(0x0112) == 6  # the caller's image is left as it is
    np.testing.assert_array_equal(opened_left.image, prepare_input(model, tmp_path / "9000001L.png").image)
    np.testing.assert_array_equal(opened_right.image, prepare_input(model, tmp_path / "9000001R.png").image)
    np.testing.assert_array_equal(opened_left.image, opened_right.image[:, ::-1])  # the name gives the side
    assert klgrade.grade(knee, model=model).probabilities == pytest.approx(
        klgrade.grade(tmp_path / "9000001R.png", model=model).probabilities, abs=1e-6)
    with Image.open(tmp_path / "9000001R.png") as closed:
        pass
    with pytest.raises(ImageReadError, match="9000001R.png: cannot read its pixels .*file closed"):
        klgrade.grade(closed, model=model)
    with pytest.raises(TypeError, match="cannot grade a Tensor: give a file path"):
        list(klgrade.grade_many(model, [tmp_path / "9000001R.png", torch.zeros(3)]))


def test_grade_many_takes_any_iterable_of_inputs(tiny_checkpoint, tmp_path):
    """`grade_many(model, folder.glob("*.jpg"))` was a TypeError (a generator has no len()); inputs are read a batch
    at a time, in order."""
    model = load_model(tiny_checkpoint)
    listed = sorted(EXAMPLES.glob("*.jpg"))
    expected = [(g.name, g.grade, g.probabilities) for g in klgrade.grade_many(model, listed, batch_size=4)]
    streamed = klgrade.grade_many(model, (path for path in listed), batch_size=4)
    assert [(g.name, g.grade, g.probabilities) for g in streamed] == expected and len(expected) == len(listed)


def test_grade_many_given_one_input_says_so(tiny_checkpoint):
    """`grade_many(model, "knee.png")` graded each character of the path as a file ("/: is a folder")."""
    model = klgrade.load_model(tiny_checkpoint)
    path = sorted(EXAMPLES.glob("KL2_*.jpg"))[0]
    for one in (str(path), path, path.read_bytes(), Image.open(path)):
        with pytest.raises(TypeError, match="grade one with grade"):
            list(klgrade.grade_many(model, one))
    assert len(list(klgrade.grade_many(model, [path]))) == 1


@pytest.mark.parametrize("alpha", [5, 1, 0, -0.1])
def test_python_api_refuses_an_alpha_no_grade_set_can_honour(calibrated, alpha):
    """`klgrade.grade(..., alpha=5)` on a calibrated model failed with an IndexError from the conformal quantile."""
    model = klgrade.load_model(calibrated)
    with pytest.raises(ValueError, match=f"between 0 and 1, not {alpha}"):
        klgrade.grade(sorted(EXAMPLES.glob("KL2_*.jpg"))[0], model=model, alpha=alpha)


def test_a_dicom_named_by_uids_is_mirrored_by_the_side_its_header_names(tiny_checkpoint, tmp_path):
    """A model that mirrors left knees (canonical_side) must know the side of a PACS export's file: its header's,
    where the name gives none; the name's, where it does."""
    model = load_model(mirroring_left_knees(tiny_checkpoint, tmp_path / "sided.safetensors"))
    pixels = knee_image().astype(np.uint16) * 16
    right = prepare_input(model, write_dicom(tmp_path / "1.2.3.dcm", pixels, "MONOCHROME2", ImageLaterality="R"))
    left = prepare_input(model, write_dicom(tmp_path / "1.2.4.dcm", pixels, "MONOCHROME2", ImageLaterality="L"))
    np.testing.assert_array_equal(left.image, right.image[:, ::-1])
    named = prepare_input(model, write_dicom(tmp_path / "9000001R.dcm", pixels, "MONOCHROME2", ImageLaterality="L"))
    np.testing.assert_array_equal(named.image, right.image)
    upload = (tmp_path / "1.2.4.dcm").read_bytes()
    np.testing.assert_array_equal(prepare_input(model, NamedBytes(upload, "upload")).image, left.image)


def test_predict_on_a_folder_names_the_files_it_does_not_read(tiny_checkpoint, tmp_path):
    """Images in folders inside are graded; a WebP knee beside them was left out without a word."""
    knees = sorted(EXAMPLES.glob("*.jpg"))[:2]
    (tmp_path / "in" / "sub").mkdir(parents=True)
    (tmp_path / "in" / knees[0].name).write_bytes(knees[0].read_bytes())
    (tmp_path / "in" / "sub" / knees[1].name).write_bytes(knees[1].read_bytes())
    Image.open(knees[0]).save(tmp_path / "in" / "other.webp")
    result = invoke_cli("predict", str(tmp_path / "in"), "--checkpoint", str(tiny_checkpoint), "--format", "json")
    assert result.returncode == 0, result.stderr
    assert [row["path"] for row in json.loads(result.stdout)] == [str(tmp_path / "in" / knees[0].name),
                                                                  str(tmp_path / "in" / "sub" / knees[1].name)]
    assert (f"{tmp_path / 'in'}: left out 1 file(s) that are no image klgrade reads (PNG, JPEG, JPEG 2000, BMP, TIFF, DICOM), "
            f"e.g. {tmp_path / 'in' / 'other.webp'}") in result.stderr


def test_evaluate_counts_the_files_it_does_not_read(tiny_checkpoint, tmp_path):
    for grade, knee in enumerate(sorted(EXAMPLES.glob("*.jpg"))[:2]):
        (tmp_path / str(grade)).mkdir()
        (tmp_path / str(grade) / knee.name).write_bytes(knee.read_bytes())
    Image.open(knee).save(tmp_path / "1" / "other.webp")
    metrics = evaluate(load_model(tiny_checkpoint), tmp_path, n_boot=0).metrics
    assert metrics["n"] == 2 and metrics["files_not_read"] == 1
    assert metrics["warnings"][0].startswith(f"{tmp_path}: left out 1 file(s) that are no image klgrade reads")
    # In a split root, only the scored split's files count.
    (tmp_path / "val").mkdir()
    for folder in ("0", "1"):
        (tmp_path / folder).rename(tmp_path / "val" / folder)
    (tmp_path / "train" / "1").mkdir(parents=True)
    (tmp_path / "val" / "1" / "other.webp").rename(tmp_path / "train" / "1" / "other.webp")
    (tmp_path / "train" / "1" / knee.name).write_bytes(knee.read_bytes())
    metrics = evaluate(load_model(tiny_checkpoint), tmp_path, split="val", n_boot=0).metrics
    assert metrics["files_not_read"] == 0 and not any("no image klgrade reads" in w for w in metrics["warnings"])


def test_a_mirroring_model_says_when_it_does_not_know_a_knees_side(tiny_checkpoint, tmp_path):
    """A model that mirrors left knees sees a knee of no known side as stored (a left one unmirrored): the answer
    says so, a scored set counts such knees, and a model that does not mirror has nothing to say."""
    sided = load_model(mirroring_left_knees(tiny_checkpoint, tmp_path / "sided.safetensors"))
    plain = load_model(tiny_checkpoint)
    pixels = knee_image().astype(np.uint16) * 16
    (tmp_path / "set" / "0").mkdir(parents=True)
    unknown = write_dicom(tmp_path / "set" / "0" / "1.2.5.dcm", pixels, "MONOCHROME2")
    left = write_dicom(tmp_path / "set" / "0" / "1.2.6.dcm", pixels, "MONOCHROME2", ImageLaterality="L")
    assert SIDE_UNKNOWN in klgrade.grade(unknown, model=sided).warnings
    assert SIDE_UNKNOWN in sided.grade_arrays([knee_image()])[0].warnings
    assert SIDE_UNKNOWN not in klgrade.grade(left, model=sided).warnings
    assert SIDE_UNKNOWN not in sided.grade_arrays([knee_image()], ["R"])[0].warnings
    assert SIDE_UNKNOWN not in klgrade.grade(unknown, model=plain).warnings
    warnings = evaluate(sided, tmp_path / "set", n_boot=0).warnings
    assert [w for w in warnings if "no side" in w] == [
        f"{tmp_path / 'set'}: 1 of 2 knees have no side (not in a manifest, the file name or the DICOM header): the "
        f"model mirrors left knees, so a left knee among them is seen unmirrored"]
    assert not [w for w in evaluate(plain, tmp_path / "set", n_boot=0).warnings if "no side" in w]


def test_a_scored_set_whose_knees_name_no_patient_says_its_intervals_take_each_for_a_person(tiny_checkpoint, tmp_path):
    """The 95% intervals resample patients: knees that name none are each a person of their own there (two knees of
    one person resampled as two people make the intervals narrower than they are), and the answer says so."""
    model = load_model(tiny_checkpoint)
    for grade in range(2):
        for side in "LR":
            knee = Image.fromarray(knee_image(2 * grade + "LR".index(side)))
            save(knee, tmp_path / "named" / str(grade) / f"900000{grade}{side}.png")
            save(knee, tmp_path / "unnamed" / str(grade) / f"scan_{grade}{side}.png")
    assert not [w for w in evaluate(model, tmp_path / "named", n_boot=0).warnings if "name no patient" in w]
    warnings = [w for w in evaluate(model, tmp_path / "unnamed", n_boot=0).warnings if "name no patient" in w]
    assert warnings == [f"{tmp_path / 'unnamed'}: 4 of 4 knees name no patient (no manifest patient_id, OAI id in the "
                        f"file name or DICOM PatientID; e.g. {tmp_path / 'unnamed' / '0' / 'scan_0L.png'}): each "
                        f"counts as a patient of its own, so one person's knees or visits may be split between folds "
                        f"or sets and intervals take them as independent; give patient ids in a manifest's "
                        f"patient_id column (`klgrade data manifest` writes one to fill in)"]


def test_evaluate_against_another_model_scores_both_on_the_same_knees_with_a_paired_difference(
        tiny_checkpoint, kneekl224, tmp_path):
    """Is my model better than that one on these knees? Both are scored on the same knees (those the other was
    trained on left out, and said), the difference with a paired interval; a model against itself differs by
    nothing."""
    from klgrade.data.provenance import knee_record
    from klgrade.data.sources import find_samples
    from klgrade.metrics import CI_METRICS
    from klgrade.models import save_checkpoint

    copy_real_images(kneekl224, tmp_path / "set", 4)
    torch.manual_seed(1)
    other = save_msa_net(tmp_path / "other.safetensors", create_model("msa_net", width=32, heads=2),
                         {"width": 32, "heads": 2}, size=64)
    model = load_model(tiny_checkpoint)
    result = evaluate(model, tmp_path / "set", n_boot=200, against=load_model(other)).metrics
    compared, alone = result["compared_with"], evaluate(load_model(other), tmp_path / "set", n_boot=0).metrics
    assert compared["n"] == result["n"] == 20
    assert (compared["this_model"], compared["model"]) == ("msa_net (tiny.safetensors)", "msa_net (other.safetensors)")
    for name in CI_METRICS:
        assert compared["this"][name] == pytest.approx(result[name]) and compared["other"][name] == pytest.approx(
            alone[name])
        difference = compared["difference"][name]
        assert difference["difference"] == pytest.approx(result[name] - alone[name], abs=1e-9)
        assert difference["ci95"][0] <= difference["difference"] <= difference["ci95"][1]
    itself = evaluate(model, tmp_path / "set", n_boot=50, against=load_model(tiny_checkpoint)).metrics
    assert all(paired == {"difference": 0.0, "ci95": [0.0, 0.0]} for paired in itself["compared_with"]["difference"].values())
    # The other model trained on the grade-0 knees: compared on the other 16, and said.
    trained, info = load_checkpoint(other)
    info["seen"] = {"trained": knee_record(find_samples(tmp_path / "set")[:4])}
    seen = save_checkpoint(tmp_path / "seen.safetensors", trained, info)
    cli = invoke_cli("evaluate", "--data", str(tmp_path / "set"), "--checkpoint", str(tiny_checkpoint), "--against",
                     str(seen), "--json")
    assert cli.returncode == 0, cli.stderr
    metrics = json.loads(cli.stdout)
    assert metrics["n"] == 20 and metrics["compared_with"]["n"] == 16
    assert f"{tmp_path / 'set'}: 4 of 20 knees are in the training data of msa_net" in cli.stderr
    table = invoke_cli("evaluate", "--data", str(tmp_path / "set"), "--checkpoint", str(tiny_checkpoint), "--against",
                       "shipped")  # a fine-tuned model against the shipped one, named without its path
    assert table.returncode == 0, table.stderr
    assert "against msa_net (msa_net_kneekl224.safetensors)" in table.stdout
    assert "difference (paired 95% CI)" in table.stdout


def test_knees_of_one_true_grade_are_told_that_mcc_and_qwk_say_nothing(tiny_checkpoint, kneekl224, tmp_path):
    """An external set of healthy knees only (all KL 0) scored MCC 0 and QWK 0, read as chance agreement, without a
    word that both are 0 by their formulas on one true grade."""
    copy_real_images(kneekl224, tmp_path / "set", 3)
    (tmp_path / "healthy").mkdir()
    (tmp_path / "set" / "0").rename(tmp_path / "healthy" / "0")
    model = load_model(tiny_checkpoint)
    metrics = evaluate(model, tmp_path / "healthy", n_boot=0).metrics
    assert metrics["mcc"] == metrics["qwk"] == 0.0
    assert one_grade_warning(tmp_path / "healthy", 3) in metrics["warnings"]
    assert not any("by their formulas" in w for w in evaluate(model, tmp_path / "set", n_boot=0).metrics["warnings"])


def test_an_image_piped_in_as_dash_is_graded_as_its_file_is(tmp_path):
    """`dcmj2pnm ... | klgrade predict -` was "-: file not found"."""
    knee = sorted(EXAMPLES.glob("KL3_*.jpg"))[0]
    result = invoke_cli("predict", "-", str(knee), "--format", "json", "--explain", "--out", str(tmp_path),
                        stdin=knee.read_bytes())
    assert result.returncode == 0, result.stderr
    piped, stored = json.loads(result.stdout)
    assert piped["path"] == "-" and piped["heatmap"] == str(tmp_path / "heatmaps" / "stdin_gradcam.png")
    graded = ("grade", *(f"prob_{k}" for k in range(5)), "grade_set", "gradable", "warnings")
    assert {key: piped[key] for key in graded} == {key: stored[key] for key in graded}
    garbage = invoke_cli("predict", "-", stdin=b"not an image")
    assert garbage.returncode == 1 and garbage.stderr.endswith(
        "error: -: not a recognised image (PNG, JPEG, JPEG 2000, BMP, TIFF, DICOM)\n")
    twice = invoke_cli("predict", "-", "-", stdin=knee.read_bytes())
    assert (twice.returncode, twice.stderr) == (1, "error: '-' (standard input) can be given once: it holds one image\n")


def test_dash_on_a_terminal_is_refused_not_waited_on():
    """`klgrade predict -` typed at a prompt would wait for an image that never comes."""
    controller, terminal = pty.openpty()
    try:
        result = subprocess.run([sys.executable, "-m", "klgrade", "predict", "-"], stdin=terminal, capture_output=True,
                                text=True, timeout=120)
    finally:
        os.close(controller)
        os.close(terminal)
    assert result.returncode == 1 and result.stderr == (
        "error: '-' reads an image from standard input, which is a terminal here: pipe one in (klgrade predict - < "
        "knee.png)\n")


def test_the_split_scored_is_the_one_named_else_test_then_val():
    samples = [Sample(f"{split}/0/a.png", 0, "9000001", "L", split) for split in ("train", "val")]
    assert {s.split for s in pick_split(samples, None)} == {"val"}
    assert {s.split for s in pick_split(samples, "train")} == {"train"}
    with pytest.raises(DataLayoutError,
                       match=r"^--split tset: the data has no such split \(found \['train', 'val'\]\)$"):
        pick_split(samples, "tset")
    with pytest.raises(DataLayoutError, match=r"^no split to use by default \(found \['train'\]\); name one"):
        pick_split(samples[:1], None)


def test_ensemble_averages_members_and_flip_tta_is_symmetric(tiny_checkpoint):
    image = np.asarray(Image.open(sorted(EXAMPLES.glob("KL3_*.jpg"))[0]), dtype=np.float32)
    single = load_model(tiny_checkpoint, tta=True)
    pair = load_model([tiny_checkpoint, tiny_checkpoint], tta=True)
    np.testing.assert_allclose(single.grade_arrays([image])[0].probabilities, pair.grade_arrays([image])[0].probabilities,
                               atol=1e-6)
    mirrored = single.grade_arrays([image[:, ::-1].copy()])[0].probabilities
    np.testing.assert_allclose(single.grade_arrays([image])[0].probabilities, mirrored, atol=1e-5)


def test_read_only_images_are_graded_and_explained_without_a_warning(tiny_checkpoint):
    """reproduce grades its validation sets straight from the image cache, a read-only memmap: torch warned that it
    does not support non-writable arrays."""
    import warnings

    predictor = load_model(tiny_checkpoint, tta=True)
    images = np.stack([knee_image(seed=k, size=predictor.preprocess.size) for k in range(2)]).astype(np.uint8)
    images.setflags(write=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        outputs = predictor.outputs(images)
        predictor.explain(images, outputs.probabilities.argmax(axis=1))
    np.testing.assert_allclose(outputs.probabilities, predictor.outputs(images.copy()).probabilities, atol=1e-6)


def test_gradcam_follows_the_evidence():
    """A model whose logit is the mean of a region's activations must put its heatmap on that region."""
    torch.manual_seed(0)
    model = create_model("resnet18").eval()
    x = torch.zeros(1, 1, 128, 128)
    x[..., 48:80, 48:80] = 3.0
    explanation = gradcam(model, x, torch.tensor([0]))
    assert explanation.maps.shape == (1, 128, 128) and explanation.maps.max() == pytest.approx(1.0)
    heatmap = explanation.maps[0]
    assert heatmap[48:80, 48:80].mean() > 2 * heatmap.mean()
    # The last stage has 32-px cells, upsampled bilinearly: unsmoothed, the map creases at every cell (largest
    # second difference 0.032 here); smoothed, it bends gently (0.005).
    creases = max(np.abs(np.diff(heatmap, 2, axis=axis)).max() for axis in (0, 1))
    assert creases < 0.01, creases
    band = np.zeros((100, 100))
    band[40:60] = 1
    assert joint_fraction(band) == pytest.approx(1.0)
    assert joint_fraction(np.ones((100, 100))) == pytest.approx(0.4)


def test_a_map_whose_only_evidence_the_smoothing_dissolves_is_reported_empty(monkeypatch):
    from klgrade.explain import gradcam as module

    signed = torch.full((1, 64, 64), -1.0)
    signed[0, 32, 32] = 0.01  # above the empty ratio before smoothing, gone after it
    monkeypatch.setattr(module, "gradcam_layers", lambda model: [[None]])
    monkeypatch.setattr(module, "signed_gradcam", lambda model, inputs, targets, layers: signed.clone())
    explanation = module.gradcam(torch.nn.Identity(), torch.zeros(1, 1, 64, 64), torch.tensor([0]))
    assert explanation.empty[0] and explanation.maps.max() == 0


def test_the_overlay_colours_the_evidence_and_leaves_the_rest_of_the_radiograph_readable():
    radiograph = knee_image(2, 160)
    heatmap = np.zeros((160, 160), np.float32)
    heatmap[60:100, 60:100] = 1.0
    picture = np.asarray(overlay(radiograph, heatmap, "KL 2"), dtype=np.int16)[:448]
    grey = picture[..., 0] == picture[..., 2]
    assert grey[:100].all() and grey[-100:].all()  # no evidence: the radiograph as it is (it was washed blue)
    centre = picture[200:248, 200:248]
    assert (np.abs(centre[..., 0] - centre[..., 2]) > 40).all()  # strong evidence: coloured


@pytest.mark.parametrize("direction, grade", [(-1, 0), (1, 4)])
def test_ordinal_maps_are_not_empty_for_confident_end_grades(direction, grade):
    """The log-probability of a confident KL0/KL4 has (almost) no gradient; the severity score always has one."""
    torch.manual_seed(0)
    model = create_model("msa_net", ordinal=True, width=32, heads=2).eval()
    x = torch.from_numpy(knee_image(3, 64).astype(np.float32) / 64 - 2).view(1, 1, 64, 64)
    with torch.no_grad():
        model.fc.score.weight.mul_(50.0)
        model.fc.score.bias.fill_(0.0)
        score = model.fc.score(model.forward_head(model.forward_features(x), pre_logits=True)).item()
        model.fc.score.weight.mul_(direction * np.sign(score))  # the score now points to the wanted end grade
        model.fc.score.bias.fill_(direction * 30.0)
        probabilities = torch.softmax(model(x), dim=1)[0]
    assert probabilities.argmax().item() == grade and probabilities.max() > 0.999
    explanation = gradcam(model, x, torch.tensor([grade]))
    assert not explanation.empty[0]
    assert explanation.maps[0].max() == pytest.approx(1.0) and (explanation.maps[0] > 0.1).mean() > 0.01


def test_an_empty_map_is_reported_as_a_warning_and_drawn_as_the_plain_radiograph(tiny_checkpoint):
    from klgrade.explain.gradcam import EXPLANATION_EMPTY
    from klgrade.infer.batch import caption

    model = load_model(tiny_checkpoint, tta=False)
    explain_model = load_checkpoint(tiny_checkpoint)[0]
    with torch.no_grad():  # a classifier that sees nothing: every map is empty
        explain_model.fc.weight.zero_()
    model._explain_models = [explain_model]
    grading = model.grade_arrays([knee_image(1)], explain=True, names=["knee.png"])[0]
    assert grading.warnings == [EXPLANATION_EMPTY]
    assert grading.heatmap.max() == 0
    assert caption(grading).splitlines()[1:] == ["knee.png", f"! {EXPLANATION_EMPTY}"]
    picture = np.asarray(overlay(grading.image, grading.heatmap, caption(grading)))[:448]
    assert (picture[..., 0] == picture[..., 2]).all()  # grey: no colour map blended over it


def test_the_overlay_caption_wraps_every_warning_inside_the_image():
    """A warning is a sentence or two; drawn as one row it ran off the overlay's right edge, so the saved heatmap (the
    page's and the API's too) showed a clinician half of it. Every row now fits: nothing of the caption is drawn in
    the right margin, and the long warning takes more rows than the short caption lines."""
    from klgrade.explain.gradcam import OVERLAY_SIDE
    from klgrade.uncertainty import MARK_PAINTED, PROCESSING_SHIFT

    image = np.full((160, 160), 90, np.uint8)
    short = np.asarray(overlay(image, None, "KL 2   p=0.60\nknee.png"))
    long = np.asarray(overlay(image, None, f"KL 2   p=0.60\nknee.png\n! {MARK_PAINTED}\n! {PROCESSING_SHIFT}"))
    rows = (long.shape[0] - short.shape[0]) // (OVERLAY_SIDE // 14)
    assert rows >= 5  # two warnings of 190 and 175 characters, at most about 45 to a row
    caption = long[OVERLAY_SIDE:]
    assert caption[:, :, 0].max() > 200  # the text is drawn
    assert caption[:, OVERLAY_SIDE - 4:].max() == 0  # and none of it reaches the right edge


def test_onnx_export_matches_torch(tiny_checkpoint, tmp_path):
    path = export_onnx(tiny_checkpoint, tmp_path / "m.onnx")
    torch_model = load_model(tiny_checkpoint, tta=False)
    onnx_model = load_model(path, tta=False, backend="onnx")
    images = [np.asarray(Image.open(p), dtype=np.float32) for p in sorted(EXAMPLES.glob("*.jpg"))]
    a = np.array([g.probabilities for g in torch_model.grade_arrays(images)])
    b = np.array([g.probabilities for g in onnx_model.grade_arrays(images)])
    assert (a.argmax(1) == b.argmax(1)).all()
    assert np.abs(a - b).max() < 1e-4
    assert OnnxModel(path).info["model"]["name"] == "msa_net"


def test_onnx_backend_from_checkpoint_keeps_explanations(tiny_checkpoint):
    predictor = load_model(tiny_checkpoint, backend="onnx")
    image = np.asarray(Image.open(sorted(EXAMPLES.glob("*.jpg"))[0]), dtype=np.float32)
    result = predictor.grade_arrays([image], explain=True)[0]
    assert result.heatmap.shape == (64, 64)


def test_onnx_backend_from_a_checkpoint_runs_where_its_export_cannot_be_kept(tiny_checkpoint, tmp_path, monkeypatch,
                                                                              caplog):
    """A read-only home (a container): `predict --backend onnx` of a checkpoint stopped at "No such file or directory"
    naming only the cache folder."""
    (tmp_path / "file").write_text("")
    monkeypatch.setenv("KLGRADE_CACHE_DIR", str(tmp_path / "file" / "cache"))  # below a file: never made
    image = np.asarray(Image.open(sorted(EXAMPLES.glob("*.jpg"))[0]), dtype=np.float32)
    with caplog.at_level(logging.WARNING):
        graded = load_model(tiny_checkpoint, backend="onnx").grade_arrays([image])[0]
    assert graded.probabilities == pytest.approx(load_model(tiny_checkpoint).grade_arrays([image])[0].probabilities,
                                                 abs=1e-4)
    assert (f"{tmp_path / 'file' / 'cache' / 'onnx'}: the ONNX export cannot be kept there (Not a directory; set "
            "KLGRADE_CACHE_DIR to a folder that can be written): exported for this run only") in caplog.text


def test_export_cli_and_bad_checkpoints(tiny_checkpoint, tmp_path):
    result = run_cli("export-onnx", "--checkpoint", str(tiny_checkpoint), "--out", str(tmp_path / "x.onnx"))
    assert result.returncode == 0 and result.stderr == "", result.stderr  # no exporter or tracer warnings
    assert (tmp_path / "x.onnx").stat().st_size > 100_000
    two = invoke_cli("export-onnx", "--checkpoint", str(tiny_checkpoint), str(tmp_path / "other.safetensors"), "--out",
                     str(tmp_path / "y.onnx"))  # the last was exported without a word
    assert two.returncode == 1 and "export-onnx exports one checkpoint, not 2" in two.stderr
    assert not (tmp_path / "y.onnx").exists()
    named_otherwise = invoke_cli("export-onnx", "--checkpoint", str(tiny_checkpoint), "--out", str(tmp_path / "m.txt"))
    assert named_otherwise.returncode == 1 and named_otherwise.stderr == (
        f"error: {tmp_path / 'm.txt'}: --out must name an .onnx file (predict, evaluate and serve know an ONNX model "
        "by that suffix)\n")
    assert not (tmp_path / "m.txt").exists()
    knee = sorted(EXAMPLES.glob("*.jpg"))[0]
    torch_backend = invoke_cli("predict", str(knee), "--checkpoint", str(tmp_path / "x.onnx"))  # no --backend onnx
    assert torch_backend.returncode == 1 and torch_backend.stderr == (
        f"error: {tmp_path / 'x.onnx'}: an ONNX model, not a safetensors checkpoint (predict, evaluate and serve take "
        "it with --backend onnx)\n")  # was "not a safetensors checkpoint (Error while deserializing header: ...)"
    (tmp_path / "last.ckpt").write_bytes(b"PK\x03\x04")  # was "not a safetensors checkpoint (... header too large)"
    state = invoke_cli("predict", str(knee), "--checkpoint", str(tmp_path / "last.ckpt"))
    assert state.returncode == 1 and state.stderr == (
        f"error: {tmp_path / 'last.ckpt'}: a training state (what `train --resume` continues from), not a checkpoint: "
        "give the best.safetensors or last.safetensors beside it\n")
    (tmp_path / "bad.safetensors").write_bytes(b"bad")
    result = invoke_cli("predict", str(EXAMPLES), "--checkpoint", str(tmp_path / "bad.safetensors"))
    assert result.returncode == 1 and "bad.safetensors" in result.stderr and "Traceback" not in result.stderr
    with pytest.raises(CheckpointError, match="klgrade metadata"):
        (tmp_path / "plain.onnx").write_bytes((tmp_path / "x.onnx").read_bytes())
        import onnx

        proto = onnx.load(str(tmp_path / "plain.onnx"))
        del proto.metadata_props[:]
        onnx.save(proto, str(tmp_path / "plain.onnx"))
        OnnxModel(tmp_path / "plain.onnx")


def test_evaluate_writes_reports_and_can_calibrate(tiny_checkpoint, kneekl224, tmp_path):
    calibration = tmp_path / "calibration"
    copy_real_images(kneekl224, calibration, 3, split="train")
    labelled = tmp_path / "labelled"
    for path in sorted(EXAMPLES.glob("*.jpg")):
        target = labelled / path.name[2] / path.name
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(path.read_bytes())
    out = tmp_path / "report"
    result = invoke_cli("evaluate", "--checkpoint", str(tiny_checkpoint), "--data", str(labelled), "--json", "--out",
                        str(out), "--calibrate-on", str(calibration), "--alpha", "0.5")
    assert result.returncode == 0, result.stderr
    metrics = json.loads(result.stdout)
    assert metrics["n"] == 10 and metrics["temperature"] != 1.0
    # The grade sets are fitted there too (3 knees per grade certify alpha 0.5), so the uncalibrated checkpoint
    # reports their coverage.
    assert metrics["nominal_coverage"] == 0.5 and len(metrics["coverage_per_grade"]) == 5
    assert metrics["accuracy"] <= metrics["coverage"] <= 1
    # Only `klgrade calibrate` fits what sees processing or framing shifts: no fraction is made up without it.
    assert not {"processing_shift_fraction", "sharpness_shift_fraction", "framing_shift_fraction",
                "framing_wide_shift_fraction"} & set(metrics)
    for key in ("n", "accuracy", "precision_macro", "precision_weighted", "recall_macro", "f1_macro", "f1_weighted",
                "mcc", "qwk", "mae", "confusion_matrix", "adjacent_error_rate", "extreme_errors", "ci95"):
        assert key in metrics
    rows = list(csv.DictReader((out / "predictions.csv").open()))
    assert len(rows) == 10
    assert {"path", "patient_id", "true", "predicted", "prob_4", "gradable", "warnings"} <= set(rows[0])
    for name in ("confusion.png", "reliability.png", "metrics.json"):
        assert (out / name).stat().st_size > 100


@pytest.mark.parametrize("detail", [False, True])
def test_a_model_with_a_trained_normaliser_exports_to_onnx_and_agrees(tmp_path, detail):
    """The normaliser's pooling, interpolation and detail blur at the image's own size survive the export; non-zero
    coefficients stand in for a trained one (a new normaliser is the identity and would prove nothing)."""
    torch.manual_seed(0)
    options = {"width": 32, "heads": 2, "normaliser": True, "normaliser_detail": detail}
    model = create_model("msa_net", **options)
    torch.nn.init.normal_(model.normaliser.coefficients.weight, std=0.05)
    if detail:
        torch.nn.init.normal_(model.normaliser.detail_gain.weight, std=0.2)
    checkpoint = save_msa_net(tmp_path / "normalised.safetensors", model, options, size=72)
    images = [np.asarray(Image.open(p), dtype=np.float32) for p in sorted(EXAMPLES.glob("*.jpg"))]
    x = torch.randn(2, 1, 72, 72)
    assert not torch.allclose(model.normaliser(x), x)
    a = np.array([g.probabilities for g in load_model(checkpoint, tta=False).grade_arrays(images)])
    onnx_path = export_onnx(checkpoint, tmp_path / "normalised.onnx")
    b = np.array([g.probabilities for g in load_model(onnx_path, tta=False, backend="onnx").grade_arrays(images)])
    assert (a.argmax(1) == b.argmax(1)).all() and np.abs(a - b).max() < 1e-4


def test_a_large_batch_goes_through_the_network_in_bounded_parts(tiny_checkpoint, monkeypatch):
    """`--batch-size 512` put 1024 views (flip TTA) through the network at once: 4.5 GB for `predict` on val. Now at
    most `FORWARD_IMAGES` images (twice the views) pass at a time, for grading and for Grad-CAM, with the same answers."""
    from klgrade.infer import predictor as predictor_module

    model = load_model(tiny_checkpoint, tta=True)
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (150, model.preprocess.size, model.preprocess.size), dtype=np.uint8)
    alone = [model.grade_prepared(images[i:i + 1], explain=True)[0] for i in (0, 70, 149)]
    passes, explained = [], []
    forward, explain = predictor_module.Predictor._forward, predictor_module.gradcam
    monkeypatch.setattr(predictor_module.Predictor, "_forward",
                        lambda self, m, x: passes.append(len(x)) or forward(self, m, x))
    monkeypatch.setattr(predictor_module, "gradcam", lambda m, x, t: explained.append(len(x)) or explain(m, x, t))
    together = model.grade_prepared(images, explain=True)
    limit = predictor_module.FORWARD_IMAGES
    assert max(passes) == 2 * limit and sum(passes) >= 2 * 150 and max(explained) == limit and sum(explained) == 150
    for single, i in zip(alone, (0, 70, 149)):
        assert together[i].grade == single.grade
        np.testing.assert_allclose(together[i].probabilities, single.probabilities, atol=1e-6)
        np.testing.assert_allclose(together[i].heatmap, single.heatmap, atol=1e-5)
