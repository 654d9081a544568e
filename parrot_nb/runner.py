"""Run a pipeline over a JSONL file of records: one application per record, N in flight, nothing lost.

Each record is a JSON object; its fields are the keyword arguments of the pipeline's ``run()``,
which returns semantic variables (or dicts and lists of them). The runner requests them as
throughput work, under an application of the record's own, and appends the values to the results
file (``parrot_nb.results``) as each record finishes. A rerun skips the records the file holds;
a record that fails is written with its error and the run goes on; Ctrl-C cancels the records in
flight and keeps what was written.
"""

from __future__ import annotations

import inspect
import json
import os
import signal
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from engine_server.protocol import Message, RequestFinished
from parrot_nb import session
from parrot_nb.app import app
from parrot_nb.pipeline import ENTRY_POINT, Pipeline, load, release
from parrot_nb.results import ResultsFile
from parrot_nb.variable import SemanticVariable


@dataclass(frozen=True)
class Record:
    """One input record: its index among the records, its line in the inputs file, its fields or why it has none."""

    index: int
    line: int
    fields: dict[str, Any] | None = None
    error: str | None = None


@dataclass
class RunSummary:
    """What a run did."""

    total: int  # records in the inputs file
    skipped: int  # already in the results file when the run started
    written: int  # written by this run
    failed: int  # of those, written with an error
    interrupted: bool
    elapsed_s: float
    output_tokens: int
    prompt_tokens: int
    cached_tokens: int

    @property
    def records_per_s(self) -> float:
        return self.written / self.elapsed_s if self.elapsed_s > 0 else 0.0

    @property
    def cache_hit_rate(self) -> float:
        return self.cached_tokens / self.prompt_tokens if self.prompt_tokens else 0.0


def read_records(path: str | os.PathLike[str]) -> Iterator[Record]:
    """The records of a JSONL file, blank lines skipped; a line that is not a JSON object is a record with an error."""
    index = 0
    with open(path, encoding="utf-8", errors="replace") as f:
        for number, text in enumerate(f, 1):
            if not text.strip():
                continue
            try:
                fields = json.loads(text)
            except ValueError as exc:
                yield Record(index, number, error=f"line {number} of {Path(path).name} is not valid JSON: {exc}")
            else:
                if isinstance(fields, dict):
                    yield Record(index, number, fields)
                else:
                    yield Record(
                        index, number,
                        error=f"line {number} of {Path(path).name} is a JSON {type(fields).__name__}, not an object "
                        f"of {ENTRY_POINT}()'s arguments",
                    )  # fmt: skip
            index += 1


def count_records(path: str | os.PathLike[str]) -> int:
    """How many records ``read_records`` yields (it counts the same non-blank lines)."""
    with open(path, encoding="utf-8", errors="replace") as f:
        return sum(1 for text in f if text.strip())


class _Stats:
    """Tokens of this run's applications, from the server's ``RequestFinished`` events (client I/O thread)."""

    def __init__(self) -> None:
        self.apps: set[str] = set()
        self.output_tokens = self.prompt_tokens = self.cached_tokens = 0
        self._lock = threading.Lock()

    def on_event(self, event: Message) -> None:
        if isinstance(event, RequestFinished) and event.app_id in self.apps:
            with self._lock:
                self.output_tokens += event.output_tokens
                self.prompt_tokens += event.prompt_tokens
                self.cached_tokens += event.cached_tokens


def run_pipeline(
    pipeline: Pipeline | str | os.PathLike[str],
    inputs: str | os.PathLike[str],
    output: str | os.PathLike[str],
    *,
    concurrency: int = 16,
    params: dict[str, str] | None = None,
    progress: bool = True,
    resume_hint: str = "run the same command again",
) -> RunSummary:
    """Run ``pipeline`` over the records of ``inputs``, appending results to ``output``; resumable.

    Needs a connected engine server (``parrot_nb.start`` or ``parrot_nb.connect``). In a notebook
    the progress bar is a widget (tqdm.auto); interrupting the cell stops the run as Ctrl-C does.
    """
    if concurrency < 1:
        raise ValueError(f"concurrency must be at least 1, not {concurrency}")
    if not Path(inputs).is_file():
        raise FileNotFoundError(f"--inputs {inputs}: no such file")
    client = session.require_client()
    if not isinstance(pipeline, Pipeline):
        pipeline = load(pipeline, params)
        release()  # the server is the caller's: afterwards the module behaves as a plain import
    header = {
        "pipeline": pipeline.path.name,
        "fingerprint": pipeline.fingerprint,
        "parameters": pipeline.parameters,
        "inputs": Path(inputs).name,
    }
    results = ResultsFile.open(output, header)
    if results.repaired_bytes:
        print(f"{output}: cut off a half-written last line ({results.repaired_bytes} bytes); its record runs again", file=sys.stderr)
    total = count_records(inputs)
    skipped = len(results.done)
    stats = _Stats()
    remove_listener = client.add_listener(stats.on_event)
    stopping = threading.Event()
    in_flight: dict[int, list[SemanticVariable]] = {}
    prefix = f"{pipeline.name}-{uuid.uuid4().hex[:6]}"
    bar = _progress_bar(pipeline.name, total, skipped, enabled=progress)
    written = failed = 0
    interrupted = False
    t0 = time.monotonic()

    def one(record: Record) -> tuple[Any, str | None] | None:
        if stopping.is_set():
            return None
        try:
            return _run_record(pipeline.run, record, f"{prefix}#{record.index}", stats, in_flight), None
        except Exception as exc:
            if stopping.is_set():
                return None  # cancelled by the interruption: the record runs again on resume
            return None, _describe(exc, record)
        finally:
            in_flight.pop(record.index, None)

    def record_done(record: Record, result: tuple[Any, str | None] | None) -> None:
        nonlocal written, failed
        if result is None:
            return
        value, error = result
        with interrupts.held():  # the line on the disk and its count are one step
            results.write(record.index, record.line, output=value, error=error)
            written += 1
            failed += error is not None
        bar.update(1)

    todo = (r for r in read_records(inputs) if r.index not in results.done)
    pool = ThreadPoolExecutor(max_workers=concurrency, thread_name_prefix="parrot-nb-record")
    running: dict[Future[Any], Record] = {}
    interrupts = _Interrupts()
    interrupts.install()
    try:
        while True:
            while len(running) < concurrency and (record := next(todo, None)) is not None:
                if record.error is not None:  # nothing to run: the error is its result
                    record_done(record, (None, record.error))
                    continue
                running[pool.submit(one, record)] = record
            if not running:
                break
            finished, _ = wait(running, timeout=0.5, return_when=FIRST_COMPLETED)
            for fut in finished:
                record_done(running.pop(fut), fut.result())
            _show_stats(bar, results.failed, stats, time.monotonic() - t0)
    except KeyboardInterrupt:
        interrupted = True
        stopping.set()
        for variables in list(in_flight.values()):
            for v in variables:
                v.cancel("the pipeline run was interrupted")
        wait(running, timeout=10)
        for fut, record in running.items():  # finished before the interruption reached them: keep them
            if fut.done() and fut.exception() is None:
                record_done(record, fut.result())
    finally:
        interrupts.uninstall()
        stopping.set()
        pool.shutdown(wait=not interrupted, cancel_futures=True)
        _show_stats(bar, results.failed, stats, time.monotonic() - t0)
        bar.close()
        remove_listener()
        results.close()
    summary = RunSummary(
        total, skipped, written, failed, interrupted, time.monotonic() - t0,
        stats.output_tokens, stats.prompt_tokens, stats.cached_tokens,
    )  # fmt: skip
    held = skipped + written
    if interrupted:
        print(
            f"interrupted: {output} holds {held} of {total} records; the records in flight were cancelled and "
            f"run again on resume. To resume, {resume_hint}",
            file=sys.stderr,
        )
    else:
        print(
            f"{output}: {held} of {total} records ({results.failed} failed); this run wrote {written} in "
            f"{summary.elapsed_s:.1f} s ({summary.records_per_s:.2f} records/s, "
            f"{summary.output_tokens / max(summary.elapsed_s, 1e-9):.0f} output tokens/s, "
            f"{summary.cache_hit_rate:.0%} of prompt tokens from cache)",
            file=sys.stderr,
        )
    return summary


class _Interrupts:
    """Ctrl-C (and SIGTERM where it means the same) raise ``KeyboardInterrupt`` as usual, except
    inside ``held()``, where it is raised when the block ends.

    Signal handlers run on the main thread only, so elsewhere (a worker thread) nothing changes.
    """

    def __init__(self) -> None:
        self._holding = self._pending = False
        self._previous: dict[int, Any] = {}

    def install(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return
        for sig in (signal.SIGINT, signal.SIGTERM):
            if sig == signal.SIGINT or signal.getsignal(sig) is signal.default_int_handler:
                self._previous[sig] = signal.signal(sig, self._handle)

    def uninstall(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def _handle(self, signum: int, frame: Any) -> None:
        if self._holding:
            self._pending = True
        else:
            raise KeyboardInterrupt

    @contextmanager
    def held(self) -> Iterator[None]:
        self._holding = True
        try:
            yield
        finally:
            self._holding = False
            if self._pending:
                self._pending = False
                raise KeyboardInterrupt


def _run_record(
    run: Callable[..., Any], record: Record, app_name: str, stats: _Stats, in_flight: dict[int, list[SemanticVariable]]
) -> Any:
    """Call ``run`` with the record's fields under an application of its own, and resolve what it returns."""
    kwargs = _arguments(run, record)
    client = session.require_client()
    with app(app_name):
        stats.apps.add(client.app_id(app_name))
        value = run(**kwargs)
        variables = list(_variables(value))
        in_flight[record.index] = variables
        for v in variables:  # all at once, so the record's requests are scheduled together
            v.activate("throughput")
        return _resolve(value)


def _arguments(run: Callable[..., Any], record: Record) -> dict[str, Any]:
    """The record's fields that ``run`` takes; a missing required one is the record's error."""
    assert record.fields is not None
    signature = inspect.signature(run)
    params = signature.parameters.values()
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params):
        return dict(record.fields)
    names = {p.name for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}
    missing = [p.name for p in params if p.name in names and p.default is p.empty and p.name not in record.fields]
    if missing:
        raise _RecordError(
            f"line {record.line}: the record has no field {', '.join(map(repr, missing))}, "
            f"which {ENTRY_POINT}{signature} needs"
        )
    return {k: v for k, v in record.fields.items() if k in names}


class _RecordError(ValueError):
    """A record that does not fit the pipeline; its message is the whole error."""


def _describe(exc: Exception, record: Record) -> str:
    if isinstance(exc, _RecordError):
        return str(exc)
    return f"line {record.line}: {type(exc).__name__}: {exc}"


def _variables(value: Any) -> Iterator[SemanticVariable]:
    if isinstance(value, SemanticVariable):
        yield value
    elif isinstance(value, dict):
        for v in value.values():
            yield from _variables(v)
    elif isinstance(value, (list, tuple)):
        for v in value:
            yield from _variables(v)


def _resolve(value: Any) -> Any:
    """What ``run`` returned, with each semantic variable's value in its place, as JSON can hold it."""
    if isinstance(value, SemanticVariable):
        return value.get(perf="throughput")
    if value is None or isinstance(value, (str, int, float, bool)):
        return value
    if isinstance(value, tuple) and hasattr(value, "_fields"):  # a call's named tuple of outputs
        return {k: _resolve(v) for k, v in zip(value._fields, value)}
    if isinstance(value, (list, tuple)):
        return [_resolve(v) for v in value]
    if isinstance(value, dict) and all(isinstance(k, str) for k in value):
        return {k: _resolve(v) for k, v in value.items()}
    raise TypeError(
        f"{ENTRY_POINT}() returned a {type(value).__name__}, which a JSON results file cannot hold; return "
        "semantic variables, strings, numbers, or dicts (with string keys) and lists of them"
    )


def _progress_bar(name: str, total: int, done: int, *, enabled: bool) -> Any:
    from tqdm.auto import tqdm

    return tqdm(
        total=total, initial=done, desc=name, unit="rec", disable=not enabled, dynamic_ncols=True,
        smoothing=0.1, file=sys.stderr,
    )  # fmt: skip


def _show_stats(bar: Any, failed: int, stats: _Stats, elapsed: float) -> None:
    rate = stats.output_tokens / elapsed if elapsed > 0 else 0.0
    hits = f"{stats.cached_tokens / stats.prompt_tokens:.0%}" if stats.prompt_tokens else "-"
    bar.set_postfix_str(f"failed={failed} tok/s={rate:.0f} cache={hits}")
