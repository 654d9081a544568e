"""Where a decode step's GPU time goes: kernel totals from torch.profiler over eager steps.

    python benchmarks/engine_profile.py [--batch 1] [--steps 10]

Runs the Llama-2-7B-shaped random bf16 model of engine_bench.py with CUDA graphs off
(the profiler then sees each kernel) and prints kernels by total time per step.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from engine_bench import IdTokenizer, gen, prompt, until_decoding  # noqa: E402

from engine_server.engine.engine import Engine, EngineConfig, TextSegment  # noqa: E402
from engine_server.engine.model import build_random_model, llama2_7b_config  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--steps", type=int, default=10)
    args = ap.parse_args()
    model = build_random_model(llama2_7b_config(), seed=0, device="cuda", dtype=torch.bfloat16)
    engine = Engine(model, IdTokenizer(), EngineConfig(max_running=64, num_blocks=1024, cuda_graphs=False))
    for i in range(args.batch):
        engine.add(f"d{i}", [TextSegment(prompt(128, i)), gen(args.steps + 32)])
    until_decoding(engine)
    for _ in range(3):
        engine.step()
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        for _ in range(args.steps):
            engine.step()
        torch.cuda.synchronize()
    totals: dict[str, list[float]] = {}
    for ev in prof.events():
        if ev.device_type == torch.autograd.DeviceType.CUDA:
            entry = totals.setdefault(ev.name[:90], [0.0, 0])
            entry[0] += ev.device_time_total if hasattr(ev, "device_time_total") else ev.cuda_time_total
            entry[1] += 1
    all_us = sum(t for t, _ in totals.values()) / args.steps
    print(f"batch {args.batch}: GPU kernel time {all_us / 1e3:.3f} ms/step, "
          f"{sum(n for _, n in totals.values()) / args.steps:.0f} kernels/step")  # fmt: skip
    for name, (t, n) in sorted(totals.items(), key=lambda kv: -kv[1][0])[:25]:
        print(f"{t / args.steps / 1e3:8.3f} ms  {n / args.steps:6.0f}x  {name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
