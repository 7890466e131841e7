"""The web app's Refine step: a click on a slice view corrects the segmentation around it.

While the step is open, a left click in a slice view becomes a click of the chosen class at that point
(:mod:`AttnSegLib.refine`; ``background`` removes). The client sends only its mouse events (to the
view, as for any interaction) and a class name: the server reads the point from the view's own
slice geometry, and checks the class against the ones it offered, the point against the volume (and,
on a whole head, against the box of the class's side) and the number of clicks against
:data:`MAX_CLICKS`.

A click runs in three steps, as a segmentation does: :meth:`ClickRefinement.prepare` copies what the
refinement needs out of the scene (on the server loop, the scene's only thread), :meth:`ClickJob.run`
refines on a worker thread, :meth:`ClickRefinement.apply` writes the labels, class probabilities and uncertainty back into the
segmentation and its map nodes (on the server loop) and records the click in the segmentation's
``AttnSeg.Clicks`` attribute, which "Save as training case" keeps in ``case.json`` so training can
learn from real clicks. :class:`Undo` keeps what a click replaced, to put it back.
"""
from __future__ import annotations

import json
import threading
from dataclasses import dataclass, field

import numpy as np

from ..maps import normalized_entropy
from ..mrml import imageFromVolumeNode, volumeGeometry
from ..package import PackageError
from ..refine import (Click, ClickError, Neighbourhood, Refined, Refiner, check_localised_clicks, class_parts,
                      click_voxel)
from ..slicer_logic import ATTRIBUTE
from ..slicer_refine import (CLICKS_ATTRIBUTE, pasteVolume, readRefinementInputs, recordedClicks, refinerFor,
                             writeLabels)

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
class SceneArrays:
    """What a click reads and changes, copied out of the scene once per result and then owned by the
    session (a whole head's five probability volumes take seconds to copy: more than the click):
    ``images`` (M, D, H, W) float32, ``labels`` (an Image of (D, H, W) class values as the segments
    are), ``probabilities`` (C, D, H, W) float32 (background = 1 - the classes' maps), ``uncertainty``
    (D, H, W) float32 (recomputed when its map node was deleted), with the nodes they are written back
    to. ``segmentsStamp``: the segments' modification time when ``labels`` was last read or written."""

    classes: list[dict]
    images: np.ndarray
    labels: object  # Image
    probabilities: np.ndarray
    uncertainty: np.ndarray
    probabilityNodes: list
    uncertaintyNode: object
    segmentsStamp: int = 0

    @classmethod
    def read(cls, logic, segmentationNode) -> "SceneArrays":
        inputs = readRefinementInputs(logic, segmentationNode)
        uncertainty = (normalized_entropy(inputs.probabilities) if inputs.uncertaintyNode is None
                       else imageFromVolumeNode(inputs.uncertaintyNode).array.astype(np.float32))
        return cls(inputs.classes, inputs.images, inputs.labels, inputs.probabilities, uncertainty,
                   inputs.probabilityNodes, inputs.uncertaintyNode, segments_stamp(segmentationNode))

    def reread_labels_if_edited(self, logic, segmentationNode) -> None:
        """The user painted or erased since the labels were read: read them again (the maps only change
        through clicks)."""
        if segments_stamp(segmentationNode) != self.segmentsStamp:
            self.labels = logic.correctedLabels(segmentationNode)
            self.segmentsStamp = segments_stamp(segmentationNode)

    def write(self, segmentationNode, changed: np.ndarray, box: tuple[slice, slice, slice]) -> None:
        """The labels (when anything ``changed``), and the probabilities and uncertainty inside ``box``,
        back into the scene."""
        writeLabels(segmentationNode, self.labels, changed)
        self.segmentsStamp = segments_stamp(segmentationNode)
        for node, channel in zip(self.probabilityNodes, self.probabilities[1:]):
            pasteVolume(node, box, channel[box])
        if self.uncertaintyNode is not None:
            pasteVolume(self.uncertaintyNode, box, self.uncertainty[box])


def segments_stamp(segmentationNode) -> int:
    """The latest modification time of the segmentation and its segments' label maps: it moves when the
    user paints or erases."""
    segmentation = segmentationNode.GetSegmentation()
    source = segmentation.GetSourceRepresentationName()
    maps = [segmentation.GetNthSegment(i).GetRepresentation(source) for i in range(segmentation.GetNumberOfSegments())]
    return max([segmentation.GetMTime()] + [m.GetMTime() for m in maps if m is not None])


@dataclass
class Undo:
    """What one click replaced, inside the box around it that it may change: ``changed`` (d, h, w) bool
    and the labels, probabilities (C, d, h, w) and uncertainty there before it."""

    box: tuple[slice, slice, slice]
    changed: np.ndarray
    labels: np.ndarray
    probabilities: np.ndarray
    uncertainty: np.ndarray

    def restore(self, arrays: SceneArrays) -> np.ndarray:
        """Put the values back into ``arrays`` where the click changed them; returns the (D, H, W) mask of
        the voxels restored (all inside ``box``)."""
        box, changed = self.box, self.changed
        labels = arrays.labels.array
        labels[box] = np.where(changed, self.labels, labels[box])
        arrays.probabilities[(slice(None), *box)] = np.where(changed, self.probabilities,
                                                             arrays.probabilities[(slice(None), *box)])
        arrays.uncertainty[box] = np.where(changed, self.uncertainty, arrays.uncertainty[box])
        mask = np.zeros(labels.shape, dtype=bool)
        mask[box] = changed
        return mask


@dataclass
class ClickJob:
    """One click, with its inputs copied out of the scene; :meth:`run` touches no MRML. :meth:`start`
    runs it on a (daemon) worker thread, as a segmentation runs; poll :meth:`done`, then :meth:`outcome`."""

    segmentationNode: object
    refiner: Refiner
    arrays: SceneArrays
    click: Click
    history: list[Click]
    parts: np.ndarray | None
    _thread: threading.Thread | None = field(default=None, init=False, repr=False)
    _outcome: tuple | None = field(default=None, init=False, repr=False)
    _error: BaseException | None = field(default=None, init=False, repr=False)

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

    def outcome(self) -> tuple[Refined, "Undo"]:
        """(refined, undo) of the finished job; re-raises the worker's error."""
        if self._error is not None:
            raise self._error
        return self._outcome

    def run(self) -> tuple[Refined, Undo]:
        """Refine the session's arrays in place (no other thread touches them meanwhile: one click at a
        time), keeping what the box around the click held before, for undo."""
        arrays = self.arrays
        geometry = arrays.labels.geometry
        voxel = click_voxel(self.click, geometry)
        box = Neighbourhood.around(voxel, np.asarray(geometry.spacing, dtype=float)[::-1], arrays.labels.array.shape).box
        before = (arrays.labels.array[box].copy(), arrays.probabilities[(slice(None), *box)].copy(),
                  arrays.uncertainty[box].copy())
        labels = arrays.labels.array.astype(np.uint8, copy=False)
        refined = self.refiner.refine(arrays.images, arrays.probabilities, geometry, [self.click], self.history,
                                      arrays.uncertainty, labels, self.parts, in_place=True)
        arrays.labels = arrays.labels.with_array(refined.labels)
        return refined, Undo(box, refined.changed[box], *before)


class ClickRefinement:
    """The clicks of one session: a refiner per segmentation (loaded once), an undo record per click."""

    def __init__(self, logic, max_clicks: int = MAX_CLICKS):
        self.logic = logic
        self.max_clicks = max_clicks
        self._refiners: dict[str, Refiner] = {}
        self._arrays: dict[str, SceneArrays] = {}
        self._undo: dict[str, list[Undo]] = {}

    def prepare(self, segmentationNode, className, position_lps, cardClassNames: list[str]) -> ClickJob:
        """Check a click from the page (``className`` as the client sent it; the point the server read
        from the view) and copy its inputs out of the scene. :class:`ClickError` names what is wrong."""
        classes = json.loads(segmentationNode.GetAttribute(ATTRIBUTE + "Classes"))
        names = [c["name"] for c in classes]
        offered = names[1:] + [BACKGROUND]
        if not isinstance(className, str) or className not in offered:
            raise ClickError(f"choose a class from the list ({', '.join(offered)}) before clicking")
        history = recordedClicks(segmentationNode)
        if len(history) >= self.max_clicks:
            raise ClickError(f"this segmentation holds {len(history)} clicks, the most it takes; save it, or undo "
                             "clicks, or paint in the Correct step")
        click = Click(tuple(float(v) for v in position_lps), 0 if className == BACKGROUND else names.index(className))
        click_voxel(click, volumeGeometry(self.logic.inputNodes(segmentationNode)[0]))  # outside: refused first
        provenance = json.loads(segmentationNode.GetAttribute(ATTRIBUTE + "Provenance") or "{}")
        check_localised_clicks([click], classes, provenance, cardClassNames)
        arrays = self._session_arrays(segmentationNode)
        refiner = self._refiner(segmentationNode)
        parts = None
        if refiner.learned is not None:
            try:
                parts = class_parts(classes, refiner.learned.class_names)
            except ClickError:  # classes the network was not trained on: the random walker serves them
                refiner = Refiner("random_walker")
        return ClickJob(segmentationNode, refiner, arrays, click, history, parts)

    def _session_arrays(self, segmentationNode) -> SceneArrays:
        """The session's copy of what clicks change: read on the first click, the labels again after the
        user painted."""
        key = segmentationNode.GetID()
        if key not in self._arrays:
            self._arrays[key] = SceneArrays.read(self.logic, segmentationNode)
        else:
            self._arrays[key].reread_labels_if_edited(self.logic, segmentationNode)
        return self._arrays[key]

    def _refiner(self, segmentationNode) -> Refiner:
        key = segmentationNode.GetID()
        if key not in self._refiners:
            try:
                self._refiners[key] = refinerFor(segmentationNode)
            except PackageError as err:
                raise ClickError(f"the refinement model cannot be loaded ({err}); segment again") from None
        return self._refiners[key]

    def apply(self, job: ClickJob, refined: Refined, undo: Undo) -> None:
        """Write a finished job back into the scene, record its click and keep its undo record."""
        node = job.segmentationNode
        job.arrays.write(node, refined.changed, undo.box)
        record = json.loads(node.GetAttribute(CLICKS_ATTRIBUTE) or "[]")
        record.append({"position_lps": list(job.click.position_lps),
                       "class": job.arrays.classes[job.click.label]["name"]})
        node.SetAttribute(CLICKS_ATTRIBUTE, json.dumps(record))
        self._undo.setdefault(node.GetID(), []).append(undo)

    def undo(self, segmentationNode) -> None:
        """Put back what the last click of this session changed, and forget that click."""
        records = self._undo.get(segmentationNode.GetID())
        if not records:
            raise ClickError("no click to undo")
        arrays = self._session_arrays(segmentationNode)
        record = records.pop()
        arrays.write(segmentationNode, record.restore(arrays), record.box)
        recorded = json.loads(segmentationNode.GetAttribute(CLICKS_ATTRIBUTE) or "[]")
        segmentationNode.SetAttribute(CLICKS_ATTRIBUTE, json.dumps(recorded[:-1]))

    def discard(self, job: ClickJob) -> None:
        """A job failed part way through the session's arrays: the next click reads them again."""
        self._arrays.pop(job.segmentationNode.GetID(), None)

    def forget(self, segmentationNode) -> None:
        """A result left the screen: its refiner and undo records go."""
        key = segmentationNode.GetID()
        self._refiners.pop(key, None)
        self._arrays.pop(key, None)
        self._undo.pop(key, None)

