"""Parameters, GFLOPs at 224, CPU latency (batch 1 and 16) and, on a GPU, bf16 training images/s per model.

    python benchmarks/models.py [--threads 2] [--size 224]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, str(Path(__file__).parent))
from common import latency_ms, machine, per_second  # noqa: E402

from klgrade.models import create_model  # noqa: E402

MODELS = [("msa_net", {}), ("msa_net", {"fpn": False}), ("msa_net", {"se": False}), ("msa_net", {"attention": False}),
          ("resnet18", {}), ("resnet50", {}), ("mobilenet_v2", {}), ("densenet121", {})]


def gflops(model: torch.nn.Module, size: int) -> float:
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        model(torch.zeros(1, 1, size, size))
    return counter.get_total_flops() / 1e9


def gpu_train_rate(model: torch.nn.Module, size: int, batch: int = 128) -> float:
    model = model.cuda().to(memory_format=torch.channels_last).train()
    optimizer = torch.optim.AdamW(model.parameters())
    x = torch.randn(batch, 1, size, size, device="cuda").contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 5, (batch,), device="cuda")

    def step():
        for _ in range(10):
            with torch.autocast("cuda", dtype=torch.bfloat16):
                loss = torch.nn.functional.cross_entropy(model(x), y)
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        torch.cuda.synchronize()

    return per_second(step, 10 * batch)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--size", type=int, default=224)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"machine: {machine()}")
    print(f"input 1x{args.size}x{args.size}, fp32 eager, torch.inference_mode, {args.threads} CPU threads")
    header = f"{'model':24s} {'params M':>9s} {'GFLOPs':>7s} {'CPU b1 ms':>10s} {'CPU b16 img/s':>14s}"
    if torch.cuda.is_available():
        header += f" {'GPU bf16 train img/s':>21s}"
    print(header)
    for name, options in MODELS:
        model = create_model(name, **options).eval()
        label = name + "".join(f" -{k}" for k in options)
        params = sum(p.numel() for p in model.parameters()) / 1e6
        one, sixteen = torch.randn(1, 1, args.size, args.size), torch.randn(16, 1, args.size, args.size)
        with torch.inference_mode():
            b1 = latency_ms(lambda: model(one), repeats=10)
            b16 = per_second(lambda: model(sixteen), 16, repeats=2)
        line = f"{label:24s} {params:9.2f} {gflops(model, args.size):7.2f} {b1:10.1f} {b16:14.1f}"
        if torch.cuda.is_available():
            line += f" {gpu_train_rate(model, args.size):21.0f}"
        print(line, flush=True)


if __name__ == "__main__":
    main()
