"""Cross-validation and the paper's protocol end to end on small real subsets."""

import csv
import json

import numpy as np
import pytest
from PIL import Image

from klgrade.data.cache import decode_all
from klgrade.data.sources import Sample, find_samples, select_split
from klgrade.evaluate.evaluation import batched_outputs
from klgrade.experiments.protocol import BASELINES, VARIANTS, knees_in_val, select_variants
from klgrade.infer.grading import load_model

from helpers import copy_real_images, invoke_cli, knee_image, one_grade_warning, save

TINY_CV = ["--epochs", "1", "--limit", "40", "--image-size", "64", "--option", "width=32", "--option", "heads=2",
           "--device", "cpu", "--quiet"]


def test_cv_writes_out_of_fold_predictions_without_patient_leaks_and_resumes(kneekl224, tmp_path, monkeypatch):
    from klgrade.train import fit

    listed = []  # a fold's training and its scoring select the same knees: listed once (was twice)
    monkeypatch.setattr(fit, "find_samples", lambda data: listed.append(data) or find_samples(data))
    out, data = tmp_path / "cv", tmp_path / "data"
    knees = copy_real_images(kneekl224, data / "train", 8, split="train")
    (data / "train" / "0" / "again.jpg").write_bytes(knees[0].read_bytes())  # scored once
    regraded = data / "train" / "3" / "regraded.jpg"
    regraded.write_bytes(knees[9].read_bytes())  # a grade-1 knee filed as 3 too: neither is scored
    unnamed = save(Image.fromarray(knee_image()), data / "train" / "2" / "scan.png")  # its own patient, and said so
    result = invoke_cli("cv", "--data", str(data), "--model", "msa_net", "--folds", "3", "--out", str(out), *TINY_CV)
    assert result.returncode == 0, result.stderr[-3000:]
    rows = list(csv.DictReader((out / "oof_predictions.csv").open()))
    assert {int(r["fold"]) for r in rows} == {0, 1, 2}
    assert len(rows) == 40 and {r["path"] for r in rows}.isdisjoint({str(knees[9]), str(regraded)})
    assert listed == [str(data)] * 3
    assert "repeat the bytes of another" in result.stderr
    assert "share their bytes with a file of another grade" in result.stderr
    said = result.stderr.splitlines()
    assert len(said) == len(set(said))  # a note on the data once, not once per fold
    patients = [{r["patient_id"] for r in rows if r["fold"] == str(k)} for k in range(3)]
    assert all(patients[i].isdisjoint(patients[j]) for i in range(3) for j in range(i + 1, 3))
    for row in rows:
        assert abs(sum(float(row[f"prob_{k}"]) for k in range(5)) - 1) < 1e-3
    summary = json.loads((out / "cv_metrics.json").read_text())
    assert len(summary["per_fold"]) == 3
    assert {"accuracy", "f1_macro", "mcc", "qwk", "mae"} <= set(summary["mean_sd"])
    assert "mean +/- sd" in (out / "cv_summary.md").read_text()
    # The copies are the named knees they copy; the one knee that names no patient is said, in the summary too.
    assert [w.split(" (")[0] for w in summary["warnings"]] == ["cross-validated knees: 1 of 43 knees name no patient"]
    assert f"e.g. {unnamed}" in summary["warnings"][0] and f"Warning: {summary['warnings'][0]}." in (
        out / "cv_summary.md").read_text()
    for fold in range(3):  # the scored model was chosen by nothing that saw the fold's patients
        selection = json.loads((out / f"fold{fold}" / "selection.json").read_text())
        assert selection["checkpoint"] == "last.safetensors" and selection["selection_patients"] == []
        kept = {path.name for path in (out / f"fold{fold}").iterdir() if path.suffix in (".ckpt", ".safetensors")}
        assert kept == {"last.safetensors"}  # resume state and the val-chosen weights are spent once the fold is done
    fold0 = [r for r in rows if r["fold"] == "0"]
    scored = load_model(out / "fold0" / "last.safetensors", tta=False)
    expected = scored.probabilities(decode_all([Sample(r["path"], int(r["true"]), r["patient_id"]) for r in fold0],
                                               scored.preprocess).images)
    np.testing.assert_allclose([[float(r[f"prob_{k}"]) for k in range(5)] for r in fold0], expected, atol=2e-6)
    refused = invoke_cli("cv", "--data", str(data), "--model", "msa_net", "--folds", "3", "--out",
                         str(tmp_path / "early"), "--patience", "2", *TINY_CV)
    assert refused.returncode == 1 and "--patience would stop each fold" in refused.stderr
    one_fold = invoke_cli("cv", "--data", str(data), "--model", "msa_net", "--folds", "3", "--out",
                          str(tmp_path / "one"), "--fold", "1", *TINY_CV)  # was ignored: every fold ran
    assert one_fold.returncode == 1 and "--fold 1 chooses the held-out fold of one `klgrade train` run" in \
        one_fold.stderr
    finished = (out / "fold1" / "oof.csv").stat().st_mtime_ns
    again = invoke_cli("cv", "--data", str(data), "--model", "msa_net", "--folds", "3", "--out", str(out), *TINY_CV)
    assert again.returncode == 0
    assert (out / "fold1" / "oof.csv").stat().st_mtime_ns == finished
    # A fold's predictions cut short (a copied run folder), here at a row's end: graded again by the fold's model, not
    # trained again.
    whole, model_made = (out / "fold1" / "oof.csv").read_text(), (out / "fold1" / "last.safetensors").stat().st_mtime_ns
    (out / "fold1" / "oof.csv").write_text(whole[: whole.index("\n", len(whole) // 2) + 1])
    regraded = invoke_cli("cv", "--data", str(data), "--model", "msa_net", "--folds", "3", "--out", str(out), *TINY_CV)
    assert regraded.returncode == 0, regraded.stderr[-2000:]
    assert f"{out / 'fold1' / 'oof.csv'} is damaged" in regraded.stderr and "graded again by its model" in regraded.stderr
    assert (out / "fold1" / "oof.csv").read_text() == whole
    assert (out / "fold1" / "last.safetensors").stat().st_mtime_ns == model_made
    # Other options or other knees: the finished folds would have been read as if made with them.
    longer = invoke_cli("cv", "--data", str(data), "--model", "msa_net", "--folds", "3", "--out", str(out),
                        *TINY_CV[:1], "2", *TINY_CV[2:])
    assert longer.returncode == 1 and longer.stderr == (
        f"error: {out}: its folds were made with other --epochs than now (the data or the options changed since?): "
        "their figures would be mixed with new ones; give another --out, or delete it to start again\n")
    save(Image.fromarray(knee_image()), data / "train" / "4" / "added.png")
    grown = invoke_cli("cv", "--data", str(data), "--model", "msa_net", "--folds", "3", "--out", str(out), *TINY_CV)
    assert grown.returncode == 1 and "made with other knees than now" in grown.stderr
    assert (out / "fold1" / "oof.csv").read_text() == whole


@pytest.mark.parametrize("cut", ["mid_row", "mid_number", "header_only", "no_fields"])
def test_out_of_fold_predictions_no_longer_whole_are_told_from_whole_ones(tmp_path, cut):
    from klgrade.experiments.cv import OOF_COLUMNS, read_oof
    from klgrade.files import rows_to_csv

    rows = [{"fold": 0, "path": f"0/{k}.png", "patient_id": str(k), "true": k % 5, "predicted": 2,
             "prob_0": 0.123456, "prob_1": 0.2, "prob_2": 0.3, "prob_3": 0.1, "prob_4": 0.276544} for k in range(4)]
    whole = rows_to_csv(rows, OOF_COLUMNS)
    (tmp_path / "whole.csv").write_text(whole)
    assert read_oof(tmp_path / "whole.csv") == rows
    damaged = {"mid_row": whole[: whole.rindex(",0.2,")], "mid_number": whole[:-4] + "\n",
               "header_only": whole.splitlines(keepends=True)[0], "no_fields": "fold;path\n0;x\n"}[cut]
    (tmp_path / "damaged.csv").write_text(damaged)
    assert read_oof(tmp_path / "damaged.csv") is None


def test_a_damaged_timing_or_training_log_is_left_out_with_a_warning(tmp_path, caplog):
    from klgrade.experiments.protocol import training_seconds
    from klgrade.experiments.report import _plot_curves

    run = tmp_path / "runs" / "msa_net"
    for fold, text in enumerate(['{"seconds": 12.5}', '{"seconds": 4', "[1, 2]"]):
        (run / f"fold{fold}").mkdir(parents=True)
        (run / f"fold{fold}" / "timing.json").write_text(text)
    assert training_seconds(run, 4) == 12.5  # fold 3 has not run
    assert f"{run / 'fold1' / 'timing.json'} is damaged" in caplog.text
    assert f"{run / 'fold2' / 'timing.json'} is damaged" in caplog.text
    (run / "fold0" / "metrics.json").write_text('{"history": [{"epoch": 0, "qwk": 0.')
    _plot_curves({"variants": {"msa_net": {}}}, tmp_path, tmp_path / "curves.png")
    assert (tmp_path / "curves.png").stat().st_size > 1000
    assert f"{run / 'fold0' / 'metrics.json'} is damaged (a copy cut short, an edit?): no curve of it" in caplog.text


def test_reproduce_quick_profile_reports_every_model_ablation_and_metric(kneekl224, tmp_path, monkeypatch):
    out, external = tmp_path / "paper", tmp_path / "external"
    first = copy_real_images(kneekl224, external, 8, split="val")[0]
    (external / "0" / "again.jpg").write_bytes(first.read_bytes())  # one image twice
    trained = next((kneekl224 / "train" / "2").iterdir())
    (external / "2" / "renamed.jpg").write_bytes(trained.read_bytes())  # a knee the folds train on, under a new name
    result = invoke_cli("reproduce", "--data", str(kneekl224), "--out", str(out), "--profile", "quick", "--device", "cpu",
                        "--external", str(external))
    assert result.returncode == 0, result.stderr[-3000:]
    left_out = [f"--external {external}: 1 file(s) repeat the bytes of another (a row listed twice or a copy, e.g. "
                f"{external / '0' / 'again.jpg'}): each image counted once",
                f"--external {external}: 1 of 41 knees are in the train split (the same patient or the same file, "
                f"e.g. {external / '2' / 'renamed.jpg'}): left out, the other 40 kept"]
    assert all(warning in result.stderr for warning in left_out)
    report = (out / "report.md").read_text()
    for variant in VARIANTS:
        assert f"| {variant.name} |" in report
    for name in ("resnet18", "resnet50", "mobilenet_v2", "densenet121", "msa_net+kd", "msa_net -fpn", "msa_net -se",
                 "msa_net -attention"):
        assert name in report
    for metric in ("accuracy", "precision_macro", "f1_macro", "mcc", "qwk", "mae"):
        assert metric in report
    assert "5-fold" not in report and "2-fold patient-grouped stratified CV on the train split" in report
    for section in ("Cross-validation", "Internal validation", "External validation", "Misclassification",
                    "Against msa_net"):
        assert section in report
    results = json.loads((out / "results.json").read_text())
    assert list(results["variants"]) == results["selected"] == [v.name for v in VARIANTS]
    assert results["left_out"] == {"external": "; ".join(left_out)} and f"Not scored: {'; '.join(left_out)}." in report
    assert all(entry["external"]["n"] == 40 for entry in results["variants"].values())
    in_val = (f"--external {external}: 40 of 40 knees are in val too (the same patient or the same file, e.g. "
              f"{external / '0' / first.name}): the external figures are not independent of the internal ones")
    assert results["external_in_val"] == in_val and f"Not independent: {in_val}." in report and in_val in result.stderr
    kd = json.loads((out / "runs" / "msa_net_kd" / "fold0" / "metrics.json").read_text())
    assert len(kd["config"]["teacher"]) == 4
    assert results["unfinished"] == [] and "time budget" not in report
    assert results["warnings"] == [] and "## Warnings" not in report  # OAI ids name every knee left in
    # Each validation set also shows each variant's fold ensemble (one model's figures), with its intervals.
    assert report.count("Fold ensemble (the mean of each variant's fold models' probabilities)") == 2
    ensemble = results["variants"]["msa_net"]["external"]["fold_ensemble"]
    assert (f"| msa_net | {ensemble['accuracy']:.3f} [{ensemble['ci95']['accuracy'][0]:.3f}, "
            f"{ensemble['ci95']['accuracy'][1]:.3f}] |") in report
    # Every other model against msa_net on the same knees (held out in CV; val; external), with a paired interval:
    # the difference of the fold means.
    compared = [name for name in results["variants"] if name != "msa_net"]
    assert len(compared) == 8
    for which in ("cv", "internal", "external"):
        full = results["variants"]["msa_net"][which]["mean_sd"]
        for name in compared:
            paired = results["variants"][name][which]["difference_to_msa_net"]
            for metric in ("accuracy", "qwk", "mcc"):
                mean = results["variants"][name][which]["mean_sd"][metric]["mean"]
                assert paired[metric]["difference"] == pytest.approx(mean - full[metric]["mean"], abs=1e-9)
                low, high = paired[metric]["ci95"]
                assert low <= paired[metric]["difference"] <= high
                assert f"| {mean:.3f} | {paired[metric]['difference']:+.3f} [{low:+.3f}, {high:+.3f}] |" in report
    # The fold ensembles too, each against msa_net's on the same validation images.
    for which in ("internal", "external"):
        full = results["variants"]["msa_net"][which]["fold_ensemble"]
        for name in compared:
            ensemble = results["variants"][name][which]["fold_ensemble"]
            paired = ensemble["difference_to_msa_net"]["qwk"]
            assert paired["difference"] == pytest.approx(ensemble["qwk"] - full["qwk"], abs=1e-9)
            assert paired["ci95"][0] <= paired["difference"] <= paired["ci95"][1]
            assert f"| {ensemble['qwk']:.3f} | {paired['difference']:+.3f} [{paired['ci95'][0]:+.3f}, " in report
    assert "### internal validation on `val`, fold ensembles" in report
    differences = list(csv.DictReader((out / "differences.csv").open()))
    assert [(row["variant"], row["set"], row["metric"]) for row in differences][:2] == [
        ("resnet18", "cv", "accuracy"), ("resnet18", "cv", "f1_macro")]
    assert {row["set"] for row in differences} == {"cv", "internal", "external", "internal fold ensemble",
                                                   "external fold ensemble"}
    assert len(differences) == 8 * 5 * 5
    from klgrade.experiments import protocol

    graded = []  # a rerun grades no validation set again whose fold models and images are unchanged
    monkeypatch.setattr(protocol, "batched_outputs", lambda *args: graded.append(args) or batched_outputs(*args))
    again = invoke_cli("reproduce", "--data", str(kneekl224), "--out", str(out), "--profile", "quick", "--device",
                       "cpu", "--time-budget", "0")  # every fold is done: a spent budget stops nothing
    assert again.returncode == 0 and json.loads((out / "results.json").read_text())["unfinished"] == []
    rerun = json.loads((out / "results.json").read_text())["variants"]
    assert graded == [] and {name: entry["internal"] for name, entry in rerun.items()} == \
        {name: entry["internal"] for name, entry in results["variants"].items()}
    fresh = invoke_cli("reproduce", "--data", str(kneekl224), "--out", str(tmp_path / "fresh"), "--profile", "quick",
                       "--device", "cpu", "--time-budget", "0")
    assert fresh.returncode == 0, fresh.stderr[-2000:]
    assert "unfinished" in fresh.stdout
    stopped = json.loads((tmp_path / "fresh" / "results.json").read_text())
    assert stopped["unfinished"] == [v.name for v in VARIANTS] and stopped["variants"] == {}
    assert "Stopped by the time budget" in (tmp_path / "fresh" / "report.md").read_text()
    assert not list((tmp_path / "fresh" / "runs").rglob("*.safetensors"))
    for figure in ("folds.png", "curves.png", "gradcam_panel.png", "confusion_msa_net.png"):
        assert (out / "figures" / figure).stat().st_size > 1000
    (out / "runs" / "resnet18" / "validation_internal.json").write_text('{"key": "trunc')  # damaged after the run
    again = invoke_cli("reproduce", "--data", str(kneekl224), "--out", str(out), "--profile", "quick", "--device",
                       "cpu", "--time-budget", "0", "--variant", "resnet18")
    assert again.returncode == 0, again.stderr[-2000:]
    assert len(graded) == 2  # resnet18's two fold models graded val again; the same figures
    regraded = json.loads((out / "results.json").read_text())["variants"]["resnet18"]["internal"]
    before = results["variants"]["resnet18"]["internal"]
    before["fold_ensemble"].pop("difference_to_msa_net")  # msa_net is not in this run
    assert regraded == {key: value for key, value in before.items() if key != "difference_to_msa_net"}
    # A run folder made with other options is refused before anything is trained or graded.
    recorded = json.loads((out / "runs" / "resnet18" / "cv_run.json").read_text())
    recorded["options"]["epochs"] += 1
    (out / "runs" / "resnet18" / "cv_run.json").write_text(json.dumps(recorded))
    graded.clear()
    refused = invoke_cli("reproduce", "--data", str(kneekl224), "--out", str(out), "--profile", "quick", "--device",
                         "cpu", "--variant", "resnet18")
    assert refused.returncode == 1 and graded == []
    assert f"error: {out / 'runs' / 'resnet18'}: its folds were made with other --epochs than now" in refused.stderr


def test_an_external_set_is_said_to_repeat_val_only_where_it_shares_a_knee_with_it(kneekl224, tmp_path):
    """Shared knees (a copy, or the other knee of a val patient) make the external figures repeat the internal ones;
    a set apart from val gets no such note."""
    val = select_split(find_samples(kneekl224), "val")
    copy_real_images(kneekl224, tmp_path / "apart", 1, split="train")
    apart = find_samples(tmp_path / "apart")
    assert knees_in_val(val, apart, "--external x") is None
    patient = val[0].patient_id
    other_side = "R" if val[0].side == "L" else "L"
    other_knee = save(Image.fromarray(knee_image()), tmp_path / "shared" / "0" / f"{patient}{other_side}.png")
    shared = apart + find_samples(other_knee.parent.parent)
    assert knees_in_val(val, shared, "--external x") == (
        f"--external x: 1 of 6 knees are in val too (the same patient or the same file, e.g. {other_knee}): the "
        f"external figures are not independent of the internal ones")


def test_variants_are_chosen_by_report_or_folder_name_and_a_student_brings_its_teachers(tmp_path):
    assert select_variants(None) == select_variants([]) == VARIANTS
    assert [v.name for v in select_variants(["msa_net_no_fpn", "resnet18"])] == ["resnet18", "msa_net -fpn"]
    assert [v.name for v in select_variants(["msa_net+kd"])] == [*BASELINES, "msa_net+kd"]
    assert [v.name for v in select_variants(["msa_net_kd", "resnet50"])] == [*BASELINES, "msa_net+kd"]
    unknown = invoke_cli("reproduce", "--data", str(tmp_path), "--out", str(tmp_path / "out"), "--variant", "resnet19")
    assert unknown.returncode == 1 and "'resnet19'" in unknown.stderr and "msa_net_no_attention" in unknown.stderr
    assert not (tmp_path / "out" / "runs").exists()


def test_the_report_claims_internal_validation_only_where_there_was_a_val_split(tmp_path):
    import warnings

    from klgrade.experiments.cv import mean_sd
    from klgrade.experiments.report import _markdown, write_report
    from klgrade.metrics import compute_metrics

    metrics = compute_metrics([0, 1, 2, 3, 4], np.eye(5), n_boot=0)
    entry = {"cv": {"mean_sd": mean_sd([metrics]), "per_fold": [metrics], "pooled_oof": metrics}, "train_s": 1.0,
             "ablation": False, "distilled": False}
    results = {"profile": "quick", "data": "knees", "external": None, "folds": 1, "variants": {"resnet18": entry},
               "selected": ["resnet18"], "unfinished": [], "device": "CPU", "jobs": 1, "wall_s": 1.0,
               "cv_on": "all its images (no splits)"}
    without_val = _markdown(results, None)
    assert "no `val` split to validate on" in without_val and "internal validation" not in without_val.lower()
    assert "CV on all its images (no splits)" in without_val  # a folder of grade folders has no train split
    # Only what ran: no distillation sentence, no ablation table without msa_net and a variant of it.
    assert "distilled" not in without_val and "Against msa_net" not in without_val
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no training curve to draw (no fold 0 ran here): no empty legend either
        write_report(results, tmp_path, [])
    assert (tmp_path / "figures" / "curves.png").stat().st_size > 1000
    entry["internal"] = {"mean_sd": mean_sd([metrics]),
                         "fold_ensemble": compute_metrics([0, 1, 2, 3, 4], np.eye(5), n_boot=10)}
    with_val = _markdown(results, None)
    assert "internal validation of every fold model on `val`" in with_val and "## Internal validation" in with_val
    results["warnings"] = ["cross-validated knees: 3 of 9 knees name no patient"]
    results["variants"] = {"msa_net": entry, "msa_net -se": {
        **entry, "ablation": True, "cv": {**entry["cv"], "difference_to_msa_net": {
            name: {"difference": -0.0123, "ci95": [-0.031, 0.0064]} for name in ("accuracy", "qwk", "mcc")}}}}
    ablations = _markdown(results, None).split("## Against msa_net")[1]
    assert "| msa_net -se | 1.000 | -0.012 [-0.031, +0.006] | 1.000 | -0.012 [-0.031, +0.006] |" in ablations
    assert "### CV mean" in ablations and "### internal validation" in ablations  # with no paired difference there:
    assert "### internal validation on `val`, fold ensembles" in ablations
    assert ablations.count("| msa_net -se | 1.000 | +0.000 | 1.000 | +0.000 | 1.000 | +0.000 |") == 2
    assert "## Warnings\n\n- cross-validated knees: 3 of 9 knees name no patient\n" in _markdown(results, None)


def test_a_validation_set_with_no_knee_outside_the_train_split_or_an_unreadable_image_stops_before_training(
        kneekl224, tmp_path):
    """Knees the folds train on are left out of a validation set (test_reproduce_quick_profile...); a set left with
    none, or holding a file that cannot be read, is refused before the hours of training, not after them."""
    data, out = tmp_path / "data", tmp_path / "out"
    trained = copy_real_images(kneekl224, data / "train", 2, split="train")
    copy_real_images(kneekl224, data / "val", 1, split="val")
    seen = copy_real_images(kneekl224, tmp_path / "external", 1, split="train")  # knees the folds train on
    external = invoke_cli("reproduce", "--data", str(data), "--out", str(out), "--external", str(tmp_path / "external"),
                          "--device", "cpu")
    assert external.returncode == 1
    assert (f"--external {tmp_path / 'external'}: {len(seen)} of {len(seen)} knees are in the train split (the same "
            f"patient or the same file, e.g. {seen[0]}): no knee left to validate the fold models on") in external.stderr
    for path in (data / "val").rglob("*.jpg"):
        path.unlink()
    (data / "val" / "0" / "renamed.jpg").write_bytes(trained[0].read_bytes())
    val = invoke_cli("reproduce", "--data", str(data), "--out", str(out), "--device", "cpu")
    assert val.returncode == 1 and "val: 1 of 1 knees are in the train split" in val.stderr
    copy_real_images(kneekl224, data / "val", 1, split="val")
    (data / "val" / "1" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    broken = invoke_cli("reproduce", "--data", str(data), "--out", str(out), "--device", "cpu")
    assert broken.returncode == 1
    assert f"val: 1 unreadable image(s), e.g. {data / 'val' / '1' / 'broken.png'}: " in broken.stderr
    assert not (out / "runs").exists()


def test_stored_validation_figures_are_not_read_back_by_other_code(tmp_path, monkeypatch):
    """A variant's validation figures stored by a run are read back only by the code that computed them: after an
    upgrade that scores otherwise, a rerun computes them again (the key held the models and the set only)."""
    from klgrade.data.preprocess import PreprocessConfig
    from klgrade.experiments import protocol
    from klgrade.experiments.cv import fold_model

    for fold in range(2):
        fold_model(tmp_path, fold).parent.mkdir(parents=True)
        fold_model(tmp_path, fold).write_bytes(b"weights")
    samples = [Sample(str(save(Image.fromarray(knee_image(seed=k)), tmp_path / f"900000{k}L.png")), k, "900000", "L")
               for k in range(2)]
    validation = protocol.ValidationSet(samples, np.zeros((2, 32, 32), np.uint8), PreprocessConfig(size=32), None)
    key = protocol.validation_key(tmp_path, 2, validation)
    assert protocol.validation_key(tmp_path, 2, validation) == key
    monkeypatch.setattr(protocol, "source_digest", lambda: "klgrade of another version")
    assert protocol.validation_key(tmp_path, 2, validation) != key


def test_an_external_set_of_one_grade_is_told_that_mcc_and_qwk_say_nothing_there(kneekl224, tmp_path):
    """Healthy controls only (all KL 0) as `--external`: every model's MCC and QWK there are 0 by their formulas, a
    column of zeros in the report that read as chance agreement."""
    healthy = tmp_path / "healthy" / "0"
    healthy.mkdir(parents=True)
    for path in sorted((kneekl224 / "val" / "0").iterdir())[:3]:
        (healthy / path.name).write_bytes(path.read_bytes())
    result = invoke_cli("reproduce", "--data", str(kneekl224), "--external", str(healthy.parent), "--out",
                        str(tmp_path / "paper"), "--profile", "quick", "--device", "cpu", "--time-budget", "0")
    assert result.returncode == 0, result.stderr[-2000:]
    warning = one_grade_warning(f"--external {healthy.parent}", 3)
    assert warning in json.loads((tmp_path / "paper" / "results.json").read_text())["warnings"]
    assert f"- {warning}" in (tmp_path / "paper" / "report.md").read_text()
