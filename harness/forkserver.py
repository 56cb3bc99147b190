"""A process that imports torch, TensorFlow and litert-torch once and forks one child per job.

A fresh `python -m harness.child` pays ~6-9 s of imports before it does anything; for tiny pairs that is
most of a pair's run. The fork server pays them once per run; each job still runs in a process of its own
(forked from the server, so it starts with the imports and nothing else), and a child that crashes takes
only its own job with it. The protocol between parent and child is harness.child's: the job and result
files, events on the child's stdout, which the server points at a pipe the parent reads.

Parent and server talk over a Unix socket: the parent sends {"job", "result", "sigint"} with the write end
of an output pipe; the server answers {"pid"} when it has forked and {"pid", "code"} when the child ends.
"""

from __future__ import annotations

import atexit
import json
import os
import select
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

from harness import child

# What every verify job imports: loaded once in the server (a module not here is imported in the child).
PRELOAD = ("numpy", "torch", "transformers", "tensorflow", "litert_torch",
           "litert_torch.generative.utilities.converter", "ai_edge_litert.compiled_model", "harness.suite",
           "harness.pipeline", "harness.runners", "harness.lowering", "harness.checkpoint", "harness.properties",
           "harness.golden", "harness.localise")
_MESSAGE = 1 << 16


class ServerGone(RuntimeError):
    """The fork server exited or stopped answering: a job falls back to a fresh process."""


class ForkServer:
    """The parent's side: starts the server on first use, hands it jobs, reads each child's output. Safe to
    use from several threads (harness verify -j): one spawn at a time, any thread may wait for its child."""

    def __init__(self, env: dict[str, str]):
        self.env = env
        self._proc: subprocess.Popen | None = None
        self._sock: socket.socket | None = None
        self._spawning = threading.Lock()  # one request in flight: the next "pid" answer is its own
        self._messages = threading.Condition()  # guards what follows
        self._pending: list[dict] = []  # messages read, not yet taken
        self._buffer = b""  # a message's start, read before its end
        self._reading = False  # a thread is reading the socket; others wait for what it reads
        self._gone: str | None = None

    def _start(self) -> None:
        parent, child = socket.socketpair()
        self._proc = subprocess.Popen([sys.executable, "-m", "harness.forkserver", str(child.fileno())],
                                      pass_fds=(child.fileno(),), env=self.env, stdin=subprocess.DEVNULL,
                                      stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        child.close()
        with self._messages:
            self._sock, self._pending, self._buffer, self._gone = parent, [], b"", None
        ready = self._receive(lambda m: "ready" in m)
        if not ready["ready"]:
            raise ServerGone(f"the fork server could not import its libraries: {ready.get('error')}")

    def spawn(self, job_path: Path, result_path: Path) -> tuple[int, int]:
        """Forks a child for the job; returns its pid and the read end of its output pipe."""
        with self._spawning:
            if self._proc is None or self._proc.poll() is not None:
                self._stop_server()
                self._start()
            read, write = os.pipe()
            try:
                sigint = "ignore" if signal.getsignal(signal.SIGINT) is signal.SIG_IGN else "default"
                message = json.dumps({"job": str(job_path), "result": str(result_path), "sigint": sigint}).encode()
                try:
                    socket.send_fds(self._sock, [message], [write])
                except OSError as e:
                    raise ServerGone(f"the fork server is gone ({e})") from None
            finally:
                os.close(write)
            try:
                started = self._receive(lambda m: "pid" in m and "code" not in m)
            except ServerGone:
                os.close(read)
                raise
            return started["pid"], read

    def wait(self, pid: int, timeout: float | None = None) -> int:
        """The child's exit code (negative: the signal that ended it), as subprocess reports it."""
        return self._receive(lambda m: m.get("pid") == pid and "code" in m, timeout)["code"]

    def _receive(self, wanted, timeout: float | None = None) -> dict:
        """The first message `wanted` accepts: read by this thread, or by another that was reading."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._messages:
            while True:
                for i, message in enumerate(self._pending):
                    if wanted(message):
                        return self._pending.pop(i)
                if self._gone:
                    raise ServerGone(self._gone)
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    raise TimeoutError("the fork server's child did not finish in time")
                if self._reading:
                    self._messages.wait(left)
                    continue
                self._reading = True
                sock = self._sock
                self._messages.release()
                reason = None
                try:
                    ready, _, _ = select.select([sock], [], [], 1.0 if left is None else min(left, 1.0))
                    chunk = sock.recv(_MESSAGE) if ready else None
                except OSError as e:
                    chunk = b""
                    reason = f"the fork server is gone ({e})"
                finally:
                    self._messages.acquire()
                    self._reading = False
                    self._messages.notify_all()
                if chunk == b"":
                    self._gone = reason or f"the fork server exited (code {self._proc.poll()})"
                elif chunk:
                    self._buffer += chunk
                    *lines, self._buffer = self._buffer.split(b"\n")
                    self._pending.extend(json.loads(line) for line in lines if line)

    def close(self) -> None:
        """Stops the server (its children, if any still run, finish on their own)."""
        with self._spawning:
            self._stop_server()

    def _stop_server(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None
        if self._proc is not None:
            try:
                self._proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait()
            self._proc = None


def _send(sock: socket.socket, **message) -> None:
    sock.sendall(json.dumps(message).encode() + b"\n")


def _fork_child(sock: socket.socket, request: dict, output: int) -> int:
    pid = os.fork()
    if pid:
        os.close(output)
        return pid
    atexit._clear()  # the server's exit functions are the server's; the child runs only those its job registers
    try:  # the child: its stdout and stderr are the pipe the parent reads, Ctrl-C as the parent had it
        sock.close()  # the server's end: the parent must see EOF when the server goes, not when its children do
        os.dup2(output, 1)
        os.dup2(output, 2)
        os.close(output)
        signal.signal(signal.SIGINT, signal.SIG_IGN if request["sigint"] == "ignore" else signal.default_int_handler)
        code = child.main([request["job"], request["result"]])
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else 1
    except BaseException:  # noqa: BLE001 - reported on the pipe, as an uncaught exception of a fresh process is
        import traceback

        traceback.print_exc()
        code = 1
    child.end(code)


def serve(sock: socket.socket) -> None:
    """The server: imports, then forks a child per request until the parent closes the socket."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle, and each child's
    try:
        import importlib

        for name in PRELOAD:
            importlib.import_module(name)
        from harness.pairs import discover

        discover()  # the model files and what they import
    except Exception as e:  # noqa: BLE001 - the parent falls back to fresh processes and says why
        _send(sock, ready=False, error=f"{type(e).__name__}: {e}")
        return
    _send(sock, ready=True)
    children: set[int] = set()
    while True:
        ready, _, _ = select.select([sock], [], [], 0.05 if children else None)
        if ready:
            message, fds, _, _ = socket.recv_fds(sock, _MESSAGE, 1)
            if not message:
                return
            pid = _fork_child(sock, json.loads(message), fds[0])
            children.add(pid)
            _send(sock, pid=pid)
        for pid in list(children):
            done, status = os.waitpid(pid, os.WNOHANG)
            if done:
                children.discard(pid)
                _send(sock, pid=pid, code=os.waitstatus_to_exitcode(status))


if __name__ == "__main__":
    serve(socket.socket(fileno=int(sys.argv[1])))
    # Nothing is left to flush (its output is /dev/null): the interpreter's teardown of torch and TensorFlow
    # would take ~2.2 s, which the parent waits out before it writes the final report.
    os._exit(0)
