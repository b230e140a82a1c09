"""Domain augmentation (training only, seeded) and the robustness benchmark on a tiny real folder."""

from __future__ import annotations

import dataclasses
import json
import math
import subprocess
import sys

import cv2
import numpy as np
import pytest
import torch

from klgrade.data.augment import DomainConfig, burn_markers, domain_augment, marker_bank, reframe
from klgrade.data.preprocess import normalize
from klgrade.errors import KLGradeError
from klgrade.models import create_model
from klgrade.train.config import TrainConfig
from klgrade.train.module import GradingModule, js_divergence

from helpers import REPO, benchmark_framings, copy_real_images, knee_image, script_module

ALWAYS = DomainConfig(**{k: (1.0 if k.endswith("_prob") else v) for k, v in DomainConfig().to_dict().items()})
NOTHING = DomainConfig(**{k: (0.0 if k.endswith("_prob") else v) for k, v in DomainConfig().to_dict().items()})


def batch(n: int = 6, side: int = 96) -> torch.Tensor:
    return torch.from_numpy(np.stack([knee_image(i, side) for i in range(n)])).float().div(255).unsqueeze(1)


def test_domain_augmentation_is_seeded_changes_images_and_keeps_shape_and_range():
    x = batch()
    first = domain_augment(x, DomainConfig(), torch.Generator().manual_seed(3))
    again = domain_augment(x, DomainConfig(), torch.Generator().manual_seed(3))
    other = domain_augment(x, DomainConfig(), torch.Generator().manual_seed(4))
    torch.testing.assert_close(first, again, rtol=0, atol=0)
    assert not torch.equal(first, other)
    assert first.shape == x.shape and first.dtype == x.dtype and 0 <= first.min() and first.max() <= 1
    everything = domain_augment(x, ALWAYS, torch.Generator().manual_seed(0))
    assert (everything - x).abs().mean(dim=(1, 2, 3)).min() > 0.01  # every image changed
    torch.testing.assert_close(domain_augment(x, NOTHING, torch.Generator().manual_seed(0)), x, rtol=0, atol=0)


@pytest.mark.parametrize("step", ["clahe_prob", "soften_prob", "gamma_prob", "equalize_prob", "jpeg_prob",
                                  "resample_prob", "blur_prob", "noise_prob", "reframe_prob", "marker_prob",
                                  "sharpen_prob"])
def test_each_domain_change_alone_changes_the_image(step):
    only = DomainConfig(**{k: (1.0 if k == step else 0.0 if k.endswith("_prob") else v)
                           for k, v in DomainConfig().to_dict().items()})
    x = batch(4)
    changed = domain_augment(x, only, torch.Generator().manual_seed(1))
    assert (changed - x).abs().mean() > 1e-3, step


def test_training_sharpening_is_the_benchmarks_unsharp_masking(kneekl224):
    """At one sigma and amount, the training's edge enhancement is the robustness benchmark's `unsharp_2`."""
    path = sorted((kneekl224 / "val" / "1").glob("*.jpg"))[0]
    image = cv2.imread(str(path), cv2.IMREAD_GRAYSCALE).astype(np.float32)
    only = dataclasses.replace(NOTHING, sharpen_prob=1.0, sharpen_sigma=(2.0, 2.0), sharpen_amount=(1.0, 1.0))
    x = torch.from_numpy(image).div(255)[None, None]
    sharpened = domain_augment(x, only, torch.Generator().manual_seed(0))[0, 0].numpy() * 255
    expected = script_module("benchmarks/robustness.py").perturbations(np.random.default_rng(0))["unsharp_2"](image)
    assert np.abs(sharpened - expected).mean() < 0.5  # grey levels out of 255: kernel truncation only
    assert np.abs(expected - image).mean() > 3.0  # 4.5: the match is not the image itself


def test_burnt_in_markers_are_letters_at_the_brightest_level_some_on_a_black_box():
    bank = marker_bank(160, (0.06, 0.18), "cpu")  # the training resolution
    assert marker_bank(160, (0.06, 0.18), "cpu") is bank  # drawn once per side and device
    letters, boxes = bank[:, 0].flatten(1), bank[:, 1].flatten(1)
    assert (letters == 255).any(1).all()  # every marker holds a solid letter
    assert 0.2 < (boxes > 0).any(1).float().mean() < 0.5
    letter_pixels = (letters > 0).sum(1).float() / 160**2  # 6-18% of the side high: a few per mille of the frame
    assert 0.001 < letter_pixels.min() and letter_pixels.max() < 0.03
    x = batch(8, 160)
    burnt = burn_markers(x, bank[:8])
    for image, marked, (letter, box) in zip(x, burnt, bank[:8]):
        assert torch.equal(marked[0][letter == 255], image.max().expand(int((letter == 255).sum())))
        assert (marked[0][(box > 0) & (letter == 0)] == 0).all()
        plain = (box == 0) & (letter == 0)
        assert torch.equal(marked[0][plain], image[0][plain])


def test_reframing_is_another_sites_tighter_crop_of_the_same_knee(kneekl224):
    """Untilted, the training reframe is the centred crop resized back that the robustness benchmark grades."""
    path = sorted((kneekl224 / "val" / "3").glob("*.jpg"))[0]
    image = cv2.imread(str(path), cv2.IMREAD_GRAYSCALE)
    cropped = benchmark_framings()["crop_0.75"](image)
    x = torch.from_numpy(image).float().div(255)[None, None]
    framed = reframe(x, torch.tensor([0.75]), torch.tensor([0.0]))[0, 0].numpy() * 255
    assert np.abs(framed - cropped).mean() < 1.0  # grey levels out of 255: interpolation differences only
    assert np.abs(reframe(x, torch.tensor([0.9]), torch.tensor([0.0]))[0, 0].numpy() * 255 - cropped).mean() > 8.0
    tilted = reframe(x, torch.tensor([0.75]), torch.tensor([math.radians(8)]))[0, 0].numpy() * 255
    assert np.abs(tilted - cropped).mean() > 8.0


def test_a_share_above_one_frames_wider_as_the_benchmark_does(kneekl224):
    """The calibration's wider framings (a share above 1) are the benchmark's knee shrunk into a margin, margin for
    margin: repeated edge pixels ("border") or black ("zeros")."""
    path = sorted((kneekl224 / "val" / "2").glob("*.jpg"))[0]
    image = cv2.imread(str(path), cv2.IMREAD_GRAYSCALE)
    x = torch.from_numpy(image).float().div(255)[None, None]
    framings = benchmark_framings()

    def smooth(grey):  # bilinear sampling and OpenCV's area shrink alias the CLAHE texture differently
        return cv2.GaussianBlur(np.asarray(grey, np.float32), (0, 0), 1.0)

    framed = {padding: smooth(reframe(x, torch.tensor([1.2]), torch.tensor([0.0]), padding=padding)[0, 0].numpy() * 255)
              for padding in ("border", "zeros")}
    for padding, name in (("border", "wide_1.2"), ("zeros", "black_margin_1.2")):
        assert np.abs(framed[padding] - smooth(framings[name](image))).mean() < 5.0, padding
    assert np.abs(framed["zeros"] - smooth(framings["wide_1.2"](image))).mean() > 20.0
    assert np.abs(framed["border"] - smooth(image)).mean() > 20.0  # the knee did shrink


def test_validation_inputs_are_never_augmented():
    config = TrainConfig(data="x", domain_augment=True, domain=ALWAYS.to_dict())
    module = GradingModule(create_model("resnet18"), config, steps_per_epoch=1)
    images = torch.from_numpy(np.stack([knee_image(i, 64) for i in range(3)]))
    expected = normalize(images.unsqueeze(1))
    torch.testing.assert_close(module._inputs(images, augment=False), expected, rtol=0, atol=0)
    assert not torch.equal(module._inputs(images, augment=True), expected)


@pytest.mark.parametrize("domain, processed_differs", [(NOTHING, False), (ALWAYS, True)])
def test_consistency_pairs_each_image_with_its_processed_copy_under_the_same_warp(domain, processed_differs):
    processing = dataclasses.replace(domain, reframe_prob=0.0)  # reframing changes the geometry on purpose
    config = TrainConfig(data="x", domain_augment=True, domain=processing.to_dict(), consistency=5.0)
    module = GradingModule(create_model("resnet18"), config, steps_per_epoch=1)
    module._augment_generator.manual_seed(0)
    images = torch.from_numpy(np.stack([knee_image(i, 64) for i in range(3)]))
    x = module._inputs(images, augment=True)
    stored, processed = x.chunk(2)
    assert len(x) == 6 and not torch.equal(stored, normalize(images.unsqueeze(1)))  # warped, not as stored
    assert torch.equal(stored, processed) != processed_differs
    if processed_differs:  # same warp: the copies' difference is the processing, not a different geometry
        assert torch.corrcoef(torch.stack([stored.flatten(), processed.flatten()]))[0, 1] > 0.8


def test_with_consistency_teachers_see_the_stored_copies_and_their_answer_is_the_target_for_both():
    seen = []

    class Teacher(torch.nn.Module):
        def forward(self, x):
            seen.append(x.clone())
            return torch.zeros(len(x), 5)

    config = TrainConfig(data="x", domain_augment=True, domain=ALWAYS.to_dict(), consistency=5.0, kd_alpha=1.0)
    module = GradingModule(create_model("resnet18"), config, steps_per_epoch=1, teachers=[Teacher()])
    images = torch.from_numpy(np.stack([knee_image(i, 64) for i in range(3)]))
    module._augment_generator.manual_seed(0)
    stored = module._inputs(images, augment=True).chunk(2)[0]
    module._augment_generator.manual_seed(0)
    torch.manual_seed(0)
    logged = {}
    module.log = lambda name, value, **kwargs: logged.__setitem__(name, value)
    loss = module.training_step((images, torch.tensor([0, 2, 4])), 0)
    assert len(seen) == 1 and torch.equal(seen[0], stored)
    # kd_alpha = 1 leaves no label term, but the agreement term keeps its full weight
    torch.testing.assert_close(loss, logged["train/kd"] + 5.0 * logged["train/consistency"])
    assert logged["train/consistency"] > 0


def test_js_divergence_is_zero_for_equal_predictions_symmetric_and_bounded():
    a, b = torch.randn(8, 5), torch.randn(8, 5)
    assert js_divergence(a, a).abs() < 1e-6
    torch.testing.assert_close(js_divergence(a, b), js_divergence(b, a))
    opposite = torch.tensor([[30.0, 0, 0, 0, 0]]), torch.tensor([[0, 0, 0, 0, 30.0]])
    assert 0 < js_divergence(a, b) < js_divergence(*opposite) <= np.log(2) + 1e-6


def test_consistency_needs_domain_augmentation():
    with pytest.raises(KLGradeError, match="--consistency needs --domain-augment"):
        TrainConfig(data="x", consistency=1.0).validate()


def test_robustness_benchmark_runs_on_a_tiny_folder_and_reports_whether_the_grade_sets_still_hold(
        calibrated, kneekl224, tmp_path):
    copy_real_images(kneekl224, tmp_path, 2)
    result = subprocess.run([sys.executable, str(REPO / "benchmarks" / "robustness.py"), "--data", str(tmp_path),
                             "--checkpoint", str(calibrated), "--limit", "8", "--json"],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    report = json.loads(result.stdout)
    scored = {"accuracy", "qwk", "warned", "sharpness_warned", "framing_warned", "framing_wide_warned", "inverted_back",
              "turned_upright", "noted", "painted", "enhanced", "not_gradable", "coverage", "coverage_per_grade", "mean_set_size",
              "cross_fitted_coverage", "cross_fitted_coverage_per_grade"}
    assert report["n"] == 8 and set(report["clean"]) == scored
    assert len(report["perturbations"]) >= 10 and set(report["framings"]) == {
        "rotate_7", "crop_0.85", "crop_0.75", "wide_1.2", "black_margin_1.2", "portrait_4:5", "landscape_5:4",
        "noisy_border"}
    assert set(report["markers"]) == {"marker_corner", "marker_joint", "text_edges"}
    assert set(report["orientations"]) == {"turned_90", "turned_180", "turned_270", "upside_down", "inverted_turned_90"}
    # The non-square crops are answered with the note that says so, most marked knees with the note that the mark was
    # painted out, knees with a fifth of their local contrast with the note that they were enhanced; nothing else is
    # noted, painted or enhanced.
    noted, painted, enhanced = ({name: entry[key] for group in ("perturbations", "framings", "markers")
                                 for name, entry in report[group].items()} for key in ("noted", "painted", "enhanced"))
    assert noted.pop("portrait_4:5") == noted.pop("landscape_5:4") == 1.0
    for marked in ("marker_corner", "marker_joint"):
        assert noted.pop(marked) == painted.pop(marked) >= 0.75
    for softened in ("contrast_reduced", "contrast_reduced_0.8"):
        assert noted.pop(softened) == enhanced.pop(softened)
    assert report["perturbations"]["contrast_reduced_0.8"]["enhanced"] >= 0.5  # 6 of these 8
    assert report["clean"]["noted"] == report["clean"]["painted"] == report["clean"]["enhanced"] == 0.0
    assert set(noted.values()) == set(painted.values()) == set(enhanced.values()) == {0.0}
    processed = [entry for group in ("perturbations", "framings", "markers", "orientations")
                 for entry in report[group].values()]
    for entry in processed:
        assert set(entry) == scored | {"agreement"} and 0 <= entry["agreement"] <= 1
    for entry in [report["clean"], *processed]:
        assert 0 <= entry["coverage"] <= 1 and 1 <= entry["mean_set_size"] <= 5 and 0 <= entry["not_gradable"] <= 1
        assert 0 <= entry["framing_warned"] <= 1 and 0 <= entry["framing_wide_warned"] <= 1
        assert 0 <= entry["inverted_back"] <= 1 and 0 <= entry["turned_upright"] <= 1
        # A set holds at least its own arg-max grade, so it covers the truth at least as often as the grade is right.
        assert entry["coverage"] >= entry["accuracy"] and len(entry["coverage_per_grade"]) == 5
        assert 0 <= entry["cross_fitted_coverage"] <= 1 and len(entry["cross_fitted_coverage_per_grade"]) == 5
    # The model card: markers have their own bullet, and the processing bullet names contrast processing only.
    card = script_module("tools/ship_model.py")
    report["markers"]["marker_joint"].update(accuracy=0.0, agreement=0.0)  # the worst row of all
    processing = card.processing_limit(report)
    assert processing and "marker" not in processing
    assert "beside the joint it then changes 100% of grades" in card.marker_limit(report)
    assert "small text burnt in at the top and bottom edges" in card.marker_limit(report)
    assert "| marker_joint |" in card.robustness_section(report, None)
    assert "| turned_90 (orientation) |" in card.robustness_section(report, None)
    enhanced_bullet = card.enhanced_limit(report)
    assert "Val knees with their local contrast reduced (by half, to a fifth): contrast_reduced " in enhanced_bullet
    assert "contrast_reduced_0.8" in enhanced_bullet


def test_the_card_is_rewritten_only_from_the_calibration_of_the_run_shipped(calibrated, tmp_path):
    """`ship_model.py --card-only` rewrites the card of weights shipped and calibrated already (the robustness
    tables are measured on them, after shipping); it refuses weights of another run or uncalibrated ones."""
    from klgrade.models import load_checkpoint, save_checkpoint

    card = script_module("tools/ship_model.py")
    model, info = load_checkpoint(calibrated)
    info["train_config"] = {"model": "msa_net", "seed": 0}
    shipped = save_checkpoint(tmp_path / "shipped.safetensors", model, info)
    assert card.shipped_calibration(shipped, info) == info["calibration"]
    with pytest.raises(SystemExit, match="not this run's calibrated weights"):
        card.shipped_calibration(shipped, {**info, "train_config": {"model": "msa_net", "seed": 1}})
    del info["calibration"]
    uncalibrated = save_checkpoint(tmp_path / "uncalibrated.safetensors", model, info)
    with pytest.raises(SystemExit, match="not this run's calibrated weights"):
        card.shipped_calibration(uncalibrated, info)


def test_robustness_benchmark_runs_only_the_rows_asked_for(calibrated, kneekl224, tmp_path):
    copy_real_images(kneekl224, tmp_path, 1)
    command = [sys.executable, str(REPO / "benchmarks" / "robustness.py"), "--data", str(tmp_path), "--checkpoint",
               str(calibrated), "--cross-fit", "0", "--json", "--only"]
    result = subprocess.run([*command, "marker_joint", "gamma_0.7"], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    report = json.loads(result.stdout)
    assert (set(report["perturbations"]), set(report["framings"]), set(report["markers"])) == (
        {"gamma_0.7"}, set(), {"marker_joint"})
    refused = subprocess.run([*command, "marker_knee"], capture_output=True, text=True, timeout=300)
    assert refused.returncode == 2 and "no row named marker_knee" in refused.stderr


def test_the_benchmarks_cross_fitted_sets_are_the_sets_klgrade_answers():
    """A knee answered not gradable gets all five grades from klgrade (`uncertainty.answered_sets`); the cross-fitted
    coverage scored its narrow set instead, so it measured sets nobody was given."""
    robustness = script_module("benchmarks/robustness.py")
    labels = np.array([0, 4, 0, 4])
    probabilities = np.eye(5)[[4, 0, 4, 0]] * 0.95 + 0.01  # every knee confidently wrong
    graded = robustness.Graded(probabilities, [], np.array([True, True, False, False]), {}, *np.zeros((3, 4), dtype=bool))
    fit = robustness.CrossFit(np.arange(4), 1.0, np.full(5, 0.5))
    result = robustness.cross_fitted(labels, [fit], graded, temperature=1.0)
    assert result["cross_fitted_coverage"] == 0.5 and result["cross_fitted_coverage_per_grade"][0] == 0.5
