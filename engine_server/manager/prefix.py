"""Context keys: a hash chain over a prompt, cut at its variable boundaries.

A request's prompt is constant template text and filled-in input values, in
order. Each piece gets a key that names the whole prompt up to and including
it::

    key_0 = H(SALT, text_0)        key_i = H(key_{i-1}, text_i)

Template text and input values are both hashed by content, so the same
system prompt, or the same document passed to two functions, gives the same
key in every application; the salt is fixed (not per model or per server), so
keys are stable across restarts. An engine caches the context it built at a
keyed boundary and forks the longest one it holds for a later request; it
checks token equality itself, so a key is a name, never a promise.

``ContextRefs`` counts, per key, the queued and running requests that need
it; when the count drops to zero the engines holding that context are told
they may drop it first (``ReleaseContexts``).
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable

from engine_server.protocol import SegmentSpec

SALT = b"parrot-nb/context/v1"


def chain(previous: bytes, text: str) -> bytes:
    """The key of ``text`` following the prompt named by ``previous``."""
    data = text.encode()
    # The length keeps piece boundaries unambiguous ("ab" + "c" is not "a" + "bc").
    return hashlib.blake2b(previous + len(data).to_bytes(8, "little") + data, digest_size=16).digest()


def assign_keys(segments: list[SegmentSpec]) -> list[str]:
    """Set ``key`` on every text segment before the first generation; return those keys, in order.

    Text after a generated output depends on the output, which no other request
    shares, so it is not worth caching and gets no key.
    """
    keys: list[str] = []
    previous = SALT
    for seg in segments:
        if seg.kind != "text":
            break
        previous = chain(previous, seg.text)
        seg.key = previous.hex()
        keys.append(seg.key)
    return keys


def prefix_lengths(segments: list[SegmentSpec]) -> dict[str, int]:
    """Each keyed segment's key with the prompt bytes up to and including it."""
    out: dict[str, int] = {}
    total = 0
    for seg in segments:
        if seg.kind != "text" or not seg.key:
            break
        total += len(seg.text.encode())
        out[seg.key] = total
    return out


class ContextRefs:
    """How many queued or running requests need each context key."""

    def __init__(self) -> None:
        self.counts: dict[str, int] = {}

    def __len__(self) -> int:
        return len(self.counts)

    def acquire(self, keys: Iterable[str]) -> None:
        for key in keys:
            self.counts[key] = self.counts.get(key, 0) + 1

    def release(self, keys: Iterable[str]) -> list[str]:
        """Drop one reference to each key; return the keys no request needs any more."""
        unused = []
        for key in keys:
            n = self.counts[key] - 1
            if n:
                self.counts[key] = n
            else:
                del self.counts[key]
                unused.append(key)
        return unused
