"""An engine server for a benchmark: its own process, event log and log file, reached directly or
through a simulated network (``netdelay.py``); and the start and end every benchmark's JSON shares."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import parrot_nb

REPO = Path(__file__).resolve().parents[1]


class Server:
    def __init__(self, tmp: Path, name: str, model: str, device: str, *flags: str) -> None:
        self.connection_file = tmp / f"{name}.json"
        self.event_log = tmp / f"{name}.events.jsonl"
        self.log = open(tmp / f"{name}.log", "wb")
        cmd = [sys.executable, "-m", "engine_server", "--connection-file", str(self.connection_file),
               "--event-log", str(self.event_log), "--model", model, "--device", device, *flags]  # fmt: skip
        self.proc = subprocess.Popen(cmd, stdout=self.log, stderr=subprocess.STDOUT, cwd=REPO)
        deadline = time.monotonic() + 600
        while not self.connection_file.exists():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"server {name} did not start; see {self.log.name}")
            time.sleep(0.1)
        self.delayed: dict[float, tuple[subprocess.Popen, Path]] = {}

    def use(self, rtt_ms: float = 0.0) -> None:
        """Connect this process's session, directly or through a simulated network of ``rtt_ms``."""
        path = self.connection_file
        if rtt_ms:
            if rtt_ms not in self.delayed:
                out = self.connection_file.with_name(f"{self.connection_file.stem}.rtt{rtt_ms:g}.json")
                proc = subprocess.Popen([sys.executable, str(REPO / "benchmarks" / "netdelay.py"), "--server",
                                         str(self.connection_file), "--out", str(out), "--one-way-ms", str(rtt_ms / 2)])  # fmt: skip
                while not out.exists():
                    if proc.poll() is not None:
                        raise RuntimeError("the network delay proxy did not start")
                    time.sleep(0.05)
                self.delayed[rtt_ms] = proc, out
            path = self.delayed[rtt_ms][1]
        parrot_nb.disconnect()
        parrot_nb.connect(path)
        deadline = time.monotonic() + 600
        while (states := {e.state for e in parrot_nb.status().engines}) != {"ready"}:  # every engine loaded
            if "dead" in states or time.monotonic() > deadline:
                raise RuntimeError(f"an engine of {self.connection_file.name} did not start ({states}); see {self.log.name}")
            time.sleep(0.1)

    def events(self) -> list[dict]:
        text = self.event_log.read_text()
        return [json.loads(line) for line in text[: text.rfind("\n") + 1].splitlines()]

    def stop(self) -> None:
        for proc, _ in self.delayed.values():
            proc.terminate()
            proc.wait()
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()


def new_result(script: str) -> dict:
    """A benchmark's result, started with the command that made it and the commit it ran."""
    commit = os.environ.get("BENCH_COMMIT") or subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=REPO
    ).stdout.strip()
    return {"command": " ".join(["python", f"benchmarks/{script}", *sys.argv[1:]]), "commit": commit}


def emit(result: dict, out: Path | None) -> None:
    """Print the result as JSON, and write it to ``out`` when given."""
    text = json.dumps(result, indent=2)
    print(text)
    if out:
        out.write_text(text + "\n")
