"""End-to-end check of the CUDA path: a real server with its engine on the GPU runs a two-call chain.

Run on a CUDA machine: ``python benchmarks/gpu_smoke.py`` (prints JSON). The engine is the
walking skeleton's (tiny model, one request at a time, contiguous KV cache, no CUDA graphs), so
the chain time is a record that the path works and a first reference, not a performance claim.
"""

from __future__ import annotations

import json
import time

import parrot_nb
from parrot_nb import SemanticFunction


def main() -> None:
    t0 = time.perf_counter()
    parrot_nb.start(device="cuda")
    started = time.perf_counter() - t0
    while parrot_nb.status().engines[0].state != "ready":  # torch import and CUDA init in the worker
        time.sleep(0.05)
    engine_ready = time.perf_counter() - t0
    write = SemanticFunction.from_template("write_code", "Task: {{input:task}}\nCode: {{output:code}}", max_tokens=64, ignore_eos=True)
    test = SemanticFunction.from_template("write_tests", "Code: {{input:code}}\nTests: {{output:tests}}", max_tokens=64, ignore_eos=True)
    t1 = time.perf_counter()
    code = write(task="add two numbers")
    tests = test(code=code)
    tests.get(timeout=300)
    chain_s = time.perf_counter() - t1
    status = parrot_nb.status()
    parrot_nb.stop()
    print(json.dumps({
        "server_start_s": round(started, 2),
        "engine_ready_s": round(engine_ready, 2),
        "chain_2_calls_64_tokens_each_s": round(chain_s, 3),
        "outputs_chars": [len(code.get()), len(tests.get())],
        "engine": {"device": status.device, "state": status.engines[0].state, "finished": status.engines[0].finished},
    }, indent=2))


if __name__ == "__main__":
    main()
