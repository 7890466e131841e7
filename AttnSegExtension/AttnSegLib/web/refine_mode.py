"""The web app's Refine step: a click on a slice view corrects the segmentation around it.

While the step is open, a left click in a slice view becomes a click of the chosen class at that point
(:mod:`AttnSegLib.refine`; ``background`` removes). The client sends only its mouse events (to the
view, as for any interaction) and a class name: the server reads the point from the view's own
slice geometry, and checks the class against the ones it offered, the point against the volume (and,
on a whole head, against the box of the class's side) and the number of clicks against
:data:`MAX_CLICKS`.

A click runs in three steps, as a segmentation does, through the segmentation's
:class:`~AttnSegLib.slicer_refine.SceneRefinement` (the Slicer panel's too: its arrays, clicks and undo
steps): :meth:`ClickRefinement.prepare` checks the click and brings the session's arrays up to date with
the scene (on the server loop, the scene's only thread), :meth:`ClickJob.run` refines on a worker
thread, :meth:`ClickRefinement.apply` writes the labels, class probabilities and uncertainty back into
the segmentation and its map nodes (on the server loop) and records the click in the segmentation's
``AttnSeg.Clicks`` attribute, which "Save as training case" keeps in ``case.json`` so training can
learn from real clicks.
"""
from __future__ import annotations

import json
import threading
from dataclasses import dataclass, field

from ..mrml import volumeGeometry
from ..package import PackageError
from ..refine import Click, ClickError, Refined, click_voxel
from ..refine_history import UndoStep
from ..slicer_logic import ATTRIBUTE
from ..slicer_refine import CLICKS_ATTRIBUTE, SceneArrays, SceneRefinement

# Per segmentation. Each click keeps its undo record: the 31 mm box around it, about 26 bytes a voxel with
# 5 classes (0.8 MB at 1 mm, 6 MB at 0.5 mm), so a session's undo records stay under 300 MB.
MAX_CLICKS = 50
BACKGROUND = "background"


def click_choices(classes: list[dict]) -> list[dict]:
    """The class selector's items: the result's foreground classes, then background (a removing click)."""
    return [{"title": c["name"], "value": c["name"]} for c in classes[1:]] + [
        {"title": "Background (remove)", "value": BACKGROUND}]


def view_point_lps(view) -> tuple[float, float, float]:
    """The LPS point (mm) under the last mouse event of a slice ``view`` (its slice node's XY-to-RAS)."""
    x, y = view.interactor().GetEventPosition()
    matrix = view.get_view_node().GetXYToRAS()
    r, a, s, _ = matrix.MultiplyPoint([float(x), float(y), 0.0, 1.0])
    return -r, -a, s


def clicks_text(segmentationNode) -> list[dict]:
    """The clicks recorded on ``segmentationNode``, for the page: number, class and position (R A S mm,
    as the views show)."""
    recorded = json.loads(segmentationNode.GetAttribute(CLICKS_ATTRIBUTE) or "[]")
    return [{"number": i + 1, "class": c["class"],
             "position": "R {:.1f} A {:.1f} S {:.1f} mm".format(-c["position_lps"][0], -c["position_lps"][1],
                                                                 c["position_lps"][2])}
            for i, c in enumerate(recorded)]


@dataclass
class ClickJob:
    """One click of a prepared session; :meth:`run` touches no MRML. :meth:`start` runs it on a (daemon)
    worker thread, as a segmentation runs; poll :meth:`done`, then :meth:`outcome`."""

    segmentationNode: object
    session: SceneRefinement
    arrays: SceneArrays
    click: Click
    _thread: threading.Thread | None = field(default=None, init=False, repr=False)
    _outcome: tuple | None = field(default=None, init=False, repr=False)
    _error: BaseException | None = field(default=None, init=False, repr=False)

    @property
    def refiner(self):
        return self.session.refiner()

    def start(self) -> "ClickJob":
        self._thread = threading.Thread(target=self._work, name="AttnSeg click", daemon=True)
        self._thread.start()
        return self

    def _work(self) -> None:
        try:
            self._outcome = self.run()
        except BaseException as error:  # handed to the server loop by outcome()
            self._error = error

    def done(self) -> bool:
        return self._thread is not None and not self._thread.is_alive()

    def outcome(self) -> tuple[Refined, UndoStep]:
        """(refined, undo step) of the finished job; re-raises the worker's error."""
        if self._error is not None:
            raise self._error
        return self._outcome

    def run(self) -> tuple[Refined, UndoStep]:
        """Refine the session's arrays in place (no other thread touches them meanwhile: one click at a
        time)."""
        return self.session.compute(self.click)


class ClickRefinement:
    """The clicks of one web session: a :class:`~AttnSegLib.slicer_refine.SceneRefinement` per
    segmentation (its refiner loaded once, its arrays kept, its undo steps)."""

    def __init__(self, logic, max_clicks: int = MAX_CLICKS):
        self.logic = logic
        self.max_clicks = max_clicks
        self._sessions: dict[str, SceneRefinement] = {}

    def session(self, segmentationNode, cardClassNames: list[str] | None = None) -> SceneRefinement:
        """The click session of ``segmentationNode``, made on its first click."""
        key = segmentationNode.GetID()
        if key not in self._sessions:
            self._sessions[key] = SceneRefinement(self.logic, segmentationNode, undoSteps=self.max_clicks,
                                                  cardClassNames=cardClassNames)
        return self._sessions[key]

    def prepare(self, segmentationNode, className, position_lps, cardClassNames: list[str]) -> ClickJob:
        """Check a click from the page (``className`` as the client sent it; the point the server read
        from the view) and bring the session's arrays up to date; ``cardClassNames``: the class names of
        the model card that made the result. :class:`ClickError` names what is wrong."""
        classes = json.loads(segmentationNode.GetAttribute(ATTRIBUTE + "Classes"))
        names = [c["name"] for c in classes]
        offered = names[1:] + [BACKGROUND]
        if not isinstance(className, str) or className not in offered:
            raise ClickError(f"choose a class from the list ({', '.join(offered)}) before clicking")
        session = self.session(segmentationNode, cardClassNames)
        recorded = len(json.loads(segmentationNode.GetAttribute(CLICKS_ATTRIBUTE) or "[]"))
        if recorded >= self.max_clicks:
            raise ClickError(f"this segmentation holds {recorded} clicks, the most it takes; save it, or undo "
                             "clicks, or paint in the Correct step")
        click = Click(tuple(float(v) for v in position_lps), 0 if className == BACKGROUND else names.index(className))
        click_voxel(click, volumeGeometry(self.logic.inputNodes(segmentationNode)[0]))  # outside: refused first
        try:
            arrays = session.prepare(click)
        except PackageError as err:
            raise ClickError(f"the refinement model cannot be loaded ({err}); segment again") from None
        return ClickJob(segmentationNode, session, arrays, click)

    def apply(self, job: ClickJob, refined: Refined, step: UndoStep) -> None:
        """Write a finished job back into the scene and record its click."""
        job.session.write(step)

    def undo(self, segmentationNode) -> None:
        """Put back what the last click of this session changed, and forget that click."""
        session = self._sessions.get(segmentationNode.GetID())
        if session is None:
            raise ClickError("no click to undo")
        session.undo()

    def discard(self, job: ClickJob) -> None:
        """A job failed part way through the session's arrays: the next click reads them again."""
        job.session.discard()

    def forget(self, segmentationNode) -> None:
        """A result left the screen: its session goes."""
        self._sessions.pop(segmentationNode.GetID(), None)
