"""Run a demo notebook headless with the project's kernel, print its outputs, write HTML.

``python -m parrot_nb.demo demos/quickstart.ipynb --html demos/quickstart.html``
(what ``make demo`` runs).
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import tempfile
import time
from pathlib import Path

KERNEL_NAME = "parrot-nb"


def execute(path: Path, timeout: int = 600, kernel_name: str = KERNEL_NAME):
    """Execute the notebook at ``path`` in a fresh kernel; return the executed notebook.

    The kernel gets a runtime directory of its own, and any engine server the notebook
    started and left running (a cell failed or timed out before ``%parrot stop``) is
    stopped afterwards: a demo leaves no process behind.
    """
    import nbformat
    from nbclient import NotebookClient

    nb = nbformat.read(path, as_version=4)
    # No widget state in the executed notebook: its HTML copy then shows the widgets' static pictures
    # (the DAG's SVG, the stats table) rather than widget views that need a widget manager from a CDN.
    client = NotebookClient(
        nb, timeout=timeout, kernel_name=kernel_name, resources={"metadata": {"path": str(path.parent)}},
        store_widget_state=False,
    )  # fmt: skip
    with tempfile.TemporaryDirectory(prefix="parrot-nb-demo-") as run_dir:
        try:
            client.execute(env={**os.environ, "JUPYTER_RUNTIME_DIR": run_dir})
        finally:
            stop_servers_in(Path(run_dir))
    return nb


def stop_servers_in(run_dir: Path, timeout: float = 20.0) -> None:
    """Stop every engine server whose connection file is in `run_dir` (SIGTERM, then SIGKILL)."""
    from engine_server.protocol import ConnectionInfo, find_connection_files, pid_alive

    pids = []
    for file in find_connection_files(run_dir):
        try:
            pids.append(ConnectionInfo.read(file).pid)
        except (OSError, ValueError):
            continue
    for pid in pids:
        _signal(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while any(pid_alive(pid) for pid in pids) and time.monotonic() < deadline:
        time.sleep(0.1)
    for pid in pids:
        _signal(pid, signal.SIGKILL)


def _signal(pid: int, sig: int) -> None:
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        pass



def output_text(output: dict) -> str:
    if output.get("output_type") == "stream":
        return output.get("text", "")
    if output.get("output_type") == "error":
        return f"{output.get('ename')}: {output.get('evalue')}"
    data = output.get("data", {})
    return data.get("text/plain", "")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m parrot_nb.demo", description=__doc__.splitlines()[0])
    parser.add_argument("notebook", type=Path)
    parser.add_argument("--html", type=Path, default=None, help="also write an HTML copy of the executed notebook here")
    parser.add_argument("--timeout", type=int, default=600, help="seconds per cell")
    args = parser.parse_args(argv)

    from nbclient.exceptions import CellExecutionError

    t0 = time.monotonic()
    try:
        nb = execute(args.notebook, args.timeout)
    except CellExecutionError as exc:
        print(f"{args.notebook}: a cell failed:\n{exc}", file=sys.stderr)
        return 1
    for i, cell in enumerate(nb.cells, 1):
        if cell.cell_type != "code":
            continue
        print(f"── In [{i}] " + "─" * 60)
        print(cell.source)
        outs = [output_text(o).rstrip("\n") for o in cell.get("outputs", [])]
        outs = [o for o in outs if o]
        if outs:
            print(f"── Out [{i}]")
            print("\n".join(outs))
    print(f"\n{args.notebook} ran top to bottom in {time.monotonic() - t0:.1f} s")
    if args.html is not None:
        from nbconvert import HTMLExporter

        body, _ = HTMLExporter().from_notebook_node(nb)
        args.html.write_text(body)
        print(f"HTML copy: {args.html}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
