"""Whole engine decode steps over shared prefixes: the shared-prefix kernel off, on, and the engine's choice.

For a Llama-2-7B shape (32 KV heads) and a Llama-3-8B shape (8 KV heads), random bf16 weights: a
prefix is computed once and cached, ``batch`` sequences fork it (each with a 16-token suffix of its
own), and the engine decodes; the figure is decode tokens/s over timed steps (CUDA graphs on, so
each side runs as it serves). Three engines per shape: ``shared_prefix_kernel`` False (paged decode
only), True (the shared kernel whenever the batch shares blocks) and None (the engine's choice).

    python benchmarks/shared_steps.py [--out benchmarks/results/shared_steps.md] [--quick]
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from engine_bench import IdTokenizer, gen, measured_commit, prompt, release, time_steps, write_report  # noqa: E402

from engine_server.engine.engine import Engine, EngineConfig, TextSegment  # noqa: E402
from engine_server.engine.model import ModelConfig, build_random_model, llama2_7b_config  # noqa: E402

SHAPES = {
    "llama2-7b": lambda: dataclasses.replace(llama2_7b_config(), max_seq_len=16384),
    "llama3-8b": lambda: ModelConfig(vocab_size=128256, dim=4096, n_layers=32, n_heads=32, n_kv_heads=8,
                                     hidden_dim=14336, max_seq_len=16384, rope_theta=500000.0),
}
# (sequences, shared prefix tokens): the 64 x 8k, the shapes the chooser used to miss or
# lose (4 x 4k, 8 x 2k) and small ones where the shared kernel should not be picked.
BATCHES = [(64, 8192), (64, 2048), (64, 512), (32, 4096), (16, 1024), (8, 2048), (4, 4096), (4, 256), (2, 1024)]
SIDES = (("off", False), ("on", True), ("choice", None))


class Side:
    """One engine of a model with the shared-prefix kernel off, on, or left to the engine, reused across batches."""

    def __init__(self, model, shared) -> None:
        self.engine = Engine(model, IdTokenizer(), EngineConfig(max_running=64, token_budget=8192, shared_prefix_kernel=shared))
        self.engine.warmup()
        self.picked = 0
        planner = self.engine._shared_plan

        def counting(seqs, tables=None):
            plan = planner(seqs, tables)
            self.picked += plan is not None
            return plan

        self.engine._shared_plan = counting

    def measure(self, n_seqs: int, prefix: int, steps: int) -> tuple[float, int]:
        """Decode tokens/s, and how many steps took the shared kernel."""
        engine, key = self.engine, f"ctx{prefix}"
        base = prompt(prefix, 7)
        engine.run([TextSegment(base, key), gen(1)])
        for i in range(n_seqs):
            engine.add(f"f{n_seqs}-{prefix}-{i}", [TextSegment(base, key), TextSegment(prompt(16, 100 + i)), gen(steps + 16)])
        self.picked = 0
        s = time_steps(engine, steps)
        engine.reset()
        return n_seqs / s, self.picked


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="benchmarks/results/shared_steps.md")
    ap.add_argument("--quick", action="store_true", help="fewer steps and shapes (a smoke run)")
    ap.add_argument("--shapes", default=",".join(SHAPES))
    ap.add_argument("--commit", help="the commit being measured (default: git rev-parse HEAD here)")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        print("shared_steps needs a CUDA device", file=sys.stderr)
        return 2
    steps = 10 if args.quick else 40
    batches = BATCHES[:2] if args.quick else BATCHES
    commit = measured_commit(args.commit)
    lines = [
        "# Engine decode steps over shared prefixes",
        "",
        f"Command: `python benchmarks/shared_steps.py{' --quick' if args.quick else ''}`  ",
        f"Machine: {torch.cuda.get_device_name()}, torch {torch.__version__}; commit {commit}  ",
        f"Random bf16 weights; block size 16; CUDA graphs on; {steps} timed steps after 3 untimed; "
        "each sequence = the shared prefix + 16 tokens of its own, then decode.  ",
        "Decode tokens/s per side; 'choice' is the engine's default (`shared_prefix_kernel=None`), "
        "'picked': how many of its steps (warm-up and timed, prefill included) took the shared kernel.",
        "",
        "| shape | sequences | prefix | off tok/s | on tok/s | choice tok/s | picked | on / off | choice / best |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for shape in args.shapes.split(","):
        cfg = SHAPES[shape]()
        model = build_random_model(cfg, seed=0, device="cuda", dtype=torch.bfloat16)
        measured = {}
        for name, shared in SIDES:
            side = Side(model, shared)
            for n_seqs, prefix in batches:
                measured[name, n_seqs, prefix] = side.measure(n_seqs, prefix, steps)
                print(shape, name, n_seqs, prefix, measured[name, n_seqs, prefix], flush=True)
            release(side.engine)
            del side
        for n_seqs, prefix in batches:
            off, on, choice = (measured[name, n_seqs, prefix][0] for name, _ in SIDES)
            picked = measured["choice", n_seqs, prefix][1]
            lines.append(f"| {shape} | {n_seqs} | {prefix} | {off:.0f} | {on:.0f} | {choice:.0f} | {picked} "
                         f"| {on / off:.2f}x | {choice / max(on, off):.2f}x |")
        del model
        torch.cuda.empty_cache()
    write_report("\n".join(lines) + "\n", args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
