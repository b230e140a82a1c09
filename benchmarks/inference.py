"""CPU inference: torch eager vs ONNX Runtime (batch 1 and 16), and a bounded loopback load test of the service.

    python benchmarks/inference.py [--checkpoint CKPT] [--threads 2] [--requests 500] [--clients 8]

Defaults: the shipped model at its own resolution. The load test starts `klgrade serve` on 127.0.0.1 and
sends real example radiographs; it stops after `--requests` requests or 300 s.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import latency_ms, machine, per_second  # noqa: E402

from klgrade.data.preprocess import normalize  # noqa: E402
from klgrade.infer.onnx import OnnxModel, export_onnx  # noqa: E402
from klgrade.infer.predictor import shipped_checkpoint  # noqa: E402
from klgrade.models import load_checkpoint  # noqa: E402
from klgrade.serve.local import local_server  # noqa: E402

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
LOAD_TEST_SECONDS = 300


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


def load_test(checkpoint: Path | None, backend: str, requests: int, clients: int) -> None:
    serve_args = ["--backend", backend] + (["--checkpoint", str(checkpoint)] if checkpoint is not None else [])
    images = [p.read_bytes() for p in sorted(EXAMPLES.glob("*.jpg"))]
    with local_server(*serve_args) as url, httpx.Client(timeout=60, limits=httpx.Limits(max_connections=clients)) as client:
        deadline = time.monotonic() + LOAD_TEST_SECONDS

        def one(i: int) -> tuple[float, bool]:
            if time.monotonic() > deadline:
                return 0.0, False
            start = time.perf_counter()
            try:
                response = client.post(f"{url}/v1/grade", files={"file": ("x.jpg", images[i % len(images)], "image/jpeg")})
                ok = response.status_code == 200
            except httpx.HTTPError:
                ok = False
            return time.perf_counter() - start, ok

        started = time.perf_counter()
        with ThreadPoolExecutor(clients) as pool:
            results = list(pool.map(one, range(requests)))
        elapsed = time.perf_counter() - started
    latencies = np.array([t for t, ok in results if ok]) * 1000
    errors = sum(not ok for _, ok in results)
    print(f"load test: {requests} POST /v1/grade from {clients} concurrent clients, backend {backend}, loopback")
    print(f"  throughput {len(latencies) / elapsed:.1f} req/s, p50 {np.percentile(latencies, 50):.0f} ms, "
          f"p95 {np.percentile(latencies, 95):.0f} ms, errors {errors}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--checkpoint", type=Path, default=None)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--requests", type=int, default=500)
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--backend", default="onnx")
    args = parser.parse_args()
    print(f"machine: {machine()}")
    backend_table(args.checkpoint or shipped_checkpoint(), args.threads)
    load_test(args.checkpoint, args.backend, args.requests, args.clients)


if __name__ == "__main__":
    main()
