"""ByteTokenizer: ids, round trips, and streaming decode of split UTF-8 characters."""

from engine_server.engine.tokenizer import ByteTokenizer

TEXT = "héllo, wörld — 你好 🦜"


def test_special_ids_follow_the_256_bytes():
    tok = ByteTokenizer()
    assert tok.vocab_size == 259
    assert sorted((tok.bos_id, tok.eos_id, tok.pad_id)) == [256, 257, 258]


def test_encode_is_utf8_bytes():
    tok = ByteTokenizer()
    assert tok.encode("aé") == [0x61, 0xC3, 0xA9]
    assert tok.encode("aé", add_bos=True) == [tok.bos_id, 0x61, 0xC3, 0xA9]


def test_roundtrip_non_ascii():
    tok = ByteTokenizer()
    ids = tok.encode(TEXT)
    assert len(ids) == len(TEXT.encode("utf-8")) > len(TEXT)
    assert tok.decode(ids) == TEXT


def test_decode_skips_special_ids():
    tok = ByteTokenizer()
    ids = [tok.bos_id, *tok.encode("hi"), tok.pad_id, *tok.encode("!"), tok.eos_id]
    assert tok.decode(ids) == "hi!"


def test_decode_replaces_invalid_utf8():
    tok = ByteTokenizer()
    assert tok.decode([0x61, 0xFF, 0x62]) == "a\ufffdb"


def test_incremental_decoder_holds_a_split_multibyte_char_until_complete():
    tok = ByteTokenizer()
    dec = tok.incremental_decoder()
    parrot = "🦜".encode("utf-8")  # four bytes, so three pushes complete nothing
    assert dec.push(ord("a")) == "a"
    assert [dec.push(b) for b in parrot] == ["", "", "", "🦜"]
    assert dec.flush() == ""


def test_incremental_decoder_stream_concatenates_to_decode():
    tok = ByteTokenizer()
    ids = [tok.bos_id, *tok.encode(TEXT), tok.eos_id]
    dec = tok.incremental_decoder()
    pieces = [dec.push(i) for i in ids] + [dec.flush()]
    assert "".join(pieces) == TEXT
    assert "\ufffd" not in "".join(pieces)


def test_incremental_decoder_flush_replaces_a_cut_off_char():
    tok = ByteTokenizer()
    dec = tok.incremental_decoder()
    assert dec.push("é".encode("utf-8")[0]) == ""
    assert dec.flush() == "\ufffd"
