"""Load test of `klgrade serve` on loopback: throughput, latency percentiles, errors and server memory.

    python benchmarks/load.py [--requests 1000] [--concurrency 16] [--backends torch onnx] [--explain-requests 100]
                              [--huge 16] [--large 40] [--max-upload-mp 30] [--checkpoint CKPT] [--json]

For each backend: a server is started on 127.0.0.1, warmed up, then `--requests` POST /v1/grade (the example
radiographs, no heatmap) are sent by `--concurrency` clients, then `--explain-requests` with `explain=true`.
`--huge N` then sends N concurrent uploads of a 7999x7999 16-bit PNG (124 KB on the wire, 64 MP decoded) to
the torch server; `--large N`, N concurrent uploads of `LARGE_MB` MiB each (random bytes: refused as no image
once held, so what is measured is the holding), the bound on uploads held at once. Server RSS (VmRSS now, VmHWM
peak) is read from /proc. Every phase is bounded in count and time (`PHASE_SECONDS`) and the server stops with
the script. Client and server share the machine's cores.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import sys
import time
from pathlib import Path

import httpx
import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).parent))
from common import machine  # noqa: E402

from klgrade.serve.local import local_server  # noqa: E402

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
PHASE_SECONDS = 300
HUGE_SIDE = 7999
LARGE_MB = 30


def memory_mb(pid: int) -> dict[str, float]:
    """Resident memory of a process now (VmRSS) and at its peak (VmHWM), MB."""
    values = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, rest = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            values[key] = int(rest.split()[0]) / 1024
    return {"rss_mb": round(values["VmRSS"], 1), "peak_rss_mb": round(values["VmHWM"], 1)}


def huge_png() -> bytes:
    """A 16-bit 7999x7999 PNG that compresses to ~124 KB: a decompression-size attack that is a valid image."""
    buffer = io.BytesIO()
    Image.fromarray(np.zeros((HUGE_SIDE, HUGE_SIDE), np.uint16)).save(buffer, format="PNG")
    return buffer.getvalue()


async def send_all(url: str, uploads: list[tuple[str, bytes]], concurrency: int, explain: bool) -> dict:
    """POST every upload with `concurrency` in flight; latency percentiles, req/s, status counts."""
    latencies, statuses = [], {}
    queue = iter(range(len(uploads)))
    deadline = time.monotonic() + PHASE_SECONDS
    async with httpx.AsyncClient(timeout=120, limits=httpx.Limits(max_connections=concurrency)) as client:

        async def worker() -> None:
            for i in queue:
                if time.monotonic() > deadline:
                    return
                name, data = uploads[i]
                start = time.perf_counter()
                try:
                    response = await client.post(f"{url}/v1/grade", params={"explain": str(explain).lower()},
                                                 files={"file": (name, data, "application/octet-stream")})
                    status = response.status_code
                except httpx.HTTPError as exc:
                    status = type(exc).__name__
                latencies.append(time.perf_counter() - start)
                statuses[status] = statuses.get(status, 0) + 1

        started = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        elapsed = time.perf_counter() - started
    ms = np.array(latencies) * 1000
    return {"requests": len(latencies), "concurrency": concurrency, "explain": explain,
            "req_per_s": round(len(latencies) / elapsed, 1), "p50_ms": round(float(np.percentile(ms, 50)), 1),
            "p95_ms": round(float(np.percentile(ms, 95)), 1), "p99_ms": round(float(np.percentile(ms, 99)), 1),
            "errors": sum(n for s, n in statuses.items() if s != 200), "statuses": {str(k): v for k, v in statuses.items()}}


def run_backend(backend: str, checkpoint: Path | None, args) -> dict:
    examples = [(p.name, p.read_bytes()) for p in sorted(EXAMPLES.glob("*.jpg"))]
    serve_args = ["--backend", backend, "--max-upload-mp", str(args.max_upload_mp)]
    serve_args += ["--checkpoint", str(checkpoint)] if checkpoint else []
    with local_server(*serve_args) as server:
        asyncio.run(send_all(server.url, examples * 2, 4, False))  # warm-up: first batches, thread pools
        result = {"backend": backend, "memory_before": memory_mb(server.pid)}
        uploads = [examples[i % len(examples)] for i in range(args.requests)]
        result["plain"] = asyncio.run(send_all(server.url, uploads, args.concurrency, False))
        if args.explain_requests:
            uploads = [examples[i % len(examples)] for i in range(args.explain_requests)]
            result["explain"] = asyncio.run(send_all(server.url, uploads, args.concurrency, True))
        result["memory_after"] = memory_mb(server.pid)
        if args.huge and backend == "torch":
            huge = [("huge.png", huge_png())] * args.huge
            result["huge_uploads"] = asyncio.run(send_all(server.url, huge, args.huge, False))
            result["memory_after_huge"] = memory_mb(server.pid)
        if args.large and backend == "torch":
            large = [("large.png", np.random.default_rng(0).bytes(LARGE_MB * 2**20))] * args.large
            result["large_uploads"] = asyncio.run(send_all(server.url, large, args.large, False))
            result["memory_after_large"] = memory_mb(server.pid)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=1000)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--explain-requests", type=int, default=100)
    parser.add_argument("--huge", type=int, default=16, help="Concurrent 7999x7999 16-bit uploads (0 = none).")
    parser.add_argument("--large", type=int, default=40, help=f"Concurrent {LARGE_MB} MiB uploads (0 = none).")
    parser.add_argument("--backends", nargs="+", default=["torch", "onnx"])
    parser.add_argument("--max-upload-mp", type=float, default=30.0, help="The server's upload pixel limit.")
    parser.add_argument("--checkpoint", type=Path, default=None, help="Default: the shipped model.")
    parser.add_argument("--json", action="store_true", help="Print one JSON object.")
    args = parser.parse_args()
    results = {"machine": machine(), "backends": [run_backend(b, args.checkpoint, args) for b in args.backends]}
    if args.json:
        print(json.dumps(results, indent=2))
        return
    print(f"machine: {results['machine']}; client and server on the same cores, loopback")
    print(f"{'backend':8s} {'phase':14s} {'n':>5s} {'conc':>4s} {'req/s':>7s} {'p50':>6s} {'p95':>6s} {'p99':>6s} {'errors':>6s}")
    for entry in results["backends"]:
        for phase in ("plain", "explain", "huge_uploads", "large_uploads"):
            if phase in entry:
                r = entry[phase]
                print(f"{entry['backend']:8s} {phase:14s} {r['requests']:5d} {r['concurrency']:4d} {r['req_per_s']:7.1f} "
                      f"{r['p50_ms']:6.0f} {r['p95_ms']:6.0f} {r['p99_ms']:6.0f} {r['errors']:6d}  {r['statuses']}")
        memory = ", ".join(f"{key}: {value['rss_mb']:.0f} MB (peak {value['peak_rss_mb']:.0f})"
                           for key, value in entry.items() if key.startswith("memory"))
        print(f"{entry['backend']:8s} server RSS   {memory}")


if __name__ == "__main__":
    main()
