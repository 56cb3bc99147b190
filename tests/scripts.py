"""Running Python as a user does, in a new process with this checkout importable: the harness's command
line, and the reproductions `harness explain` writes."""

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ENV = dict(os.environ, PYTHONPATH=str(ROOT))


def run(args, cwd=ROOT, timeout=600):
    return subprocess.run([sys.executable, *args], cwd=cwd, env=ENV, capture_output=True, text=True, timeout=timeout)


def run_repro(script: Path) -> tuple[str, float, float]:
    """Runs a written reproduction on its own, from its folder; its output and the worst element's two values."""
    repro = run([script.name], cwd=script.parent)
    assert repro.returncode == 0, repro.stderr[-2000:]
    worst = next(line for line in repro.stdout.splitlines() if line.startswith("worst element"))
    return repro.stdout, float(worst.split("parent ")[1].split(",")[0]), float(worst.split("stage ")[1])


def harness_here(*args) -> subprocess.CompletedProcess:
    """`harness ARGS` in this process (cli.main), for a test of what a run records rather than of its process: a
    new one spends ~8 s importing torch, TensorFlow and litert-torch again (with --in-process, no other)."""
    import contextlib
    import io

    from harness import cli

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = cli.main([str(a) for a in args])
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else 2
    return subprocess.CompletedProcess(["harness", *map(str, args)], code, out.getvalue(), err.getvalue())
