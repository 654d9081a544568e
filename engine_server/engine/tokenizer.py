"""Byte-level tokenizer: every UTF-8 byte is a token, plus three special ids.

A byte vocabulary needs no vocab file, round-trips any text, and is what the
tiny random model is built for. A real checkpoint's tokenizer only has to offer
the same small interface: encode, decode, incremental_decoder and the ids.
"""

from __future__ import annotations

import codecs
from collections.abc import Iterable

NUM_BYTES = 256  # ids below this are bytes; the specials come after them


class IncrementalDecoder:
    """Turns a stream of token ids into text, one token at a time.

    A multi-byte UTF-8 character may be split across several byte tokens; the
    codec buffers partial bytes so `push` returns only complete characters,
    never a replacement char for a half-received one.
    """

    def __init__(self) -> None:
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def push(self, token_id: int) -> str:
        """Feed one token; return only the text it completes (possibly "")."""
        if token_id >= NUM_BYTES:  # special ids carry no text
            return ""
        return self._decoder.decode(bytes((token_id,)))

    def flush(self) -> str:
        """End of stream: return what is still buffered (a cut-off char becomes U+FFFD)."""
        return self._decoder.decode(b"", final=True)


class ByteTokenizer:
    """Ids 0..255 are raw bytes; BOS, EOS and PAD follow them."""

    def __init__(self) -> None:
        self.bos_id = NUM_BYTES
        self.eos_id = NUM_BYTES + 1
        self.pad_id = NUM_BYTES + 2
        self.vocab_size = NUM_BYTES + 3
        self.eos_ids = frozenset({self.eos_id})
        self.add_bos = True  # prompts start with BOS

    def encode(self, text: str, add_bos: bool = False) -> list[int]:
        """The UTF-8 bytes of `text` as ids, optionally preceded by BOS."""
        ids = list(text.encode("utf-8"))
        return [self.bos_id, *ids] if add_bos else ids

    def encode_continuation(self, text: str) -> list[int]:
        """Ids of text that continues a context; bytes need no boundary care."""
        return self.encode(text)

    def decode(self, ids: Iterable[int]) -> str:
        """The text of the byte ids, skipping special ids; invalid UTF-8 becomes U+FFFD."""
        return bytes(i for i in ids if i < NUM_BYTES).decode("utf-8", errors="replace")

    def incremental_decoder(self) -> IncrementalDecoder:
        """A fresh streaming decoder, one per output."""
        return IncrementalDecoder()
