"""Running a :class:`SegmentationJob` (inputs already copied out of MRML) on a worker thread.

:meth:`AttnSegLib.slicer_logic.SceneLogic.prepare` makes the job on the scene's thread; the network
touches no MRML; the result goes back to :meth:`~AttnSegLib.slicer_logic.SceneLogic.addResult` on the
scene's thread. In 3D Slicer the job runs in a worker process instead
(:class:`AttnSegLib.worker_client.WorkerTask`).
"""
from __future__ import annotations

import threading
from dataclasses import dataclass

from .image import Image
from .inference import Predictor, Result
from .localise import Box
from .package import ModelPackage


@dataclass
class SegmentationJob:
    """Inputs copied out of MRML by :meth:`SceneLogic.prepare`; :meth:`run` touches no MRML.

    ``images``: one (D, H, W) :class:`Image` per modality, in the card's order. ``roi`` and
    ``size_factor``: as :meth:`Predictor.predict` takes them. ``predictor`` is made
    for runs in this process only; a worker process (:class:`~AttnSegLib.worker_client.WorkerTask`)
    builds its own from ``package`` and ``device``.
    """

    package: ModelPackage
    images: list[Image]
    inputNodeIDs: list[str]
    device: str = "auto"
    predictor: Predictor | None = None
    roi: Box | None = None
    size_factor: float | None = None

    def run(self, progress=None, cancel=None) -> Result:
        """The engine's prediction; ``progress(fraction, eta_seconds, stage)``; ``cancel.is_set()``
        makes it raise :class:`Cancelled`."""
        if self.predictor is None:
            raise RuntimeError("this job was prepared for the worker process (inProcess=False); "
                               "run it with SceneLogic.startTask")
        return self.predictor.predict(self.images, progress=progress, cancel=cancel, roi=self.roi,
                                      size_factor=self.size_factor)


class SegmentationTask:
    """Runs a :class:`SegmentationJob` on a worker thread; poll :attr:`progress` and :meth:`done` from
    the UI thread (Slicer: a QTimer; trame: the server loop), then hand :meth:`result` to
    :meth:`SceneLogic.addResult` on the UI thread."""

    def __init__(self, job: SegmentationJob):
        self.job = job
        self._cancel = threading.Event()
        self._lock = threading.Lock()
        self._progress: tuple[float, float | None, str] = (0.0, None, "starting")
        self._result: Result | None = None
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._work, name="AttnSeg segmentation", daemon=True)

    def start(self) -> "SegmentationTask":
        self._thread.start()
        return self

    def cancel(self) -> None:
        self._cancel.set()

    @property
    def cancelRequested(self) -> bool:
        return self._cancel.is_set()

    @property
    def progress(self) -> tuple[float, float | None, str]:
        """(fraction done, ETA in seconds or None, stage)."""
        with self._lock:
            return self._progress

    def done(self) -> bool:
        return not self._thread.is_alive() and (self._result is not None or self._error is not None)

    def wait(self, timeout: float | None = None) -> bool:
        self._thread.join(timeout)
        return self.done()

    def result(self) -> Result:
        """The prediction; re-raises the worker's error (:class:`Cancelled` when cancelled)."""
        if not self.done():
            raise RuntimeError("the segmentation is still running; poll done() first")
        if self._error is not None:
            raise self._error
        return self._result

    def _report(self, fraction: float, eta: float | None, stage: str) -> None:
        with self._lock:
            self._progress = (fraction, eta, stage)

    def _work(self) -> None:
        try:
            self._result = self.job.run(progress=self._report, cancel=self._cancel)
            self._report(1.0, 0.0, "done")
        except BaseException as error:  # handed to the UI thread by result()
            self._error = error
