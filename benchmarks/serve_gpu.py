"""The whole stack on a GPU: `parrot-nb serve --model DIR --device cuda` on a Llama-2-7B-shaped
checkpoint, driven through parrot_nb like a notebook would.

    python benchmarks/serve_gpu.py --make-7b /tmp/llama7b-random   # write the checkpoint, then serve it
    python benchmarks/serve_gpu.py --model DIR                     # serve an existing checkpoint

--make-7b writes random bf16 weights in Llama-2-7B's shape as sharded safetensors, with a
32,000-word word-level tokenizer built in code (no download anywhere). Prints JSON: load time,
a two-call chain, and a map-reduce whose 16 map calls share a long system prompt (the cached
token counts show it was prefilled once).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import parrot_nb  # noqa: E402
from parrot_nb import SemanticFunction  # noqa: E402


def make_7b(path: Path) -> None:
    """Random bf16 weights in Llama-2-7B's shape with a 32,000-word tokenizer (``w<id>`` is token id)."""
    from checkpoints import write_word_checkpoint

    from engine_server.engine.model import llama2_7b_config

    cfg = llama2_7b_config()
    keep = ("vocab_size", "dim", "n_layers", "n_heads", "n_kv_heads", "hidden_dim", "max_seq_len", "rope_theta", "norm_eps")
    write_word_checkpoint(path, {k: getattr(cfg, k) for k in keep}, "cuda")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", help="a local Hugging Face directory to serve")
    ap.add_argument("--make-7b", metavar="DIR", help="write a random Llama-2-7B-shaped checkpoint to DIR and serve it")
    args = ap.parse_args()
    result: dict = {}
    model = args.model
    if args.make_7b:
        t = time.perf_counter()
        make_7b(Path(args.make_7b))
        result["checkpoint_written_s"] = round(time.perf_counter() - t, 1)
        model = args.make_7b
    if not model:
        ap.error("give --model DIR or --make-7b DIR")

    t0 = time.perf_counter()
    parrot_nb.start(model=model, device="cuda")
    while parrot_nb.status().engines[0].state != "ready":  # load, fuse, capture decode graphs
        time.sleep(0.1)
    result["engine_ready_s"] = round(time.perf_counter() - t0, 1)

    words = lambda n, s: " ".join(f"w{(i * 7919 + s) % 31000 + 100}" for i in range(n))  # noqa: E731
    write = SemanticFunction.from_template("write", "Task: {{input:task}} Code: {{output:code}}", max_tokens=64, ignore_eos=True)
    test = SemanticFunction.from_template("test", "Code: {{input:code}} Tests: {{output:tests}}", max_tokens=64, ignore_eos=True)
    t = time.perf_counter()
    tests = test(code=write(task=words(32, 1)))
    tests.get(timeout=600)
    result["chain_2_calls_64_tokens_each_s"] = round(time.perf_counter() - t, 3)

    system = words(2000, 2)
    summarize = SemanticFunction.from_template(
        "summarize", system + " Chunk: {{input:chunk}} Summary: {{output:summary}}", max_tokens=64, ignore_eos=True
    )
    t = time.perf_counter()
    with parrot_nb.app("map-reduce"):
        parts = [summarize(chunk=words(200, 10 + i)) for i in range(16)]
        joined = SemanticFunction.from_template(
            "join", " ".join(f"{{{{input:p{i}}}}}" for i in range(16)) + " Overall: {{output:overall}}",
            max_tokens=64, ignore_eos=True,
        )  # fmt: skip
        overall = joined(**{f"p{i}": p for i, p in enumerate(parts)})
        overall.get(timeout=600)
    result["map_reduce_16x64_plus_64_tokens_s"] = round(time.perf_counter() - t, 3)
    st = parrot_nb.status()
    result["apps"] = [
        {k: getattr(a, k) for k in ("name", "requests", "done", "prompt_tokens", "cached_tokens") if hasattr(a, k)}
        for a in st.apps
    ]
    result["engine"] = {"model": st.model, "device": st.device, "state": st.engines[0].state}
    parrot_nb.stop()
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
