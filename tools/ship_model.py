"""Package a trained run as the model shipped inside klgrade: fp16 safetensors, calibrated, + MODEL_CARD.md.

Evaluates the run's last (default) or best checkpoint on the validation split with and without flip TTA, keeps TTA only
if it helps QWK there, writes the weights (with the decision and the card summary in their metadata) to
src/klgrade/weights/, then calibrates them (`klgrade calibrate`: temperature and conformal grade sets on val,
the gradability check's feature density on train) and writes the card, with the robustness tables of
`benchmarks/robustness.py --json` when given (the new model's, and the model it replaces).

    python tools/ship_model.py RUN_DIR --data ../shared/data/kneeKL224 [--checkpoint last|best]
        [--recipe "klgrade train ..."] [--robustness NEW.json [--robustness-before OLD.json]] [--card-only]

The robustness tables belong to the shipped, calibrated weights: ship, run `benchmarks/robustness.py --json` on
them, then rewrite the card with `--card-only` (the same run and options; nothing is saved or calibrated again).
"""

from __future__ import annotations

import argparse
import json
from datetime import date
from pathlib import Path

import torch

from klgrade.data.provenance import knee_record, merge_records
from klgrade.data.sources import find_samples, select_split
from klgrade.evaluate.calibration import calibrate_checkpoint
from klgrade.evaluate.evaluation import evaluate
from klgrade.evaluate.report import plot_confusion
from klgrade.infer.predictor import SHIPPED_WEIGHTS, Predictor
from klgrade.models import load_checkpoint, save_checkpoint
from klgrade.models.normaliser import DETAIL_SIGMA
from klgrade.models.weights import read_info

WEIGHTS = Path(__file__).resolve().parents[1] / "src" / "klgrade" / "weights"
INTENDED_USE = ("Research on automated Kellgren-Lawrence grading and its explanation. Not a medical device; "
                "not for diagnosis or treatment decisions.")
DATA = ("kneeKL224 (Chen 2018, Mendeley Data doi:10.17632/56rmx5bjcr.1, CC BY 4.0): OAI baseline knee "
        "radiograph crops, CLAHE-enhanced by a third party, 224x224 8-bit; train split 5778 images for "
        "training, val split 826 images for model selection and the figures below.")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("run", type=Path)
    parser.add_argument("--data", required=True)
    parser.add_argument("--checkpoint", choices=("last", "best"), default="last",
                        help="last epoch of the fixed schedule, or the epoch with the best val QWK (chosen on val)")
    parser.add_argument("--recipe", default="")
    parser.add_argument("--notes", default="")
    parser.add_argument("--robustness", type=Path, default=None, help="benchmarks/robustness.py --json of this run.")
    parser.add_argument("--robustness-before", type=Path, default=None, help="The same for the model it replaces.")
    parser.add_argument("--card-only", action="store_true",
                        help="The shipped weights are this run's, calibrated already: only rewrite the card.")
    args = parser.parse_args()
    torch.set_num_threads(2)
    weights = args.run / f"{args.checkpoint}.safetensors"
    model, info = load_checkpoint(weights)
    origin = frozen_origin(info["train_config"])
    results = {tta: evaluate(Predictor([weights], tta=tta), args.data, split="val").metrics for tta in (False, True)}
    use_tta = results[True]["qwk"] > results[False]["qwk"]
    chosen = results[use_tta]
    card = {"data": DATA, "intended_use": INTENDED_USE, "recipe": args.recipe, "date": str(date.today()),
            "checkpoint": args.checkpoint, **origin}
    samples = find_samples(args.data)
    seen = info.get("seen", {})  # val chose the TTA setting: its knees join the ones that chose these weights
    seen = {**seen, "chosen": merge_records([seen.get("chosen", {}), knee_record(select_split(samples, "val"))])}
    info = {**info, "inference": {"tta": use_tta}, "card": card, "seen": seen,
            "val_metrics": {k: chosen[k] for k in ("accuracy", "precision_macro", "f1_macro", "mcc", "qwk", "mae")}}
    target = WEIGHTS / SHIPPED_WEIGHTS
    if args.card_only:
        calibration = shipped_calibration(target, info)
    else:
        save_checkpoint(target, model, info, dtype=torch.float16)
        calibration = calibrate_checkpoint(target, select_split(samples, "val"), select_split(samples, "train"), target)
    shipped = evaluate(Predictor([target]), args.data, split="val").metrics
    plot_confusion(shipped["confusion_matrix"], "shipped model on kneeKL224 val", WEIGHTS / "confusion_val.png")
    robustness = [json.loads(path.read_text()) if path else None for path in (args.robustness, args.robustness_before)]
    limits = (gradability_limit(shipped) + processing_limit(robustness[0]) + framing_limit(robustness[0])
              + marker_limit(robustness[0]) + enhanced_limit(robustness[0]))
    card = model_card(info, results, shipped, use_tta, args.notes, limits) + calibration_section(calibration, shipped)
    (WEIGHTS / "MODEL_CARD.md").write_text(card + robustness_section(*robustness))
    print(json.dumps({k: shipped[k] for k in ("accuracy", "qwk", "mcc", "f1_macro", "mae")}, indent=2))


def shipped_calibration(target: Path, info: dict) -> dict:
    """The calibration stored with the shipped weights, which must be this run's (`--card-only`)."""
    shipped = read_info(target)
    if shipped.get("train_config") != info["train_config"] or "calibration" not in shipped:
        raise SystemExit(f"{target}: not this run's calibrated weights; ship the run first (without --card-only)")
    return shipped["calibration"]


def model_card(info: dict, results: dict, shipped: dict, use_tta: bool, notes: str, limits: str) -> str:
    ci = shipped["ci95"]
    rows = "\n".join(f"| {name} | {shipped[name]:.3f} | {ci[name][0]:.3f}-{ci[name][1]:.3f} |" if name in ci else
                     f"| {name} | {shipped[name]:.3f} | |"
                     for name in ("accuracy", "precision_macro", "recall_macro", "f1_macro", "mcc", "qwk", "mae"))
    cm = "\n".join(f"| {k} | " + " | ".join(str(v) for v in row) + " |" for k, row in enumerate(shipped["confusion_matrix"]))
    per_grade = "\n".join(f"| {k} | {shipped['per_grade']['precision'][k]:.3f} | {shipped['per_grade']['recall'][k]:.3f} | "
                          f"{shipped['per_grade']['f1'][k]:.3f} | {shipped['per_grade']['support'][k]} |" for k in range(5))
    spec = info["model"]
    train = info["train_config"]
    return f"""# Model card: klgrade shipped model (`{SHIPPED_WEIGHTS}`)

## Model
`{spec['name']}` with options {json.dumps(spec['options']) if spec['options'] else 'at their defaults (resnet18 backbone, pyramid width 128, 4 attention heads)'}: multi-scale attention
network (FPN over C3-C5, squeeze-and-excitation on every pyramid level, multi-head self-attention with 2-D
sin-cos positions on the coarsest level, pooled fusion head).{_normaliser(spec)} Input: one grey channel at
{info['preprocess']['size']}x{info['preprocess']['size']} px (percentile stretch 0.5-99.5%; CLAHE at inference only for an
image that looks unenhanced: the training data were already CLAHE-enhanced). Weights stored in fp16 ({'with' if use_tta else 'without'} flip
test-time augmentation by default, chosen on val QWK: {results[True]['qwk']:.4f} with vs {results[False]['qwk']:.4f}
without). {_origin(info)}

## Training data and recipe
{info['card']['data']}

Recipe (CPU, 2 cores, {date.today()}): `{info['card']['recipe']}`
Epochs {train['epochs']}, batch {train['batch_size']}, AdamW lr {train['lr']} ({train['warmup_epochs']}-epoch warm-up, cosine), weight
decay {train['weight_decay']}, label smoothing {train['label_smoothing']}, EMA of weights {train['ema']}, precision
{train['precision']}, on-the-fly flips / rotation +/-{train['augment']['rotate_deg']} deg / scale +/-{train['augment']['scale']}
/ shift / brightness / contrast{_domain(train)}{_consistency(train)}. {_choice(info)} {notes}

## Validation results (kneeKL224 val, n={shipped['n']}, 95% patient-level bootstrap intervals)
| metric | value | 95% CI |
|---|---|---|
{rows}

Errors: {shipped['errors']}, of which adjacent (1 grade) {shipped['adjacent_errors']}, two grades
{shipped['two_grade_errors']}, extreme (>=3 grades) {shipped['extreme_errors']}. Expected calibration error
{shipped['ece']:.3f}.

| grade | precision | recall | F1 | n |
|---|---|---|---|---|
{per_grade}

Confusion matrix (rows = true grade, columns = predicted):

| true \\ pred | 0 | 1 | 2 | 3 | 4 |
|---|---|---|---|---|---|
{cm}

Note: val chose the TTA setting{' and the epoch' if info['card']['checkpoint'] == 'best' else ''} and fits the calibration, so these
figures are somewhat optimistic for new data; the kneeKL224 test split was not used. The weights record these knees
(train: trained on; val: chosen and calibrated on), so `klgrade evaluate` leaves train knees out and warns on val ones.

## Intended use and limits
{info['card']['intended_use']}
- Expects a knee joint crop centred on the tibiofemoral joint, like kneeKL224 (OAI, fixed-flexion PA views,
  CLAHE-enhanced). Full-leg or bilateral radiographs, other projections, implants and children are out of scope;
  the gradability check flags images far from the training data (`gradable: false`), images of fewer than
  64 pixels a side or 10 grey levels, images more than 1.8 times as wide as tall or the reverse (two knees side by
  side, a full-leg view) and DICOM files whose header says both knees (laterality B, a bilateral view), but an image
  it lets through is not thereby in scope: a bilateral radiograph on a landscape detector is about 1.25:1. An image
  more than 1.1 times as long one way as the other is graded squeezed to a square, with a warning that says so: at
  4:5 (a portrait crop) 18-24% of val grades moved, whether columns were cut or more shaft shown (docs/results.md).
{limits}- KL 1 ("doubtful") is the least reliable grade, as it is for human readers.
- Trained on one cohort (OAI, US); performance on other populations, scanners and processing is unknown.
- The Grad-CAM heatmap shows which regions raised the predicted grade's score; it is not a segmentation of
  osteophytes or joint-space narrowing.
"""


def _domain(train: dict) -> str:
    if not train.get("domain_augment"):
        return ""
    strengths = ", ".join(f"{key} {value}" for key, value in train["domain"].items())
    sharpening = ", sharpening" if train["domain"].get("sharpen_prob") else ""
    return (f", and domain augmentation imitating upstream processing (CLAHE, softening, gamma, equalisation, "
            f"JPEG, resampling, blur, noise{sharpening}: {strengths})")


def _consistency(train: dict) -> str:
    if not train.get("consistency"):
        return ""
    return (f", each image also seen beside its processed copy under the same warp with a Jensen-Shannon agreement "
            f"loss of weight {train['consistency']}")


def _choice(info: dict) -> str:
    if info["card"]["checkpoint"] == "best":
        return f"Checkpoint chosen by validation QWK (epoch {info['epoch']})."
    return (f"Checkpoint: the last epoch ({info['epoch'] + 1} of {info['train_config']['epochs']}) of the fixed "
            "schedule, not chosen on val.")


def calibration_section(calibration: dict, shipped: dict) -> str:
    return f"""
## Calibration (how sure)
Calibrated on kneeKL224 val ({calibration['n_calibration']} images) with `klgrade calibrate`, on the combined output
(flip TTA {'on' if calibration['tta'] else 'off'}): temperature {calibration['temperature']:.3f}; conformal grade sets
(contiguous least-ambiguous sets with a threshold per grade, so that they hold the true grade for 90% of the knees
of every grade by default, any alpha per call); the gradability check's feature
density (Mahalanobis, penultimate features) fitted on the {calibration['n_density']} train images and thresholded
to flag {calibration['flagged_share']:.0%} of val; the processing profile (spread, local contrast and fine detail of the
preprocessed image; Mahalanobis distance to the train images') thresholded likewise, whose excess adds a warning
that the image's contrast processing differs from the training images'; two framing probes (ridge read-outs of the
crop share from the penultimate features of train images re-framed at random, tighter or wider) with thresholds at
crop share {calibration['framing']['threshold']:.3f} and {calibration['framing_wide']['threshold']:.3f}, set so that {calibration['framing_warned_share']:.0%} and {calibration['framing_wide_warned_share']:.0%} of val as stored are warned that
the knee is framed tighter or wider than in training; and a polarity probe (a linear read-out of the penultimate
features, fitted on train images as stored and inverted) by which an image that looks inverted (bone dark) is graded
inverted back, with a warning ({calibration['n_density_inverted']} train images looked inverted: left out of the
density and framing fits). On val itself (in-sample for the sets): coverage
{shipped['coverage']:.3f} (KL 0-4: {' / '.join(f'{c:.2f}' for c in shipped['coverage_per_grade'])}), mean set size
{shipped['mean_set_size']:.2f}, not gradable {shipped['ungradable_fraction']:.3f}.
Cross-fitted figures (calibrate on half the patients, score the other half): docs/results.md.
"""


def robustness_section(new: dict | None, before: dict | None) -> str:
    if new is None:
        return ""
    columns = ["accuracy", "qwk", "agreement", "not_gradable", "warned", "sharpness_warned", "framing_warned",
               "framing_wide_warned", "inverted_back", "turned_upright", "noted", "painted", "enhanced", "coverage",
               "cross_fitted_coverage"]
    columns = [c for c in columns if c in new["clean"] or c == "agreement"]
    before_has = next(iter(before["perturbations"].values())) if before else {}
    before_columns = [c for c in ("accuracy", "qwk", "agreement", "coverage") if c in columns and c in before_has]
    lines = ["", "## Robustness to upstream processing (kneeKL224 val, `benchmarks/robustness.py`)", "",
             "| perturbation | " + " | ".join(columns) + " |" + "".join(f" before: {c} |" for c in before_columns),
             "|---|" + "---|" * (len(columns) + len(before_columns))]
    rows = [("clean", {**new["clean"], "agreement": 1.0}, {**before["clean"], "agreement": 1.0} if before else None)]
    for group, suffix in (("perturbations", ""), ("framings", " (framing)"), ("markers", ""),
                          ("orientations", " (orientation)")):
        rows += [(name + suffix, entry, _row(before, name)) for name, entry in new.get(group, {}).items()]
    for name, entry, old in rows:
        cells = [f"{entry[c]:.3f}" for c in columns] + [f"{old[c]:.3f}" if old else "" for c in before_columns]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    lines += ["", "Agreement: the share of knees whose grade is the clean image's; not_gradable: the share flagged `gradable: false`; warned: the share of answers carrying the "
              "processing warning; sharpness_warned: the share warned that the noise or sharpness differs; framing_warned / framing_wide_warned: the share carrying the warning that the knee is framed tighter / wider than in training; inverted_back: the share graded with its grey levels inverted back because it looked inverted; turned_upright: the share graded turned upright because it looked turned; noted: the share whose answer notes how the image was prepared (not square: squeezed to the square; a mark painted out; enhanced); painted: the share with a bright burnt-in mark painted out before grading; enhanced: the share CLAHE-enhanced before grading as looking unenhanced; coverage: the share whose 90% grade set holds the true grade (in-sample: the "
              "calibration is fitted on val); cross_fitted_coverage: the same for sets calibrated afresh on the clean "
              "knees of half the patients and scored on the other half, over 20 random halvings."]
    return "\n".join(lines) + "\n"


def _row(robustness: dict | None, name: str) -> dict | None:
    """The benchmark's row `name` in whichever group it sits (older tables kept the markers among perturbations)."""
    groups = [(robustness or {}).get(group, {}) for group in ("perturbations", "framings", "markers", "orientations")]
    return next((group[name] for group in groups if name in group), None)


def gradability_limit(shipped: dict) -> str:
    """A limits bullet for grades the gradability check flags far more often than val as a whole (KL 4 so far)."""
    overall = shipped["ungradable_fraction"]
    support = shipped["per_grade"]["support"]
    counts = [(k, round(share * n), n) for k, (share, n) in enumerate(zip(shipped["ungradable_per_grade"], support))
              if share is not None]
    often = [f"{flagged} of {n} KL {k} knees" for k, flagged, n in counts if flagged >= 2 and flagged / n > 3 * overall]
    if not often:
        return ""
    return (f"- The gradability check flags {', '.join(often)} of val, against {overall:.1%} of all val knees: "
            "severe knees lie far from the typical training knee, so a `gradable: false` on a severe-looking knee may "
            "reflect the severity rather than the image (look for hardware or unusual processing first).\n")


def processing_limit(robustness: dict | None) -> str:
    """A limits bullet with the largest accuracy loss and grade change of the robustness benchmark."""
    if robustness is None:
        return ""
    clean, perturbed = robustness["clean"]["accuracy"], robustness["perturbations"]
    drop_name = max(perturbed, key=lambda name: clean - perturbed[name]["accuracy"])
    flip_name = min(perturbed, key=lambda name: perturbed[name]["agreement"])
    text = (f"- Other upstream processing (table below) costs at most {100 * (clean - perturbed[drop_name]['accuracy']):.1f} "
            f"points of val accuracy ({drop_name}) but changes up to {1 - perturbed[flip_name]['agreement']:.0%} of grades "
            f"({flip_name}).")
    cross_fitted = "cross_fitted_coverage" in robustness["clean"]
    key = "cross_fitted_coverage" if cross_fitted else "coverage"
    how = (" (calibrated afresh on the clean knees of half the patients, scored on the other half processed)"
           if cross_fitted else "")
    coverages = [entry[key] for entry in perturbed.values() if key in entry]
    if coverages:
        text += (f" The grade sets (90%) hold the true grade for {min(coverages):.1%}-{max(coverages):.1%} of knees under "
                 f"each processing{how}")
        per_grade = [(c, k, name) for name, entry in perturbed.items()
                     for k, c in enumerate(entry.get(f"{key}_per_grade", [])) if c is not None]
        if per_grade:
            lowest, grade, name = min(per_grade)
            text += f", for {lowest:.0%} or more of the knees of every grade (lowest: KL{grade} under {name})"
        text += "."
    if all("sharpness_warned" in entry for entry in perturbed.values()):
        shares = ", ".join(f"{name} {entry['warned']:.0%} / {entry['sharpness_warned']:.0%}"
                           for name, entry in perturbed.items())
        text += (f" Answers warned that the contrast processing / the noise or sharpness differs: {shares} "
                 f"(as stored: {robustness['clean']['warned']:.0%} / {robustness['clean']['sharpness_warned']:.0%}).")
    return text + "\n"


def marker_limit(robustness: dict | None) -> str:
    """A limits bullet for a lead side marker burnt in beside the joint line (the benchmark's `marker_joint`)."""
    entry = (robustness or {}).get("markers", {}).get("marker_joint")
    if entry is None:
        return ""
    corner = robustness["markers"]["marker_corner"]
    return (f"- A lead side marker (R/L) burnt in is painted out before grading when it is bright and sharp-edged, "
            f"and the answer says so (the benchmark's marker beside the joint line: {entry['painted']:.0%} of val "
            f"knees, in the corner {corner['painted']:.0%}); beside the joint it then changes "
            f"{_grade_changes(entry, robustness['clean'])}, in the corner {1 - corner['agreement']:.0%}. A mark on bone "
            f"rather than in front of soft tissue is not found; crop so that markers stay off the joint."
            f"{text_limit(robustness)} (docs/results.md)\n")


def text_limit(robustness: dict) -> str:
    """A sentence for small text burnt in at the image's edges (the benchmark's `text_edges`), where measured."""
    entry = robustness["markers"].get("text_edges")
    if entry is None:
        return ""
    warned = max(entry[key] for key in ("warned", "sharpness_warned", "framing_warned", "framing_wide_warned"))
    return (f" Two lines of small text burnt in at the top and bottom edges (side, date, patient id) change "
            f"{_grade_changes(entry, robustness['clean'])}: too thin to be found and painted out, and no check is "
            f"meant for it (the most any one warns: {warned:.0%}); crop the text off.")


def enhanced_limit(robustness: dict | None) -> str:
    """A limits bullet on images that look unenhanced: how many of the benchmark's softened knees are enhanced before
    grading, and what that leaves of the grades."""
    perturbed = (robustness or {}).get("perturbations", {})
    softened = {name: entry for name, entry in perturbed.items() if name.startswith("contrast_reduced")}
    if not softened or not all("enhanced" in entry for entry in softened.values()):
        return ""
    effects = "; ".join(f"{name} {entry['enhanced']:.0%} enhanced, changing "
                        f"{_grade_changes(entry, robustness['clean'])}" for name, entry in softened.items())
    others = max(entry["enhanced"] for group in ("perturbations", "framings", "markers")
                 for name, entry in robustness.get(group, {}).items() if name not in softened)
    return ("- An image that looks unenhanced (CLAHE raises its fine detail more than 2.15 times; kneeKL224's images "
            "at most 2.10 times) is CLAHE-enhanced before grading as the training images were, and the answer says so. "
            f"Val knees with their local contrast reduced (by half, to a fifth): {effects}; as stored "
            f"{robustness['clean']['enhanced']:.0%}, under any other processing or framing at most {others:.1%}. How "
            "closely the softening imitates a radiograph as acquired is unmeasured: no unenhanced copies of these "
            "knees here.\n")


def _grade_changes(entry: dict, clean: dict) -> str:
    """What a benchmark row does to the grades: "12% of grades (-1.5 accuracy points)", against the clean row."""
    change = 100 * (entry["accuracy"] - clean["accuracy"])
    return f"{1 - entry['agreement']:.0%} of grades ({change:+.1f} accuracy points)"


def framing_limit(robustness: dict | None) -> str:
    """A limits bullet with what another framing of the knee (tilt, tighter crop, wider) does to the grades."""
    framings = (robustness or {}).get("framings")
    if not framings:
        return ""
    effects = "; ".join(f"{name} changes {_grade_changes(entry, robustness['clean'])}"
                        for name, entry in framings.items())
    keys = ("framing_warned", "framing_wide_warned")

    def shares(entry: dict, form: str) -> str:
        return " / ".join(f"{entry[key]:{form}}" for key in keys)

    warned = ", ".join(f"{name} {shares(entry, '.0%')}" for name, entry in framings.items())
    noted = ", ".join(f"{name} {entry['noted']:.0%}" for name, entry in framings.items() if entry.get("noted"))
    noted = f" The answer notes that the image is not square for {noted}." if noted else ""
    processed = " / ".join(f"{max(entry[key] for entry in robustness['perturbations'].values()):.1%}" for key in keys)
    return (f"- Framing unlike kneeKL224's crops (`benchmarks/robustness.py`, framings of the val knees; the wider ones "
            f"are the knee shrunk inside a made-up margin, since these crops hold nothing beyond their frame; a uniform "
            f"margin such as black_margin's is trimmed off before grading): {effects}. "
            f"Such answers carry a framing warning (the knee framed tighter / wider than in training): {warned}; "
            f"{shares(robustness['clean'], '.1%')} of the knees as stored (in-sample: the thresholds are set on val) and "
            f"at most {processed} under any contrast processing.{noted} Whether the wider warning also fires on a real wider "
            "field of view (more shaft and soft tissue in the frame) is unmeasured: no such images here. Crop other "
            "sites' radiographs to the knee as kneeKL224 does (joint centred, the knee filling the frame).\n")


def _normaliser(spec: dict) -> str:
    if not spec["options"].get("normaliser"):
        return ""
    detail = (f", and of a gain on the image's fine detail (the image less a {DETAIL_SIGMA}-px blur)"
              if spec["options"].get("normaliser_detail") else "")
    undone = ", sharpened, blurred, noisier" if detail else ""
    return (" In front of the backbone, a learned processing normaliser (`klgrade.models.normaliser`: a "
            f"low-resolution network predicting smooth maps of a per-pixel quadratic tone curve{detail}) maps images "
            f"processed otherwise (enhanced again, equalised, another tone curve{undone}) back to the training images' "
            "look.")


def frozen_origin(train: dict) -> dict:
    """For a run that trained only some parts (`train_only`): the card of the weights the rest was frozen from,
    read now, before shipping may overwrite that file."""
    if not train.get("train_only"):
        return {}
    frozen = read_info(train["init"])
    if frozen["train_config"] == train:
        raise SystemExit(f"{train['init']}: already holds this run's weights (shipped before?), not the weights it "
                         "was frozen from; restore those first (git checkout -- that file)")
    return {"frozen_from": {**frozen.get("card", {}), "epoch": frozen.get("epoch"),
                            "val_metrics": frozen.get("val_metrics", {})}}


def _origin(info: dict) -> str:
    """How the weights came to be: from scratch or from given weights, with or without a teacher."""
    train, frozen = info["train_config"], info["card"].get("frozen_from")
    if frozen:
        return (f"Only the {', '.join(train['train_only'])} was trained (recipe below); every other weight is the "
                f"model shipped on {frozen.get('date')}, frozen (its recipe: `{frozen.get('recipe')}`, epoch "
                f"{frozen.get('epoch')}{' chosen by val QWK' if frozen.get('checkpoint', 'best') == 'best' else ''}; val accuracy {frozen['val_metrics'].get('accuracy', 0):.3f}, "
                f"QWK {frozen['val_metrics'].get('qwk', 0):.3f}). The target of the trained part: the frozen model's "
                f"own answer on each stored image (distillation, a = {train['kd_alpha']}, T = {train['kd_temperature']}),"
                " for the stored image and for a processed copy.")
    start = f"Started from `{Path(train['init']).name}`" if train.get("init") else "Trained from scratch (no ImageNet weights)"
    if not train["teacher"]:
        return f"{start}, without distillation."
    return (f"{start}, distilled from {len(train['teacher'])} teacher(s) (loss (1-a) CE + a T^2 KL, "
            f"a = {train['kd_alpha']}, T = {train['kd_temperature']}; teachers described under the recipe).")


if __name__ == "__main__":
    main()
