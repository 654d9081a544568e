"""The engine on CUDA: Triton attention, the shared-prefix kernel and CUDA graphs compute
the same decode logits as the torch reference path, on the same engine state.

Float32 weights; Triton's dots may use TF32, so logits are compared with a tolerance
(token sequences are not: a near-tie may flip an argmax under any change of summation
order, and then everything after it differs). Skipped without CUDA.
"""

import pytest
import torch

from engine_server.engine.attention import PagedAttention
from engine_server.engine.engine import Engine, EngineConfig, GenSegment, TextSegment
from engine_server.engine.model import ModelConfig, build_random_model, build_tiny_model
from engine_server.engine.sampler import SamplingParams
from engine_server.engine.tokenizer import ByteTokenizer

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]

SYSTEM = "System: a long shared preamble that many sequences read. " * 6


@pytest.fixture(scope="module")
def engine():
    # Byte vocabulary, head_dim 64 (a size the kernels are built for), GQA 4:1.
    cfg = ModelConfig(vocab_size=259, dim=256, n_layers=2, n_heads=4, n_kv_heads=1,
                      hidden_dim=512, max_seq_len=4096)  # fmt: skip
    model = build_random_model(cfg, seed=0, device="cuda", dtype=torch.float32)
    engine = Engine(model, ByteTokenizer(), EngineConfig(num_blocks=512, max_running=64, cuda_graphs=True))
    engine.graphs.capture()
    engine.add("first", [TextSegment(SYSTEM, "sys"), GenSegment("a", SamplingParams(max_tokens=2))])
    while engine.has_work():
        engine.step()
    for i in range(32):
        engine.add(
            f"r{i}",
            [TextSegment(SYSTEM, "sys"), TextSegment(f"seq {i}: " * (i % 4 + 1)),
             GenSegment("a", SamplingParams(max_tokens=64, ignore_eos=True))],
        )  # fmt: skip
    while engine.waiting or any(s.pending != 1 or s.output is None for s in engine.running):
        engine.step()
    for _ in range(3):  # a few decode steps, so suffixes hold generated tokens too
        engine.step()
    return engine


def decode_logits(engine: Engine, *, triton: bool, shared: bool | None, graphs: bool) -> torch.Tensor:
    """Logits of one decode step over the engine's running batch, through the chosen path."""
    saved = engine.attention, engine.graphs, engine.config.shared_prefix_kernel
    engine.attention = PagedAttention(engine.pool.k, engine.pool.v, use_triton=triton)
    engine.graphs = saved[1] if graphs else None
    engine.config.shared_prefix_kernel = shared
    try:
        batch = [(s, 1) for s in sorted(engine.running, key=lambda s: s.order)]
        logits, sampling = engine._forward(batch, len(batch))
        assert [s for s, _ in batch] == sampling
        torch.cuda.synchronize()
        return logits.clone()
    finally:
        engine.attention, engine.graphs, engine.config.shared_prefix_kernel = saved


@pytest.fixture(scope="module")
def reference(engine):
    return decode_logits(engine, triton=False, shared=False, graphs=False)


def assert_close(got, want):
    torch.testing.assert_close(got, want, atol=2e-3 * want.abs().max().item(), rtol=0)


def test_batch_really_shares_a_prefix(engine):
    engine.config.shared_prefix_kernel = True
    try:
        plan = engine._shared_plan(list(engine.running))
    finally:
        engine.config.shared_prefix_kernel = None
    assert plan is not None and plan.shared_tokens < plan.paged_tokens


def test_triton_paged_decode_matches_reference(engine, reference):
    assert_close(decode_logits(engine, triton=True, shared=False, graphs=False), reference)


def test_shared_prefix_kernel_matches_reference(engine, reference):
    assert_close(decode_logits(engine, triton=True, shared=True, graphs=False), reference)


def test_cuda_graph_replay_matches_reference(engine, reference):
    got = decode_logits(engine, triton=True, shared=False, graphs=True)
    assert engine.graphs.captured
    assert_close(got, reference)


def test_shared_prefix_graph_replay_matches_reference(engine, reference):
    got = decode_logits(engine, triton=True, shared=True, graphs=True)
    size = next(b for b in engine.graphs.sizes if b >= len(engine.running))
    n_group_items, _ = engine.graphs.launches[size].counts.tolist()
    assert n_group_items > 0  # the step ran the captured shared-prefix launch, filled with this batch's plan
    assert_close(got, reference)


def test_bf16_engine_runs_on_cuda_with_graphs():
    m = build_tiny_model(seed=0, device="cuda", dtype=torch.bfloat16)
    engine = Engine(m, ByteTokenizer(), EngineConfig(num_blocks=256, max_running=16))
    engine.warmup()
    result = engine.run([TextSegment("Hello"), GenSegment("a", SamplingParams(max_tokens=16, ignore_eos=True))])
    assert result.output_tokens["a"] == 16


def test_constrained_outputs_decode_through_cuda_graph_replays():
    """The mask is applied to the logits a replay returns: the graphs stay as captured."""
    import json
    import re

    import jsonschema

    schema = {"type": "object", "properties": {"ok": {"type": "boolean"}, "n": {"type": "integer", "minimum": 0, "maximum": 99}},
              "required": ["ok", "n"], "additionalProperties": False}  # fmt: skip
    checks = [
        ({"choices": "network|disk|certificate"}, lambda s: s in ("network", "disk", "certificate")),
        ({"regex": "[0-9]{3}-[a-z]{2,4}"}, lambda s: re.fullmatch("[0-9]{3}-[a-z]{2,4}", s)),
        ({"json": schema}, lambda s: jsonschema.validate(json.loads(s), schema) is None),
        ({"choices": "yes|no", "temperature": 1.0, "seed": 7}, lambda s: s in ("yes", "no")),
    ]
    m = build_tiny_model(seed=0, device="cuda", dtype=torch.float32)
    engine = Engine(m, ByteTokenizer(), EngineConfig(num_blocks=256, max_running=16, cuda_graphs=True))
    engine.graphs.capture()
    replays = 0
    run = engine.graphs.run

    def counted(*args, **kwargs):
        nonlocal replays
        replays += 1
        return run(*args, **kwargs)

    engine.graphs.run = counted
    for i, (options, _) in enumerate(checks):
        engine.add(f"r{i}", [TextSegment(f"Item {i}: "), GenSegment("a", SamplingParams(max_tokens=64, **options))])
    results = {}
    while engine.has_work():
        for event in engine.step():
            assert not hasattr(event, "error"), event.error
            if hasattr(event, "result"):
                results[event.request_id] = event.result.outputs["a"]
    for i, (_, check) in enumerate(checks):
        assert check(results[f"r{i}"]), results[f"r{i}"]
    assert replays > 5
