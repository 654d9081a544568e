"""A Hugging Face checkpoint's tokenizer, behind the engine's small tokenizer interface.

Reads ``tokenizer.json`` with the ``tokenizers`` library (no ``transformers``),
``tokenizer_config.json`` for the BOS/EOS tokens and whether prompts start with
BOS, and ``generation_config.json`` / ``config.json`` for every id that ends a
generation (Llama 3 instruct models stop on several).

Two things differ from encoding a whole prompt at once, because the engine
tokenizes each prompt segment separately and concatenates the ids:

- a segment that continues a context must not gain the leading "▁" that
  sentencepiece-style tokenizers put in front of a text (``encode_continuation``);
- streamed output is decoded from the growing id list, not token by token, so
  byte-fallback tokens, multi-token characters and leading-space rules come out
  exactly as ``decode`` of the whole list would give them (``IncrementalDecoder``).
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from tokenizers import Tokenizer

REPLACEMENT_CHAR = "\ufffd"

# Texts put in front of a continuation so the tokenizer sees it mid-sentence; their own
# ids are dropped afterwards. Several, in case one merges with the text that follows.
_CONTEXT_SENTINELS = ("\n", "a", ".", "\u00b6")


class IncrementalDecoder:
    """Turns a stream of token ids into text, one token at a time.

    Each push decodes a window, from the start of the last emitted chunk, twice:
    without and with the tokens not yet emitted, and emits the difference.
    Decoders that strip a leading space or fuse byte tokens treat both the same,
    so the pieces concatenate to ``decode`` of all ids. Text ending in U+FFFD is held back until
    the rest of its character arrives (or ``flush``).

    Byte-fallback tokens (``<0xE2>``) are held back while a run of them is open
    (special tokens, which decode to nothing, do not end a run): the decoder turns
    a whole run into U+FFFDs when any of it is invalid UTF-8, so text decoded
    from part of a run could later change.
    """

    def __init__(self, tokenizer: HFTokenizer) -> None:
        self._tokenizer = tokenizer
        self._ids: list[int] = []
        self._prefix_offset = 0  # window start: ids before it are settled
        self._read_offset = 0  # ids before it have had their text emitted

    def push(self, token_id: int) -> str:
        """Feed one token; return only the text it completes (possibly "")."""
        self._ids.append(token_id)
        return self._emit(final=False)

    def flush(self) -> str:
        """End of stream: return what is still held back (a cut-off char stays U+FFFD)."""
        return self._emit(final=True)

    def _emit(self, final: bool) -> str:
        if not final and self._tokenizer.ends_in_byte_run(self._ids):
            return ""
        decode = self._tokenizer.decode
        prefix = decode(self._ids[self._prefix_offset : self._read_offset])
        text = decode(self._ids[self._prefix_offset :])
        if len(text) <= len(prefix) or (text.endswith(REPLACEMENT_CHAR) and not final):
            return ""
        self._prefix_offset = self._read_offset
        self._read_offset = len(self._ids)
        return text[len(prefix) :]


class HFTokenizer:
    """A ``tokenizer.json`` tokenizer with the engine's interface (see tokenizer.ByteTokenizer)."""

    def __init__(
        self,
        tokenizer: Tokenizer,
        bos_token: str | None = None,
        eos_token: str | None = None,
        add_bos: bool | None = None,
        extra_eos_ids: Iterable[int] = (),
    ) -> None:
        """Wrap `tokenizer`; `add_bos` None means: whatever its post-processor does."""
        self._tok = tokenizer
        self.vocab_size: int = tokenizer.get_vocab_size(with_added_tokens=True)
        self.bos_id: int | None = self._token_id(bos_token, "bos_token")
        eos_id = self._token_id(eos_token, "eos_token")
        eos_ids = [i for i in (eos_id, *extra_eos_ids) if i is not None]
        self.eos_id: int | None = eos_ids[0] if eos_ids else None
        self.eos_ids: frozenset[int] = frozenset(eos_ids)
        if add_bos is None:
            add_bos = self._post_processor_adds(self.bos_id)
        self.add_bos: bool = bool(add_bos) and self.bos_id is not None
        self._continuation_prefix = self._find_continuation_prefix()
        self._byte_tokens: frozenset[int] = frozenset()
        if getattr(tokenizer.model, "byte_fallback", False):
            byte_ids = (tokenizer.token_to_id(f"<0x{b:02X}>") for b in range(256))
            self._byte_tokens = frozenset(i for i in byte_ids if i is not None)
        self._special_ids = frozenset(
            i for i, token in tokenizer.get_added_tokens_decoder().items() if token.special
        )

    @classmethod
    def from_dir(cls, path: str | Path) -> HFTokenizer:
        """Load from a Hugging Face model directory.

        Raises FileNotFoundError when ``tokenizer.json`` is missing and ValueError
        when a file is malformed or names a token the vocabulary lacks.
        """
        path = Path(path)
        tokenizer_file = path / "tokenizer.json"
        if not tokenizer_file.is_file():
            hint = ""
            if (path / "tokenizer.model").is_file():
                hint = (
                    " The directory has only a sentencepiece tokenizer.model; convert it once with"
                    " transformers: AutoTokenizer.from_pretrained(path).save_pretrained(path)."
                )
            raise FileNotFoundError(f"{tokenizer_file} is missing: a tokenizer.json is required.{hint}")
        try:
            tokenizer = Tokenizer.from_file(str(tokenizer_file))
        except Exception as exc:  # the Rust side raises plain Exception
            raise ValueError(f"{tokenizer_file} could not be read: {exc}") from exc

        config = _read_json(path / "tokenizer_config.json")
        generation = _read_json(path / "generation_config.json")
        model_config = _read_json(path / "config.json")
        extra_eos = [*_as_ids(generation.get("eos_token_id")), *_as_ids(model_config.get("eos_token_id"))]
        eos_token = _token_content(config.get("eos_token"))
        if eos_token is None and not extra_eos:
            raise ValueError(
                f"{path}: no end-of-sequence token: set eos_token in tokenizer_config.json"
                " or eos_token_id in generation_config.json"
            )
        add_bos = config.get("add_bos_token")
        return cls(
            tokenizer,
            bos_token=_token_content(config.get("bos_token")),
            eos_token=eos_token,
            add_bos=None if add_bos is None else bool(add_bos),
            extra_eos_ids=extra_eos,
        )

    def tokenizer_json(self) -> str:
        """The tokenizer as ``tokenizer.json`` text (what the grammar engine builds its vocabulary from)."""
        return self._tok.to_str()

    def add_eos_token(self, token: str) -> None:
        """Also end generation at special token `token` (a chat template's end-of-turn), if it is one."""
        token_id = self._tok.token_to_id(token) if token else None
        if token_id is not None and token_id in self._special_ids:
            self.eos_ids = self.eos_ids | {token_id}
            if self.eos_id is None:
                self.eos_id = token_id

    def encode(self, text: str, add_bos: bool = False) -> list[int]:
        """Ids of `text` as the start of a prompt; BOS first when asked and the model uses one."""
        ids = self._tok.encode(text, add_special_tokens=False).ids
        if add_bos and self.add_bos:
            return [self.bos_id, *ids]  # type: ignore[list-item]
        return ids

    def encode_continuation(self, text: str) -> list[int]:
        """Ids of `text` as it continues earlier text: no sentencepiece word-start "▁" is added."""
        if not self._continuation_prefix or not text:
            return self.encode(text)
        for sentinel in _CONTEXT_SENTINELS:
            head = self._tok.encode(sentinel, add_special_tokens=False).ids
            ids = self._tok.encode(sentinel + text, add_special_tokens=False).ids
            if ids[: len(head)] == head:
                return ids[len(head) :]
        # Every sentinel merged with the text: drop a lone prefix token if there is one.
        ids = self.encode(text)
        if ids and self._tok.id_to_token(ids[0]) == self._continuation_prefix:
            return ids[1:]
        return ids

    def decode(self, ids: Sequence[int]) -> str:
        """Text of `ids`, special tokens skipped."""
        return self._tok.decode(list(ids), skip_special_tokens=True)

    def incremental_decoder(self) -> IncrementalDecoder:
        """A fresh streaming decoder, one per output."""
        return IncrementalDecoder(self)

    def is_byte_fallback_token(self, token_id: int) -> bool:
        """Whether `token_id` is one raw byte (``<0xNN>``) of a byte-fallback vocabulary."""
        return token_id in self._byte_tokens

    def ends_in_byte_run(self, ids: Sequence[int]) -> bool:
        """Whether the last token of `ids` that decodes to anything is a byte-fallback token."""
        if not self._byte_tokens:
            return False
        for token_id in reversed(ids):
            if token_id not in self._special_ids:
                return token_id in self._byte_tokens
        return False

    def _token_id(self, token: str | None, field: str) -> int | None:
        if token is None:
            return None
        token_id = self._tok.token_to_id(token)
        if token_id is None:
            raise ValueError(f"tokenizer_config.json: {field} {token!r} is not in the vocabulary")
        return token_id

    def _post_processor_adds(self, bos_id: int | None) -> bool:
        """Whether the tokenizer's own post-processor starts a text with BOS (Llama 3 does)."""
        if bos_id is None:
            return False
        ids = self._tok.encode("a", add_special_tokens=True).ids
        return bool(ids) and ids[0] == bos_id

    def _find_continuation_prefix(self) -> str:
        """What the normalizer and pre-tokenizer put before a text ("▁" for sentencepiece), or ""."""
        probe = "a"
        text = probe
        if self._tok.normalizer is not None:
            text = self._tok.normalizer.normalize_str(text)
        if self._tok.pre_tokenizer is not None:
            text = "".join(piece for piece, _ in self._tok.pre_tokenizer.pre_tokenize_str(text))
        if text != probe and text.endswith(probe):
            return text[: -len(probe)]
        return ""


def _read_json(path: Path) -> dict[str, Any]:
    """The JSON object in `path`, or {} when the (optional) file is absent."""
    return read_json_object(path) if path.is_file() else {}


def read_json_object(path: Path) -> dict[str, Any]:
    """The JSON object in `path`; ValueError naming the file if it is not one."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"{path} is not valid JSON: {exc}") from exc
    if not isinstance(data, dict):
        raise ValueError(f"{path} must hold a JSON object")
    return data


def _token_content(token: Any) -> str | None:
    """A special token given as a string or as an AddedToken dict ({"content": ...})."""
    if isinstance(token, dict):
        token = token.get("content")
    return token if isinstance(token, str) else None


def _as_ids(value: Any) -> list[int]:
    """An eos_token_id field: an int, a list of ints, or absent."""
    if isinstance(value, bool):
        return []
    if isinstance(value, int):
        return [value]
    if isinstance(value, list):
        return [v for v in value if isinstance(v, int) and not isinstance(v, bool)]
    return []
