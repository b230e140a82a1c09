"""The model shipped inside the package: quality on kneeKL224 val, its card, and the README's demo."""

import json
from pathlib import Path

import pytest

import klgrade
from klgrade.infer.predictor import shipped_checkpoint
from klgrade.models.weights import read_info, weights_digest

from helpers import EXAMPLES, REPO, benchmark_framings, copy_real_images, invoke_cli, script_module

BAR = {"accuracy": 0.65, "qwk": 0.76, "mcc": 0.50}
"""Floor for the shipped model on kneeKL224 val: issue #6's accuracy and MCC; for QWK the from-scratch reference
level (0.76). The model shipped on 2026-11-26 (CPU-trained) measures 0.651 / 0.772 / 0.513; with the processing
normaliser shipped on 2026-11-27 in front of it, 0.655 / 0.774 / 0.518; with the inverted knees of val graded
inverted back (the polarity probe, same weights), 0.656 / 0.778 / 0.520."""

STORED_INVERTED = ("0/9625187L", "0/9775753L", "0/9775753R", "2/9558684L", "2/9558684R", "2/9579255R", "2/9596723L",
                   "2/9596723R", "2/9599715L", "2/9599715R", "2/9625187R", "2/9790812L", "2/9790812R", "3/9579255L")
"""The kneeKL224 val knees stored inverted (bone dark; both knees of 7 patients), found by their brightness (the
central third of the columns darker than the outer sixths) and checked by eye (docs/results.md, polarity)."""


def test_the_shipped_calibration_records_the_weights_it_was_fitted_on():
    """So that the shipped model's weights fine-tuned and saved with its metadata run uncalibrated (test_uncertainty)."""
    assert read_info(shipped_checkpoint())["calibration"]["weights"] == weights_digest(shipped_checkpoint())
    assert klgrade.load_model().is_calibrated


def test_shipped_model_meets_the_bar_on_val_and_its_card_says_so(kneekl224):
    result = invoke_cli("evaluate", "--data", str(kneekl224 / "val"), "--json")
    assert result.returncode == 0, result.stderr
    metrics = json.loads(result.stdout)
    assert metrics["n"] == 826
    # val chose the shipped model (its recipe, its TTA setting) and fitted its grade sets: said, not hidden.
    assert metrics["seen_chosen"] == metrics["seen_calibrated"] == 826
    assert result.stderr.count("warning: the model was") == 2 and metrics["warnings"][0] in result.stderr
    for name, minimum in BAR.items():
        assert metrics[name] >= minimum, (name, metrics[name])
        low, high = metrics["ci95"][name]
        assert low <= metrics[name] <= high
    card = (REPO / "src" / "klgrade" / "weights" / "MODEL_CARD.md").read_text()
    for name in ("accuracy", "qwk", "mcc"):
        assert f"| {name} | {metrics[name]:.3f} |" in card
    assert "not a medical device" in card.lower()
    # Shipped calibrated on val (so coverage here is in-sample; benchmarks/uncertainty.py cross-fits it).
    assert metrics["nominal_coverage"] == pytest.approx(0.9) and 0.87 <= metrics["coverage"] <= 0.97
    assert len(metrics["coverage_per_grade"]) == 5 and 1 < metrics["mean_set_size"] < 3
    assert min(metrics["coverage_per_grade"]) >= 0.9, metrics["coverage_per_grade"]  # a threshold per grade
    assert 0 < metrics["ungradable_fraction"] <= 0.02 and metrics["processing_shift_fraction"] <= 0.02
    assert metrics["sharpness_shift_fraction"] <= 0.02  # its threshold: 1% of val as stored
    assert 0.01 <= metrics["framing_shift_fraction"] <= 0.03  # its threshold: 2% of val as stored
    assert 0.005 <= metrics["framing_wide_shift_fraction"] <= 0.02  # its threshold: 1% of val as stored
    assert round(metrics["polarity_shift_fraction"] * 826) == len(STORED_INVERTED)  # graded inverted back
    flagged_kl4 = round(metrics["ungradable_per_grade"][4] * 27)
    assert f"flags {flagged_kl4} of 27 KL 4 knees of val" in card or flagged_kl4 <= 27 * 3 * metrics["ungradable_fraction"]


def test_images_that_are_not_knee_radiographs_are_flagged_but_still_graded():
    """Blank, noise, gradients, text, and photographs/scans shipped inside installed packages: >= 95% flagged. A
    flagged answer's grade set holds all five grades: no coverage holds for such an input (its set was as narrow as
    a knee's: a single grade for some)."""
    import numpy as np

    from helpers import not_knee_images
    from klgrade.infer.grading import grade, load_model
    from klgrade.uncertainty import FAR_FROM_TRAINING_KNEES, ORIENTATION_CORRECTED

    model = load_model()
    assert model.is_calibrated and model.density is not None
    results = {name: grade(image.astype(np.float32), model=model) for name, image in not_knee_images().items()}
    flagged = [name for name, result in results.items() if not result.gradable]
    assert len(flagged) >= 0.95 * len(results), sorted(set(results) - set(flagged))
    turned = [name for name, result in results.items() if ORIENTATION_CORRECTED in result.warnings]
    assert turned == []  # no turn brings one among the training knees (0 of 51 when written)
    far_but_radiograph_like = [name for name, result in results.items() if FAR_FROM_TRAINING_KNEES in result.warnings]
    assert len(far_but_radiograph_like) <= 0.1 * len(results), far_but_radiograph_like  # 3 of 51 when written
    for result in results.values():
        assert len(result.probabilities) == 5 and abs(sum(result.probabilities) - 1) < 1e-6
        assert result.gradable == (not any(w.startswith("not gradable") for w in result.warnings))
        assert result.gradable or result.grade_set == [0, 1, 2, 3, 4]
    for example in sorted(EXAMPLES.glob("*.jpg")):
        answer = grade(example, model=model)
        assert answer.gradable and answer.grade in answer.grade_set and len(answer.grade_set) < 5, example.name


def test_a_severe_knee_far_from_the_training_knees_is_not_told_it_does_not_look_like_a_knee(kneekl224):
    """The feature density flags severe knees (6 of 27 KL4 val knees): they lie among the non-knee images in feature
    space (docs/results.md, session 19). Their answer said "the image does not look like the knee radiographs the
    model was trained on", which a clinician looking at a severe knee knows is wrong. Their contrast and detail are
    a radiograph's (within both image-statistics profiles), so now they are told that the model's features place
    them far from the training knees; still not gradable, with all five grades as the set."""
    from klgrade.infer.grading import grade_many, load_model
    from klgrade.uncertainty import FAR_FROM_TRAINING_KNEES, NOT_A_KNEE, ORIENTATION_CORRECTED, POLARITY_CORRECTED

    answers = list(grade_many(load_model(), sorted((kneekl224 / "val" / "4").glob("*.jpg"))))
    flagged = [answer for answer in answers if not answer.gradable]
    assert len(flagged) >= 3  # 6 of 27 when written
    for answer in flagged:
        assert answer.warnings[0] == FAR_FROM_TRAINING_KNEES and NOT_A_KNEE not in answer.warnings
        assert answer.grade_set == [0, 1, 2, 3, 4]
    # None is stored inverted or turned: the density, which flags them, must not "correct" one into its range (an
    # inverted orientation tried without the polarity read-out's word graded 9511862R KL 3, set {3}).
    assert not [a.name for a in answers if POLARITY_CORRECTED in a.warnings or ORIENTATION_CORRECTED in a.warnings]


def test_the_shipped_model_keeps_its_grades_and_warns_when_the_contrast_processing_differs(kneekl224):
    """Val knees as stored: no warning; the same knees CLAHE-enhanced once more (a viewer's "enhance" button):
    warned, and mostly the same grade (its processing normaliser: 93 of 104 here; the model shipped before it
    kept 57 of 104)."""
    import cv2
    import numpy as np

    from klgrade.data.io import read_image
    from klgrade.infer.grading import grade_many, load_model
    from klgrade.uncertainty import PROCESSING_SHIFT

    model = load_model()
    paths = sorted((kneekl224 / "val").rglob("*.jpg"))[::8]
    clahe = cv2.createCLAHE(clipLimit=4.0, tileGridSize=(8, 8))
    enhanced = [clahe.apply(read_image(p).astype(np.uint8)).astype(np.float32) for p in paths]
    stored_results, enhanced_results = list(grade_many(model, paths)), list(grade_many(model, enhanced))
    assert sum(PROCESSING_SHIFT in r.warnings for r in stored_results) <= 0.05 * len(paths)
    assert sum(PROCESSING_SHIFT in r.warnings for r in enhanced_results) >= 0.8 * len(paths)
    kept = sum(s.grade == e.grade for s, e in zip(stored_results, enhanced_results))
    assert kept >= 0.8 * len(paths), kept


def test_the_shipped_model_warns_when_the_noise_or_sharpness_differs(kneekl224):
    """Strong noise and a blur moved 17% and 15% of the shipped model's grades on val with no warning for most
    (processing warning 3% and 12%, docs/results.md); now they carry the sharpness warning, the stored knees not."""
    import cv2
    import numpy as np

    from klgrade.data.io import read_image
    from klgrade.infer.grading import grade_many, load_model
    from klgrade.uncertainty import SHARPNESS_SHIFT

    model = load_model()
    assert "sharpness" in model.profiles
    images = [read_image(p) for p in sorted((kneekl224 / "val").rglob("*.jpg"))[::8]]
    rng = np.random.default_rng(0)
    variants = {"stored": images, "noise_20": [np.clip(i + rng.normal(0, 20, i.shape), 0, 255) for i in images],
                "blur_2": [cv2.GaussianBlur(i, (0, 0), 2.0) for i in images]}
    warned = {name: np.mean([SHARPNESS_SHIFT in r.warnings for r in grade_many(model, variant)])
              for name, variant in variants.items()}
    assert warned["stored"] <= 0.03 and warned["noise_20"] >= 0.8 and warned["blur_2"] >= 0.8, warned


def test_the_shipped_model_warns_when_the_knee_is_framed_tighter_or_wider_than_in_training(kneekl224):
    """Val knees cropped to their central 85% or 75% and resized back (another site's tighter framing, which moves
    19% and 31% of grades, docs/results.md): warned tighter; shrunk 20% inside a margin of repeated edge pixels
    (wider, which moves 18%): warned wider; as stored or CLAHE-enhanced again: rarely, so the warnings read the
    knee's size in the frame, not the processing."""
    import cv2
    import numpy as np

    from klgrade.data.io import read_image
    from klgrade.infer.grading import grade_many, load_model
    from klgrade.uncertainty import FRAMING_SHIFT, FRAMING_WIDE_SHIFT

    framings = benchmark_framings()
    model = load_model()
    images = [read_image(p) for p in sorted((kneekl224 / "val").rglob("*.jpg"))[::8]]
    clahe = cv2.createCLAHE(clipLimit=4.0, tileGridSize=(8, 8))
    warned = {}
    for name, change in {"stored": lambda i: i, "clahe": lambda i: clahe.apply(i.astype(np.uint8)).astype(np.float32),
                         **{name: framings[name] for name in ("crop_0.85", "crop_0.75", "wide_1.2")}}.items():
        answers = list(grade_many(model, [change(i) for i in images]))
        warned[name] = [np.mean([text in r.warnings for r in answers]) for text in (FRAMING_SHIFT, FRAMING_WIDE_SHIFT)]
    tighter, wider = {name: w[0] for name, w in warned.items()}, {name: w[1] for name, w in warned.items()}
    assert tighter["stored"] <= 0.05 and tighter["clahe"] <= 0.06, warned
    assert wider["stored"] <= 0.04 and wider["clahe"] <= 0.04, warned
    assert tighter["crop_0.85"] >= 0.8 and tighter["crop_0.75"] >= 0.95, warned
    assert max(wider["crop_0.85"], wider["crop_0.75"]) <= 0.04, warned
    assert wider["wide_1.2"] >= 0.8 and tighter["wide_1.2"] <= 0.05, warned


def test_two_knees_on_a_landscape_detector_are_not_gradable_and_their_framing_warning_does_not_contradict_itself(
        kneekl224):
    """Pairs of val knees side by side, 40 px apart, on a 5:4 landscape canvas (a bilateral view without a DICOM
    header; its shape is no hint): flagged not gradable; both framing read-outs fire for most (49 of 60 pairs), which
    said the knee fills more and less of the image at once: one warning says the framing is unlike training's."""
    import numpy as np

    from klgrade.data.io import read_image
    from klgrade.infer.grading import grade_many, load_model
    from klgrade.uncertainty import FRAMING_SHIFT, FRAMING_UNREAD, FRAMING_WIDE_SHIFT

    knees = {path.stem: path for path in sorted((kneekl224 / "val").rglob("*.jpg"))}
    patients = [name[:-1] for name in knees if name.endswith("R") and name[:-1] + "L" in knees][:12]
    images = []
    for patient in patients:
        pair = np.hstack([read_image(knees[patient + "R"]), np.zeros((224, 40), np.float32),
                          read_image(knees[patient + "L"])])
        extra = round(pair.shape[1] / 1.25) - 224
        images.append(np.vstack([pair[:1].repeat(extra // 2, 0), pair, pair[-1:].repeat(extra - extra // 2, 0)]))
    answers = list(grade_many(load_model(), images))
    assert len(answers) == 12 and not any(answer.gradable for answer in answers)
    assert not any(FRAMING_SHIFT in answer.warnings and FRAMING_WIDE_SHIFT in answer.warnings for answer in answers)
    assert sum(FRAMING_UNREAD in answer.warnings for answer in answers) >= 6


def test_an_inverted_radiograph_is_graded_inverted_back_and_says_so(kneekl224):
    """Val knees saved inverted (bone dark, as a MONOCHROME1 image exported without its inversion; before the
    polarity read-out 38% of such grades moved and 17% were flagged not gradable, docs/results.md): graded as the
    upright knee, with the warning; upright knees: no warning; the val knees stored inverted: the warning."""
    import numpy as np

    from klgrade.data.io import read_image
    from klgrade.infer.grading import grade_many, load_model
    from klgrade.uncertainty import POLARITY_CORRECTED

    model = load_model()
    stored_inverted = [kneekl224 / "val" / f"{name}.jpg" for name in STORED_INVERTED]
    upright = [p for p in sorted((kneekl224 / "val").rglob("*.jpg"))[::8] if p not in stored_inverted]
    images = [read_image(p) for p in upright]
    as_stored = list(grade_many(model, images))
    inverted = list(grade_many(model, [255 - image for image in images]))
    assert sum(POLARITY_CORRECTED in r.warnings for r in as_stored) <= 1
    assert np.mean([POLARITY_CORRECTED in r.warnings for r in inverted]) >= 0.97
    assert np.mean([a.grade == b.grade for a, b in zip(inverted, as_stored)]) >= 0.97
    assert np.mean([r.gradable for r in inverted]) >= 0.97
    assert all(POLARITY_CORRECTED in r.warnings for r in grade_many(model, stored_inverted))
    explained = next(grade_many(model, [255 - images[0]], explain=True))  # the map and overlay of the knee as graded
    assert np.abs(explained.image.astype(int) - as_stored[0].image.astype(int)).max() <= 1
    assert explained.heatmap.shape == explained.image.shape and explained.heatmap.max() > 0


def test_a_knee_stored_turned_without_an_orientation_tag_is_graded_upright_and_says_so(kneekl224):
    """Val knees turned by a quarter, a half or three quarters with no tag to say so (an export that drops the
    orientation), and some inverted too: all were flagged not gradable, most graded KL 4 (docs/results.md, turned
    images); now graded as the upright knee, with the warning. Upright knees are never turned (images that are no
    knee: the test above)."""
    import numpy as np

    from klgrade.data.io import read_image
    from klgrade.infer.grading import grade_many, load_model
    from klgrade.uncertainty import ORIENTATION_CORRECTED, POLARITY_CORRECTED

    model = load_model()
    images = [read_image(p) for p in sorted((kneekl224 / "val").rglob("*.jpg"))[::16]]
    as_stored = list(grade_many(model, images))
    turned = list(grade_many(model, [np.rot90(image, 1 + index % 3) for index, image in enumerate(images)]))
    assert not any(ORIENTATION_CORRECTED in r.warnings for r in as_stored)
    assert np.mean([ORIENTATION_CORRECTED in r.warnings for r in turned]) >= 0.95
    assert np.mean([a.grade == b.grade for a, b in zip(turned, as_stored)]) >= 0.95
    assert np.mean([a.gradable == b.gradable for a, b in zip(turned, as_stored)]) >= 0.95
    explained = next(grade_many(model, [np.rot90(images[0])], explain=True))  # the map and overlay of the knee as graded
    assert np.abs(explained.image.astype(int) - as_stored[0].image.astype(int)).max() <= 1
    assert explained.heatmap.shape == explained.image.shape and explained.heatmap.max() > 0
    # Inverted too (a MONOCHROME1 export that also dropped the orientation): 63% were recovered through the polarity
    # read-out, which errs on a turned knee; the density now tries the inverted turns itself.
    both = list(grade_many(model, [np.rot90(255 - image, 1 + index % 3) for index, image in enumerate(images)]))
    assert np.mean([ORIENTATION_CORRECTED in r.warnings and POLARITY_CORRECTED in r.warnings for r in both]) >= 0.95
    assert np.mean([a.grade == b.grade for a, b in zip(both, as_stored)]) >= 0.95


def test_a_batch_of_upright_turned_inverted_and_other_images_grades_each_as_it_would_alone(kneekl224):
    """The turn and the inversion are tried on some rows of a batch only: each answer must stay with its image."""
    import numpy as np

    from helpers import not_knee_images
    from klgrade.data.io import read_image
    from klgrade.infer.grading import load_model
    from klgrade.uncertainty import ORIENTATION_CORRECTED, POLARITY_CORRECTED

    model = load_model()
    knees = [read_image(p) for p in sorted((kneekl224 / "val").rglob("*.jpg"))[::150]]
    others = not_knee_images()
    batch = [knees[0], np.rot90(knees[1]), others["grace_hopper"], 255 - knees[2], np.rot90(knees[3], 2),
             knees[4], others["checkerboard"], np.rot90(knees[5], 3)]
    together = model.grade_arrays(batch)
    alone = [model.grade_arrays([image])[0] for image in batch]
    for one, other in zip(together, alone):
        np.testing.assert_allclose(one.probabilities, other.probabilities, atol=1e-4)
        assert one.warnings == other.warnings
    said = [(ORIENTATION_CORRECTED in g.warnings, POLARITY_CORRECTED in g.warnings) for g in together]
    assert said == [(False, False), (True, False), (False, False), (False, True), (True, False), (False, False),
                    (False, False), (True, False)]


def test_a_knee_stored_turned_with_an_exif_orientation_is_graded_as_viewers_show_it(kneekl224, tmp_path):
    """A JPEG whose pixels lie sideways or upside down with an EXIF orientation tag (as cameras and some exports
    store them) looks upright in every viewer and the web page; before the tag was read, 3 of these 21 val knees
    kept their grade (turned 90 degrees: 20 of 21 graded KL 4, all flagged not gradable)."""
    import numpy as np
    from PIL import Image

    from klgrade.infer.grading import grade_many, load_model

    stored_for = {3: Image.Transpose.ROTATE_180, 6: Image.Transpose.ROTATE_90, 8: Image.Transpose.ROTATE_270}
    upright, turned = [], []
    for index, path in enumerate(sorted((kneekl224 / "val").rglob("*.jpg"))[::40]):
        orientation = (3, 6, 8)[index % 3]
        exif = Image.Exif()
        exif[0x0112] = orientation
        knee = Image.open(path)
        upright.append(tmp_path / f"{path.stem}.jpg")
        knee.save(upright[-1], quality=95)
        turned.append(tmp_path / f"{path.stem}_o{orientation}.jpg")
        knee.transpose(stored_for[orientation]).save(turned[-1], quality=95, exif=exif)
    model = load_model()
    pairs = list(zip(grade_many(model, upright), grade_many(model, turned)))
    assert np.mean([a.grade == b.grade for a, b in pairs]) >= 0.95
    assert np.mean([a.gradable == b.gradable for a, b in pairs]) >= 0.95


def test_evaluate_lists_for_each_knee_what_predict_would_say(kneekl224, tmp_path):
    """`evaluate --out`: predictions.csv carries each knee's gradable flag and warnings, so a researcher finds the
    knees graded inverted back (val's stored inverted ones) among the others."""
    import csv
    import shutil

    import numpy as np

    from klgrade.uncertainty import POLARITY_CORRECTED

    stored_inverted = {kneekl224 / "val" / f"{name}.jpg" for name in STORED_INVERTED}
    others = [p for p in sorted((kneekl224 / "val").rglob("*.jpg"))[::40] if p not in stored_inverted]
    for path in [*stored_inverted, *others]:
        (tmp_path / "knees" / path.parent.name).mkdir(parents=True, exist_ok=True)
        shutil.copy(path, tmp_path / "knees" / path.parent.name / path.name)
    result = invoke_cli("evaluate", "--data", str(tmp_path / "knees"), "--out", str(tmp_path / "report"))
    assert result.returncode == 0, result.stderr
    rows = list(csv.DictReader((tmp_path / "report" / "predictions.csv").open()))
    assert len(rows) == len(stored_inverted) + len(others)
    graded_inverted = {Path(row["path"]).name for row in rows if POLARITY_CORRECTED in row["warnings"]}
    assert graded_inverted == {path.name for path in stored_inverted}
    assert {row["gradable"] for row in rows} <= {"True", "False"}
    # Each knee's grade set, as `predict` writes it: the coverage in metrics.json is counted from these sets.
    sets = [range(int(row["grade_set"].split("-")[0]), int(row["grade_set"].split("-")[-1]) + 1) for row in rows]
    assert all(int(row["predicted"]) in grades for row, grades in zip(rows, sets))
    assert all(row["grade_set"] == "0-4" for row in rows if row["gradable"] == "False")
    metrics = json.loads((tmp_path / "report" / "metrics.json").read_text())
    assert metrics["coverage"] == np.mean([int(row["true"]) in grades for row, grades in zip(rows, sets)])
    assert metrics["mean_set_size"] == np.mean([len(grades) for grades in sets])
    # The answers with no warning at all (here: not the knees graded inverted back) scored apart.
    unwarned = [row for row in rows if not row["warnings"]]
    assert 0 < len(unwarned) <= len(others) and metrics["unwarned_only"]["n"] == len(unwarned)
    assert metrics["unwarned_only"]["accuracy"] == np.mean([row["true"] == row["predicted"] for row in unwarned])


def test_a_knee_with_too_few_pixels_or_grey_levels_is_not_gradable_and_says_why(kneekl224, tmp_path):
    """Val knees shrunk below 64 px a side or posterised below 10 grey levels lose their grades, mostly unflagged
    before (every fourth val knee: 60% kept at 32 px, 73% at 7 levels, the mean grade +0.4; docs/results.md);
    just above those limits they keep them. Files, arrays and `evaluate` answer alike."""
    import csv

    import cv2
    import numpy as np

    from klgrade.data.io import read_image
    from klgrade.infer.grading import grade, grade_many, load_model
    from klgrade.uncertainty import TOO_FEW_GREY_LEVELS, TOO_SMALL

    def shrunk(side):
        return lambda knee: cv2.resize(knee, (side, side), interpolation=cv2.INTER_AREA)

    def posterised(levels):
        return lambda knee: np.round(knee / 255 * (levels - 1)) * (255 / (levels - 1))

    made = {"48px": shrunk(48), "80px": shrunk(80), "4levels": posterised(4), "16levels": posterised(16)}
    paths = made_from_val_knees(kneekl224, tmp_path / "knees", made)
    model = load_model()
    results = {name: list(grade_many(model, files)) for name, files in paths.items()}
    assert all(not r.gradable and r.warnings[0] == TOO_SMALL.format(rows=48, columns=48) for r in results["48px"])
    few = {TOO_FEW_GREY_LEVELS.format(levels=n) for n in (2, 3, 4)}  # the stretch clips a level of < 0.5% of pixels
    assert all(not r.gradable and r.warnings[0] in few for r in results["4levels"])
    for name in ("80px", "16levels"):
        assert not any(w.startswith(("not gradable: the image is only", "not gradable: the image holds only"))
                       for r in results[name] for w in r.warnings), name
        assert np.mean([r.gradable for r in results[name]]) >= 0.9, name
    array = grade(shrunk(40)(read_image(paths["80px"][0])), model=model)
    assert not array.gradable and array.warnings[0] == TOO_SMALL.format(rows=40, columns=40)
    result = invoke_cli("evaluate", "--data", str(tmp_path / "knees"), "--out", str(tmp_path / "report"))
    assert result.returncode == 0, result.stderr
    rows = {Path(row["path"]).stem: row for row in csv.DictReader((tmp_path / "report" / "predictions.csv").open())}
    for name, files in paths.items():
        for path, answer in zip(files, results[name]):
            assert rows[path.stem]["gradable"] == str(answer.gradable), path.name
            assert rows[path.stem]["warnings"].startswith(answer.warnings[0] if answer.warnings else ""), path.name


def test_an_image_not_square_is_graded_with_a_warning_that_says_so(kneekl224, tmp_path):
    """A knee cropped non-square (another site's portrait crop) is squeezed to the network's square: at 4:5, 18-24% of
    val grades moved, mostly unwarned (docs/results.md, non-square inputs). Every answer for an image beyond 1.1:1
    now says so, last, through `predict` and `evaluate` alike (its per-image warnings and `unwarned_only`); one
    square or at 1.05:1 does not."""
    import csv

    from klgrade.infer.grading import grade_many, load_model
    from klgrade.uncertainty import SQUEEZED

    made = {"square": lambda knee: knee, "near": lambda knee: knee[:, 5:-5],  # 224 x 214
            "portrait": lambda knee: knee[:, 22:-23], "landscape": lambda knee: knee[22:-23]}  # 179 of 224
    paths = made_from_val_knees(kneekl224, tmp_path / "knees", made)
    model = load_model()
    results = {name: list(grade_many(model, files)) for name, files in paths.items()}
    shapes = {"portrait": (224, 179), "landscape": (179, 224)}
    for name, answers in results.items():
        said = [[w for w in r.warnings if "not square" in w] for r in answers]
        expected = [SQUEEZED.format(rows=shapes[name][0], columns=shapes[name][1])] if name in shapes else []
        assert all(s == expected for s in said), name
        if expected:
            assert all(r.warnings[-1] == expected[0] for r in answers), name
    result = invoke_cli("evaluate", "--data", str(tmp_path / "knees"), "--out", str(tmp_path / "report"), "--json")
    assert result.returncode == 0, result.stderr
    rows = {Path(row["path"]).stem: row for row in csv.DictReader((tmp_path / "report" / "predictions.csv").open())}
    for name, files in paths.items():
        for path, answer in zip(files, results[name]):
            assert ("not square" in rows[path.stem]["warnings"]) == (name in shapes), path.name
            assert rows[path.stem]["predicted"] == str(answer.grade), path.name
    unwarned = sum(not r.warnings for answers in results.values() for r in answers)
    metrics = json.loads(result.stdout)
    assert 0 < metrics["unwarned_only"]["n"] == unwarned <= len(paths["square"]) * 2
    assert metrics["noted_fraction"] == 0.5  # the portrait and landscape halves


def test_a_lead_marker_beside_the_joint_is_painted_out_and_the_knee_graded_as_without_it(kneekl224, tmp_path):
    """The benchmark's lead "R" burnt in at the joint line moved 17% of val grades, unwarned (docs/results.md,
    markers); painted out before grading, 3.6% of half of val. Every answer says the mark was painted out; the
    grades are the unmarked knees' (before: 2 of these 11 moved)."""
    from klgrade.infer.grading import grade_many, load_model
    from klgrade.uncertainty import MARK_PAINTED

    beside_joint = script_module("benchmarks/robustness.py").markers()["marker_joint"]
    paths = made_from_val_knees(kneekl224, tmp_path / "knees", {"clean": lambda knee: knee, "marked": beside_joint})
    model = load_model()
    clean, marked = (list(grade_many(model, paths[name])) for name in ("clean", "marked"))
    assert all(MARK_PAINTED in answer.warnings for answer in marked)
    assert not any(MARK_PAINTED in answer.warnings for answer in clean)
    assert sum(a.grade == b.grade for a, b in zip(clean, marked)) >= len(clean) - 1


def test_a_knee_that_looks_unenhanced_is_graded_as_the_stored_knee_once_enhanced(kneekl224):
    """Val knees with their local contrast cut to a tenth and saved as 8-bit (towards a radiograph as acquired, before
    the CLAHE that kneeKL224 had): the shipped model kept 26 of these 42 grades and flagged 12 not gradable; with 32
    of them enhanced as the training images were (their answers say so), 32 and 4."""
    import numpy as np

    from klgrade.data.io import read_image
    from klgrade.infer.grading import load_model
    from klgrade.uncertainty import ENHANCED

    soften = script_module("benchmarks/robustness.py")._soften(0.9)
    knees = [read_image(path) for path in sorted((kneekl224 / "val").rglob("*.jpg"))[::20]]
    model = load_model()
    stored, unenhanced = model.grade_arrays(knees), model.grade_arrays([np.round(soften(knee)) for knee in knees])
    assert not any(ENHANCED in answer.warnings for answer in stored)
    assert sum(ENHANCED in answer.warnings for answer in unenhanced) >= 0.6 * len(knees)
    assert sum(a.grade == b.grade for a, b in zip(stored, unenhanced)) >= 0.7 * len(knees)
    assert sum(not answer.gradable for answer in unenhanced) <= 0.15 * len(knees)


def test_a_knee_padded_into_a_larger_canvas_is_graded_as_the_knee_itself(kneekl224):
    """Val knees letterboxed in black to 4:3, framed in a white border, padded black above and white beside, framed
    in black with a side marker burnt into the margin, or shrunk into a black margin and saved as JPEG (a viewer's
    export): the margin is trimmed, so grades and flags are the stored knee's (before the trim: 15%, 24%, 18%, 12%
    and 18% of grades moved, and the black-margin knees were flagged not gradable, docs/results.md)."""
    import cv2
    import numpy as np

    from klgrade.data.io import read_image
    from klgrade.infer.grading import grade_many, load_model

    model = load_model()
    images = [read_image(p) for p in sorted((kneekl224 / "val").rglob("*.jpg"))[::8]]

    def exported(image):
        shrunk = benchmark_framings()["black_margin_1.2"](image).astype(np.uint8)
        encoded = cv2.imencode(".jpg", shrunk, [cv2.IMWRITE_JPEG_QUALITY, 85])[1]
        return cv2.imdecode(encoded, cv2.IMREAD_GRAYSCALE).astype(np.float32)

    def labelled(image):
        bordered = cv2.copyMakeBorder(image.astype(np.uint8), 28, 28, 28, 28, cv2.BORDER_CONSTANT, value=0)
        cv2.putText(bordered, "R", (4, 24), cv2.FONT_HERSHEY_SIMPLEX, 0.8, 255, 2)  # a burnt-in side marker
        return bordered.astype(np.float32)

    stored = list(grade_many(model, images))
    for name, pad in {"letterboxed": lambda i: cv2.copyMakeBorder(i, 0, 0, 37, 37, cv2.BORDER_CONSTANT, value=0),
                      "white border": lambda i: cv2.copyMakeBorder(i, 20, 20, 20, 20, cv2.BORDER_CONSTANT, value=255),
                      "black above, white beside": lambda i: cv2.copyMakeBorder(
                          cv2.copyMakeBorder(i, 28, 0, 0, 0, cv2.BORDER_CONSTANT, value=0), 0, 0, 28, 28,
                          cv2.BORDER_CONSTANT, value=255),
                      "black border with a marker": labelled,
                      "black margin, JPEG": exported}.items():
        padded = list(grade_many(model, [pad(i) for i in images]))
        same = np.mean([a.grade == b.grade for a, b in zip(padded, stored)])
        flagged = np.mean([not a.gradable for a in padded])
        assert same >= (0.85 if "JPEG" in name else 0.98) and flagged <= 0.05, (name, same, flagged)


def test_shipped_weights_describe_themselves():
    info = read_info(shipped_checkpoint())
    assert info["model"]["name"] == "msa_net"
    assert set(info["val_metrics"]) >= set(BAR)
    assert "tta" in info["inference"] and info["card"]["recipe"].startswith("klgrade train")


def test_the_shipped_model_scores_no_knee_it_was_trained_on(kneekl224, tmp_path):
    copy_real_images(kneekl224, tmp_path / "trained", 1, split="train")
    renamed = tmp_path / "trained" / "2" / "knee.jpg"
    next((tmp_path / "trained" / "2").glob("9*.jpg")).rename(renamed)
    result = invoke_cli("evaluate", "--data", str(tmp_path / "trained"))
    assert result.returncode == 1 and result.stdout == "", result.stdout
    assert result.stderr.startswith(f"error: {tmp_path / 'trained'}: 5 of 5 knees are in the training data of msa_net")
    assert len(result.stderr.strip().splitlines()) == 1


def test_demo_grades_the_examples_with_heatmaps(tmp_path):
    result = invoke_cli("predict", str(EXAMPLES), "--explain", "--out", str(tmp_path), "--format", "table")
    assert result.returncode == 0, result.stderr
    names = sorted(p.name for p in EXAMPLES.glob("*.jpg"))
    assert len(names) == 10
    for name in names:
        assert name in result.stdout
    assert len(list((tmp_path / "heatmaps").glob("*_gradcam.png"))) == 10
    rows = json.loads((tmp_path / "predictions.json").read_text())
    graded = {r["path"].rsplit("/", 1)[1]: r["grade"] for r in rows}
    within_one = sum(abs(graded[n] - int(n[2])) <= 1 for n in names)
    assert within_one >= 8, graded


def test_python_api_uses_the_shipped_model_by_default():
    result = klgrade.grade(sorted(EXAMPLES.glob("KL4_*.jpg"))[0], explain=True)
    assert result.grade >= 2
    assert result.heatmap is not None and result.confidence == pytest.approx(max(result.probabilities))


def test_onnx_export_of_the_shipped_model_agrees_with_torch(tmp_path):
    import numpy as np
    from PIL import Image

    from klgrade.infer.onnx import export_onnx
    from klgrade.infer.grading import load_model
    from klgrade.uncertainty import POLARITY_CORRECTED

    onnx_path = export_onnx(shipped_checkpoint(), tmp_path / "shipped.onnx")
    images = [np.asarray(Image.open(p), dtype=np.float32) for p in sorted(EXAMPLES.glob("*.jpg"))]
    torch_p = np.array([g.probabilities for g in load_model(tta=False).grade_arrays(images)])
    onnx_p = np.array([g.probabilities for g in load_model(onnx_path, tta=False, backend="onnx").grade_arrays(images)])
    assert (torch_p.argmax(1) == onnx_p.argmax(1)).all()
    assert np.abs(torch_p - onnx_p).max() < 1e-4
    # The calibration travels with the export: an inverted knee is graded upright and says so.
    inverted = load_model(onnx_path, backend="onnx").grade_arrays([255 - images[0]])[0]
    assert POLARITY_CORRECTED in inverted.warnings and inverted.grade == load_model().grade_arrays(images[:1])[0].grade


def test_every_example_gets_a_non_empty_map_that_points_at_evidence():
    """Every grade's example is explained (no empty map), and hiding the top 20% of the map lowers the predicted
    grade's probability more than hiding 20% chosen at random (mean over the examples and 3 random masks)."""
    import numpy as np
    import torch

    from klgrade.explain.faithfulness import masked, random_map, top_share_mask
    from klgrade.infer.grading import grade, load_model

    model = load_model()
    paths = sorted(EXAMPLES.glob("*.jpg"))
    assert {int(p.name[2]) for p in paths} == set(range(5))
    generator = torch.Generator().manual_seed(0)
    deletion, random = [], []
    for path in paths:
        result = grade(path, explain=True, model=model)
        assert result.warnings == [] and result.heatmap.max() == pytest.approx(1.0), path.name
        assert (result.heatmap > 0.2).mean() > 0.02, path.name
        base = result.probabilities[result.grade]
        hidden = model.probabilities(masked(result.image, top_share_mask(result.heatmap))[None])[0, result.grade]
        deletion.append(base - hidden)
        shuffled = [masked(result.image, top_share_mask(random_map(result.image.shape[0], generator))) for _ in range(3)]
        random.append(base - model.probabilities(np.stack(shuffled))[:, result.grade].mean())
    assert np.mean(deletion) > np.mean(random) > -1, (deletion, random)


def test_the_recipe_the_card_names_is_the_configuration_the_shipped_weights_were_trained_with():
    """Loaded as `klgrade train --config` loads it, the recipe file gives the stored training configuration, except
    where it names the frozen grader (`runs/grader_2026-11-26.safetensors`, extracted with `git show`: the shipped
    file now holds the normaliser too), the output folder and the one resume."""
    from klgrade.data.augment import DomainConfig
    from klgrade.train.config import load_config

    info = read_info(shipped_checkpoint())
    words = info["card"]["recipe"].split()
    config_file = REPO / words[words.index("--config") + 1]
    config = json.loads(json.dumps(load_config(config_file, {"data": words[words.index("--data") + 1]}).to_dict()))
    stored = info["train_config"]  # + domain fields added since, at their defaults (off: the same training)
    stored = json.loads(json.dumps({**stored, "domain": {**DomainConfig().to_dict(), **stored["domain"]}}))
    assert {key for key in stored if config[key] != stored[key]} <= {"init", "teacher", "out", "resume"}
    assert config["init"] == "runs/grader_2026-11-26.safetensors" and config["teacher"] == [config["init"]]
    assert "git show" in config_file.read_text()


def made_from_val_knees(kneekl224: Path, folder: Path, made: dict) -> dict[str, list[Path]]:
    """Every 80th val knee made over by each of `made` (name -> function of the grey image), saved as PNG in
    `folder/<grade>/<stem>_<name>.png`; the paths per name."""
    import numpy as np
    from PIL import Image

    from klgrade.data.io import read_image

    paths: dict[str, list[Path]] = {name: [] for name in made}
    for path in sorted((kneekl224 / "val").rglob("*.jpg"))[::80]:
        knee = read_image(path)
        for name, make in made.items():
            paths[name].append(folder / path.parent.name / f"{path.stem}_{name}.png")
            paths[name][-1].parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(np.round(make(knee)).astype(np.uint8)).save(paths[name][-1])
    return paths
