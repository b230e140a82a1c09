"""Do the Grad-CAM maps show evidence the model uses? Empty maps, joint-band focus and a deletion test, per grade.

    python benchmarks/gradcam_faithfulness.py --data ../shared/data/kneeKL224/val [--limit-per-grade N]
        [--checkpoint CKPT ...] [--layer MODULE] [--seed 0] [--json]

Per true grade and overall:
- empty_fraction: share of images whose map holds no positive evidence;
- joint_fraction: mean share of heatmap mass in the central band (rows 30-70%) holding the joint space
  (a uniform map gives 0.40);
- deletion test: the predicted grade's probability drop after masking the top 20% of heatmap pixels
  (`deletion_drop`) vs masking 20% chosen by a random map of the same smoothness (`random_drop`, mean of
  `RANDOM_MASKS` draws), both filled from a blurred copy of the image; `deletion_ratio` = ratio of mean drops
  (> 1: the map points where the evidence is).
`--layer` explains other modules of the model (e.g. `backbone.layer4`, or `a+b` for the sum of two), to compare.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import machine  # noqa: E402

from klgrade.constants import NUM_GRADES  # noqa: E402
from klgrade.data.cache import decode_all  # noqa: E402
from klgrade.data.sources import find_samples  # noqa: E402
from klgrade.explain.faithfulness import MASKED_SHARE, masked, random_map, top_share_mask  # noqa: E402
from klgrade.explain.gradcam import joint_fraction  # noqa: E402
from klgrade.infer.grading import load_model  # noqa: E402

RANDOM_MASKS = 3
BATCH = 32
KEYS = ("n", "empty_fraction", "joint_fraction", "deletion_drop", "random_drop", "deletion_ratio")


def choose_samples(data: str, limit_per_grade: int | None, seed: int):
    samples = find_samples(data)
    rng = np.random.default_rng(seed)
    chosen = []
    for grade in range(NUM_GRADES):
        members = [s for s in samples if s.grade == grade]
        if limit_per_grade is not None and len(members) > limit_per_grade:
            members = [members[i] for i in sorted(rng.choice(len(members), limit_per_grade, replace=False))]
        chosen.extend(members)
    return chosen


def summarize(rows: list[dict]) -> dict:
    if not rows:
        return {key: 0 if key == "n" else None for key in KEYS}
    deletion = float(np.mean([r["deletion_drop"] for r in rows]))
    random = float(np.mean([r["random_drop"] for r in rows]))
    return {"n": len(rows), "empty_fraction": float(np.mean([r["empty"] for r in rows])),
            "joint_fraction": float(np.mean([r["joint_fraction"] for r in rows])), "deletion_drop": deletion,
            "random_drop": random, "deletion_ratio": deletion / random if random > 0 else None}


def measure(predictor, images: np.ndarray, grades: list[int], seed: int) -> list[dict]:
    generator = torch.Generator().manual_seed(seed)
    rows = []
    for start in range(0, len(images), BATCH):
        batch = images[start:start + BATCH]
        probabilities = predictor.probabilities(batch)
        predicted = probabilities.argmax(1)
        explanation = predictor.explain(batch, predicted)
        deleted = np.stack([masked(img, top_share_mask(m)) for img, m in zip(batch, explanation.maps)])
        deleted_p = predictor.probabilities(deleted)
        random_p = []
        for _ in range(RANDOM_MASKS):
            shuffled = np.stack([masked(img, top_share_mask(random_map(img.shape[0], generator))) for img in batch])
            random_p.append(predictor.probabilities(shuffled))
        for i, grade in enumerate(predicted):
            base = probabilities[i, grade]
            rows.append({"grade": grades[start + i], "empty": bool(explanation.empty[i]),
                         "joint_fraction": joint_fraction(explanation.maps[i]),
                         "deletion_drop": float(base - deleted_p[i, grade]),
                         "random_drop": float(np.mean([base - p[i, grade] for p in random_p]))})
    return rows


def use_layer(predictor, name: str) -> None:
    """Explain module `name` instead of the models' own Grad-CAM layer (for comparing layers)."""
    predictor.explain(np.zeros((1, predictor.preprocess.size, predictor.preprocess.size), np.uint8), np.array([0]))
    for model in predictor._explain_models:
        layers = [model.get_submodule(part) for part in name.split("+")]
        model.gradcam_layers = lambda layers=layers: [layers]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", required=True, help="Labelled folder (grade/image) or manifest.")
    parser.add_argument("--limit-per-grade", type=int, default=None)
    parser.add_argument("--checkpoint", nargs="+", default=None, help="Default: the shipped model.")
    parser.add_argument("--layer", default=None, help="Module to explain instead of the model's own choice.")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", action="store_true", help="Print one JSON object.")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    predictor = load_model(args.checkpoint)
    if args.layer:
        use_layer(predictor, args.layer)
    samples = choose_samples(args.data, args.limit_per_grade, args.seed)
    decoded = decode_all(samples, predictor.preprocess)
    if decoded.failures:
        raise SystemExit(f"error: {len(decoded.failures)} unreadable images, e.g. {decoded.failures[0]}")
    rows = measure(predictor, decoded.images, [s.grade for s in samples], args.seed)
    result = {"per_grade": [summarize([r for r in rows if r["grade"] == g]) for g in range(NUM_GRADES)],
              "overall": summarize(rows)}
    if args.json:
        print(json.dumps(result, indent=2))
        return
    size = predictor.preprocess.size
    print(f"machine: {machine()}")
    print(f"model {predictor.name} (TTA {'on' if predictor.tta else 'off'}), {size}x{size}, layer "
          f"{args.layer or 'the model own'}; {len(rows)} images of {args.data}; top {MASKED_SHARE:.0%} masked")
    print(f"{'grade':>7s} {'n':>5s} {'empty':>6s} {'joint':>6s} {'del drop':>9s} {'rand drop':>10s} {'ratio':>6s}")
    for label, entry in [*((f"KL{g}", e) for g, e in enumerate(result["per_grade"])), ("all", result["overall"])]:
        if entry["n"]:
            ratio = f"{entry['deletion_ratio']:.2f}" if entry["deletion_ratio"] is not None else "-"
            print(f"{label:>7s} {entry['n']:5d} {entry['empty_fraction']:6.3f} {entry['joint_fraction']:6.3f} "
                  f"{entry['deletion_drop']:9.4f} {entry['random_drop']:10.4f} {ratio:>6s}")


if __name__ == "__main__":
    main()
