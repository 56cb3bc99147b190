"""Entry points: `nox -s verify` (default tiny suite), `nox -s tests`, and the opt-in real-model runs.

Every session runs in one environment, `.nox/edge-parity` (torch, TensorFlow, litert-torch: ~3.6 GB and
~90 s to install), made by the first session that needs it and reused while pyproject.toml is unchanged,
so a newcomer's `nox -s verify` and `nox -s tests` install it once.
"""

import hashlib
import json
import os
import shutil
import sys
from pathlib import Path

import nox

nox.options.sessions = ["verify"]

ROOT = Path(__file__).parent
ENV = ROOT / ".nox" / "edge-parity"
STAMP = ENV / ".edge-parity-installed"  # {"pyproject": sha256, "extras": [...]} of the last install
# The CPU wheel of torch that lies on the build machines; an unpinned torch pulls CUDA.
TORCH = "torch==2.13.0"
PYTHON = "3.11"


def _interpreter() -> str:
    """A Python 3.11 to make the environment with: the one running nox, else python3.11 on PATH."""
    if f"{sys.version_info.major}.{sys.version_info.minor}" == PYTHON:
        return sys.executable
    found = shutil.which(f"python{PYTHON}")
    if not found:
        raise SystemExit(f"edge-parity needs Python {PYTHON}: install it (python{PYTHON} on PATH) or run nox with it")
    return found


def environment(session: nox.Session, extras: tuple[str, ...] = ()) -> Path:
    """The shared environment's bin directory, installed (or brought up to date) for `extras`."""
    digest = hashlib.sha256((ROOT / "pyproject.toml").read_bytes()).hexdigest()
    try:
        stamp = json.loads(STAMP.read_text())
    except (OSError, ValueError):
        stamp = {}
    python = ENV / "bin" / "python"
    if stamp.get("pyproject") == digest and set(extras) <= set(stamp.get("extras", ())) and python.exists():
        session.log(f"dependencies up to date in {ENV.relative_to(ROOT)} (pyproject.toml unchanged); skipping install")
        return python.parent
    if not python.exists():
        session.run(_interpreter(), "-m", "venv", str(ENV), external=True)
    installed = sorted(set(extras) | (set(stamp.get("extras", ())) if stamp.get("pyproject") == digest else set()))
    session.run(str(python), "-m", "pip", "install", TORCH, external=True)
    session.run(str(python), "-m", "pip", "install", "-e", f".[{','.join(installed)}]" if installed else ".",
                external=True)
    STAMP.write_text(json.dumps({"pyproject": digest, "extras": installed}))
    return python.parent


def run(session: nox.Session, tool: str, *args: str, extras: tuple[str, ...] = ()) -> None:
    """`tool` of the shared environment, with that environment first on PATH (children find its Python)."""
    bin_dir = environment(session, extras)
    env = {"VIRTUAL_ENV": str(ENV), "PATH": f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}"}
    session.run(str(bin_dir / tool), *args, env=env, external=True)


@nox.session(venv_backend="none")
def verify(session: nox.Session) -> None:
    """Every pair of the default tiny suite through every stage; writes reports/latest."""
    run(session, "harness", "verify", "--out", "reports/latest", *session.posargs)


# Two pytest workers, a test file each at a time (a file's session fixtures are built once; the files that read
# every pair's verify go together, tests/conftest.py): 347 s against 580 s in one process, back to back on a
# 2-core host, with torch at one thread per worker (tests/conftest.py).
TEST_WORKERS = ("-n", "2", "--dist", "loadfile")


@nox.session(venv_backend="none")
def tests(session: nox.Session) -> None:
    """The test suite (property profile `ci`), two workers; pass --run-slow for real-model tests, `-- -n 0`
    for one process."""
    run(session, "pytest", *TEST_WORKERS, *session.posargs)


@nox.session(venv_backend="none")
def verify_full(session: nox.Session) -> None:
    """The full suite, including the real Gemma 3 270M from PyPI."""
    run(session, "harness", "verify", "--suite", "full", "--out", "reports/full", *session.posargs, extras=("real",))


@nox.session(venv_backend="none")
def golden(session: nox.Session) -> None:
    """Re-record golden/ for the default suite and print what moved; e.g. `nox -s golden -- --models tiny_llama`."""
    run(session, "harness", "golden", "update", *session.posargs)


@nox.session(venv_backend="none")
def bench(session: nox.Session) -> None:
    """XNNPack performance of the default suite's artifacts: reports/latest/perf.{json,md,png}.

    Gate against a previous conversion: `nox -s bench -- --baseline reports/baseline` after saving it
    with `--save-baseline reports/baseline` (its .tflite files and baseline.json; keep that directory
    between CI runs). The gate's noise and power: `nox -s bench -- --self-check 30`.
    """
    run(session, "harness", "bench", *session.posargs)


@nox.session(venv_backend="none")
def bench_full(session: nox.Session) -> None:
    """XNNPack performance of the real Gemma 3 270M's flatbuffers (converted on first use): reports/full/perf.*."""
    args = session.posargs or ["--models", "gemma3_270m_real"]
    run(session, "harness", "bench", "--suite", "full", "--out", "reports/full", *args, extras=("real",))


@nox.session(venv_backend="none")
def selfbench(session: nox.Session) -> None:
    """Where the harness's own time goes, cold and warm; `-- --base REF` runs REF's harness side by side,
    alternating, and reports ratios (reports/selfbench). Arguments after `--` past its own go to verify."""
    run(session, "python", "-m", "harness.selfbench", *session.posargs)
