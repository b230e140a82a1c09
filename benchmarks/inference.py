"""CPU inference: torch eager vs ONNX Runtime, batch 1 and 16 (the service's load test is `load.py`).

    python benchmarks/inference.py [--checkpoint CKPT] [--threads 2]

Defaults: the shipped model at its own resolution.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import latency_ms, machine, per_second  # noqa: E402

from klgrade.data.preprocess import normalize  # noqa: E402
from klgrade.infer.onnx import OnnxModel, export_onnx  # noqa: E402
from klgrade.infer.predictor import shipped_checkpoint  # noqa: E402
from klgrade.models import load_checkpoint  # noqa: E402



def backend_table(checkpoint: Path, threads: int) -> None:
    torch.set_num_threads(threads)
    model, info = load_checkpoint(checkpoint)
    side = info["preprocess"]["size"]
    with tempfile.TemporaryDirectory() as folder:
        onnx_model = OnnxModel(export_onnx(checkpoint, Path(folder) / "m.onnx"), threads=threads)
        rows = []
        for batch in (1, 16):
            x = normalize(torch.randint(0, 255, (batch, side, side), dtype=torch.uint8)).unsqueeze(1)
            with torch.inference_mode():
                eager = per_second(lambda: model(x), batch, repeats=5)
                eager_ms = latency_ms(lambda: model(x), repeats=10)
            array = x.numpy()
            ort = per_second(lambda: onnx_model.run(array), batch, repeats=5)
            ort_ms = latency_ms(lambda: onnx_model.run(array), repeats=10)
            rows.append((batch, eager, eager_ms, ort, ort_ms))
    print(f"model {info['model']['name']} at {side}x{side}, {threads} threads, fp32")
    print(f"{'batch':>5s} {'torch img/s':>12s} {'torch ms':>9s} {'onnxrt img/s':>13s} {'onnxrt ms':>10s} {'speed-up':>9s}")
    for batch, eager, eager_ms, ort, ort_ms in rows:
        print(f"{batch:5d} {eager:12.1f} {eager_ms:9.1f} {ort:13.1f} {ort_ms:10.1f} {ort / eager:8.2f}x")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--checkpoint", type=Path, default=None)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    print(f"machine: {machine()}")
    backend_table(args.checkpoint or shipped_checkpoint(), args.threads)


if __name__ == "__main__":
    main()
