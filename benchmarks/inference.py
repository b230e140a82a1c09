"""CPU inference: torch eager (channels_last, as `Predictor` runs it, and the default layout) vs ONNX Runtime,
batch 1 and 16 (the service's load test is `load.py`); what reading and preprocessing one radiograph costs at
the sizes clinics store them (a 16-bit PNG of an example knee resized up, with a black margin on two sides: decode,
then `prepare_image` into the model's square); and the whole path as `predict` runs it (`grade_many`: decoding
threads, the network with the model's TTA, the gradability and processing checks) on the bundled examples.

    python benchmarks/inference.py [--checkpoint CKPT] [--threads 2] [--inputs 256]

Defaults: the shipped model at its own resolution.
"""

from __future__ import annotations

import argparse
import copy
import io
import sys
import tempfile
import time
from pathlib import Path

import cv2
import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).parent))
from common import latency_ms, machine, per_second  # noqa: E402

from klgrade.data.io import read_image  # noqa: E402
from klgrade.data.preprocess import PreprocessConfig, normalize, prepare_image  # noqa: E402
from klgrade.infer.grading import grade_many, load_model  # noqa: E402
from klgrade.infer.onnx import OnnxModel, export_onnx  # noqa: E402
from klgrade.infer.predictor import shipped_checkpoint  # noqa: E402
from klgrade.models import load_checkpoint  # noqa: E402

RADIOGRAPH_SIZES = ((224, 224), (1024, 1024), (3000, 2500), (4280, 3520))
"""Rows x columns: kneeKL224's crops, a downsized export, and two detector formats (a 35 x 43 cm CR/DX plate
at about 0.1 and 0.14 mm pixels)."""



def backend_table(checkpoint: Path, exported: Path, threads: int) -> None:
    """Torch eager as the predictor runs it (channels_last), the same in the default layout, and ONNX Runtime on the
    checkpoint's export (`exported`)."""
    torch.set_num_threads(threads)
    model, info = load_checkpoint(checkpoint)
    side = info["preprocess"]["size"]
    last = copy.deepcopy(model).to(memory_format=torch.channels_last)
    onnx_model = OnnxModel(exported, threads=threads)
    rows = []
    for batch in (1, 16):
        x = normalize(torch.randint(0, 255, (batch, side, side), dtype=torch.uint8)).unsqueeze(1)
        x_last = x.contiguous(memory_format=torch.channels_last)
        with torch.inference_mode():
            eager = per_second(lambda: last(x_last), batch, repeats=5)
            eager_ms = latency_ms(lambda: last(x_last), repeats=10)
            default = per_second(lambda: model(x), batch, repeats=5)
        array = x.numpy()
        ort = per_second(lambda: onnx_model.run(array), batch, repeats=5)
        ort_ms = latency_ms(lambda: onnx_model.run(array), repeats=10)
        rows.append((batch, eager, eager_ms, default, ort, ort_ms))
    print(f"model {info['model']['name']} at {side}x{side}, {threads} threads, fp32")
    print(f"{'batch':>5s} {'torch img/s':>12s} {'torch ms':>9s} {'default layout img/s':>21s} {'onnxrt img/s':>13s} "
          f"{'onnxrt ms':>10s} {'onnxrt/torch':>13s}")
    for batch, eager, eager_ms, default, ort, ort_ms in rows:
        print(f"{batch:5d} {eager:12.1f} {eager_ms:9.1f} {default:21.1f} {ort:13.1f} {ort_ms:10.1f} {ort / eager:12.2f}x")


def radiograph(rows: int, columns: int) -> bytes:
    """A 12-bit PNG (stored in 16 bits) of the first bundled example knee at this size, a tenth of it black margin
    at the top and left (a collimator edge), so that the margin trim has work to do."""
    knee = read_image(sorted((Path(__file__).parents[1] / "examples").glob("*.jpg"))[0])
    image = np.zeros((rows, columns), np.uint16)
    inner = cv2.resize(knee, (columns - columns // 10, rows - rows // 10), interpolation=cv2.INTER_CUBIC)
    image[rows // 10:, columns // 10:] = np.clip(inner * 16, 0, 4095).astype(np.uint16)
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG")
    return buffer.getvalue()


def preprocessing_table(checkpoint: Path) -> None:
    config = PreprocessConfig.from_dict(load_checkpoint(checkpoint)[1]["preprocess"])
    print(f"\none radiograph, 16-bit PNG -> {config.size}x{config.size} uint8, one thread (the service decodes "
          "each upload in a thread of its own)")
    print(f"{'rows x columns':>15s} {'MP':>5s} {'decode ms':>10s} {'prepare ms':>11s}")
    cv2.setNumThreads(1)
    for rows, columns in RADIOGRAPH_SIZES:
        data = radiograph(rows, columns)
        image = read_image(data, name="radiograph.png")
        decode = latency_ms(lambda: read_image(data, name="radiograph.png"), repeats=5, warmup=1)
        prepare = latency_ms(lambda: prepare_image(image, config), repeats=5, warmup=1)
        print(f"{rows:>7d} x {columns:<5d} {rows * columns / 1e6:5.1f} {decode:10.1f} {prepare:11.1f}")


def whole_path_table(checkpoint: Path, exported: Path, threads: int, inputs: int) -> None:
    """`grade_many` over the bundled examples, repeated to `inputs` files, for each backend (the checkpoint, its
    export): images per second from file to answer (best of 3, after a warm-up), and the share of that time the
    network passes take."""
    torch.set_num_threads(threads)
    files = sorted((Path(__file__).parents[1] / "examples").glob("*.jpg"))
    files = (files * (inputs // len(files) + 1))[:inputs]
    print(f"\nthe whole path: grade_many over {inputs} example files, batch 16, 2 decoding threads, {threads} torch "
          "threads, the model's TTA")
    print(f"{'backend':>8s} {'img/s':>7s} {'network share':>14s}")
    for backend, path in (("torch", checkpoint), ("onnx", exported)):
        model = load_model(path, backend=backend)
        network, spent = model._network_outputs, [0.0]

        def timed(images, network=network, spent=spent):
            start = time.perf_counter()
            try:
                return network(images)
            finally:
                spent[0] += time.perf_counter() - start

        model._network_outputs = timed
        list(grade_many(model, files, batch_size=16))
        runs = []
        for _ in range(3):
            spent[0], start = 0.0, time.perf_counter()
            list(grade_many(model, files, batch_size=16))
            runs.append((time.perf_counter() - start, spent[0]))
        wall, in_network = min(runs)
        print(f"{backend:>8s} {inputs / wall:7.1f} {in_network / wall:13.0%}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--checkpoint", type=Path, default=None)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--inputs", type=int, default=256)
    args = parser.parse_args()
    print(f"machine: {machine()}")
    checkpoint = args.checkpoint or shipped_checkpoint()
    with tempfile.TemporaryDirectory() as folder:
        exported = export_onnx(checkpoint, Path(folder) / "m.onnx")  # one export for both tables that time ONNX
        backend_table(checkpoint, exported, args.threads)
        preprocessing_table(checkpoint)
        whole_path_table(checkpoint, exported, args.threads, args.inputs)


if __name__ == "__main__":
    main()
