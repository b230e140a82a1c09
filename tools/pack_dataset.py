"""Re-encode a dataset folder compactly (JPEG quality Q, optional resize) for carrying to a GPU machine.

The copy keeps the `split/grade/name` layout, so every klgrade command reads it as it reads the original.

    python tools/pack_dataset.py ../shared/data/kneeKL224 carry/kneeKL224 --quality 75 [--size 224] [--splits train val]
"""

from __future__ import annotations

import argparse
from pathlib import Path

from PIL import Image

from klgrade.data.io import read_image
from klgrade.data.preprocess import PreprocessConfig, to_uint8
from klgrade.data.sources import find_samples


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("source")
    parser.add_argument("target", type=Path)
    parser.add_argument("--quality", type=int, default=75)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--splits", nargs="+", default=["train", "val"])
    args = parser.parse_args()
    config = PreprocessConfig(size=args.size, clip_percentiles=(0.0, 100.0))
    total = 0
    for sample in find_samples(args.source):
        if sample.split not in args.splits:
            continue
        target = args.target / sample.split / str(sample.grade) / (Path(sample.path).stem + ".jpg")
        target.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(to_uint8(read_image(sample.path), config)).save(target, quality=args.quality)
        total += target.stat().st_size
    print(f"{args.target}: {total / 2**20:.1f} MiB")


if __name__ == "__main__":
    main()
