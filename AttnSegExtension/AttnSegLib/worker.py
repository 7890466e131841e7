"""The engine behind a line-delimited JSON protocol, run in a process of its own.

3D Slicer starts it with its own Python (``PythonSlicer``) through
:class:`AttnSegLib.worker_client.WorkerProcess`; it stays alive between runs with the last model
loaded. Slicer's PythonQt keeps the GIL while Qt's event loop idles, so a network on a Python thread
inside Slicer would advance only during the main thread's short Python calls; in a process of its own
it runs at full speed, can be cancelled at once (the caller kills it when it does not stop within the
grace time), and a crash or an out-of-memory kill leaves Slicer and its scene intact.

Protocol: one JSON object per line (UTF-8) on stdin and stdout; arrays travel as ``.npy`` files (read
with ``allow_pickle=False``) in a folder the caller owns, so no image passes through a pipe.

Caller -> worker::

    {"op": "segment", "id": str, "model": package path, "sha256": str, "device": "auto|cpu|cuda|mps",
     "inputs": [{"file": .npy (D, H, W), "geometry": GEOMETRY}, ...one per modality], "output": folder,
     "roi": null | BOX,                                    segment inside BOX only (else localise or whole)
     "size_factor": null | float}       with a BOX: sample it size-normalised (Predictor.predict's size_factor)
    {"op": "cancel", "id": str}
    {"op": "shutdown"}

Worker -> caller::

    {"event": "ready", "pid": int, "versions": {...}}
    {"event": "started", "id", "device": str}                      model loaded (or reused), inputs read
    {"event": "progress", "id", "fraction": 0..1, "eta_s": float | null, "stage": str}
    {"event": "result", "id", "geometry": GEOMETRY, "labels": .npy (D, H, W) uint8 or uint16,
     "probabilities": .npy (C, D, H, W) float32, "maps": {name: .npy (D, H, W) float32},
     "classes": [card class entries, per side for a localised whole head], "review_map_name": str,
     "timings": {...}, "provenance": {...}, "notices": [str]}
    {"event": "cancelled", "id"}
    {"event": "error", "id": str | null, "kind": exception class name, "message": one line,
     "internal": bool}                      internal: a programming error (traceback on the worker's stderr),
                                            not the user's input (an AttnSegError)

``GEOMETRY`` is :class:`AttnSegLib.image.Geometry` as ``{"size", "spacing", "origin", "direction"}``
(LPS, ITK order); ``BOX`` is :meth:`AttnSegLib.localise.Box.as_dict`. Anything a library prints goes to stderr: stdout carries the protocol only.
"""
from __future__ import annotations

import dataclasses
import json
import os
import queue
import sys
import threading
import time
import traceback
from pathlib import Path

import numpy as np

from .errors import AttnSegError
from .image import Geometry, Image

PROGRESS_INTERVAL_S = 0.1  # at most ~10 progress lines a second


def geometryToDict(geometry: Geometry) -> dict:
    return {k: list(v) for k, v in dataclasses.asdict(geometry).items()}


def geometryFromDict(values: dict) -> Geometry:
    return Geometry(tuple(int(v) for v in values["size"]), tuple(float(v) for v in values["spacing"]),
                    tuple(float(v) for v in values["origin"]), tuple(float(v) for v in values["direction"]))


def saveArray(array: np.ndarray, path: Path) -> str:
    np.save(path, np.ascontiguousarray(array), allow_pickle=False)
    return str(path)


def loadArray(path: str, mmap: bool = False) -> np.ndarray:
    """An array written by :func:`saveArray`; ``mmap``: memory-mapped, read only where it is used."""
    return np.load(path, mmap_mode="r" if mmap else None, allow_pickle=False)


def oneLine(error: BaseException, limit: int = 300) -> str:
    """An exception as one line: its message, else its class name."""
    text = " ".join(str(error).split()) or type(error).__name__
    return text if len(text) <= limit else text[:limit - 3] + "..."


class _Channel:
    """Writes protocol lines; the progress callback (the engine's thread) and the main loop share it."""

    def __init__(self, stream):
        self._stream = stream
        self._lock = threading.Lock()

    def send(self, **message) -> None:
        line = json.dumps(message, default=str) + "\n"
        with self._lock:
            self._stream.write(line.encode("utf-8"))
            self._stream.flush()


class _Requests:
    """Reads stdin on a thread: ``segment`` requests are queued, ``cancel`` sets the flag of the run it
    names (queued or running), ``shutdown`` and end of input stop the worker after cancelling."""

    def __init__(self, stream):
        self.queue: queue.Queue = queue.Queue()
        self._cancelled: set[str] = set()
        self._flags: dict[str, threading.Event] = {}
        self._lock = threading.Lock()
        self._stream = stream
        threading.Thread(target=self._read, name="AttnSeg worker stdin", daemon=True).start()

    def flag(self, requestId: str) -> threading.Event:
        with self._lock:
            event = self._flags.setdefault(requestId, threading.Event())
            if requestId in self._cancelled:
                event.set()
            return event

    def release(self, requestId: str) -> None:
        with self._lock:
            self._flags.pop(requestId, None)
            self._cancelled.discard(requestId)

    def _cancel(self, requestId) -> None:
        with self._lock:
            self._cancelled.add(requestId)
            targets = list(self._flags.values()) if requestId is None else [self._flags.get(requestId)]
        for event in targets:
            if event is not None:
                event.set()

    def _read(self) -> None:
        for raw in self._stream:
            try:
                message = json.loads(raw)
                op = message["op"]
            except (ValueError, KeyError, TypeError):
                self.queue.put({"op": "invalid", "line": raw[:200].decode("utf-8", "replace").strip()})
                continue
            if op == "cancel":
                self._cancel(message.get("id"))
            elif op == "shutdown":
                break
            else:
                self.queue.put(message)
        self._cancel(None)
        self.queue.put(None)


class Worker:
    """Serves requests one at a time, keeping the last model (one :class:`Predictor`) loaded."""

    def __init__(self, channel: _Channel, requests: _Requests):
        self.channel, self.requests = channel, requests
        self._predictor = None
        self._predictorKey: tuple | None = None

    def serve(self) -> None:
        from .inference import versions

        self.channel.send(event="ready", pid=os.getpid(), versions=versions())
        while True:
            request = self.requests.queue.get()
            if request is None:
                return
            if request.get("op") != "segment":
                problem = (f"unreadable request {request['line']!r}; send one JSON object per line"
                           if request.get("op") == "invalid" else f"unknown request {request.get('op')!r}")
                self.channel.send(event="error", id=request.get("id"), kind="ProtocolError", message=problem)
                continue
            requestId = str(request.get("id"))
            try:
                self._segment(requestId, request, self.requests.flag(requestId))
            finally:
                self.requests.release(requestId)

    def _predictorFor(self, model: str, sha256: str, device: str):
        from .inference import Predictor
        from .package import PackageError, load_package

        key = (model, sha256, device)
        if key != self._predictorKey:
            self._predictor = self._predictorKey = None  # free the old network before building the new one
            package = load_package(model)
            if sha256 and package.sha256 != sha256:
                raise PackageError(f"model package {model} changed since it was chosen (sha256 {package.sha256[:12]} "
                                   f"instead of {sha256[:12]}); choose the model again")
            self._predictor, self._predictorKey = Predictor(package, device=device), key
        return self._predictor

    def _segment(self, requestId: str, request: dict, cancel: threading.Event) -> None:
        from .inference import Cancelled
        from .localise import Box

        try:
            predictor = self._predictorFor(request["model"], request.get("sha256", ""), request.get("device", "auto"))
            images = [Image(loadArray(i["file"]), geometryFromDict(i["geometry"])) for i in request["inputs"]]
            self.channel.send(event="started", id=requestId, device=str(predictor.device))
            roi = Box.from_dict(request["roi"]) if request.get("roi") else None
            result = predictor.predict(images, progress=self._progress(requestId), cancel=cancel, roi=roi,
                                       size_factor=request.get("size_factor"))
            if cancel.is_set():
                raise Cancelled()
            self.channel.send(event="result", id=requestId, **_writeResult(result, Path(request["output"])))
        except Cancelled:
            self.channel.send(event="cancelled", id=requestId)
        except MemoryError as error:
            self._predictor = self._predictorKey = None
            self.channel.send(event="error", id=requestId, kind="MemoryError",
                              message=f"out of memory: {oneLine(error)}")
        except AttnSegError as error:  # the user's input or machine: one line to the caller
            self.channel.send(event="error", id=requestId, kind=type(error).__name__, message=oneLine(error))
        except Exception as error:  # a bug: its traceback to stderr, and the worker serves the next request
            traceback.print_exc()
            self.channel.send(event="error", id=requestId, kind=type(error).__name__, internal=True,
                              message=f"internal error ({type(error).__name__}: {oneLine(error)}); please report it")

    def _progress(self, requestId: str):
        last = [0.0, ""]

        def report(fraction: float, eta, stage: str) -> None:
            now = time.monotonic()
            if now - last[0] >= PROGRESS_INTERVAL_S or stage != last[1] or fraction >= 1.0:
                last[0], last[1] = now, stage
                self.channel.send(event="progress", id=requestId, fraction=float(fraction),
                                  eta_s=None if eta is None else float(eta), stage=stage)
        return report


def _writeResult(result, folder: Path) -> dict:
    """The prediction as .npy files in ``folder``; returns the ``result`` message's fields."""
    folder.mkdir(parents=True, exist_ok=True)
    maps = {name: saveArray(image.array.astype(np.float32, copy=False), folder / f"map_{index}.npy")
            for index, (name, image) in enumerate(result.maps.items())}
    return {"geometry": geometryToDict(result.labels.geometry),
            "labels": saveArray(result.labels.array, folder / "labels.npy"),
            "probabilities": saveArray(result.probabilities.array.astype(np.float32, copy=False),
                                       folder / "probabilities.npy"),
            "maps": maps, "classes": result.classes, "review_map_name": result.review_map_name,
            "timings": result.timings, "provenance": result.provenance, "notices": list(result.notices)}


def main() -> None:
    """Serve on this process's stdin/stdout; library output that would go to stdout goes to stderr."""
    protocol = os.fdopen(os.dup(sys.stdout.fileno()), "wb", buffering=0)
    sys.stdout.flush()
    os.dup2(sys.stderr.fileno(), sys.stdout.fileno())
    Worker(_Channel(protocol), _Requests(sys.stdin.buffer)).serve()


if __name__ == "__main__":
    main()
