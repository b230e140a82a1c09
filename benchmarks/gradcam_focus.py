"""How much of the Grad-CAM heatmap falls on the joint region, over the kneeKL224 val split.

The joint region is the central horizontal band (rows 30-70% of the crop), where kneeKL224 crops hold the
tibiofemoral joint space; a heatmap spread uniformly would put 40% of its mass there.

    python benchmarks/gradcam_focus.py [--checkpoint CKPT] [--data ../shared/data/kneeKL224/val] [--n 826]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import machine  # noqa: E402

from klgrade.data.cache import decode_all  # noqa: E402
from klgrade.data.sources import find_samples  # noqa: E402
from klgrade.explain.gradcam import JOINT_BAND, joint_fraction  # noqa: E402
from klgrade.infer.grading import load_model  # noqa: E402

BATCH = 32


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--checkpoint", type=Path, default=None)
    parser.add_argument("--data", default=str(Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "kneeKL224" / "val"))
    parser.add_argument("--n", type=int, default=None)
    args = parser.parse_args()
    torch.set_num_threads(2)
    predictor = load_model(args.checkpoint, tta=False)
    samples = find_samples(args.data)[: args.n]
    images, _ = decode_all(samples, predictor.preprocess)
    fractions, grades = [], []
    for start in range(0, len(samples), BATCH):
        chunk = images[start:start + BATCH]
        predicted = predictor.probabilities(chunk).argmax(1)
        for heatmap in predictor.heatmaps(chunk, predicted):
            fractions.append(joint_fraction(heatmap))
        grades.extend(s.grade for s in samples[start:start + BATCH])
    fractions, grades = np.array(fractions), np.array(grades)
    print(f"machine: {machine()}")
    print(f"model {predictor.name}, {len(samples)} images of {args.data}, band rows {JOINT_BAND[0]:.0%}-{JOINT_BAND[1]:.0%}")
    print(f"heatmap mass on the joint band: mean {fractions.mean():.3f}, median {np.median(fractions):.3f} "
          f"(uniform heatmap: {JOINT_BAND[1] - JOINT_BAND[0]:.3f}); images with >50% on the band: {(fractions > 0.5).mean():.1%}")
    for grade in range(5):
        if (grades == grade).any():
            print(f"  true KL {grade}: mean {fractions[grades == grade].mean():.3f} (n={int((grades == grade).sum())})")


if __name__ == "__main__":
    main()
