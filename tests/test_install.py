"""The data files of a fresh (non-editable) install: IPython startup file and kernelspec.

A wheel is built from the checkout (offline, no build isolation) and installed
with ``--no-deps --no-index`` into a fresh virtualenv under tmp.  The fresh venv
sees the project's third-party packages through a .pth file that *appends* the
development venv's site-packages after its own, so ``parrot_nb`` itself comes
from the wheel (a path listed in a .pth is not a site dir: the editable
install's own .pth there is not processed).  HOME, IPython's and Jupyter's
directories all point into tmp so the user's configuration cannot interfere.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import sysconfig
from dataclasses import dataclass
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parent.parent
@dataclass
class FreshVenv:
    root: Path
    python: Path
    site_packages: Path
    home: Path
    env: dict[str, str]

    def run(self, *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
        proc = subprocess.run(
            [str(self.python), *args],
            env=self.env,
            cwd=self.home,  # not the checkout: '' on sys.path must not find ./parrot_nb
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=timeout,
        )
        assert proc.returncode == 0, f"{args} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}"
        return proc

    def python_json(self, code: str) -> dict:
        """Run ``code`` (which prints one line 'RESULT <json>') in the fresh venv's Python."""
        return _result(self.run("-c", code).stdout)


def _result(stdout: str) -> dict:
    lines = [line for line in stdout.splitlines() if line.startswith("RESULT ")]
    assert lines, f"no RESULT line in:\n{stdout}"
    return json.loads(lines[-1][len("RESULT ") :])


def _pip(*args: str, env: dict[str, str] | None = None) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "pip", "--disable-pip-version-check", "--no-input", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert proc.returncode == 0, f"pip {' '.join(args)} failed:\n{proc.stdout}\n{proc.stderr}"


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    tmp = tmp_path_factory.mktemp("wheel")
    dist = tmp / "dist"
    # hatchling comes with the dev extra, so the wheel builds offline without build isolation.
    _pip("wheel", "-q", "--no-deps", "--no-build-isolation", "--no-index", "-w", str(dist), str(REPO))
    wheels = list(dist.glob("parrot_nb-*.whl"))
    assert len(wheels) == 1, wheels
    return wheels[0]


@pytest.fixture(scope="module")
def venv(tmp_path_factory: pytest.TempPathFactory, wheel: Path) -> FreshVenv:
    tmp = tmp_path_factory.mktemp("fresh")
    root = tmp / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(root)], check=True, timeout=120)
    python = root / "bin" / "python"
    site = Path(
        subprocess.run(
            [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
            check=True,
            capture_output=True,
            text=True,
        ).stdout.strip()
    )
    # pip from the dev venv installs into the fresh one (it has no pip of its own); before the .pth
    # below exists, so pip never sees the dev venv's editable parrot-nb (and never tries to uninstall it).
    _pip("--python", str(python), "install", "-q", "--no-deps", "--no-index", str(wheel))
    # The dev venv's packages, appended after the fresh site-packages (and processed after it).
    (site / "zz-parrot-nb-test-deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")

    home = tmp / "home"
    home.mkdir()
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("PYTHON", "JUPYTER", "IPYTHON", "VIRTUAL_ENV"))
    }
    env.update(
        HOME=str(home),
        IPYTHONDIR=str(home / "ipython"),
        JUPYTER_CONFIG_DIR=str(home / "jupyter-config"),
        JUPYTER_DATA_DIR=str(home / "jupyter-data"),
        JUPYTER_RUNTIME_DIR=str(home / "jupyter-runtime"),
        PYTHONNOUSERSITE="1",
        VIRTUAL_ENV=str(root),
        PATH=f"{root / 'bin'}{os.pathsep}{env.get('PATH', '')}",
    )
    return FreshVenv(root, python, site, home, env)


# --------------------------------------------------------------------------- the install itself


def test_parrot_nb_is_imported_from_the_fresh_install(venv):
    got = venv.python_json(
        "import json, parrot_nb, engine_server;"
        "print('RESULT ' + json.dumps([parrot_nb.__file__, engine_server.__file__]))"
    )
    for path in got:
        assert Path(path).is_relative_to(venv.site_packages), path


def test_data_files_are_installed_into_the_prefix(venv):
    startup = venv.root / "etc/ipython/startup/00-parrot-nb.py"
    kernel = venv.root / "share/jupyter/kernels/parrot-nb/kernel.json"
    assert startup.is_file()
    assert kernel.is_file()
    assert startup.read_text() == (REPO / "jupyter-config/ipython/startup/00-parrot-nb.py").read_text()
    assert json.loads(kernel.read_text()) == json.loads((REPO / "jupyter-config/kernels/parrot-nb/kernel.json").read_text())


def test_jupyter_lists_the_parrot_nb_kernelspec_from_the_fresh_prefix(venv):
    out = venv.run("-m", "jupyter_client.kernelspecapp", "list", "--json").stdout
    specs = json.loads(out)["kernelspecs"]
    assert "parrot-nb" in specs, sorted(specs)
    spec = specs["parrot-nb"]
    assert spec["spec"]["display_name"] == "Python 3 (parrot-nb)"
    assert Path(spec["resource_dir"]).resolve().is_relative_to(venv.root.resolve())
    argv = spec["spec"]["argv"]
    assert argv[1:3] == ["-m", "ipykernel_launcher"]
    assert "--ext=parrot_nb" in argv


_LAZY_CHECK = """
import json, sys
ip = get_ipython()
before = "parrot_nb" in sys.modules
lazy = {{name: ip.magics_manager.lazy_magics.get(name) for name in ("semantic", "parrot")}}
{use}
after = "parrot_nb" in sys.modules
fn = ip.user_ns.get("hello")
print("RESULT " + json.dumps(dict(
    before=before, after=after, lazy=lazy, ok=ok,
    type=f"{{type(fn).__module__}}.{{type(fn).__qualname__}}" if fn is not None else None,
    inputs=list(fn.inputs) if fn is not None else None,
    file=getattr(sys.modules.get("parrot_nb"), "__file__", None),
)))
"""

_USE_SEMANTIC = 'ok = ip.run_cell("%%semantic hello --max-tokens 3\\nSay {{input:x}}: {{output:y}}\\n").success'
_USE_PARROT = 'ok = ip.run_cell("%parrot").success'


def test_fresh_ipython_declares_the_magics_lazily_and_semantic_defines_a_function(venv):
    got = _result(venv.run("-m", "IPython", "-c", _LAZY_CHECK.format(use=_USE_SEMANTIC)).stdout)
    assert got["lazy"] == {"semantic": "parrot_nb", "parrot": "parrot_nb"}
    assert got["before"] is False  # the startup file did not import parrot_nb
    assert got["ok"] is True
    assert got["after"] is True
    assert got["type"] == "parrot_nb.function.SemanticFunction"
    assert got["inputs"] == ["x"]
    assert Path(got["file"]).is_relative_to(venv.site_packages)


def test_fresh_ipython_loads_the_parrot_line_magic_on_first_use(venv):
    proc = venv.run("-m", "IPython", "-c", _LAZY_CHECK.format(use=_USE_PARROT))
    got = _result(proc.stdout)
    assert got["before"] is False
    assert got["ok"] is True
    assert got["after"] is True
    assert "%parrot start" in proc.stdout  # the usage it printed


def test_import_parrot_nb_loads_neither_torch_nor_triton(venv):
    got = venv.python_json(
        "import json, sys, parrot_nb;"
        "print('RESULT ' + json.dumps(sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'triton'))))"
    )
    assert got == []
