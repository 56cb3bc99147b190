"""The one child-process protocol, both ends: a job in, events out as they happen, a result (or partial result) back.

The parent writes the job ({"kind", "payload"}) to a file and starts `python -m harness.child JOB RESULT`.
The child runs the handler registered for the kind; it reports events (progress lines) on stdout as
JSON lines behind EVENT, and may write partial results as it goes, so a child that dies keeps what it
finished. A fresh process per job keeps one model's crash, allocator state or packed weights away
from the next: `harness verify` runs one pair per child, `harness bench` one measurement. Inside
`forking()`, jobs that ask for it are forked from a server that imported the libraries once
(harness.forkserver): still a process per job, without paying the imports again.
"""

from __future__ import annotations

import atexit
import collections
import contextlib
import dataclasses
import faulthandler
import importlib
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Callable

EVENT = "[edge-parity event] "
# kind -> "module:function"; a handler is (payload, Channel) -> result. Imported only in the child.
HANDLERS = {
    "verify_pair": "harness.suite:verify_pair_job",
    "bench_tflite": "harness.bench.worker:measure_tflite",
    "bench_quick": "harness.bench.worker:measure_quick",
    "bench_engine": "harness.bench.worker:measure_engine",
    "bench_reauthored": "harness.bench.worker:measure_reauthored",
    "bench_bandwidth": "harness.bench.worker:measure_bandwidth",
    "bench_delegation": "harness.bench.worker:measure_delegation",
}


@dataclasses.dataclass
class ChildFailed(Exception):
    """The child exited non-zero or wrote no final result: its exit code, last output and partial result."""

    kind: str
    code: int
    tail: list[str]
    partial: dict[str, Any] | None
    stack: list[str] = dataclasses.field(default_factory=list)  # a native crash's (native_stack), if it left one

    def output(self) -> str:
        """What the child said last: a native crash's stack (innermost frame first), else its last lines."""
        if self.stack:
            return " | ".join(line.strip() for line in self.stack)[:1500]
        return " | ".join(t for t in self.tail if t.strip())[-1500:]

    def __str__(self) -> str:
        return f"{self.kind} child exited with {self.code}: {self.output()}"


def native_stack(lines: list[str]) -> list[str]:
    """faulthandler's report of a native crash in a child's output: its first line and the crashing thread's
    Python stack, innermost frame first; [] if there is none. (The lines after it list the extension modules
    loaded, which say nothing of where it crashed.)"""
    starts = [i for i, line in enumerate(lines) if line.startswith("Fatal Python error")]
    if not starts:
        return []
    report = lines[starts[-1]:]
    heads = [i for i, line in enumerate(report) if line.startswith("Current thread")] or [
        i for i, line in enumerate(report) if line.startswith("Thread ")][:1]
    if not heads:
        return report[:1]
    stack = []
    for line in report[heads[0] + 1:]:
        if not line.strip():
            break
        stack.append(line)
    return [report[0], report[heads[0]], *stack]


class Interrupted(KeyboardInterrupt):
    """Ctrl-C reached the parent while a child ran: the child was stopped, its partial result is kept."""

    def __init__(self, kind: str, partial: dict[str, Any] | None):
        super().__init__(kind)
        self.kind, self.partial = kind, partial


STOP_GRACE_S = 30  # a child told to stop finishes its cleanup (a cache build's staging directory) within this


class Channel:
    """The child's side: report an event, save a partial result."""

    def __init__(self, result_path: Path):
        self.result_path = result_path

    def event(self, **event: Any) -> None:
        print(EVENT + json.dumps(event, default=str), flush=True)
        if _stop_requested:  # the Ctrl-C was swallowed where it landed (a finalizer run by gc): stop here instead
            raise KeyboardInterrupt

    def partial(self, result: dict[str, Any]) -> None:
        _write(self.result_path, {"partial": True, "result": result})


def _write(path: Path, data: dict[str, Any]) -> None:
    from harness.report import write_atomic

    write_atomic(path, json.dumps(data, default=str))


_scratch: str | None = None  # the running job's directory for temporary files (main() sets it; see scratch())


def scratch() -> str | None:
    """Where a job's temporary files go (tempfile's `dir=`): a directory inside the job's own, which the parent
    removes when the child has ended, however it ended. Outside a child, None: the system's. A child that is
    killed (a crash, Ctrl-C past its grace, a timeout) cannot remove its own: the real model's spill is 2.4 GB."""
    return _scratch


_server = None  # the fork server of the innermost forking() block
_running: set = set()  # the children run() is waiting for, in any thread (stop_running's to stop)
_running_lock = threading.Lock()


@contextlib.contextmanager
def forking():
    """Jobs run with forked=True inside the block are forked from one server that imported the libraries once."""
    global _server
    from harness.forkserver import ForkServer

    outer = _server
    _server = outer or ForkServer(_environment(None))
    try:
        yield
    finally:
        if outer is None:
            _server.close()
            _server = None


class _Forked:
    """A child forked by the server, with the parts of subprocess.Popen that run() and _stop() use."""

    def __init__(self, server, pid: int, output: int):
        self.server, self.pid, self.returncode = server, pid, None
        self.stdout = os.fdopen(output, "r", buffering=1, errors="replace")

    def poll(self) -> int | None:
        return self.returncode

    def wait(self, timeout: float | None = None) -> int:
        if self.returncode is None:
            try:
                self.returncode = self.server.wait(self.pid, timeout)
            except TimeoutError:
                raise subprocess.TimeoutExpired(f"child {self.pid}", timeout) from None
        return self.returncode

    def send_signal(self, sig: int) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(self.pid, sig)

    def kill(self) -> None:
        self.send_signal(signal.SIGKILL)


def _environment(env: dict[str, str] | None) -> dict[str, str]:
    return {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2", **(env or {})}


def _start(job_path: Path, result_path: Path, env: dict[str, str] | None, forked: bool):
    """The child: forked from the server when asked and one is open (and no environment of its own is
    asked for, which only a fresh process can honour), else a fresh `python -m harness.child`."""
    if forked and _server is not None and env is None:
        from harness.forkserver import ServerGone

        try:
            pid, output = _server.spawn(job_path, result_path)
            return _Forked(_server, pid, output)
        except ServerGone as e:
            print(f"edge-parity: {e}; running the job in a fresh process", file=sys.stderr)
    return subprocess.Popen([sys.executable, "-m", "harness.child", str(job_path), str(result_path)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1,
                            env=_environment(env), errors="replace")


def run(kind: str, payload: dict[str, Any], on_event: Callable[[dict], None] | None = None,
        timeout: float | None = None, env: dict[str, str] | None = None, forked: bool = False) -> dict[str, Any]:
    """Runs one job in a process of its own; returns its result or raises ChildFailed. `kind` is a name in
    HANDLERS or a handler's own "module:function". `forked`: fork it from the open server (see forking())."""
    if kind not in HANDLERS and ":" not in kind:
        raise ValueError(f"no child handler for {kind!r}")
    with tempfile.TemporaryDirectory(prefix="edge-parity-child-") as tmp:
        job_path, result_path = Path(tmp) / "job.json", Path(tmp) / "result.json"
        job_path.write_text(json.dumps({"kind": kind, "payload": payload}, default=str))
        proc = _start(job_path, result_path, env, forked)
        with _running_lock:
            _running.add(proc)
        output: collections.deque[str] = collections.deque(maxlen=400)  # room for a crash's stacks of every thread
        try:
            for line in proc.stdout:
                if line.startswith(EVENT):
                    if on_event:
                        on_event(json.loads(line[len(EVENT):]))
                else:
                    output.append(line.rstrip("\n"))
            code = proc.wait(timeout=timeout)
        except KeyboardInterrupt:
            _stop(proc)
            raise Interrupted(kind, _read(result_path)) from None
        except BaseException:
            proc.kill()
            proc.wait()
            raise
        finally:
            proc.stdout.close()
            with _running_lock:
                _running.discard(proc)
        written = _read(result_path)
    if code == 0 and written is not None and not written.get("partial"):
        return written["result"]
    lines = list(output)
    raise ChildFailed(kind, code, lines[-15:], written["result"] if written else None, native_stack(lines))


def _read(result_path: Path) -> dict[str, Any] | None:
    return json.loads(result_path.read_text()) if result_path.exists() else None


def _stop(proc: subprocess.Popen) -> None:
    """Ask the child to stop as Ctrl-C would (a terminal sends it to the child too; it acts on the first),
    then wait for its cleanup; kill it if it does not finish."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGINT)
    try:
        proc.wait(timeout=STOP_GRACE_S)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def stop_running(grace: float = STOP_GRACE_S) -> None:
    """Ctrl-C for children other threads wait for (harness verify -j): each is asked to stop as Ctrl-C would,
    given `grace` seconds for its cleanup, then killed. Their run() calls then end with exit code 130 (or the
    signal), which callers read as interrupted."""
    with _running_lock:
        procs = list(_running)
    for proc in procs:
        if proc.poll() is None:
            proc.send_signal(signal.SIGINT)
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline:
        with _running_lock:
            if not _running:
                return
        time.sleep(0.1)
    with _running_lock:
        procs = list(_running)
    for proc in procs:
        proc.kill()


def main(argv: list[str]) -> int:
    """The child's entry point: runs the job's handler and writes its result."""
    global _scratch
    job = json.loads(Path(argv[0]).read_text())
    _scratch = str(Path(argv[0]).parent / "scratch")
    os.makedirs(_scratch, exist_ok=True)
    module, function = HANDLERS.get(job["kind"], job["kind"]).split(":")
    handler = getattr(importlib.import_module(module), function)
    channel = Channel(Path(argv[1]))
    faulthandler.enable()  # a crash in native code leaves its Python stack in the output the parent keeps
    if signal.getsignal(signal.SIGINT) is not signal.SIG_IGN:  # started with Ctrl-C ignored (a background job
        signal.signal(signal.SIGINT, _interrupt_once)         # of a script): stay as the parent does
    try:
        result = handler(job["payload"], channel)
    except KeyboardInterrupt:  # the partial result written so far stays; the parent reports the stop
        return 130
    _write(channel.result_path, {"partial": False, "result": result})
    return 0


_stop_requested = False  # set by the first SIGINT: the job stops at the next event even if that raise was lost


def _interrupt_once(signum, frame) -> None:
    """The first SIGINT stops the job; later ones (the terminal's and the parent's) must not cut its cleanup short."""
    global _stop_requested
    _stop_requested = True
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    raise KeyboardInterrupt


def end(code: int) -> None:
    """Ends a child whose result is written: its exit functions run (TensorFlow's autograph removes the files it
    wrote to the system's temporary directory with one; ~0.03 s), its output is flushed, and os._exit skips the
    ~2.2 s the interpreter's teardown of torch and TensorFlow takes (measured on a 2-core EPYC), which the
    parent would wait out."""
    atexit._run_exitfuncs()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":
    from harness import child  # the module jobs import (scratch() reads its state), not this __main__ copy

    child.end(child.main(sys.argv[1:]))
