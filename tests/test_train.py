"""Training engine on small real subsets: CLI run, exact resume, distillation, fold hygiene."""

import csv
import json
import re
import signal
from dataclasses import replace

import pytest
import torch
from lightning.pytorch.callbacks import Callback
from PIL import Image
from safetensors.torch import load_file, save_file

from klgrade.data.provenance import knee_record, merge_records
from klgrade.data.sources import find_samples
from klgrade.data.splits import fold_split
from klgrade.errors import DataLayoutError, KLGradeError
from klgrade.models import create_model, load_checkpoint
from klgrade.models.weights import read_info
from klgrade.train.config import TrainConfig, load_config, resolve_precision
from klgrade.train.fit import fit, seen_records, select_data
from klgrade.train.record import run_record

from helpers import EXAMPLES, copy_real_images, invoke_cli, knee_image, run_cli, save, save_msa_net

TINY = {"model_options": {"width": 32, "heads": 2}, "image_size": 64, "batch_size": 8, "limit": 40,
        "quiet": True, "device": "cpu"}


class Interrupt(Exception):
    pass


class CrashMidEpoch(Callback):
    """Simulates a kill in the middle of epoch `epoch`."""

    def __init__(self, epoch: int, batch: int, error: type[BaseException] = Interrupt):
        self.epoch, self.batch, self.error = epoch, batch, error

    def on_train_batch_start(self, trainer, module, batch, batch_idx):
        if trainer.current_epoch == self.epoch and batch_idx == self.batch:
            raise self.error()


def test_train_cli_leaves_a_checkpoint_that_evaluate_reads(kneekl224, tmp_path):
    run = tmp_path / "run"
    result = run_cli("train", "--data", str(kneekl224), "--model", "msa_net", "--epochs", "2", "--limit", "64",
                     "--image-size", "96", "--device", "cpu", "--out", str(run))
    assert result.returncode == 0, result.stderr[-2000:]
    selection = json.loads((run / "metrics.json").read_text())["selection"]  # the cost of choosing the epoch on val
    assert result.stdout.splitlines()[-1] == (
        f"chosen on val, so optimistic there: an epoch chosen on half the val patients scores on the other half qwk "
        f"{selection['cross_fitted']['qwk']:.4f} (chosen epoch on all: {selection['chosen']['qwk']:.4f}), accuracy "
        f"{selection['cross_fitted']['accuracy']:.4f} ({selection['chosen']['accuracy']:.4f})")
    log = result.stderr + result.stdout
    assert log.count("GPU available") == 1 and "litlogger" not in log  # one line per message, no adverts
    assert {"best.safetensors", "last.safetensors", "last.ckpt", "metrics.json"} <= {p.name for p in run.iterdir()}
    model, info = load_checkpoint(run / "best.safetensors")
    assert info["model"]["name"] == "msa_net" and len(info["data_fingerprint"]) == 20
    assert set(info["val_metrics"]) >= {"accuracy", "qwk", "mcc"}
    assert info["train_config"]["precision"] == resolve_precision("auto", "cpu")  # what ran, not "auto"
    copy_real_images(kneekl224, tmp_path / "val", 4)
    evaluation = invoke_cli("evaluate", "--checkpoint", str(run / "best.safetensors"), "--data", str(tmp_path / "val"),
                            "--json")
    assert evaluation.returncode == 0, evaluation.stderr
    assert json.loads(evaluation.stdout)["n"] == 20
    # Scored on the very knees its epoch was chosen on, the warning says how much that choice cost there.
    chosen_on = select_data(TrainConfig(data=str(kneekl224), limit=64)).val
    listed = tmp_path / "chosen_on.csv"
    listed.write_text("path,grade\n" + "".join(f"{s.path},{s.grade}\n" for s in chosen_on))
    evaluation = invoke_cli("evaluate", "--checkpoint", str(run / "best.safetensors"), "--data", str(listed), "--json")
    cost = (f"; at training, an epoch chosen on half of its validation patients scored "
            f"{selection['chosen']['qwk'] - selection['cross_fitted']['qwk']:.3f} QWK and "
            f"{selection['chosen']['accuracy'] - selection['cross_fitted']['accuracy']:.3f} accuracy less on the "
            f"other half than the chosen epoch on all of them")
    assert (f"the model was chosen on {len(chosen_on)} of these {len(chosen_on)} knees: its scores on them are "
            f"optimistic (selection bias){cost}") in json.loads(evaluation.stdout)["warnings"]


def test_resume_after_a_kill_mid_epoch_ends_with_the_same_weights(kneekl224, tmp_path):
    base = {**TINY, "data": str(kneekl224), "epochs": 3, "ema": 0.9}
    straight_run = fit(TrainConfig(**base, out=str(tmp_path / "straight")))
    with pytest.raises(Interrupt):
        fit(TrainConfig(**base, out=str(tmp_path / "killed")), callbacks=[CrashMidEpoch(epoch=1, batch=2)])
    assert (tmp_path / "killed" / "last.ckpt").exists()
    resumed_run = fit(TrainConfig(**base, out=str(tmp_path / "killed"), resume=True))
    # The cost of choosing the epoch on val is read from every epoch's val grades, kept across the resume.
    selection = straight_run["selection"]
    assert selection == resumed_run["selection"] and selection["chosen_epoch"] == straight_run["best_epoch"]
    assert selection["chosen"]["qwk"] == pytest.approx(max(h["qwk"] for h in straight_run["history"]), abs=1e-6)
    straight = load_file(str(tmp_path / "straight" / "last.safetensors"))
    resumed = load_file(str(tmp_path / "killed" / "last.safetensors"))
    assert straight.keys() == resumed.keys()
    for key in straight:
        assert torch.equal(straight[key], resumed[key]), key
    history = json.loads((tmp_path / "killed" / "metrics.json").read_text())["history"]
    assert [h["epoch"] for h in history] == [0, 1, 2]


def test_ctrl_c_stops_a_fit_as_an_interrupt_and_leaves_ctrl_c_working(kneekl224, tmp_path):
    """Lightning turned Ctrl-C into `sys.exit(1)` and left SIGINT ignored: `train` exited 1, not 130, and a notebook
    that had interrupted one fit could not interrupt anything after it."""
    before = signal.getsignal(signal.SIGINT)
    try:
        with pytest.raises(KeyboardInterrupt):
            fit(TrainConfig(**TINY, data=str(kneekl224), epochs=2, out=str(tmp_path / "run")),
                callbacks=[CrashMidEpoch(epoch=0, batch=1, error=KeyboardInterrupt)])
        assert signal.getsignal(signal.SIGINT) is before
    finally:
        signal.signal(signal.SIGINT, before)


def test_resume_with_other_options_or_knees_is_refused_and_runtime_options_may_change(kneekl224, tmp_path):
    """`--resume` with another --epochs went on silently under a schedule of another length, another --model was a
    Lightning traceback of missing keys, fewer --epochs than trained one of "max_epochs"."""
    data = tmp_path / "data"
    copy_real_images(kneekl224, data / "train", 4, split="train")
    copy_real_images(kneekl224, data / "val", 2, split="val")
    run = tmp_path / "run"
    config = {**TINY, "limit": None, "data": str(data), "epochs": 1, "out": str(run)}
    fit(TrainConfig(**config))
    changes = {"--epochs": {"epochs": 2}, "--model, --option": {"model": "resnet18", "model_options": {}},
               "--image-size": {"image_size": 32}, "training knees": {"limit": 12},
               re.escape("weight_decay (--config)"): {"weight_decay": 0.5}}
    for changed, options in changes.items():
        with pytest.raises(KLGradeError, match=f"^{re.escape(str(run))}: its last.ckpt was trained with other "
                                               f"(--[a-z-]+, )*{changed}(, [a-z -]+)* than now") as refused:
            fit(TrainConfig(**{**config, **options}, resume=True))
        assert f"--init {run / 'last.safetensors'} and another --out" in str(refused.value)
    moved = tmp_path / "moved"
    data.rename(moved)  # the knees are the same wherever the data lies; threads and quiet say how, not what
    resumed = fit(TrainConfig(**{**config, "data": str(moved), "threads": 2, "quiet": False}, resume=True))
    assert [h["epoch"] for h in resumed["history"]] == [0]
    fit(TrainConfig(**{**config, "data": str(moved), "epochs": 2}))  # without --resume: a new run, recorded anew
    assert json.loads((run / "run.json").read_text())["options"]["epochs"] == 2


def test_the_run_record_names_each_training_option_as_the_cli_or_config_file_gives_it():
    """A changed model option was named `--model-options` (the flag is `--option`), an option only a --config file
    sets `--weight-decay` (no such flag)."""
    import typer

    from klgrade.cli import app
    from klgrade.train.record import CONFIG_FILE_OPTIONS, RUNTIME_OPTIONS, option_name

    flags = {flag for param in typer.main.get_command(app).commands["train"].params for flag in param.opts}
    for key in TrainConfig().to_dict().keys() - RUNTIME_OPTIONS:
        name = option_name(key)
        assert (key in CONFIG_FILE_OPTIONS) == (name not in flags), (key, name)


def test_a_run_record_names_teacher_and_init_weights_by_what_they_hold(tiny_checkpoint, tmp_path):
    """Moving a folder of teachers keeps a run's record; weights trained again under the same name change it."""
    moved = tmp_path / "moved.safetensors"
    moved.write_bytes(tiny_checkpoint.read_bytes())
    config = TrainConfig(data=str(tmp_path), teacher=[str(tiny_checkpoint)], init=str(tiny_checkpoint))
    record = run_record(config, {})
    assert record == run_record(replace(config, teacher=[str(moved)], init=str(moved)), {})
    save_msa_net(moved, create_model("msa_net", width=32, heads=2), {"width": 32, "heads": 2}, size=64)
    assert run_record(replace(config, teacher=[str(moved)]), {})["options"]["teacher"] != record["options"]["teacher"]
    assert run_record(replace(config, init=str(tmp_path / "missing.pt")), {})["options"]["init"] == str(
        tmp_path / "missing.pt")


def test_a_damaged_resume_state_is_said_and_the_run_starts_from_scratch(kneekl224, tmp_path, caplog):
    """A `last.ckpt` cut short (a copied run folder) stopped `--resume` and every rerun of a CV with the system's
    words alone ("error: Invalid argument")."""
    (tmp_path / "last.ckpt").write_bytes(b"PK\x03\x04" + bytes(3000))
    run = fit(TrainConfig(**{**TINY, "limit": 24}, data=str(kneekl224), epochs=1, out=str(tmp_path), resume=True))
    assert [h["epoch"] for h in run["history"]] == [0]
    assert f"--resume: {tmp_path / 'last.ckpt'} is damaged" in caplog.text and "starting from scratch" in caplog.text


def _logged_rows(run) -> list[dict]:
    with open(run / "logs" / "metrics.csv", newline="") as file:
        return list(csv.DictReader(file))


def test_a_resumed_run_keeps_its_training_curves(kneekl224, tmp_path):
    """Lightning's CSV writer deleted metrics.csv on resume: the curves before the kill were lost."""
    config = {**TINY, "data": str(kneekl224), "epochs": 3, "out": str(tmp_path)}
    with pytest.raises(Interrupt):
        fit(TrainConfig(**config), callbacks=[CrashMidEpoch(epoch=2, batch=2)])
    fit(TrainConfig(**config, resume=True))
    rows = _logged_rows(tmp_path)
    assert [int(row["epoch"]) for row in rows if row["val/qwk"]] == [0, 1, 2]
    steps = [int(row["step"]) for row in rows]
    assert steps == sorted(steps) and len(rows) == len({(row["step"], bool(row["val/qwk"])) for row in rows})


def test_the_resumed_log_drops_rows_after_the_checkpoint_and_appends_under_the_same_columns(tmp_path):
    from klgrade.train.fit import ResumedCSVLogger

    (tmp_path / "logs").mkdir()
    (tmp_path / "logs" / "metrics.csv").write_text("epoch,step,train/loss,val/qwk\n0,4,1.5,\n0,4,,0.2\n1,9,1.2,\n")
    logger = ResumedCSVLogger(tmp_path, name="logs", version="", before_step=5)
    logger.log_metrics({"epoch": 1, "train/loss": 1.1}, step=9)
    logger.save()
    rows = _logged_rows(tmp_path)
    assert [(row["step"], row["train/loss"], row["val/qwk"]) for row in rows] == [
        ("4", "1.5", ""), ("4", "", "0.2"), ("9", "1.1", "")]


@pytest.mark.parametrize("cut_short", ["1,", "1", "1,9x"])
def test_the_resumed_log_keeps_the_whole_rows_of_a_log_cut_short(tmp_path, cut_short):
    from klgrade.train.fit import ResumedCSVLogger

    (tmp_path / "logs").mkdir()
    (tmp_path / "logs" / "metrics.csv").write_text(f"epoch,step,train/loss\n0,4,1.5\n{cut_short}")
    logger = ResumedCSVLogger(tmp_path, name="logs", version="", before_step=5)
    logger.log_metrics({"epoch": 1, "train/loss": 1.1}, step=6)
    logger.save()
    assert [(row["step"], row["train/loss"]) for row in _logged_rows(tmp_path)] == [("4", "1.5"), ("6", "1.1")]


def test_same_seed_same_weights_on_cpu(kneekl224, tmp_path):
    base = {**TINY, "data": str(kneekl224), "epochs": 1, "limit": 24}
    fit(TrainConfig(**base, out=str(tmp_path / "a")))
    fit(TrainConfig(**base, out=str(tmp_path / "b")))
    a, b = (load_file(str(tmp_path / r / "last.safetensors")) for r in ("a", "b"))
    assert all(torch.equal(a[k], b[k]) for k in a)


def _mean_kl_to(teacher_path, student_path, images):
    teacher, _ = load_checkpoint(teacher_path)
    student, _ = load_checkpoint(student_path)
    with torch.no_grad():
        p = teacher(images).softmax(1)
        q = student(images).log_softmax(1)
    return float((p * (p.log() - q)).sum(1).mean())


def test_distillation_moves_the_student_toward_the_teacher(kneekl224, tmp_path):
    base = {**TINY, "data": str(kneekl224), "limit": 48, "lr": 3e-3}
    fit(TrainConfig(**{**base, "model_options": {}}, epochs=3, out=str(tmp_path / "teacher"), model="resnet18"))
    teacher = tmp_path / "teacher" / "last.safetensors"
    fit(TrainConfig(**base, epochs=1, out=str(tmp_path / "plain"), kd_alpha=1.0, seed=5))
    fit(TrainConfig(**base, epochs=1, out=str(tmp_path / "student"), teacher=[str(teacher), str(teacher)],
                    kd_alpha=1.0, kd_temperature=2.0, seed=5))
    images = torch.randn(16, 1, 64, 64)
    distilled = _mean_kl_to(teacher, tmp_path / "student" / "last.safetensors", images)
    undistilled = _mean_kl_to(teacher, tmp_path / "plain" / "last.safetensors", images)
    assert distilled < undistilled


def test_init_starts_fine_tuning_from_the_given_weights(kneekl224, tmp_path):
    base = {**TINY, "data": str(kneekl224), "epochs": 1, "limit": 24}
    fit(TrainConfig(**base, out=str(tmp_path / "first")))
    first = tmp_path / "first" / "last.safetensors"
    # At learning rate 0 the parameters must stay exactly the loaded ones, at another resolution too.
    fit(TrainConfig(**{**base, "image_size": 96}, lr=0.0, seed=3, init=str(first), out=str(tmp_path / "tuned")))
    model, first_info = load_checkpoint(first)
    tuned, info = load_checkpoint(tmp_path / "tuned" / "last.safetensors")
    assert info["preprocess"]["size"] == 96
    # Each run records the knees it trained on, and for its best epoch the knees that chose it (the last epoch of
    # a fixed schedule was chosen on none); the tuned weights have seen the first run's knees too.
    data = select_data(TrainConfig(**base, out=str(tmp_path / "first")))
    nothing = {"patients": [], "files": []}
    assert first_info["seen"] == {"trained": knee_record(data.train), "chosen": nothing}
    assert read_info(tmp_path / "first" / "best.safetensors")["seen"]["chosen"] == knee_record(data.val)
    tuned_data = select_data(TrainConfig(**base, seed=3, out=str(tmp_path / "tuned")))
    assert info["seen"]["trained"] == merge_records([first_info["seen"]["trained"], knee_record(tuned_data.train)])
    assert len(info["seen"]["trained"]["files"]) > len(first_info["seen"]["trained"]["files"])
    assert info["seen"]["chosen"] == nothing
    # Weights started from a best epoch carry the knees that chose it.
    assert seen_records(tuned_data, str(tmp_path / "first" / "best.safetensors"), False)["last"]["chosen"] == \
        knee_record(data.val)
    expected = dict(model.named_parameters())
    for name, parameter in tuned.named_parameters():
        assert torch.equal(parameter, expected[name]), name


def test_init_from_an_unrelated_file_is_a_one_line_error(kneekl224, tmp_path):
    """A picture, an ONNX file, a checkpoint cut short or a pickled list given as --init were tracebacks from
    torch.load or safetensors."""
    save_file(create_model("mobilenet_v2").state_dict(), str(tmp_path / "other.safetensors"))
    (tmp_path / "cut.safetensors").write_bytes((tmp_path / "other.safetensors").read_bytes()[:2000])
    (tmp_path / "knee.jpg").write_bytes(sorted(EXAMPLES.glob("*.jpg"))[0].read_bytes())
    torch.save([1, 2], tmp_path / "list.pt")
    unreadable = "not a whole weights file (a .safetensors checkpoint or a torch state dict)"
    for init, message in ((tmp_path / "other.safetensors", "no tensor matches"),
                          (tmp_path / "missing.safetensors", "not found"), (tmp_path / "cut.safetensors", unreadable),
                          (tmp_path / "knee.jpg", unreadable), (tmp_path / "list.pt", "holds no state dict")):
        result = invoke_cli("train", "--data", str(kneekl224), "--out", str(tmp_path / "r"), "--limit", "16",
                            "--device", "cpu", "--init", str(init), "--quiet")
        assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr[-1000:]
        assert message in result.stderr and str(init) in result.stderr


def test_validation_fold_never_shares_a_patient_with_training(kneekl224):
    config = TrainConfig(data=str(kneekl224), fold=2, folds=5)
    data = select_data(config)
    assert {s.patient_id for s in data.train}.isdisjoint({s.patient_id for s in data.val})
    train = [s for s in find_samples(kneekl224) if s.split == "train"]
    held = [fold_split(train, k, 5, 0)[1] for k in range(5)]
    patients = [{s.patient_id for s in fold} for fold in held]
    for i in range(5):
        for j in range(i + 1, 5):
            assert patients[i].isdisjoint(patients[j])
    assert sum(len(f) for f in held) == len(train)


def test_a_split_root_of_numbered_files_trains_and_a_file_copied_across_its_splits_is_refused(tmp_path):
    """Names such as `1.png` in train and in val are other knees (only an OAI name or a manifest's patient_id names
    a patient); the same bytes under another name are the same knee."""
    for split, seed in (("train", 0), ("val", 10)):
        for grade in range(5):
            for number in range(2):
                image = Image.fromarray(knee_image(seed + 2 * grade + number))
                save(image, tmp_path / split / str(grade) / f"{number}.png")
    summary = json.loads(invoke_cli("data", "summary", str(tmp_path), "--json").stdout)
    assert summary["patient_overlap"] == summary["file_overlap"] == {"train/val": 0}
    assert summary["splits"]["train"]["patients"] == 10  # 0/0.png and 1/0.png are two knees, not one patient's
    data = select_data(TrainConfig(data=str(tmp_path)))
    assert len(data.train) == len(data.val) == 10
    copied = tmp_path / "val" / "3" / "copy.png"
    copied.write_bytes((tmp_path / "train" / "1" / "0.png").read_bytes())
    assert json.loads(invoke_cli("data", "summary", str(tmp_path), "--json").stdout)["file_overlap"] == {"train/val": 1}
    expected = f"training and validation data share 1 knee(s) (the same patient or the same file), e.g. {copied}"
    with pytest.raises(DataLayoutError, match=f"^{re.escape(expected)}$"):
        select_data(TrainConfig(data=str(tmp_path)))
    copied.unlink()  # copies inside the training data: each image trained on once, none with two grades
    (tmp_path / "train" / "0" / "again.png").write_bytes((tmp_path / "train" / "0" / "0.png").read_bytes())
    regraded = tmp_path / "train" / "4" / "regraded.png"
    regraded.write_bytes((tmp_path / "train" / "2" / "1.png").read_bytes())
    data = select_data(TrainConfig(data=str(tmp_path)))
    assert len(data.train) == 9 and {str(tmp_path / "train" / "2" / "1.png"), str(regraded)}.isdisjoint(
        s.path for s in data.train)
    assert [note.split(":")[0] for note in data.notes] == ["training data"] * 2 + ["training and validation data"]
    assert data.notes[2].startswith("training and validation data: 19 of 19 knees name no patient")
    # A model that mirrors left knees is told which knees have no side (these names give none): it sees them as stored.
    mirroring = select_data(TrainConfig(data=str(tmp_path), canonical_side=True))
    assert [note.split(" (")[0] for note in mirroring.notes[2:4]] == ["training data: 9 of 9 knees have no side",
                                                                      "validation data: 10 of 10 knees have no side"]


def test_folds_without_a_fold_is_said_not_read_past(kneekl224):
    """`train --folds 3` without `--fold` validated on val and never said that the option did nothing."""
    ignored = select_data(TrainConfig(data=str(kneekl224), limit=8, folds=3)).notes
    assert ignored[0] == ("--folds 3 is read only with --fold K (or by `klgrade cv`): this run validates on the val "
                          "split")
    assert not any("--folds" in note for note in select_data(TrainConfig(data=str(kneekl224), limit=8)).notes)
    assert not any("--folds" in note for note in select_data(TrainConfig(data=str(kneekl224), limit=8, fold=1,
                                                                          folds=3)).notes)


def test_yaml_config_with_cli_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("model: resnet18\nepochs: 7\nlr: 0.01\naugment: {rotate_deg: 5}\n")
    config = load_config(path, {"epochs": 3, "data": "d", "lr": None})
    assert (config.model, config.epochs, config.lr, config.augment["rotate_deg"]) == ("resnet18", 3, 0.01, 5)
    assert config.augment["flip_prob"] == 0.5
    path.write_text("epochz: 3\n")
    with pytest.raises(Exception, match="epochz"):
        load_config(path, {})


@pytest.mark.parametrize("yaml_text, message", [
    ("lr: -1", "--lr must be above 0, not -1"), ("lr: .nan", "option lr must be a finite number, not nan"),
    ("lr: fast", "option lr must be a finite number, not 'fast'"), ("ema: 1.0", "--ema must be in [0, 1), not 1.0"),
    ("label_smoothing: 1", "--label-smoothing must be in [0, 1), not 1"),
    ("kd_temperature: 0", "--kd-temperature must be above 0, not 0"), ("weight_decay: -0.1", "must be at least 0"),
    ("warmup_epochs: -1", "--warmup-epochs must be at least 0"), ("patience: -2", "--patience must be at least 0"),
    ("threads: 0", "--threads must be at least 1"), ("epochs: 3.5", "option epochs must be a whole number, not 3.5"),
    ("seed: -1", "--seed must be in [0, 2**32), not -1"),
    ("image_size: 100000", "--image-size must be from 32 to 1024 px, not 100000"),
    ("image_size: 16", "--image-size must be from 32 to 1024 px, not 16"),
    ("clahe: 'no'", "option clahe must be true or false, not 'no'"),
    ("teacher: a.safetensors", "option teacher must be a list of texts"),
    ("augment: 5", "option augment must be a mapping, not 5"),
    ("augment: {rotate: 5}", "augment: unknown option(s) ['rotate']"),
    ("domain: {clahe_probability: 0.5}", "domain: unknown option(s) ['clahe_probability']"),
    ("augment: {rotate_deg: ten}", "augment: rotate_deg must be a number, not 'ten'"),
    ("domain: {clahe_clip: 4}", "domain: clahe_clip must be a list of numbers, not 4"),
    ("domain: {gamma: [0.5, .inf]}", "domain: gamma must be a list of numbers")])
def test_a_config_value_out_of_range_or_of_the_wrong_type_is_a_one_line_error(tmp_path, yaml_text, message):
    """Such values failed deep inside training with a traceback (`lr: -1` in AdamW; `augment: {rotate: 5}` only
    once the model was built)."""
    path = tmp_path / "c.yaml"
    path.write_text(yaml_text + "\n")
    with pytest.raises(KLGradeError, match=re.escape(message)):
        load_config(path, {"data": "d"})


@pytest.mark.parametrize("text, message", [
    (b"epochs: 2\n\tlr: 1\n", "not valid YAML (found character '\\t' that cannot start any token at line 2, column 1)"),
    (b"augment: [1,\n", "not valid YAML (expected the node content, but found '<stream end>' at line 2, column 1)"),
    (b"\xff\xd8\xff\xe0 a JPEG", "config is not UTF-8 text (a YAML file of option: value)"),
    (b"augment: {a: &a [1, 1], b: [*a, *a]}\n",
     "not valid YAML (aliases (*name) are not taken in klgrade options at line 1, column 29)"),
    (b"model_options: {x: " + b"[" * 5000 + b"]" * 5000 + b"}\n", "not valid YAML (nested too deeply)"),
    (b"# " + b"-" * (1 << 20) + b"\nepochs: 2\n", "larger than 1 MiB: not a config of options")])
def test_a_config_that_is_no_yaml_is_a_one_line_error(tmp_path, kneekl224, text, message):
    """PyYAML's messages span four lines and quote the line; a binary file (a picture given by mistake) was a
    traceback (UnicodeDecodeError); aliases of aliases nine deep, ten each (a "billion laughs" under 1 KB), ran out of
    memory once the options were written out (a MemoryError under a 4 GB limit); 5000 nested brackets were a
    RecursionError; a config was read whole however large (`--config /dev/zero` took all 24 GB of memory)."""
    path = tmp_path / "c.yaml"
    path.write_bytes(text)
    result = invoke_cli("train", "--data", str(kneekl224), "--out", str(tmp_path / "r"), "--config", str(path))
    assert result.returncode == 1 and result.stderr == f"error: {path}: {message}\n"


def test_a_model_option_that_is_no_yaml_value_is_taken_as_written_and_refused_before_the_data_is_decoded(
        tmp_path, kneekl224, monkeypatch):
    """`--option width=[1,` was a traceback from PyYAML; then it was told only after the image caches of all 6604 knees
    were built (~30 s on 2 cores), as a missing --teacher still was."""
    monkeypatch.setenv("KLGRADE_CACHE_DIR", str(tmp_path / "cache"))
    result = invoke_cli("train", "--data", str(kneekl224), "--out", str(tmp_path / "r"), "--option", "width=[1,")
    assert result.returncode == 1
    assert result.stderr == "error: bad option for model 'msa_net' (width='[1,'): width takes a whole number, not '[1,'\n"
    assert not (tmp_path / "cache").exists() or not any((tmp_path / "cache").iterdir())
    missing = invoke_cli("train", "--data", str(kneekl224), "--out", str(tmp_path / "r"), "--teacher",
                         str(tmp_path / "nope.safetensors"))  # so is a teacher that is not there
    assert missing.returncode == 1
    assert missing.stderr == f"error: {tmp_path / 'nope.safetensors'}: checkpoint not found\n"
    assert not (tmp_path / "cache").exists() or not any((tmp_path / "cache").iterdir())


def test_too_few_images_for_a_batch_on_every_process_is_refused_before_training(kneekl224, tmp_path):
    """10 images make one batch of 32, which 2 processes cannot share: Lightning trained nothing, said so in a
    warning, and the run ended "best epoch -1: val qwk -inf" with exit status 0."""
    config = TrainConfig(**{**TINY, "limit": 10, "batch_size": 32}, data=str(kneekl224), devices=2, out=str(tmp_path))
    with pytest.raises(KLGradeError, match="10 training images make fewer batches of --batch-size 32 than the 2 "
                                           "processes"):
        fit(config)


def test_a_yaml_number_without_a_decimal_point_is_a_number(tmp_path):
    """YAML 1.1 reads `1e-3` as text: AdamW then failed comparing it with 0."""
    path = tmp_path / "c.yaml"
    path.write_text("lr: 1e-3\nweight_decay: 5E-2\n")
    config = load_config(path, {"data": "d"})
    assert (config.lr, config.weight_decay) == (0.001, 0.05)


def test_bad_training_options_are_one_line_errors(tmp_path, kneekl224):
    for option, value in (("--balance", "magic"), ("--precision", "fp8"), ("--lr", "-1")):
        result = invoke_cli("train", "--data", str(kneekl224), "--out", str(tmp_path / "r"), option, value)
        assert result.returncode == 1 and "Traceback" not in result.stderr and option in result.stderr
    result = invoke_cli("train", "--data", str(tmp_path / "missing"), "--out", str(tmp_path / "r"))
    assert result.returncode == 1 and "no such file" in result.stderr
    one_fold = invoke_cli("cv", "--data", str(kneekl224), "--model", "resnet18", "--out", str(tmp_path / "cv"),
                          "--folds", "1")  # scikit-learn's ValueError escaped as a traceback
    assert one_fold.returncode == 1 and one_fold.stderr.startswith("error: --folds must be at least 2")


def test_auto_precision_is_bf16_only_where_the_device_computes_in_bf16(monkeypatch):
    """A CPU without AVX512-BF16 or AMX emulates bf16 5-14x slower than fp32: auto must not pick it there."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    for avx512_bf16, amx, expected in ((False, False, "32-true"), (True, False, "bf16-mixed"), (False, True, "bf16-mixed")):
        monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda value=avx512_bf16: value)
        monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda value=amx: value)
        assert resolve_precision("auto", "auto") == resolve_precision("auto", "cpu") == expected
        assert resolve_precision("bf16-mixed", "cpu") == "bf16-mixed" and resolve_precision("32-true", "cpu") == "32-true"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    for supported, expected in ((True, "bf16-mixed"), (False, "32-true")):
        monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda value=supported: value)
        assert resolve_precision("auto", "auto") == resolve_precision("auto", "cuda") == expected
    assert resolve_precision("auto", "cpu") == "bf16-mixed"  # the CPU's answer (AMX above), not the GPU's


def test_epoch_batches_shard_across_ddp_processes_without_overlap():
    from klgrade.train.batches import EpochBatchSampler

    shards = [list(EpochBatchSampler(50, 8, shuffle=True, seed=1, drop_last=True, shard_source=lambda r=r: (r, 2)))
              for r in range(2)]
    assert len(shards[0]) == len(shards[1]) == 3
    seen = [i for shard in shards for batch in shard for i in batch]
    assert len(seen) == len(set(seen)) == 48
    # The steps the schedule is built for are the steps each process takes (10 images, batch 32, drop_last: one).
    for n, batch_size, drop_last, world in ((50, 8, True, 2), (10, 32, True, 1), (10, 32, True, 2), (33, 8, False, 3),
                                            (32, 8, True, 1), (7, 8, False, 1)):
        taken = EpochBatchSampler(n, batch_size, shuffle=True, drop_last=drop_last, shard_source=lambda: (0, world))
        assert taken.batches_per_process(world) == len(list(taken)), (n, batch_size, drop_last, world)


def test_ddp_with_two_cpu_processes_and_ema(kneekl224, tmp_path):
    """The EMA copy must not hold trainable parameters inside the DDP-wrapped module (DDP fails on step 2)."""
    out = tmp_path / "ddp"
    result = run_cli("train", "--data", str(kneekl224), "--devices", "2", "--device", "cpu", "--limit", "64",
                     "--ema", "0.99", "--image-size", "64", "--epochs", "2", "--batch-size", "8", "--option",
                     "width=32", "--option", "heads=2", "--threads", "1", "--out", str(out), "--quiet")
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.count("best epoch") == 1
    state = torch.load(out / "last.ckpt", map_location="cpu", weights_only=False)
    assert state["global_step"] == 2 * (64 // 8) // 2, "each process must take half of the batches"
    assert [h["epoch"] for h in json.loads((out / "metrics.json").read_text())["history"]] == [0, 1]


def test_model_options_from_the_command_line_are_typed():
    from klgrade.cli import _train_overrides

    values = {"option": ["fpn=False", "width=64", "backbone=resnet34", "attention=true"], "teacher": None,
              "quiet": False, "resume": False}
    assert _train_overrides(values)["model_options"] == {"fpn": False, "width": 64, "backbone": "resnet34",
                                                              "attention": True}


@pytest.mark.parametrize("argv, expected", [
    (["train", "--teacher", "a.safetensors", "b.safetensors", "--kd-alpha", "1"],
     ["train", "--teacher", "a.safetensors", "--teacher", "b.safetensors", "--kd-alpha", "1"]),
    (["predict", "x.png", "--checkpoint", "m.safetensors", "y.png"],
     ["predict", "x.png", "--checkpoint", "m.safetensors", "y.png"]),
    (["predict", "--checkpoint", "m.safetensors", "n.onnx", "y.png"],
     ["predict", "--checkpoint", "m.safetensors", "--checkpoint", "n.onnx", "y.png"]),
])
def test_several_checkpoints_after_one_option(argv, expected):
    from klgrade.cli import expand_multi_values

    assert expand_multi_values(argv) == expected


def test_distillation_loss_is_zero_for_the_teacher_itself_and_scales_with_t_squared():
    from klgrade.train.module import distillation_loss

    torch.manual_seed(0)
    student, teacher = torch.randn(8, 5), torch.randn(8, 5)
    for temperature in (1.0, 2.0, 4.0):
        same = distillation_loss(student, torch.softmax(student / temperature, dim=1), temperature)
        assert same.abs().item() < 1e-6
        p = torch.softmax(teacher / temperature, dim=1)
        kl = (p * (p.log() - torch.log_softmax(student / temperature, dim=1))).sum(1).mean()
        loss = distillation_loss(student, p, temperature)
        assert loss.item() == pytest.approx(temperature**2 * kl.item(), rel=1e-5)


class TeachersStayInEval(Callback):
    def __init__(self):
        self.checked = 0

    def on_train_batch_start(self, trainer, module, batch, batch_idx):
        assert module._teachers and not any(t.training for t in module._teachers)
        self.checked += 1


def test_teachers_stay_in_eval_mode_and_must_share_the_students_preprocessing(kneekl224, tmp_path, tiny_checkpoint):
    from klgrade.errors import KLGradeError

    watcher = TeachersStayInEval()
    fit(TrainConfig(**TINY, data=str(kneekl224), epochs=2, out=str(tmp_path / "kd"), teacher=[str(tiny_checkpoint)]),
        callbacks=[watcher])
    assert watcher.checked == 2 * 5  # 40 images, batch 8, two epochs
    with pytest.raises(KLGradeError, match="teacher preprocessing"):
        fit(TrainConfig(**{**TINY, "image_size": 96}, data=str(kneekl224), epochs=1, out=str(tmp_path / "bad"),
                        teacher=[str(tiny_checkpoint)]))


def test_ordinal_loss_keeps_a_gradient_when_confidently_wrong_and_refuses_label_smoothing():
    from klgrade.errors import KLGradeError
    from klgrade.models.ordinal import CumulativeLogitHead

    head = CumulativeLogitHead(4, 5)
    with torch.no_grad():
        head.score.weight.zero_()
        head.score.bias.fill_(60.0)  # P(KL4) ~ 1; the truth is KL0
    features = torch.randn(1, 4, requires_grad=True)
    loss = torch.nn.functional.cross_entropy(head(features), torch.tensor([0]))
    loss.backward()
    assert torch.isfinite(loss) and loss.item() > 50
    assert torch.isfinite(head.score.bias.grad).all() and head.score.bias.grad.abs().item() > 0.5
    with pytest.raises(KLGradeError, match="label-smoothing"):
        TrainConfig(data="x", ordinal=True, label_smoothing=0.1).validate()


def test_train_only_the_normaliser_leaves_the_grader_bit_identical(kneekl224, tmp_path):
    base = {**TINY, "data": str(kneekl224), "epochs": 1, "limit": 24}
    fit(TrainConfig(**base, out=str(tmp_path / "grader")))
    grader = tmp_path / "grader" / "last.safetensors"
    fit(TrainConfig(**{**base, "model_options": {**TINY["model_options"], "normaliser": True}}, init=str(grader),
                    train_only=["normaliser"], teacher=[str(grader)], kd_alpha=1.0, kd_temperature=1.0,
                    domain_augment=True, consistency=1.0, lr=3e-3, out=str(tmp_path / "normalised")))
    before = load_checkpoint(grader)[0].state_dict()
    after = load_checkpoint(tmp_path / "normalised" / "last.safetensors")[0].state_dict()
    for name, tensor in before.items():  # batch-norm running statistics included: frozen parts stay in eval mode
        assert torch.equal(after[name], tensor), name
    trained = [name for name in after if name.startswith("normaliser.")]
    assert trained and any(after[name].abs().sum() > 0 for name in trained if "coefficients" in name)


def test_train_only_names_a_part_with_parameters(kneekl224, tmp_path):
    for part, message in (("nowhere", "has no part 'nowhere'"), ("normaliser", "has nothing to train")):
        result = invoke_cli("train", "--data", str(kneekl224), "--out", str(tmp_path / part), "--limit", "16",
                            "--device", "cpu", "--image-size", "64", "--train-only", part, "--quiet")
        assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr[-1000:]
        assert message in result.stderr
