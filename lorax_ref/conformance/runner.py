"""Where the candidate runs: a worker thread of this process (a function object) or a child process
(a target string), with a time limit per call."""
from __future__ import annotations

import contextlib
import ctypes
import os
import queue
import signal
import subprocess
import sys
import threading
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from ..errors import LoraxInputError
from .calling import CallError, Convention, _call_once, _CandidateTimeout, _candidate_name, _one_line, _parameters
from .loader import load_candidate
from .precision import LOAD_TIMEOUT
from .specs import SPECS


# ---------------------------------------------------------------------------------------------------
# Where the candidate runs: a worker thread (a function object) or a child process (a target string)
# ---------------------------------------------------------------------------------------------------


def _interrupt(thread: threading.Thread) -> None:
    """Best effort: raise _CandidateTimeout in ``thread`` (works between bytecodes, not inside C)."""
    ctypes.pythonapi.PyThreadState_SetAsyncExc(ctypes.c_ulong(thread.ident), ctypes.py_object(_CandidateTimeout))


class _Worker:
    """One persistent daemon thread that runs the candidate's calls, each with a time limit.

    Persistent because a thread per call costs a millisecond (torch sets up its thread state for each
    new thread) and hypothesis makes hundreds of calls. After a timeout the thread is abandoned.
    """

    def __init__(self):
        self._tasks: queue.Queue = queue.Queue()
        self._thread: threading.Thread | None = None

    @staticmethod
    def _loop(tasks: queue.Queue):
        while True:
            task = tasks.get()
            if task is None:
                return
            fn, box, done = task
            try:
                box["value"] = fn()
            except BaseException as exc:  # noqa: BLE001 — anything the candidate raises is a finding
                box["error"] = exc
            done.set()

    def run(self, fn: Callable[[], Any], timeout: float) -> tuple[str, Any]:
        """``("ok", value)``, ``("raised", exc)`` or ``("hung", None)``."""
        if self._thread is None:
            self._thread = threading.Thread(target=self._loop, args=(self._tasks,), name="lorax-conformance-candidate",
                                            daemon=True)
            self._thread.start()
        box: dict[str, Any] = {}
        done = threading.Event()
        self._tasks.put((fn, box, done))
        if not done.wait(timeout):
            _interrupt(self._thread)  # stops a pure-Python loop; a hang inside C code keeps the thread
            done.wait(0.2)
            self._tasks.put(None)  # if it ever comes back, it exits
            self._tasks, self._thread = queue.Queue(), None  # abandoned: a later run() starts a fresh one
            return "hung", None
        if "error" in box:
            return "raised", box["error"]
        return "ok", box.get("value")

    def close(self):
        if self._thread is not None:
            self._tasks.put(None)
            # Wait for it to finish: a thread still tearing down torch state while the interpreter exits
            # aborts the process ("terminate called without an active exception", ~3 % of runs under load).
            self._thread.join(timeout=10)
            self._thread = None


def _hung(timeout: float, how: str) -> CallError:
    return CallError("hung", f"hung: no result within {timeout:g} s (timeout); {how}, and calls it no more")


class _InProcess:
    """A function object, called in a :class:`_Worker` thread of this process."""

    def __init__(self, func: Callable):
        self.func, self.worker = func, _Worker()
        self.name = _candidate_name(func)
        self.parameters = _parameters(func)

    def call(self, spec: "Spec", convention: Convention, inputs: dict, kw: dict, timeout: float) -> list[np.ndarray] | CallError:
        status, value = self.worker.run(lambda: _call_once(self.func, spec, convention, inputs, kw), timeout)
        if status == "hung":
            return _hung(timeout, "the kit interrupted it where Python allows")
        if status == "raised":  # _call_once reports the candidate's own exceptions: this is the kit's interrupt
            return _hung(timeout, "stopped by the kit's timeout") if isinstance(value, _CandidateTimeout) else \
                CallError("raised", f"raised {type(value).__name__}: {_one_line(value)}")
        return value

    def close(self):
        self.worker.close()


_PACKAGE_ROOT = str(Path(__file__).resolve().parents[2])  # the folder that holds lorax_ref/
_CHILD = "import sys; from lorax_ref.conformance.runner import _serve; _serve()"


class _Subprocess:
    """A target ``"file.py:function"`` or ``"module:function"``, loaded and called in a child process.

    The child (:func:`_serve`) gets requests and sends replies over two pipes of its own; its standard
    output is this process's standard error, so nothing the candidate prints reaches the report or its
    JSON. A timeout kills the child; an exit of the child (``os._exit``, a crash, a signal) is a finding
    about the candidate. A later call, under another convention, starts a fresh child.
    """

    def __init__(self, target: str, load_timeout: float = LOAD_TIMEOUT):
        self.target, self.load_timeout = target, load_timeout
        self.proc: subprocess.Popen | None = None
        self._start()

    def _start(self):
        req_r, req_w = os.pipe()
        rep_r, rep_w = os.pipe()
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(p for p in (env.get("PYTHONPATH"), _PACKAGE_ROOT) if p)  # after the user's
        try:
            self.proc = subprocess.Popen([sys.executable, "-c", _CHILD, self.target, str(req_r), str(rep_w)],
                                         stdin=subprocess.DEVNULL, stdout=2, env=env,
                                         pass_fds=(req_r, rep_w))
        finally:
            os.close(req_r)
            os.close(rep_w)
        self.requests, self.replies = Connection(req_w, readable=False), Connection(rep_r, writable=False)
        reply = self._receive(self.load_timeout)
        if reply is None:
            self._end()
            raise LoraxInputError(f"{self.target}: loading the candidate took more than {self.load_timeout:g} s")
        if reply[0] == "ended":
            raise LoraxInputError(f"{self.target}: the candidate's process ended while loading it, with exit code "
                                  f"{self._end()} (an os._exit or a crash at import)")
        if reply[0] == "load-error":
            self._end()
            raise LoraxInputError(reply[1])
        _, self.name, self.parameters = reply

    def _receive(self, timeout: float):
        """The child's reply; None on timeout; ``("ended",)`` when the child is gone."""
        try:
            if not self.replies.poll(timeout):
                return None
            return self.replies.recv()
        except Exception:  # noqa: BLE001 — EOF (the child is gone) or a reply that does not unpickle
            return ("ended",)

    def _end(self) -> int | None:
        """Kill the child if it still runs; its exit code (None if it would not die)."""
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.kill()
        try:
            code = self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            code = None
        for conn in (self.requests, self.replies):
            conn.close()
        self.proc = None
        return code

    def call(self, spec: "Spec", convention: Convention, inputs: dict, kw: dict, timeout: float) -> list[np.ndarray] | CallError:
        if self.proc is None:  # the last child hung or ended: a fresh one for another convention
            try:
                self._start()
            except LoraxInputError as exc:
                return CallError("exited", f"could not be loaded again: {exc}")
        try:
            self.requests.send(("call", spec.label, convention.fields(), inputs, kw))
            reply = self._receive(timeout)
        except (OSError, ValueError):
            reply = ("ended",)
        if reply is None:
            self._end()
            return _hung(timeout, "the kit ended its process")
        if reply[0] == "ended":
            code = self._end()
            return CallError("exited", f"ended its process during the call (exit code {code}: os._exit, a crash or a "
                                       f"signal); the kit calls it no more")
        if reply[0] == "ok":
            return list(reply[1])
        return CallError(reply[1], reply[2])

    def close(self):
        if self.proc is not None:
            with contextlib.suppress(OSError, ValueError):
                self.requests.send(("quit",))
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(timeout=2)
            self._end()


def _die_with_parent() -> None:
    """Linux: SIGKILL this process when its parent dies, so a hung candidate never outlives the kit."""
    with contextlib.suppress(Exception):
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG = 1


def _serve() -> None:
    """The child process of :class:`_Subprocess`: load the candidate, then answer calls until told to quit.

    ``argv``: target, request fd, reply fd. Ctrl-C is left to the parent (which kills this process).
    """
    target = sys.argv[1]
    requests, replies = Connection(int(sys.argv[2]), writable=False), Connection(int(sys.argv[3]), readable=False)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    _die_with_parent()
    torch.set_num_threads(1)  # matrices of at most 16×16; see _single_threaded_torch
    try:
        func = load_candidate(target)
    except BaseException as exc:  # noqa: BLE001 — a load problem, reported by the parent as one line
        message = str(exc) if isinstance(exc, LoraxInputError) else f"{target}: {type(exc).__name__}: {_one_line(exc)}"
        replies.send(("load-error", message))
        os._exit(1)
    replies.send(("ready", _candidate_name(func), _parameters(func)))
    while True:
        try:
            request = requests.recv()
        except (EOFError, OSError):
            break
        if request[0] != "call":
            break
        _, label, fields, inputs, kw = request
        out = _call_once(func, SPECS[label], Convention(**fields), inputs, kw)
        replies.send(("error", out.kind, out.message) if isinstance(out, CallError) else ("ok", out))
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)  # no waiting for threads the candidate may have left running


@contextlib.contextmanager
def _single_threaded_torch():
    """torch intra-op threads = 1 while checking, restored afterwards.

    Every matrix of the kit is at most 16×16: parallel kernels only add synchronisation, and on a busy
    machine a parallel region waiting for a descheduled thread made one 32×32 call take ~0.9 s
    instead of 1 ms (measured on 2 shared cores).
    """
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)
