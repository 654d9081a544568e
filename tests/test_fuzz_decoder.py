"""The decoder under fuzzing: whatever arrives, ``decode`` returns a message or raises ``ProtocolError``.

Any other exception (KeyError, TypeError, RecursionError, MemoryError...) would escape
the server's and the client's handling of bad frames; a well-formed message always
comes back equal to what was sent.
"""

from __future__ import annotations

import msgpack
import pytest
from fuzz_strategies import (
    FUZZ,
    MESSAGE_TYPES,
    envelopes,
    messages,
    msgpack_values,
    raw_frames,
    signed,
    stamped,
    wrong_bodies,
)
from hypothesis import given, settings
from hypothesis import strategies as st

from engine_server.protocol import (
    MAX_ITEMS,
    MAX_MESSAGE_BYTES,
    PROTOCOL_VERSION,
    Envelope,
    Hello,
    Message,
    ProtocolError,
    decode,
    encode,
    peek_id,
    sign,
)

KEY = b"fuzz-key"


def decode_or_refuse(frames: list[bytes], key: bytes = KEY) -> Envelope | ProtocolError:
    """What ``decode`` made of the frames; any exception but ProtocolError fails the test."""
    try:
        return decode(frames, key)
    except ProtocolError as exc:
        assert str(exc), "a refusal must say what was wrong"
        return exc


# ---------------------------------------------------------------- well-formed messages


EACH_TYPE = pytest.mark.parametrize("cls", [cls for _, cls in MESSAGE_TYPES], ids=[name for name, _ in MESSAGE_TYPES])


@EACH_TYPE
@settings(FUZZ, max_examples=10)
@given(data=st.data())
def test_every_well_formed_message_round_trips(cls: type[Message], data: st.DataObject) -> None:
    msg = data.draw(messages([cls]))
    msg_id, ref = data.draw(st.text(max_size=12)) or "m", data.draw(st.none() | st.text(max_size=12))
    env = decode(encode(msg, KEY, msg_id=msg_id, ref=ref), KEY)
    assert (env.msg, env.id, env.ref) == (msg, msg_id, ref)


@FUZZ
@given(messages())
def test_an_unsigned_side_reads_well_formed_messages_too(msg: Message) -> None:
    assert decode(encode(msg, b""), b"").msg == msg


# ---------------------------------------------------------------- garbage


@FUZZ
@given(raw_frames)
def test_random_frames_are_refused(frames: list[bytes]) -> None:
    assert isinstance(decode_or_refuse(frames), ProtocolError)  # signed with KEY by chance: never
    decode_or_refuse(frames, b"")  # unsigned: the payload itself is parsed


@FUZZ
@given(msgpack_values)
def test_random_msgpack_payloads_are_refused(value: object) -> None:
    assert isinstance(decode_or_refuse(signed(value, KEY)), ProtocolError)


@FUZZ
@given(messages(), st.data())
def test_corrupted_payloads_are_refused_or_read(msg: Message, data: st.DataObject) -> None:
    # Unsigned, so corruption reaches the parser instead of failing the signature check.
    payload = bytearray(encode(msg, b"")[1])
    for _ in range(data.draw(st.integers(1, 4))):
        i = data.draw(st.integers(0, len(payload) - 1))
        payload[i] = data.draw(st.integers(0, 255))
    cut = data.draw(st.integers(0, len(payload)))
    decode_or_refuse([b"", bytes(payload[:cut])], b"")


@FUZZ
@given(envelopes())
def test_random_envelopes_are_refused_or_read(raw: dict) -> None:
    result = decode_or_refuse(signed(raw, KEY))
    v = raw.get("v")
    if not (type(v) is int and v == PROTOCOL_VERSION):
        assert isinstance(result, ProtocolError) and "protocol version" in str(result)


@EACH_TYPE
@settings(FUZZ, max_examples=15)
@given(data=st.data())
def test_wrong_bodies_of_each_message_type_are_refused_by_field(cls: type[Message], data: st.DataObject) -> None:
    body = data.draw(wrong_bodies(cls))
    result = decode_or_refuse(signed(stamped({"v": PROTOCOL_VERSION, "type": cls.TYPE, "id": "x", "body": body}), KEY))
    if isinstance(result, ProtocolError):
        assert str(result).startswith(cls.TYPE), "the refusal names the message (and the field) that was wrong"
    else:
        assert type(result.msg) is cls


# ---------------------------------------------------------------- versions and signatures


@FUZZ
@given(msgpack_values | st.sampled_from([0, 2, -1, True, 1.0, "1", 2**64 - 1]))
def test_any_version_but_this_one_is_refused(v: object) -> None:
    if type(v) is int and v == PROTOCOL_VERSION:
        return
    result = decode_or_refuse(signed({"v": v, "type": "Status", "id": "x", "body": {}}, KEY))
    assert isinstance(result, ProtocolError) and "protocol version" in str(result)


@FUZZ
@given(messages(), st.binary(max_size=80))
def test_a_wrong_signature_is_refused(msg: Message, signature: bytes) -> None:
    sig, payload = encode(msg, KEY)
    if signature == sig:
        return
    with pytest.raises(ProtocolError, match="bad signature"):
        decode([signature, payload], KEY)


def test_a_missing_signature_is_refused() -> None:
    _, payload = encode(Hello("x"), KEY)
    with pytest.raises(ProtocolError, match="bad signature"):
        decode([b"", payload], KEY)
    with pytest.raises(ProtocolError, match="expected 2 frames"):
        decode([payload], KEY)


# ---------------------------------------------------------------- specific shapes the fuzzing found


def test_a_field_name_that_is_not_a_string_is_refused() -> None:
    body = {b"client_name": "x", "extra": "y"}  # msgpack allows bytes keys; a dataclass cannot have them
    with pytest.raises(ProtocolError, match="Hello: field names must be strings"):
        decode(signed(stamped({"v": PROTOCOL_VERSION, "type": "Hello", "id": "x", "body": body}), KEY), KEY)


@pytest.mark.parametrize("v", [float(PROTOCOL_VERSION), str(PROTOCOL_VERSION), True])
def test_a_version_that_is_not_exactly_this_integer_is_refused(v: object) -> None:
    with pytest.raises(ProtocolError, match="protocol version"):
        decode(signed({"v": v, "type": "Status", "id": "x", "body": {}}, KEY), KEY)


# ---------------------------------------------------------------- huge sizes


def test_a_long_string_within_the_limit_round_trips() -> None:
    msg = Hello("x" * (8 * 2**20))
    assert decode(encode(msg, KEY), KEY).msg == msg


def test_a_payload_over_the_size_limit_is_refused_before_parsing() -> None:
    payload = b"\xc0" * (MAX_MESSAGE_BYTES + 1)
    with pytest.raises(ProtocolError, match="over the limit"):
        decode([sign(KEY, payload), payload], KEY)
    assert peek_id([payload]) is None


def test_deep_nesting_is_refused_not_a_recursion_error() -> None:
    header = msgpack.packb({"v": PROTOCOL_VERSION, "type": "Hello", "id": "x", "ref": None})
    payload = bytes([header[0] + 1]) + header[1:] + msgpack.packb("body") + b"\x91" * 100_000 + b"\xc0"
    with pytest.raises(ProtocolError, match="nested too deeply"):
        decode([sign(KEY, payload), payload], KEY)


def test_an_array_longer_than_the_item_limit_is_refused() -> None:
    # Its header alone claims the elements: one byte each would still be MAX_ITEMS bytes.
    payload = b"\xdd" + (MAX_ITEMS + 1).to_bytes(4, "big") + b"\xc0" * (MAX_ITEMS + 1)
    with pytest.raises(ProtocolError, match="max_array_len"):
        decode([b"", payload], b"")


def test_an_array_header_claiming_billions_of_elements_is_refused() -> None:
    with pytest.raises(ProtocolError, match="not msgpack"):
        decode([b"", b"\xdd\xff\xff\xff\xff\xc0"], b"")


@pytest.mark.parametrize("field", ["type", "v"])
def test_a_refusal_quotes_a_huge_value_briefly(field: str) -> None:
    raw = {"v": PROTOCOL_VERSION, "type": "Status", "id": "x", "body": {}, field: "z" * 2**20}
    with pytest.raises(ProtocolError) as refused:
        decode(signed(raw, KEY), KEY)
    assert len(str(refused.value)) < 300


def test_a_refusal_lists_many_unknown_fields_briefly() -> None:
    body = {f"field{i}": i for i in range(10_000)}
    with pytest.raises(ProtocolError, match="unknown field") as refused:
        decode(signed(stamped({"v": PROTOCOL_VERSION, "type": "Status", "id": "x", "body": body}), KEY), KEY)
    assert len(str(refused.value)) < 300


# ---------------------------------------------------------------- peek_id


@FUZZ
@given(raw_frames | st.lists(msgpack_values.map(lambda v: msgpack.packb(v, use_bin_type=True)), max_size=3))
def test_peek_id_never_raises(frames: list[bytes]) -> None:
    assert peek_id(frames) is None or isinstance(peek_id(frames), str)


@FUZZ
@given(messages(), st.text(max_size=12))
def test_peek_id_reads_the_id_of_a_well_formed_message(msg: Message, msg_id: str) -> None:
    assert peek_id(encode(msg, KEY, msg_id=msg_id or "m")) == (msg_id or "m")

