"""A RAG-like application, end to end, with the three graph features of issue 14 on and off.

    question -> expand: four search queries, one per line (an output split into items)
             -> retrieve: BM25 over a local index, one native step per query
             -> answer: a ~2,000-token constant preamble, the question and the four sources

Configurations, measured side by side in one run (rotated order, a fresh preamble and question
per run so that no run finds another's prefill cached):

    all on          native retrieval on the server, items (each retrieval starts when its line is
                    complete), early prefill (the answer's preamble, and streamed text, prefilled
                    while its inputs are computed)
    no early        the server started with --no-early-prefill
    no items        each retrieval waits for the whole expansion
    no native       the notebook waits for each query, retrieves it itself, then submits the answer
    all off         the three off together: a request-centric client

Also the chain of the prefill-splitting goal: step 1 writes a short title, step 2 has the same
~2,000-token constant preamble; its time to first token counted from the moment step 1 finished
(server event times), with early prefill on and off.

Outputs are constrained to fixed shapes (letters and spaces, a fixed number of characters per line)
so both sides generate the same text. Prints JSON; --out writes it.

    python benchmarks/rag_app.py                                        # CPU, the default SmolLM2
    python benchmarks/rag_app.py --make-7b /tmp/llama7b --device cuda   # H200: random Llama-2-7B shape
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import numpy as np  # noqa: E402

import parrot_nb  # noqa: E402
from parrot_nb import SemanticFunction, native  # noqa: E402
from servers import Server, emit, new_result  # noqa: E402

QUERIES = 4
QUERY_RE = "[a-z]{4,8} [a-z]{4,8} [a-z]{4,8}"
EXPAND_RE = "\n".join([QUERY_RE] * QUERIES)
ANSWER_CHARS = 160


# ----------------------------------------------------------------------------- the index


def _words(rng: random.Random, n: int) -> list[str]:
    letters = "etaoinshrdlucmfwypvbgkqjxz"
    weights = [12, 9, 8, 8, 7, 7, 6, 6, 6, 4, 4, 3, 3, 2, 2, 2, 2, 1, 1, 1, 1, 1, 1, 1, 1, 1]
    return ["".join(rng.choices(letters, weights, k=rng.randint(4, 8))) for _ in range(n)]


def build_index(path: Path, docs: int, vocab: int = 30_000, words_per_doc: int = 40, seed: int = 0) -> None:
    """A synthetic corpus and its inverted index (postings per term, BM25 statistics) as .npy files."""
    rng = random.Random(seed)
    terms = _words(rng, vocab)
    np_rng = np.random.default_rng(seed)
    # Zipf-like term frequencies, as in real text.
    p = 1.0 / np.arange(1, vocab + 1) ** 1.05
    doc_terms = np_rng.choice(vocab, size=(docs, words_per_doc), p=p / p.sum())
    order = np.argsort(doc_terms.ravel(), kind="stable")
    flat_docs = np.repeat(np.arange(docs), words_per_doc)[order]
    counts = np.bincount(doc_terms.ravel(), minlength=vocab)
    path.mkdir(parents=True, exist_ok=True)
    np.save(path / "postings.npy", flat_docs.astype(np.int32))
    np.save(path / "offsets.npy", np.concatenate([[0], np.cumsum(counts)]).astype(np.int64))
    np.save(path / "doc_terms.npy", doc_terms.astype(np.int32))
    (path / "terms.txt").write_text("\n".join(terms))


def retrieve(query: str, index: str, k: int = 2) -> str:
    """BM25 over the index: the top ``k`` documents for ``query``, as text (runs as a native step)."""
    import numpy as np
    from pathlib import Path

    root = Path(index)
    names = (root / "terms.txt").read_text().split("\n")
    terms = {t: i for i, t in enumerate(names)}
    postings = np.load(root / "postings.npy", mmap_mode="r")
    offsets = np.load(root / "offsets.npy")
    doc_terms = np.load(root / "doc_terms.npy", mmap_mode="r")
    n_docs = doc_terms.shape[0]
    scores = np.zeros(n_docs, dtype=np.float32)
    for word in query.split() or ["none"]:
        tid = terms.get(word)
        if tid is None:  # unknown: the term among the 1,000 most frequent sharing the longest start with it
            tid = max(range(1000), key=lambda i: (_shared_prefix(word, names[i]), -i))
        docs = np.asarray(postings[offsets[tid] : offsets[tid + 1]])
        tf = np.bincount(docs, minlength=n_docs).astype(np.float32)
        df = int(np.count_nonzero(tf))
        idf = np.log(1 + (n_docs - df + 0.5) / (df + 0.5))
        scores += idf * tf * 2.2 / (tf + 1.2)  # BM25; every document has the same length
    top = np.argpartition(-scores, k)[:k]
    top = top[np.argsort(-scores[top])]
    return " ".join(" ".join(names[int(t)] for t in doc_terms[d][:12]) for d in top)


def _shared_prefix(a: str, b: str) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def retrieve_nth(queries: str, n: int, index: str) -> str:
    """Without items: take line ``n`` of the whole expansion, then retrieve (runs as a native step)."""
    lines = [line for line in queries.split("\n") if line.strip()]
    return retrieve(lines[n] if n < len(lines) else "", index)


# ----------------------------------------------------------------------------- the app


def preamble(rng: random.Random, words: int) -> str:
    return "Instructions for the answer. " + " ".join(_words(rng, words)) + "\n"


def functions(pre: str, items: bool) -> tuple[SemanticFunction, SemanticFunction]:
    expand = SemanticFunction.from_template(
        "expand",
        "Question: {{input:question}}\nWrite four search queries, one per line.\n{{output:queries"
        + (f" items={QUERIES}" if items else "") + "}}",
        regex=EXPAND_RE, max_tokens=120,
    )  # fmt: skip
    sources = "\n".join(f"{{{{input:d{i}}}}}" for i in range(QUERIES))
    answer = SemanticFunction.from_template(
        "answer", pre + "Question: {{input:question}}\nSources:\n" + sources + "\nAnswer: {{output:answer}}",
        regex=f"[a-z ]{{{ANSWER_CHARS}}}", max_tokens=ANSWER_CHARS + 8,
    )  # fmt: skip
    return expand, answer


def run_app(config: dict, pre: str, question: str, index: str) -> float:
    """One application run; returns its end-to-end seconds (submit to answer)."""
    expand, answer = functions(pre, config["items"])
    t0 = time.perf_counter()
    with parrot_nb.app(f"rag-{config['name']}"):
        queries = expand(question=question)
        if config["native"]:
            remote = native(retrieve)
            if config["items"]:
                docs = [remote(query=item, index=index) for item in queries.items]
            else:
                docs = [native(retrieve_nth)(queries=queries, n=i, index=index) for i in range(QUERIES)]
            result = answer(question=question, **{f"d{i}": d for i, d in enumerate(docs)})
        else:  # the notebook orchestrates: wait for each query, retrieve here, then submit the answer
            lines = [item.get(timeout=600) for item in queries.items] if config["items"] else [
                line for line in queries.get(timeout=600).split("\n") if line.strip()
            ]
            docs = [retrieve(line, index) for line in lines]
            result = answer(question=question, **{f"d{i}": d for i, d in enumerate(docs)})
        result.get(timeout=600)
    return time.perf_counter() - t0


CONFIGS = [
    {"name": "all on", "early": True, "items": True, "native": True},
    {"name": "no early prefill", "early": False, "items": True, "native": True},
    {"name": "no items", "early": True, "items": False, "native": True},
    {"name": "no native", "early": True, "items": True, "native": False},
    {"name": "all off", "early": False, "items": False, "native": False},
]


# ----------------------------------------------------------------------------- servers


def timeline(server: Server, since: int, t0: float) -> list[str]:
    """What the server did during one run, in order: event, function, seconds since the run began."""
    queued = {e["request_id"]: e["function"] for e in server.events() if e["type"] == "RequestQueued"}
    keep = ("RequestQueued", "RequestDispatched", "RequestFirstToken", "RequestFinished", "NativeDone", "WorkerDone")
    out = []
    for e in server.events()[since:]:
        if e["type"] in keep:
            rid = e.get("request_id", "")
            name = queued.get(rid.split("/")[0], "?") + ("/prefill" if rid.endswith("/prefill") else "")
            out.append(f"{e['t'] - t0:8.3f} {e['type']:<18} {name}")
    return out


def chain_ttft(server: Server, pre: str, topic: str) -> dict:
    """Step 2's time to first token after step 1 finished, from the server's event times."""
    title = SemanticFunction.from_template("title", "Topic: {{input:topic}}\nTitle: {{output:t}}", regex=QUERY_RE, max_tokens=24)
    summary = SemanticFunction.from_template(
        "summary", pre + "Title: {{input:t}}\nSummary: {{output:s}}", regex="[a-z ]{16}", max_tokens=24
    )
    with parrot_nb.app("chain"):
        s = summary(t=title(topic=topic))
        s.get(timeout=600)
    events = server.events()
    queued = {e["request_id"]: e["function"] for e in events if e["type"] == "RequestQueued"}
    step1 = [e for e in events if e["type"] == "RequestFinished" and queued.get(e["request_id"]) == "title"][-1]
    step2 = [e for e in events if e["type"] == "RequestFinished" and queued.get(e["request_id"]) == "summary"][-1]
    first = [e for e in events if e["type"] == "RequestFirstToken" and e["request_id"] == step2["request_id"]][-1]
    return {
        "ttft_after_step1_s": first["t"] - step1["t"],
        "step1_s": step1["exec_s"],  # what prefilling beside it cost step 1
        "chain_s": step2["t"] - (step1["t"] - step1["exec_s"]),  # step 1 dispatched to step 2 done
        "step2_prompt_tokens": step2["prompt_tokens"],
        "step2_cached_tokens": step2["cached_tokens"],
    }


def make_bpe_7b(path: Path) -> None:
    """serve_gpu's random Llama-2-7B-shaped checkpoint, with a byte-level BPE tokenizer (newlines and
    letters, which the constrained outputs need) trained in code on synthetic text."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    from benchmarks.serve_gpu import make_7b

    make_7b(path)
    rng = random.Random(1)
    corpus = [" ".join(_words(rng, 50)) + "\n" for _ in range(10_000)]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=32_000, special_tokens=["<unk>", "<s>", "</s>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(corpus, trainer)
    tok.save(str(path / "tokenizer.json"))


def measure(args: argparse.Namespace, model: str, tmp: Path, result: dict) -> None:
    index = tmp / "index"
    t = time.perf_counter()
    build_index(index, args.docs)
    result["index"] = {"docs": args.docs, "built_s": round(time.perf_counter() - t, 2)}
    t = time.perf_counter()
    retrieve("alpha beta gamma", str(index))
    result["index"]["one_retrieval_s"] = round(time.perf_counter() - t, 3)
    # Two servers side by side; on one GPU each takes a share of its memory for KV.
    flags = ["--tool-workers", str(QUERIES)] + (["--gpu-memory-utilization", "0.3"] if args.device == "cuda" else [])
    if args.background_chunk is not None:
        flags += ["--background-chunk", str(args.background_chunk)]
    servers = {
        True: Server(tmp, "early", model, args.device, *flags),
        False: Server(tmp, "late", model, args.device, *flags, "--no-early-prefill"),
    }
    rng = random.Random(7)
    try:
        for server in servers.values():  # warm up: load, first requests, tool workers
            server.use()
            run_app(CONFIGS[0], preamble(rng, 50), "warm up", str(index))
        result["end_to_end_s"], result["timeline_last_run"] = {}, {}
        for rtt in args.rtt_ms:
            times: dict[str, list[float]] = {c["name"]: [] for c in CONFIGS}
            for r in range(args.runs):
                for config in CONFIGS[r % len(CONFIGS) :] + CONFIGS[: r % len(CONFIGS)]:
                    server = servers[config["early"]]
                    server.use(rtt)
                    pre = preamble(rng, args.preamble_words)
                    question = " ".join(_words(rng, 8)) + "?"
                    since, t0 = len(server.events()), time.time()
                    times[config["name"]].append(run_app(config, pre, question, str(index)))
                    if r == args.runs - 1:
                        result["timeline_last_run"][f"{config['name']}, rtt {rtt:g} ms"] = timeline(server, since, t0)
            base = statistics.median(times["all off"])
            result["end_to_end_s"][f"rtt {rtt:g} ms"] = {
                name: {"median": round(statistics.median(ts), 3), "runs": [round(t, 3) for t in ts],
                       "speedup_vs_all_off": round(base / statistics.median(ts), 3)}
                for name, ts in times.items()
            }  # fmt: skip
        chain: dict[bool, list[dict]] = {True: [], False: []}
        for r in range(args.runs):
            for early in (r % 2 == 0, r % 2 == 1):
                servers[early].use()
                chain[early].append(chain_ttft(servers[early], preamble(rng, args.preamble_words), " ".join(_words(rng, 4))))
        ttft = {e: statistics.median(x["ttft_after_step1_s"] for x in chain[e]) for e in (True, False)}
        result["chain"] = {
            "with_early_prefill": chain[True], "without": chain[False],
            "median_ttft_after_step1_s": {"with": round(ttft[True], 4), "without": round(ttft[False], 4)},
            "ttft_cut": round(1 - ttft[True] / ttft[False], 3),
            **{f"median_{k}": {"with": round(statistics.median(x[k] for x in chain[True]), 4),
                               "without": round(statistics.median(x[k] for x in chain[False]), 4)}
               for k in ("step1_s", "chain_s")},
        }  # fmt: skip
        result["device"] = args.device
        result["model"] = parrot_nb.status().model
    finally:
        parrot_nb.disconnect()
        for server in servers.values():
            server.stop()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2", help="the model to serve (default: smollm2)")
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--make-7b", metavar="DIR", help="write a random Llama-2-7B-shaped checkpoint to DIR and serve it")
    ap.add_argument("--runs", type=int, default=3, help="runs of each configuration (default: 3)")
    ap.add_argument("--docs", type=int, default=200_000, help="documents in the index (default: 200000)")
    ap.add_argument("--preamble-words", type=int, default=1000, help="words of the answer's preamble (default: 1000)")
    ap.add_argument(
        "--rtt-ms", type=float, nargs="+", default=[0.0],
        help="simulated round trips between the notebook and the server, each measured (default: 0)",
    )  # fmt: skip
    ap.add_argument(
        "--background-chunk", type=int, default=None, metavar="N",
        help="the servers' --background-chunk (default: theirs, 0: early prefills use idle steps only)",
    )  # fmt: skip
    ap.add_argument("--out", type=Path, help="write the JSON here too")
    args = ap.parse_args()
    result = new_result("rag_app.py")
    model = args.model
    if args.make_7b:
        t = time.perf_counter()
        make_bpe_7b(Path(args.make_7b))
        result["checkpoint_written_s"] = round(time.perf_counter() - t, 1)
        model = args.make_7b
    with tempfile.TemporaryDirectory(prefix="rag-app-") as tmp_dir:
        measure(args, model, Path(tmp_dir), result)
    emit(result, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
