"""The widgets in a real browser: JupyterLab on loopback, Debian's chromium driven by Playwright.

The quickstart notebook runs with "Run All" on the tiny model; the test waits until the
DAG widget shows every request done, clicks a node and reads its output from the page,
and saves screenshots of the DAG and the dashboard under tests/artifacts/ (ignored by git).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from parrot_nb.demo import stop_servers_in

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parent.parent
ARTIFACTS = REPO / "tests" / "artifacts"
CHROMIUM = shutil.which("chromium")
TOKEN = "parrot-nb-browser-test"
# The quickstart's requests: the chain (2), the map-reduce (4), and those made after the DAG is
# displayed, which must appear in it live: the completion (1) and the structured outputs (3 + 1).
REQUESTS = 11


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _quickstart_on_tiny(dest: Path) -> Path:
    """The quickstart, served by the tiny model (seconds, not a minute), without its last cell.

    The last cell stops the server; the test clicks a node afterwards, which asks the server
    for the request's detail. Stopping JupyterLab ends the kernel, and the server it owns.
    """
    nb = json.loads((REPO / "demos" / "quickstart.ipynb").read_text())
    sources = ["".join(c["source"]) for c in nb["cells"]]
    start = sources.index("%parrot start")
    nb["cells"][start]["source"] = ["%parrot start --model tiny"]
    assert sources[-1] == "%parrot stop"
    del nb["cells"][-1]
    path = dest / "quickstart.ipynb"
    path.write_text(json.dumps(nb))
    return path


@pytest.fixture
def lab(tmp_path: Path) -> Iterator[tuple[str, Path]]:
    """JupyterLab on loopback with every Jupyter and IPython directory in ``tmp_path``; yields its URL."""
    notebooks = tmp_path / "notebooks"
    notebooks.mkdir()
    _quickstart_on_tiny(notebooks)
    settings = tmp_path / "lab-settings"
    (settings / "@jupyterlab" / "apputils-extension").mkdir(parents=True)
    # No "get Jupyter news?" pop-up over the page.
    (settings / "@jupyterlab" / "apputils-extension" / "notification.jupyterlab-settings").write_text('{"fetchNews": "false"}')
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
        "JUPYTER_CONFIG_DIR": str(tmp_path / "config"),
        "JUPYTER_DATA_DIR": str(tmp_path / "data"),
        "JUPYTER_RUNTIME_DIR": str(tmp_path / "runtime"),
        "IPYTHONDIR": str(tmp_path / "ipython"),
        "JUPYTERLAB_SETTINGS_DIR": str(settings),
        "JUPYTERLAB_WORKSPACES_DIR": str(tmp_path / "workspaces"),
    }
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    cmd = [
        sys.executable, "-m", "jupyter", "lab", "--no-browser", "--ServerApp.ip=127.0.0.1", f"--ServerApp.port={port}",
        f"--IdentityProvider.token={TOKEN}", f"--ServerApp.root_dir={notebooks}", "--allow-root",
        # Nothing may reach for the network: no extension catalogue, no update check.
        "--LabApp.extension_manager=readonly", "--LabApp.check_for_updates_class=jupyterlab.NeverCheckForUpdate",
    ]  # fmt: skip
    with open(tmp_path / "lab.log", "wb") as log:
        proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, cwd=notebooks)
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                urllib.request.urlopen(f"{url}/api/status?token={TOKEN}", timeout=2)
                break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError("JupyterLab did not start:\n" + (tmp_path / "lab.log").read_text()) from None
                time.sleep(0.2)
        yield url, tmp_path
    finally:
        proc.send_signal(signal.SIGTERM)  # one SIGTERM stops it and shuts its kernels down
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        stop_servers_in(tmp_path / "runtime")  # a server whose kernel died without stopping it


def _wait_for_idle_kernel(url: str, timeout: float = 60) -> None:
    """Until JupyterLab's session for the notebook has a started kernel that is idle."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with urllib.request.urlopen(f"{url}/api/sessions?token={TOKEN}", timeout=5) as reply:
            sessions = json.load(reply)
        if any((s.get("kernel") or {}).get("execution_state") == "idle" for s in sessions):
            return
        time.sleep(0.2)
    raise AssertionError(f"no idle kernel within {timeout} s")


@pytest.mark.skipif(CHROMIUM is None, reason="needs Debian's chromium: `make setup` installs it (apt-get install chromium)")
@pytest.mark.timeout(240)
def test_run_all_in_jupyterlab_draws_the_dag_done_and_a_click_shows_the_output(lab: tuple[str, Path]) -> None:
    from playwright.sync_api import expect, sync_playwright

    url, tmp = lab
    ARTIFACTS.mkdir(exist_ok=True)
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, env={**os.environ, "HOME": str(tmp / "home")})
        page = browser.new_page(viewport={"width": 1500, "height": 1000})
        try:
            page.goto(f"{url}/lab/tree/quickstart.ipynb?token={TOKEN}")
            page.locator(".jp-NotebookPanel .jp-Cell").first.wait_for(timeout=60_000)
            # The page says "idle" before its kernel exists; a "Run All" then asks which kernel to start.
            _wait_for_idle_kernel(url)
            page.locator(".jp-Notebook-ExecutionIndicator[data-status='idle']").wait_for(state="attached", timeout=60_000)
            page.locator("#jp-MainMenu .lm-MenuBar-itemLabel", has_text="Run").click()
            page.locator(".lm-Menu-item[data-command='runmenu:run-all']").click()

            dag = page.locator(".parrot-dag")
            dag.wait_for(timeout=60_000)
            done = dag.locator(".parrot-dag-node[data-kind='request'][data-state='done']")
            expect(done).to_have_count(REQUESTS, timeout=90_000)  # the completion too, drawn live
            # Nothing is drawn in any other state: every variable is done as well.
            expect(dag.locator(".parrot-dag-node:not([data-state='done'])")).to_have_count(0)
            expect(dag.locator(".parrot-dag-status")).to_contain_text(f"{REQUESTS} requests: {REQUESTS} done")

            # A click on the map-reduce's combine call shows its output: what the notebook printed.
            printed = page.locator(".jp-Cell", has_text="print(await final)").locator(".jp-OutputArea-output")
            expect(printed).not_to_be_empty()
            dag.locator(".parrot-dag-node[data-label='combine']").click()
            output = dag.locator(".parrot-dag-detail .parrot-dag-output[data-output='final']")
            expect(output).not_to_be_empty(timeout=15_000)
            assert output.inner_text().strip() == printed.inner_text().strip()
            expect(dag.locator(".parrot-dag-detail-title")).to_have_text("combine · done")
            expect(dag.locator(".parrot-dag-facts")).to_contain_text("prompt tokens cached")
            dag.screenshot(path=ARTIFACTS / "dag.png")

            stats = page.locator(".parrot-nb-dashboard")
            expect(stats.locator("td", has_text="map-reduce")).to_have_count(1)
            expect(stats.locator(".main-svg").first).to_be_visible(timeout=30_000)  # plotly drew its charts
            stats.scroll_into_view_if_needed()
            stats.screenshot(path=ARTIFACTS / "dashboard.png")
            page.screenshot(path=ARTIFACTS / "jupyterlab.png")
        except BaseException:
            page.screenshot(path=ARTIFACTS / "failure.png", full_page=True)  # what the page showed when it failed
            raise
        finally:
            browser.close()
