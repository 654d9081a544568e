"""`parrot-nb serve --model DIR`: the server loads a local Hugging Face checkpoint (written
here, with its tokenizer) and runs semantic functions on it, with the checkpoint's own
tokenizer in both directions.
"""

from __future__ import annotations

import pytest

import parrot_nb
from engine_server.engine.worker import build_engine
from parrot_nb.function import SemanticFunction
from tests.checkpoints import tiny_hf_config, write_checkpoint, write_tokenizer
from tests.conftest import ServerProcess
from tests.tiny_oracle import expected_on


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    path = tmp_path_factory.mktemp("qwen2-tiny")
    tok = write_tokenizer(path, "qwen2")
    write_checkpoint(path, tiny_hf_config("qwen2", vocab_size=tok.get_vocab_size(), tie_word_embeddings=True))
    return path


@pytest.fixture(scope="module")
def server(checkpoint, tmp_path_factory):
    server = ServerProcess(tmp_path_factory.mktemp("serve"), "--model", str(checkpoint))
    try:
        parrot_nb.connect(server.connection_file)
        yield server
    finally:
        parrot_nb.disconnect()
        server.stop()


def test_checkpoint_server_runs_a_chain_and_reports_its_model(server, checkpoint):
    first = SemanticFunction.from_template("first", "Tell me a story: {{output:story max_tokens=12}}")
    second = SemanticFunction.from_template("second", "Story: {{input:s}} Moral: {{output:moral max_tokens=8}}")
    story = first()
    moral = second(s=story)
    # The same model, built as a server builds it, here in this process: the server's chain must
    # give exactly its greedy text, with the first output passed on as the second's input.
    engine = build_engine(str(checkpoint), "cpu")
    want_story = expected_on(engine, first)["story"]
    assert moral.get(timeout=120) == expected_on(engine, second, s=want_story)["moral"]
    assert story.get() == want_story
    finished = [e for e in server.events() if e["type"] == "RequestFinished"]
    assert len(finished) == 2 and all(e["output_tokens"] >= 1 for e in finished)
    assert parrot_nb.status().model == str(checkpoint)


def test_same_prompt_twice_is_served_from_the_cached_context(server):
    f = SemanticFunction.from_template("cached", "A fixed preamble that both calls share. {{output:x max_tokens=3}}")
    f().get(timeout=120)
    f().get(timeout=120)
    finished = [e for e in server.events() if e["type"] == "RequestFinished"][-2:]
    assert finished[0]["cached_tokens"] == 0
    assert finished[1]["cached_tokens"] == finished[1]["prompt_tokens"] - 1


def test_status_shows_engine_capacity_kv_use_and_cache_hits(server):
    from parrot_nb.session import format_status

    f = SemanticFunction.from_template("status_probe", "Another shared preamble for the status line. {{output:x max_tokens=2}}")
    with parrot_nb.app("status-app"):
        f().get(timeout=120)
        f().get(timeout=120)
    text = format_status(parrot_nb.status())
    engine_line = next(line for line in text.splitlines() if line.startswith("  engine 0:"))
    assert "running 0/16" in engine_line and "KV blocks" in engine_line and "cached contexts" in engine_line
    app_line = next(line for line in text.splitlines() if "app status-app" in line)
    assert "prompt tokens from cache" in app_line and "from cache (0%)" not in app_line
