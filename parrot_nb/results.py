"""The runner's results file: JSON lines, one per finished record, that a killed run never loses.

The first line is a header naming the pipeline and its fingerprint (its source and parameters);
every other line is ``{"record": i, "line": n, "output": ...}`` or ``{"record": i, "line": n,
"error": "..."}``. Each line is written with one ``write`` on a file opened for appending, then
flushed to the disk (``fsync``), before the record counts as done. A process killed mid-write can
leave only a last line without its newline: opening the file again cuts it off (that record runs
again), so a resumed run neither loses nor duplicates a record.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

FORMAT = "parrot-nb results"
VERSION = 1


class ResultsFileError(ValueError):
    """The output file cannot be resumed (another pipeline's, or damaged); the message says what to do."""


@dataclass
class ResultsFile:
    """An open results file: the records it holds, and appends that reach the disk."""

    path: Path
    done: set[int] = field(default_factory=set)
    failed: int = 0
    repaired_bytes: int = 0  # a half-written last line that opening cut off
    _fd: int = -1

    @classmethod
    def open(cls, path: str | os.PathLike[str], header: dict[str, Any]) -> ResultsFile:
        """Open ``path`` for a run whose header is ``header``: create it, or resume it if it is this pipeline's."""
        path = Path(path)
        results = cls(path)
        if path.exists():
            results._read(header)
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        results._fd = fd
        if os.fstat(fd).st_size == 0:
            results._append({"format": FORMAT, "version": VERSION, **header})
            _fsync_dir(path.parent)  # the new file's name must survive a crash too
        return results

    def write(self, record: int, line: int, *, output: Any = None, error: str | None = None) -> None:
        """Append one record's result; when this returns, it is on the disk."""
        entry: dict[str, Any] = {"record": record, "line": line}
        if error is None:
            entry["output"] = output
        else:
            entry["error"] = error
            self.failed += 1
        self._append(entry)
        self.done.add(record)

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def _append(self, entry: dict[str, Any]) -> None:
        data = (json.dumps(entry, ensure_ascii=False) + "\n").encode()
        view = memoryview(data)
        while view:  # one write almost always; a short write continues where it stopped
            view = view[os.write(self._fd, view) :]
        os.fsync(self._fd)

    def _read(self, header: dict[str, Any]) -> None:
        data = self.path.read_bytes()
        end = data.rfind(b"\n") + 1
        if end < len(data):  # killed in the middle of a line: that record was not done
            self.repaired_bytes = len(data) - end
            with open(self.path, "r+b") as f:
                f.truncate(end)
                f.flush()
                os.fsync(f.fileno())
            data = data[:end]
        lines = data.decode(errors="replace").splitlines()
        if not lines:
            return
        first = _json(lines[0])
        if not isinstance(first, dict) or first.get("format") != FORMAT:
            raise ResultsFileError(
                f"{self.path} is not a parrot-nb results file (its first line is not a results header); "
                "give --output a new file name"
            )
        if first.get("fingerprint") != header["fingerprint"]:
            raise ResultsFileError(
                f"{self.path} holds results of another pipeline or other parameters: it was written by "
                f"{first.get('pipeline')!r} with parameters {first.get('parameters')} (fingerprint "
                f"{first.get('fingerprint')}), and this run is {header['pipeline']!r} with parameters "
                f"{header['parameters']} (fingerprint {header['fingerprint']}); give --output a new file name, "
                "or delete the file to start over"
            )
        for number, text in enumerate(lines[1:], 2):
            entry = _json(text)
            if not isinstance(entry, dict) or not isinstance(entry.get("record"), int):
                raise ResultsFileError(
                    f"line {number} of {self.path} is not a result line ({text[:80]!r}): the file was edited or "
                    "damaged; fix or remove that line, or give --output a new file name"
                )
            if entry["record"] not in self.done and "error" in entry:
                self.failed += 1
            self.done.add(entry["record"])


def read_results(path: str | os.PathLike[str]) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """A results file's header and its result lines, in the order they were written."""
    lines = Path(path).read_text().splitlines()
    return json.loads(lines[0]), [json.loads(line) for line in lines[1:]]


def _json(text: str) -> Any:
    try:
        return json.loads(text)
    except ValueError:
        return None


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
