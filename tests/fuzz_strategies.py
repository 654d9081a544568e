"""Hypothesis strategies for protocol frames: well-formed messages, garbage, and the space between.

Well-formed messages are derived from the dataclasses' type hints (the same hints
``decode`` checks against), so a field added to the protocol is fuzzed without
touching this file.
"""

from __future__ import annotations

import dataclasses
import time
import types
import typing
from typing import Any, Literal, Union

import msgpack
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st

from engine_server.protocol import PROTOCOL_VERSION, Message, _hints, message_types, new_id, sign

# Reproducible in CI: derandomize makes the examples a function of the test's source
# alone (no run-to-run exploration, so no flaky "new" failure on an unrelated change),
# and database=None keeps runs from depending on, or writing, a local .hypothesis dir.
# To explore further, raise max_examples and drop derandomize locally.
FUZZ = settings(
    max_examples=100,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)

MESSAGE_TYPES = sorted(message_types().items())

# msgpack integers are 64-bit: signed down to -2**63, unsigned up to 2**64 - 1.
ints = st.integers(min_value=-(2**63), max_value=2**64 - 1)


def value_of(tp: Any) -> st.SearchStrategy[Any]:
    """Values of the protocol field type ``tp``: what a correct peer may send."""
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        hints = _hints(tp)
        return st.builds(tp, **{f.name: value_of(hints[f.name]) for f in dataclasses.fields(tp)})
    if origin in (Union, types.UnionType):
        return st.one_of([value_of(arg) for arg in typing.get_args(tp)])
    if origin is Literal:
        return st.sampled_from(typing.get_args(tp))
    if origin is list:
        (item,) = typing.get_args(tp)
        return st.lists(value_of(item), max_size=3)
    if origin is dict:
        _, item = typing.get_args(tp)
        return st.dictionaries(st.text(max_size=6), value_of(item), max_size=3)
    simple = {
        type(None): st.none(),
        bool: st.booleans(),
        int: ints,
        float: st.floats(allow_nan=False),  # NaN round-trips, but never compares equal
        str: st.text(max_size=20),
        bytes: st.binary(max_size=20),
    }
    return simple[tp]


def messages(types: list[type[Message]] | None = None) -> st.SearchStrategy[Message]:
    """Well-formed messages of the given types (default: every registered one)."""
    chosen = types if types is not None else [cls for _, cls in MESSAGE_TYPES]
    return st.sampled_from(chosen).flatmap(value_of)


leaves = st.one_of(
    st.none(),
    st.booleans(),
    ints,
    st.floats(),
    st.text(max_size=20),
    st.binary(max_size=20),
    st.builds(msgpack.ExtType, st.integers(0, 127), st.binary(max_size=8)),
    st.builds(msgpack.Timestamp, st.integers(0, 2**34 - 1), st.integers(0, 999_999_999)),
)

# Anything msgpack can carry, nested; map keys are str or bytes, as msgpack allows by default.
msgpack_values = st.recursive(
    leaves,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8) | st.binary(max_size=8), inner, max_size=4),
    max_leaves=16,
)


@st.composite
def wrong_bodies(draw: st.DrawFn, cls: type[Message]) -> Any:
    """A body for ``cls`` that is mostly right: fields dropped, retyped, or added, under str or bytes names."""
    body = dataclasses.asdict(draw(value_of(cls)))
    for name in draw(st.lists(st.sampled_from(sorted(body)), max_size=3, unique=True)) if body else []:
        if draw(st.booleans()):
            del body[name]
        else:
            body[name] = draw(msgpack_values)
    extra = draw(st.dictionaries(st.text(max_size=8) | st.binary(max_size=8), msgpack_values, max_size=2))
    return {**body, **extra}


@st.composite
def envelopes(draw: st.DrawFn) -> dict[Any, Any]:
    """Payload maps with every envelope key present or not, right or of a random type."""
    name, cls = draw(st.sampled_from(MESSAGE_TYPES))
    candidates = {
        "v": st.sampled_from([PROTOCOL_VERSION, PROTOCOL_VERSION + 1, 0, -1, True, 1.0, "1"]) | msgpack_values,
        "type": st.just(name) | msgpack_values,
        "id": st.text(max_size=8) | msgpack_values,
        "ref": st.none() | st.text(max_size=8) | msgpack_values,
        "body": wrong_bodies(cls) | msgpack_values,
        "session": st.text(min_size=1, max_size=8) | msgpack_values,
        "seq": st.integers(1, 2**63 - 1) | msgpack_values,
        "t": st.floats(allow_nan=True, allow_infinity=True) | msgpack_values,
    }
    envelope = {}
    for key, values in candidates.items():
        if draw(st.integers(0, 4)):  # present four times out of five
            envelope[key] = draw(values)
    return envelope


def stamped(raw: dict[Any, Any]) -> dict[Any, Any]:
    """``raw`` with a valid sender stamp (a fresh session, its first number, now), so that only
    what a test varies is wrong and the message is never taken for a replay."""
    return {**raw, "session": new_id(), "seq": 1, "t": time.time()}


def signed(raw: Any, key: bytes) -> list[bytes]:
    """Frames carrying ``raw`` as payload, correctly signed: only the content is wrong."""
    payload = msgpack.packb(raw, use_bin_type=True)
    return [sign(key, payload), payload]


raw_frames = st.lists(st.binary(max_size=48), max_size=4)
