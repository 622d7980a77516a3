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

The child reads untrusted model output, so besides the wall-clock limit it runs
under limits of its own (``RewardConfig``):

- Address space, ``reward.grading_memory_mb`` (``RLIMIT_AS``): an expression that
  expands to gigabytes fails one allocation with ``MemoryError`` (counted as a
  ``memory`` failure, and the child is replaced) instead of the node's OOM killer
  ending the reward actor or worse. A ``MemoryError`` the reward function catches
  itself (math-verify catches every ``Exception`` while parsing) is its own result.
- CPU time, ``reward.grading_cpu_s`` (``RLIMIT_CPU``): the kernel limit counts a
  process's whole life, so the child re-arms its soft limit before each request at
  the CPU time used so far plus the allowance (one ``getrusage`` and one
  ``setrlimit``, microseconds). Past it the kernel sends ``SIGXCPU``, whose default
  action ends the child: a ``cpu`` failure, and the child is replaced. It counts
  every thread of the child, so it also bounds a grading that burns many cores.
- Environment: the child gets this process's environment minus every variable
  whose name looks like a secret (``is_secret_name``) or whose value is a URL with
  a password, except the names in ``reward.grading_env_keep``.

The limits are set by the child itself, right after it reads the (trusted) config
frame and before it loads the reward function or reads any request: a
``preexec_fn`` is unsafe in a multithreaded parent such as a Ray actor, and the CPU
limit has to be re-armed between requests, which only the child knows the moment of.
"""

from __future__ import annotations

import ctypes
import dataclasses
import json
import logging
import math
import os
import re
import resource
import select
import signal
import struct
import subprocess
import sys
import threading
import time
import weakref
from collections.abc import Iterable, Mapping
from typing import Any

from mapo_ray.config import RewardConfig, from_dict
from mapo_ray.reward.contract import Graded, call_reward_fn
from mapo_ray.reward.functions import load_reward_fn

logger = logging.getLogger(__name__)

_HEADER = struct.Struct(">Q")
_PR_SET_PDEATHSIG = 1  # from <linux/prctl.h>

# A variable is withheld from the grading process when its name, upper-cased, contains one
# of these words, or has KEY as a whole "_"-separated word (API_KEY, AWS_ACCESS_KEY_ID,
# SSH_KEY_PATH), or starts with a cloud provider's prefix.
_SECRET_WORDS = ("TOKEN", "SECRET", "PASSWORD", "PASSWD", "PASSPHRASE", "CREDENTIAL", "PRIVATE", "AUTH", "APIKEY")
_SECRET_NAME = re.compile(
    "|".join(_SECRET_WORDS) + r"|(^|_)KEY(_|$)|^(AWS|AZURE|GCP|GCLOUD|GOOGLE|ALIBABA_CLOUD|OCI|DIGITALOCEAN)_"
)
# scheme://user:password@host: a proxy or database URL with a password in it.
_URL_WITH_PASSWORD = re.compile(r"://[^/@\s:]*:[^/@\s]+@")


class GraderStartError(RuntimeError):
    """The grading process could not start or load the reward function."""


class TimedGrader:
    """Grades ``(response, answer)`` pairs in a child process, each within
    ``config.grading_timeout_s`` seconds; safe to call from any thread.

    ``grade`` never raises for anything the reward function or its input does:
    errors, overruns (wall clock, CPU time, memory), NaN and a dead process all come
    back as a ``Graded`` failure; the process is replaced after an overrun, a memory
    failure or its death. It runs under the limits in the module docstring.

    A process killed from outside (SIGKILL or SIGTERM: an operator, the node's OOM
    killer) says nothing about the response, so that one grading is done again on a
    fresh process, within its own time limit, and marked ``regraded``; an input that
    kills it twice is a failure.
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
        graded, code = self._grade(response, answer)
        if code in (-signal.SIGKILL, -signal.SIGTERM):
            logger.warning("grading process killed by signal %d during a grading; grading it again", -code)
            graded, _ = self._grade(response, answer)
            graded = dataclasses.replace(graded, regraded=True)
        return graded

    def _grade(self, response: str, answer: str) -> tuple[Graded, int | None]:
        """One try: the outcome, and the process's exit code if it died during it."""
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
                return Graded.failed("timeout", f"grading took longer than {limit:g} s"), None
            except (EOFError, OSError):
                code = self._stop()
                return self._died(code), code
            graded = Graded(**reply)
            if graded.failure == "memory":
                # What ran out of memory may have left the process half-changed (a cache
                # filled part-way): the next grading gets a fresh one.
                self._stop()
        return graded, None

    def _died(self, code: int | None) -> Graded:
        """The failure of a grading whose process died with exit ``code``."""
        if code == -signal.SIGXCPU:
            cpu_s = self._config.grading_cpu_s
            return Graded.failed("cpu", f"grading used more than {cpu_s} s of CPU time (reward.grading_cpu_s)")
        memory_mb = self._config.grading_memory_mb
        if code == -signal.SIGABRT and memory_mb:
            # C code (GMP, for one) aborts when an allocation fails, where Python would
            # raise MemoryError; under an address-space limit that is the likely cause.
            return Graded.failed(
                "memory",
                f"grading process aborted (SIGABRT) under reward.grading_memory_mb={memory_mb}, "
                "most likely a failed allocation",
            )
        return Graded.failed("exception", f"grading process died (exit code {code})")

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
        # The child must import what this process can import, user reward modules included,
        # and must not see its secrets.
        env = grading_env(os.environ, self._config.grading_env_keep)
        env["PYTHONPATH"] = os.pathsep.join(p or os.getcwd() for p in sys.path)
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


def is_secret_name(name: str) -> bool:
    """Whether environment variable ``name`` looks like a secret the grading process must
    not see: its upper-cased name contains TOKEN, SECRET, PASSWORD, PASSWD, PASSPHRASE,
    CREDENTIAL, PRIVATE, AUTH or APIKEY, has KEY as a ``_``-separated word, or starts
    with AWS_, AZURE_, GCP_, GCLOUD_, GOOGLE_, ALIBABA_CLOUD_, OCI_ or DIGITALOCEAN_."""
    return _SECRET_NAME.search(name.upper()) is not None


def grading_env(environ: Mapping[str, str], keep: Iterable[str] = ()) -> dict[str, str]:
    """``environ`` without secrets: names ``is_secret_name`` flags and values that are URLs
    with a password, except the names in ``keep``. PATH, HOME, LANG, TMPDIR and the
    like are never flagged."""
    keep = set(keep)
    return {
        name: value
        for name, value in environ.items()
        if name in keep or not (is_secret_name(name) or _URL_WITH_PASSWORD.search(value))
    }


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
    config: RewardConfig | None = None
    try:
        config = from_dict(RewardConfig, _read_frame(requests, None)["config"])
        # Before the reward function loads, so that a limit too small for it fails here.
        _limit_memory(config.grading_memory_mb)
        signal.signal(signal.SIGXCPU, signal.SIG_DFL)  # the default action ends the process
        fn = load_reward_fn(config)
    except Exception as err:  # sent back and raised in the parent, with its message
        error = f"{type(err).__name__}: {err}"
        if MemoryError in (type(err), type(err.__cause__)) and config is not None:
            error += f" (under reward.grading_memory_mb={config.grading_memory_mb})"
        _write_frame(replies, {"kind": "start_error", "error": error}, None)
        return
    _write_frame(replies, {"kind": "ready"}, None)
    while True:
        try:
            request = _read_frame(requests, None)
        except EOFError:
            return  # the parent closed the pipe: shut down
        _arm_cpu_limit(config.grading_cpu_s)
        try:
            graded = call_reward_fn(fn, request["response"], request["answer"])
        except MemoryError:  # outside the reward function: checking or describing its result
            graded = Graded.failed("memory", "MemoryError while checking the reward function's result")
        _write_frame(replies, dataclasses.asdict(graded), None)


def _limit_memory(limit_mb: int | None) -> None:
    """Cap this process's address space at ``limit_mb`` MiB (None or 0: leave it)."""
    if not limit_mb:
        return
    _, hard = resource.getrlimit(resource.RLIMIT_AS)
    limit = limit_mb * 2**20 if hard == resource.RLIM_INFINITY else min(limit_mb * 2**20, hard)
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))  # the hard limit too: for good


def _arm_cpu_limit(limit_s: int | None) -> None:
    """Let the next grading use ``limit_s`` more CPU seconds (None or 0: no limit).

    ``RLIMIT_CPU`` counts the whole life of the process, in whole seconds, so the soft
    limit moves to the time used so far plus ``limit_s``, rounded up: a grading gets
    at least ``limit_s`` and less than one second more. The hard limit stays where it
    was, or the soft one could not be raised again for the next grading.
    """
    if not limit_s:
        return
    usage = resource.getrusage(resource.RUSAGE_SELF)
    soft = math.ceil(usage.ru_utime + usage.ru_stime + limit_s)
    _, hard = resource.getrlimit(resource.RLIMIT_CPU)
    resource.setrlimit(resource.RLIMIT_CPU, (soft if hard == resource.RLIM_INFINITY else min(soft, hard), hard))
