"""SamplingParams validation and the Sampler: greedy, seeded, top-k, top-p."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from engine_server.engine.sampler import Sampler, SamplingParams
from engine_server.protocol import SAMPLING_OPTIONS, SamplingSpec
from parrot_nb.template import validate_options


def random_logits(seed: int, n: int = 259) -> torch.Tensor:
    return torch.randn(n, generator=torch.Generator().manual_seed(seed)) * 3


def draws(params: SamplingParams, logits: torch.Tensor, n: int) -> list[int]:
    sampler = Sampler(params)
    return [sampler.sample(logits) for _ in range(n)]


def test_defaults_are_greedy_with_no_stop():
    p = SamplingParams()
    assert (p.max_tokens, p.temperature, p.top_p, p.top_k, p.stop, p.seed, p.ignore_eos) == (
        64, 0.0, 1.0, 0, (), None, False,
    )
    assert p.greedy


def test_stop_list_is_stored_as_tuple():
    assert SamplingParams(stop=["\n", "Q:"]).stop == ("\n", "Q:")


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("max_tokens", 0),
        ("max_tokens", 2.5),
        ("temperature", -0.1),
        ("temperature", math.inf),
        ("top_p", 0.0),
        ("top_p", 1.5),
        ("top_k", -1),
        ("stop", ("ok", "")),
        ("stop", "\n"),
        ("seed", -1),
        ("seed", 2**63),
        ("ignore_eos", 1),
    ],
)
def test_invalid_params_raise_value_error_naming_the_field(field, value):
    with pytest.raises(ValueError, match=field):
        SamplingParams(**{field: value})


def test_greedy_is_argmax():
    for seed in range(5):
        logits = random_logits(seed)
        assert Sampler(SamplingParams()).sample(logits) == int(torch.argmax(logits))


def test_seeded_sampling_is_deterministic():
    logits = random_logits(0) / 3  # flat enough that samples vary
    params = SamplingParams(temperature=1.0, seed=42)
    first = draws(params, logits, 30)
    assert first == draws(params, logits, 30)
    assert len(set(first)) > 5
    assert first != draws(SamplingParams(temperature=1.0, seed=43), logits, 30)


def test_top_k_1_equals_greedy():
    for seed in range(5):
        logits = random_logits(seed) / 3
        params = SamplingParams(temperature=2.0, top_k=1, seed=seed)
        assert set(draws(params, logits, 20)) == {int(torch.argmax(logits))}


def test_top_k_samples_only_the_k_most_likely():
    logits = random_logits(1) / 3
    top3 = set(torch.topk(logits, 3).indices.tolist())
    got = set(draws(SamplingParams(temperature=1.0, top_k=3, seed=0), logits, 200))
    assert got == top3


def test_top_p_keeps_the_smallest_set_reaching_p():
    logits = torch.log(torch.tensor([0.1, 0.5, 0.3, 0.1]))
    # 0.5 alone does not reach 0.7; 0.5 + 0.3 does, so only tokens 1 and 2 survive.
    got = draws(SamplingParams(temperature=1.0, top_p=0.7, seed=0), logits, 300)
    assert set(got) == {1, 2}
    assert set(draws(SamplingParams(temperature=1.0, top_p=0.5, seed=0), logits, 50)) == {1}


def test_sampling_follows_softmax_probabilities():
    probs = torch.tensor([0.6, 0.3, 0.1])
    got = draws(SamplingParams(temperature=1.0, seed=7), torch.log(probs), 4000)
    freq = torch.bincount(torch.tensor(got), minlength=3).float() / len(got)
    torch.testing.assert_close(freq, probs, atol=0.03, rtol=0)


def test_low_temperature_sharpens_towards_argmax():
    logits = torch.log(torch.tensor([0.6, 0.3, 0.1]))
    got = draws(SamplingParams(temperature=0.1, seed=0), logits, 200)
    assert got.count(0) > 190


def test_a_vanishing_temperature_samples_the_argmax_instead_of_failing():
    logits = torch.tensor([0.5, 3.0, -1.0, 2.9])
    sampler = Sampler(SamplingParams(temperature=1e-45, seed=0))
    assert [sampler.sample(logits) for _ in range(5)] == [1] * 5


_ANY_VALUE = st.one_of(
    st.integers(min_value=-(2**70), max_value=2**70),
    st.sampled_from([0, 1, -1, 2**63 - 1, 2**63, 2**64]),
    st.floats(allow_nan=True, allow_infinity=True),
    st.booleans(),
    st.text(max_size=3),
    st.lists(st.text(max_size=2), max_size=3),
)


@settings(max_examples=300, deadline=None, derandomize=True)
@given(key=st.sampled_from(sorted(SAMPLING_OPTIONS)), value=_ANY_VALUE)
def test_notebook_manager_and_sampler_accept_and_refuse_the_same_options(key, value):
    """One rulebook: a value the notebook accepts, the server and the engine accept too, and vice versa."""
    def accepted(check) -> bool:
        try:
            check()
        except (TypeError, ValueError):
            return False
        return True

    notebook = accepted(lambda: validate_options({key: value}, where="test"))
    manager = accepted(lambda: SamplingSpec(**{key: list(value) if key == "stop" and isinstance(value, list) else value}).check())
    engine = accepted(lambda: SamplingParams(**{key: tuple(value) if key == "stop" and isinstance(value, list) else value}))
    if key == "stop" and isinstance(value, str):
        engine = notebook  # the notebook turns one stop string into a list before it is sent
    assert notebook == manager == engine, (key, value, notebook, manager, engine)
