"""Every grading runs in a child process under a wall-clock limit.

Why a process: math-verify's own timeout uses ``SIGALRM``, which works only in the
main thread, and a Ray actor or a thread pool is not that; a thread cannot be
stopped from outside; and a SymPy computation such as ``9^{9^{9^{9}}}`` can sit in
C code for minutes without releasing the GIL. A process can always be killed.

Why one long-lived child rather than one per grading: a fresh interpreter costs
about 0.6 s to import SymPy and math-verify, while a request to a warm child costs
well under a millisecond. The child is a new interpreter (``subprocess``, not
``fork``, which is unsafe in a multithreaded Ray worker); it grades one request at
a time and is killed when a grading overruns, then started again before the next
one, so its start-up never counts against a grading's limit.

The protocol: length-prefixed JSON frames. The first frame to the child is the
``RewardConfig``; it answers ``ready`` (or ``start_error``), then one ``Graded``
per ``{response, answer}`` request.
"""

from __future__ import annotations

import ctypes
import dataclasses
import json
import os
import select
import signal
import struct
import subprocess
import sys
import threading
import time
import weakref
from typing import Any

from mapo_ray.config import RewardConfig, from_dict
from mapo_ray.reward.contract import Graded, call_reward_fn
from mapo_ray.reward.functions import load_reward_fn

_HEADER = struct.Struct(">Q")
_PR_SET_PDEATHSIG = 1  # from <linux/prctl.h>


class GraderStartError(RuntimeError):
    """The grading process could not start or load the reward function."""


class TimedGrader:
    """Grades ``(response, answer)`` pairs in a child process, each within
    ``config.grading_timeout_s`` seconds; safe to call from any thread.

    ``grade`` never raises for anything the reward function or its input does:
    errors, overruns, NaN and a dead process all come back as a ``Graded`` failure.
    Use as a context manager, or call ``close``; a grader that is garbage-collected
    kills its process too.
    """

    def __init__(self, config: RewardConfig, start_timeout_s: float = 60.0) -> None:
        self._config = config
        self._start_timeout_s = start_timeout_s
        self._lock = threading.Lock()
        self._proc: subprocess.Popen[bytes] | None = None
        self._finalizer: weakref.finalize | None = None
        with self._lock:
            self._start()

    def grade(self, response: str, answer: str) -> Graded:
        """Score one response; see the class docstring for what can come back."""
        limit = self._config.grading_timeout_s
        with self._lock:
            if self._proc is None or self._proc.poll() is not None:
                self._start()
            assert self._proc is not None and self._proc.stdin is not None and self._proc.stdout is not None
            deadline = time.monotonic() + limit
            try:
                _write_frame(self._proc.stdin.fileno(), {"response": response, "answer": answer}, deadline)
                reply = _read_frame(self._proc.stdout.fileno(), deadline)
            except TimeoutError:
                self._stop()
                return Graded.failed("timeout", f"grading took longer than {limit:g} s")
            except (EOFError, OSError):
                code = self._stop()
                return Graded.failed("exception", f"grading process died (exit code {code})")
        return Graded(**reply)

    @property
    def pid(self) -> int | None:
        """The grading process's id, None while none runs (before a restart)."""
        return None if self._proc is None else self._proc.pid

    def close(self) -> None:
        """Stop the child process (idempotent)."""
        with self._lock:
            self._stop()

    def __enter__(self) -> TimedGrader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _start(self) -> None:
        self._stop()
        # The child must import what this process can import, user reward modules included.
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(p or os.getcwd() for p in sys.path))
        proc = subprocess.Popen(
            [sys.executable, "-c", "from mapo_ray.reward.sandbox import serve; serve()", str(os.getpid())],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            env=env,
        )
        assert proc.stdin is not None and proc.stdout is not None
        self._proc = proc
        self._finalizer = weakref.finalize(self, _kill, proc)
        os.set_blocking(proc.stdin.fileno(), False)  # writes wait in select, under a deadline
        deadline = time.monotonic() + self._start_timeout_s
        try:
            _write_frame(proc.stdin.fileno(), {"config": dataclasses.asdict(self._config)}, deadline)
            reply = _read_frame(proc.stdout.fileno(), deadline)
        except (TimeoutError, EOFError, OSError) as err:
            code = self._stop()
            raise GraderStartError(
                f"grading process for reward.function {self._config.function!r} did not start "
                f"({type(err).__name__}; exit code {code}); its stderr is in this process's log"
            ) from err
        if reply.get("kind") != "ready":
            self._stop()
            raise GraderStartError(f"grading process could not load the reward function: {reply.get('error')}")

    def _stop(self) -> int | None:
        """Kill the child if there is one; its exit code."""
        if self._finalizer is not None:
            self._finalizer.detach()
            self._finalizer = None
        proc, self._proc = self._proc, None
        return None if proc is None else _kill(proc)


def _kill(proc: subprocess.Popen[bytes]) -> int:
    proc.kill()
    code = proc.wait()
    for pipe in (proc.stdin, proc.stdout):
        if pipe is not None:
            pipe.close()
    return code


def _write_frame(fd: int, message: dict[str, Any], deadline: float | None) -> None:
    data = json.dumps(message).encode()
    view = memoryview(_HEADER.pack(len(data)) + data)
    while view:
        _wait(fd, deadline, write=True)
        try:
            view = view[os.write(fd, view) :]
        except BlockingIOError:
            continue


def _read_frame(fd: int, deadline: float | None) -> dict[str, Any]:
    (size,) = _HEADER.unpack(_read_exact(fd, _HEADER.size, deadline))
    return json.loads(_read_exact(fd, size, deadline))


def _read_exact(fd: int, size: int, deadline: float | None) -> bytes:
    chunks = bytearray()
    while len(chunks) < size:
        _wait(fd, deadline, write=False)
        chunk = os.read(fd, size - len(chunks))
        if not chunk:
            raise EOFError("the other end closed the pipe")
        chunks += chunk
    return bytes(chunks)


def _wait(fd: int, deadline: float | None, write: bool) -> None:
    """Block until ``fd`` is ready; ``TimeoutError`` at ``deadline`` (None: no limit)."""
    if deadline is None:
        return
    remaining = deadline - time.monotonic()
    ready = select.select([], [fd], [], max(remaining, 0)) if write else select.select([fd], [], [], max(remaining, 0))
    if not any(ready):
        raise TimeoutError


def serve() -> None:
    """Main loop of the grading process (started by ``TimedGrader``; not for direct use)."""
    parent = int(sys.argv[1])
    if sys.platform.startswith("linux"):
        # If the parent (a reward actor) is killed while this process is stuck in a
        # grading, nothing else would end it: ask the kernel to.
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() != parent:
        return  # the parent died before the request above took effect
    # The protocol owns the original stdin/stdout; a reward function that prints or
    # reads must not corrupt it, so fd 1 becomes stderr and fd 0 /dev/null.
    requests, replies = os.dup(0), os.dup(1)
    os.dup2(2, 1)
    devnull = os.open(os.devnull, os.O_RDONLY)
    os.dup2(devnull, 0)
    try:
        fn = load_reward_fn(from_dict(RewardConfig, _read_frame(requests, None)["config"]))
    except Exception as err:  # sent back and raised in the parent, with its message
        _write_frame(replies, {"kind": "start_error", "error": f"{type(err).__name__}: {err}"}, None)
        return
    _write_frame(replies, {"kind": "ready"}, None)
    while True:
        try:
            request = _read_frame(requests, None)
        except EOFError:
            return  # the parent closed the pipe: shut down
        graded = call_reward_fn(fn, request["response"], request["answer"])
        _write_frame(replies, dataclasses.asdict(graded), None)
