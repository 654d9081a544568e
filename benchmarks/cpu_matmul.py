"""Which matmul kernel to serve SmolLM2-135M with on a CPU: the weights of all 30 layers, cold.

For each number of rows (1-2 are decode of one or two sequences, 8 is eight at once, 32 and 300 are
prefill chunks), the time to multiply the rows by every layer matrix of a SmolLM2-shaped model
(q/k/v stacked 1728x576, o 576x576, gate/up stacked 3072x576, down 576x1536, x 30 distinct layers, so
nothing stays in cache), for each kernel PyTorch offers on this CPU:

  f32 linear      F.linear(x, W) in float32 (what the engine did before)
  f32 W@xT        torch.mm(W, x^T) in float32 (same numbers; MKL picks another kernel)
  f16 linear      F.linear in float16 (half the bytes)
  bf16 linear     F.linear in bfloat16
  int8 weight     torch._weight_int8pack_mm (int8 weights, one scale per row)
  int4 weight     torch.ops.aten._weight_int4pack_mm_for_cpu (4-bit groups of 32, like GGUF Q4_1)

    .venv/bin/python benchmarks/cpu_matmul.py > benchmarks/results/cpu_matmul.txt
"""

from __future__ import annotations

import platform
import time

import torch
import torch.nn.functional as F

SHAPES = [(1728, 576), (576, 576), (3072, 576), (576, 1536)]
LAYERS = 30
ROWS = (1, 2, 8, 32, 300)


def kernels():
    g = torch.Generator().manual_seed(0)
    ws = [torch.randn(n, k, generator=g) * 0.05 for _ in range(LAYERS) for n, k in SHAPES]
    halves = [w.half() for w in ws]
    bf16s = [w.bfloat16() for w in ws]
    int8 = [(torch.randint(-127, 127, w.shape, dtype=torch.int8), w.abs().amax(1) / 127) for w in ws]
    int4 = [
        (
            torch.ops.aten._convert_weight_to_int4pack_for_cpu(torch.randint(0, 16, w.shape, dtype=torch.int32), 1),
            torch.randn(w.shape[1] // 32, w.shape[0], 2),
        )
        for w in ws
    ]
    return {
        "f32 linear": lambda x: [F.linear(x[:, : w.shape[1]], w) for w in ws],
        "f32 W@xT": lambda x: [torch.mm(w, x[:, : w.shape[1]].t()) for w in ws],
        "f16 linear": lambda x: [F.linear(x[:, : w.shape[1]].half(), w) for w in halves],
        "bf16 linear": lambda x: [F.linear(x[:, : w.shape[1]].bfloat16(), w) for w in bf16s],
        "int8 weight": lambda x: [torch._weight_int8pack_mm(x[:, : q.shape[1]].contiguous(), q, s) for q, s in int8],
        "int4 weight": lambda x: [
            torch.ops.aten._weight_int4pack_mm_for_cpu(x[:, : sz.shape[0] * 32].contiguous(), p, 32, sz) for p, sz in int4
        ],
    }


def main() -> None:
    print(f"# {platform.processor() or platform.machine()}, torch {torch.__version__}, {torch.get_num_threads()} threads")
    print("# ms to multiply the rows by all 30 layers' matrices (median of 3)")
    table = kernels()
    print("rows".ljust(6) + "".join(name.rjust(14) for name in table))
    for rows in ROWS:
        x = torch.randn(rows, 1536)
        cells = []
        for name, run in table.items():
            if rows == 300 and not name.startswith("f32"):
                cells.append("-".rjust(14))  # seconds per call: left out to keep the run short
                continue
            run(x)
            times = []
            for _ in range(3):
                t = time.perf_counter()
                run(x)
                times.append(time.perf_counter() - t)
            cells.append(f"{sorted(times)[1] * 1e3:.1f}".rjust(14))
        print(str(rows).ljust(6) + "".join(cells))


if __name__ == "__main__":
    main()
