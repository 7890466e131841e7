"""The caller's side of :mod:`AttnSegLib.worker`: start the worker process, hand it a job, poll it.

Nothing here blocks or starts a thread: in 3D Slicer the widget polls from a QTimer on the main thread
(a Python thread would starve there, see :mod:`AttnSegLib.worker`), so the worker's stdout is read
without blocking (``os.set_blocking`` on POSIX; ``PeekNamedPipe`` on Windows, whose pipes cannot be
made non-blocking before Python 3.12). Cancel asks the worker to stop and kills it when it has not
stopped within ``CANCEL_GRACE_S``; a crashed or killed worker fails the run with one line saying what
happened, and the next run starts a fresh worker.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
import weakref
from pathlib import Path

from .errors import AttnSegError
from .image import Image
from .inference import Cancelled, Result
from .worker import geometryFromDict, geometryToDict, loadArray, saveArray

CANCEL_GRACE_S = 0.75  # a cancelled run has ended within a second, polled every 0.2 s
_LIB_PARENT = str(Path(__file__).resolve().parents[1])  # the folder holding AttnSegLib
_BOOTSTRAP = "import sys; sys.path.insert(0, sys.argv[1]); from AttnSegLib.worker import main; main()"


class WorkerError(AttnSegError, RuntimeError):
    """A run failed in the worker; the message is one line naming the problem."""


class WorkerCrashed(WorkerError):
    """The worker process ended in the middle of a run (crash, out-of-memory kill)."""


def workerCommand(python: str | None = None) -> list[str]:
    """The command that starts a worker with ``python`` (default: this interpreter)."""
    return [python or sys.executable, "-c", _BOOTSTRAP, _LIB_PARENT]


def _describeExit(code: int) -> str:
    if code < 0:
        try:
            name = signal.Signals(-code).name
        except ValueError:
            name = f"signal {-code}"
        if -code == getattr(signal, "SIGKILL", 9):
            return f"was killed ({name}; the system may have run out of memory)"
        return f"was stopped by {name}"
    if os.name == "nt" and code in (3221225477, -1073741819):  # STATUS_ACCESS_VIOLATION
        return "crashed (access violation)"
    return f"exited with code {code}"


class _NonBlockingReader:
    """Bytes a child wrote to a pipe so far, without waiting; ``None`` when nothing is there, ``b''`` at EOF."""

    def __init__(self, pipe):
        self._fd = pipe.fileno()
        if os.name != "nt":
            os.set_blocking(self._fd, False)

    def read(self) -> bytes | None:
        if os.name == "nt":
            import _winapi
            import msvcrt

            try:
                available = _winapi.PeekNamedPipe(msvcrt.get_osfhandle(self._fd), 0)[0]
            except (BrokenPipeError, OSError):
                return b""
            return os.read(self._fd, available) if available else None
        try:
            return os.read(self._fd, 1 << 16)
        except BlockingIOError:
            return None


class WorkerProcess:
    """One long-lived worker process (started on first use, restarted after a crash or a kill).

    ``command``: see :func:`workerCommand` (Slicer passes its ``PythonSlicer``); ``env``: its
    environment (Slicer passes its startup environment, as ``slicer.util.launchConsoleProcess`` does).
    """

    def __init__(self, command: list[str] | None = None, env: dict | None = None):
        self.command = list(command or workerCommand())
        self.env = env
        self._process: subprocess.Popen | None = None
        self._reader: _NonBlockingReader | None = None
        self._buffer = b""
        self._log = None

    @property
    def alive(self) -> bool:
        return self._process is not None and self._process.poll() is None

    @property
    def pid(self) -> int | None:
        return self._process.pid if self._process is not None else None

    def start(self) -> None:
        if self.alive:
            return
        self._close()
        self._log = tempfile.NamedTemporaryFile(prefix="attnseg-worker-", suffix=".log", delete=False)
        hidden = {}
        if os.name == "nt":  # no console window, as slicer.util.launchConsoleProcess does
            info = subprocess.STARTUPINFO()
            info.dwFlags, info.wShowWindow = subprocess.STARTF_USESHOWWINDOW, 0
            hidden = {"startupinfo": info}
        self._process = subprocess.Popen(self.command, env=self.env, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                         stderr=self._log, bufsize=0, **hidden)
        self._reader, self._buffer = _NonBlockingReader(self._process.stdout), b""

    def send(self, **message) -> None:
        """Write one request; a worker that has gone is reported by :meth:`messages` and :attr:`alive`."""
        try:
            self._process.stdin.write((json.dumps(message) + "\n").encode("utf-8"))
            self._process.stdin.flush()
        except (BrokenPipeError, OSError, AttributeError):
            pass

    def messages(self) -> list[dict]:
        """The complete protocol lines the worker has written since the last call (never waits)."""
        if self._reader is None:
            return []
        while True:
            chunk = self._reader.read()
            if not chunk:
                break
            self._buffer += chunk
        *lines, self._buffer = self._buffer.split(b"\n")
        out = []
        for line in lines:
            try:
                out.append(json.loads(line))
            except ValueError:
                out.append({"event": "error", "id": None, "kind": "ProtocolError",
                            "message": f"unreadable line from the worker: {line[:120]!r}"})
        return out

    def exitDescription(self) -> str:
        """One line on why the worker ended, with the last line it wrote to stderr."""
        code = self._process.poll() if self._process is not None else None
        text = "is not running" if code is None else _describeExit(code)
        last = ""
        if self._log is not None:
            self._log.flush()
            lines = Path(self._log.name).read_text(errors="replace").strip().splitlines()
            last = lines[-1].strip() if lines else ""
        return f"the segmentation worker {text}" + (f"; its last message: {last[:200]}" if last else "")

    def kill(self) -> None:
        if self.alive:
            self._process.kill()
            self._process.wait()

    def shutdown(self, timeout: float = 2.0) -> None:
        """Ask the worker to exit (it cancels a running job), kill it after ``timeout`` seconds."""
        if self.alive:
            self.send(op="shutdown")
            try:
                self._process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.kill()
        self._close()

    def _close(self) -> None:
        if self._process is not None:
            for stream in (self._process.stdin, self._process.stdout):
                if stream is not None:
                    stream.close()
        if self._log is not None:
            self._log.close()
            os.unlink(self._log.name)
        self._process = self._reader = self._log = None


class WorkerTask:
    """One :class:`AttnSegLib.segmentation_task.SegmentationJob` run by a :class:`WorkerProcess`.

    Same surface as :class:`AttnSegLib.segmentation_task.SegmentationTask`: ``start()``, ``cancel()``,
    ``progress``, ``done()``, ``result()``; reading ``progress`` or calling ``done()`` reads what the
    worker wrote so far. Inputs and outputs are ``.npy`` files in a temporary folder; the result's
    arrays are memory-mapped from it (read when the nodes are made), and :meth:`close` (or the task
    being garbage-collected) removes it.
    """

    def __init__(self, worker: WorkerProcess, job, cancelGrace: float = CANCEL_GRACE_S):
        self.job, self.worker, self.cancelGrace = job, worker, cancelGrace
        self.id = uuid.uuid4().hex
        self.device: str | None = None
        self.notices: list[str] = []
        self._progress: tuple[float, float | None, str] = (0.0, None, "starting")
        self._folder: Path | None = None
        self._removeFolder = lambda: None
        self._outcome: dict | None = None  # the worker's last message for this run, or one made here
        self._cancelDeadline: float | None = None

    def start(self) -> "WorkerTask":
        self._folder = Path(tempfile.mkdtemp(prefix="attnseg-run-"))
        self._removeFolder = weakref.finalize(self, shutil.rmtree, str(self._folder), True)
        inputs = [{"file": saveArray(image.array, self._folder / f"input_{i}.npy"),
                   "geometry": geometryToDict(image.geometry)} for i, image in enumerate(self.job.images)]
        self.worker.start()
        self.worker.send(op="segment", id=self.id, model=str(self.job.package.path), sha256=self.job.package.sha256,
                         device=self.job.device, inputs=inputs, output=str(self._folder / "output"),
                         roi=self.job.roi.as_dict() if self.job.roi is not None else None,
                         size_factor=self.job.size_factor)
        return self

    def cancel(self) -> None:
        if self._outcome is None and self._cancelDeadline is None:
            self.worker.send(op="cancel", id=self.id)
            self._cancelDeadline = time.monotonic() + self.cancelGrace

    @property
    def cancelRequested(self) -> bool:
        return self._cancelDeadline is not None

    @property
    def progress(self) -> tuple[float, float | None, str]:
        """(fraction done, ETA in seconds or None, stage)."""
        self._pump()
        return self._progress

    def done(self) -> bool:
        self._pump()
        return self._outcome is not None

    def wait(self, timeout: float | None = None, interval: float = 0.05) -> bool:
        """Poll until done or ``timeout`` seconds (for scripts and tests; a UI polls from its timer)."""
        end = None if timeout is None else time.monotonic() + timeout
        while not self.done() and (end is None or time.monotonic() < end):
            time.sleep(interval)
        return self.done()

    def result(self) -> Result:
        """The prediction read back from the worker's files; raises :class:`Cancelled`, :class:`WorkerError`
        (the worker's one-line message), :class:`WorkerCrashed`, or RuntimeError for a bug in the worker."""
        if not self.done():
            raise RuntimeError("the segmentation is still running; poll done() first")
        outcome = self._outcome
        if outcome["event"] == "cancelled":
            raise Cancelled()
        if outcome["event"] == "crashed":
            raise WorkerCrashed(outcome["message"])
        if outcome["event"] == "error":
            if outcome.get("internal"):  # a bug in the worker, not the user's input
                raise RuntimeError(outcome["message"])
            raise (MemoryError if outcome.get("kind") == "MemoryError" else WorkerError)(outcome["message"])
        geometry = geometryFromDict(outcome["geometry"])

        def mapped(path: str) -> Image:
            return Image(loadArray(path, mmap=True), geometry)

        return Result(labels=mapped(outcome["labels"]), probabilities=mapped(outcome["probabilities"]),
                      maps={name: mapped(path) for name, path in outcome["maps"].items()}, classes=outcome["classes"],
                      review_map_name=outcome["review_map_name"], timings=outcome["timings"],
                      provenance=outcome["provenance"], notices=outcome["notices"] + self.notices)

    def close(self) -> None:
        """Remove the run's files (once the result's nodes are made)."""
        self._removeFolder()

    def _pump(self) -> None:
        if self._outcome is not None:
            return
        for message in self.worker.messages():
            if message.get("id") not in (self.id, None) or message.get("event") == "ready":
                continue
            event = message.get("event")
            if event == "started":
                self.device = message.get("device")
            elif event == "progress":
                self._progress = (message["fraction"], message.get("eta_s"), message.get("stage", ""))
            elif event in ("result", "cancelled", "error"):
                self._finish(message)
                return
        if not self.worker.alive:
            self._finish({"event": "crashed", "message": self.worker.exitDescription()
                          + "; nothing was added to the scene; segment again (a smaller volume or the CPU "
                            "needs less memory)"})
        elif self._cancelDeadline is not None and time.monotonic() > self._cancelDeadline:
            self.worker.kill()  # it did not stop in time: a new worker starts with the next run
            self.notices.append(f"the worker did not stop within {self.cancelGrace:.2f} s and was restarted")
            self._finish({"event": "cancelled"})

    def _finish(self, outcome: dict) -> None:
        self._outcome = outcome
        if outcome["event"] == "result":
            self._progress = (1.0, 0.0, "done")
        else:
            self._removeFolder()
