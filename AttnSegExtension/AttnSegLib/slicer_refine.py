"""Click refinement of an AttnSeg segmentation in the MRML scene (Slicer, trame-slicer, slicer-core).

:func:`refineSegmentation` reads what :class:`~AttnSegLib.slicer_logic.SceneLogic` put in the scene
(the input volumes, the ``probability.<class>`` and ``uncertainty`` map nodes, the segments as the user
left them), applies clicks with :class:`~AttnSegLib.refine.Refiner`, writes the refined labels, class
probabilities and uncertainty back into the same nodes, and appends the clicks to the segmentation's
``AttnSeg.Clicks`` attribute (a JSON list of ``{"position_lps": [x, y, z], "class": name}``, the form
``attnseg refine`` records), which ``exportCorrection`` saves in ``case.json``. Earlier clicks in that
attribute are the history each new click sees.

:class:`SceneRefinement` is one segmentation's click session, shared by both front ends: the scene's
arrays copied where clicks reach and kept, the clicks and undo steps (:mod:`AttnSegLib.refine_history`),
the click checks ``attnseg refine`` makes (outside the image; on a localised whole head, outside the
class's box), and each click written back into the nodes (the maps inside the click's box only). The front ends
(markups placement in the Slicer panel, a refine mode in the web app) only turn a placed point into a
:class:`~AttnSegLib.refine.Click` and show what it did.

:class:`ClickRefinement` is the Slicer panel's refinement of one segmentation, without GUI: per class one
markups point list for adding and one for removing (made on demand, named and coloured by the class,
referenced by the segmentation), placement into them through the scene's selection and interaction nodes
(as the Markups module's place widget does), each newly placed point refined at once on the scene's
thread (the lists are observed), and a bounded undo stack.
"""
from __future__ import annotations

import json
import time
from dataclasses import dataclass

import numpy as np
import slicer
from vtkmodules.util import numpy_support
from vtkmodules.vtkCommonCore import reference as vtkReference

from .errors import AttnSegError
from .image import Image
from .inference import fill_background
from .maps import normalized_entropy, volume_name
from .mrml import classColor, imageFromVolumeNode, orientedMask, volumeGeometry
from .package import PackageError, load_package
from .refine import (Click, ClickError, Refined, Refiner, check_localised_clicks, class_index, class_parts,
                     click_voxel, find_refinement_package)
from .refine_history import UNDO_STEPS, ClickHistory, UndoStep
from .slicer_logic import ATTRIBUTE, CLASS_VALUE_TAG, REF_SEGMENTATION

CLICKS_ATTRIBUTE = ATTRIBUTE + "Clicks"
REF_POINT_LIST = "AttnSegClickPoints"       # segmentation -> its click point lists
POINT_CLASS_ATTRIBUTE = ATTRIBUTE + "ClickClass"    # a point list's class name
POINT_ACTION_ATTRIBUTE = ATTRIBUTE + "ClickAction"  # a point list's action: ADD or REMOVE
ADD, REMOVE = "add", "remove"
ACTIONS = (ADD, REMOVE)
GLYPHS = {ADD: "ThickCross2D", REMOVE: "Dash2D"}  # "+" and "-" in the views, in the class's colour


def recordedClicks(segmentationNode) -> list[Click]:
    """The clicks already applied to ``segmentationNode`` (its ``AttnSeg.Clicks`` attribute)."""
    names = [c["name"] for c in json.loads(segmentationNode.GetAttribute(ATTRIBUTE + "Classes"))]
    return [Click(tuple(float(v) for v in c["position_lps"]), class_index(c["class"], names))
            for c in json.loads(segmentationNode.GetAttribute(CLICKS_ATTRIBUTE) or "[]")]


def refinerFor(segmentationNode, method: str | None = None) -> Refiner:
    """The learned refiner when a refinement package matches the segmentation's model (and ``method``
    is None or ``learned``); else the random walker (or the named ``method``)."""
    refinement = None
    if method in (None, "learned"):
        try:
            refinement = find_refinement_package(load_package(segmentationNode.GetAttribute(ATTRIBUTE + "Model")).card)
        except PackageError:
            refinement = None
    if method is None:
        method = "learned" if refinement is not None else "random_walker"
    return Refiner(method, refinement)


def refineSegmentation(logic, segmentationNode, clicks: list[Click], refiner: Refiner | None = None) -> Refined:
    """Apply ``clicks`` to ``segmentationNode`` (an AttnSeg segmentation of ``logic``'s scene) in place.

    Starts from the segments as they are now (the user's own edits included) and the probability and
    uncertainty maps; a click outside the image raises :class:`~AttnSegLib.refine.ClickError` and changes
    nothing. Returns the :class:`~AttnSegLib.refine.Refined` (its ``changed`` mask says what moved).
    """
    inputs = readRefinementInputs(logic, segmentationNode)
    classes, labels, probabilities = inputs.classes, inputs.labels, inputs.probabilities
    uncertainty = None if inputs.uncertaintyNode is None else imageFromVolumeNode(inputs.uncertaintyNode).array
    refiner, parts = refinerAndParts(refiner or refinerFor(segmentationNode), classes)
    refined = refiner.refine(inputs.images, probabilities, labels.geometry, clicks, recordedClicks(segmentationNode),
                             uncertainty, labels.array, parts)
    writeLabels(segmentationNode, labels.with_array(refined.labels), refined.changed | (refined.labels != labels.array))
    for node, channel in zip(inputs.probabilityNodes, refined.probabilities[1:]):
        _writeVolume(node, channel)
    if inputs.uncertaintyNode is not None:
        _writeVolume(inputs.uncertaintyNode, refined.uncertainty)
    recordClicks(segmentationNode, recordedClicks(segmentationNode) + list(clicks), classes)
    return refined


def refinerAndParts(refiner: Refiner, classes: list[dict]) -> tuple[Refiner, np.ndarray | None]:
    """The refiner for a result of ``classes``, with their refinement-network classes (see
    :func:`~AttnSegLib.refine.class_parts`): a learned refiner whose network does not know the classes
    gives way to the random walker."""
    if refiner.learned is None:
        return refiner, None
    try:
        return refiner, class_parts(classes, refiner.learned.class_names)
    except ClickError:
        return Refiner("random_walker"), None


def recordClicks(segmentationNode, clicks: list[Click], classes: list[dict]) -> None:
    """Set the segmentation's ``AttnSeg.Clicks`` attribute to ``clicks`` (removed when there are none)."""
    if not clicks:
        segmentationNode.RemoveAttribute(CLICKS_ATTRIBUTE)
        return
    segmentationNode.SetAttribute(CLICKS_ATTRIBUTE, json.dumps(
        [{"position_lps": list(c.position_lps), "class": classes[c.label]["name"]} for c in clicks]))


def modelClassNames(segmentationNode) -> list[str]:
    """The class names of the model card that made ``segmentationNode`` (the parts a localised result's
    classes are copies of); :class:`ClickError` when the model is no longer installed."""
    try:
        return load_package(segmentationNode.GetAttribute(ATTRIBUTE + "Model")).card.class_names
    except PackageError as err:
        raise ClickError(f"the model of this segmentation cannot be loaded ({err}); segment again") from None


def checkClick(logic, segmentationNode, click: Click, cardClassNames: list[str]) -> None:
    """Refuse (:class:`ClickError`, one line) a click outside the input volume, or, on a localised whole
    head, a click of a target's class outside that target's box (see
    :func:`~AttnSegLib.refine.check_localised_clicks`), as ``attnseg refine`` does."""
    click_voxel(click, volumeGeometry(logic.inputNodes(segmentationNode)[0]))
    classes = json.loads(segmentationNode.GetAttribute(ATTRIBUTE + "Classes"))
    provenance = json.loads(segmentationNode.GetAttribute(ATTRIBUTE + "Provenance") or "{}")
    check_localised_clicks([click], classes, provenance, cardClassNames)


@dataclass
class RefinementInputs:
    """What a refinement reads from the scene: ``classes`` (the result's class list), ``images``
    (M, D, H, W) float32, ``labels`` (an Image of (D, H, W) class values as the segments are now),
    ``probabilities`` (C, D, H, W) float32 (background = 1 - the classes' maps), and the nodes they are
    written back to: ``probabilityNodes`` (one per foreground class), ``uncertaintyNode`` (None when
    its map was deleted)."""

    classes: list[dict]
    images: np.ndarray
    labels: Image
    probabilities: np.ndarray
    probabilityNodes: list
    uncertaintyNode: object


def readRefinementInputs(logic, segmentationNode) -> RefinementInputs:
    """Copy a refinement's inputs out of the scene; a deleted probability map or inputs off the
    segmentation's grid raise :class:`~AttnSegLib.refine.ClickError` (one line, with the fix)."""
    classes = json.loads(segmentationNode.GetAttribute(ATTRIBUTE + "Classes"))
    probabilityNodes = _probabilityNodes(logic, segmentationNode)
    labels = logic.correctedLabels(segmentationNode)
    images = [imageFromVolumeNode(n) for n in logic.inputNodes(segmentationNode)]
    if any(img.array.shape != labels.array.shape for img in images):
        raise ClickError("the input volumes are not on the segmentation's grid (a region was segmented); "
                         "segment the whole volume to refine with clicks")
    probabilities = np.empty((len(classes), *labels.array.shape), dtype=np.float32)  # filled without copies
    for channel, node in zip(probabilities[1:], probabilityNodes):
        channel[...] = imageFromVolumeNode(node).array
    fill_background(probabilities)
    stacked = np.empty((len(images), *labels.array.shape), dtype=np.float32)
    for channel, img in zip(stacked, images):
        channel[...] = img.array
    return RefinementInputs(classes, stacked, labels, probabilities, probabilityNodes,
                            logic.mapNodes(segmentationNode).get("uncertainty"))


BLOCK_VOXELS = 16  # SceneArrays copies the scene's volumes in cubes of this edge, as clicks first reach them


@dataclass
class SceneArrays:
    """What clicks read and change, owned by a :class:`SceneRefinement`: ``images`` (M, D, H, W) float32,
    ``labels`` (an Image of (D, H, W) uint8 class values as the segments are), ``probabilities``
    (C, D, H, W) float32 (background = 1 - the classes' maps), ``uncertainty`` (D, H, W) float32
    (recomputed when its map node was deleted), with the nodes they come from and are written back to;
    ``segmentsStamp`` and ``mapsStamp``: the nodes' modification times when last read or written, to
    notice changes made outside the session.

    The labels are read whole (a click writes whole segments). The images and maps are copied out of
    the scene only where clicks reach (:meth:`fill`, in cubes of :data:`BLOCK_VOXELS`, each once): a
    click reads a few centimetres around it, while copying a whole head's five probability volumes
    takes longer than the click. ``filled`` (ceil(D/B), ceil(H/B), ceil(W/B)) bool marks the cubes
    copied; the arrays hold nothing meaningful elsewhere."""

    classes: list[dict]
    images: np.ndarray
    labels: Image
    probabilities: np.ndarray
    uncertainty: np.ndarray
    inputNodes: list
    probabilityNodes: list
    uncertaintyNode: object
    filled: np.ndarray
    segmentsStamp: int = 0
    mapsStamp: int = 0

    @classmethod
    def read(cls, logic, segmentationNode) -> "SceneArrays":
        """The labels read and the other arrays allocated (nothing of them copied yet); a deleted
        probability map or inputs off the segmentation's grid raise :class:`~AttnSegLib.refine.ClickError`
        (one line, with the fix)."""
        classes = json.loads(segmentationNode.GetAttribute(ATTRIBUTE + "Classes"))
        probabilityNodes = _probabilityNodes(logic, segmentationNode)
        labels = logic.correctedLabels(segmentationNode)
        shape = labels.array.shape
        inputNodes = logic.inputNodes(segmentationNode)
        if any(tuple(reversed(n.GetImageData().GetDimensions())) != shape for n in inputNodes):
            raise ClickError("the input volumes are not on the segmentation's grid (a region was segmented); "
                             "segment the whole volume to refine with clicks")
        arrays = cls(classes, np.empty((len(inputNodes), *shape), dtype=np.float32),
                     labels.with_array(labels.array.astype(np.uint8, copy=False)),
                     np.empty((len(classes), *shape), dtype=np.float32), np.empty(shape, dtype=np.float32),
                     inputNodes, probabilityNodes, logic.mapNodes(segmentationNode).get("uncertainty"),
                     np.zeros([-(-n // BLOCK_VOXELS) for n in shape], dtype=bool))
        arrays._stamp(segmentationNode)
        return arrays

    def fill(self, box: tuple[slice, slice, slice]) -> None:
        """Copy the cubes that ``box`` (array slices, (D, H, W)) touches out of the scene, those not
        copied before (the scene's thread: it reads the nodes' voxels)."""
        blocks = tuple(slice(s.start // BLOCK_VOXELS, -(-s.stop // BLOCK_VOXELS)) for s in box)
        missing = np.argwhere(~self.filled[blocks]) + [b.start for b in blocks]
        if not len(missing):
            return
        images = [nodeVoxels(n) for n in self.inputNodes]
        maps = [nodeVoxels(n) for n in self.probabilityNodes]
        uncertainty = None if self.uncertaintyNode is None else nodeVoxels(self.uncertaintyNode)
        for block in missing:
            cube = tuple(slice(i * BLOCK_VOXELS, (i + 1) * BLOCK_VOXELS) for i in block)
            for channel, source in zip(self.images, images):
                channel[cube] = source[cube]
            probabilities = self.probabilities[(slice(None), *cube)]
            for channel, source in zip(probabilities[1:], maps):
                channel[...] = source[cube]
            fill_background(probabilities)
            self.uncertainty[cube] = normalized_entropy(probabilities) if uncertainty is None else uncertainty[cube]
            self.filled[tuple(block)] = True

    def _mapNodes(self) -> list:
        return [n for n in [*self.probabilityNodes, self.uncertaintyNode] if n is not None]

    def _stamp(self, segmentationNode) -> None:
        self.segmentsStamp = segmentsStamp(segmentationNode)
        self.mapsStamp = max(max(n.GetMTime(), n.GetImageData().GetMTime()) for n in self._mapNodes())

    def mapsChanged(self, logic, segmentationNode) -> bool:
        """A map was replaced, deleted or written outside the session since it was read."""
        maps = logic.mapNodes(segmentationNode)
        nodes = [maps.get(f"probability.{volume_name(c['name'])}") for c in self.classes[1:]]
        return (nodes != self.probabilityNodes or maps.get("uncertainty") is not self.uncertaintyNode
                or any(n.GetImageData() is None for n in self._mapNodes())
                or max(max(n.GetMTime(), n.GetImageData().GetMTime()) for n in self._mapNodes()) != self.mapsStamp)

    def rereadLabelsIfEdited(self, logic, segmentationNode) -> None:
        """The user painted or erased since the labels were read: read them again (the maps only change
        through clicks)."""
        if segmentsStamp(segmentationNode) != self.segmentsStamp:
            labels = logic.correctedLabels(segmentationNode)
            self.labels = labels.with_array(labels.array.astype(np.uint8, copy=False))
            self.segmentsStamp = segmentsStamp(segmentationNode)

    def write(self, segmentationNode, step: UndoStep) -> None:
        """What ``step``'s click (or its undo) changed back into the scene: the segments of the classes
        its changed voxels held before or hold now, and the probabilities and uncertainty inside its box."""
        box, changed = step.box, step.changed
        values = np.union1d(step.labels[changed], self.labels.array[box][changed])
        writeLabels(segmentationNode, self.labels, step.mask(self.labels.array.shape), values[values > 0])
        for node, channel in zip(self.probabilityNodes, self.probabilities[1:]):
            pasteVolume(node, box, channel[box])
        if self.uncertaintyNode is not None:
            pasteVolume(self.uncertaintyNode, box, self.uncertainty[box])
        # the background as the scene holds it (1 - the classes' maps), not as the update left it (off by
        # float rounding): the next click then reads what refineSegmentation would read
        fill_background(self.probabilities[(slice(None), *box)])
        self._stamp(segmentationNode)


def segmentsStamp(segmentationNode) -> int:
    """The latest modification time of the segmentation and its segments' label maps: it moves when the
    user paints or erases."""
    segmentation = segmentationNode.GetSegmentation()
    source = segmentation.GetSourceRepresentationName()
    maps = [segmentation.GetNthSegment(i).GetRepresentation(source) for i in range(segmentation.GetNumberOfSegments())]
    return max([segmentation.GetMTime()] + [m.GetMTime() for m in maps if m is not None])


class SceneRefinement:
    """The click refinement of one AttnSeg segmentation in the scene, shared by the Slicer panel and the
    web Refine step: its arrays (:class:`SceneArrays`, read on the first click or :meth:`load`, copied
    out of the scene where clicks reach), its clicks and undo (:class:`~AttnSegLib.refine_history.ClickHistory`,
    starting from the clicks already recorded) and its refiner (loaded once). ``cardClassNames``: the
    class names of the model card that made the result (read from its package when not given).

    :meth:`prepare` (scene thread) checks a click and brings the arrays up to date around it,
    :meth:`compute` (any thread: no MRML) refines them, :meth:`write` (scene thread) puts the result into the nodes and
    records the clicks; :meth:`click` does the three in a row. Maps changed outside the session (a
    refinement through :func:`refineSegmentation`, a map replaced) start it afresh: everything read
    again, its undo steps dropped.
    """

    def __init__(self, logic, segmentationNode, refiner: Refiner | None = None, undoSteps: int = UNDO_STEPS,
                 cardClassNames: list[str] | None = None):
        self.logic = logic
        self.segmentationNode = segmentationNode
        self.undoSteps = undoSteps
        self._refiner = refiner
        self._parts: np.ndarray | None = None
        self._resolved = False
        self._arrays: SceneArrays | None = None
        self.history = ClickHistory(recordedClicks(segmentationNode), undoSteps)
        self._cardClassNames = cardClassNames

    @property
    def arrays(self) -> SceneArrays | None:
        """The arrays as read so far (None before :meth:`load` or the first click)."""
        return self._arrays

    def refiner(self) -> Refiner:
        """The update the clicks use (see :func:`refinerFor`, :func:`refinerAndParts`), loaded once."""
        if not self._resolved:
            classes = json.loads(self.segmentationNode.GetAttribute(ATTRIBUTE + "Classes"))
            self._refiner, self._parts = refinerAndParts(self._refiner or refinerFor(self.segmentationNode), classes)
            self._resolved = True
        return self._refiner

    def cardClassNames(self) -> list[str]:
        """The class names of the model card that made the result (given, or read from its package)."""
        if self._cardClassNames is None:
            self._cardClassNames = modelClassNames(self.segmentationNode)
        return self._cardClassNames

    def prepare(self, click: Click) -> SceneArrays:
        """Check ``click`` (:func:`checkClick`) and bring the session's arrays up to date with the scene,
        copied out of it where the click reads (:meth:`~AttnSegLib.refine.Refiner.reach`)."""
        checkClick(self.logic, self.segmentationNode, click, self.cardClassNames())
        refiner = self.refiner()
        if self._arrays is not None and self._arrays.mapsChanged(self.logic, self.segmentationNode):
            self._arrays = None
            self.history = ClickHistory(recordedClicks(self.segmentationNode), self.undoSteps)
        if self._arrays is None:
            self._arrays = SceneArrays.read(self.logic, self.segmentationNode)
        else:
            self._arrays.rereadLabelsIfEdited(self.logic, self.segmentationNode)
        labels = self._arrays.labels
        self._arrays.fill(refiner.reach(click_voxel(click, labels.geometry), labels.geometry, labels.array.shape))
        return self._arrays

    def load(self) -> None:
        """Load the refiner and read the labels now (scene thread; e.g. when a result is shown), so the
        first click costs what the others cost; then :meth:`warmUp` may run on another thread."""
        self.refiner()
        if self._arrays is None:
            self._arrays = SceneArrays.read(self.logic, self.segmentationNode)

    def warmUp(self) -> None:
        """After :meth:`load`: the refiner's first runs (see :meth:`~AttnSegLib.refine.Refiner.warm_up`),
        slower than the later ones, done now (no MRML: any thread)."""
        self.refiner().warm_up()

    def compute(self, click: Click, tag: object = None) -> tuple[Refined, UndoStep]:
        """Refine the prepared arrays with ``click`` in place (no MRML: a worker thread may run it)."""
        arrays = self._arrays
        return self.history.apply(self.refiner(), arrays.images, arrays.probabilities, arrays.labels.array,
                                  arrays.uncertainty, arrays.labels.geometry, click, self._parts, tag)

    def write(self, step: UndoStep) -> None:
        """Write what ``step``'s click changed into the scene and record the clicks."""
        self._arrays.write(self.segmentationNode, step)
        recordClicks(self.segmentationNode, self.history.clicks, self._arrays.classes)

    def click(self, click: Click, tag: object = None) -> tuple[Refined, UndoStep]:
        """:meth:`prepare`, :meth:`compute` and :meth:`write` in a row."""
        self.prepare(click)
        refined, step = self.compute(click, tag)
        self.write(step)
        return refined, step

    def undo(self) -> UndoStep:
        """Put back what the newest click of the session changed (in the scene too) and forget it;
        :class:`ClickError` when there is none."""
        if not self.history.undo_steps:
            raise ClickError("no click to undo")
        arrays = self._arrays
        if arrays.mapsChanged(self.logic, self.segmentationNode):
            self.discard()
            raise ClickError("the maps changed since the last click; it can no longer be undone")
        arrays.rereadLabelsIfEdited(self.logic, self.segmentationNode)
        step = self.history.undo(arrays.probabilities, arrays.labels.array, arrays.uncertainty)
        arrays.write(self.segmentationNode, step)
        recordClicks(self.segmentationNode, self.history.clicks, arrays.classes)
        return step

    def discard(self) -> None:
        """A computation failed part way through the arrays: the next click reads the scene again."""
        self._arrays = None
        self.history = ClickHistory(recordedClicks(self.segmentationNode), self.undoSteps)


def _writeVolume(node, array: np.ndarray) -> None:
    """Replace the voxels of a scalar volume node (same shape) with ``array`` (float32)."""
    values = np.ascontiguousarray(array, dtype=np.float32).ravel()
    node.GetImageData().GetPointData().SetScalars(numpy_support.numpy_to_vtk(values, deep=True))
    node.GetImageData().Modified()
    node.Modified()


def _probabilityNodes(logic, segmentationNode) -> list:
    """The ``probability.<class>`` map nodes of a segmentation, one per foreground class."""
    classes = json.loads(segmentationNode.GetAttribute(ATTRIBUTE + "Classes"))
    maps = logic.mapNodes(segmentationNode)
    nodes = [maps.get(f"probability.{volume_name(c['name'])}") for c in classes[1:]]
    if any(n is None for n in nodes):
        raise ClickError("a probability map of this segmentation was deleted; segment again to refine it")
    return nodes


def nodeVoxels(node) -> np.ndarray:
    """(D, H, W) the voxels of a scalar volume node, not copied: a view of its image data's scalars."""
    imageData = node.GetImageData()
    return numpy_support.vtk_to_numpy(imageData.GetPointData().GetScalars()).reshape(
        tuple(reversed(imageData.GetDimensions())))


def pasteVolume(node, box: tuple[slice, slice, slice], values: np.ndarray) -> None:
    """Write ``values`` into the ``box`` (array slices, (D, H, W) order) of a scalar volume node."""
    imageData = node.GetImageData()
    nodeVoxels(node)[box] = values
    imageData.GetPointData().GetScalars().Modified()
    imageData.Modified()
    node.Modified()


def writeLabels(segmentationNode, labels: Image, changed: np.ndarray, values=None) -> None:
    """Each class segment replaced by its voxels of ``labels`` when anything ``changed``; only the
    classes of ``values`` (class values; all when None), e.g. those a click moved voxels into or out of:
    on a whole head each class written costs a whole-volume mask."""
    if not changed.any():
        return
    classes = {c["name"].lower(): int(c["value"]) for c in json.loads(segmentationNode.GetAttribute(ATTRIBUTE + "Classes"))}
    segmentation = segmentationNode.GetSegmentation()
    tagged = {}
    for index in range(segmentation.GetNumberOfSegments()):
        segmentId = segmentation.GetNthSegmentID(index)
        segment = segmentation.GetSegment(segmentId)
        tag = vtkReference("")
        value = int(str(tag)) if segment.GetTag(CLASS_VALUE_TAG, tag) else classes.get(segment.GetName().lower())
        if value:
            tagged[value] = segmentId
    logic = slicer.vtkSlicerSegmentationsModuleLogic
    if values is not None:
        tagged = {value: segmentId for value, segmentId in tagged.items() if value in set(int(v) for v in values)}
    for value, segmentId in tagged.items():  # whole masks: a partial extent loses a shared layer's other labels
        logic.SetBinaryLabelmapToSegment(orientedMask(labels.geometry, labels.array == value), segmentationNode,
                                         segmentId, logic.MODE_REPLACE)


# -- the Slicer panel's click refinement -----------------------------------------------------------
@dataclass(frozen=True)
class ClickReport:
    """What one placed point did: its class name and action (:data:`ADD` or :data:`REMOVE`), position
    (mm, LPS), the voxels whose label or maps changed, the seconds from placement to updated nodes, and
    ``error`` (the one-line reason) when it was refused and removed."""

    className: str
    action: str
    positionLPS: tuple[float, float, float]
    changedVoxels: int = 0
    seconds: float = 0.0
    error: str | None = None


class ClickRefinement:
    """Click refinement of one AttnSeg segmentation through markups point lists, without GUI.

    :meth:`pointList` makes (on first use) or finds the list of a class and action; :meth:`startPlacing`
    puts the views in persistent place mode into it. Every point placed in one of the lists (its position
    defined, as Slicer's placement and ``AddControlPointWorld`` do) is refined at once: an ``add`` point
    is a click of its class, a ``remove`` point a ``background`` click. The point is then locked (moving
    it would no longer match what it did); a point the refinement refuses (outside the image) is removed.
    A click of a target's class outside that target's box on a localised whole head is refused the same
    way, as ``attnseg refine`` refuses it. The arrays, clicks and undo steps are a
    :class:`SceneRefinement`'s (the web Refine step's too). Each refinement is reported to ``onReport``
    (a callable taking a :class:`ClickReport`) and kept for :meth:`undo`, at most ``undoSteps`` of them.
    """

    def __init__(self, logic, segmentationNode, refiner: Refiner | None = None, undoSteps: int = UNDO_STEPS):
        self.logic = logic
        self.segmentationNode = segmentationNode
        self.onReport = None
        self.lastReport: ClickReport | None = None
        self.session = SceneRefinement(logic, segmentationNode, refiner, undoSteps)
        self._observations: dict[str, tuple[object, int]] = {}
        for listNode in self.pointLists():
            self._observe(listNode)

    # -- the point lists ----------------------------------------------------------------------
    @property
    def classNames(self) -> list[str]:
        """The segmentation's class names, background excluded: what a point list can be for."""
        return [c["name"] for c in self._classes()[1:]]

    def _classes(self) -> list[dict]:
        return json.loads(self.segmentationNode.GetAttribute(ATTRIBUTE + "Classes"))

    def pointLists(self) -> list:
        """The segmentation's click point lists (every class and action made so far)."""
        node = self.segmentationNode
        return [n for n in (node.GetNthNodeReference(REF_POINT_LIST, i)
                            for i in range(node.GetNumberOfNodeReferences(REF_POINT_LIST))) if n is not None]

    def pointList(self, className: str, action: str = ADD):
        """The markups point list of ``className`` for ``action`` (:data:`ADD` or :data:`REMOVE`), made
        when missing: named "<class> <action>", drawn in the class's colour with a "+" or "-" glyph, and
        tied to the segmentation by node references both ways."""
        if action not in ACTIONS:
            raise ValueError(f"unknown click action {action!r}; choose one of {', '.join(ACTIONS)}")
        classes = self._classes()
        cls = classes[class_index(className, [c["name"] for c in classes])]
        if cls["value"] == 0:
            raise ClickError("background has no point list: place a remove point of the class to clear instead")
        for listNode in self.pointLists():
            if (listNode.GetAttribute(POINT_CLASS_ATTRIBUTE) == cls["name"]
                    and listNode.GetAttribute(POINT_ACTION_ATTRIBUTE) == action):
                return listNode
        scene = self.segmentationNode.GetScene()
        listNode = scene.AddNewNodeByClass("vtkMRMLMarkupsFiducialNode",
                                           scene.GenerateUniqueName(f"{cls['name']} {action}"))
        listNode.SetAttribute(POINT_CLASS_ATTRIBUTE, cls["name"])
        listNode.SetAttribute(POINT_ACTION_ATTRIBUTE, action)
        listNode.SetControlPointLabelFormat("+%d" if action == ADD else "-%d")
        listNode.CreateDefaultDisplayNodes()
        display = listNode.GetDisplayNode()
        color = classColor(cls)
        display.SetColor(*color)
        display.SetSelectedColor(*color)
        display.SetGlyphTypeFromString(GLYPHS[action])
        listNode.SetNodeReferenceID(REF_SEGMENTATION, self.segmentationNode.GetID())
        self.segmentationNode.AddNodeReferenceID(REF_POINT_LIST, listNode.GetID())
        self._observe(listNode)
        return listNode

    def _observe(self, listNode) -> None:
        if listNode.GetID() not in self._observations:
            tag = listNode.AddObserver(slicer.vtkMRMLMarkupsNode.PointPositionDefinedEvent, self._onPointDefined)
            self._observations[listNode.GetID()] = (listNode, tag)

    def close(self) -> None:
        """Stop observing the point lists (their points then no longer refine)."""
        for listNode, tag in self._observations.values():
            listNode.RemoveObserver(tag)
        self._observations.clear()

    # -- placing ------------------------------------------------------------------------------
    @property
    def interactionNode(self):
        """The scene's interaction node (its mode says whether the views place points)."""
        return self.segmentationNode.GetScene().GetNodeByID("vtkMRMLInteractionNodeSingleton")

    def _selectionNode(self):
        return self.segmentationNode.GetScene().GetNodeByID("vtkMRMLSelectionNodeSingleton")

    def startPlacing(self, className: str, action: str = ADD):
        """Put the views in persistent place mode into the point list of ``className`` and ``action``
        (as the Markups module's place widget does); returns the list."""
        listNode = self.pointList(className, action)
        selection, interaction = self._selectionNode(), self.interactionNode
        if selection is None or interaction is None:
            raise ClickError("this scene has no selection or interaction node to place points with")
        selection.SetReferenceActivePlaceNodeClassName(listNode.GetClassName())
        selection.SetReferenceActivePlaceNodeID(listNode.GetID())
        interaction.SetPlaceModePersistence(1)
        interaction.SetCurrentInteractionMode(slicer.vtkMRMLInteractionNode.Place)
        return listNode

    def stopPlacing(self) -> None:
        """Back to moving the views, when points are being placed into one of the lists."""
        if self.placing() is not None:
            self.interactionNode.SwitchToViewTransformMode()

    def placing(self) -> tuple[str, str] | None:
        """(class name, action) of the list points are being placed into, or None."""
        selection, interaction = self._selectionNode(), self.interactionNode
        if (selection is None or interaction is None
                or interaction.GetCurrentInteractionMode() != slicer.vtkMRMLInteractionNode.Place):
            return None
        for listNode in self.pointLists():
            if listNode.GetID() == selection.GetActivePlaceNodeID():
                return listNode.GetAttribute(POINT_CLASS_ATTRIBUTE), listNode.GetAttribute(POINT_ACTION_ATTRIBUTE)
        return None

    # -- refining -----------------------------------------------------------------------------
    def refiner(self) -> Refiner:
        """The update the clicks use (see :func:`refinerFor`), loaded on the first click."""
        return self.session.refiner()

    def _onPointDefined(self, listNode, event) -> None:
        """The points of ``listNode`` defined and not yet used (unlocked) are refined, in their order."""
        new = [listNode.GetNthControlPointID(i) for i in range(listNode.GetNumberOfControlPoints())
               if listNode.GetNthControlPointPositionStatus(i) == slicer.vtkMRMLMarkupsNode.PositionDefined
               and not listNode.GetNthControlPointLocked(i)]
        for pointID in new:  # by ID: a refused point is removed, which moves the indices after it
            self._apply(listNode, pointID)

    def _apply(self, listNode, pointID: str) -> None:
        """Refine with the point ``pointID`` of ``listNode``, lock it and keep the undo step."""
        start = time.perf_counter()
        className = listNode.GetAttribute(POINT_CLASS_ATTRIBUTE)
        action = listNode.GetAttribute(POINT_ACTION_ATTRIBUTE)
        index = listNode.GetNthControlPointIndexByID(pointID)
        ras = [0.0, 0.0, 0.0]
        listNode.GetNthControlPointPositionWorld(index, ras)
        lps = (-ras[0], -ras[1], ras[2])
        label = 0 if action == REMOVE else class_index(className, [c["name"] for c in self._classes()])
        listNode.SetNthControlPointLocked(index, True)
        try:
            refined, step = self.session.click(Click(lps, label), tag=(listNode.GetID(), pointID))
        except (AttnSegError, ValueError) as error:  # outside the image or its box, a map deleted: the point goes
            listNode.RemoveNthControlPoint(listNode.GetNthControlPointIndexByID(pointID))
            self._report(ClickReport(className, action, lps, error=str(error)))
            return
        self._report(ClickReport(className, action, lps, int(step.changed.sum()), time.perf_counter() - start))

    def _report(self, report: ClickReport) -> None:
        self.lastReport = report
        if self.onReport is not None:
            self.onReport(report)

    # -- undo ---------------------------------------------------------------------------------
    @property
    def undoSteps(self) -> int:
        """How many clicks :meth:`undo` can take back."""
        return self.session.history.undo_steps

    def undo(self) -> bool:
        """Take back the newest click: the labels, probabilities, uncertainty and clicks attribute as they
        were before it (voxel for voxel; edits elsewhere stay), and its point removed. False when there
        is nothing to undo."""
        if not self.undoSteps:
            return False
        step = self.session.undo()
        listID, pointID = step.tag
        listNode = self.segmentationNode.GetScene().GetNodeByID(listID)
        if listNode is not None and listNode.GetNthControlPointIndexByID(pointID) >= 0:
            listNode.RemoveNthControlPoint(listNode.GetNthControlPointIndexByID(pointID))
        return True
