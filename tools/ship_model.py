"""Package a trained run as the model shipped inside klgrade: fp16 safetensors + MODEL_CARD.md.

Evaluates the run's best checkpoint on the validation split with and without flip TTA, keeps TTA only
if it helps QWK there, and writes the weights (with the decision and the card summary in their metadata)
to src/klgrade/weights/.

    python tools/ship_model.py RUN_DIR --data ../shared/data/kneeKL224 [--recipe "klgrade train ..."]
"""

from __future__ import annotations

import argparse
import json
from datetime import date
from pathlib import Path

import torch

from klgrade.evaluate.evaluation import evaluate
from klgrade.evaluate.report import plot_confusion
from klgrade.infer.predictor import SHIPPED_WEIGHTS, Predictor
from klgrade.models import load_checkpoint, save_checkpoint

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
    parser.add_argument("--recipe", default="")
    parser.add_argument("--notes", default="")
    args = parser.parse_args()
    torch.set_num_threads(2)
    best = args.run / "best.safetensors"
    results = {tta: evaluate(Predictor([best], tta=tta), args.data, split="val").metrics for tta in (False, True)}
    use_tta = results[True]["qwk"] > results[False]["qwk"]
    chosen = results[use_tta]
    model, info = load_checkpoint(best)
    card = {"data": DATA, "intended_use": INTENDED_USE, "recipe": args.recipe, "date": str(date.today())}
    info = {**info, "inference": {"tta": use_tta}, "card": card,
            "val_metrics": {k: chosen[k] for k in ("accuracy", "precision_macro", "f1_macro", "mcc", "qwk", "mae")}}
    target = save_checkpoint(WEIGHTS / SHIPPED_WEIGHTS, model, info, dtype=torch.float16)
    shipped = evaluate(Predictor([target]), args.data, split="val").metrics
    plot_confusion(shipped["confusion_matrix"], "shipped model on kneeKL224 val", WEIGHTS / "confusion_val.png")
    (WEIGHTS / "MODEL_CARD.md").write_text(model_card(info, results, shipped, use_tta, args.notes))
    print(json.dumps({k: shipped[k] for k in ("accuracy", "qwk", "mcc", "f1_macro", "mae")}, indent=2))


def model_card(info: dict, results: dict, shipped: dict, use_tta: bool, notes: str) -> str:
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
sin-cos positions on the coarsest level, pooled fusion head). Input: one grey channel at
{info['preprocess']['size']}x{info['preprocess']['size']} px (percentile stretch 0.5-99.5%, no CLAHE at inference:
the training data were already CLAHE-enhanced). Weights stored in fp16 ({'with' if use_tta else 'without'} flip
test-time augmentation by default, chosen on val QWK: {results[True]['qwk']:.4f} with vs {results[False]['qwk']:.4f}
without). {_origin(info['train_config'])}

## Training data and recipe
{info['card']['data']}

Recipe (CPU, 2 cores, {date.today()}): `{info['card']['recipe']}`
Epochs {train['epochs']}, batch {train['batch_size']}, AdamW lr {train['lr']} (1-epoch warm-up, cosine), weight
decay {train['weight_decay']}, label smoothing {train['label_smoothing']}, EMA of weights {train['ema']}, bf16
autocast, on-the-fly flips / rotation +/-{train['augment']['rotate_deg']} deg / scale +/-{train['augment']['scale']}
/ shift / brightness / contrast. Checkpoint chosen by validation QWK (epoch {info['epoch']}). {notes}

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

Note: val was used to select the epoch and the TTA setting, so these figures are optimistic for new data; the
kneeKL224 test split was not used.

## Intended use and limits
{info['card']['intended_use']}
- Expects a knee joint crop centred on the tibiofemoral joint, like kneeKL224 (OAI, fixed-flexion PA views,
  CLAHE-enhanced). Full-leg or bilateral radiographs, other projections, implants and children are out of scope;
  such images still get a grade, which means nothing.
- KL 1 ("doubtful") is the least reliable grade, as it is for human readers.
- Trained on one cohort (OAI, US); performance on other populations, scanners and processing is unknown.
- The Grad-CAM heatmap shows which regions raised the predicted grade's score; it is not a segmentation of
  osteophytes or joint-space narrowing.
"""


def _origin(train: dict) -> str:
    """How the weights came to be: from scratch or from given weights, with or without a teacher."""
    start = f"Started from `{Path(train['init']).name}`" if train.get("init") else "Trained from scratch (no ImageNet weights)"
    if not train["teacher"]:
        return f"{start}, without distillation."
    return (f"{start}, distilled from {len(train['teacher'])} teacher(s) (loss (1-a) CE + a T^2 KL, "
            f"a = {train['kd_alpha']}, T = {train['kd_temperature']}; teachers described under the recipe).")


if __name__ == "__main__":
    main()
