"""Read a GGUF file's metadata and tensor table without torch.

GGUF (llama.cpp's single-file model format) is a header, key/value metadata
and a table of tensors, followed by the tensor data. The ``gguf`` package's
reader builds a numpy view for every element of every metadata array (100,000
of them for a 49k-token vocabulary: 5 s on these machines), so the metadata is
read here directly; the package still supplies the tensor type tables and the
dequantization. Importing this module costs nothing heavy: the server process
reads a model's chat template through it.
"""

from __future__ import annotations

import mmap
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

MAGIC = b"GGUF"
DEFAULT_ALIGNMENT = 32

# Metadata value types (gguf spec): id -> struct format, for the fixed-size ones.
_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
_STRING, _ARRAY = 8, 9


class GGUFError(ValueError):
    """A file that is not a readable GGUF; the message names the file and what is wrong."""


@dataclass(frozen=True)
class TensorInfo:
    """One tensor of the file: its shape in PyTorch order (outermost first), type and bytes."""

    name: str
    shape: tuple[int, ...]
    ggml_type: int
    offset: int  # from the start of the file
    nbytes: int


class GGUFFile:
    """A GGUF file, memory-mapped: ``metadata`` (key -> value) and ``tensors`` (name -> TensorInfo).

    String arrays (the vocabulary, the merges) come back as lists of str; numeric
    arrays as lists of numbers. Raises GGUFError for anything that is not a GGUF
    file of version 2 or 3, or is cut short.
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        try:
            with open(self.path, "rb") as f:
                self._map = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        except (OSError, ValueError) as exc:  # ValueError: an empty file cannot be mapped
            raise GGUFError(f"{self.path} could not be read: {exc}") from exc
        self._pos = 0
        try:
            self._read()
        except (struct.error, UnicodeDecodeError, IndexError, OverflowError, MemoryError) as exc:
            raise GGUFError(f"{self.path} is truncated or corrupt (at byte {self._pos}: {exc})") from exc

    def _read(self) -> None:
        if self._map[:4] != MAGIC:
            raise GGUFError(f"{self.path} is not a GGUF file (it does not start with b'GGUF')")
        self._pos = 4
        version = self._scalar("<I")
        if version not in (2, 3):
            raise GGUFError(f"{self.path}: GGUF version {version} is not supported (2 and 3 are)")
        n_tensors, n_kv = self._scalar("<Q"), self._scalar("<Q")
        self.metadata: dict[str, Any] = {}
        for _ in range(n_kv):
            key = self._string()
            self.metadata[key] = self._value(self._scalar("<I"))
        infos = []
        for _ in range(n_tensors):
            name = self._string()
            dims = [self._scalar("<Q") for _ in range(self._scalar("<I"))]
            infos.append((name, tuple(reversed(dims)), self._scalar("<I"), self._scalar("<Q")))
        alignment = int(self.metadata.get("general.alignment", DEFAULT_ALIGNMENT))
        data_start = -(-self._pos // alignment) * alignment
        self.tensors: dict[str, TensorInfo] = {}
        for name, shape, ggml_type, offset in infos:
            nbytes = _tensor_nbytes(shape, ggml_type, name, self.path)
            start = data_start + offset
            if start + nbytes > len(self._map):
                raise GGUFError(
                    f"{self.path} is truncated: tensor {name!r} needs bytes {start}..{start + nbytes} "
                    f"but the file has {len(self._map)}; download it again"
                )
            self.tensors[name] = TensorInfo(name, shape, ggml_type, start, nbytes)

    def data(self, name: str) -> memoryview:
        """The raw bytes of tensor ``name`` (no copy)."""
        info = self.tensors[name]
        return memoryview(self._map)[info.offset : info.offset + info.nbytes]

    def close(self) -> None:
        """Unmap the file (left to the garbage collector while views from ``data`` are alive)."""
        try:
            self._map.close()
        except BufferError:
            pass

    # ---------------------------------------------------------------- decoding

    def _scalar(self, fmt: str) -> Any:
        (value,) = struct.unpack_from(fmt, self._map, self._pos)
        self._pos += struct.calcsize(fmt)
        return value

    def _string(self) -> str:
        n = self._scalar("<Q")
        if self._pos + n > len(self._map):
            raise struct.error(f"a string of {n} bytes runs past the end of the file")
        text = self._map[self._pos : self._pos + n].decode("utf-8")
        self._pos += n
        return text

    def _value(self, vtype: int) -> Any:
        if vtype in _SCALARS:
            return self._scalar(_SCALARS[vtype])
        if vtype == _STRING:
            return self._string()
        if vtype == _ARRAY:
            itype, n = self._scalar("<I"), self._scalar("<Q")
            if itype in _SCALARS:
                fmt = _SCALARS[itype]
                size = struct.calcsize(fmt)
                if self._pos + n * size > len(self._map):
                    raise struct.error(f"an array of {n} items runs past the end of the file")
                values = list(struct.unpack_from(f"<{n}{fmt[1]}", self._map, self._pos))
                self._pos += n * size
                return values
            return [self._value(itype) for _ in range(n)]
        raise GGUFError(f"{self.path}: unknown metadata value type {vtype} at byte {self._pos}")


def _tensor_nbytes(shape: tuple[int, ...], ggml_type: int, name: str, path: Path) -> int:
    from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType

    try:
        block, type_size = GGML_QUANT_SIZES[GGMLQuantizationType(ggml_type)]
    except (ValueError, KeyError):
        raise GGUFError(f"{path}: tensor {name!r} has unknown tensor type {ggml_type}") from None
    n = 1
    for d in shape:
        n *= d
    if shape and shape[-1] % block:
        raise GGUFError(f"{path}: tensor {name!r}: row length {shape[-1]} is not a multiple of its block {block}")
    return n // block * type_size
